"""The output filter: models -> verdicts -> masks -> censored images.

Hosts call :meth:`SafetyFilter.check` (verdicts only) or :meth:`SafetyFilter.run`
(verdicts, masks and censored copies). Both take a whole batch and check every image.
Any failure raises: there is no path on which an image leaves unchecked.

Input types (:func:`safet2i.images.to_float_rgb`). ``run`` judges exactly the pixels it returns:

* ``uint8`` (0..255), ``uint16`` (0..65535), ``bool`` (0/1) are scaled to 0..1;
* floating point (``float16``/``bfloat16``/``float32``/``float64``) is read as 0..1; values
  outside are **clipped** to [0, 1] and the clipped pixels are both judged and returned
  (``check`` clips the same way); NaN / inf are refused;
* every other dtype (signed integers, ``uint32``/``uint64``, complex, object) is refused
  with :class:`ImageInputError` naming it, as ``check`` does: an ``int16`` array of 0..255
  would otherwise be read as 0..1 floats (a white, "safe" image) and returned unchanged.

Censoring is re-checked (:meth:`SafetyFilter.censor_checked`): a region-censored image that
still trips a model is escalated to ``fill`` of the flagged regions, then to ``placeholder``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ImageInputError, ModelLoadError, SafeT2IError, UnsafeContentError
from ..images import batch_to_float, batch_to_uint8, float_to_uint8
from ..images import to_float_rgb as checked_float_rgb
from .censor import ACTIONS, REGION_ACTIONS, censor, placeholder, unsafe_mask
from .cost import ImageVerdict, judge
from .detectors import OnnxModel, load_model
from .policy import Policy, check_policy_labels, get_policy

DEFAULT_MODELS = ("nudenet",)


@dataclass
class FilterOutput:
    """Result of :meth:`SafetyFilter.run` for a batch of B images."""

    images: list[np.ndarray]          # float32 [H, W, 3] each, censored per the action
    masks: list[np.ndarray]           # float32 [H, W] each, 1 = censored (flagged) region
    verdicts: list[ImageVerdict]

    @property
    def costs(self) -> list[float]:
        return [v.cost for v in self.verdicts]

    @property
    def is_safe(self) -> list[bool]:
        return [not v.unsafe for v in self.verdicts]


class SafetyFilter:
    """Models + policy + action.

    ``models``: built-in names (``nudenet``, ``nudenet-reference``, ``opennsfw``), sidecar
    paths, or already loaded :class:`OnnxModel` objects. Models are shared per process.
    """

    def __init__(
        self,
        models=DEFAULT_MODELS,
        policy: Policy | str = "strict-5",
        action: str = "blur",
        *,
        feather: float = 0.0,
        strength: float | None = None,
        colour: tuple[float, float, float] = (0.0, 0.0, 0.0),
        providers=None,
        batch_size: int = 16,
    ):
        if action not in ACTIONS:
            raise ValueError(f"Unknown action {action!r}; use one of {', '.join(ACTIONS)}.")
        if isinstance(models, (str, OnnxModel)):
            models = [models]
        if not models:
            raise SafeT2IError("A safety filter needs at least one model.")
        self.models: list[OnnxModel] = [
            m if isinstance(m, OnnxModel) else load_model(m, providers, batch_size) for m in models
        ]
        self.policy = get_policy(policy) if isinstance(policy, str) else policy
        self.action = action
        self.feather = _finite("feather", feather, 0.0)
        self.strength = None if strength is None else (_finite("strength", strength, 0.0) or None)
        try:
            self.colour = tuple(float(c) for c in colour)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"Fill colour must be three numbers in [0, 1], got {colour!r}.") from exc
        if len(self.colour) != 3 or not all(np.isfinite(c) and 0.0 <= c <= 1.0 for c in self.colour):
            raise ValueError(f"Fill colour must be three numbers in [0, 1], got {colour!r}.")
        self._check_labels()

    def _check_labels(self) -> None:
        """Policy meets models: a threshold label no model emits, or a policy under which
        nothing can be flagged, is a :class:`PolicyError`; a sidecar threshold for a label
        its model does not have is a :class:`ModelLoadError`."""
        for m in self.models:
            bad = sorted(set(m.spec.thresholds) - set(m.labels))
            if bad:
                raise ModelLoadError(
                    f"Sidecar {m.spec.sidecar}: threshold label(s) {', '.join(map(repr, bad))} are not "
                    f"labels of {m.name} ({', '.join(m.labels)}); such a threshold would never apply."
                )
        emitted = {m.name: (list(m.labels), dict(m.spec.thresholds)) for m in self.models}
        check_policy_labels(self.policy, emitted)

    # ------------------------------------------------------------------ verdicts
    def check(self, images) -> list[ImageVerdict]:
        """Verdicts for a batch (``[B,H,W,C]`` array/tensor or list of images)."""
        u8 = batch_to_uint8(images)
        return self.check_uint8(u8)

    def check_uint8(self, u8: list[np.ndarray]) -> list[ImageVerdict]:
        if not u8:
            return []
        per_image: list[list] = [[] for _ in u8]
        defaults = {}
        for model in self.models:
            found = model.detect(u8)
            if len(found) != len(u8):
                raise SafeT2IError(f"{model.name} returned {len(found)} results for {len(u8)} images.")
            defaults[model.name] = model.spec.thresholds
            for i, dets in enumerate(found):
                per_image[i].extend(dets)
        return [judge(i, img.shape, dets, self.policy, defaults) for i, (img, dets) in enumerate(zip(u8, per_image))]

    # ------------------------------------------------------------------ censoring
    def mask(self, verdict: ImageVerdict) -> np.ndarray:
        return unsafe_mask(verdict, self.policy, self.feather)

    def censor_one(self, img: np.ndarray, verdict: ImageVerdict, mask: np.ndarray | None = None) -> np.ndarray:
        """Censor one float32 image per the action (a copy; the input is never written).
        Not re-checked: prefer :meth:`censor_checked`."""
        if mask is None:
            mask = self.mask(verdict)
        if not verdict.unsafe or self.action == "pass":
            return img.astype(np.float32, copy=True)
        if not mask.any():  # fail closed: unsafe but nothing to mask -> whole image
            mask = np.ones(mask.shape, np.float32)
        return censor(img, mask, self.action, strength=self.strength, colour=self.colour)

    def censor_checked(self, images: list[np.ndarray], verdicts: list[ImageVerdict]) -> list[np.ndarray]:
        """Censor ``images`` (``float32 [H,W,3]`` in 0..1, one per verdict) per the action,
        then re-run the models on the censored images in one batch. Where a censored image
        still trips a model, escalate: region actions -> ``fill`` of the flagged regions
        (the original and the re-check's), and if that still trips one -> ``placeholder``
        of the whole image; ``verdict.escalated`` records it. New arrays are returned; the
        inputs are never modified. With ``action="block"`` an unsafe verdict raises
        :class:`UnsafeContentError`."""
        return self._censor_checked(images, verdicts)[0]

    def censor_checked_with_masks(self, images: list[np.ndarray], verdicts: list[ImageVerdict]
                                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """:meth:`censor_checked`, also returning each image's mask as applied (after any
        escalation)."""
        return self._censor_checked(images, verdicts)

    def _censor_checked(self, images, verdicts, masks=None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if len(images) != len(verdicts):
            raise SafeT2IError(f"censor_checked got {len(images)} images for {len(verdicts)} verdicts.")
        self.raise_if_blocked(verdicts)
        imgs = [checked_float_rgb(i) for i in images]
        for img, v in zip(imgs, verdicts):
            if img.shape[:2] != (v.height, v.width):
                raise SafeT2IError(
                    f"Image {v.index} is {img.shape[1]}x{img.shape[0]} but its verdict is for "
                    f"{v.width}x{v.height}."
                )
        masks = [self.mask(v) for v in verdicts] if masks is None else list(masks)
        for i, v in enumerate(verdicts):
            v.escalated = None
            if v.unsafe and not masks[i].any():    # unsafe with nothing to mask: the whole image
                masks[i] = np.ones(masks[i].shape, np.float32)
        out = [self.censor_one(img, v, m) for img, v, m in zip(imgs, verdicts, masks)]
        if self.action not in REGION_ACTIONS:
            # pass: flagged, not censored (report only); black / placeholder: no content left.
            return out, masks
        still = self._recheck(out, [i for i, v in enumerate(verdicts) if v.unsafe])
        for i, again in still.items():
            grown = np.maximum(masks[i], unsafe_mask(again, self.policy, self.feather))
            masks[i] = grown
            out[i] = censor(imgs[i], grown, "fill", colour=self.colour)
            verdicts[i].escalated = "fill"
        for i in self._recheck(out, list(still)):
            h, w = imgs[i].shape[:2]
            masks[i] = np.ones((h, w), np.float32)
            out[i] = placeholder(h, w)
            verdicts[i].escalated = "placeholder"
        return out, masks

    def _recheck(self, images: list[np.ndarray], which: list[int]) -> dict[int, ImageVerdict]:
        """Positions of ``which`` whose image (as it will leave, quantised to uint8) is still
        unsafe, with the re-check's verdict. One batched pass."""
        if not which:
            return {}
        again = self.check_uint8([np.ascontiguousarray(float_to_uint8(images[i])) for i in which])
        return {i: v for i, v in zip(which, again) if v.unsafe}

    def run(self, images) -> FilterOutput:
        """Check and censor a batch (censoring re-checked, see :meth:`censor_checked`). With
        ``action="block"`` any unsafe image raises :class:`UnsafeContentError` and no image
        is returned."""
        batch = self._float_batch(images)
        verdicts = self.check_uint8(batch_to_uint8(batch))
        self.raise_if_blocked(verdicts)
        out, masks = self._censor_checked(batch, verdicts)
        return FilterOutput(out, masks, verdicts)

    def raise_if_blocked(self, verdicts: list[ImageVerdict]) -> None:
        if self.action == "block":
            bad = [v.index for v in verdicts if v.unsafe]
            if bad:
                raise UnsafeContentError(bad, [verdicts[i].to_dict() for i in bad])

    @staticmethod
    def _float_batch(images) -> list[np.ndarray]:
        """A batch as a list of float32 ``[H,W,3]`` in [0, 1] (:func:`safet2i.images.to_float_rgb`)."""
        return batch_to_float(images)

    def describe(self) -> dict:
        return {
            "models": [m.describe() for m in self.models],
            "policy": self.policy.to_dict(),
            "action": self.action,
            "feather": self.feather,
        }


def _finite(name: str, value, low: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a number, got {value!r}.") from exc
    if not np.isfinite(v) or v < low:
        raise ValueError(f"{name} must be a finite number >= {low:g}, got {value!r}.")
    return v
