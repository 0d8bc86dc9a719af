"""SAFREE's adaptive latent re-attention (LRA), paper version (Yoon et al., ICLR 2025, Eq. 7–8).

The UNet runs on [uncond, H_safe, H_orig]; at the decoder skip connections of the two
FreeU stages (backbone 1280 channels → s1, 640 → s2 for SD1.x), the steered branch's skip features are
filtered in the Fourier domain against the original branch's::

    F_s = shift(FFT2(h_safe)),  F_o = shift(FFT2(h_orig))
    inside a centred low-frequency window b:  F_s ← s · F_s  where |F_s| > |F_o|
    h_safe ← Re(IFFT2(unshift(F_s)))

i.e. low-frequency components that the steered prompt *amplifies* relative to the original
are damped, magnitude compared and phase kept. (The released code compares real parts and
replaces coefficients by s; its hooks are also never enabled. We implement the paper.)
Defaults from the official configuration: window half-size 1 (a 2×2 centre block), s1 = 0.9,
s2 = 0.2.
"""

from __future__ import annotations

import torch


def fourier_reattention(h_safe: torch.Tensor, h_orig: torch.Tensor, scale: float, window: int = 1) -> torch.Tensor:
    """Filtered copy of ``h_safe`` [B, C, H, W] (``h_orig`` is only the reference)."""
    dims = (-2, -1)
    fs = torch.fft.fftshift(torch.fft.fft2(h_safe.float(), dim=dims), dim=dims)
    fo = torch.fft.fftshift(torch.fft.fft2(h_orig.float(), dim=dims), dim=dims)
    h, w = h_safe.shape[-2:]
    cy, cx = h // 2, w // 2
    win = torch.zeros((h, w), dtype=torch.bool, device=h_safe.device)
    win[max(0, cy - window):cy + window, max(0, cx - window):cx + window] = True
    damp = win & (fs.abs() > fo.abs())
    fs = torch.where(damp, fs * scale, fs)
    out = torch.fft.ifft2(torch.fft.ifftshift(fs, dim=dims), dim=dims).real
    return out.to(h_safe.dtype)


def stage_scales(model_channels: int, s1: float = 0.9, s2: float = 0.2) -> dict[int, float]:
    """Backbone (hidden) channel count -> scale, as FreeU indexes its two decoder stages.

    The skip features filtered at a stage can have fewer channels (the last block of a stage
    receives the previous level's skip), as in FreeU.
    """
    return {model_channels * 4: s1, model_channels * 2: s2}
