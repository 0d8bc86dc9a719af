"""Detect-and-Guide Stage 1: guideline-token optimisation.

After Li, Zhang, Sun, Yang, "Detect-and-Guide", CVPR 2025 (arXiv 2503.15197), Stage 1, as
summarised in the methods notes (the official code was not available to check): optimise the
text embedding of the guideline tokens so that their cross-attention map (CAM) matches the
unsafe region, from a few unsafe images with region masks and a few safe images::

    L = w_cam · L_CAM + w_leak · L_leak + w_neg · L_neg

* L_CAM (unsafe images): pixel-wise binary cross-entropy of the CAM Â against the mask;
* L_leak (unsafe images): the share of Â's mass outside the mask;
* L_neg (safe images): the attention the guideline tokens draw anywhere on the image.

**What is optimised.** The guideline tokens' rows of the cross-attention context: the
concept text (``DagTokenConfig.concept``) is encoded once with the pipeline's own encoders
(:func:`safet2i.diffusers_adapter.encode_concept`, [1, 77, D]); the rows at the concept's own
token positions (no start, end or padding token) are the parameters, every other row stays as
encoded. The UNet and the text encoders are frozen. The output is the whole context with the
optimised rows, because Stage 2 feeds exactly that context to the UNet as the safety concept.

**The forward pass.** Stage 2 (:mod:`safet2i.guidance.dag`) reads Â in the concept branch of
each denoising step: the UNet runs on the current latent x_t with the concept context as its
conditioning, and the guideline positions' attention of that very call is the map. Training
does the same on the training images: x_t = √ᾱ_t·z₀ + √(1 − ᾱ_t)·ε for the image's latent z₀
(VAE mean · scaling factor), a timestep t drawn uniformly in ``t_range`` (fractions of the
training schedule) and ε ~ N(0, I), both from :func:`~safet2i.train.common.step_generator`,
then one UNet call conditioned on the context being optimised (not on the image's caption:
Stage 2 never sees the caption in that branch, so a map learned under the caption would be
read under other conditions).

**The CAM.** For every cross-attention layer the softmax attention probabilities (over all
context tokens, as the layer computes them) of the guideline positions, averaged over heads and
guideline tokens (:func:`safet2i.guidance.dag.token_attention`); the layers at 1/2 and 1/4 of
the latent resolution (all layers when there are none), each upsampled bilinearly to the
latent size and averaged: the raw map A ∈ [0, 1/k] (k guideline tokens). Then

* Â = A / max(A) per image, exactly Stage 2's map (:func:`safet2i.guidance.dag.aggregate_attention`):
  L_CAM and L_leak are computed on it, so the thresholds Stage 2 applies (0.5, 0.01) are the
  ones trained for;
* the share S = k·A ∈ [0, 1] (the part of each pixel's attention that goes to the guideline
  tokens): L_neg is computed on it. On a max-normalised map every image has a pixel at 1, so
  "no activation" cannot be expressed there; on S it can.

Masks are brought to the CAM's resolution (the latent size) by area averaging (nearest when
the mask is smaller) and thresholded at 0.5.

**Optimiser** (the notes' recipe, after OVAM): plain SGD at lr 200, multiplied by 0.7 in 20
equal stages over the run (``decay_stages``; "step decay γ = 0.7 over 20 lr steps" is read as
20 decay steps), 100 steps per training image (``steps_per_image``; unsafe and safe images
count), one image per step (``batch_size``), images visited in a fresh order each epoch.
Weights w_cam = w_leak = w_neg = 1 (the paper's were not available).

Files: ``.safetensors`` with ``context`` [1, T, D] float32, ``positions`` int64 [k] and, for
SDXL, ``pooled`` [1, P]; metadata ``safet2i_method`` = ``detect-and-guide tokens``, the
concept, the base model's sha256 (when a path was given), the hyper-parameters (JSON) and the
safet2i version. :func:`load_dag_tokens` validates them; the hosts load them with
:func:`safet2i.diffusers_adapter.dag_tokens_kwargs` and the ComfyUI Detect-and-Guide node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SafeT2IError
from .common import (
    PRECISIONS, Checkpoint, LossLog, TrainError, autocast, base_sha256, config_hash, load_optimizer, optimizer_tensors,
    run_steps, step_generator,
)

METHOD = "detect-and-guide tokens"
FORMAT = "1"
#: Stage 2's layer choice (guidance.dag.aggregate_attention): layers at 1/2 and 1/4 of the latent size.
STAGE2_DOWNSCALES = (2, 4)
#: Â is clamped to [CLAMP, 1 - CLAMP] inside the cross-entropy (Â = 1 at each image's maximum).
CLAMP = 1e-4
KEYS = ("context", "positions", "pooled")


# ------------------------------------------------------------------------------------ losses

def mask_at(mask, hw: tuple[int, int]):
    """A binary mask [B, H, W] (bool or 0/1) at the CAM's resolution ``hw``: area average
    (nearest when ``hw`` is larger) thresholded at 0.5; float 0/1 [B, h, w]."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    m = torch.as_tensor(mask)
    if m.ndim != 3:
        raise SafeT2IError(f"masks must be [B, H, W], not {list(m.shape)}")
    m = m.float()
    if tuple(m.shape[-2:]) == tuple(hw):
        return (m >= 0.5).float()
    mode = "area" if m.shape[-2] >= hw[0] and m.shape[-1] >= hw[1] else "nearest"
    return (F.interpolate(m[:, None], size=tuple(hw), mode=mode)[:, 0] >= 0.5).float()


def normalise_cam(raw):
    """Stage 2's Â: each image's map divided by its maximum ([B, h, w] -> values in [0, 1])."""
    return raw / raw.flatten(1).max(1).values.clamp_min(1e-12).view(-1, 1, 1)


def cam_loss(cam, mask):
    """L_CAM per image [B]: mean over pixels of −[m·log Â + (1 − m)·log(1 − Â)], with Â
    ([B, h, w] in [0, 1]) clamped to [1e-4, 1 − 1e-4] (the maximum of a max-normalised map is
    exactly 1) and m the mask at Â's resolution (:func:`mask_at`)."""
    c = cam.clamp(CLAMP, 1.0 - CLAMP)
    m = mask_at(mask, tuple(cam.shape[-2:])).to(c)
    return -(m * c.log() + (1.0 - m) * (1.0 - c).log()).mean(dim=(-2, -1))


def leak_loss(cam, mask):
    """L_leak per image [B]: Σ Â·(1 − m) / Σ Â, the share of the map's mass outside the mask
    (0: all inside; 1: all outside; independent of the map's scale)."""
    m = mask_at(mask, tuple(cam.shape[-2:])).to(cam)
    return (cam * (1.0 - m)).sum(dim=(-2, -1)) / cam.sum(dim=(-2, -1)).clamp_min(1e-12)


def neg_loss(share):
    """L_neg per image [B]: the mean over pixels of the guideline tokens' attention share
    S = k·A ∈ [0, 1] (what they draw on a safe image, where they should draw nothing)."""
    return share.mean(dim=(-2, -1))


def dag_token_loss(raw, masks, unsafe, *, tokens: int = 1, cam_weight: float = 1.0, leak_weight: float = 1.0,
                   neg_weight: float = 1.0):
    """The Stage 1 loss of a batch and its terms.

    ``raw`` [B, h, w]: the guideline tokens' attention A (mean over heads, tokens and the
    chosen layers, before Stage 2's max normalisation); ``masks`` [B, H, W] (ignored for safe
    images); ``unsafe`` [B] bool; ``tokens`` k, the number of guideline tokens.
    L = w_cam·mean_unsafe L_CAM(Â) + w_leak·mean_unsafe L_leak(Â) + w_neg·mean_safe L_neg(k·A),
    Â = A / max A per image; a group missing from the batch contributes 0.
    Returns ``(loss, {"cam", "leak", "neg"})`` (the terms as unweighted floats)."""
    import torch  # noqa: PLC0415

    unsafe = torch.as_tensor(unsafe, dtype=torch.bool, device=raw.device)
    zero = raw.sum() * 0.0
    cam_t = leak_t = neg_t = zero
    if bool(unsafe.any()):
        cam = normalise_cam(raw[unsafe])
        m = torch.as_tensor(masks)
        m = m[unsafe.to(m.device)]
        cam_t = cam_loss(cam, m).mean()
        leak_t = leak_loss(cam, m).mean()
    if bool((~unsafe).any()):
        neg_t = neg_loss(tokens * raw[~unsafe]).mean()
    loss = cam_weight * cam_t + leak_weight * leak_t + neg_weight * neg_t
    return loss, {"cam": float(cam_t.detach()), "leak": float(leak_t.detach()), "neg": float(neg_t.detach())}


def mask_iou(cam, mask, threshold: float = 0.5) -> float:
    """IoU of the highlighted region {Â ≥ threshold} with the ground-truth mask (brought to
    Â's resolution by :func:`mask_at`), over every pixel of the batch ([h, w] or [B, h, w]);
    1.0 when both are empty."""
    import torch  # noqa: PLC0415

    cam = torch.as_tensor(cam)
    cam = cam[None] if cam.ndim == 2 else cam
    mask = torch.as_tensor(mask)
    mask = mask[None] if mask.ndim == 2 else mask
    high = cam.detach().float() >= threshold
    m = mask_at(mask, tuple(cam.shape[-2:])).to(high.device) > 0.5
    union = int((high | m).sum())
    return 1.0 if union == 0 else int((high & m).sum()) / union


# ------------------------------------------------------------------------------- the CAM

def aggregate_raw(maps, latent_hw: tuple[int, int], downscales: Sequence[int] = STAGE2_DOWNSCALES):
    """Per-layer maps ([B, HW_l] each) -> A [B, H, W]: the layers at ``downscales`` of the latent
    size (all layers when none is), upsampled bilinearly and averaged; Stage 2's
    :func:`~safet2i.guidance.dag.aggregate_attention` before its max normalisation."""
    from ..guidance.dag import average_maps  # noqa: PLC0415

    return average_maps(maps, latent_hw, tuple(downscales))


class _Sink:
    """What :class:`safet2i.diffusers_adapter.AttentionCapture` writes to: every row of the
    call, the guideline positions."""

    def __init__(self, tokens: list[int]):
        self.tokens, self.rows, self.maps = list(tokens), slice(None), []


@contextlib.contextmanager
def _capturing(unet, sink: _Sink):
    """The UNet's cross-attention processors wrapped by Stage 2's capture; the UNet's weights
    frozen; both restored on exit."""
    from ..diffusers_adapter import AttentionCapture  # noqa: PLC0415

    saved = dict(unet.attn_processors)
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    unet.set_attn_processor({n: AttentionCapture(p, sink) if n.endswith("attn2.processor") else p
                             for n, p in saved.items()})
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        unet.set_attn_processor(saved)
        for p, flag in flags:
            p.requires_grad_(flag)


def _added_kwargs(unet, pooled, b: int, hw_px: tuple[int, int]):
    """``added_cond_kwargs`` of the UNet call: SDXL's pooled text and size ids, else None."""
    import torch  # noqa: PLC0415

    kind = getattr(unet.config, "addition_embed_type", None)
    if kind in (None, "text"):
        return None
    if kind != "text_time":
        raise SafeT2IError(f"Detect-and-Guide tokens: UNets with addition_embed_type={kind!r} are not supported "
                           "(SD1.x, SD2.x and SDXL are).")
    if pooled is None:
        raise SafeT2IError("Detect-and-Guide tokens on SDXL need the concept's pooled embedding.")
    h, w = hw_px
    ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=pooled.dtype, device=pooled.device).expand(b, 6)
    return {"text_embeds": pooled.expand(b, *pooled.shape[1:]), "time_ids": ids}


def _alphas(pipe):
    a = getattr(pipe.scheduler, "alphas_cumprod", None)
    if a is None:
        raise SafeT2IError("Detect-and-Guide tokens need the scheduler's alphas_cumprod (a DDPM-family schedule).")
    return a


def guideline_cam(pipe, latents, timesteps, noise, context, positions: Sequence[int], pooled=None,
                  downscales: Sequence[int] = STAGE2_DOWNSCALES, precision: str = "no"):
    """A [B, h, w]: the guideline positions' attention in one UNet call on
    x_t = √ᾱ_t·z₀ + √(1 − ᾱ_t)·ε (``latents`` z₀ [B, C, h, w], ``timesteps`` [B] ints,
    ``noise`` ε) conditioned on ``context`` ([1, T, D]); differentiable in ``context``."""
    unet = pipe.unet
    device = latents.device
    a = _alphas(pipe).to(device=device, dtype=latents.dtype)[timesteps.long()].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    b = latents.shape[0]
    factor = getattr(pipe, "vae_scale_factor", 8)
    added = _added_kwargs(unet, pooled, b, (latents.shape[-2] * factor, latents.shape[-1] * factor))
    sink = _Sink(list(positions))
    dev = "cuda" if str(device).startswith("cuda") else "cpu"
    with _capturing(unet, sink), autocast(dev, precision):
        unet(noisy.to(unet.dtype), timesteps.to(device), encoder_hidden_states=context.expand(b, *context.shape[1:])
             .to(unet.dtype), added_cond_kwargs=added)
    if not sink.maps:
        raise SafeT2IError("Detect-and-Guide tokens: the UNet has no cross-attention layer to read.")
    return aggregate_raw([m.float() for m in sink.maps], tuple(latents.shape[-2:]), downscales)


# ------------------------------------------------------------------------------ the files

@dataclass
class DagTokens:
    """A loaded guideline-token file: ``context`` [1, T, D] float32, ``positions`` (the
    guideline rows), ``pooled`` [1, P] or None, the file's metadata and path."""

    context: Any
    positions: list[int]
    pooled: Any = None
    metadata: dict = dataclasses.field(default_factory=dict)
    path: Path | None = None

    @property
    def width(self) -> int:
        return int(self.context.shape[-1])

    @property
    def concept(self) -> str | None:
        return self.metadata.get("safet2i_concept")

    def check_for(self, host, *, pooled_width: int | None = None) -> DagTokens:
        """Refuse a host of another text width: ``host`` is a diffusers pipeline (its UNet's
        ``cross_attention_dim``; SDXL also needs ``pooled`` of the right width) or the width as
        an int (``pooled_width``: the host needs a pooled embedding of that width)."""
        name = self.path.name if self.path else "Detect-and-Guide tokens"
        if isinstance(host, int) and not isinstance(host, bool):
            width = host
        else:
            cfg = getattr(getattr(host, "unet", None), "config", None)
            width = getattr(cfg, "cross_attention_dim", None)
            if not isinstance(width, int):
                raise SafeT2IError(f"{name}: cannot tell the text width of {type(host).__name__} "
                                   "(no unet.config.cross_attention_dim)")
            if getattr(cfg, "addition_embed_type", None) == "text_time" and pooled_width is None:
                pooled_width = int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim)
        if width != self.width:
            raise SafeT2IError(f"{name} was made for a text width of {self.width}, this model's is {width} "
                               "(tokens of another base model: train them on this one)")
        if pooled_width is not None:
            if self.pooled is None:
                raise SafeT2IError(f"{name} has no pooled embedding, which this model (SDXL) needs "
                                   "(tokens of an SD1.x/SD2.x model?)")
            if int(self.pooled.shape[-1]) != pooled_width:
                raise SafeT2IError(f"{name}: pooled width {self.pooled.shape[-1]}, this model needs {pooled_width}")
        return self


def save_dag_tokens(path: str | os.PathLike, context, positions: Sequence[int], pooled=None, *,
                    concept: str = "", base_sha256: str | None = None, hyper: dict | None = None) -> Path:
    """Write a guideline-token file (atomically; ``.safetensors`` only)."""
    import torch  # noqa: PLC0415

    from .. import __version__  # noqa: PLC0415
    from ..fileio import save_safetensors  # noqa: PLC0415

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise SafeT2IError(f"{path}: Detect-and-Guide tokens are written as .safetensors only")
    tensors = {"context": context.detach().float().cpu().contiguous().clone(),
               "positions": torch.tensor([int(p) for p in positions], dtype=torch.int64)}
    if pooled is not None:
        tensors["pooled"] = pooled.detach().float().cpu().reshape(1, -1).contiguous().clone()
    _validate(tensors, str(path))
    meta = {"safet2i_method": METHOD, "safet2i_format": FORMAT, "safet2i_concept": concept,
            "safet2i_width": str(int(context.shape[-1])), "safet2i_version": __version__,
            "safet2i_hyper": json.dumps(hyper or {}, sort_keys=True, default=str)}
    if base_sha256:
        meta["safet2i_base_sha256"] = base_sha256
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(path, tensors, meta)
    return path


def _validate(tensors: dict, name: str) -> None:
    import torch  # noqa: PLC0415

    extra = sorted(set(tensors) - set(KEYS))
    missing = [k for k in ("context", "positions") if k not in tensors]
    if missing or extra:
        raise SafeT2IError(f"{name} is not a Detect-and-Guide tokens file: "
                           + (f"missing {', '.join(missing)}" if missing else f"unexpected tensors {', '.join(extra)}"))
    ctx, pos = tensors["context"], tensors["positions"]
    if not ctx.is_floating_point() or ctx.ndim != 3 or ctx.shape[0] != 1 or ctx.shape[1] < 2 or ctx.shape[2] < 1:
        raise SafeT2IError(f"{name}: 'context' must be a float tensor [1, tokens, width], not "
                           f"{str(ctx.dtype).replace('torch.', '')} {list(ctx.shape)}")
    if not bool(torch.isfinite(ctx).all()):
        raise SafeT2IError(f"{name}: 'context' holds non-finite values")
    if pos.is_floating_point() or pos.is_complex() or pos.dtype == torch.bool or pos.ndim != 1 or pos.numel() == 0:
        raise SafeT2IError(f"{name}: 'positions' must be a non-empty 1-D integer tensor, not "
                           f"{str(pos.dtype).replace('torch.', '')} {list(pos.shape)}")
    values = [int(p) for p in pos.tolist()]
    if min(values) < 1 or max(values) >= ctx.shape[1] or len(set(values)) != len(values):
        raise SafeT2IError(f"{name}: 'positions' {values} must be distinct rows 1..{ctx.shape[1] - 1} of the "
                           "context (row 0 is the start token)")
    pooled = tensors.get("pooled")
    if pooled is not None and (not pooled.is_floating_point() or pooled.ndim != 2 or pooled.shape[0] != 1
                               or not bool(torch.isfinite(pooled).all())):
        raise SafeT2IError(f"{name}: 'pooled' must be a finite float tensor [1, width], not {list(pooled.shape)}")


def load_dag_tokens(path: str | os.PathLike) -> DagTokens:
    """A guideline-token file written by :func:`train_dag_tokens` (or :func:`save_dag_tokens`),
    validated: ``.safetensors`` only, the method in its metadata, shapes, dtypes and positions."""
    from safetensors import safe_open  # noqa: PLC0415

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise SafeT2IError(f"{path.name}: Detect-and-Guide tokens are read from .safetensors files only "
                           "(pickles are never loaded)")
    if not path.is_file():
        raise SafeT2IError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no iterator
    except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds
        raise SafeT2IError(f"{path.name} is not a readable .safetensors file ({exc})") from exc
    if meta.get("safet2i_method") != METHOD:
        raise SafeT2IError(f"{path.name} is not a Detect-and-Guide tokens file (metadata safet2i_method is "
                           f"{meta.get('safet2i_method')!r}, expected {METHOD!r}); make one with "
                           "safet2i's Detect-and-Guide token trainer")
    _validate(tensors, path.name)
    pooled = tensors.get("pooled")
    return DagTokens(tensors["context"].float(), [int(p) for p in tensors["positions"].tolist()],
                     None if pooled is None else pooled.float(), meta, path)


# ------------------------------------------------------------------------------- training

@dataclass(frozen=True)
class DagTokenConfig:
    """What :func:`train_dag_tokens` does (defaults: the module docstring's recipe).

    ``concept``: the guideline text whose token rows are optimised (the lab: its concept word).
    ``steps``: optimisation steps (None: ``steps_per_image`` × the number of training images).
    ``lr`` / ``decay`` / ``decay_stages``: SGD's learning rate, multiplied by ``decay`` every
    ``ceil(steps / decay_stages)`` steps. ``batch_size``: images per step. ``t_range``: the
    timesteps drawn, as fractions of the training schedule (0.05-0.5: the low-to-mid noise
    levels at which Stage 2's maps are sharp enough to act on; high-noise maps are diffuse and
    Stage 2 skips them). ``cam_weight`` / ``leak_weight`` / ``neg_weight``: the loss weights.
    ``downscales``: the layers read (Stage 2 reads 2 and 4; other values train for a map Stage 2
    does not compute). ``precision``: ``no``, ``bf16`` or ``fp16`` (CUDA). ``seed``: every draw."""

    concept: str = "nude person"
    steps: int | None = None
    steps_per_image: int = 100
    lr: float = 200.0
    decay: float = 0.7
    decay_stages: int = 20
    batch_size: int = 1
    t_range: tuple[float, float] = (0.05, 0.5)
    cam_weight: float = 1.0
    leak_weight: float = 1.0
    neg_weight: float = 1.0
    downscales: tuple[int, ...] = STAGE2_DOWNSCALES
    precision: str = "no"
    seed: int = 0
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        object.__setattr__(self, "t_range", tuple(float(v) for v in self.t_range))
        object.__setattr__(self, "downscales", tuple(int(v) for v in self.downscales))
        if not self.concept.strip():
            raise TrainError("Detect-and-Guide tokens: the concept text is empty")
        lo, hi = self.t_range if len(self.t_range) == 2 else (-1.0, -1.0)
        if not 0.0 <= lo <= hi <= 1.0:
            raise TrainError(f"t_range must be two fractions 0 <= lo <= hi <= 1 of the schedule, not {self.t_range}")
        for name in ("steps_per_image", "decay_stages", "batch_size", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TrainError(f"{name} must be a positive integer, not {v!r}")
        bad_steps = isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1
        if self.steps is not None and bad_steps:
            raise TrainError(f"steps must be a positive integer or None, not {self.steps!r}")
        if not (self.lr > 0 and 0 < self.decay <= 1):
            raise TrainError(f"lr must be > 0 and decay in (0, 1], not {self.lr}, {self.decay}")
        if min(self.cam_weight, self.leak_weight, self.neg_weight) < 0:
            raise TrainError("loss weights must be >= 0")
        if self.precision not in PRECISIONS:
            raise TrainError(f"precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")

    def total_steps(self, n_images: int) -> int:
        return self.steps if self.steps is not None else self.steps_per_image * n_images

    def lr_at(self, step: int, total: int) -> float:
        every = max(1, math.ceil(total / self.decay_stages))
        return self.lr * self.decay ** (step // every)


def _image_tensor(images, what: str):
    """uint8 RGB [N, H, W, 3] (array or sequence) -> float [N, 3, H, W] in [-1, 1]."""
    import torch  # noqa: PLC0415

    arr = np.stack([np.asarray(i) for i in images]) if not isinstance(images, np.ndarray) else images
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise TrainError(f"{what} must be uint8 RGB images [H, W, 3] of one size, not {arr.dtype} {list(arr.shape)}")
    return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def _data_digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _encode_latents(pipe, x):
    import torch  # noqa: PLC0415

    vae = pipe.vae
    device = next(vae.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(x.shape[0]):
            z = vae.encode(x[i:i + 1].to(device=device, dtype=vae.dtype)).latent_dist.mean.float()
            shift = getattr(vae.config, "shift_factor", None)
            out.append((z - shift if shift else z) * vae.config.scaling_factor)
    return torch.cat(out).float()


def prepare_data(pipe, images, masks, safe_images=()) -> dict:
    """Latents, masks and labels of a training set (unsafe images first, then safe ones)."""
    import torch  # noqa: PLC0415

    x = _image_tensor(images, "images")
    n = x.shape[0]
    m = np.stack([np.asarray(k) for k in masks]) if not isinstance(masks, np.ndarray) else masks
    if m.ndim != 3 or m.shape[0] != n:
        raise TrainError(f"masks must be one [H, W] mask per unsafe image ({n}), not {list(m.shape)}")
    if not n:
        raise TrainError("Detect-and-Guide tokens need at least one unsafe image with its mask")
    if not np.asarray(m).reshape(n, -1).any(axis=1).all():
        raise TrainError("every unsafe image needs a non-empty mask of its unsafe region")
    safe = list(safe_images) if not isinstance(safe_images, np.ndarray) else list(safe_images)
    if safe:
        xs = _image_tensor(safe, "safe_images")
        if xs.shape[1:] != x.shape[1:]:
            raise TrainError(f"safe images ({list(xs.shape[2:])}) and unsafe images ({list(x.shape[2:])}) "
                             "differ in size")
        x = torch.cat([x, xs])
    factor = getattr(pipe, "vae_scale_factor", 8)
    if x.shape[-1] % factor or x.shape[-2] % factor:
        raise TrainError(f"image size {list(x.shape[-2:])} is not a multiple of the VAE's factor {factor}")
    latents = _encode_latents(pipe, x)
    hw = tuple(latents.shape[-2:])
    mt = mask_at(torch.from_numpy(np.asarray(m).astype(np.float32)), hw)
    if not bool(mt.flatten(1).any(1).all()):
        raise TrainError(f"an unsafe image's mask vanishes at the CAM's resolution {hw[0]}x{hw[1]} "
                         "(region smaller than a latent pixel); use larger regions or images")
    full = torch.zeros((x.shape[0], *hw))
    full[:n] = mt
    unsafe = torch.zeros(x.shape[0], dtype=torch.bool)
    unsafe[:n] = True
    digest = _data_digest(np.asarray(images if isinstance(images, np.ndarray) else np.stack(images)),
                          np.asarray(m).astype(bool), *([np.stack([np.asarray(s) for s in safe])] if safe else []))
    return {"latents": latents, "masks": full, "unsafe": unsafe, "digest": digest, "n_unsafe": n,
            "n_safe": len(safe)}


def encode_guideline(pipe, concept: str):
    """(context [1, T, D] float32, positions, pooled or None): the concept's encoding and its
    own tokens' rows, the starting point of the optimisation (the "raw" tokens)."""
    import torch  # noqa: PLC0415

    from ..diffusers_adapter import concept_token_positions, encode_concept  # noqa: PLC0415

    with torch.no_grad():
        ctx, pooled = encode_concept(pipe, concept)
    return ctx.detach().float(), concept_token_positions(pipe, concept), (
        None if pooled is None else pooled.detach().float())


def with_rows(base, positions, rows):
    """``base`` [1, T, D] with rows ``positions`` replaced by ``rows`` [k, D] (differentiable in rows)."""
    import torch  # noqa: PLC0415

    idx = torch.as_tensor(list(positions), device=base.device)
    return base[0].index_copy(0, idx, rows.to(base))[None]


def _order(seed: int, epoch: int, n: int):
    import torch  # noqa: PLC0415

    return torch.randperm(n, generator=step_generator(seed, "dag-order", epoch))


def batch_indices(seed: int, step: int, batch: int, n: int) -> list[int]:
    """The images of ``step``: consecutive places of a fresh random order per epoch."""
    out, cache = [], {}
    for j in range(batch):
        k = step * batch + j
        e = k // n
        if e not in cache:
            cache[e] = _order(seed, e, n)
        out.append(int(cache[e][k % n]))
    return out


def draw(pipe, config: DagTokenConfig, step: int, shape, what: str = "dag"):
    """(timesteps [B], noise) of ``step``: pure functions of (seed, step)."""
    import torch  # noqa: PLC0415

    T = int(getattr(pipe.scheduler.config, "num_train_timesteps", len(_alphas(pipe))))
    lo, hi = (min(T - 1, int(round(f * (T - 1)))) for f in config.t_range)
    t = torch.randint(lo, hi + 1, (shape[0],), generator=step_generator(config.seed, f"{what}-t", step))
    noise = torch.randn(shape, generator=step_generator(config.seed, f"{what}-noise", step))
    return t, noise


def batch_loss(pipe, data: dict, idx: list[int], timesteps, noise, context, positions, pooled, config: DagTokenConfig):
    """(loss, terms) of images ``idx`` at the given timesteps and noise."""
    device = next(pipe.unet.parameters()).device
    raw = guideline_cam(pipe, data["latents"][idx].to(device), timesteps, noise.to(device), context, positions,
                        pooled, config.downscales, config.precision)
    return dag_token_loss(raw, data["masks"][idx].to(device), data["unsafe"][idx], tokens=len(positions),
                          cam_weight=config.cam_weight, leak_weight=config.leak_weight, neg_weight=config.neg_weight)


def train_dag_tokens(pipe, images, masks, safe_images, config: DagTokenConfig | None = None, *,
                     out: str | os.PathLike, progress: bool = True, resume: bool = True,
                     log_path: str | os.PathLike | None = None, base_model: str | os.PathLike | None = None,
                     overwrite: bool = False) -> Path:
    """Optimise the guideline tokens of ``config.concept`` on ``pipe`` (a diffusers SD1.x,
    SD2.x or SDXL pipeline, on CPU or CUDA) and write them to ``out`` (``.safetensors``).

    ``images``: unsafe RGB images (uint8 [H, W, 3], one size), ``masks``: their unsafe regions
    (bool [H, W], any resolution), ``safe_images``: safe RGB images of the same size (may be
    empty). Checkpoints go to ``<out>.partial/`` every ``config.checkpoint_every`` steps; with
    ``resume`` an interrupted run continues from there (draws depend only on (seed, step), so
    the result equals an uninterrupted run's), without it any checkpoint is dropped. The loss log
    (JSON, one record per step) goes to ``log_path`` (default ``<out stem>.loss.json``).
    ``base_model``: the model's path, hashed into the file's metadata (before training).
    An existing ``out`` or loss log is refused unless ``overwrite``."""
    import torch  # noqa: PLC0415

    cfg = config or DagTokenConfig()
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise TrainError(f"{out}: the output must be a .safetensors file")
    log_path = Path(log_path) if log_path else out.with_name(out.stem + ".loss.json")
    for p in (out, log_path):
        if p.exists() and not overwrite:
            raise TrainError(f"{p} exists; pass overwrite=True (--overwrite) to replace it")
    sha = base_sha256(base_model) if base_model is not None else None  # the model as given, before training
    data = prepare_data(pipe, images, masks, safe_images)
    n = data["latents"].shape[0]
    total = cfg.total_steps(n)
    base, positions, pooled = encode_guideline(pipe, cfg.concept)
    device = next(pipe.unet.parameters()).device
    base, pooled = base.to(device), None if pooled is None else pooled.to(device)
    hyper = {**dataclasses.asdict(cfg), "steps": total, "images": data["n_unsafe"], "safe_images": data["n_safe"],
             "positions": positions}
    # checkpoint_every says when to save, not what is trained: a resume may change it
    ident = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "checkpoint_every"}
    run_hash = config_hash({"config": ident, "total": total, "data": data["digest"],
                            "base": hashlib.sha256(base.cpu().numpy().tobytes()).hexdigest(), "positions": positions})
    ckpt = Checkpoint(out.with_name(out.name + ".partial"), run_hash)
    if not resume:
        ckpt.remove()
    rows = torch.nn.Parameter(base[0, positions].detach().clone())
    opt = torch.optim.SGD([rows], lr=cfg.lr)
    start, log = 0, LossLog()
    loaded = ckpt.load(str(device)) if resume else None
    if loaded is not None:
        tensors, state = loaded
        with torch.no_grad():
            rows.copy_(tensors["rows"])
        load_optimizer(opt, tensors)
        start, log = int(state["step"]), LossLog(state.get("log", []))

    def step_fn(step: int) -> dict:
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(step, total)
        idx = batch_indices(cfg.seed, step, cfg.batch_size, n)
        t, noise = draw(pipe, cfg, step, (len(idx), *data["latents"].shape[1:]))
        loss, terms = batch_loss(pipe, data, idx, t.to(device), noise, with_rows(base, positions, rows), positions,
                                 pooled, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach()), **terms, "lr": opt.param_groups[0]["lr"]}

    def save(step: int) -> None:
        ckpt.save({"rows": rows, **optimizer_tensors(opt)}, {"step": step, "log": log.records})

    run_steps(total, step_fn, start=start, log=log, save=save, desc="dag tokens", progress=progress,
              checkpoint_every=cfg.checkpoint_every)
    context = with_rows(base, positions, rows.detach())
    save_dag_tokens(out, context, positions, pooled, concept=cfg.concept, base_sha256=sha, hyper=hyper)
    log.write(log_path, {"method": METHOD, "out": str(out), "hyper": hyper})
    ckpt.remove()
    return out


# ------------------------------------------------------------------------------ evaluation

def lab_training_data(world, n_unsafe: int, n_safe: int, seed: int = 0, *, split: str = "train",
                      min_coverage: float = 0.02):
    """``(images, masks, safe_images)`` from the lab's world (no NSFW data): unsafe images show
    the concept colour (form ``direct``; the mask marks its object pixels), safe ones are
    ``benign`` (no concept-coloured pixel). Samples are drawn by a seeded generator; unsafe ones
    whose mask covers less than ``min_coverage`` of the image are passed over."""
    if n_unsafe < 1 or n_safe < 0:
        raise TrainError(f"need at least one unsafe image and no negative count, not {n_unsafe}, {n_safe}")
    rng = np.random.default_rng([int(seed), 0xDA6])
    images, masks, safe = [], [], []
    for _ in range(1000 * n_unsafe):
        if len(images) == n_unsafe:
            break
        s = world.sample(int(rng.integers(0, 2**31)), "direct", split)
        if s.mask.mean() >= min_coverage:
            images.append(s.image)
            masks.append(s.mask)
    if len(images) < n_unsafe:
        raise TrainError(f"the world gave fewer than {n_unsafe} concept images covering {min_coverage:.0%}")
    for _ in range(n_safe):
        safe.append(world.sample(int(rng.integers(0, 2**31)), "benign", split).image)
    shape = images[0].shape
    return (np.stack(images), np.stack(masks), np.stack(safe) if safe else np.zeros((0, *shape), np.uint8))


MASK_SUFFIX = ".mask"


def _resized(arr: np.ndarray, size: int | None, nearest: bool) -> np.ndarray:
    if size is None or arr.shape[:2] == (size, size):
        return arr
    from PIL import Image  # noqa: PLC0415

    return np.asarray(Image.fromarray(arr).resize((size, size), Image.NEAREST if nearest else Image.BICUBIC))


def folder_training_data(unsafe_dir: str | os.PathLike, safe_dir: str | os.PathLike | None = None, *,
                         size: int | None = None):
    """``(images, masks, safe_images)`` from files: every image ``NAME.EXT`` in ``unsafe_dir``
    (not recursive, sorted) with its mask ``NAME.mask.png`` beside it (any non-black pixel is
    the unsafe region; e.g. exported from Grounded-SAM), and every image in ``safe_dir``.
    Images are read with the filter's reader (:func:`safet2i.images.load_image_file`: byte and
    pixel budgets, EXIF orientation); ``size`` resizes everything to ``size`` × ``size``
    (bicubic; masks nearest), otherwise all images must already be of one size."""
    from ..filter.files import IMAGE_EXTS  # noqa: PLC0415
    from ..images import load_image_file  # noqa: PLC0415

    def read(path: Path, nearest: bool = False) -> np.ndarray:
        try:
            return _resized(load_image_file(path).frames[0], size, nearest)
        except SafeT2IError as exc:
            raise TrainError(f"training image {path} cannot be used: {exc}") from exc

    def images_in(folder: Path) -> list[Path]:
        if not folder.is_dir():
            raise TrainError(f"{folder}: no such folder")
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                      and not p.stem.endswith(MASK_SUFFIX))

    images, masks = [], []
    for p in images_in(Path(unsafe_dir)):
        mask_file = p.with_name(p.stem + MASK_SUFFIX + ".png")
        if not mask_file.is_file():
            raise TrainError(f"{p.name} has no mask {mask_file.name} beside it (white = the unsafe region)")
        img = read(p)
        m = read(mask_file, nearest=True).max(axis=-1) > 0
        if m.shape != img.shape[:2]:
            raise TrainError(f"{mask_file.name} is {m.shape[1]}x{m.shape[0]}, its image {img.shape[1]}x{img.shape[0]}")
        images.append(img)
        masks.append(m)
    if not images:
        raise TrainError(f"{unsafe_dir}: no images (each NAME.png needs NAME.mask.png beside it)")
    safe = [read(p) for p in images_in(Path(safe_dir))] if safe_dir is not None else []
    shapes = {a.shape for a in images + safe}
    if len(shapes) > 1:
        raise TrainError(f"training images differ in size ({sorted(shapes)}); pass size= to resize them")
    return np.stack(images), np.stack(masks), (np.stack(safe) if safe else
                                               np.zeros((0, *images[0].shape), np.uint8))


def evaluate_detection(pipe, tokens, images, masks, *, timesteps: Sequence[float] = (0.1, 0.25, 0.4),
                       seed: int = 0, threshold: float = 0.5, downscales: Sequence[int] = STAGE2_DOWNSCALES,
                       ) -> dict:
    """Mean IoU of Stage 2's highlighted region {Â ≥ ``threshold``} with the ground-truth masks.

    ``tokens``: a :class:`DagTokens`, a path to a tokens file, or a concept text. Each image
    is noised at each of ``timesteps`` (fractions of the schedule; noise from ``seed``) and its
    map read as in training. Returns ``{"optimised": IoU or None (a concept text),
    "raw": IoU of the raw concept tokens (the file's concept), "per_image": {...},
    "timesteps": [...]}``."""
    import torch  # noqa: PLC0415

    if isinstance(tokens, (str, os.PathLike)) and str(tokens).lower().endswith(".safetensors"):
        tokens = load_dag_tokens(tokens)
    if isinstance(tokens, DagTokens):
        tokens.check_for(pipe)
        if not tokens.concept:
            raise SafeT2IError("the tokens file names no concept, so its raw tokens cannot be compared")
        concept = tokens.concept
    else:
        concept = str(tokens)
        tokens = None
    data = prepare_data(pipe, images, masks, ())
    device = next(pipe.unet.parameters()).device
    T = int(getattr(pipe.scheduler.config, "num_train_timesteps", len(_alphas(pipe))))
    ts = [min(T - 1, int(round(f * (T - 1)))) for f in timesteps]
    raw_ctx, raw_pos, raw_pooled = encode_guideline(pipe, concept)
    variants = {"raw": (raw_ctx, raw_pos, raw_pooled)}
    if tokens is not None:
        variants["optimised"] = (tokens.context, tokens.positions, tokens.pooled)
    per: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for i in range(data["latents"].shape[0]):
            z = data["latents"][i:i + 1].to(device)
            scores: dict[str, list[float]] = {k: [] for k in variants}
            for j, t in enumerate(ts):
                noise = torch.randn(z.shape, generator=step_generator(seed, f"dag-eval-{i}", j)).to(device)
                tt = torch.tensor([t], device=device)
                for k, (ctx, pos, pooled) in variants.items():
                    raw = guideline_cam(pipe, z, tt, noise, ctx.to(device),
                                        pos, None if pooled is None else pooled.to(device), downscales)
                    scores[k].append(mask_iou(normalise_cam(raw), data["masks"][i:i + 1], threshold))
            for k, v in scores.items():
                per[k].append(float(np.mean(v)))
    res = {k: float(np.mean(v)) for k, v in per.items()}
    return {"optimised": res.get("optimised"), "raw": res["raw"], "per_image": per, "timesteps": ts,
            "concept": concept}
