"""Stand-in for the built-in Lora extension's ``extra_networks_lora.py`` (same in A1111,
Forge and reForge): ``<lora:NAME:TE[:UNET]>`` → names and multipliers →
``networks.load_networks``; "Lora hashes" in the infotext."""

from modules import extra_networks

import networks


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__('lora')

    remove_symbols = str.maketrans('', '', ":,")

    def activate(self, p, params_list):
        names = []
        te_multipliers = []
        unet_multipliers = []
        for params in params_list:
            names.append(params.positional[0])
            te_multiplier = float(params.positional[1]) if len(params.positional) > 1 else 1.0
            unet_multiplier = float(params.positional[2]) if len(params.positional) > 2 else te_multiplier
            te_multipliers.append(te_multiplier)
            unet_multipliers.append(unet_multiplier)

        networks.load_networks(names, te_multipliers, unet_multipliers)

        if not getattr(p, "is_hr_pass", False) or not hasattr(p, "lora_hashes"):
            p.lora_hashes = {}
        for item in networks.loaded_networks:
            p.lora_hashes[item.mentioned_name.translate(self.remove_symbols)] = item.network_on_disk.shorthash
        p.extra_generation_params["Lora hashes"] = ', '.join(f'{k}: {v}' for k, v in p.lora_hashes.items())

    def deactivate(self, p):
        pass
