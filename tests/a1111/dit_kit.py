"""Helpers shared by the Forge Flux and SD3.5 stand-in tests (``test_standin_flux.py``,
``test_standin_sd35.py``): the float64 SAFREE projector, the conditioning recorder, the steering
arguments, and LoRA files of a transformer's pieces with their expected W + s·ΔW.

``pieces``: ``(diffusers module, native weight, first row, rows)``: where each diffusers target
sits in a native (possibly stacked) weight; ``fs``: ``{module: (up [rows, r], down [r, in], alpha)}``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def proj(vectors: np.ndarray) -> np.ndarray:
    a = vectors.T
    return a @ np.linalg.pinv(a.T @ a) @ a.T


def f64(t) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def capture(webui):
    seen = []
    webui.callbacks.on_cfg_denoiser(lambda params: seen.append(
        {k: v.clone() for k, v in params.text_cond.items()}))
    return seen


def steering_args(webui, alpha, concepts):
    return webui.ui_args(steering_enabled=True, steering_concepts="custom", steering_custom=", ".join(concepts),
                         steering_alpha=alpha, steering_self_validating=False)


def factors(pieces, width: int, seed=0) -> dict:
    """Random factors per piece, ranks 2 and 3 alternating (fused block-diagonally), alpha rank + 1."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (mod, _, _, rows) in enumerate(pieces):
        rank = 2 + i % 2
        out[mod] = (torch.randn(rows, rank, generator=g), torch.randn(rank, width, generator=g), float(rank + 1))
    return out


def write_lora(pieces, fs: dict, out_rows: dict, layout: str, name: str, extra: dict | None = None) -> str:
    """``peft``: diffusers-PEFT keys (``transformer.….lora_A/B.weight``, no alpha: scale 1);
    ``kohya``: native names (``lora_unet_<native>``), a stacked weight's pieces in one factor pair
    (block-diagonal, each piece's own scale folded into its down rows), alpha = rank."""
    from modules import paths

    sd = {}
    if layout == "peft":
        for mod, (up, down, _) in fs.items():
            sd[f"transformer.{mod}.lora_A.weight"], sd[f"transformer.{mod}.lora_B.weight"] = down, up
    else:
        for native in dict.fromkeys(n for _, n, _, _ in pieces):
            parts = [(m, s, r) for m, n, s, r in pieces if n == native]
            rank = sum(fs[m][1].shape[0] for m, _, _ in parts)
            up, downs, col = torch.zeros(out_rows[native], rank), [], 0
            for m, start, rows in parts:
                u, d, alpha = fs[m]
                up[start:start + rows, col:col + d.shape[0]] = u
                downs.append(d * (alpha / d.shape[0]))
                col += d.shape[0]
            k = "lora_unet_" + native.replace(".", "_")
            sd[k + ".lora_up.weight"], sd[k + ".lora_down.weight"] = up, torch.cat(downs)
            sd[k + ".alpha"] = torch.tensor(float(rank))        # scale 1 overall
    sd.update(extra or {})
    folder = Path(paths.models_path) / "safety_models"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / name))
    return f"safety_models/{name}"


def expected_weights(pieces, fs: dict, w0: dict, layout: str, strength: float) -> dict:
    """W + s·ΔW per native weight, float64: each piece's rows get s·scale·B·A."""
    out = {k: v.to(torch.float64).clone() for k, v in w0.items()}
    for mod, (up, down, alpha) in fs.items():
        _, native, start, rows = next(p for p in pieces if p[0] == mod)
        scale = 1.0 if layout == "peft" else alpha / down.shape[0]
        out[native][start:start + rows] += strength * scale * (up.double() @ down.double())
    return out


def model_weights(webui) -> dict:
    dm = webui.shared.sd_model.forge_objects.unet.model.diffusion_model
    return {n[:-len(".weight")]: p.detach().clone() for n, p in dm.named_parameters() if n.endswith(".weight")}


def check_lora_patched(webui, p, processed, natives, w0: dict, want: dict, coverage: str, strength: float) -> None:
    """A job that applied a safety LoRA through Forge: its coverage line, the native kohya file
    Forge loaded (read without safet2i), the patches Forge recorded, and the UNet's weights after
    sampling: ``want`` (W + s·ΔW) on the ``natives``, untouched elsewhere."""
    from safetensors.torch import load_file

    job = p._safet2i_job
    assert not job.failed, job.failed
    n = len(natives)
    assert job.lora.targets == job.lora.total == n
    assert f"SafeT2I LoRA coverage: {n}/{n} {coverage}" in processed.infotexts[0]
    assert f"loaded {n}/{n}" in processed.infotexts[0]
    written = load_file(str(job.lora.filename))
    assert {k.rsplit(".", 2)[0] for k in written} == {"lora_unet_" + m.replace(".", "_") for m in natives}
    fo = webui.shared.sd_model.forge_objects_after_applying_lora
    ident = (str(job.lora.filename), strength, 1.0, False)
    assert set(fo.unet.lora_patches[ident]) == {f"diffusion_model.{m}.weight" for m in natives}
    for name, w in model_weights(webui).items():
        if name in natives:
            np.testing.assert_allclose(f64(w), f64(want[name]), rtol=0, atol=2e-5, err_msg=name)
            assert not torch.equal(w, w0[name])
        else:
            assert torch.equal(w, w0[name]), name             # nothing else is touched
