"""Detect-and-Guide-style region guidance from cross-attention.

After Li, Zhang, Sun, Yang, "Detect-and-Guide: Self-regulation of Diffusion Models for Safe
Text-to-Image Generation via Guideline Token Optimization", CVPR 2025 (arXiv 2503.15197).
Stage 2 (detection + adaptive guidance) as described in the paper (summary: the methods table of ``docs/guidance.md``);
labelled *-style* because the official code was not available to check every constant.

Given the unsafe-concept branch's cross-attention map Â (normalised to [0, 1] per image)::

    highlighted  H = Â ≥ 0.5        editing region  M = Â ≥ 0.01
    detection:   guide an image only if H is non-empty, and skip the step if M covers
                 more than 80 % of the map (early, diffuse maps)
    AreaScaler:  S_area = s_c · Area(O_i) on each connected component O_i of H
                 (8-connectivity, s_c = 5 / (h·w): a full-map object gets 5), and
                 S_edit = 1 on the rest of M   (our reading of "max(Σ s_c·Area_i·1[O_i], S_edit)")
    Magnitude:   T(Â) = min(Â / 0.01, 5)
    guidance:    d_p ← d_p − s_s · (S_area ⊙ T ⊙ M [⊙ μ_SLD]) ⊙ (ε_c − ε_∅)

with maps upsampled (bilinear) to the latent size, and μ_SLD optionally SLD's elementwise
gate ("DAG + SLD"). ``scale`` (s_s) defaults to 0.2, so the largest factor S_area·T = 25
becomes 5 at the centre of a large, confident region and ≈ 0.2 at faint edges; the paper's
value was not available. Optimised guideline-token embeddings (Stage 1) can be loaded by the
hosts; without them the raw concept tokens' attention is used (weaker detection).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .contract import Guidance, Needs, RunState
from .sld import SLDConfig, sld_gate


@dataclass(frozen=True)
class DAGConfig:
    scale: float = 0.2
    high: float = 0.5
    low: float = 0.01
    area_max: float = 5.0
    magnitude_max: float = 5.0
    skip_coverage: float = 0.8
    sld_gate: SLDConfig | None = None  # e.g. SLD_PRESETS["STRONG"] for "DAG + SLD"


def _components(mask: np.ndarray) -> tuple[int, np.ndarray]:
    import cv2  # noqa: PLC0415 - opencv is already a dependency of the filter layer

    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return n - 1, labels


def region_scales(attn: torch.Tensor, config: DAGConfig) -> tuple[torch.Tensor, list[dict]]:
    """``attn`` [B, h, w] in [0, 1] -> scale map S_area · T · M [B, h, w] and per-image info."""
    a = attn.detach().float().cpu().numpy()
    b, h, w = a.shape
    s_c = config.area_max / (h * w)
    out = np.zeros_like(a, dtype=np.float32)
    info = []
    for i in range(b):
        edit = a[i] >= config.low
        high = a[i] >= config.high
        coverage = float(edit.mean())
        n, labels = _components(high)
        entry = {"detected": bool(n), "objects": int(n), "coverage": round(coverage, 4), "skipped": False}
        if not n:
            info.append(entry)
            continue
        if coverage > config.skip_coverage:
            entry["skipped"] = True
            info.append(entry)
            continue
        area = np.bincount(labels.ravel(), minlength=n + 1).astype(np.float32) * s_c
        area[0] = 0.0
        s_area = np.where(edit, np.maximum(area[labels], 1.0), 0.0)
        magnitude = np.minimum(a[i] / config.low, config.magnitude_max)
        out[i] = s_area * magnitude * edit
        info.append(entry)
    return torch.from_numpy(out).to(attn.device), info


def to_latent(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, h, w] -> [B, 1, H, W] bilinear."""
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)


def token_attention(q: torch.Tensor, k: torch.Tensor, heads: int, tokens: list[int],
                    scale: float | None = None) -> torch.Tensor:
    """Cross-attention probabilities on ``tokens``, averaged over heads and tokens.

    ``q`` [b, n, heads·dh] (projected image queries), ``k`` [b, T, heads·dh] (projected
    text keys) -> [b, n]: softmax(q·kᵀ·scale) over all T tokens, as the layer computes it.
    """
    b, n, inner = q.shape
    dh = inner // heads
    qh = q.reshape(b, n, heads, dh).transpose(1, 2).float()
    kh = k.reshape(b, k.shape[1], heads, dh).transpose(1, 2).float()
    probs = torch.softmax(qh @ kh.transpose(-1, -2) * (dh ** -0.5 if scale is None else scale), dim=-1)
    idx = [t for t in tokens if t < probs.shape[-1]]
    return probs[..., idx].mean(dim=(1, 3))


def joint_token_attention(q: torch.Tensor, k: torch.Tensor, columns, queries: slice, scale: float | None = None,
                          mask: torch.Tensor | None = None, max_elements: int = 1 << 24) -> torch.Tensor:
    """The image-query × concept-token part of a joint (or cross) attention softmax.

    ``q`` [b, heads, S_q, dh] and ``k`` [b, heads, S_k, dh] are the query and key rows exactly as
    the layer attends with them (after q/k norms and RoPE); the softmax of q·kᵀ·scale runs over
    ALL ``S_k`` keys (text and image), as the layer computes it, and only the query rows
    ``queries`` (the image tokens) are kept. ``columns``: the concept tokens' key positions, a
    list of ints or a list of lists (copies of one token whose probabilities add up). ``mask``
    (optional): the layer's attention mask, boolean (True = attend) or additive, 4-d and
    broadcastable to [b, heads, S_q, S_k]. Returns [b, n] (n image queries): per token the probability summed over
    its copies, averaged over the tokens and the heads. Float32, in query chunks of at most
    ``max_elements`` logits (the layer's own softmax is never materialised in full).
    """
    b, heads, s_q, dh = q.shape
    cols = [c if isinstance(c, (list, tuple)) else [c] for c in columns]
    if not cols or any(not c for c in cols):
        raise ValueError("joint_token_attention needs at least one concept token column")
    width = max(len(c) for c in cols)
    if any(len(c) != width for c in cols):
        raise ValueError("every concept token needs the same number of copies")
    idx = torch.tensor(cols, device=q.device, dtype=torch.long)   # [tokens, copies]
    if int(idx.max()) >= k.shape[2] or int(idx.min()) < 0:
        raise ValueError(f"concept token columns {int(idx.min())}..{int(idx.max())} outside {k.shape[2]} keys")
    scale = dh ** -0.5 if scale is None else scale
    kf = k.float()
    if mask is not None and mask.ndim != 4:
        raise ValueError(f"the attention mask must be 4-d [b|1, heads|1, S_q|1, S_k], not {list(mask.shape)}")
    rows = range(s_q)[queries]
    step = max(1, max_elements // max(1, b * heads * k.shape[2]))
    out = []
    for lo in range(rows.start, rows.stop, step):
        hi = min(rows.stop, lo + step)
        logits = (q[:, :, lo:hi].float() @ kf.transpose(-1, -2)) * scale
        if mask is not None:
            m = mask[..., lo:hi, :] if mask.shape[-2] > 1 else mask
            logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.to(logits)
        probs = torch.softmax(logits, dim=-1)[..., idx.flatten()]          # [b, heads, n, tokens·copies]
        probs = probs.unflatten(-1, tuple(idx.shape)).sum(-1)              # copies add up
        out.append(probs.mean(dim=(1, 3)))
    return torch.cat(out, dim=1)


def aggregate_joint(maps: list[torch.Tensor], grid: tuple[int, ...]) -> torch.Tensor:
    """Per-layer maps of a transformer ([B, N] each, N = prod(grid) image tokens in raster
    order) -> [B, *grid]: the mean over the layers (all at the token grid), normalised per image
    (a video: over all its frames) to max 1. ``grid`` is (h, w) or (frames, h, w)."""
    if not maps:
        raise ValueError("no attention maps to aggregate")
    avg = torch.stack([m.float() for m in maps]).mean(0)
    n = math.prod(grid)
    if avg.shape[1] != n:
        raise ValueError(f"attention maps of {avg.shape[1]} image tokens do not fill a grid of {grid}")
    avg = avg.reshape(avg.shape[0], *grid)
    return avg / avg.flatten(1).max(1).values.clamp_min(1e-12).view(-1, *([1] * len(grid)))


def average_maps(maps: list[torch.Tensor], latent_hw: tuple[int, int], downscales: tuple[int, ...] = (2, 4)
                 ) -> torch.Tensor:
    """Per-layer maps ([B, HW_l] each) -> [B, H, W]: the layers at ``downscales`` of the latent
    size (every layer when none is), upsampled bilinearly to it and averaged."""
    H, W = latent_hw
    sized = []
    for m in maps:
        f = math.sqrt(H * W / m.shape[1])
        h, w = max(1, round(H / f)), max(1, round(W / f))
        if h * w != m.shape[1]:
            h, w = math.ceil(H / f), math.ceil(W / f)
        sized.append((round(f), m.reshape(m.shape[0], h, w)))
    chosen = [m for f, m in sized if f in tuple(downscales)] or [m for _, m in sized]
    return torch.stack([to_latent(m, (H, W))[:, 0] for m in chosen]).mean(0)


def aggregate_attention(maps: list[torch.Tensor], latent_hw: tuple[int, int]) -> torch.Tensor:
    """Average cross-attention maps of several layers ([B, HW_l] each, already averaged over
    heads and concept tokens) at the latent size; normalise each image to max 1.

    Layers at 1/2 and 1/4 of the latent resolution (16×16 and 32×32 for a 512 px SD image)
    are used when present, as in the paper; otherwise every layer given.
    """
    avg = average_maps(maps, latent_hw)
    return avg / avg.flatten(1).max(1).values.clamp_min(1e-12).view(-1, 1, 1)


def dag_direction(eps_uncond, eps_cond, eps_concept, attn: torch.Tensor | None, config: DAGConfig,
                  state: RunState) -> torch.Tensor:
    """The guided direction d_p of the module docstring for this step (advances ``state``);
    ``attn`` [B, h, w] is the concept's normalised attention map (None: not available)."""
    d_p = eps_cond - eps_uncond
    if attn is None:
        state.advance({"applied": False, "reason": "no attention map"}, torch.zeros_like(d_p[:, 0]))
        return d_p
    if d_p.ndim == 5:   # video latents [B, C, F, H, W] with maps [B, F, h, w]: every frame is an image
        b, c, f, h, w = d_p.shape
        if attn.ndim != 4 or tuple(attn.shape[:2]) != (b, f):
            raise ValueError(f"a video latent {list(d_p.shape)} needs attention maps [B, F, h, w] with B={b}, F={f}, "
                             f"not {list(attn.shape)}")

        def fold(t):
            return t.transpose(1, 2).reshape(b * f, c, h, w)

        out = dag_direction(fold(eps_uncond), fold(eps_cond), fold(eps_concept), attn.reshape(b * f, *attn.shape[2:]),
                            config, state)
        return out.reshape(b, f, c, h, w).transpose(1, 2)
    scales, info = region_scales(attn, config)
    factor = to_latent(scales, tuple(d_p.shape[-2:])).to(d_p)
    if config.sld_gate is not None:
        factor = factor * sld_gate(eps_cond, eps_concept, config.sld_gate)
    peak = factor.flatten(1).max(1).values.clamp_min(1e-12).view(-1, 1, 1, 1)
    state.advance({"applied": bool((factor > 0).any()), "images": info, "mask": float((factor > 0).float().mean())},
                  (factor / peak).mean(1))
    return d_p - config.scale * factor * (eps_concept - eps_uncond)


def guideline_context(context: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Stage 1 guideline-token embeddings ``rows`` [k, D] placed in a full conditioning
    ``context`` [1, T, D] (the concept text's encoding) at the token positions 1..k, after the
    start token; returns the new context and those positions. The rows must be read among the
    context's other keys (start, padding): on their own, the softmax over k keys averaged over
    the same k tokens is 1/k everywhere and locates nothing."""
    if context.ndim != 3 or context.shape[0] != 1:
        raise ValueError(f"the context must be [1, T, D], got {list(context.shape)}")
    if rows.ndim != 2 or rows.shape[1] != context.shape[2]:
        raise ValueError(f"guideline embeddings of width {rows.shape[-1]} do not fit a text width of {context.shape[2]}")
    k = int(rows.shape[0])
    if not 1 <= k <= context.shape[1] - 2:
        raise ValueError(f"{k} guideline embeddings do not fit a context of {context.shape[1]} positions")
    out = context.clone()
    out[0, 1:1 + k] = rows.to(out)
    return out, list(range(1, 1 + k))


class DAGGuidance(Guidance):
    """Detect-and-Guide-style guidance under the contract: ``direction`` also takes the
    concept's attention map (``needs.attention``)."""

    name = "Detect-and-Guide-style"
    needs = Needs(attention=True)

    def __init__(self, config: DAGConfig | None = None, **window):
        self.config = config or DAGConfig()
        super().__init__(**window)

    @property
    def inert(self) -> bool:
        return self.config.scale == 0

    def compute(self, eps_uncond, eps_cond, eps_concept, attention) -> torch.Tensor:
        return dag_direction(eps_uncond, eps_cond, eps_concept, attention, self.config, self.state)
