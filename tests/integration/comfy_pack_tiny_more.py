"""Test-only ComfyUI nodes: tiny random Lumina 2 (NextDiT, the Z-Image family's architecture) and
HunyuanVideo models made of ComfyUI's OWN classes, and random conditioning of a given width.
Never part of the SafeT2I pack (conftest.py copies every ``comfy_pack_*.py`` into the test
server's custom_nodes; this file imports nothing from the repository).

The models are chosen by ComfyUI's own ``model_detection.model_config_from_unet_config`` (the
matching step of UNETLoader) from a unet config with small widths, then built by the class's
``get_model``, as ``comfy_pack_tiny_families.py`` does for SD3/Flux/Qwen-Image/Wan. Their text
encoders (Gemma 2 for Lumina 2, a Llama for HunyuanVideo) are not built: safety guidance does not
read text, so random conditioning of the model's context width stands in for the prompt, the
negative and the safety concept (same token count, so ComfyUI can batch them).
"""

from __future__ import annotations

CONFIGS = {
    # dim 64 = 2 heads x 32 = sum(axes_dims); cap_feat_dim 32 = the context width
    "lumina2": {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": 32,
                "n_layers": 1, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 1, "qk_norm": True,
                "axes_dims": [8, 12, 12], "axes_lens": [300, 64, 64], "multiple_of": 32},
    # hidden 64 = 2 heads x 32 = sum(axes_dim); 3-d patches (1, 2, 2) as HunyuanVideo's; context 32, pooled 16
    "hunyuan_video": {"image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "vec_in_dim": 16,
                      "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
                      "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 256, "patch_size": [1, 2, 2],
                      "qkv_bias": True, "guidance_embed": True, "byt5": False, "meanflow": False},
}
EXPECTED = {"lumina2": "Lumina2", "hunyuan_video": "HunyuanVideo"}
WIDTHS = {"lumina2": (32, None), "hunyuan_video": (32, 16)}


def _init(module, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p[0].numel()) ** 0.5)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


class SafeT2ITestTinyDiT:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(CONFIGS),), "seed": ("INT", {"default": 0})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"
    CATEGORY = "_for_testing"

    def run(self, family, seed):
        import comfy.model_detection
        import comfy.model_management as mm
        import comfy.model_patcher
        import torch

        cfg = dict(CONFIGS[family])
        mc = comfy.model_detection.model_config_from_unet_config(cfg)
        assert mc is not None and type(mc).__name__ == EXPECTED[family], (family, type(mc).__name__)
        mc.set_inference_dtype(torch.float32, None)
        model = mc.get_model({}, "")
        _init(model.diffusion_model, seed)
        bad = [k for k, v in model.diffusion_model.state_dict().items() if v.is_floating_point() and not v.isfinite().all()]
        assert not bad, bad
        return (comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                 offload_device=mm.unet_offload_device()),)


class SafeT2ITestRandomCond:
    """CONDITIONING of ``family``'s context width (and pooled width), ``tokens`` rows, from ``seed``."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(CONFIGS),), "tokens": ("INT", {"default": 8}), "seed": ("INT", {"default": 0})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"
    CATEGORY = "_for_testing"

    def run(self, family, tokens, seed):
        import torch

        width, pooled = WIDTHS[family]
        g = torch.Generator().manual_seed(seed)
        extra = {}
        if pooled:
            extra["pooled_output"] = torch.randn((1, pooled), generator=g)
        if family == "lumina2":
            extra["attention_mask"] = torch.ones((1, tokens), dtype=torch.long)
        return ([[torch.randn((1, tokens, width), generator=g), extra]],)


NODE_CLASS_MAPPINGS = {"SafeT2ITestTinyDiT": SafeT2ITestTinyDiT, "SafeT2ITestRandomCond": SafeT2ITestRandomCond}
