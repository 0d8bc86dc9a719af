"""The output filter: models -> verdicts -> masks -> censored images.

Hosts call :meth:`SafetyFilter.check` (verdicts only) or :meth:`SafetyFilter.run`
(verdicts, masks and censored copies). Both take a whole batch and check every image.
Any failure raises: there is no path on which an image leaves unchecked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ImageInputError, SafeT2IError, UnsafeContentError
from ..images import batch_to_uint8, to_float_rgb, to_numpy
from .censor import ACTIONS, censor, unsafe_mask
from .cost import ImageVerdict, judge
from .detectors import OnnxModel, load_model
from .policy import Policy, get_policy

DEFAULT_MODELS = ("nudenet",)


@dataclass
class FilterOutput:
    """Result of :meth:`SafetyFilter.run` for a batch of B images."""

    images: list[np.ndarray]          # float32 [H, W, 3] each, censored per the action
    masks: list[np.ndarray]           # float32 [H, W] each, 1 = unsafe region
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
        self.feather = float(feather)
        self.strength = strength
        self.colour = tuple(float(c) for c in colour)

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
        """Censor one float32 image per the action (a copy; the input is never written)."""
        if mask is None:
            mask = self.mask(verdict)
        if not verdict.unsafe or self.action == "pass":
            return img.astype(np.float32, copy=True)
        if not mask.any():  # fail closed: unsafe but nothing to mask -> whole image
            mask = np.ones(mask.shape, np.float32)
        return censor(img, mask, self.action, strength=self.strength, colour=self.colour)

    def run(self, images) -> FilterOutput:
        """Check and censor a batch. With ``action="block"`` any unsafe image raises
        :class:`UnsafeContentError` and no image is returned."""
        batch = self._float_batch(images)
        verdicts = self.check_uint8(batch_to_uint8(batch))
        self.raise_if_blocked(verdicts)
        masks = [self.mask(v) for v in verdicts]
        out = [self.censor_one(img, v, m) for img, v, m in zip(batch, verdicts, masks)]
        return FilterOutput(out, masks, verdicts)

    def raise_if_blocked(self, verdicts: list[ImageVerdict]) -> None:
        if self.action == "block":
            bad = [v.index for v in verdicts if v.unsafe]
            if bad:
                raise UnsafeContentError(bad, [verdicts[i].to_dict() for i in bad])

    @staticmethod
    def _float_batch(images) -> list[np.ndarray]:
        """A batch as a list of float32 ``[H,W,3]`` views/copies in 0..1."""
        if isinstance(images, (list, tuple)):
            frames = [to_numpy(i) for i in images]
        else:
            arr = to_numpy(images)
            if arr.ndim == 3:
                arr = arr[None]
            if arr.ndim != 4:
                raise ImageInputError(f"Expected a batch [B, H, W, C], got shape {tuple(arr.shape)}.")
            frames = list(arr)
        return [to_float_rgb(f) for f in frames]

    def describe(self) -> dict:
        return {
            "models": [m.describe() for m in self.models],
            "policy": self.policy.to_dict(),
            "action": self.action,
            "feather": self.feather,
        }
