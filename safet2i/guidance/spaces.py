"""Conversions between a host's prediction space and ε (noise), where the guidance
thresholds are defined.

ComfyUI hands guidance functions *denoised* predictions D (x0 estimates) for every model
type; with its parametrisation x = x0 + σ·ε for eps- and v-prediction models alike (SD1.x,
SD2.x, SDXL), so

    ε = (x − D) / σ        D = x − σ · ε

v-prediction needs nothing extra here: ComfyUI has already turned v into D.
Rectified-flow models (x = (1 − σ)·x0 + σ·ε) are not supported by these helpers.
"""

from __future__ import annotations

import torch


def _sigma(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if s.ndim == 0:
        return s
    return s.reshape(s.shape[0], *([1] * (like.ndim - 1)))


def denoised_to_eps(x: torch.Tensor, denoised: torch.Tensor, sigma) -> torch.Tensor:
    """ε = (x − D) / σ, with σ per batch element (shape [B]) or a scalar."""
    return (x - denoised) / _sigma(sigma, x)


def eps_to_denoised(x: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """D = x − σ · ε."""
    return x - _sigma(sigma, x) * eps
