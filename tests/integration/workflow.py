"""Convert a UI-format workflow (what the frontend saves and ``example_workflows/`` holds)
into the API format ``POST /prompt`` accepts, using the server's ``/object_info``.

Handles what our example workflows use: links, positional ``widgets_values`` (skipping
the frontend-only value after ``control_after_generate`` widgets), muted/bypassed nodes
(dropped) and Note nodes. Subgraphs, primitive nodes, reroutes, unknown node types, links
from dropped nodes and missing values of required widgets are rejected with a ValueError naming
them (trailing optional widgets without a value, as in workflows saved before such an input was
appended, keep their defaults as in the frontend).
"""

from __future__ import annotations

FRONTEND_ONLY = {"Note", "MarkdownNote"}
UNSUPPORTED = {"PrimitiveNode", "Reroute"}


def _widget_names(spec: dict) -> list[tuple[str, bool]]:
    """(input name, has a control_after_generate value) for widget inputs, in order."""
    return [(name, control) for name, control, _ in _widgets(spec)]


def _widgets(spec: dict) -> list[tuple[str, bool, bool]]:
    """(input name, has a control_after_generate value, optional) for widget inputs, in order."""
    out = []
    order = spec.get("input_order", {})
    for group in ("required", "optional"):
        for name in order.get(group, []):
            typ, *rest = spec["input"][group][name]
            opts = rest[0] if rest and isinstance(rest[0], dict) else {}
            if isinstance(typ, list) or typ in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                out.append((name, bool(opts.get("control_after_generate")), group == "optional"))
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise ValueError("workflow uses subgraphs, which this converter does not expand")
    links = {l[0]: l for l in workflow.get("links", [])}
    dropped = {n["id"] for n in workflow["nodes"] if n["type"] in FRONTEND_ONLY or n.get("mode", 0) in (2, 4)}
    prompt = {}
    for node in workflow["nodes"]:
        if node["id"] in dropped:
            continue
        if node["type"] in UNSUPPORTED:
            raise ValueError(f"node {node['id']} is a {node['type']}, which this converter does not resolve")
        if node["type"] not in object_info:
            raise ValueError(f"node {node['id']} has type {node['type']!r}, unknown to this server")
        spec = object_info[node["type"]]
        inputs = {}
        linked = set()
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                _, src, slot, *_ = links[inp["link"]]
                if src in dropped:
                    raise ValueError(f"node {node['id']} input {inp['name']!r} comes from muted/bypassed node {src}")
                inputs[inp["name"]] = [str(src), slot]
                linked.add(inp["name"])
        values = list(node.get("widgets_values") or [])
        i = 0
        for name, has_control, optional in _widgets(spec):
            # The frontend keeps a value for every widget, linked ones too (the link wins). A
            # workflow saved before an optional input was appended has no value for it: the
            # frontend keeps the widget's default, and the server uses it when the input is absent.
            if i >= len(values) and optional:
                i += 1
                continue
            if i >= len(values):
                raise ValueError(f"node {node['id']} ({node['type']}) has no widget value for {name!r}")
            if name not in linked:
                inputs[name] = values[i]
            i += 2 if has_control else 1
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
