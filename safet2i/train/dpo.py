"""Preference trainers on a UNet LoRA: DUO and SC-DPO (with the Dynamic Focusing Mechanism).

Both fine-tune a LoRA (:mod:`safet2i.train.lora_layers`) against the frozen base model as the
reference (the same UNet with the LoRA switched off) with a Diffusion-DPO objective. The
per-sample denoising error of a noised latent is ``ℓ(z, t) = mean ‖target_θ(z_t, t, c) − target‖²``
over channels and pixels (target ε, or v for v-prediction models), and ``Δ = ℓ_θ − ℓ_ref``.

**DUO** (Park et al., NeurIPS 2024, arXiv 2407.21035; ``docs/training.md``), as in the authors'
NeurIPS code (``../shared/docs/methods.md`` §3): pairs (x⁻ unsafe, x⁺ its safe SDEdit
counterpart), empty prompt, one ε shared by the pair and independent timesteps
t⁺, t⁻ ~ U{0, …, t_max − 1} (t_max = 750)::

    L_DPO   = −log σ(−β · (Δ⁺ − Δ⁻))
    L_prior = ‖ε_θ(ε, T − 1, "") − ε_ref(ε, T − 1, "")‖²   (pure noise at the last timestep)
    L       = L_DPO + λ · L_prior

with the paper's coupling lr = 3e-4 · 100/β and λ = 1e6 · β/100 (β = 500: lr 6e-5, λ 5e6) unless
given. The pair data (:func:`make_duo_pairs`): unsafe images generated from the unsafe prompt and
kept only when the judge flags them; each turned into its safe counterpart by SDEdit (img2img,
strength 0.75, CFG 7.5, the safe prompt with the unsafe prompt as the negative), resampled
until the judge passes it. Choices where the paper is silent: latents are the VAE's posterior
mean (not a sample: deterministic); an image that stays unsafe after ``max_tries`` is an error
naming the prompt, never a silently smaller set.

**SC-DPO** (Ruan et al., arXiv 2504.14290; a reconstruction: no code was released) ranks
candidate images of harmful and clean prompts by the Lagrangian reward ``R = r − λ·C`` (``r``
an alignment/quality reward, ``C`` the learned cost model of :mod:`safet2i.train.cost_model`,
C > 0 unsafe), pairs each prompt's best (winner) with its worst (loser) candidate, and trains
Diffusion-DPO (Wallace et al. 2023) with one (t, ε) shared by the pair and the prompt as the
condition::

    m  = −β · ((ℓ_θ(x_w) − ℓ_ref(x_w)) − (ℓ_θ(x_l) − ℓ_ref(x_l)))     (the implicit reward margin)
    L  = mean_pairs  w · (−log σ(m))

The Dynamic Focusing Mechanism weights hard pairs: ``w = (1 − σ(m))^γ``, detached (it re-weights
pairs, it does not change each pair's gradient direction) and divided by its batch mean (so γ
does not change the step size); γ = 0 is plain Diffusion-DPO. Clean-instruction pairs (ranked
by the same R, where C is small) keep the model's quality (the SCP idea). Training runs in
rounds: each round samples K candidates per prompt with the current LoRA, ranks them with the
current λ and trains ``steps_per_round`` steps; λ is either fixed or, with
``lam_mode="lagrange"``, a Lagrange multiplier updated after each round by projected gradient
ascent against a cost budget: ``λ ← max(0, λ + η_λ · (mean C of the harmful candidates − budget))``.
β defaults to 2500 (Diffusion-DPO's β = 5000 with its factor 1/2 folded in).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    Checkpoint,
    LossLog,
    TrainError,
    autocast,
    config_hash,
    gradient_checkpointing,
    load_optimizer,
    optimizer_tensors,
    output_paths,
    run_steps,
    step_generator,
)

Judge = Callable[[np.ndarray], np.ndarray]                    # uint8 [N,H,W,3] -> bool [N] (True: unsafe)
Scorer = Callable[[np.ndarray, Sequence[str]], np.ndarray]    # (uint8 images, prompts) -> float [N]


# ------------------------------------------------------------------------------------ losses

def per_sample_error(pred, target):
    """``mean ‖pred − target‖²`` over every dimension but the batch: ``[B]``."""
    return ((pred.float() - target.float()) ** 2).flatten(1).mean(dim=1)


def duo_loss(err_pos, ref_pos, err_neg, ref_neg, beta: float):
    """DUO's preference term ``−log σ(−β·(Δ⁺ − Δ⁻))`` (mean) and the margin ``−β·(Δ⁺ − Δ⁻)``:
    positive when the LoRA lowers the safe image's error more than the unsafe one's."""
    import torch.nn.functional as F  # noqa: PLC0415

    margin = -beta * ((err_pos - ref_pos) - (err_neg - ref_neg))
    return -F.logsigmoid(margin).mean(), margin


def prior_loss(pred, ref):
    """DUO's output-preserving term: ``mean ‖pred − ref‖²`` (the LoRA model against the
    reference on pure noise)."""
    return ((pred.float() - ref.float()) ** 2).mean()


def dfm_weights(margin, gamma: float):
    """The Dynamic Focusing Mechanism: ``(1 − σ(m))^γ``, detached, divided by the batch mean
    (all ones for γ = 0, and for a batch of one pair: DFM only moves weight between a
    batch's pairs)."""
    import torch  # noqa: PLC0415

    if gamma < 0 or not math.isfinite(gamma):
        raise TrainError(f"DFM gamma must be a finite number >= 0, not {gamma}")
    m = margin.detach()
    w = (1.0 - torch.sigmoid(m if m.is_floating_point() else m.float())) ** gamma
    return w / w.mean().clamp_min(1e-12)


def diffusion_dpo_loss(err_w, ref_w, err_l, ref_l, beta: float, dfm_gamma: float = 0.0):
    """``(loss, margin, weights)`` of Diffusion-DPO with DFM weights (see the module docstring)."""
    import torch.nn.functional as F  # noqa: PLC0415

    margin = -beta * ((err_w - ref_w) - (err_l - ref_l))
    w = dfm_weights(margin, dfm_gamma)
    return (w * -F.logsigmoid(margin)).mean(), margin, w


def lagrangian_reward(reward, cost, lam: float) -> np.ndarray:
    """``R = r − λ·C``."""
    return np.asarray(reward, np.float64) - float(lam) * np.asarray(cost, np.float64)


def lagrange_update(lam: float, mean_cost: float, budget: float, lr: float) -> float:
    """Projected gradient ascent on the multiplier: ``max(0, λ + lr·(mean C − budget))``."""
    if not all(math.isfinite(v) for v in (lam, mean_cost, budget, lr)):
        raise TrainError(f"Lagrange update with a non-finite value (λ {lam}, cost {mean_cost}, budget {budget}, lr {lr})")
    return max(0.0, lam + lr * (mean_cost - budget))


def rank_pairs(scores: np.ndarray, min_margin: float = 0.0) -> list[tuple[int, int, int, float]]:
    """``scores`` ``[P, K]`` (K candidates of P prompts) → ``(prompt, winner, loser, margin)`` for
    each prompt whose best and worst candidates differ by more than ``min_margin`` (ties go to
    the lower index, so the result is deterministic)."""
    s = np.asarray(scores, np.float64)
    if s.ndim != 2 or s.shape[1] < 2:
        raise TrainError(f"ranking needs at least 2 candidates per prompt, got scores of shape {s.shape}")
    out = []
    for p in range(s.shape[0]):
        w, lo = int(np.argmax(s[p])), int(np.argmin(s[p]))
        margin = float(s[p, w] - s[p, lo])
        if margin > min_margin:
            out.append((p, w, lo, margin))
    return out


def from_reward(reward: Callable[[Any, Sequence[str]], np.ndarray], sign: float = 1.0) -> Scorer:
    """A :mod:`safet2i.train.shielddiff` reward (``float [B, 3, H, W]`` in [0, 1], prompts) as a
    scorer of uint8 ``[N, H, W, 3]`` images (times ``sign``): the trainers share one set of
    rewards. ``from_reward(cost_model_reward(p, transform="negative-cost"), -1)`` is the cost C."""
    def score(images: np.ndarray, prompts: Sequence[str] | None = None) -> np.ndarray:
        x = np.transpose(np.asarray(images, np.float32), (0, 3, 1, 2)) / 255.0
        return sign * np.asarray(reward(x, list(prompts) if prompts is not None else [""] * len(x)), np.float64)
    score.reward = reward   # what it wraps (its describe() names the model and its sha256)
    return score


# ------------------------------------------------------------------------------ model access

class Denoiser:
    """The pipeline's UNet as a function of (latents, timesteps, prompts), with the training
    schedule (DDPM betas of the pipeline's scheduler config) and the prediction target."""

    def __init__(self, pipe: Any, device: str, precision: str = "no"):
        import torch  # noqa: PLC0415
        from diffusers import DDPMScheduler  # noqa: PLC0415

        self.pipe, self.device, self.precision, self.torch = pipe, device, precision, torch
        sched = DDPMScheduler.from_config(pipe.scheduler.config)
        self.alphas = sched.alphas_cumprod.to(device=device, dtype=torch.float32)
        self.T = int(sched.config.num_train_timesteps)
        self.prediction = sched.config.prediction_type
        if self.prediction not in ("epsilon", "v_prediction"):
            raise TrainError(f"training supports epsilon and v_prediction models, not {self.prediction!r}")
        self.scaling = float(getattr(pipe.vae.config, "scaling_factor", 1.0) or 1.0)
        self.shift = getattr(pipe.vae.config, "shift_factor", None)
        self.xl = hasattr(pipe, "text_encoder_2")
        self._cond: dict[str, tuple] = {}

    def encode_images(self, images: np.ndarray, batch: int = 16):
        """uint8 ``[N, H, W, 3]`` → latents ``[N, C, h, w]`` (posterior mean · scaling factor)."""
        torch = self.torch
        vae = self.pipe.vae
        out = []
        with torch.no_grad():
            for i in range(0, len(images), batch):
                x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch])).to(self.device)
                x = x.permute(0, 3, 1, 2).to(vae.dtype) / 127.5 - 1.0
                z = vae.encode(x).latent_dist.mean
                if self.shift is not None:
                    z = z - self.shift
                out.append((z * self.scaling).float())
        return torch.cat(out)

    def condition(self, prompts: Sequence[str], height: int, width: int) -> tuple[Any, dict | None]:
        """``(encoder_hidden_states [B, T, D], added_cond_kwargs or None)`` of ``prompts``
        (text encoders frozen; one encoding per distinct prompt, cached)."""
        torch = self.torch
        embs, pooled = [], []
        for p in prompts:
            if p not in self._cond:
                with torch.no_grad():
                    out = self.pipe.encode_prompt(p, device=self.device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
                self._cond[p] = (out[0].float(), out[2].float() if self.xl else None)
            e, pl = self._cond[p]
            embs.append(e)
            pooled.append(pl)
        hidden = torch.cat(embs)
        if not self.xl:
            return hidden, None
        scale = getattr(self.pipe, "vae_scale_factor", 8)
        h, w = height * scale, width * scale
        ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=self.device).expand(len(prompts), 6)
        return hidden, {"text_embeds": torch.cat(pooled), "time_ids": ids}

    def noised(self, z, t, eps):
        a = self.alphas[t].view(-1, *([1] * (z.ndim - 1)))
        x = a.sqrt() * z + (1 - a).sqrt() * eps
        target = eps if self.prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * z
        return x, target

    def __call__(self, x, t, prompts: Sequence[str]):
        hidden, added = self.condition(prompts, x.shape[-2], x.shape[-1])
        unet = self.pipe.unet
        with autocast(self.device, self.precision):
            out = unet(x.to(unet.dtype), t, encoder_hidden_states=hidden.to(unet.dtype),
                       added_cond_kwargs=added).sample
        return out.float()


def prepare_pipeline(pipe: Any, device: str, gradient_ckpt: bool) -> Callable[[], None]:
    """Freeze the pipeline's models for LoRA training; returns the function that gives the
    caller's pipeline back as it was (modes, requires_grad, activation checkpointing, progress
    bar setting, device)."""
    mods = [m for m in (getattr(pipe, n, None) for n in ("vae", "text_encoder", "text_encoder_2", "unet"))
            if m is not None]
    before = [(m, m.training, {p: p.requires_grad for p in m.parameters()}) for m in mods]
    ckpt_before = bool(getattr(pipe.unet, "is_gradient_checkpointing", False))
    bar_before = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    device_before = getattr(pipe, "device", None)
    for m in mods[:-1]:
        m.requires_grad_(False).eval()
    pipe.unet.requires_grad_(False)
    pipe.unet.train()
    gradient_checkpointing(pipe.unet, gradient_ckpt)
    pipe.set_progress_bar_config(disable=True)

    def restore() -> None:
        for m, training, grads in before:
            m.train(training)
            for p, g in grads.items():
                p.requires_grad_(g)
        if not ckpt_before and getattr(pipe.unet, "is_gradient_checkpointing", False):
            pipe.unet.disable_gradient_checkpointing()
        pipe._progress_bar_config = bar_before
        if device_before is not None and getattr(pipe, "device", None) != device_before:
            pipe.to(device_before)
    return restore


def images_sha256(*arrays: np.ndarray, extra: str = "") -> str:
    """sha256 of the training images (shape, dtype and bytes of each array) and ``extra``."""
    import hashlib  # noqa: PLC0415

    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}|{a.dtype}|".encode())
        h.update(a.tobytes())
    h.update(extra.encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------- data

def _generate(pipe: Any, prompts: Sequence[str], seed: int, steps: int, cfg: float, negative=None) -> np.ndarray:
    import torch  # noqa: PLC0415

    from ..images import float_to_uint8  # noqa: PLC0415

    gen = torch.Generator(device=pipe.device).manual_seed(int(seed))
    with torch.no_grad():
        out = pipe(list(prompts), negative_prompt=negative, num_inference_steps=steps, guidance_scale=cfg,
                   output_type="np", generator=gen).images
    return float_to_uint8(np.asarray(out, np.float64))


def _img2img(pipe: Any):
    """The img2img pipeline on the same components (no copies, nothing loaded)."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline  # noqa: PLC0415

    cls = StableDiffusionXLImg2ImgPipeline if hasattr(pipe, "text_encoder_2") else StableDiffusionImg2ImgPipeline
    i2i = cls.from_pipe(pipe)
    i2i.set_progress_bar_config(disable=True)
    return i2i


@dataclass
class DuoPairs:
    """Paired training images (uint8 ``[N, H, W, 3]``): ``unsafe[i]`` and its safe counterpart
    ``safe[i]``, with the prompts and how many draws the judge rejected."""
    unsafe: np.ndarray
    safe: np.ndarray
    unsafe_prompts: list[str]
    safe_prompts: list[str]
    rejected: dict[str, int] = field(default_factory=dict)

    def sha256(self) -> str:
        return images_sha256(self.unsafe, self.safe)


def save_duo_pairs(pairs: DuoPairs, path: str | os.PathLike) -> Path:
    """Keep generated pairs (safetensors: the images; metadata: prompts and rejections)."""
    import torch  # noqa: PLC0415

    from ..fileio import save_safetensors  # noqa: PLC0415

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"unsafe_prompts": json.dumps(pairs.unsafe_prompts), "safe_prompts": json.dumps(pairs.safe_prompts),
            "rejected": json.dumps(pairs.rejected)}
    save_safetensors(path, {"unsafe": torch.from_numpy(np.ascontiguousarray(pairs.unsafe)),
                            "safe": torch.from_numpy(np.ascontiguousarray(pairs.safe))}, meta)
    return path


def load_duo_pairs(path: str | os.PathLike) -> DuoPairs:
    """Pairs kept by :func:`save_duo_pairs` (a clear error for anything else)."""
    from safetensors import safe_open  # noqa: PLC0415

    try:
        with safe_open(str(path), framework="np") as fh:
            meta = fh.metadata() or {}
            unsafe, safe = fh.get_tensor("unsafe"), fh.get_tensor("safe")
        pairs = DuoPairs(unsafe, safe, json.loads(meta["unsafe_prompts"]), json.loads(meta["safe_prompts"]),
                         json.loads(meta.get("rejected", "{}")))
    except Exception as exc:  # noqa: BLE001 - safetensors' and json's own error types
        raise TrainError(f"{path}: not a file of DUO pairs ({exc}); delete it to generate the pairs again") from exc
    if unsafe.shape != safe.shape or unsafe.dtype != np.uint8 or unsafe.ndim != 4:
        raise TrainError(f"{path}: not a file of DUO pairs (shapes {unsafe.shape} / {safe.shape})")
    return pairs


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def pairs_from_folder(folder: str | os.PathLike) -> DuoPairs:
    """The user's own pairs: ``folder/unsafe/NAME`` and ``folder/safe/NAME`` (same file names,
    same size, a multiple of 8 pixels), read as RGB by the filter's image reader."""
    from .data import _read_image  # noqa: PLC0415

    root = Path(folder)
    u, s = root / "unsafe", root / "safe"
    if not u.is_dir() or not s.is_dir():
        raise TrainError(f"{root}: a pairs folder needs unsafe/ and safe/ sub-folders (same file names)")
    names_u = {p.name for p in u.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    names_s = {p.name for p in s.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    if names_u != names_s:
        odd = sorted(names_u ^ names_s)[:5]
        raise TrainError(f"{root}: unsafe/ and safe/ must hold the same file names; unpaired: {', '.join(odd)}")
    if not names_u:
        raise TrainError(f"{root}: no images in unsafe/ and safe/")
    names = sorted(names_u)
    unsafe = [_read_image(str(u / n)) for n in names]
    safe = [_read_image(str(s / n)) for n in names]
    shapes = {a.shape for a in unsafe + safe}
    if len(shapes) != 1:
        raise TrainError(f"{root}: every image must have the same size, found {sorted(shapes)[:4]}")
    h, w, _ = shapes.pop()
    if h % 8 or w % 8:
        raise TrainError(f"{root}: image sides must be multiples of 8 (the VAE's factor), got {w}x{h}")
    return DuoPairs(np.stack(unsafe), np.stack(safe), [""] * len(names), [""] * len(names))


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line (blank lines and lines starting with ``#`` skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainError(f"cannot read the prompt file {path}: {exc}") from exc
    prompts = [x.strip() for x in lines if x.strip() and not x.lstrip().startswith("#")]
    if not prompts:
        raise TrainError(f"{path}: no prompts (one per line)")
    return prompts


def make_duo_pairs(pipe: Any, unsafe_prompts: Sequence[str], safe_prompts: Sequence[str], judge: Judge, *,
                   n: int, seed: int = 0, steps: int = 25, guidance_scale: float = 7.5, strength: float = 0.75,
                   sdedit_guidance_scale: float = 7.5, max_tries: int = 8, batch_size: int = 8,
                   progress: bool = True) -> DuoPairs:
    """DUO's paired data: for pair ``i`` (prompts cycled) an image of ``unsafe_prompts[i]`` that
    ``judge`` flags (redrawn with new seeds until it does), then SDEdit of it towards
    ``safe_prompts[i]`` with the unsafe prompt as the negative (``strength``,
    ``sdedit_guidance_scale``) until ``judge`` passes it. At most ``max_tries`` draws per
    image; beyond that a :class:`TrainError` names the prompt."""
    import torch  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    if len(unsafe_prompts) == 0 or len(unsafe_prompts) != len(safe_prompts):
        raise TrainError("DUO pairs need as many safe prompts as unsafe prompts (at least one)")
    if n < 1:
        raise TrainError(f"DUO pairs: n must be at least 1, not {n}")
    want_u = [unsafe_prompts[i % len(unsafe_prompts)] for i in range(n)]
    want_s = [safe_prompts[i % len(safe_prompts)] for i in range(n)]
    unsafe: list[np.ndarray | None] = [None] * n
    safe: list[np.ndarray | None] = [None] * n
    rejected = {"unsafe": 0, "safe": 0}
    i2i = _img2img(pipe)
    bar = tqdm(total=2 * n, disable=not progress, desc="DUO pairs", unit="image", dynamic_ncols=True)
    try:
        for stage in ("unsafe", "safe"):
            for attempt in range(max_tries):
                todo = [i for i in range(n) if (unsafe if stage == "unsafe" else safe)[i] is None]
                if not todo:
                    break
                for start in range(0, len(todo), batch_size):
                    idx = todo[start:start + batch_size]
                    s = seed * 1_000_003 + attempt * 10_007 + start + (0 if stage == "unsafe" else 500_009)
                    if stage == "unsafe":
                        imgs = _generate(pipe, [want_u[i] for i in idx], s, steps, guidance_scale)
                        ok = np.asarray(judge(imgs), bool)
                    else:
                        gen = torch.Generator(device=pipe.device).manual_seed(int(s))
                        init = [Image.fromarray(unsafe[i]) for i in idx]
                        with torch.no_grad():
                            out = i2i(prompt=[want_s[i] for i in idx], negative_prompt=[want_u[i] for i in idx],
                                      image=init, strength=strength, guidance_scale=sdedit_guidance_scale,
                                      num_inference_steps=steps, generator=gen, output_type="np").images
                        from ..images import float_to_uint8  # noqa: PLC0415

                        imgs = float_to_uint8(np.asarray(out, np.float64))
                        ok = ~np.asarray(judge(imgs), bool)
                    for j, i in enumerate(idx):
                        if ok[j]:
                            (unsafe if stage == "unsafe" else safe)[i] = imgs[j]
                            bar.update(1)
                        else:
                            rejected[stage] += 1
            missing = [i for i in range(n) if (unsafe if stage == "unsafe" else safe)[i] is None]
            if missing:
                i = missing[0]
                what = (f"no image of {want_u[i]!r} was flagged by the judge" if stage == "unsafe" else
                        f"SDEdit towards {want_s[i]!r} stayed unsafe")
                raise TrainError(f"DUO pairs: {what} in {max_tries} draws ({len(missing)} of {n} pairs missing); "
                                 "check the prompts and the judge, or raise max_tries")
    finally:
        bar.close()
    return DuoPairs(np.stack(unsafe), np.stack(safe), want_u, want_s, rejected)


# ------------------------------------------------------------------------------------ DUO

@dataclass(frozen=True)
class DuoConfig:
    """DUO's settings (defaults: the authors' nudity setting, ``../shared/docs/methods.md`` §3.1).
    ``lr`` and ``prior_weight`` None: the paper's coupling to β (3e-4·100/β and 1e6·β/100)."""
    beta: float = 500.0
    lr: float | None = None
    prior_weight: float | None = None
    steps: int = 1000
    batch_size: int = 1
    rank: int = 32
    alpha: float | None = None
    targets: str = "self-attention"
    t_max: int = 750
    prompt: str = ""
    weight_decay: float = 1e-2
    seed: int = 42
    precision: str = "no"
    gradient_checkpointing: bool = False

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else 3e-4 * 100.0 / self.beta

    @property
    def effective_prior_weight(self) -> float:
        return self.prior_weight if self.prior_weight is not None else 1e6 * self.beta / 100.0

    def check(self) -> None:
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise TrainError(f"DUO beta must be a positive number, not {self.beta}")
        if self.steps < 1 or self.batch_size < 1:
            raise TrainError("DUO steps and batch size must be at least 1")
        if not (self.effective_lr > 0) or not (self.effective_prior_weight >= 0):
            raise TrainError("DUO lr must be positive and the prior weight non-negative")

    def hyper(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(lr=self.effective_lr, prior_weight=self.effective_prior_weight)
        return d


@dataclass
class TrainResult:
    """What a trainer wrote: the LoRA file(s), the loss log and a summary."""
    files: list[Path]
    log: Path | None
    summary: dict[str, Any]


def _save(lora: Any, paths: dict[str, Path], meta: dict[str, str], overwrite: bool) -> list[Path]:
    from .lora_layers import save_lora_files  # noqa: PLC0415

    return save_lora_files(lora, paths, metadata=meta, overwrite=overwrite)


def _resume(ckpt: Checkpoint, lora: Any, opt: Any, device: str, resume: bool):
    """``(start step, loss log, seconds so far, checkpoint tensors, checkpoint state)``: the LoRA
    and the optimiser restored from ``ckpt`` when resuming and there is one, else a fresh start."""
    state = ckpt.load(device) if resume else None
    if state is None:
        return 0, LossLog(), 0.0, {}, {}
    tensors, st = state
    lora.load_tensors({k[5:]: v for k, v in tensors.items() if k.startswith("lora.")})
    load_optimizer(opt, tensors)
    return int(st["step"]), LossLog(st["log"]), float(st["seconds"]), tensors, st


def _state_tensors(lora: Any, opt: Any) -> dict[str, Any]:
    """The LoRA's and the optimiser's tensors of a checkpoint (what :func:`_resume` reads)."""
    tensors = {f"lora.{k}": v for k, v in lora.tensors().items()}
    tensors.update(optimizer_tensors(opt))
    return tensors


def train_duo(pipe: Any, pairs: DuoPairs, config: DuoConfig | None = None, *, out: str | os.PathLike,
              device: str = "cpu", formats: Sequence[str] = ("kohya",), base_model: str = "",
              base_sha256: str = "", arch: str = "", progress: bool = True, resume: bool = True,
              overwrite: bool = False, log_path: str | os.PathLike | None = None,
              checkpoint_every: int = 50, callback: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train a DUO LoRA on ``pairs`` and save it (kohya format first, ``formats`` more). The run
    checkpoints into ``<out>.partial/`` and resumes from there (same settings and data only)."""
    import torch  # noqa: PLC0415

    from .lora_layers import inject_lora, lora_metadata  # noqa: PLC0415

    cfg = config or DuoConfig()
    cfg.check()
    if len(pairs.unsafe) != len(pairs.safe) or len(pairs.unsafe) == 0:
        raise TrainError("DUO needs at least one (unsafe, safe) pair of equally many images")
    paths = output_paths(out, list(formats), overwrite, log_path)
    out = paths[formats[0]]
    data_hash = pairs.sha256()
    run_hash = config_hash({"method": "duo", "hyper": cfg.hyper(), "data": data_hash, "base": base_sha256})
    ckpt = Checkpoint(out.with_name(out.name + ".partial"), run_hash)
    restore = prepare_pipeline(pipe, device, cfg.gradient_checkpointing)
    try:
        den = Denoiser(pipe, device, cfg.precision)
        z_pos = den.encode_images(pairs.safe)
        z_neg = den.encode_images(pairs.unsafe)
        lora = inject_lora(pipe.unet, targets=cfg.targets, rank=cfg.rank, alpha=cfg.alpha, seed=cfg.seed)
    except BaseException:
        restore()
        raise
    try:
        opt = torch.optim.AdamW(lora.parameters(), lr=cfg.effective_lr, betas=(0.9, 0.999),
                                weight_decay=cfg.weight_decay)
        start, log, seconds, _, _ = _resume(ckpt, lora, opt, device, resume)
        n, b = len(z_pos), cfg.batch_size
        prompts = [cfg.prompt] * b
        t_last = torch.full((b,), den.T - 1, device=device, dtype=torch.long)
        t0 = time.perf_counter()

        def step(i: int) -> dict[str, float]:
            g = step_generator(cfg.seed, "duo", i, device)
            idx = torch.randint(0, n, (b,), generator=g, device=device)
            eps = torch.randn(z_pos[idx].shape, generator=g, device=device)
            t_pos = torch.randint(0, cfg.t_max, (b,), generator=g, device=device)
            t_neg = torch.randint(0, cfg.t_max, (b,), generator=g, device=device)
            prior_eps = torch.randn(z_pos[idx].shape, generator=g, device=device)
            x_pos, tgt_pos = den.noised(z_pos[idx], t_pos, eps)
            x_neg, tgt_neg = den.noised(z_neg[idx], t_neg, eps)
            x = torch.cat([x_pos, x_neg, prior_eps])
            t = torch.cat([t_pos, t_neg, t_last])
            pred = den(x, t, prompts * 3)
            with torch.no_grad(), lora.disabled():
                ref = den(x, t, prompts * 3)
            e_pos, e_neg = per_sample_error(pred[:b], tgt_pos), per_sample_error(pred[b:2 * b], tgt_neg)
            r_pos, r_neg = per_sample_error(ref[:b], tgt_pos), per_sample_error(ref[b:2 * b], tgt_neg)
            l_dpo, margin = duo_loss(e_pos, r_pos, e_neg, r_neg, cfg.beta)
            l_prior = prior_loss(pred[2 * b:], ref[2 * b:])
            loss = l_dpo + cfg.effective_prior_weight * l_prior
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"loss": loss.item(), "dpo": l_dpo.item(), "prior": l_prior.item(),
                    "margin": margin.detach().mean().item(), "accuracy": (margin.detach() > 0).float().mean().item()}

        def save(done: int) -> None:
            ckpt.save(_state_tensors(lora, opt), {"step": done, "log": log.records,
                                "seconds": seconds + time.perf_counter() - t0})

        run_steps(cfg.steps, step, start=start, log=log, save=save, desc="safet2i train duo", progress=progress,
                  checkpoint_every=checkpoint_every, callback=callback)
        seconds += time.perf_counter() - t0
        hyper = cfg.hyper()
        meta = lora_metadata(method="duo", base_model=base_model, base_sha256=base_sha256, hyper=hyper,
                             data_sha256=data_hash, arch=arch,
                             extra={"safet2i_pairs": str(len(pairs.unsafe)),
                                    "safet2i_unsafe_prompts": json.dumps(sorted(set(pairs.unsafe_prompts))),
                                    "safet2i_safe_prompts": json.dumps(sorted(set(pairs.safe_prompts)))})
        files = _save(lora, paths, meta, overwrite)
        summary = {"method": "duo", "steps": cfg.steps, "seconds": round(seconds, 2), "pairs": len(pairs.unsafe),
                   "final_loss": log.records[-1]["loss"] if log.records else None, "hyper": hyper,
                   "data_sha256": data_hash, "rejected_draws": pairs.rejected}
        lp = log.write(log_path or out.with_suffix(".log.json"), summary)
        ckpt.remove()
        return TrainResult(files, lp, summary)
    finally:
        lora.remove()
        restore()


# --------------------------------------------------------------------------------- SC-DPO

@dataclass(frozen=True)
class ScDpoConfig:
    """SC-DPO's settings (a reconstruction, module docstring). ``lam_mode``: ``fixed`` or
    ``lagrange`` (λ updated after each round against ``cost_budget`` with step ``lam_lr``);
    ``dfm_gamma`` 0 turns the Dynamic Focusing Mechanism off."""
    beta: float = 2500.0
    lr: float = 1e-4
    rounds: int = 3
    steps_per_round: int = 100
    candidates: int = 4
    batch_size: int = 4
    lam: float = 1.0
    lam_mode: str = "fixed"
    cost_budget: float = 0.0
    lam_lr: float = 0.5
    dfm_gamma: float = 2.0
    min_margin: float = 0.0
    rank: int = 8
    alpha: float | None = None
    targets: str = "attention"
    sample_steps: int = 25
    guidance_scale: float = 7.5
    generate_batch: int = 16
    weight_decay: float = 1e-2
    seed: int = 0
    precision: str = "no"
    gradient_checkpointing: bool = False

    def check(self) -> None:
        if self.lam_mode not in ("fixed", "lagrange"):
            raise TrainError(f"lam_mode {self.lam_mode!r}: use fixed or lagrange")
        if not (self.beta > 0 and self.lr > 0):
            raise TrainError("SC-DPO beta and lr must be positive")
        if self.lam < 0 or self.lam_lr < 0 or self.dfm_gamma < 0:
            raise TrainError("SC-DPO lam, lam_lr and dfm_gamma must be >= 0")
        if self.candidates < 2:
            raise TrainError("SC-DPO needs at least 2 candidates per prompt to rank")
        if min(self.rounds, self.steps_per_round, self.batch_size, self.sample_steps, self.generate_batch) < 1:
            raise TrainError("SC-DPO rounds, steps_per_round, batch_size, sample_steps and generate_batch must be >= 1")


def _candidates(pipe: Any, prompts: list[str], k: int, seed: int, steps: int, cfg: float, batch: int,
                progress: bool, desc: str) -> np.ndarray:
    """``k`` images of each prompt, ``[len(prompts) * k, H, W, 3]`` (prompt-major)."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    flat = [p for p in prompts for _ in range(k)]
    out = []
    for start in tqdm(range(0, len(flat), batch), disable=not progress, desc=desc, unit="batch", leave=False):
        out.append(_generate(pipe, flat[start:start + batch], seed * 7919 + start, steps, cfg))
    return np.concatenate(out)


def train_sc_dpo(pipe: Any, harmful_prompts: Sequence[str], clean_prompts: Sequence[str],
                 config: ScDpoConfig | None = None, *, reward: Scorer, cost: Callable[[np.ndarray], np.ndarray],
                 out: str | os.PathLike, device: str = "cpu", formats: Sequence[str] = ("kohya",),
                 base_model: str = "", base_sha256: str = "", arch: str = "", data_note: str = "",
                 progress: bool = True, resume: bool = True, overwrite: bool = False,
                 log_path: str | os.PathLike | None = None, checkpoint_every: int = 50,
                 callback: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train an SC-DPO LoRA (module docstring) and save it. ``reward(images, prompts)`` is the
    alignment/quality reward r, ``cost(images)`` the safety cost C (C > 0 unsafe). Each round's
    pairs, λ and statistics are part of the checkpoint, so a resumed run continues with the same state
    (on CPU equal to float tolerance inside a round: tests/unit/test_train_dpo.py)."""
    import torch  # noqa: PLC0415

    from .lora_layers import inject_lora, lora_metadata  # noqa: PLC0415

    cfg = config or ScDpoConfig()
    cfg.check()
    harmful, clean = list(harmful_prompts), list(clean_prompts)
    if not harmful:
        raise TrainError("SC-DPO needs at least one harmful prompt")
    prompts = harmful + clean
    paths = output_paths(out, list(formats), overwrite, log_path)
    out = paths[formats[0]]
    data_hash = images_sha256(extra=json.dumps({"harmful": harmful, "clean": clean, "note": data_note}))
    run_hash = config_hash({"method": "sc-dpo", "hyper": dataclasses.asdict(cfg), "data": data_hash,
                            "base": base_sha256})
    ckpt = Checkpoint(out.with_name(out.name + ".partial"), run_hash)
    restore = prepare_pipeline(pipe, device, cfg.gradient_checkpointing)
    try:
        den = Denoiser(pipe, device, cfg.precision)
        lora = inject_lora(pipe.unet, targets=cfg.targets, rank=cfg.rank, alpha=cfg.alpha, seed=cfg.seed)
    except BaseException:
        restore()
        raise
    try:
        opt = torch.optim.AdamW(lora.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        run: dict[str, Any] = {"lam": cfg.lam, "rounds": [], "pairs": None}
        start, log, seconds, tensors, st = _resume(ckpt, lora, opt, device, resume)
        if st:
            run["lam"], run["rounds"] = float(st["lam"]), st["rounds"]
            if "pairs.w" in tensors:
                run["pairs"] = {"w": tensors["pairs.w"], "l": tensors["pairs.l"], "prompt": st["pair_prompts"],
                                "round": int(st["pair_round"])}
        t0 = time.perf_counter()

        def new_round(r: int) -> None:
            pipe.unet.eval()
            imgs = _candidates(pipe, prompts, cfg.candidates, cfg.seed * 1000 + r, cfg.sample_steps,
                               cfg.guidance_scale, cfg.generate_batch, progress, f"SC-DPO round {r + 1} candidates")
            pipe.unet.train()
            flat = [p for p in prompts for _ in range(cfg.candidates)]
            r_ = np.asarray(reward(imgs, flat), np.float64)
            c_ = np.asarray(cost(imgs), np.float64)
            if r_.shape != (len(flat),) or c_.shape != (len(flat),) or not (np.isfinite(r_).all() and np.isfinite(c_).all()):
                raise TrainError("SC-DPO: the reward and the cost must return one finite number per image")
            lam = run["lam"]
            scores = lagrangian_reward(r_, c_, lam).reshape(len(prompts), cfg.candidates)
            ranked = rank_pairs(scores, cfg.min_margin)
            nh = len(harmful) * cfg.candidates
            stats = {"round": r, "lam": lam, "pairs": len(ranked),
                     "harmful_pairs": sum(1 for p, *_ in ranked if p < len(harmful)),
                     "harmful_mean_cost": float(c_[:nh].mean()), "harmful_unsafe_rate": float((c_[:nh] > 0).mean()),
                     "harmful_mean_reward": float(r_[:nh].mean())}
            if clean:
                stats.update(clean_mean_cost=float(c_[nh:].mean()), clean_unsafe_rate=float((c_[nh:] > 0).mean()),
                             clean_mean_reward=float(r_[nh:].mean()))
            if cfg.lam_mode == "lagrange":
                run["lam"] = lagrange_update(lam, stats["harmful_mean_cost"], cfg.cost_budget, cfg.lam_lr)
            stats["lam_next"] = run["lam"]
            run["rounds"].append(stats)
            if not ranked:
                raise TrainError(f"SC-DPO round {r + 1}: no prompt had candidates that differ by more than "
                                 f"min_margin {cfg.min_margin}; more candidates or another reward are needed")
            k = cfg.candidates
            w = den.encode_images(np.stack([imgs[p * k + i] for p, i, _, _ in ranked]))
            lo = den.encode_images(np.stack([imgs[p * k + j] for p, _, j, _ in ranked]))
            run["pairs"] = {"w": w, "l": lo, "prompt": [prompts[p] for p, *_ in ranked], "round": r}

        def step(i: int) -> dict[str, float]:
            r = i // cfg.steps_per_round
            if run["pairs"] is None or run["pairs"]["round"] != r:
                new_round(r)
            pr = run["pairs"]
            g = step_generator(cfg.seed, "sc-dpo", i, device)
            idx = torch.randint(0, len(pr["prompt"]), (cfg.batch_size,), generator=g, device=device)
            zw, zl = pr["w"][idx], pr["l"][idx]
            eps = torch.randn(zw.shape, generator=g, device=device)
            t = torch.randint(0, den.T, (cfg.batch_size,), generator=g, device=device)
            xw, tw = den.noised(zw, t, eps)
            xl, tl = den.noised(zl, t, eps)
            ps = [pr["prompt"][j] for j in idx.tolist()]
            x, tt = torch.cat([xw, xl]), torch.cat([t, t])
            pred = den(x, tt, ps * 2)
            with torch.no_grad(), lora.disabled():
                ref = den(x, tt, ps * 2)
            b = cfg.batch_size
            loss, margin, w = diffusion_dpo_loss(per_sample_error(pred[:b], tw), per_sample_error(ref[:b], tw),
                                                 per_sample_error(pred[b:], tl), per_sample_error(ref[b:], tl),
                                                 cfg.beta, cfg.dfm_gamma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"loss": loss.item(), "margin": margin.detach().mean().item(),
                    "accuracy": (margin.detach() > 0).float().mean().item(), "dfm_max_weight": w.max().item(),
                    "lam": run["lam"], "round": r}

        def save(done: int) -> None:
            tensors = _state_tensors(lora, opt)
            st = {"step": done, "log": log.records, "seconds": seconds + time.perf_counter() - t0,
                  "lam": run["lam"], "rounds": run["rounds"]}
            if run["pairs"] is not None:
                tensors.update({"pairs.w": run["pairs"]["w"], "pairs.l": run["pairs"]["l"]})
                st.update(pair_prompts=run["pairs"]["prompt"], pair_round=run["pairs"]["round"])
            ckpt.save(tensors, st)

        run_steps(cfg.rounds * cfg.steps_per_round, step, start=start, log=log, save=save,
                  desc="safet2i train sc-dpo", progress=progress, checkpoint_every=checkpoint_every,
                  callback=callback)
        seconds += time.perf_counter() - t0
        hyper = dataclasses.asdict(cfg)
        meta = lora_metadata(method="sc-dpo" if cfg.dfm_gamma > 0 else "sc-dpo (no DFM)", base_model=base_model,
                             base_sha256=base_sha256, hyper=hyper, data_sha256=data_hash, arch=arch,
                             extra={"safet2i_harmful_prompts": str(len(harmful)),
                                    "safet2i_clean_prompts": str(len(clean)),
                                    "safet2i_final_lambda": repr(run["lam"])})
        files = _save(lora, paths, meta, overwrite)
        summary = {"method": "sc-dpo", "steps": cfg.rounds * cfg.steps_per_round, "seconds": round(seconds, 2),
                   "rounds": run["rounds"], "final_lambda": run["lam"], "hyper": hyper, "data_sha256": data_hash,
                   "final_loss": log.records[-1]["loss"] if log.records else None}
        lp = log.write(log_path or out.with_suffix(".log.json"), summary)
        ckpt.remove()
        return TrainResult(files, lp, summary)
    finally:
        lora.remove()
        restore()
