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

* ``flow_denoised`` (ComfyUI's CONST sampling: SD3, Flux, Qwen-Image, Wan, Z-Image,
  HunyuanVideo, and any model behind ModelSamplingSD3/Flux/AuraFlow): rectified flow,
  x = (1 − σ)·x0 + σ·ε, with the host's prediction D an x0 estimate::

      ε = (x − (1 − σ)·D) / σ        D = (x − σ·ε) / (1 − σ)

* ``flow_v`` (diffusers' flow-matching pipelines: SD3, Flux, Qwen-Image, Wan): the transformer
  predicts the velocity v = ε − x0 (x_{σ'} = x_σ + (σ' − σ)·v)::

      ε = x + (1 − σ)·v              v = (ε − x) / (1 − σ)

**Where guidance is computed.** Thresholds and gates (SLD's λ and s_S, SP-Guard's cosines,
Detect-and-Guide's masks) are defined on ε, so every host converts its predictions to ε with
:func:`to_eps`. The result goes back as a *correction* of the conditional prediction in the
host's own space (:func:`correct_prediction`): each map above is affine in the prediction with
one slope a(σ) = ∂ε/∂pred for all rows of an image (:func:`slope`), so a correction c of ε is
−c/a(σ) in the host's space, and the host's own CFG formula then gives exactly the guided ε
mapped back. Zero correction leaves the host's prediction bit for bit. On flow models
a(σ) = −(1 − σ)/σ (denoised) or 1 − σ (velocity) vanishes at σ = 1, the first step of a flow
schedule: there every ε equals x, so ε-differences, SLD's gate and SP-Guard's cosines are 0 and
a method's correction is 0 too (its limit as σ → 1; the momentum is 0 at a run's first step).
A nonzero correction at σ = 1 has no counterpart in the host's space and is refused.
"""

from __future__ import annotations

import torch

SPACES = ("eps", "denoised", "v", "flow_denoised", "flow_v")
#: Spaces of rectified-flow models (x = (1 − σ)·x0 + σ·ε).
FLOW_SPACES = ("flow_denoised", "flow_v")


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


def flow_denoised_to_eps(x: torch.Tensor, denoised: torch.Tensor, sigma) -> torch.Tensor:
    """ε = (x − (1 − σ)·D) / σ on a rectified-flow model (x = (1 − σ)·x0 + σ·ε)."""
    s = _sigma(sigma, x)
    return (x - (1.0 - s) * denoised) / s


def eps_to_flow_denoised(x: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """D = (x − σ·ε) / (1 − σ); undefined at σ = 1."""
    s = _sigma(sigma, x)
    return (x - s * eps) / (1.0 - s)


def flow_v_to_eps(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """ε = x + (1 − σ)·v for a flow model's velocity v = ε − x0."""
    return x + (1.0 - _sigma(sigma, x)) * v


def eps_to_flow_v(x: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """v = (ε − x) / (1 − σ); undefined at σ = 1."""
    return (eps - x) / (1.0 - _sigma(sigma, x))


def to_eps(pred: torch.Tensor, x: torch.Tensor, sigma, space: str) -> torch.Tensor:
    """A host's prediction ``pred`` (in ``space``, one of :data:`SPACES`) as ε."""
    if space == "eps":
        return pred
    if space == "denoised":
        return denoised_to_eps(x, pred, sigma)
    if space == "v":
        return v_to_eps(x, pred, sigma)
    if space == "flow_denoised":
        return flow_denoised_to_eps(x, pred, sigma)
    if space == "flow_v":
        return flow_v_to_eps(x, pred, sigma)
    raise ValueError(f"unknown prediction space {space!r} (one of {SPACES})")


def slope(sigma, space: str, like: torch.Tensor) -> torch.Tensor:
    """a(σ) = ∂ε/∂pred of :func:`to_eps` in ``space`` (the same for every element of an image)."""
    if space == "eps":
        return torch.ones((), dtype=like.dtype, device=like.device)
    s = _sigma(sigma, like)
    if space == "denoised":
        return -1.0 / s
    if space == "v":
        return 1.0 / torch.sqrt(1.0 + s * s)
    if space == "flow_denoised":
        return -(1.0 - s) / s
    if space == "flow_v":
        return 1.0 - s
    raise ValueError(f"unknown prediction space {space!r} (one of {SPACES})")


def eps_offset_free(pred: torch.Tensor, sigma, space: str) -> torch.Tensor:
    """a(σ)·pred: ε less its offset b(x, σ), the same for every prediction of an image. Methods
    depend on ε only through differences (:mod:`.contract`), so this is what flow hosts pass
    them: near σ = 1, x + (1 − σ)·v would lose the small (1 − σ)·v to float rounding."""
    return slope(sigma, space, pred) * pred


def correct_prediction(pred: torch.Tensor, correction: torch.Tensor, sigma, space: str) -> torch.Tensor:
    """The host's prediction ``pred`` after its ε changed by −``correction``: pred − c/a(σ).

    Rows where a(σ) = 0 (σ = 1 on flow models) keep ``pred`` when their correction is 0 and are
    refused otherwise (see the module docstring). ``pred`` is not modified."""
    from ..errors import SafeT2IError  # noqa: PLC0415

    c = correction.to(torch.float32 if pred.dtype in (torch.float16, torch.bfloat16) else pred.dtype)
    a = slope(sigma, space, c)
    a = a.reshape(-1, *([1] * (c.ndim - 1))).expand(c.shape[0], *([1] * (c.ndim - 1)))
    zero = a == 0
    if bool(zero.any()):
        bad = (c != 0).flatten(1).any(1) & zero.flatten()
        if bool(bad.any()):
            raise SafeT2IError(
                "SafeT2I guidance produced a correction at σ = 1 on a flow-matching model, where the noise prediction "
                "carries no information (every ε equals the latent) and no correction can be mapped back. "
                "This happens only when σ = 1 is not the first step of a run; the image is not produced.")
        a = torch.where(zero, torch.ones_like(a), a)
    return (pred - (c / a).to(pred.dtype)) if bool((c != 0).any()) else pred


def from_eps(eps: torch.Tensor, x: torch.Tensor, sigma, space: str) -> torch.Tensor:
    """ε back into the host's ``space`` (inverse of :func:`to_eps`)."""
    if space == "eps":
        return eps
    if space == "denoised":
        return eps_to_denoised(x, eps, sigma)
    if space == "v":
        return eps_to_v(x, eps, sigma)
    if space == "flow_denoised":
        return eps_to_flow_denoised(x, eps, sigma)
    if space == "flow_v":
        return eps_to_flow_v(x, eps, sigma)
    raise ValueError(f"unknown prediction space {space!r} (one of {SPACES})")
