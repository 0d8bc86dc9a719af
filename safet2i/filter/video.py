"""Video: every frame of a clip through the output filter, with temporal propagation.

:func:`filter_frames` takes a clip (``[T, H, W, C]`` array or tensor, ``uint8`` or floats in
0..1 like :meth:`SafetyFilter.run`, or a list of equally sized frames) and a
:class:`~safet2i.filter.SafetyFilter`, and works in two passes over chunks of frames:

1. **Check.** Every frame is scored by the filter's models, a chunk at a time
   (:meth:`SafetyFilter.check_uint8`, one batched model call per chunk). Only the verdicts
   are kept.
2. **Censor.** Every region flagged in frame ``t`` (the boxes, or the whole frame for a
   classifier or cost-model flag, that :meth:`SafetyFilter.mask` turns into a mask) is also
   censored in frames ``t - window`` .. ``t + window``, at the same place (with the policy's
   ``expand``, ``shape`` and the filter's ``feather``), so a detection that drops out for a
   few frames does not make the censoring flicker. The frames of a chunk that have
   something to censor are then censored and re-checked exactly as :meth:`SafetyFilter.run`
   censors a batch (same actions, minimum strengths, escalation to ``fill`` /
   ``placeholder``; :meth:`SafetyFilter.censor_checked_with_masks`); a frame censored only because of
   a neighbour is re-checked too. The other frames leave as they were judged.

``window=0`` gives per-frame filtering, identical to :meth:`SafetyFilter.run` on the clip.
With ``action="block"`` one unsafe frame blocks the whole clip: :class:`UnsafeClipError`
(an :class:`~safet2i.errors.UnsafeContentError`) is raised after the check pass, before
anything is censored, and no frame is returned.

Fails closed like the rest of the filter: a model that cannot run raises, an empty clip, a
frame with NaN / inf, frames of different sizes or a shape that is not ``[T, H, W, C]``
raise :class:`~safet2i.errors.ImageInputError` naming the frame. The input is never
written. Memory: besides the input and the output (the censored clip and its masks),
only one chunk of frames (at most ``chunk_size`` frames and about 16 Mpx) is converted
at a time, plus a verdict per frame.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from ..errors import ImageInputError, UnsafeContentError
from ..images import batch_to_float, batch_to_uint8, float_to_uint8
from .cost import ImageVerdict
from .files import CENSOR_CHUNK_PIXELS

#: Default temporal window, in frames on each side: a region found in frame ``t`` is also
#: censored in frames ``t - 2`` .. ``t + 2`` (about 0.1 s at 24 fps).
DEFAULT_WINDOW = 2
#: Default number of frames checked and censored at once.
DEFAULT_CHUNK = 16
#: Frames listed by name in an error message before it says "... N in all".
_LISTED = 20


@dataclass
class VideoFilterOutput:
    """Result of :func:`filter_frames` for a clip of T frames."""

    #: ``[T, H, W, 3]``: ``uint8`` when the clip was ``uint8``, else ``float32`` in 0..1.
    images: np.ndarray
    #: ``float32 [T, H, W]``, 1 = censored (flagged here or within the window).
    masks: np.ndarray
    #: Each frame's own verdict (``index`` = frame number; ``escalated`` as censored).
    verdicts: list[ImageVerdict]
    #: Per-frame report: :meth:`ImageVerdict.to_dict` plus ``frame``, ``labels``,
    #: ``censored`` and ``propagated_from``.
    frames: list[dict]
    #: The clip verdict (``verdict``, ``cost``, ``unsafe_frames``, ``censored_frames``, ...).
    clip: dict

    @property
    def costs(self) -> list[float]:
        """Each frame's own safety cost."""
        return [v.cost for v in self.verdicts]

    @property
    def frame_is_safe(self) -> list[bool]:
        """Whether each frame, on its own, is safe."""
        return [not v.unsafe for v in self.verdicts]

    @property
    def is_safe(self) -> bool:
        """Whether every frame of the clip is safe."""
        return not any(v.unsafe for v in self.verdicts)

    def report(self) -> dict:
        return {"clip": self.clip, "frames": self.frames}


class UnsafeClipError(UnsafeContentError):
    """``action="block"`` and at least one unsafe frame: the whole clip is blocked.

    ``indices`` are the unsafe frames, ``report`` their verdicts (as for
    :class:`UnsafeContentError`); ``frames`` is the per-frame report of every frame and
    ``clip`` the clip verdict (``"verdict": "blocked"``)."""

    def __init__(self, indices: list[int], report: list[dict], frames: list[dict], clip: dict):
        super().__init__(indices, report)
        self.frames = frames
        self.clip = clip
        labels = ", ".join(clip.get("labels", []))
        self.args = (
            f"SafeT2I blocked the whole clip of {clip['frames']} frame(s): {len(self.indices)} unsafe "
            f"frame(s) {_listed(self.indices)}" + (f" ({labels})" if labels else "")
            + "; no frame was returned.",
        )


def _listed(indices: list[int]) -> str:
    if len(indices) <= _LISTED:
        return str(list(indices))
    return str(list(indices[:_LISTED]))[:-1] + f", ... {len(indices)} in all]"


# --------------------------------------------------------------------------- the clip


def _is_uint8(x) -> bool:
    dt = getattr(x, "dtype", None)
    return dt is not None and (dt == np.uint8 if isinstance(x, np.ndarray) else str(dt) == "torch.uint8")


def _frame_hw(x) -> tuple[int, int]:
    if hasattr(x, "shape"):
        s = tuple(x.shape)
        if len(s) not in (2, 3):
            raise ImageInputError(f"Frame 0 has shape {s}; a frame must be [H, W] or [H, W, C].")
        return int(s[0]), int(s[1])
    if hasattr(x, "height") and hasattr(x, "width"):        # a PIL image
        return int(x.height), int(x.width)
    return _frame_hw(np.asarray(x))


class _Clip:
    """The input clip, sliced a chunk at a time (never converted as a whole)."""

    def __init__(self, frames):
        if isinstance(frames, (list, tuple)):
            self.data = list(frames)
            self.n = len(self.data)
            if not self.n:
                raise ImageInputError("The clip is empty (0 frames); give at least one frame.")
            self.h, self.w = _frame_hw(self.data[0])
            self.uint8 = all(_is_uint8(f) for f in self.data)
            self.is_list = True
        else:
            if not hasattr(frames, "shape") or not hasattr(frames, "__getitem__"):
                frames = np.asarray(frames)
            shape = tuple(int(s) for s in frames.shape)
            if len(shape) != 4:
                raise ImageInputError(
                    f"A clip must be frames [T, H, W, C] (channels last), got shape {shape}; a single "
                    "image is a clip of shape [1, H, W, C]."
                )
            self.n, self.h, self.w, c = shape
            if self.n == 0:
                raise ImageInputError(f"The clip is empty (shape {shape}); give at least one frame.")
            if self.h < 1 or self.w < 1:
                raise ImageInputError(f"The clip's frames are empty (shape {shape}).")
            if not 1 <= c <= 4:
                raise ImageInputError(
                    f"Frames need 1 to 4 channels, last (shape [T, H, W, C]); got shape {shape}"
                    + (" (channels first? use [T, H, W, C])" if shape[1] in (1, 3, 4) else "") + "."
                )
            self.data = frames
            self.uint8 = _is_uint8(frames)
            self.is_list = False
        if self.h < 1 or self.w < 1:
            raise ImageInputError(f"Frame 0 is empty ({self.w}x{self.h}).")

    def chunks(self, chunk_size: int):
        step = max(1, min(chunk_size, CENSOR_CHUNK_PIXELS // (self.h * self.w)))
        for s in range(0, self.n, step):
            yield s, self.data[s:min(self.n, s + step)]


def _convert(fn, part, start: int) -> list[np.ndarray]:
    """``fn(part)``; an :class:`ImageInputError` is raised again naming the frame."""
    try:
        return fn(part)
    except ImageInputError as exc:
        for j in range(len(part)):
            try:
                fn(part[j:j + 1])
            except ImageInputError as one:
                raise ImageInputError(f"Frame {start + j}: {one}") from one
        raise ImageInputError(f"Frames {start}..{start + len(part) - 1}: {exc}") from exc


def _as_window(window) -> int:
    if isinstance(window, bool):
        raise ValueError(f"window must be a whole number of frames >= 0, got {window!r}.")
    try:
        w = float(window)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"window must be a whole number of frames >= 0, got {window!r}.") from exc
    if not np.isfinite(w) or w < 0 or w != int(w):
        raise ValueError(f"window must be a whole number of frames >= 0, got {window!r}.")
    return int(w)


# --------------------------------------------------------------------------- filtering


def filter_frames(
    frames,
    flt,
    *,
    window: int = DEFAULT_WINDOW,
    chunk_size: int = DEFAULT_CHUNK,
    progress=None,
) -> VideoFilterOutput:
    """Check every frame of ``frames`` with ``flt`` (a :class:`SafetyFilter`), propagate
    each flagged region to the ``window`` frames on either side, and censor per
    ``flt.action`` (module docstring).

    ``frames``: ``[T, H, W, C]`` NumPy array or torch tensor (``uint8``, ``uint16``, ``bool``
    or floats in 0..1, as :meth:`SafetyFilter.run` accepts), or a list of frames of one
    size. ``window``: frames on each side (0 = per frame only). ``chunk_size``: frames per
    model batch and per censoring step (fewer when frames are large: at most about 16 Mpx
    at a time). ``progress``: optional ``callable(n)``, called with the number of frames
    just done, once per chunk of each pass (``2 * T`` in all).

    Returns a :class:`VideoFilterOutput`; with ``action="block"`` and any unsafe frame,
    raises :class:`UnsafeClipError` and returns nothing.
    """
    window = _as_window(window)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a whole number >= 1, got {chunk_size!r}.")
    clip = _Clip(frames)
    tick = progress or (lambda n: None)

    # ---- pass 1: verdicts of every frame, a chunk at a time
    verdicts: list[ImageVerdict] = []
    for start, part in clip.chunks(int(chunk_size)):
        u8 = _convert(batch_to_uint8, part, start)
        for j, img in enumerate(u8):
            if img.shape[:2] != (clip.h, clip.w):
                raise ImageInputError(
                    f"Frame {start + j} is {img.shape[1]}x{img.shape[0]} but frame 0 is {clip.w}x{clip.h}; "
                    "all frames of a clip must have the same size."
                )
        found = flt.check_uint8(u8)
        del u8
        for j, v in enumerate(found):
            v.index = start + j
        verdicts.extend(found)
        tick(len(found))

    unsafe = [v.index for v in verdicts if v.unsafe]
    labels = sorted({f.detection.label for i in unsafe for f in verdicts[i].flagged})
    clip_cost = max(v.cost for v in verdicts)

    def frame_entry(t: int, sources: list[int], censored: bool) -> dict:
        v = verdicts[t]
        d = v.to_dict()
        d["frame"] = t
        d["labels"] = sorted({f.detection.label for f in v.flagged})
        d["censored"] = censored
        d["propagated_from"] = sources
        return d

    def neighbours(t: int) -> list[int]:
        """Unsafe frames other than ``t`` within the window."""
        if not window:
            return []
        lo, hi = bisect.bisect_left(unsafe, t - window), bisect.bisect_right(unsafe, t + window)
        return [u for u in unsafe[lo:hi] if u != t]

    if flt.action == "block" and unsafe:
        entries = [frame_entry(t, neighbours(t), False) for t in range(clip.n)]
        summary = _clip_summary(clip.n, "blocked", clip_cost, unsafe, [], [], labels, window, flt.action)
        raise UnsafeClipError(unsafe, [entries[i] for i in unsafe], entries, summary)

    # ---- pass 2: censor a chunk at a time into the preallocated clip
    out = np.empty((clip.n, clip.h, clip.w, 3), np.uint8 if clip.uint8 else np.float32)
    masks = np.zeros((clip.n, clip.h, clip.w), np.float32)
    entries: list[dict] = []
    for start, part in clip.chunks(int(chunk_size)):
        # The pixels judged in pass 1: uint8 frames as they are, floats clipped to [0, 1].
        imgs = _convert(batch_to_uint8 if clip.uint8 else batch_to_float, part, start)
        idx = range(start, start + len(imgs))
        sources = [neighbours(t) for t in idx]
        # Censoring verdicts: the frame's own findings plus the flagged ones of its neighbours.
        to_censor = [
            ImageVerdict(t, verdicts[t].width, verdicts[t].height,
                         list(verdicts[t].findings) + [f for u in src for f in verdicts[u].flagged])
            for t, src in zip(idx, sources)
        ]
        # Only frames with something to censor go through the image filter's censoring (and its
        # re-check); the others leave as judged, with an empty mask.
        need = [j for j, v in enumerate(to_censor) if v.unsafe]
        if need:
            done, done_masks = flt.censor_checked_with_masks([imgs[j] for j in need], [to_censor[j] for j in need])
            for j, img, m in zip(need, done, done_masks):
                imgs[j] = float_to_uint8(img) if clip.uint8 else img
                masks[start + j] = m
            del done, done_masks
        for j, t in enumerate(idx):
            out[t] = imgs[j]
            verdicts[t].escalated = to_censor[j].escalated
            entries.append(frame_entry(t, sources[j], to_censor[j].unsafe and flt.action != "pass"))
        del imgs
        tick(len(idx))

    censored = [e["frame"] for e in entries if e["censored"]]
    escalated = [v.index for v in verdicts if v.escalated]
    summary = _clip_summary(clip.n, "unsafe" if unsafe else "safe", clip_cost, unsafe, censored, escalated,
                            labels, window, flt.action)
    return VideoFilterOutput(out, masks, verdicts, entries, summary)


def _clip_summary(n, verdict, cost, unsafe, censored, escalated, labels, window, action) -> dict:
    return {
        "frames": n, "verdict": verdict, "cost": round(float(cost), 6),
        "unsafe_frames": list(unsafe), "censored_frames": list(censored), "escalated_frames": list(escalated),
        "labels": list(labels), "window": window, "action": action,
    }
