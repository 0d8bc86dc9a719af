"""Unsafe-region masks and the censoring actions.

Images here are ``float32 [H, W, 3]`` in 0..1; every function returns a new array and
never writes into its input.

Actions:

``pass``         leave the image as it is (flag and report only)
``blur``         Gaussian-blur the unsafe regions
``pixelate``     replace the unsafe regions with coarse blocks
``fill``         paint the unsafe regions with a solid colour
``black``        black out the whole image
``placeholder``  replace the whole image with a neutral "withheld" card
``block``        raise :class:`~safet2i.errors.UnsafeContentError` (nothing leaves)

A flagged whole-image classifier score (no box) makes the mask cover the whole image.

Minimum strengths. A blur or pixelation too weak to hide a region is never applied: the
strength used is at least a fraction of each masked region's size, whatever was asked
(:func:`min_strength`). Measured with NudeNet on benign faces (skimage astronaut, face
region 120x117 px; matplotlib's Grace Hopper, 226x244 px) under ``face-only``: the face stops
being detected at a blur sigma of about 1/15 to 1/23 of the region's shorter side, and at
a pixelate block of 6 px (20 to 38 blocks across). The minimums keep a margin of about two
over the worst of these: ``sigma >= shorter side / 8`` (:data:`BLUR_MIN_FRACTION`) and
``block >= shorter side / 10`` (:data:`PIXELATE_MAX_BLOCKS` blocks across at most). The
automatic strengths (1/24 of the image's longer side) are usually above them already. The
pipeline also re-checks censored images and escalates to ``fill`` / ``placeholder`` where a
region still trips a model (``SafetyFilter.censor_checked``).
"""

from __future__ import annotations

import numpy as np

from .cost import ImageVerdict
from .detectors import _cv2
from .policy import Policy

ACTIONS = ("pass", "blur", "pixelate", "fill", "black", "placeholder", "block")
REGION_ACTIONS = ("blur", "pixelate", "fill")

#: The blur sigma is at least this fraction of each masked region's shorter side.
BLUR_MIN_FRACTION = 1.0 / 8.0
#: A pixelated region has at most this many blocks across its shorter side.
PIXELATE_MAX_BLOCKS = 10
#: Floor of both automatic and minimum strengths, in pixels.
MIN_PIXELS = 4.0


def region_sides(mask: np.ndarray) -> list[tuple[int, int]]:
    """``(width, height)`` of the bounding box of each connected region of the mask's fully
    covered core (feathering only adds a soft rim outside it)."""
    cv2 = _cv2()
    core = mask >= 0.999
    if not core.any():
        core = mask > 0
    if not core.any():
        return []
    n, _, stats, _ = cv2.connectedComponentsWithStats(core.astype(np.uint8), connectivity=8)
    return [(int(stats[i, cv2.CC_STAT_WIDTH]), int(stats[i, cv2.CC_STAT_HEIGHT])) for i in range(1, n)]


def min_strength(action: str, mask: np.ndarray) -> float:
    """The weakest ``blur`` sigma / ``pixelate`` block (px) allowed for ``mask``: the largest
    of the per-region minimums (``BLUR_MIN_FRACTION`` of, or ``1 / PIXELATE_MAX_BLOCKS`` of,
    each region's shorter side), and at least ``MIN_PIXELS``. 0 for other actions."""
    if action not in ("blur", "pixelate"):
        return 0.0
    sides = [min(w, h) for w, h in region_sides(mask)]
    worst = max(sides, default=0)
    frac = BLUR_MIN_FRACTION if action == "blur" else 1.0 / max(1, PIXELATE_MAX_BLOCKS)
    return max(MIN_PIXELS, worst * frac)


def effective_strength(action: str, mask: np.ndarray, strength: float | None, h: int, w: int) -> float | None:
    """The strength ``censor`` uses: the requested one (or the automatic 1/24 of the longer
    side, at least 4 px), raised to :func:`min_strength`. ``None`` for other actions."""
    if action not in ("blur", "pixelate"):
        return None
    floor = min_strength(action, mask)
    if action == "blur":
        return max(float(strength) if strength else max(MIN_PIXELS, max(h, w) / 24.0), floor)
    asked = int(strength) if strength and int(strength) >= 1 else max(int(MIN_PIXELS), max(h, w) // 24)
    return float(max(asked, int(np.ceil(floor))))


#: Feathers up to this many pixels use an exact elliptical dilation; larger ones the
#: linear-time equivalent (distance transform + downscaled Gaussian).
FEATHER_EXACT_MAX = 16.0


def unsafe_mask(verdict: ImageVerdict, policy: Policy, feather: float = 0.0) -> np.ndarray:
    """``float32 [H, W]`` in 0..1: 1 on the flagged regions (expanded boxes, rectangles or
    ellipses), softened by a Gaussian of ``feather`` pixels. Feathering only grows the
    mask outwards: every flagged pixel stays fully covered."""
    cv2 = _cv2()
    h, w = verdict.height, verdict.width
    mask = np.zeros((h, w), np.float32)
    for f in verdict.flagged:
        box = f.detection.box
        if box is None:
            mask[:] = 1.0
            break
        x, y, bw, bh = box
        ex, ey = bw * policy.expand, bh * policy.expand
        x0, y0 = max(0, int(np.floor(x - ex))), max(0, int(np.floor(y - ey)))
        x1, y1 = min(w, int(np.ceil(x + bw + ex))), min(h, int(np.ceil(y + bh + ey)))
        if x1 <= x0 or y1 <= y0:
            # Degenerate box (zero size after clipping): cover at least its pixel.
            x0, y0 = min(max(0, int(x)), w - 1), min(max(0, int(y)), h - 1)
            x1, y1 = x0 + 1, y0 + 1
        if policy.shape == "ellipse":
            cx, cy = (x0 + x1 - 1) / 2.0, (y0 + y1 - 1) / 2.0
            # The ellipse circumscribing the box, so the box itself stays covered.
            rx, ry = max((x1 - x0) / np.sqrt(2.0), 0.5), max((y1 - y0) / np.sqrt(2.0), 0.5)
            ex0, ex1 = max(0, int(cx - rx)), min(w, int(np.ceil(cx + rx)) + 1)
            ey0, ey1 = max(0, int(cy - ry)), min(h, int(np.ceil(cy + ry)) + 1)
            yy, xx = np.ogrid[ey0:ey1, ex0:ex1]
            inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
            mask[ey0:ey1, ex0:ex1] = np.maximum(mask[ey0:ey1, ex0:ex1], inside.astype(np.float32))
        else:
            mask[y0:y1, x0:x1] = 1.0
    if feather > 0 and mask.any() and not mask.all():
        # Grow by 2 sigma, then blur: the soft edge lies outside the hard mask. A feather
        # beyond the image's size changes nothing more, so it is capped there.
        feather = min(float(feather), float(max(h, w)))
        if feather <= FEATHER_EXACT_MAX:
            k = 2 * int(np.ceil(2 * feather)) + 1
            grown = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
            soft = cv2.GaussianBlur(grown, (0, 0), sigmaX=feather, borderType=cv2.BORDER_REPLICATE)
        else:
            # Large feathers: the same disk dilation from a Euclidean distance transform and the
            # same Gaussian on a downscaled mask, in time linear in the pixels (an elliptical
            # kernel of 4k x 4k pixels took minutes).
            dist = cv2.distanceTransform((mask < 0.5).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
            grown = (dist <= 2 * feather).astype(np.float32)
            soft = blurred(grown, feather)
        mask = np.clip(np.maximum(mask, soft), 0.0, 1.0).astype(np.float32)
    return mask


def blurred(img: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """A strongly blurred copy: downscale, blur, upscale, so large sigmas stay fast."""
    cv2 = _cv2()
    h, w = img.shape[:2]
    sigma = float(sigma) if sigma else max(4.0, max(h, w) / 24.0)
    scale = min(1.0, 4.0 / sigma)
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    small = cv2.resize(img, (sw, sh), interpolation=cv2.INTER_AREA) if scale < 1 else img.copy()
    small = cv2.GaussianBlur(small, (0, 0), sigmaX=sigma * scale, borderType=cv2.BORDER_REFLECT)
    if small.ndim == 2:
        small = small[:, :, None]
    out = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR) if scale < 1 else small
    return out.reshape(img.shape).astype(np.float32)


def pixelated(img: np.ndarray, block: int | None = None) -> np.ndarray:
    """Coarse blocks of ``block`` pixels (default: 1/24 of the longer side)."""
    cv2 = _cv2()
    h, w = img.shape[:2]
    block = int(block) if block else max(4, max(h, w) // 24)
    sw, sh = max(1, w // block), max(1, h // block)
    small = cv2.resize(img, (sw, sh), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST).reshape(img.shape).astype(np.float32)


def placeholder(h: int, w: int) -> np.ndarray:
    """A neutral grey card with diagonal stripes: obviously withheld, never black-as-error."""
    yy, xx = np.mgrid[0:h, 0:w]
    period = max(8, max(h, w) // 16)
    stripes = (((xx + yy) // max(1, period // 2)) % 2).astype(np.float32)
    card = 0.55 + 0.08 * stripes
    return np.repeat(card[:, :, None], 3, axis=2).astype(np.float32)


def censor(
    img: np.ndarray,
    mask: np.ndarray,
    action: str,
    *,
    strength: float | None = None,
    colour: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """Apply ``action`` to ``img`` where ``mask`` is set; a new array is returned.

    ``strength``: Gaussian sigma in pixels for ``blur``, block size for ``pixelate``
    (``None`` or 0: automatic); never below :func:`min_strength` for the mask's regions.
    """
    if action not in ACTIONS:
        raise ValueError(f"Unknown action {action!r}; use one of {', '.join(ACTIONS)}.")
    if action == "block":
        raise ValueError("'block' is not an image operation; the pipeline raises instead.")
    h, w = img.shape[:2]
    if action == "pass" or not mask.any():
        return img.copy()
    if action == "black":
        return np.zeros_like(img, dtype=np.float32)
    if action == "placeholder":
        return placeholder(h, w)
    if strength is not None and not (np.isfinite(float(strength)) and float(strength) >= 0):
        raise ValueError(f"Censoring strength must be a finite number >= 0, got {strength!r}.")
    if action == "blur":
        # Blur only the mask's bounding region (plus the kernel's reach): fast on huge images.
        sigma = effective_strength("blur", mask, strength, h, w)
        ys, xs = np.nonzero(mask)
        pad = int(3 * sigma)
        y0, y1 = max(0, ys.min() - pad), min(h, ys.max() + 1 + pad)
        x0, x1 = max(0, xs.min() - pad), min(w, xs.max() + 1 + pad)
        repl = img.astype(np.float32, copy=True)
        repl[y0:y1, x0:x1] = blurred(repl[y0:y1, x0:x1], sigma)
    elif action == "pixelate":
        repl = pixelated(img.astype(np.float32), int(effective_strength("pixelate", mask, strength, h, w)))
    else:  # fill
        repl = np.empty_like(img, dtype=np.float32)
        repl[:] = np.asarray(colour, np.float32)[: img.shape[2]]
    m = mask[:, :, None].astype(np.float32)
    return (img.astype(np.float32) * (1.0 - m) + repl * m).astype(np.float32)
