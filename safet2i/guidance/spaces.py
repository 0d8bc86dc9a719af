"""Conversions between a host's prediction space and ε (noise), where the guidance
thresholds are defined. Every host converts here (ComfyUI nodes, A1111/Forge/reForge, the
diffusers adapter); none has its own copy.

* ``denoised`` (x0 estimates D): ComfyUI, Forge/reForge, and A1111's k-diffusion samplers,
  with the k-diffusion parametrisation x = x0 + σ·ε for eps- and v-prediction models alike
  (SD1.x, SD2.x, SDXL; the host has already turned v into D)::

      ε = (x − D) / σ        D = x − σ · ε

* ``eps``: A1111's timestep samplers (DDIM, PLMS, UniPC) and eps-prediction diffusers UNets:
  nothing to convert.
* ``v`` (diffusers v-prediction UNets, e.g. SD 2.x 768): with the model's input x_t in DDPM
  scale and σ = √((1 − ᾱ)/ᾱ) (so √ᾱ = 1/√(1 + σ²))::

      ε = (v + σ · x_t) / √(1 + σ²)        v = √(1 + σ²) · ε − σ · x_t

  Both maps are affine in the prediction with the same slope for every row of an image, so
  CFG in v space equals CFG in ε space mapped back.

Rectified-flow models (x = (1 − σ)·x0 + σ·ε) are not supported by these helpers.
"""

from __future__ import annotations

import torch

SPACES = ("eps", "denoised", "v")


def _sigma(sigma, like: torch.Tensor) -> torch.Tensor:
    """σ as a scalar or per batch element ([B] → [B, 1, 1, 1]) in ``like``'s dtype/device."""
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


def shift_denoised(denoised: torch.Tensor, eps_change: torch.Tensor, sigma) -> torch.Tensor:
    """The denoised prediction after its ε changed by ``eps_change``: D − σ·Δε."""
    return denoised - _sigma(sigma, denoised) * eps_change.to(denoised.dtype)


def v_to_eps(x_t: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """ε = (v + σ·x_t) / √(1 + σ²) for a v-prediction model's input x_t (DDPM scale)."""
    s = _sigma(sigma, x_t)
    return (v + s * x_t) / torch.sqrt(1.0 + s * s)


def eps_to_v(x_t: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """v = √(1 + σ²)·ε − σ·x_t."""
    s = _sigma(sigma, x_t)
    return torch.sqrt(1.0 + s * s) * eps - s * x_t


def to_eps(pred: torch.Tensor, x: torch.Tensor, sigma, space: str) -> torch.Tensor:
    """A host's prediction ``pred`` (in ``space``: eps, denoised or v) as ε."""
    if space == "eps":
        return pred
    if space == "denoised":
        return denoised_to_eps(x, pred, sigma)
    if space == "v":
        return v_to_eps(x, pred, sigma)
    raise ValueError(f"unknown prediction space {space!r} (one of {SPACES})")


def from_eps(eps: torch.Tensor, x: torch.Tensor, sigma, space: str) -> torch.Tensor:
    """ε back into the host's ``space`` (inverse of :func:`to_eps`)."""
    if space == "eps":
        return eps
    if space == "denoised":
        return eps_to_denoised(x, eps, sigma)
    if space == "v":
        return eps_to_v(x, eps, sigma)
    raise ValueError(f"unknown prediction space {space!r} (one of {SPACES})")
