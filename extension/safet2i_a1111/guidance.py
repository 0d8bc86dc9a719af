"""Safety guidance inside A1111's CFG denoiser (batched rows; ``docs/a1111.md``, "Guidance").

``on_cfg_denoiser`` receives the batched model input: the cond rows of every image first,
then one uncond row per image. We insert one safety-concept row per image *between* them
(uncond stays last, so the webui's own combine and uncond skipping are unaffected), i.e. one
UNet batch of R + 2B rows instead of R + B. ``on_cfg_denoised`` then reads the three
predictions per image, asks the core method for the guided direction d_p (ε space; x0
outputs of k-diffusion samplers are converted by ``safet2i.guidance.spaces``) and rewrites each image's cond row
*in place* so that the webui's ``uncond + s·(cond − uncond)`` yields ``ε_u + s·d_p``, exactly
as in the ComfyUI and diffusers hosts.

Every failure is recorded on the job (``state.error``); the output filter then blocks the
image instead of letting an unguided image through (A1111 swallows callback exceptions).
"""

from __future__ import annotations

import copy
import logging

import torch

from safet2i.guidance import DAGConfig, from_eps, to_eps
from safet2i.guidance import make_method as core_method

log = logging.getLogger("safet2i")


class GuidanceError(RuntimeError):
    pass


def make_method(name: str, preset: str):
    method = core_method(name, preset)
    if method.needs.attention:
        raise GuidanceError(f"{name} guidance is not available in the web UI yet (needs cross-attention capture)")
    return method


def _rows(value, n: int):
    """First ``n`` rows of a tensor or of every tensor in an SDXL cond dict."""
    if isinstance(value, dict):
        return {k: v[:n] for k, v in value.items()}
    return value[:n]


def fit_tokens(concept: torch.Tensor, tokens: int) -> torch.Tensor:
    """Concept embedding [T, D] padded (repeating its last row, as padding tokens are) or cut to ``tokens``."""
    if concept.shape[0] >= tokens:
        return concept[:tokens]
    pad = concept[-1:].expand(tokens - concept.shape[0], -1)
    return torch.cat([concept, pad])


def _same_kind(template: dict, items: dict) -> dict:
    """A dict of the webui's own class (SDXL conds are ``prompt_parser.DictWithShape``, whose
    ``shape`` the denoiser reads after the callback); a plain dict would break it."""
    if type(template) is dict:
        return items
    try:
        return type(template)(items)
    except TypeError:                     # A1111 1.7: DictWithShape(x, shape) needs the shape
        new = copy.copy(template)
        new.clear()
        new.update(items)
        return new


def insert_safety_rows(x, sigma, image_cond, text_cond, concept, batch: int):
    """New (x, sigma, image_cond, text_cond) with ``batch`` safety rows before the uncond rows.

    ``concept``: tensor [T, D] or SDXL dict {'crossattn': [T, D], 'vector': [V]}. Inputs are
    never modified (the webui caches conds across jobs).
    """
    r = x.shape[0] - batch
    if r < batch:
        raise GuidanceError(f"unexpected denoiser batch: {x.shape[0]} rows for {batch} images")

    def ins(t):
        if t is None:
            return None
        return torch.cat([t[:r], t[r:], t[r:]]) if t.shape[0] == x.shape[0] else t

    # Safety rows are copies of the per-image uncond inputs (same latent, σ, image cond).
    x2 = torch.cat([x[:r], x[r:], x[r:]])
    s2 = torch.cat([sigma[:r], sigma[r:], sigma[r:]])
    ic2 = ins(image_cond)
    if isinstance(text_cond, dict):
        out = {}
        for k, v in text_cond.items():
            c = concept[k].to(v.device, v.dtype)
            if v.dim() == 3:
                c = fit_tokens(c, v.shape[1])
            out[k] = torch.cat([v, c.unsqueeze(0).expand(batch, *c.shape)])
        return x2, s2, ic2, _same_kind(text_cond, out)
    c = fit_tokens(concept.to(text_cond.device, text_cond.dtype), text_cond.shape[1])
    return x2, s2, ic2, torch.cat([text_cond, c.unsqueeze(0).expand(batch, *c.shape)])


class GuidanceHook:
    """State of one job's guidance across its sampling steps."""

    def __init__(self, method, concept, eps_prediction: bool):
        self.method = method
        self.concept = concept
        self.eps_prediction = eps_prediction     # DDIM/PLMS/UniPC: outputs are ε, "sigma" is t
        self.x = self.sigma = None
        self.batch = 0
        self.error: str | None = None
        self.steps_guided = 0
        self.total_hint = None      # model calls of the pass, when the host knows (A1111 1.7: from p.sampler)

    # -- on_cfg_denoiser ---------------------------------------------------
    def before(self, params) -> None:
        if self.error:
            return
        try:
            tu, tc = params.text_uncond, params.text_cond
            b = (tu["crossattn"] if isinstance(tu, dict) else tu).shape[0]
            rows = (tc["crossattn"] if isinstance(tc, dict) else tc).shape[0]
            if rows != b:
                raise GuidanceError("AND / composable prompts are not supported with SafeT2I guidance yet "
                                    f"({rows} cond rows for {b} images)")
            # The core decides when a run starts (hires pass, next batch: another denoiser or the
            # step going back; second-order samplers repeat a step within one run).
            denoiser = getattr(params, "denoiser", None)
            calls = getattr(denoiser, "total_steps", None) or self.total_hint or params.total_sampling_steps
            self.method.set_state(params.sampling_step, calls, run=(id(denoiser) if denoiser is not None else None,
                                                                   params.total_sampling_steps))
            x, s, ic, tc = insert_safety_rows(params.x, params.sigma, params.image_cond, params.text_cond,
                                              self.concept, b)
            self.x, self.sigma, self.batch = x, s, b
            params.x, params.sigma, params.image_cond, params.text_cond = x, s, ic, tc
        except Exception as exc:  # noqa: BLE001 - recorded, then the image is blocked
            self.fail(exc)

    # -- on_cfg_denoised ---------------------------------------------------
    def after(self, params) -> None:
        if self.error or self.x is None:
            return
        try:
            out, b = params.x, self.batch
            if out.shape[0] != self.x.shape[0]:
                raise GuidanceError(f"the denoiser returned {out.shape[0]} rows, expected {self.x.shape[0]} "
                                    "(another extension changed the batch, or uncond skipping is on)")
            r = out.shape[0] - 2 * b
            if r != b:
                raise GuidanceError("AND / composable prompts are not supported with SafeT2I guidance yet "
                                    f"({r} cond rows for {b} images)")
            xin, sig = self.x, self.sigma
            space = "eps" if self.eps_prediction else "denoised"   # DDIM/PLMS/UniPC: ε, "sigma" is t
            ec = to_eps(out[:r], xin[:r], sig[:r], space)
            es = to_eps(out[r:r + b], xin[r:r + b], sig[r:r + b], space)
            eu = to_eps(out[r + b:], xin[r + b:], sig[r + b:], space)
            new_cond = from_eps(eu + self.method.direction(eu, ec, es), xin[:r], sig[:r], space)
            out[:r] = new_cond.to(out.dtype)        # in place: the webui keeps its own reference
            self.steps_guided += 1
        except Exception as exc:  # noqa: BLE001
            self.fail(exc)
        finally:
            self.x = self.sigma = None

    def fail(self, exc: Exception) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        log.error("SafeT2I guidance failed; the image will be blocked: %s", self.error, exc_info=exc)


_fit_tokens = fit_tokens   # former name

__all__ = ["DAGConfig", "GuidanceError", "GuidanceHook", "fit_tokens", "insert_safety_rows", "make_method"]
