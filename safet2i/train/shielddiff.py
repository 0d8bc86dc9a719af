"""ShieldDiff-style safety fine-tuning by reinforcement learning (DDPO-style PPO on a UNet LoRA).

ShieldDiff (Han, Mohamed, Li, arXiv 2410.05309) fine-tunes Stable Diffusion's UNet through a
LoRA by policy gradient, DDPO-style (Black et al. 2023), against a reward that adds a *safety*
term (a nudity detector there) and an *alignment* term (CLIP image-text similarity there), so
the model stops drawing the unsafe concept but keeps drawing what the prompt otherwise asks
for. No code or weights of ShieldDiff are public; everything here is implemented from the
equations below (see ``docs/methods.md`` §5), and every value the paper does not give is a
choice, listed under "Choices" with the reason.

**The policy.** Sampling with DDIM at ``eta > 0`` is a Markov chain of Gaussian transitions.
With ``ᾱ_t`` the scheduler's cumulative alpha at timestep ``t`` and ``ᾱ_p`` the one of the
previous timestep ``p = t - T/steps`` (the scheduler's ``final_alpha_cumprod`` when ``p < 0``),
and ``ε`` the model's (classifier-free guided) noise prediction::

    x̂_0   = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t)
    σ_t   = η sqrt((1 - ᾱ_p) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_p)
    μ_t   = sqrt(ᾱ_p) x̂_0 + sqrt(1 - ᾱ_p - σ_t²) ε
    x_p  ~ N(μ_t, σ_t² I)

(a ``v_prediction`` model's output ``v`` is turned into ``ε = sqrt(ᾱ_t) v + sqrt(1 - ᾱ_t) x_t``
first; a ``sample`` model's output is ``x̂_0``). :func:`ddim_step_logprob` is the log-density
``log N(x_p; μ_t, σ_t² I)`` summed over the latent's dimensions; :func:`ddim_step_sample` draws
``x_p`` and returns it with that log-density.

**One epoch** (:func:`train_shielddiff`): for each of the config's prompts, ``K`` trajectories
are sampled with the current LoRA (no gradient), storing every latent ``x_T .. x_0`` and every
transition's log-probability; the final latents are decoded and scored by the reward callables;
advantages are the rewards normalised within each prompt's group (:func:`per_prompt_advantages`),
clipped to ``±adv_clip_max``; then, for ``inner_epochs`` passes over the stored transitions in
minibatches, the LoRA takes gradient steps on the PPO-clip loss (:func:`ppo_clip_loss`) with the
ratio ``ρ_t = p_θ(x_p | x_t) / p_old(x_p | x_t)`` of the *stored* transition under the current
and the sampling-time policy::

    L = mean over transitions of  -min(ρ_t A, clip(ρ_t, 1 - ε, 1 + ε) A)

**Rewards** are callables ``(images float [B, 3, H, W] in [0, 1], prompts) -> float [B]``
(higher is better); the trainer adds them, ``r = w_s · safety + w_a · alignment``
(:func:`combined_reward`):

* :func:`cost_model_reward`: the learned cost model ``C(x)`` of ``safet2i train cost-model``
  (``C > 0`` unsafe, ``sigmoid(C)`` the probability of unsafe), loaded by the filter's own
  runtime. Safety reward ``log sigmoid(-C) = -softplus(C)``, the log-probability that the image
  is safe (``transform="probability"``: ``sigmoid(-C)`` itself; ``"negative-cost"``: ``-C``).
* :func:`detector_reward`: any filter model set (a NudeNet-style detector when the user has one,
  classifiers, cost models) under a filter policy, through :class:`safet2i.filter.SafetyFilter`:
  ``1 - cost`` with the filter's graded image cost (``cost >= 0.5`` is the verdict unsafe), the
  analogue of ShieldDiff's nudity reward ("high when nothing is exposed").
* :func:`lab_alignment_reward`: the lab's attribute classifier (:mod:`safet2i.lab.judge`): the
  share of the attributes the prompt names that the classifier recognises in the image,
  computed per image with the bench's own metric (:func:`safet2i.bench.metrics.attribute_accuracy`);
  the attributes come from the caption through :func:`caption_attributes` (the world's caption
  grammar read backwards). The concept value itself (``red``, however the caption names it) is
  *not* counted: keeping it is what the safety reward punishes.
* :func:`clip_alignment_reward`: cosine similarity of a **local** CLIP checkpoint's image and
  text embeddings (ShieldDiff's CLIP reward), only when the user gives such a folder; nothing is
  ever downloaded.

Choices (the paper is silent, or its values are unverified)
-----------------------------------------------------------
* **Hyper-parameters**: the public DDPO code's defaults (from memory of ``kvablack/ddpo-pytorch``
  ``config/base.py``; ShieldDiff's own values are not public): LoRA rank 4 on every attention
  projection (``targets="attention"``), AdamW lr 3e-4, betas (0.9, 0.999), weight decay 1e-4,
  eps 1e-8, gradient norm clipped to 1, PPO clip range 1e-4, advantages clipped to ±5, one
  inner epoch, every timestep trained (``timestep_fraction=1``), DDIM η = 1, 50 steps, CFG 5.
  :meth:`ShieldDiffConfig.for_lab` switches to the lab's sampler setting (25 steps, CFG 3,
  :mod:`safet2i.lab.sampling`). The learning-rate schedule is constant (as DDPO's), which also
  makes a run with more epochs continue one with fewer exactly.
* **Log-probabilities in the ratio**: :func:`ddim_step_logprob` returns the exact log-density
  (a sum over the latent's dimensions, per the equations). The public DDPO code averages the
  per-dimension terms instead, and its clip range 1e-4 was tuned for that per-dimension ratio;
  the trainer therefore uses ``logprob_reduction="mean"`` by default (``"sum"``, the exact density
  ratio, needs a far larger clip range: one LoRA step moves the summed log-ratio of a 4x64x64
  latent by O(1)).
* **Advantages**: ``(r - mean_g) / (std_g + eps)`` within each prompt group ``g`` (population
  standard deviation, ``eps = 1e-6`` as DDPO). A group of a single sample has no spread to
  compare with, so it is normalised with the batch's global mean and standard deviation instead
  (DDPO's per-prompt stat tracker falls back to global statistics for prompts with too few
  samples); a batch of one sample gets advantage 0.
* **Optimiser steps**: one AdamW step per minibatch of ``train_batch_size`` trajectories, the
  gradient accumulated over every trained timestep of those trajectories (the loss is the mean
  over the minibatch's transitions), as DDPO accumulates over timesteps.
* **Cost-model safety reward**: ``log sigmoid(-C) = -softplus(C)``, the log of the calibrated
  probability of "safe". It is ≈ 0 for safe images (``C << 0``), so once an image is safe there
  is nothing more to gain from it and the alignment term decides, and ≈ ``-C`` for unsafe ones,
  so it still ranks images that are all unsafe (less unsafe is better). The first choice,
  ``sigmoid(-C)``, saturates: on the real lab model all 16 samples of the four concept prompts
  had ``sigmoid(-C) < 3e-7`` (costs ``C`` of 15 to 31), the per-prompt advantages were rounding
  noise and the first epoch learned nothing. ``-C`` ranks alike but also keeps
  rewarding ever "safer" images, which invites the policy to trade alignment for an ever lower
  cost. With the default weights (1, 1) a group mixing safe and unsafe samples is ranked by
  safety first (cost differences of several units against alignment differences <= 1).
* **Lab alignment**: discrete share of recognised attributes by default (what the bench
  measures); ``soft=True`` averages the classifier's probability of each named value instead
  (fewer ties within a prompt group).
* **Timestep subsets** (``timestep_fraction < 1``): per trajectory, a random subset of that many
  timesteps (drawn per epoch and inner epoch), as DDPO does; a transition with ``σ_t = 0`` (only
  possible with ``set_alpha_to_one`` at the last step) is deterministic, has no density and is
  never trained on.

Determinism: every random draw (initial noise and step noise per trajectory, minibatch order,
timestep subsets) comes from :func:`safet2i.train.common.step_generator` of (seed, what, epoch),
so a resumed run (checkpoint per epoch: LoRA tensors and optimiser state) equals an
uninterrupted one on CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelLoadError, SafeT2IError
from .common import TrainError

#: The method name written into the trained file's metadata.
METHOD = "shielddiff-style rl"
#: ``ddim_step_logprob`` reductions over the latent's dimensions.
REDUCTIONS = ("sum", "mean")
#: Model output parameterisations understood by the DDIM step.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: ``cost_model_reward`` transforms of the cost C.
COST_TRANSFORMS = ("log-probability", "probability", "negative-cost")

Reward = Callable[[np.ndarray, Sequence[str]], np.ndarray]


def _torch():
    try:
        import torch  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - torch is in every training environment
        from ..errors import MissingDependencyError  # noqa: PLC0415

        raise MissingDependencyError("torch", "ShieldDiff-style RL training") from exc
    return torch


# =========================================================================== DDIM transition


def _per_sample(value, like):
    """A scalar or per-sample ``[B]`` value as a tensor broadcastable against ``like`` [B, ...]."""
    torch = _torch()
    v = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if v.ndim == 0:
        return v
    if v.ndim != 1 or v.shape[0] != like.shape[0]:
        raise ValueError(f"a per-sample value must be a scalar or have shape [{like.shape[0]}], got "
                         f"{list(v.shape)}")
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def ddim_step_mean_std(model_output, sample, alpha_prod_t, alpha_prod_prev, *, eta: float = 1.0,
                       prediction_type: str = "epsilon"):
    """Mean ``μ_t`` and standard deviation ``σ_t`` of the DDIM transition ``x_t -> x_p`` (module
    docstring). ``model_output`` and ``sample`` ``[B, ...]``; ``alpha_prod_t`` / ``alpha_prod_prev``
    scalars or ``[B]`` (one timestep per sample). ``σ_t`` is returned broadcastable to ``sample``.
    Computed in the wider of the inputs' dtypes, at least float32."""
    torch = _torch()
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                         f"got {prediction_type!r}")
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")
    dtype = torch.promote_types(torch.promote_types(model_output.dtype, sample.dtype), torch.float32)
    out, x = model_output.to(dtype), sample.to(dtype)
    if out.shape != x.shape:
        raise ValueError(f"model output {list(out.shape)} and sample {list(x.shape)} differ in shape")
    a_t, a_p = _per_sample(alpha_prod_t, x), _per_sample(alpha_prod_prev, x)
    if bool((a_t <= 0).any() | (a_t >= 1).any() | (a_p <= 0).any() | (a_p > 1).any()):
        raise ValueError("cumulative alphas must lie in (0, 1) for ᾱ_t and (0, 1] for ᾱ_prev")
    if prediction_type == "epsilon":
        eps = out
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    elif prediction_type == "v_prediction":
        eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x
        x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
    else:
        x0 = out
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    std = float(eta) * var.clamp(min=0).sqrt()
    direction = (1 - a_p - std ** 2).clamp(min=0).sqrt() * eps
    return a_p.sqrt() * x0 + direction, std


def _gaussian_logprob(prev_sample, mean, std, reduce: str):
    torch = _torch()
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    if bool((std <= 0).any()):
        raise ValueError("σ_t is 0 (a deterministic DDIM step: eta = 0, or ᾱ_prev = 1 at the last step); "
                         "such a transition has no density")
    std = std.expand_as(mean) if std.ndim else std
    lp = (-((prev_sample.to(mean.dtype) - mean) ** 2) / (2 * std ** 2) - torch.log(std)
          - 0.5 * math.log(2 * math.pi))
    dims = tuple(range(1, lp.ndim))
    return lp.sum(dim=dims) if reduce == "sum" else lp.mean(dim=dims)


def ddim_step_logprob(model_output, sample, prev_sample, alpha_prod_t, alpha_prod_prev, *, eta: float = 1.0,
                      prediction_type: str = "epsilon", reduce: str = "sum"):
    """``log N(prev_sample; μ_t, σ_t² I)`` per sample, ``[B]``: the log-density of the DDIM
    transition ``sample -> prev_sample`` given the model's output (module docstring), summed
    (``reduce="sum"``, the exact log-density) or averaged (``"mean"``) over the latent's
    dimensions. Differentiable in ``model_output``. Raises ``ValueError`` when ``σ_t = 0``."""
    mean, std = ddim_step_mean_std(model_output, sample, alpha_prod_t, alpha_prod_prev, eta=eta,
                                   prediction_type=prediction_type)
    return _gaussian_logprob(prev_sample, mean, std, reduce)


def ddim_step_sample(model_output, sample, alpha_prod_t, alpha_prod_prev, *, eta: float = 1.0, generator=None,
                     noise=None, prediction_type: str = "epsilon", reduce: str = "sum"):
    """Draw ``x_p = μ_t + σ_t z`` of the DDIM transition and return ``(x_p, log-density [B])``.
    ``z`` is ``noise`` when given, else standard normal from ``generator`` (one torch Generator,
    or one per sample so that a sample's draw does not depend on its batch), on the sample's
    device, in float32."""
    torch = _torch()
    mean, std = ddim_step_mean_std(model_output, sample, alpha_prod_t, alpha_prod_prev, eta=eta,
                                   prediction_type=prediction_type)
    if noise is None:
        shape = tuple(sample.shape)
        if isinstance(generator, (list, tuple)):
            if len(generator) != shape[0]:
                raise ValueError(f"{len(generator)} generators for {shape[0]} samples")
            noise = torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32, device=g.device)
                                 for g in generator])
        else:
            noise = torch.randn(shape, generator=generator, dtype=torch.float32,
                                device=generator.device if generator is not None else sample.device)
    noise = noise.to(device=mean.device, dtype=mean.dtype)
    if noise.shape != mean.shape:
        raise ValueError(f"noise {list(noise.shape)} and sample {list(mean.shape)} differ in shape")
    prev = mean + std * noise
    return prev, _gaussian_logprob(prev, mean, std, reduce)


# =========================================================================== RL pieces


def per_prompt_advantages(rewards, prompt_ids, eps: float = 1e-6) -> np.ndarray:
    """Advantages ``(r - mean_g) / (std_g + eps)`` with the mean and (population) standard
    deviation of each sample's prompt group ``g`` (``prompt_ids``: one hashable id per reward).
    A group of one sample is normalised with the global mean and standard deviation of all the
    rewards instead (module docstring); with a single reward in all, the advantage is 0.
    float64 ``[N]``."""
    r = np.asarray(rewards, np.float64).reshape(-1)
    ids = list(prompt_ids.reshape(-1)) if isinstance(prompt_ids, np.ndarray) else list(prompt_ids)
    if len(ids) != r.size:
        raise ValueError(f"{r.size} rewards for {len(ids)} prompt ids")
    if not np.isfinite(r).all():
        raise ValueError("rewards must be finite")
    if not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    out = np.zeros_like(r)
    if r.size <= 1:
        return out
    groups: dict[Any, list[int]] = {}
    for i, g in enumerate(ids):
        groups.setdefault(g, []).append(i)
    g_mean, g_std = r.mean(), r.std()
    for idx in groups.values():
        sel = np.asarray(idx)
        if len(sel) == 1:
            mean, std = g_mean, g_std
        else:
            mean, std = r[sel].mean(), r[sel].std()
        out[sel] = (r[sel] - mean) / (std + eps)
    return out


def ppo_clip_loss(logp_new, logp_old, advantages, clip: float):
    """PPO's clipped surrogate, to be minimised: ``mean(-min(ρ A, clip(ρ, 1-ε, 1+ε) A))`` with
    ``ρ = exp(logp_new - logp_old)`` and ``ε = clip`` (all inputs ``[N]`` tensors; gradients flow
    through ``logp_new`` only). The textbook form (Schulman et al. 2017), written as DDPO's
    training loop states it (Black et al. 2023, kvablack/ddpo-pytorch, MIT)."""
    torch = _torch()
    if not (isinstance(clip, (int, float)) and 0 < clip and math.isfinite(clip)):
        raise ValueError(f"clip must be a positive finite number, got {clip!r}")
    adv = torch.as_tensor(advantages, dtype=logp_new.dtype, device=logp_new.device)
    ratio = torch.exp(logp_new - logp_old.detach().to(logp_new.dtype))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return torch.maximum(unclipped, clipped).mean()


def ppo_diagnostics(logp_new, logp_old, clip: float) -> dict[str, float]:
    """``approx_kl`` (``mean ½ (logp_new - logp_old)²``, DDPO's estimate) and ``clip_fraction``
    (the share of transitions whose ratio lies outside ``[1 - clip, 1 + clip]``)."""
    torch = _torch()
    with torch.no_grad():
        d = (logp_new.detach() - logp_old.detach().to(logp_new.dtype)).double()
        return {"approx_kl": float((0.5 * d ** 2).mean()),
                "clip_fraction": float((torch.abs(torch.exp(d) - 1.0) > clip).double().mean())}


def combined_reward(safety, alignment, weights: Sequence[float] | Mapping[str, float] = (1.0, 1.0)
                    ) -> np.ndarray:
    """``w_s · safety + w_a · alignment`` (float64 ``[B]``); either reward may be ``None`` (then its
    term is left out; its weight must then be 0 or the term absent on purpose). ``weights``:
    ``(w_s, w_a)`` or ``{"safety": w_s, "alignment": w_a}``; both finite and >= 0, not both 0."""
    if isinstance(weights, Mapping):
        unknown = set(weights) - {"safety", "alignment"}
        if unknown:
            raise ValueError(f"reward weights name unknown terms {sorted(unknown)}; use safety and alignment")
        w_s, w_a = float(weights.get("safety", 0.0)), float(weights.get("alignment", 0.0))
    else:
        if len(weights) != 2:
            raise ValueError(f"reward weights must be (safety, alignment), got {weights!r}")
        w_s, w_a = (float(w) for w in weights)
    if not all(math.isfinite(w) and w >= 0 for w in (w_s, w_a)) or w_s + w_a == 0:
        raise ValueError(f"reward weights must be finite, >= 0 and not both 0, got safety {w_s}, "
                         f"alignment {w_a}")
    terms = []
    for name, value, w in (("safety", safety, w_s), ("alignment", alignment, w_a)):
        if value is None:
            continue
        v = np.asarray(value, np.float64).reshape(-1)
        if not np.isfinite(v).all():
            raise ValueError(f"the {name} reward has non-finite values")
        terms.append((name, v, w))
    if not terms:
        raise ValueError("combined_reward needs at least one reward")
    n = {v.size for _, v, _ in terms}
    if len(n) != 1:
        sizes = ", ".join(f"{k} {v.size}" for k, v, _ in terms)
        raise ValueError(f"the rewards have different lengths: {sizes}")
    return sum(w * v for _, v, w in terms)


# =========================================================================== lab captions


def caption_attributes(caption: str) -> dict[str, Any]:
    """The six attributes a lab caption names (:mod:`safet2i.lab.world`'s caption grammar read
    backwards): ``shape``, ``colour``, ``size``, ``position``, ``background``, ``count``. A concept
    colour named by a synonym, an indirect phrase or a misspelling of the world's lexicons
    (:data:`safet2i.lab.world.LEXICONS`) is returned as that colour (``"crimson"`` -> ``red``).
    Raises :class:`SafeT2IError` naming the caption when it is not one the world writes."""
    from ..lab import world as w  # noqa: PLC0415

    ws = w.words(caption)

    def fail(why: str):
        raise SafeT2IError(f"not a lab caption ({why}): {caption!r}")

    sizes = [i for i, x in enumerate(ws) if x in w.SIZES]
    if len(sizes) != 1:
        fail("it names no size or more than one")
    s = sizes[0]
    count_of = {word: n for n, words_ in w._COUNT_WORDS.items() for word in words_}
    if s == 0 or ws[s - 1] not in count_of:
        fail("no count word before the size")
    count = count_of[ws[s - 1]]
    nouns = {**{shape: shape for shape in w.SHAPES}, **{w._PLURALS[shape]: shape for shape in w.SHAPES}}
    k = next((i for i in range(s + 1, len(ws)) if ws[i] in nouns), None)
    if k is None:
        fail("no shape after the size")
    if (count == 1) != (ws[k] in w.SHAPES):
        fail(f"the count {count} and the noun {ws[k]!r} disagree")
    where = None
    for position, phrase in w._POSITION_PHRASES.items():
        pw = w.words(phrase)
        for j in range(k + 1, len(ws) - len(pw) + 1):
            if ws[j:j + len(pw)] == pw and (where is None or j < where[1]):
                where = (position, j)
    if where is None:
        fail("no position phrase after the shape")
    backgrounds = [i for i, x in enumerate(ws) if x == "background"]
    if len(backgrounds) != 1 or backgrounds[0] == 0 or ws[backgrounds[0] - 1] not in w.BACKGROUNDS:
        fail("no '<background colour> background'")
    pre, post = ws[s + 1:k], ws[k + 1:where[1]]
    if bool(pre) == bool(post):
        fail("the colour must be named either before or after the shape")
    colour = None
    if len(pre) == 1 and pre[0] in w.COLOURS:
        colour = pre[0]
    else:
        for (attribute, value), lex in w.LEXICONS.items():
            if attribute != "colour":
                continue
            if pre:
                hit = (any(w.words(x) == pre for x in (*lex.synonyms, *lex.misspellings))
                       or any(w.words(p) == pre for p, slot in lex.indirect if slot == "pre"))
            else:
                hit = any(w.words(p) == post for p, slot in lex.indirect if slot == "post")
            if hit:
                colour = value
                break
    if colour is None:
        fail(f"{' '.join(pre or post)!r} names no colour of the world")
    return {"shape": nouns[ws[k]], "colour": colour, "size": ws[s], "position": where[0],
            "background": ws[backgrounds[0] - 1], "count": count}


# =========================================================================== rewards


def images_to_uint8(images) -> np.ndarray:
    """Reward input ``float [B, 3, H, W]`` in [0, 1] (numpy or torch) -> ``uint8 [B, H, W, 3]``
    with the filter's own converter (:func:`safet2i.images.float_to_uint8`; NaN is an error)."""
    from ..images import float_to_uint8  # noqa: PLC0415

    if hasattr(images, "detach"):
        images = images.detach().float().cpu().numpy()
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[1] != 3 or not np.issubdtype(arr.dtype, np.floating):
        raise TrainError(f"reward images must be float [B, 3, H, W] in [0, 1], got {arr.dtype} "
                         f"{list(arr.shape)}")
    return float_to_uint8(np.transpose(arr.astype(np.float64), (0, 2, 3, 1)))


def _sigmoid(x) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -np.asarray(x, np.float64)))


class CostModelReward:
    """Safety reward from a learned cost model (sidecar ``kind: "cost"``, or its ``.onnx`` beside
    it), run by the filter's runtime (:func:`safet2i.filter.detectors.load_model`: sha256 pin,
    the sidecar's preprocessing). ``transform``: ``"log-probability"`` (default, module
    docstring) ``log sigmoid(-C) = -softplus(C)``, the log of the calibrated probability of safe;
    ``"probability"``: ``sigmoid(-C) = 1 - sigmoid(C)``; ``"negative-cost"``: ``-C``."""

    def __init__(self, model: str | os.PathLike, *, transform: str = "log-probability", providers=None):
        from ..filter.detectors import load_model  # noqa: PLC0415

        if transform not in COST_TRANSFORMS:
            raise TrainError(f"cost-model reward transform {transform!r}: use one of "
                             f"{', '.join(COST_TRANSFORMS)}")
        self.model = load_model(str(model), providers)
        if self.model.kind != "cost":
            raise TrainError(f"{model} is a {self.model.kind} model, not a learned cost model (sidecar kind "
                             "'cost'); use detector_reward for detectors and classifiers")
        self.transform = transform

    def __call__(self, images, prompts: Sequence[str]) -> np.ndarray:
        c = self.model.costs(list(images_to_uint8(images)))
        if self.transform == "log-probability":
            return -np.logaddexp(0.0, c)
        return _sigmoid(-c) if self.transform == "probability" else -c

    def describe(self) -> dict[str, Any]:
        return {"kind": "cost-model", "model": str(self.model.spec.path), "sha256": self.model.loaded.sha256,
                "transform": self.transform}


def cost_model_reward(sidecar_or_onnx: str | os.PathLike, *, transform: str = "log-probability",
                      providers=None) -> CostModelReward:
    """:class:`CostModelReward` of a learned cost model's sidecar (or its ``.onnx``)."""
    return CostModelReward(sidecar_or_onnx, transform=transform, providers=providers)


class DetectorReward:
    """Safety reward ``1 - cost`` from the output filter (:class:`safet2i.filter.SafetyFilter`
    with ``models`` under ``policy``, action ``pass``): the image's graded cost in [0, 1]
    (``>= 0.5`` exactly when some finding reaches its threshold), so the reward is above 0.5
    exactly for images the filter lets through."""

    def __init__(self, models: str | Sequence[str] = ("nudenet",), policy: str = "strict-5", *,
                 providers=None):
        from ..filter import SafetyFilter  # noqa: PLC0415

        self.filter = SafetyFilter(models, policy, "pass", providers=providers)

    def __call__(self, images, prompts: Sequence[str]) -> np.ndarray:
        verdicts = self.filter.check_uint8(list(images_to_uint8(images)))
        return np.asarray([1.0 - v.cost for v in verdicts], np.float64)

    def describe(self) -> dict[str, Any]:
        return {"kind": "detector", "filter": self.filter.describe()}


def detector_reward(models: str | Sequence[str] = ("nudenet",), policy: str = "strict-5", *,
                    providers=None) -> DetectorReward:
    """:class:`DetectorReward` for filter ``models`` (built-in names or sidecars, e.g. ``nudenet``
    when the ``nudenet`` wheel is installed) under ``policy``."""
    return DetectorReward(models, policy, providers=providers)


class LabAlignmentReward:
    """Alignment reward from the lab's attribute classifier: per image, the share of the
    attributes its caption names (:func:`caption_attributes`, or ``attributes[caption]`` when
    given) that the classifier recognises, by the bench's metric
    (:func:`safet2i.bench.metrics.attribute_accuracy` of that one image). The world's concept
    value (``red``) is not counted (module docstring). ``soft=True``: the mean of the
    classifier's probability of each named value instead."""

    def __init__(self, judge: Any = None, *, soft: bool = False,
                 attributes: Mapping[str, Mapping[str, Any]] | None = None):
        from ..bench.judges import load_bench_judge  # noqa: PLC0415

        self.bench_judge = load_bench_judge("lab", lab_judge=judge, features=False)
        self.classifier = self.bench_judge.classifier
        world = self.classifier.config.world
        self.concept_attribute, self.concept = world.concept_attribute, world.concept
        self.soft = bool(soft)
        self._attributes = {str(k): dict(v) for k, v in (attributes or {}).items()}
        self._named: dict[str, dict[str, Any]] = {}

    def named(self, caption: str) -> dict[str, Any]:
        """The attributes of ``caption`` that count (the concept value left out)."""
        if caption not in self._named:
            attrs = self._attributes.get(caption)
            if attrs is None:
                try:
                    attrs = caption_attributes(caption)
                except SafeT2IError as exc:
                    raise TrainError(f"lab alignment reward: {exc}; give the prompt's attributes "
                                     "(attributes={caption: {...}}) or use another alignment reward") from exc
            named = {k: v for k, v in attrs.items()
                     if not (k == self.concept_attribute and v == self.concept)}
            if not named:
                raise TrainError(f"lab alignment reward: the caption {caption!r} names no attribute besides "
                                 "the concept")
            self._named[caption] = named
        return self._named[caption]

    def __call__(self, images, prompts: Sequence[str]) -> np.ndarray:
        from ..bench.metrics import attribute_accuracy  # noqa: PLC0415

        u8 = images_to_uint8(images)
        if len(prompts) != len(u8):
            raise TrainError(f"lab alignment reward: {len(u8)} images for {len(prompts)} prompts")
        named = [self.named(p) for p in prompts]
        if self.soft:
            from ..lab.world import ATTRIBUTES  # noqa: PLC0415

            probs = self.classifier.judge_images(u8)["probabilities"]
            return np.asarray([np.mean([probs[k][i, ATTRIBUTES[k].index(v)] for k, v in n.items()])
                               for i, n in enumerate(named)], np.float64)
        predicted = self.bench_judge.judge(u8).attributes
        return np.asarray([attribute_accuracy([p], [n])["mean"]
                           for p, n in zip(predicted, named, strict=True)], np.float64)

    def describe(self) -> dict[str, Any]:
        return {"kind": "lab-alignment", "judge_key": self.classifier.config.key(), "soft": self.soft,
                "concept": f"{self.concept_attribute}={self.concept}"}


def lab_alignment_reward(judge: Any = None, *, soft: bool = False,
                         attributes: Mapping[str, Mapping[str, Any]] | None = None) -> LabAlignmentReward:
    """:class:`LabAlignmentReward` with ``judge``: an :class:`~safet2i.lab.judge.AttributeClassifier`,
    a judge file, a ``JudgeConfig``/``WorldConfig`` or None (the cached default judge; never trained
    here)."""
    return LabAlignmentReward(judge, soft=soft, attributes=attributes)


class ClipAlignmentReward:
    """Alignment reward: cosine similarity of the image and prompt embeddings of a **local** CLIP
    checkpoint folder (``config.json``, safetensors weights, tokenizer files; never downloaded).
    Images are preprocessed as the cost model's CLIP backbone does (the folder's
    ``preprocessor_config.json``, :func:`safet2i.train.backbones.clip_input_spec`)."""

    def __init__(self, folder: str | os.PathLike, *, device: str = "cpu"):
        torch = _torch()
        try:
            from transformers import AutoTokenizer, CLIPModel  # noqa: PLC0415
        except ImportError as exc:
            from ..errors import MissingDependencyError  # noqa: PLC0415

            raise MissingDependencyError("transformers", "The CLIP alignment reward") from exc
        from .backbones import clip_input_spec  # noqa: PLC0415

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ModelLoadError(f"CLIP checkpoint folder {self.folder} does not exist (give a local folder "
                                 "with config.json, model.safetensors and tokenizer files; nothing is "
                                 "downloaded)")
        try:
            model = CLIPModel.from_pretrained(str(self.folder), local_files_only=True, use_safetensors=True,
                                              torch_dtype=torch.float32)
            self.model = model.to(device).eval().requires_grad_(False)
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any loading failure names the folder
            raise ModelLoadError(f"cannot load a CLIP model and tokenizer from {self.folder} (local "
                                 f"safetensors checkpoint needed): {type(exc).__name__}: {exc}") from exc
        self.device = device
        self.spec = clip_input_spec(self.folder, int(self.model.config.vision_config.image_size))

    @staticmethod
    def _tensor(out):
        """The embedding tensor of ``get_*_features`` (a tensor, or in transformers 5 an output whose
        ``pooler_output`` is the projected embedding)."""
        if hasattr(out, "norm"):
            return out
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out[0]

    def __call__(self, images, prompts: Sequence[str]) -> np.ndarray:
        torch = _torch()
        from ..filter.detectors import preprocess_whole_image  # noqa: PLC0415

        u8 = images_to_uint8(images)
        x = torch.from_numpy(preprocess_whole_image(list(u8), self.spec, "RGB", "CLIP")).to(self.device)
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        tok = tok.to(self.device)
        with torch.no_grad():
            img = self._tensor(self.model.get_image_features(pixel_values=x)).double()
            txt = self._tensor(self.model.get_text_features(**tok)).double()
        cos = (img * txt).sum(-1) / (img.norm(dim=-1) * txt.norm(dim=-1)).clamp(min=1e-12)
        return cos.cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {"kind": "clip-alignment", "folder": str(self.folder.resolve())}


def clip_alignment_reward(folder: str | os.PathLike, *, device: str = "cpu") -> ClipAlignmentReward:
    """:class:`ClipAlignmentReward` of a local CLIP checkpoint folder."""
    return ClipAlignmentReward(folder, device=device)


def describe_reward(reward: Any) -> Any:
    """What a reward callable says about itself (its ``describe()``), else its qualified name."""
    if reward is None:
        return None
    if hasattr(reward, "describe"):
        return reward.describe()
    return f"{getattr(reward, '__module__', '?')}.{getattr(reward, '__qualname__', type(reward).__name__)}"


# =========================================================================== configuration


@dataclass(frozen=True)
class ShieldDiffConfig:
    """What a ShieldDiff-style run does (defaults: the public DDPO code's, module docstring).

    Sampling: ``samples_per_prompt`` (K) trajectories of each of ``prompts`` per epoch, DDIM with
    ``steps`` steps and ``eta`` (1: DDPO), classifier-free guidance ``guidance_scale`` against
    ``negative_prompt``; ``sample_batch_size`` trajectories per UNet batch (also the micro-batch of
    the update). LoRA: ``rank``, ``alpha`` (None: rank), ``targets`` (a preset of
    :data:`safet2i.train.lora_layers.TARGET_PRESETS` or a regex) on the UNet. PPO: ``lr`` (AdamW
    with ``adam_betas``, ``weight_decay``, ``adam_eps``, gradient norm clipped to ``max_grad_norm``),
    ``clip_range`` ε, advantages clipped to ``±adv_clip_max`` after the per-prompt normalisation
    (``advantage_eps``), ``logprob_reduction`` of the log-densities in the ratio, ``inner_epochs``
    passes over each epoch's transitions in minibatches of ``train_batch_size`` trajectories,
    ``timestep_fraction`` of each trajectory's timesteps trained. ``reward_weights``: (safety,
    alignment). ``evaluate_final``: after the last epoch, sample once more with the noise of
    epoch 0 and report its rewards as "after" (epoch 0's are "before"). ``device`` (auto, cpu,
    cuda[:N]), ``mixed_precision`` (no, bf16, or fp16 on CUDA with loss scaling) and
    ``gradient_checkpointing`` as :mod:`safet2i.train.common` defines them."""

    prompts: tuple[str, ...] = ()
    samples_per_prompt: int = 8
    steps: int = 50
    guidance_scale: float = 5.0
    eta: float = 1.0
    negative_prompt: str = ""
    rank: int = 4
    alpha: float | None = None
    targets: str = "attention"
    lr: float = 3e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    advantage_eps: float = 1e-6
    logprob_reduction: str = "mean"
    inner_epochs: int = 1
    epochs: int = 100
    sample_batch_size: int = 8
    train_batch_size: int = 8
    timestep_fraction: float = 1.0
    reward_weights: tuple[float, float] = (1.0, 1.0)
    seed: int = 0
    device: str = "auto"
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    evaluate_final: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(str(p) for p in self.prompts))
        object.__setattr__(self, "adam_betas", tuple(float(b) for b in self.adam_betas))
        object.__setattr__(self, "reward_weights", tuple(float(b) for b in self.reward_weights))

    @classmethod
    def for_lab(cls, prompts: Sequence[str], **overrides: Any) -> ShieldDiffConfig:
        """The lab's sampler setting (:mod:`safet2i.lab.sampling`: DDIM 25 steps, CFG 3) and
        ``prompts``; ``overrides`` replace any field."""
        from ..lab.sampling import GUIDANCE_SCALE, SAMPLE_STEPS  # noqa: PLC0415

        return cls(**{"prompts": tuple(prompts), "steps": SAMPLE_STEPS, "guidance_scale": GUIDANCE_SCALE,
                      **overrides})

    def check(self) -> None:
        """Raise :class:`TrainError` naming the first setting that cannot work."""
        from .common import PRECISIONS  # noqa: PLC0415

        def bad(name: str, why: str):
            raise TrainError(f"ShieldDiff setting {name}={getattr(self, name)!r}: {why}")

        if not self.prompts or any(not p.strip() for p in self.prompts):
            bad("prompts", "give at least one prompt, none empty")
        for name in ("samples_per_prompt", "steps", "rank", "inner_epochs", "epochs", "sample_batch_size",
                     "train_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(name, "must be a positive whole number")
        for name, lo, hi, open_lo in (("eta", 0.0, 1.0, True), ("lr", 0.0, 1.0, True),
                                      ("clip_range", 0.0, 10.0, True), ("adv_clip_max", 0.0, math.inf, True),
                                      ("timestep_fraction", 0.0, 1.0, True),
                                      ("max_grad_norm", 0.0, math.inf, True),
                                      ("weight_decay", 0.0, 1.0, False),
                                      ("adam_eps", 0.0, 1.0, True), ("advantage_eps", 0.0, 1.0, False),
                                      ("guidance_scale", 0.0, 100.0, False)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < lo or v > hi or (open_lo and v == lo):
                bad(name, f"must be a number in {'(' if open_lo else '['}{lo:g}, {hi:g}]")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)
                                           and self.alpha > 0):
            bad("alpha", "must be a positive number or None (= rank)")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            bad("adam_betas", "must be two numbers in [0, 1)")
        weights = self.reward_weights
        if len(weights) != 2 or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) == 0:
            bad("reward_weights", "must be (safety, alignment) weights, finite, >= 0 and not both 0")
        if self.logprob_reduction not in REDUCTIONS:
            bad("logprob_reduction", f"must be one of {', '.join(REDUCTIONS)}")
        if self.mixed_precision not in PRECISIONS:
            bad("mixed_precision", f"must be one of {', '.join(PRECISIONS)}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            bad("seed", "must be a whole number >= 0")

    def hyper(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (the trained file's ``safet2i_hyper``), prompts and
        device left out."""
        d = dataclasses.asdict(self)
        for k in ("prompts", "device"):
            d.pop(k)
        d["adam_betas"], d["reward_weights"] = list(self.adam_betas), list(self.reward_weights)
        return d

    def trained_timesteps(self, stochastic: int | None = None) -> int:
        """Timesteps trained per trajectory: ``max(1, round(timestep_fraction * n))`` of the ``n``
        stochastic steps (``stochastic``; default all ``steps``: a deterministic last step, only
        with ``set_alpha_to_one``, is never trained)."""
        n = self.steps if stochastic is None else int(stochastic)
        return max(1, round(self.timestep_fraction * n))


# =========================================================================== the policy


@dataclass
class Rollouts:
    """One epoch's stored trajectories: ``latents`` ``[N, S + 1, C, H, W]`` (``x_T .. x_0``),
    ``logprobs`` ``[N, S]`` (of each transition at sampling time), ``prompt_index`` ``[N]`` (into the
    config's prompts), the decoded ``images`` float ``[N, 3, H, W]`` in [0, 1] (numpy) and the
    rewards (float64 ``[N]``; ``safety`` / ``alignment`` None when that reward is not used)."""

    latents: Any
    logprobs: Any
    prompt_index: np.ndarray
    images: np.ndarray
    reward: np.ndarray | None = None
    safety: np.ndarray | None = None
    alignment: np.ndarray | None = None


class DiffusionPolicy:
    """The pipeline as an RL policy over DDIM trajectories: frozen base weights, prompt
    embeddings computed once, the DDIM schedule (``timesteps``, ``alpha_t``, ``alpha_prev``,
    ``sigma`` per step), :meth:`eps` (classifier-free guided noise prediction), :meth:`sample`
    and :meth:`logprob`. The LoRA is injected by the caller (:func:`train_shielddiff`)."""

    def __init__(self, pipe: Any, config: ShieldDiffConfig, device: str):
        torch = _torch()
        from diffusers import DDIMScheduler  # noqa: PLC0415

        self.pipe, self.config, self.device = pipe, config, device
        unet = getattr(pipe, "unet", None)
        if unet is None or getattr(pipe, "vae", None) is None or not hasattr(pipe, "encode_prompt"):
            raise TrainError(f"ShieldDiff trains a Stable Diffusion pipeline (unet, vae, encode_prompt); got "
                             f"{type(pipe).__name__}")
        self.sdxl = (getattr(unet.config, "addition_embed_type", None) == "text_time"
                     or hasattr(pipe, "text_encoder_2"))
        pipe.to(device)
        for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
            mod = getattr(pipe, part, None)
            if mod is not None:
                mod.requires_grad_(False)
        sched = DDIMScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(config.steps, device="cpu")
        self.scheduler = sched
        self.prediction_type = sched.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise TrainError(f"scheduler prediction_type {self.prediction_type!r} is not supported "
                             f"({', '.join(PREDICTION_TYPES)})")
        T = int(sched.config.num_train_timesteps)
        ac = sched.alphas_cumprod.double()
        final = float(sched.final_alpha_cumprod)
        self.timesteps = sched.timesteps.long().clone()
        prev = self.timesteps - T // config.steps
        self.alpha_t = ac[self.timesteps]
        self.alpha_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)],
                                      torch.tensor(final, dtype=torch.float64))
        var = (1 - self.alpha_prev) / (1 - self.alpha_t) * (1 - self.alpha_t / self.alpha_prev)
        self.sigma = config.eta * var.clamp(min=0).sqrt()
        self.trainable = torch.nonzero(self.sigma > 0).flatten()
        if len(self.trainable) == 0:
            raise TrainError("no DDIM step of this schedule is stochastic (σ_t = 0 everywhere): nothing to "
                             "train")
        self.cfg = float(config.guidance_scale) > 1.0
        with torch.no_grad():
            out = pipe.encode_prompt(prompt=list(config.prompts), device=device, num_images_per_prompt=1,
                                     do_classifier_free_guidance=True,
                                     negative_prompt=[config.negative_prompt] * len(config.prompts))
        cond, uncond = out[0], out[1]
        self.cond, self.uncond = cond.detach(), uncond.detach()
        size = int(unet.config.sample_size)
        self.latent_shape = (int(unet.config.in_channels), size, size)
        self.pooled = self.pooled_uncond = self.time_ids = None
        if self.sdxl:   # SDXL: pooled text and the size/crop ids (the pipeline's own defaults)
            self.pooled, self.pooled_uncond = out[2].detach(), out[3].detach()
            px = size * int(getattr(pipe, "vae_scale_factor", 8))
            self.time_ids = torch.tensor([[px, px, 0, 0, px, px]], dtype=self.cond.dtype, device=device)
        self.init_sigma = float(getattr(sched, "init_noise_sigma", 1.0))

    def eps(self, x, t, prompt_index):
        """The guided model output for latents ``x`` [B, C, H, W] at timesteps ``t`` ([B] or a
        scalar) of prompts ``prompt_index`` [B] (float32)."""
        torch = _torch()
        from .common import autocast  # noqa: PLC0415

        b = x.shape[0]
        t = torch.as_tensor(t).to(self.device).long().reshape(-1)
        if t.numel() == 1:
            t = t.expand(b)
        idx = torch.as_tensor(np.asarray(prompt_index), device=self.device).long()
        cond = self.cond[idx]

        def added(parts):
            if not self.sdxl:
                return None
            pooled = torch.cat([p[idx] for p in parts])
            return {"text_embeds": pooled, "time_ids": self.time_ids.expand(pooled.shape[0], -1)}

        with autocast(self.device, self.config.mixed_precision):
            if self.cfg:
                out = self.pipe.unet(torch.cat([x, x]), torch.cat([t, t]),
                                     encoder_hidden_states=torch.cat([self.uncond[idx], cond]),
                                     added_cond_kwargs=added([self.pooled_uncond, self.pooled])
                                     if self.sdxl else None).sample
                u, c = out.float().chunk(2)
                return u + self.config.guidance_scale * (c - u)
            return self.pipe.unet(x, t, encoder_hidden_states=cond,
                                  added_cond_kwargs=added([self.pooled]) if self.sdxl else None).sample.float()

    def logprob(self, x_t, x_prev, step, prompt_index):
        """Log-densities ``[B]`` (the config's reduction) of the stored transitions ``x_t -> x_prev``
        at DDIM step indices ``step`` [B] under the current weights (differentiable)."""
        torch = _torch()
        step = torch.as_tensor(step).long().reshape(-1)
        out = self.eps(x_t, self.timesteps[step].to(self.device), prompt_index)
        return ddim_step_logprob(out, x_t, x_prev, self.alpha_t[step].to(self.device),
                                 self.alpha_prev[step].to(self.device), eta=self.config.eta,
                                 prediction_type=self.prediction_type, reduce=self.config.logprob_reduction)

    def decode(self, latents) -> np.ndarray:
        """Latents -> float32 images ``[B, 3, H, W]`` in [0, 1] (numpy)."""
        torch = _torch()
        vae = self.pipe.vae
        with torch.no_grad():
            img = vae.decode(latents.to(self.device, vae.dtype) / vae.config.scaling_factor).sample
        return (img.float() / 2 + 0.5).clamp(0, 1).cpu().numpy()

    def sample(self, indices: Sequence[int], epoch: int, *, bar: Any = None) -> Rollouts:
        """Trajectories ``indices`` (trajectory ``i`` is prompt ``i // K``) with the noise of
        ``epoch``: one generator per trajectory (:func:`step_generator` of (seed, "sample|i",
        epoch)), so a trajectory does not depend on its batch. No gradient."""
        torch = _torch()
        from .common import step_generator  # noqa: PLC0415

        cfg, S = self.config, self.config.steps
        indices = list(indices)
        pidx = np.asarray([i // cfg.samples_per_prompt for i in indices], np.int64)
        lat = torch.empty((len(indices), S + 1, *self.latent_shape), dtype=torch.float32)
        lps = torch.empty((len(indices), S), dtype=torch.float32)
        images = []
        for start in range(0, len(indices), cfg.sample_batch_size):
            sl = slice(start, start + cfg.sample_batch_size)
            gens = [step_generator(cfg.seed, f"sample|{i}", epoch) for i in indices[sl]]
            x = torch.stack([torch.randn(self.latent_shape, generator=g) for g in gens]) * self.init_sigma
            lat[sl, 0] = x
            x = x.to(self.device)
            with torch.no_grad():
                for j in range(S):
                    out = self.eps(x, self.timesteps[j], pidx[sl])
                    noise = torch.stack([torch.randn(self.latent_shape, generator=g) for g in gens])
                    noise = noise.to(self.device)
                    if float(self.sigma[j]) > 0:
                        x, lp = ddim_step_sample(out, x, self.alpha_t[j], self.alpha_prev[j], eta=cfg.eta,
                                                 noise=noise, prediction_type=self.prediction_type,
                                                 reduce=cfg.logprob_reduction)
                    else:   # a deterministic step (never trained): its mean, log-probability 0
                        x, _ = ddim_step_mean_std(out, x, self.alpha_t[j], self.alpha_prev[j], eta=cfg.eta,
                                                  prediction_type=self.prediction_type)
                        lp = torch.zeros(x.shape[0])
                    x = x.float()
                    lat[sl, j + 1] = x.cpu()
                    lps[sl, j] = lp.float().cpu()
            images.append(self.decode(x))
            if bar is not None:
                bar.update(len(gens))
        return Rollouts(lat, lps, pidx, np.concatenate(images))


def _score(reward: Reward | None, name: str, images: np.ndarray, prompts: list[str]) -> np.ndarray | None:
    if reward is None:
        return None
    try:
        r = reward(images, prompts)
    except SafeT2IError:
        raise
    except Exception as exc:  # noqa: BLE001 - a reward's failure names the reward
        raise TrainError(f"the {name} reward {describe_reward(reward)} failed: "
                         f"{type(exc).__name__}: {exc}") from exc
    r = np.asarray(r, np.float64).reshape(-1) if r is not None else None
    if r is None or r.size != len(prompts):
        raise TrainError(f"the {name} reward {describe_reward(reward)} returned "
                         f"{'nothing' if r is None else r.size} values for {len(prompts)} images")
    if not np.isfinite(r).all():
        raise TrainError(f"the {name} reward {describe_reward(reward)} returned non-finite values")
    return r


def score_rollouts(rollouts: Rollouts, prompts: Sequence[str], safety_reward: Reward | None,
                   alignment_reward: Reward | None, weights: Sequence[float], batch: int = 64) -> Rollouts:
    """Fill ``rollouts``' rewards (in chunks of ``batch`` images): each reward callable on the
    images and their prompts, and :func:`combined_reward` of them."""
    texts = [prompts[i] for i in rollouts.prompt_index]
    parts: dict[str, list[np.ndarray]] = {"safety": [], "alignment": []}
    for start in range(0, len(texts), batch):
        imgs, ps = rollouts.images[start:start + batch], texts[start:start + batch]
        for name, fn in (("safety", safety_reward), ("alignment", alignment_reward)):
            r = _score(fn, name, imgs, ps)
            if r is not None:
                parts[name].append(r)
    rollouts.safety = np.concatenate(parts["safety"]) if parts["safety"] else None
    rollouts.alignment = np.concatenate(parts["alignment"]) if parts["alignment"] else None
    rollouts.reward = combined_reward(rollouts.safety, rollouts.alignment, tuple(weights))
    return rollouts


def ppo_update(policy: DiffusionPolicy, rollouts: Rollouts, advantages, optimizer: Any, params: list,
               *, epoch: int, inner_epoch: int = 0, bar: Any = None, scaler: Any = None) -> dict[str, float]:
    """One inner epoch of PPO over ``rollouts``' stored transitions: trajectories in a random
    order (seeded by (seed, epoch, inner epoch)), per trajectory a random subset of
    ``trained_timesteps()`` of the stochastic steps, one optimiser step per minibatch of
    ``train_batch_size`` trajectories with the gradient of the minibatch's mean PPO loss
    (accumulated in micro-batches of ``sample_batch_size``), norm clipped. ``scaler``: a
    ``torch.amp.GradScaler`` (fp16 on CUDA), else None. Returns the mean pre-step loss,
    ``approx_kl``, ``clip_fraction`` and the number of optimiser steps."""
    torch = _torch()
    from .common import step_generator  # noqa: PLC0415

    cfg = policy.config
    n = rollouts.latents.shape[0]
    g = step_generator(cfg.seed, f"ppo|{inner_epoch}", epoch)
    order = torch.randperm(n, generator=g)
    n_t = cfg.trained_timesteps(len(policy.trainable))
    trainable = policy.trainable
    steps = torch.stack([trainable[torch.randperm(len(trainable), generator=g)[:n_t]] for _ in range(n)])
    adv = torch.as_tensor(np.asarray(advantages, np.float64), dtype=torch.float32)
    losses, kls, clips = [], [], []
    for mb_start in range(0, n, cfg.train_batch_size):
        mb = order[mb_start:mb_start + cfg.train_batch_size]
        total = len(mb) * n_t
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for mi in range(0, len(mb), cfg.sample_batch_size):
            micro = mb[mi:mi + cfg.sample_batch_size]
            for jj in range(n_t):
                j = steps[micro, jj]
                x_t = rollouts.latents[micro, j].to(policy.device)
                x_p = rollouts.latents[micro, j + 1].to(policy.device)
                lp = policy.logprob(x_t, x_p, j, rollouts.prompt_index[micro.numpy()])
                old = rollouts.logprobs[micro, j].to(policy.device)
                loss = ppo_clip_loss(lp, old, adv[micro].to(policy.device), cfg.clip_range)
                loss = loss * (len(micro) / total)
                (scaler.scale(loss) if scaler is not None else loss).backward()
                loss_sum += float(loss.detach())
                d = ppo_diagnostics(lp, old, cfg.clip_range)
                kls.append((d["approx_kl"], len(micro)))
                clips.append((d["clip_fraction"], len(micro)))
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        losses.append(loss_sum)
        if bar is not None:
            bar.update(len(mb))
    w = sum(k for _, k in kls)
    return {"loss": float(np.mean(losses)), "approx_kl": sum(v * k for v, k in kls) / w,
            "clip_fraction": sum(v * k for v, k in clips) / w, "updates": len(losses)}


def _stats(prefix: str, r: np.ndarray | None) -> dict[str, float]:
    if r is None:
        return {}
    return {f"{prefix}_mean": float(np.mean(r)), f"{prefix}_std": float(np.std(r)),
            f"{prefix}_min": float(np.min(r)), f"{prefix}_max": float(np.max(r))}


def reward_stats(rollouts: Rollouts) -> dict[str, float]:
    """Mean, standard deviation, min and max of the combined reward and of each part."""
    return {**_stats("reward", rollouts.reward), **_stats("safety", rollouts.safety),
            **_stats("alignment", rollouts.alignment)}


# =========================================================================== the trainer


def _base_identity(pipe: Any, base_model: str | os.PathLike | None) -> tuple[str, str]:
    """(base model name, sha256): of the model path when given (:func:`base_sha256`), else of the
    pipeline's weights (the bench's :func:`pipeline_identity` digest)."""
    from .common import base_sha256  # noqa: PLC0415

    if base_model is not None and Path(base_model).exists():
        return str(base_model), base_sha256(base_model)
    from ..bench.harness import pipeline_identity  # noqa: PLC0415

    ident = pipeline_identity(pipe)
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return str(base_model or ident.get("name_or_path") or type(pipe).__name__), digest


def train_shielddiff(pipe: Any, config: ShieldDiffConfig, *, safety_reward: Reward | None,
                     alignment_reward: Reward | None, out: str | os.PathLike, progress: bool = True,
                     resume: bool = True, log_path: str | os.PathLike | None = None,
                     base_model: str | os.PathLike | None = None, formats: Sequence[str] = ("kohya",),
                     overwrite: bool = False) -> Path:
    """Train a ShieldDiff-style safety LoRA on ``pipe``'s UNet (module docstring) and save it to
    ``out`` (kohya; ``formats=("kohya", "peft")`` also writes ``<out stem>.peft.safetensors``).

    Each epoch samples ``K`` trajectories per prompt with the current LoRA, scores them with
    ``safety_reward`` and ``alignment_reward`` (either may be None when its weight is 0), and runs
    the PPO update. The run checkpoints after every epoch into ``<out>.partial/`` (LoRA tensors,
    optimiser state, log) and, with ``resume``, continues from there (same settings, prompts,
    base model and rewards only). The JSON log (``log_path``, default ``<out>.log.json``) has one
    record per epoch (PPO loss, reward statistics, approx. KL, clip fraction, seconds) and the
    rewards before (epoch 0) and after (``evaluate_final``) training. ``base_model``: the base
    model's path, named (with its sha256) in the file's metadata. Returns ``out``. The pipeline's
    weights are frozen (``requires_grad`` off) and left without the LoRA."""
    torch = _torch()
    from tqdm.auto import tqdm  # noqa: PLC0415

    from ..diffusers_adapter import host_arch  # noqa: PLC0415
    from .common import (  # noqa: PLC0415
        Checkpoint,
        LossLog,
        autocast,
        config_hash,
        load_optimizer,
        optimizer_tensors,
        output_paths,
        resolve_device,
        run_steps,
    )
    from .lora_layers import inject_lora, lora_metadata, save_lora_files  # noqa: PLC0415

    if not isinstance(config, ShieldDiffConfig):
        raise TrainError(f"config must be a ShieldDiffConfig, not {type(config).__name__}")
    config.check()
    w_s, w_a = config.reward_weights
    for name, fn, wt in (("safety", safety_reward, w_s), ("alignment", alignment_reward, w_a)):
        if fn is None and wt > 0:
            raise TrainError(f"the {name} reward has weight {wt:g} but no {name} reward was given")
        if fn is not None and not callable(fn):
            raise TrainError(f"the {name} reward must be callable (images, prompts) -> rewards")
    paths = output_paths(out, list(formats), overwrite, log_path)
    out = paths[formats[0]]
    log_path = Path(log_path) if log_path is not None else out.with_suffix(".log.json")
    device = resolve_device(config.device)
    autocast(device, config.mixed_precision)      # fp16 on CPU: refused here, before any work
    base_name, base_digest = _base_identity(pipe, base_model)
    rewards_desc = {"safety": describe_reward(safety_reward if w_s > 0 else None),
                    "alignment": describe_reward(alignment_reward if w_a > 0 else None)}
    data_sha256 = hashlib.sha256(json.dumps({"prompts": list(config.prompts)}).encode()).hexdigest()
    hyper = config.hyper()
    hashed = {k: v for k, v in hyper.items() if k not in ("epochs", "evaluate_final")}
    run_hash = config_hash({"method": METHOD, "hyper": hashed, "prompts": list(config.prompts),
                            "base": base_digest, "rewards": rewards_desc})
    ckpt = Checkpoint(out.with_name(out.name + ".partial"), run_hash)
    from .dpo import prepare_pipeline  # noqa: PLC0415

    # the caller's pipeline comes back as it was (device, modes, requires_grad, checkpointing)
    restore = prepare_pipeline(pipe, device, config.gradient_checkpointing)
    try:
        pipe.unet.eval()
        policy = DiffusionPolicy(pipe, config, device)
        lora = inject_lora(pipe.unet, component="unet", targets=config.targets, rank=config.rank,
                           alpha=config.alpha, seed=config.seed, init="gaussian")
    except BaseException:
        restore()
        raise
    safety_fn = safety_reward if w_s > 0 else None
    align_fn = alignment_reward if w_a > 0 else None
    n_traj = len(config.prompts) * config.samples_per_prompt
    try:
        params = lora.parameters()
        opt = torch.optim.AdamW(params, lr=config.lr, betas=config.adam_betas,
                                weight_decay=config.weight_decay, eps=config.adam_eps)
        # fp16 (CUDA only) needs loss scaling; its scale is not checkpointed (a resumed fp16 run
        # starts from a fresh scale, and CUDA runs are not bit-reproducible anyway)
        scaler = torch.amp.GradScaler("cuda") if config.mixed_precision == "fp16" else None
        log, start, seconds, before = LossLog(), 0, 0.0, None
        state = ckpt.load("cpu") if resume else None
        if state is not None:
            tensors, st = state
            lora.load_tensors({k[5:]: v for k, v in tensors.items() if k.startswith("lora.")})
            load_optimizer(opt, tensors)
            start, log, seconds = int(st["epoch"]), LossLog(st["log"]), float(st["seconds"])
            before = st["before"]
        about = {"method": METHOD, "config": hyper, "prompts": list(config.prompts), "rewards": rewards_desc,
                 "run_hash": run_hash, "base_model": base_name, "base_sha256": base_digest, "device": device,
                 "torch_threads": torch.get_num_threads()}
        t0 = time.perf_counter()
        box: dict[str, Any] = {"before": before}

        def epoch_fn(epoch: int) -> dict[str, float]:
            te = time.perf_counter()
            bar = tqdm(total=n_traj * (1 + config.inner_epochs), desc=f"epoch {epoch + 1}/{config.epochs}",
                       unit="traj", leave=False, disable=not progress, dynamic_ncols=True)
            try:
                bar.set_postfix_str("sampling", refresh=False)
                ro = policy.sample(range(n_traj), epoch, bar=bar)
                score_rollouts(ro, config.prompts, safety_fn, align_fn, config.reward_weights)
                stats = reward_stats(ro)
                if epoch == 0:
                    box["before"] = stats
                ts = time.perf_counter()
                adv = per_prompt_advantages(ro.reward, ro.prompt_index, config.advantage_eps)
                adv = np.clip(adv, -config.adv_clip_max, config.adv_clip_max)
                bar.set_postfix_str(f"reward {stats['reward_mean']:.4g}", refresh=False)
                ups = [ppo_update(policy, ro, adv, opt, params, epoch=epoch, inner_epoch=ie, bar=bar,
                                  scaler=scaler)
                       for ie in range(config.inner_epochs)]
            finally:
                bar.close()
            terms = {"loss": float(np.mean([u["loss"] for u in ups])),
                     "approx_kl": float(np.mean([u["approx_kl"] for u in ups])),
                     "clip_fraction": float(np.mean([u["clip_fraction"] for u in ups])),
                     "updates": float(sum(u["updates"] for u in ups)), **stats,
                     "sample_seconds": ts - te, "train_seconds": time.perf_counter() - ts}
            if progress:
                tqdm.write(f"epoch {epoch + 1}/{config.epochs}: reward {stats['reward_mean']:.4f} "
                           + " ".join(f"{k} {stats[k + '_mean']:.4f}" for k in ("safety", "alignment")
                                      if k + "_mean" in stats)
                           + f"  loss {terms['loss']:.3g}  kl {terms['approx_kl']:.2g}"
                           f"  clipped {terms['clip_fraction']:.2f}")
            return terms

        def save(done: int) -> None:
            tensors = {f"lora.{k}": v for k, v in lora.tensors().items()}
            tensors.update(optimizer_tensors(opt))
            ckpt.save(tensors, {"epoch": done, "log": log.records, "before": box["before"],
                                "seconds": seconds + time.perf_counter() - t0})
            log.write(log_path, {**about, "finished": False, "before": box["before"]})

        run_steps(config.epochs, epoch_fn, start=start, log=log, save=save, desc="safet2i train shielddiff",
                  progress=progress, checkpoint_every=1)
        seconds += time.perf_counter() - t0
        after = None
        if config.evaluate_final:
            te = time.perf_counter()
            ro = policy.sample(range(n_traj), 0)
            score_rollouts(ro, config.prompts, safety_fn, align_fn, config.reward_weights)
            after = reward_stats(ro)
            after["seconds"] = time.perf_counter() - te
        meta = lora_metadata(method=METHOD, base_model=base_name, base_sha256=base_digest, hyper=hyper,
                             data_sha256=data_sha256, arch=host_arch(pipe) or "custom",
                             extra={"safet2i_prompts": json.dumps(list(config.prompts)),
                                    "safet2i_rewards": json.dumps(rewards_desc, sort_keys=True, default=str)})
        save_lora_files(lora, paths, metadata=meta, overwrite=overwrite)
        epochs_run = [r for r in log.records if "seconds" in r]
        log.write(log_path, {**about, "finished": True, "before": box["before"], "after": after,
                             "seconds": round(seconds, 2),
                             "seconds_per_epoch": (float(np.mean([r["seconds"] for r in epochs_run]))
                                                   if epochs_run else None),
                             "files": {fmt: str(p) for fmt, p in paths.items()}})
        ckpt.remove()
        return out
    finally:
        lora.remove()
        restore()
