"""Stand-in for ``modules/extra_networks.py``: ``<name:args>`` tags are removed from the
batch's prompts and handed to registered networks; ``activate`` then calls the scripts'
``after_extra_networks_activate``."""

from __future__ import annotations

import re
from collections import defaultdict

from modules import errors

extra_network_registry = {}
re_extra_net = re.compile(r"<(\w+):([^>]+)>")


class ExtraNetworkParams:
    """``<name:a:b>`` → ``items`` ``["a", "b"]``, all positional here (upstream also reads
    ``key=value`` items into ``named``)."""

    def __init__(self, items=None):
        self.items = items or []
        self.positional = list(self.items)

    def __eq__(self, other):
        return self.items == other.items


class ExtraNetwork:
    def __init__(self, name):
        self.name = name


def register_extra_network(extra_network):
    extra_network_registry[extra_network.name] = extra_network


def activate(p, extra_network_data):
    for name, args in (extra_network_data or {}).items():
        net = extra_network_registry[name]
        try:
            net.activate(p, args)
        except Exception as e:
            errors.display(e, f"activating extra network {name}")
    p.scripts.after_extra_networks_activate(p, batch_number=p.iteration, prompts=p.prompts, seeds=p.seeds,
                                            subseeds=p.subseeds, extra_network_data=extra_network_data)


def deactivate(p, extra_network_data):
    for net in extra_network_registry.values():
        net.deactivate(p)


def parse_prompt(prompt):
    res = defaultdict(list)

    def found(m):
        res[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    return re.sub(re_extra_net, found, prompt), res


def parse_prompts(prompts):
    res = []
    extra_data = None
    for prompt in prompts:
        updated_prompt, parsed = parse_prompt(prompt)
        if extra_data is None:
            extra_data = parsed
        res.append(updated_prompt)
    return res, extra_data
