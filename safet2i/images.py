"""Image conversion and robust image-file reading.

Inside SafeT2I an image is a NumPy array ``[H, W, 3]`` in **RGB** order: ``uint8`` for the
detectors, ``float32`` in 0..1 for censoring. Hosts convert at the edge:

* ComfyUI ``IMAGE``: ``float32 [B, H, W, C]`` in 0..1 (C may be 1, 3 or 4);
* files: anything Pillow reads, every frame of animations, EXIF orientation applied.

Alpha is *dropped*, not composited: colour hidden under transparent pixels is still
checked, because removing the alpha channel would reveal it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from .errors import ImageInputError

#: Largest image accepted (pixels per frame). Above it decoding is refused with a clear
#: error instead of exhausting memory (a 10000 x 10000 picture is 1e8 pixels and passes).
MAX_PIXELS = 150_000_000
MAX_FRAMES = 2_000


def to_numpy(x) -> np.ndarray:
    """A NumPy view of a NumPy array or a torch tensor (without importing torch)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        t = x.detach().cpu()
        if str(t.dtype) in ("torch.bfloat16", "torch.float16"):
            t = t.float()
        return t.numpy()
    return np.asarray(x)


def ensure_rgb(arr: np.ndarray) -> np.ndarray:
    """``[H,W]``, ``[H,W,1]``, ``[H,W,3]`` or ``[H,W,4]`` -> ``[H,W,3]`` (alpha dropped)."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ImageInputError(f"Expected an image of shape [H, W, C], got shape {tuple(arr.shape)}.")
    c = arr.shape[2]
    if c == 1:
        return np.repeat(arr, 3, axis=2)
    if c == 3:
        return arr
    if c == 4:
        return arr[:, :, :3]
    if c == 2:  # luminance + alpha
        return np.repeat(arr[:, :, :1], 3, axis=2)
    raise ImageInputError(f"Images need 1, 2, 3 or 4 channels, got {c}.")


def float_to_uint8(arr: np.ndarray) -> np.ndarray:
    """0..1 floats -> uint8 with rounding; NaN/inf is an error, not silently black."""
    if not np.isfinite(arr).all():
        raise ImageInputError("The image contains NaN or infinite values; refusing to check it.")
    return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)


def to_uint8_rgb(img) -> np.ndarray:
    """Any single image (array, tensor, PIL image) -> contiguous ``uint8 [H,W,3]`` RGB."""
    if hasattr(img, "mode") and hasattr(img, "size") and not isinstance(img, np.ndarray):
        return pil_to_rgb(img)
    arr = to_numpy(img)
    arr = ensure_rgb(arr)
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageInputError(f"Empty image of shape {tuple(arr.shape)}.")
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.uint16:
        out = (arr.astype(np.uint32) * 255 + 32767) // 65535
        out = out.astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        out = float_to_uint8(arr.astype(np.float32, copy=False))
    elif arr.dtype == np.bool_:
        out = arr.astype(np.uint8) * 255
    else:
        raise ImageInputError(f"Unsupported image dtype {arr.dtype}.")
    return np.ascontiguousarray(out)


def to_float_rgb(img) -> np.ndarray:
    """One image -> ``float32 [H,W,3]`` in 0..1 (a copy only where conversion needs one)."""
    arr = ensure_rgb(to_numpy(img))
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    return arr.astype(np.float32, copy=False)


def batch_to_uint8(images) -> list[np.ndarray]:
    """A batch (``[B,H,W,C]`` array/tensor, or a list of single images) -> list of uint8 RGB."""
    if isinstance(images, (list, tuple)):
        return [to_uint8_rgb(i) for i in images]
    arr = to_numpy(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ImageInputError(f"Expected a batch [B, H, W, C], got shape {tuple(arr.shape)}.")
    if arr.shape[0] == 0:
        return []
    if np.issubdtype(arr.dtype, np.floating):
        # One vectorised conversion for the whole batch.
        u8 = float_to_uint8(arr.astype(np.float32, copy=False))
        return [np.ascontiguousarray(ensure_rgb(f)) for f in u8]
    return [to_uint8_rgb(f) for f in arr]


def pil_to_rgb(im) -> np.ndarray:
    """A Pillow image in any mode -> uint8 RGB (16-bit scaled, CMYK converted, alpha dropped)."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im)
        if mode == "I" and a.max(initial=0) <= 255:
            a8 = a.astype(np.uint8)
        else:
            a8 = ((a.astype(np.int64).clip(0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return np.ascontiguousarray(ensure_rgb(a8))
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        hi = float(np.nanmax(a)) if a.size else 1.0
        return to_uint8_rgb(a / hi if hi > 1.0 else a)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        return np.ascontiguousarray(np.asarray(im)[:, :, :3])
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        return np.ascontiguousarray(np.asarray(im)[:, :, :3])
    if mode != "RGB":
        im = im.convert("RGB")
    return np.ascontiguousarray(np.asarray(im))


@dataclass
class LoadedImage:
    """Frames of one file, as uint8 RGB arrays, plus what is needed to write it back."""

    path: str
    frames: list[np.ndarray]
    format: str
    mode: str
    durations: list[int] = field(default_factory=list)
    loop: int | None = None

    @property
    def animated(self) -> bool:
        return len(self.frames) > 1


def load_image_file(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> LoadedImage:
    """Read every frame of an image file, or raise :class:`ImageInputError` saying why not."""
    from PIL import Image, ImageOps, UnidentifiedImageError  # noqa: PLC0415

    path = os.fspath(path)
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below replaces Pillow's decompression-bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageInputError(
                    f"{path}: {w}x{h} is larger than the {max_pixels:,}-pixel limit."
                )
            n = getattr(im, "n_frames", 1)
            if n > MAX_FRAMES:
                raise ImageInputError(f"{path}: {n} frames is more than the {MAX_FRAMES} allowed.")
            fmt, mode = im.format or "", im.mode
            frames, durations = [], []
            for i in range(n):
                im.seek(i)
                im.load()
                frame = ImageOps.exif_transpose(im) if i == 0 and n == 1 else im
                frames.append(pil_to_rgb(frame))
                durations.append(int(im.info.get("duration", 0) or 0))
            loop = im.info.get("loop")
    except ImageInputError:
        raise
    except FileNotFoundError as exc:
        raise ImageInputError(f"{path}: no such file.") from exc
    except UnidentifiedImageError as exc:
        raise ImageInputError(f"{path}: not an image Pillow can read.") from exc
    except Image.DecompressionBombError as exc:
        raise ImageInputError(f"{path}: refused as a decompression bomb ({exc}).") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageInputError(f"{path}: truncated or corrupt image ({exc}).") from exc
    except Exception as exc:  # noqa: BLE001 - Pillow decoders raise struct.error, IndexError, ...
        raise ImageInputError(f"{path}: truncated or corrupt image ({type(exc).__name__}: {exc}).") from exc
    return LoadedImage(path, frames, fmt, mode, durations, loop)
