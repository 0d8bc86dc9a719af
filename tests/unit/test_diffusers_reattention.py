"""Latent re-attention in diffusers (safet2i.diffusers_adapter.latent_reattention) against a hand
computation on a tiny UNet."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from safet2i.diffusers_adapter import latent_reattention, reattention_scales  # noqa: E402
from safet2i.errors import SafeT2IError  # noqa: E402


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
        attention_head_dim=8, norm_num_groups=32,
    ).eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    x = torch.cat([x[:1], x[:1]])  # CFG: the same latent in both halves
    ehs = torch.randn(2, 6, 16, generator=g)          # [uncond; steered]
    original = torch.randn(1, 6, 16, generator=g)     # the unsteered prompt
    return x, torch.tensor([500]), ehs, original


def hand_filter(h_safe: np.ndarray, h_orig: np.ndarray, scale: float, window: int) -> np.ndarray:
    """The paper's filter written out with numpy in float64: shift(FFT2), damp coefficients of the
    centred window whose magnitude exceeds the reference's, inverse, real part."""
    fs = np.fft.fftshift(np.fft.fft2(h_safe.astype(np.float64)), axes=(-2, -1))
    fo = np.fft.fftshift(np.fft.fft2(h_orig.astype(np.float64)), axes=(-2, -1))
    H, W = h_safe.shape[-2:]
    cy, cx = H // 2, W // 2
    out = fs.copy()
    for yy in range(max(0, cy - window), cy + window):
        for xx in range(max(0, cx - window), cx + window):
            sel = np.abs(fs[..., yy, xx]) > np.abs(fo[..., yy, xx])
            out[..., yy, xx] = np.where(sel, fs[..., yy, xx] * scale, fs[..., yy, xx])
    return np.real(np.fft.ifft2(np.fft.ifftshift(out, axes=(-2, -1))))


def reference(unet, x, t, ehs, original, scales, window):
    """The plain UNet on [uncond; steered; original], with the steered rows' decoder skip
    features replaced by hand_filter where the backbone channel count is in ``scales``."""
    handles, hits = [], []
    skips = {}

    def block_pre(block):
        def hook(mod, args, kwargs):
            skips["t"] = kwargs["res_hidden_states_tuple"]
        return hook

    def res_pre(j):
        def hook(mod, args, kwargs):
            inp = args[0]
            skip = skips["t"][-(j + 1)]
            hc = inp.shape[1] - skip.shape[1]
            assert torch.equal(inp[:, hc:], skip)   # diffusers concatenates [backbone, skip]
            if hc not in scales:
                return None
            hits.append(hc)
            s = inp[:, hc:].detach().numpy()
            f = hand_filter(s[1:2], s[2:3], scales[hc], window)
            new = inp.clone()
            new[1:2, hc:] = torch.from_numpy(f).to(inp.dtype)
            return (new, *args[1:]), kwargs
        return hook

    for block in unet.up_blocks:
        handles.append(block.register_forward_pre_hook(block_pre(block), with_kwargs=True))
        for j, r in enumerate(block.resnets):
            handles.append(r.register_forward_pre_hook(res_pre(j), with_kwargs=True))
    try:
        with torch.no_grad():
            out = unet(torch.cat([x, x[1:]]), t, torch.cat([ehs, original])).sample
    finally:
        for h in handles:
            h.remove()
    return out[:2], hits


def run(unet, x, t, ehs, original, **kw):
    pipe = SimpleNamespace(unet=unet)
    with latent_reattention(pipe, original, **kw), torch.no_grad():
        return unet(x, t, ehs).sample


def test_matches_hand_computation(unet, inputs):
    x, t, ehs, original = inputs
    scales = {64: 0.3}
    got = run(unet, x, t, ehs, original, channels=scales, window=2)
    want, hits = reference(unet, x, t, ehs, original, scales, 2)
    assert hits == [64, 64, 64]   # up block 0: both resnets; up block 1: its first resnet
    assert got.shape == (2, 4, 8, 8)
    assert torch.allclose(got, want, atol=1e-5)
    plain = unet(x, t, ehs).sample.detach()
    assert not torch.allclose(got[1:], plain[1:], atol=1e-4)   # the filter changed the steered row
    assert torch.allclose(got[:1], plain[:1], atol=1e-5)       # the uncond row is untouched


def test_default_scales_are_freeu_stages(unet, inputs):
    pipe = SimpleNamespace(unet=unet)
    assert reattention_scales(pipe, 0.9, 0.2) == {128: 0.9, 64: 0.2}
    x, t, ehs, original = inputs
    got = run(unet, x, t, ehs, original)            # 64 channels match s2 = 0.2, window 1
    want, _ = reference(unet, x, t, ehs, original, {128: 0.9, 64: 0.2}, 1)
    assert torch.allclose(got, want, atol=1e-5)


def test_scale_one_or_identical_prompts_change_nothing(unet, inputs):
    x, t, ehs, original = inputs
    with torch.no_grad():
        plain = unet(x, t, ehs).sample
    assert torch.allclose(run(unet, x, t, ehs, original, channels={64: 1.0}), plain, atol=1e-5)
    assert torch.allclose(run(unet, x, t, ehs, ehs[1:], channels={64: 0.1}), plain, atol=1e-5)


def test_inputs_are_not_written(unet, inputs):
    x, t, ehs, original = inputs
    copies = [v.clone() for v in (x, ehs, original)]
    run(unet, x, t, ehs, original, channels={64: 0.3})
    assert all(torch.equal(a, b) for a, b in zip((x, ehs, original), copies))


def _clean(unet) -> bool:
    hooks = sum(len(m._forward_pre_hooks) for m in unet.modules())
    return "forward" not in vars(unet) and hooks == 0


def test_no_matching_stage_fails_closed_and_restores(unet, inputs):
    x, t, ehs, original = inputs
    with pytest.raises(SafeT2IError, match="matched no decoder stage"):
        run(unet, x, t, ehs, original, channels={1280: 0.9})
    assert _clean(unet)


def test_odd_batch_and_bad_original_fail_closed_and_restore(unet, inputs):
    x, t, ehs, original = inputs
    with pytest.raises(SafeT2IError, match="classifier-free guidance"):
        run(unet, x[:1], t, ehs[:1], original, channels={64: 0.5})
    assert _clean(unet)
    with pytest.raises(SafeT2IError, match="do not fit"):
        run(unet, x, t, ehs, torch.zeros(1, 5, 16), channels={64: 0.5})
    assert _clean(unet)


def test_error_inside_the_block_restores(unet, inputs):
    x, t, ehs, original = inputs
    pipe = SimpleNamespace(unet=unet)
    with pytest.raises(RuntimeError, match="boom"):
        with latent_reattention(pipe, original, channels={64: 0.5}):
            assert "forward" in vars(unet)
            raise RuntimeError("boom")
    assert _clean(unet)


def test_refuses_bad_settings_and_a_patched_unet(unet, inputs):
    x, t, ehs, original = inputs
    pipe = SimpleNamespace(unet=unet)
    for kw in ({"window": 0}, {"channels": {64: 1.5}}, {"channels": {}}):
        with pytest.raises(SafeT2IError):
            with latent_reattention(pipe, original, **kw):
                pass
    with latent_reattention(pipe, original, channels={64: 0.5}):
        with pytest.raises(SafeT2IError, match="already patched"):
            with latent_reattention(pipe, original, channels={64: 0.5}):
                pass
    assert _clean(unet)
