"""Stand-in for Forge's ``backend/patcher/lora.py``: ``LoraLoader``, one per model (shared by
all patcher clones of it). ``refresh(lora_patches)`` does nothing when the set's hash
(``str(list(lora_patches.keys()))``) is the one merged already (unless ``force_refresh``);
else it puts the backed-up weights back, then merges every patch into its weight (new
``Parameter``s), backing up each weight first, and records ``loaded_hash``. (Not modelled:
"online" LoRAs, applied in the layers' forward.)"""

import torch

from backend import utils


def _merged(weight, patches):
    """``merge_lora_to_weight`` for the ``lora`` patches the stand-in's loaders build:
    w + strength · (up @ down) · alpha / rank (float32, then back to the weight's dtype)."""
    out = weight.to(torch.float32)
    for strength_patch, patch, strength_model, offset, function in patches:
        kind, (up, down, alpha, mid, dora_scale) = patch
        rank = down.shape[0]
        scale = (alpha / rank) if alpha is not None else 1.0
        out = out * strength_model + strength_patch * scale * (up.to(out) @ down.to(out)).reshape(out.shape)
    return out.to(weight.dtype)


class LoraLoader:
    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.loaded_hash = str([])

    @torch.inference_mode()
    def refresh(self, lora_patches, offload_device=torch.device('cpu'), force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        all_patches = {}
        for patches in lora_patches.values():
            for key, current_patches in patches.items():
                all_patches[key] = all_patches.get(key, []) + current_patches
        for k, w in self.backup.items():
            utils.set_attr_raw(self.model, k, w)
        self.backup = {}
        for key, current_patches in all_patches.items():
            parent_layer, child_key, weight = utils.get_attr_with_parent(self.model, key)
            self.backup[key] = weight.to(device=offload_device)
            weight = _merged(weight, current_patches)
            utils.set_attr_raw(self.model, key, torch.nn.Parameter(weight, requires_grad=False))
        self.loaded_hash = hashes
