"""The transformer inventories (``safet2i.lora.dit_arch``) against ComfyUI's own models and key map.

ComfyUI's Flux, SD3 (MMDiT), Qwen-Image and Wan 2.1 model classes are built with tiny configs
in a subprocess (ComfyUI's interpreter, ``--cpu``); their state dicts must hold exactly our
native modules with our shapes, and ``comfy.lora.model_lora_keys_unet`` must map every
``transformer.<diffusers path>`` it knows to the native weight, offset slice and row function
our stacking rules give (Flux/SD3 qkv, Flux linear1, swapped AdaLN rows). Skipped without
``COMFYUI_PATH`` and ``COMFYUI_PYTHON``.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest

from safet2i.lora import dit_arch as D

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent('''
    import json, sys
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.lora
    import comfy.supported_models as sm
    cfgs = {
        "flux": (sm.Flux, dict(image_model="flux", in_channels=4, out_channels=4, patch_size=2, vec_in_dim=24,
                 context_in_dim=32, hidden_size=32, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2,
                 axes_dim=[4, 6, 6], theta=10000, qkv_bias=True, guidance_embed=True)),
        "sd3": (sm.SD3, dict(in_channels=4, out_channels=4, patch_size=2, depth=2, adm_in_channels=24, input_size=None,
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": 32, "out_features": 128}},
                pos_embed_max_size=8, num_patches=64, pos_embed_scaling_factor=None, qk_norm="rms",
                x_block_self_attn_layers=[0])),
        "qwen-image": (sm.QwenImage, dict(image_model="qwen_image", in_channels=16, out_channels=4, patch_size=2,
                       num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                       axes_dims_rope=(4, 6, 6))),
        "wan": (sm.WAN21_T2V, dict(image_model="wan2.1", model_type="t2v", dim=32, out_dim=4, in_dim=4, num_heads=2,
                ffn_dim=48, num_layers=2, patch_size=(1, 2, 2), freq_dim=16, text_dim=24, window_size=(-1, -1),
                qk_norm=True, cross_attn_norm=True, eps=1e-6)),
    }
    out = {}
    for name, (cls, uc) in cfgs.items():
        m = cls(uc).get_model({})
        km = comfy.lora.model_lora_keys_unet(m, {})
        out[name] = {"sd": {k: list(v.shape) for k, v in m.state_dict().items()},
                     "km": {k: (v if isinstance(v, str) else [v[0], v[1], getattr(v[2], "__name__", None)
                                                              if len(v) > 2 else None]) for k, v in km.items()}}
    print("JSON" + json.dumps(out))
''')

# The same models as diffusers configs (ComfyUI's Flux in_channels 4 with 2x2 patches = diffusers' 16;
# ComfyUI's SD3 hidden size is 64·depth).
DIFFUSERS_CFG = {
    "flux": dict(in_channels=16, patch_size=1, num_layers=2, num_single_layers=2, num_attention_heads=2,
                 attention_head_dim=16, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True),
    "sd3": dict(num_layers=2, num_attention_heads=2, attention_head_dim=64, caption_projection_dim=128,
                joint_attention_dim=32, pooled_projection_dim=24, in_channels=4, out_channels=4, patch_size=2,
                dual_attention_layers=(0,)),
    "qwen-image": dict(in_channels=16, out_channels=4, patch_size=2, num_layers=2, attention_head_dim=16,
                       num_attention_heads=2, joint_attention_dim=32),
    "wan": dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=48, text_dim=24, freq_dim=16,
                out_channels=4, patch_size=(1, 2, 2)),
}


@pytest.fixture(scope="module")
def comfy_models():
    root, py = os.environ.get("COMFYUI_PATH"), os.environ.get("COMFYUI_PYTHON")
    if not root or not py:
        pytest.skip("COMFYUI_PATH and COMFYUI_PYTHON not set")
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([py, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    line = next((x for x in r.stdout.splitlines() if x.startswith("JSON")), None)
    assert line, r.stderr[-3000:]
    return json.loads(line[4:])


@pytest.mark.parametrize("family", sorted(DIFFUSERS_CFG))
def test_native_modules_are_comfyuis_state_dict(comfy_models, family):
    inv = D.build(family, DIFFUSERS_CFG[family])
    sd = comfy_models[family]["sd"]
    theirs = {k[len("diffusion_model."):-len(".weight")]: tuple(v) for k, v in sd.items()
              if k.startswith("diffusion_model.") and k.endswith(".weight") and len(v) in (2, 4)}
    assert {n: nat.shape for n, nat in inv.natives.items()} == theirs


@pytest.mark.parametrize("family", sorted(DIFFUSERS_CFG))
def test_comfyuis_key_map_agrees_with_our_stacking(comfy_models, family):
    inv = D.build(family, DIFFUSERS_CFG[family])
    km = comfy_models[family]["km"]
    checked = 0
    for name, mod in inv.modules.items():
        nat = inv.natives[inv.owner[name]]
        piece = next(p for p in nat.pieces if p.diffusers == name)
        key = f"diffusion_model.{nat.name}.weight"
        # the generic map: every native weight under diffusion_model.<native> and lora_unet_<native flat>
        assert km[f"diffusion_model.{nat.name}"] == key
        assert km["lora_unet_" + nat.name.replace(".", "_")] == key
        entry = km.get(f"transformer.{name}")
        if entry is None:
            assert family == "wan", name        # ComfyUI maps no diffusers names for Wan
            continue
        checked += 1
        if isinstance(entry, str):
            assert entry == key and not nat.fused, name
        elif entry[1] is None:
            assert entry[0] == key and entry[2] == "swap_scale_shift" and piece.swap, name
        else:
            assert entry[0] == key and entry[1] == [0, piece.start, piece.rows] and not piece.swap, name
    assert checked == (0 if family == "wan" else len(inv.modules))
