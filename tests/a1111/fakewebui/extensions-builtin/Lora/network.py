"""Stand-in for the built-in Lora extension's ``network.py`` (A1111/reForge
``extensions-builtin/Lora``, Forge ``extensions-builtin/sd_forge_lora``): ``NetworkOnDisk`` (a
file the webui can load and its hash) and ``Network`` (a loaded network: multipliers and, on
A1111, one entry in ``modules`` per model layer a key matched)."""

import hashlib


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name = name
        self.filename = filename
        self.hash = None
        self.shorthash = None

    def set_hash(self, v):
        self.hash = v
        self.shorthash = self.hash[0:12]

    def read_hash(self):
        """Upstream: the addnet hash from the hash cache; here the file's sha256."""
        if not self.hash:
            with open(self.filename, "rb") as f:
                self.set_hash(hashlib.sha256(f.read()).hexdigest())


class Network:  # LoraModule
    def __init__(self, name, network_on_disk: NetworkOnDisk):
        self.name = name
        self.network_on_disk = network_on_disk
        self.te_multiplier = 1.0
        self.unet_multiplier = 1.0
        self.modules = {}
        self.mentioned_name = None
