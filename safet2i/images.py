"""Image conversion and robust image-file reading.

Inside SafeT2I an image is a NumPy array ``[H, W, 3]`` in **RGB** order: ``uint8`` for the
detectors, ``float32`` in 0..1 for censoring. Hosts convert at the edge:

* ComfyUI ``IMAGE``: ``float32 [B, H, W, C]`` in 0..1 (C may be 1, 3 or 4);
* files: anything Pillow reads, every frame of animations, EXIF orientation applied.

Alpha is *dropped*, not composited: colour hidden under transparent pixels is still
checked, because removing the alpha channel would reveal it.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from .errors import ImageBudgetError, ImageInputError

#: Decoding budgets (see docs/filter.md, "Guarantees and limits"). Every limit is checked
#: *before* the memory is taken, and an image over it is refused with
#: :class:`~safet2i.errors.ImageBudgetError` naming the limit and how to change it.
#:
#: * ``MAX_PIXELS``: pixels of one frame / page (150 Mpx: a 12000 x 12000 picture passes);
#: * ``MAX_FILE_PIXELS``: decoded pixels of one file over all its frames and pages
#:   (300 Mpx = 900 MB as uint8 RGB); environment ``SAFET2I_MAX_FILE_PIXELS``;
#: * ``MAX_FILE_BYTES``: bytes of one input file, read once into memory (512 MiB);
#:   environment ``SAFET2I_MAX_FILE_BYTES``;
#: * ``MAX_FRAMES``: frames / pages of one file.
MAX_PIXELS = 150_000_000
MAX_FILE_PIXELS = 300_000_000
MAX_FILE_BYTES = 512 * 1024 * 1024
MAX_FRAMES = 2_000
ENV_MAX_FILE_PIXELS = "SAFET2I_MAX_FILE_PIXELS"
ENV_MAX_FILE_BYTES = "SAFET2I_MAX_FILE_BYTES"

#: Formats SafeT2I decodes (Pillow plug-in names). Everything else is refused unread: a
#: plug-in that runs an external program (EPS runs Ghostscript) or reads other files is
#: never reached from an input file.
READ_FORMATS = ("PNG", "JPEG", "MPO", "GIF", "WEBP", "BMP", "DIB", "TIFF", "ICO", "ICNS", "PPM",
                "TGA", "PCX", "SGI", "QOI", "JPEG2000")


def env_budget(name: str, default: int) -> int:
    """A positive integer budget from the environment (``default`` when unset)."""
    raw = os.environ.get(name, "").strip().replace("_", "")
    if not raw:
        return default
    try:
        value = int(float(raw))
    except ValueError as exc:
        raise ImageInputError(f"{name}={raw!r} is not a number.") from exc
    if value < 1:
        raise ImageInputError(f"{name} must be at least 1, got {value}.")
    return value


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


def _check_float_range(arr: np.ndarray) -> None:
    """NaN, inf, or values that overflow float32 are refused (as ``SafetyFilter.run`` does),
    before any narrowing could print an overflow warning."""
    if not np.isfinite(arr).all() or (arr.dtype.itemsize > 4 and arr.size
                                      and float(np.abs(arr).max()) > float(np.finfo(np.float32).max)):
        raise ImageInputError("The image contains NaN or infinite values (or values beyond the float32 "
                              "range); refusing to check it.")


def _is_pil(img) -> bool:
    """A Pillow image (torch tensors also have ``mode`` and ``size``)."""
    return any(c.__module__.startswith("PIL.") and c.__name__ == "Image" for c in type(img).__mro__)


def to_uint8_rgb(img) -> np.ndarray:
    """Any single image (array, tensor, PIL image) -> contiguous ``uint8 [H,W,3]`` RGB."""
    if _is_pil(img):
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
        _check_float_range(arr)
        out = float_to_uint8(arr.astype(np.float32, copy=False))
    elif arr.dtype == np.bool_:
        out = arr.astype(np.uint8) * 255
    else:
        raise ImageInputError(f"Unsupported image dtype {arr.dtype}.")
    return np.ascontiguousarray(out)


def _numpy_of(x) -> np.ndarray:
    """A NumPy view of an array, tensor or PIL image; an unconvertible dtype is refused."""
    if _is_pil(x):
        return pil_to_rgb(x)        # the same conversion check() uses for PIL images
    try:
        return to_numpy(x)
    except (TypeError, RuntimeError) as exc:      # e.g. torch float8 / uint32 on older torch
        raise ImageInputError(
            f"Unsupported image dtype {getattr(x, 'dtype', type(x).__name__)}: {exc}"
        ) from exc


def to_float_rgb(frame) -> np.ndarray:
    """One image -> ``float32 [H,W,3]`` in [0, 1]: exactly the pixels that are judged and
    returned by ``SafetyFilter.run``. ``uint8``, ``uint16`` and ``bool`` are scaled; floats
    outside [0, 1] are clipped (NaN / inf refused); every other dtype (signed integers,
    ``uint32``/``uint64``) is refused, never guessed at. Never writes into the input."""
    arr = ensure_rgb(_numpy_of(frame))
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageInputError(f"Empty image of shape {tuple(arr.shape)}.")
    dt = arr.dtype
    if dt == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    if dt == np.uint16:
        return arr.astype(np.float32) / np.float32(65535.0)
    if dt == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(dt, np.floating):
        with np.errstate(over="ignore", invalid="ignore"):     # overflow -> inf -> refused below
            f = arr.astype(np.float32, copy=False)
        if not np.isfinite(f).all():
            raise ImageInputError(
                "The image contains NaN or infinite values (or values beyond the float32 range); "
                "refusing to check it."
            )
        if f.min() < 0.0 or f.max() > 1.0:
            f = np.clip(f, 0.0, 1.0)            # a new array: judged and returned clipped
        return f
    raise ImageInputError(
        f"Unsupported image dtype {dt}: give uint8 (0..255), uint16 (0..65535), bool, or floats "
        "in 0..1. Integer arrays other than uint8/uint16 are refused, not guessed at."
    )


def _frames(images) -> list:
    """A batch (``[B,H,W,C]`` / ``[H,W,C]`` array or tensor, or a list of images) as a list."""
    if isinstance(images, (list, tuple)):
        return list(images)
    arr = _numpy_of(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ImageInputError(f"Expected a batch [B, H, W, C], got shape {tuple(arr.shape)}.")
    return list(arr)


def batch_to_float(images) -> list[np.ndarray]:
    """A batch -> list of float32 ``[H,W,3]`` in [0, 1] (:func:`to_float_rgb` per image)."""
    return [to_float_rgb(f) for f in _frames(images)]


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
        # One vectorised conversion for the whole batch (clipped before narrowing to float32).
        _check_float_range(arr)
        u8 = float_to_uint8(arr.astype(np.float32, copy=False))
        return [np.ascontiguousarray(ensure_rgb(f)) for f in u8]
    return [to_uint8_rgb(f) for f in arr]


#: Pixels converted at a time from 16/32-bit modes (bounded temporaries, not 8 bytes per
#: pixel of the whole image).
_BAND_PIXELS = 1 << 22


def _bands(im):
    """Row bands of a Pillow image as NumPy arrays, each of at most ``_BAND_PIXELS`` pixels."""
    w, h = im.size
    rows = max(1, _BAND_PIXELS // max(1, w))
    for y0 in range(0, h, rows):
        yield y0, np.asarray(im.crop((0, y0, w, min(h, y0 + rows))))


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    out = np.empty(gray.shape + (3,), np.uint8)
    out[...] = gray[:, :, None]
    return out


def pil_to_rgb(im) -> np.ndarray:
    """A Pillow image in any mode -> uint8 RGB (16-bit scaled, CMYK converted, alpha dropped).

    16/32-bit and float modes are converted in row bands, so the temporaries stay small
    whatever the image size."""
    mode = im.mode
    w, h = im.size
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        hi = 0
        if mode == "I":
            for _, band in _bands(im):
                hi = max(hi, int(band.max(initial=0)))
        gray = np.empty((h, w), np.uint8)
        for y0, band in _bands(im):
            if mode == "I" and hi <= 255:
                g = np.clip(band, 0, 255).astype(np.uint8)
            else:
                g = ((band.astype(np.int64).clip(0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
            gray[y0:y0 + g.shape[0]] = g
        return _gray_to_rgb(gray)
    if mode == "F":
        hi = -np.inf
        for _, band in _bands(im):
            if band.size:
                if not np.isfinite(band).all():
                    raise ImageInputError("The image contains NaN or infinite values; refusing to check it.")
                hi = max(hi, float(band.max()))
        scale = hi if hi > 1.0 else 1.0
        gray = np.empty((h, w), np.uint8)
        for y0, band in _bands(im):
            gray[y0:y0 + band.shape[0]] = float_to_uint8(band.astype(np.float32) / np.float32(scale))
        return _gray_to_rgb(gray)
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
    """Frames of one file, as uint8 RGB arrays, plus what is needed to write it back.

    ``frames`` are exactly the pixels the filter checks and the only pixels written out.
    ``sha256`` and ``size`` describe the input bytes they were decoded from; ``notes`` say
    what decoding did beyond a plain decode (orientation, colour profile)."""

    path: str
    frames: list[np.ndarray]
    format: str
    mode: str
    durations: list[int] = field(default_factory=list)
    loop: int | None = None
    sha256: str = ""
    size: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def animated(self) -> bool:
        return len(self.frames) > 1

    @property
    def pixels(self) -> int:
        return sum(int(f.shape[0]) * int(f.shape[1]) for f in self.frames)


def read_file_bytes(path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
    """The whole content of a regular file, read once, refused over ``max_bytes``.

    Only regular files are read (a FIFO or device would block or never end)."""
    import stat  # noqa: PLC0415

    path = os.fspath(path)
    limit = max_bytes or env_budget(ENV_MAX_FILE_BYTES, MAX_FILE_BYTES)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError as exc:
        raise ImageInputError(f"{path}: no such file.") from exc
    except OSError as exc:
        raise ImageInputError(f"{path}: cannot be read ({exc.strerror or exc}).") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageInputError(f"{path}: not a regular file.")
        if st.st_size > limit:
            raise ImageBudgetError(
                f"{path}: {st.st_size:,} bytes is more than the {limit:,}-byte limit per file "
                f"(set {ENV_MAX_FILE_BYTES} to change it)."
            )
        chunks, total = [], 0
        while True:
            block = os.read(fd, min(1 << 24, limit + 1 - total))
            if not block:
                break
            chunks.append(block)
            total += len(block)
            if total > limit:  # the file grew while being read
                raise ImageBudgetError(f"{path}: more than the {limit:,}-byte limit per file.")
        return b"".join(chunks)
    except OSError as exc:
        raise ImageInputError(f"{path}: cannot be read ({exc.strerror or exc}).") from exc
    finally:
        os.close(fd)


_ORIENT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
           6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}


def _orientation(im) -> int:
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block means: no orientation
        return 1


def _to_srgb(frame, icc: bytes | None, notes: list[str]):
    """The frame converted from its embedded ICC profile to sRGB (what a viewer shows), or
    unchanged when there is no profile or it cannot be applied (then the output is written
    without it, so what is shown is still what was checked)."""
    if not icc:
        return frame
    try:
        from PIL import ImageCms  # noqa: PLC0415

        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        mode = frame.mode if frame.mode in ("RGB", "CMYK", "L") else None
        if mode is None:
            return frame
        out = ImageCms.profileToProfile(frame, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        if "icc: converted to sRGB" not in notes:
            notes.append("icc: converted to sRGB")
        return out
    except Exception:  # noqa: BLE001 - an unusable profile is dropped, never trusted
        if "icc: unusable profile dropped" not in notes:
            notes.append("icc: unusable profile dropped")
        return frame


def _embedded_size(blob: bytes) -> tuple[int, int] | None:
    """(width, height) of an embedded PNG, JPEG 2000 or BMP-DIB image read from its header
    alone, or None when the blob is none of those."""
    import struct  # noqa: PLC0415

    if blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) >= 24:
        return struct.unpack(">II", blob[16:24])
    if blob[:12] in (b"\x00\x00\x00\x0cjP  \r\n\x87\n",) or blob[:4] == b"\xff\x4f\xff\x51":
        at = blob.find(b"ihdr")
        if at >= 0 and len(blob) >= at + 12:
            h, w = struct.unpack(">II", blob[at + 4:at + 12])
            return w, h
        if blob[:4] == b"\xff\x4f\xff\x51" and len(blob) >= 16:   # raw codestream: SIZ marker
            w, h = struct.unpack(">II", blob[8:16])
            return w, h
        return (1 << 31, 1)   # a JPEG 2000 entry whose size cannot be read: over any budget
    if len(blob) >= 16 and struct.unpack("<I", blob[:4])[0] in (12, 40, 52, 56, 108, 124):
        if struct.unpack("<I", blob[:4])[0] == 12:
            w, h = struct.unpack("<HH", blob[4:8])
        else:
            w, h = struct.unpack("<ii", blob[4:12])
        return abs(w), abs(h) // 2   # an icon's DIB height counts the AND mask too
    return None


def _precheck_icons(data: bytes, name: str, max_pixels: int, budget: int) -> None:
    """ICO and ICNS entries are decoded by Pillow while it *opens* the file, before any
    frame limit could apply: read every entry's size from its own header first and refuse
    the file when one is over the per-frame limit or the file budget."""
    import struct  # noqa: PLC0415

    sizes: list[tuple[int, int]] = []
    if data[:4] == b"\x00\x00\x01\x00" and len(data) >= 6:
        n = struct.unpack("<H", data[4:6])[0]
        for i in range(n):
            e = data[6 + 16 * i:22 + 16 * i]
            if len(e) < 16:
                break
            size, off = struct.unpack("<II", e[8:16])
            dim = _embedded_size(data[off:off + min(size, 4096)])
            if dim is not None:
                sizes.append(dim)
    elif data[:4] == b"icns":
        pos = 8
        while pos + 8 <= len(data):
            kind, length = data[pos:pos + 4], struct.unpack(">I", data[pos + 4:pos + 8])[0]
            if length < 8:
                break
            dim = _embedded_size(data[pos + 8:pos + min(length, 4096)])
            if dim is not None:
                sizes.append(dim)
            pos += length
    else:
        return
    total = 0
    for w, h in sizes:
        if w * h > max_pixels:
            raise ImageBudgetError(f"{name}: an icon entry of {w}x{h} is larger than the {max_pixels:,}-pixel "
                                   "limit per frame.")
        total = max(total, w * h)   # Pillow decodes one entry
    if total > budget:
        raise ImageBudgetError(f"{name}: an icon entry of {total:,} pixels is over the file budget of "
                               f"{budget:,} decoded pixels (set {ENV_MAX_FILE_PIXELS} to change it).")


class FrameDecoder:
    """Decodes the frames / pages of an image held in memory one at a time, within budget.

    ``with FrameDecoder(data, name) as dec:`` reads the header (format, frame count, first
    frame's size); ``dec.frames()`` then yields ``(uint8 [H,W,3] RGB, duration_ms)`` per
    frame. Each frame's size is checked against ``max_pixels``, and the running total of
    decoded pixels against ``max_file_pixels``, *before* that frame is decoded. EXIF
    orientation is applied to every frame and an embedded ICC profile converted to sRGB,
    so the pixels are what a viewer shows; they are the only pixels SafeT2I writes out.
    Every failure is an :class:`ImageInputError` (:class:`ImageBudgetError` over a budget)
    naming ``name`` and the cause."""

    def __init__(self, data: bytes, name: str = "image", *, max_pixels: int = MAX_PIXELS,
                 max_file_pixels: int | None = None, max_frames: int = MAX_FRAMES):
        self.data, self.name = data, name
        self.max_pixels, self.max_frames = max_pixels, max_frames
        self.budget = max_file_pixels or env_budget(ENV_MAX_FILE_PIXELS, MAX_FILE_PIXELS)
        self.im = None
        self.format = self.mode = ""
        self.n_frames, self.loop, self.notes = 1, None, []
        self.decoded_pixels = 0

    def _fail(self, exc: BaseException) -> ImageInputError:
        from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

        name = self.name
        if isinstance(exc, ImageInputError):
            return exc
        if isinstance(exc, UnidentifiedImageError):
            return ImageInputError(f"{name}: not an image format SafeT2I reads.")
        if isinstance(exc, Image.DecompressionBombError):
            return ImageBudgetError(f"{name}: refused as a decompression bomb ({exc}).")
        if isinstance(exc, MemoryError):
            return ImageBudgetError(f"{name}: not enough memory to decode it; lower the budget "
                                    f"({ENV_MAX_FILE_PIXELS}).")
        if isinstance(exc, (OSError, SyntaxError, ValueError, EOFError)):
            return ImageInputError(f"{name}: truncated or corrupt image ({exc}).")
        return ImageInputError(f"{name}: truncated or corrupt image ({type(exc).__name__}: {exc}).")

    def __enter__(self) -> FrameDecoder:
        from PIL import Image  # noqa: PLC0415

        try:
            _precheck_icons(self.data, self.name, self.max_pixels, self.budget)
            with warnings.catch_warnings():
                # Our own pixel limits replace Pillow's warnings; nothing reaches stderr raw.
                warnings.simplefilter("ignore")
                Image.init()   # every plug-in registered, so the allow-list below is complete
                im = Image.open(io.BytesIO(self.data), formats=[f for f in READ_FORMATS if f in Image.OPEN])
                self.im = im
                w, h = im.size
                if w * h > self.max_pixels:
                    raise ImageBudgetError(
                        f"{self.name}: {w}x{h} is larger than the {self.max_pixels:,}-pixel limit per frame.")
                n = int(getattr(im, "n_frames", 1) or 1)
                if n > self.max_frames:
                    raise ImageBudgetError(f"{self.name}: {n} frames is more than the {self.max_frames} allowed.")
                self.n_frames, self.format, self.mode = n, im.format or "", im.mode
                self.orient = _orientation(im)
                self.icc = im.info.get("icc_profile")
                if self.orient in _ORIENT:
                    self.notes.append(f"exif orientation {self.orient} applied")
                loop = im.info.get("loop")
                self.loop = loop if isinstance(loop, int) else None
        except BaseException as exc:
            self.close()
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise self._fail(exc) from exc
        return self

    def frames(self):
        from PIL import Image  # noqa: PLC0415

        im = self.im
        for i in range(self.n_frames):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if i:
                        im.seek(i)
                    fw, fh = im.size
                    if fw * fh > self.max_pixels:
                        raise ImageBudgetError(
                            f"{self.name}: frame {i} is {fw}x{fh}, larger than the {self.max_pixels:,}-pixel "
                            "limit per frame.")
                    if self.decoded_pixels + fw * fh > self.budget:
                        raise ImageBudgetError(
                            f"{self.name}: decoding frame {i} ({fw}x{fh}) would take the file past its budget of "
                            f"{self.budget:,} decoded pixels over all {self.n_frames} frames "
                            f"(set {ENV_MAX_FILE_PIXELS} to change it).")
                    im.load()
                    frame = _to_srgb(im, self.icc, self.notes) if self.icc else im
                    if self.orient in _ORIENT:
                        frame = frame.transpose(getattr(Image.Transpose, _ORIENT[self.orient]))
                    arr = pil_to_rgb(frame)
                    duration = int(im.info.get("duration", 0) or 0)
            except BaseException as exc:
                if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
                    raise
                raise self._fail(exc) from exc
            self.decoded_pixels += fw * fh
            del frame
            if i == self.n_frames - 1:
                self.close()   # Pillow's own copy of the last frame is not held while it is checked
            yield arr, duration

    def close(self) -> None:
        if self.im is not None:
            try:
                self.im.close()
            except Exception:  # noqa: BLE001
                pass
            self.im = None

    def __exit__(self, *exc) -> None:
        self.close()


def decode_image_bytes(
    data: bytes,
    name: str = "image",
    *,
    max_pixels: int = MAX_PIXELS,
    max_file_pixels: int | None = None,
    max_frames: int = MAX_FRAMES,
) -> LoadedImage:
    """Decode every frame / page of an image held in memory (:class:`FrameDecoder`), or
    raise :class:`ImageInputError` (:class:`ImageBudgetError` over a budget) saying why."""
    import hashlib  # noqa: PLC0415

    with FrameDecoder(data, name, max_pixels=max_pixels, max_file_pixels=max_file_pixels,
                      max_frames=max_frames) as dec:
        frames, durations = [], []
        for arr, duration in dec.frames():
            frames.append(arr)
            durations.append(duration)
        return LoadedImage(name, frames, dec.format, dec.mode, durations, dec.loop,
                           hashlib.sha256(data).hexdigest(), len(data), dec.notes)


def load_image_file(path: str | os.PathLike, max_pixels: int = MAX_PIXELS, *,
                    max_file_pixels: int | None = None, max_bytes: int | None = None) -> LoadedImage:
    """Read a file's bytes once and decode every frame from those bytes
    (:func:`read_file_bytes`, :func:`decode_image_bytes`)."""
    path = os.fspath(path)
    data = read_file_bytes(path, max_bytes)
    return decode_image_bytes(data, path, max_pixels=max_pixels, max_file_pixels=max_file_pixels)


#: Formats written back as such (from the checked pixels); anything else is written as PNG.
WRITE_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"}
#: JPEG outputs: quality 95 with 4:4:4 chroma (JPEG cannot be re-encoded losslessly).
JPEG_QUALITY = 95


def output_format(fmt: str, n_frames: int = 1) -> str:
    """The format an output of an input in format ``fmt`` is written in: the input's where
    SafeT2I writes it (an animation only where the format animates), PNG otherwise."""
    fmt = fmt if fmt in WRITE_FORMATS else "PNG"
    if n_frames > 1 and fmt not in ("GIF", "WEBP", "PNG", "TIFF"):
        fmt = "PNG"
    return fmt


def encode_frames(frames_u8: list[np.ndarray], loaded, fh) -> str:
    """Write ``frames_u8`` (the checked, possibly censored pixels) to the binary file
    object ``fh`` in :func:`output_format`; nothing of the input file but its frame
    timing is carried over (no EXIF, XMP, ICC, text, thumbnails or other entries)."""
    from PIL import Image  # noqa: PLC0415

    fmt = output_format(loaded.format, len(frames_u8))
    if len(frames_u8) > 1 and fmt != "TIFF" and len({f.shape for f in frames_u8}) > 1:
        # Animation writers draw a smaller frame over the previous one: a picture nobody
        # checked. Each frame is put whole on a black canvas of the largest size instead.
        ch = max(f.shape[0] for f in frames_u8)
        cw = max(f.shape[1] for f in frames_u8)

        def canvas(f):
            c = np.zeros((ch, cw, 3), np.uint8)
            c[:f.shape[0], :f.shape[1]] = f
            return c

        frames_u8 = [canvas(f) for f in frames_u8]
    ims = [Image.fromarray(np.ascontiguousarray(f)) for f in frames_u8]
    kw: dict = {}
    if len(ims) > 1:
        kw = {"save_all": True, "append_images": ims[1:],
              "duration": [d or 100 for d in loaded.durations] if loaded.durations else 100}
        if loaded.loop is not None:
            kw["loop"] = loaded.loop
    if fmt == "JPEG":
        kw.update(quality=JPEG_QUALITY, subsampling=0)
    elif fmt == "WEBP":
        kw.update(lossless=True, exact=True)
    elif fmt == "TIFF":
        kw.update(compression="tiff_lzw")
    elif fmt == "GIF":
        kw.update(optimize=False)
    ims[0].save(fh, format=fmt, **kw)
    return fmt
