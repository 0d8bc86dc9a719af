"""Stand-in for the built-in Lora extension's ``scripts/lora_script.py``: registers the
``lora`` extra network before the UI is built (``on_before_ui``)."""

import extra_networks_lora
import networks
from modules import extra_networks, script_callbacks


def before_ui():
    networks.extra_network_lora = extra_networks_lora.ExtraNetworkLora()
    extra_networks.register_extra_network(networks.extra_network_lora)


script_callbacks.on_before_ui(before_ui)
