"""Filtering image *files*: the engine behind ``safet2i filter``.

Guarantees (``docs/filter.md``, "Guarantees and limits"):

* **Only checked pixels leave.** Each input's bytes are read once; the frames are decoded
  from those bytes, checked, and every output (safe or censored) is encoded from exactly
  those decoded pixels (:func:`safet2i.images.encode_frames`). No input byte is ever
  copied to ``--out``: metadata, thumbnails, other container entries and trailing data
  stay behind.
* **Bounded memory.** Frames are decoded one at a time within the per-file budget and go
  through the networks in batches across files; the frames waiting for a batch are
  bounded by ``batch_pixels``. An over-budget file is a per-file error.
* **Nothing outside ``out`` is written**, never an input, never through a link; every
  output is written to a temporary file in its folder and renamed into place.
* **Per-file failures stay per file**: the run goes on and the exit status tells the
  truth (see :data:`EXIT_UNSAFE` ...).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..fileio import _UMASK, TMP_SUFFIX, atomic_write, publish_new  # noqa: F401  (re-exported for the CLI and tests)
from ..errors import ImageInputError, MissingDependencyError, ModelLoadError, ModelRunError, SafeT2IError
from ..images import (
    ENV_MAX_FILE_PIXELS, MAX_FILE_PIXELS, FrameDecoder, env_budget, encode_frames, output_format, read_file_bytes,
)

EXIT_UNSAFE, EXIT_BROKEN, EXIT_FATAL, EXIT_REPORT, EXIT_USAGE = 1, 2, 4, 8, 64

#: Extensions taken from folders (files named on the command line are taken whatever their name).
IMAGE_EXTS = {".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".dib", ".gif", ".tif",
              ".tiff", ".ico", ".icns", ".mpo", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".pcx", ".sgi", ".qoi"}
#: The extensions that already name each written format; another one is replaced by the first.
SUFFIXES = {"PNG": (".png", ".apng"), "JPEG": (".jpg", ".jpeg", ".jfif", ".jpe"), "WEBP": (".webp",),
            "BMP": (".bmp", ".dib"), "GIF": (".gif",), "TIFF": (".tif", ".tiff")}
ENV_BATCH_PIXELS = "SAFET2I_MAX_BATCH_PIXELS"
#: Default budget of decoded pixels waiting for a network batch (a frame larger than it
#: is checked alone as soon as it is decoded).
BATCH_PIXELS = 64_000_000
#: Largest number of pixels converted to float32 at once while censoring (a chunk of frames).
CENSOR_CHUNK_PIXELS = 16_000_000



def _ident(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _lstat_or_skip(path: Path, skip):
    """``os.lstat(path)``, or None after recording why the entry is skipped."""
    try:
        return os.lstat(path)
    except OSError as exc:
        skip(path, f"cannot be read ({exc.strerror})")
        return None


def build_filter(opts: dict):
    """A :class:`~safet2i.filter.SafetyFilter` from the command line's filter options (a dict:
    ``model``, ``policy``, ``threshold``, ``action``, ``expand``, ``shape``, ``feather``,
    ``strength``, ``colour``, ``providers``, ``batch_size``; missing ones take the defaults), the
    same for ``safet2i filter`` and ``safet2i audit`` (whose Ray actors build theirs from it)."""
    from . import DEFAULT_POLICY, SafetyFilter, get_policy, parse_thresholds  # noqa: PLC0415

    overrides = {}
    for t in opts.get("threshold") or []:
        overrides.update(parse_thresholds(t))
    kw = {k: opts[k] for k in ("expand", "shape") if opts.get(k) is not None}
    policy = get_policy(opts.get("policy") or DEFAULT_POLICY, overrides, **kw)
    return SafetyFilter(opts.get("model") or ["nudenet"], policy, opts.get("action") or "blur",
                        feather=opts.get("feather") or 0.0, strength=opts.get("strength"),
                        colour=tuple(opts.get("colour") or (0.0, 0.0, 0.0)), providers=opts.get("providers"),
                        batch_size=opts.get("batch_size") or 16)


def collect(paths: list[str], exclude: list[Path] = ()) -> tuple[list[tuple[Path, Path]], list[dict]]:
    """Inputs under ``paths``: ``([(file, path relative to its argument), ...], skipped)``.

    Files named on the command line are taken whatever their name (odd files get a clear
    per-file error) and followed if they are links: the user named them. Inside folders,
    only regular files with an image extension are taken; **symbolic links are never
    followed** (neither to files nor to folders), and every entry that is not taken is
    listed in ``skipped`` with its reason. Folders in ``exclude`` (``--out`` inside an
    input folder) are not entered.
    """
    excluded = set()
    for e in exclude:
        try:
            excluded.add(_ident(os.stat(e)))
        except OSError:
            pass
    out: list[tuple[Path, Path]] = []
    skipped: list[dict] = []

    def skip(p, reason):
        skipped.append({"path": os.fsdecode(p), "reason": reason})

    for raw in paths:
        p = Path(raw)
        if not p.is_dir():
            out.append((p, Path(p.name)))
            continue
        for root, dirs, names in os.walk(p, followlinks=False):
            rootp = Path(root)
            keep = []
            for d in sorted(dirs):
                dp, st = rootp / d, _lstat_or_skip(rootp / d, skip)
                if st is None:
                    continue
                if stat.S_ISLNK(st.st_mode):
                    skip(dp, "symbolic link to a folder (not followed)")
                elif _ident(st) in excluded:
                    skip(dp, "the output folder (excluded from the inputs)")
                else:
                    keep.append(d)
            dirs[:] = keep
            for n in sorted(names):
                fp, st = rootp / n, _lstat_or_skip(rootp / n, skip)
                if st is None:
                    continue
                if stat.S_ISLNK(st.st_mode):
                    skip(fp, "symbolic link (not followed)")
                elif not stat.S_ISREG(st.st_mode):
                    skip(fp, "not a regular file")
                elif n.endswith(TMP_SUFFIX):
                    skip(fp, "a temporary file of an interrupted safet2i run")
                elif fp.suffix.lower() not in IMAGE_EXTS:
                    skip(fp, "not an image file extension")
                else:
                    out.append((fp, fp.relative_to(p)))
    return out, skipped


def guard_destination(path: Path, overwrite: bool, inputs: set, what: str) -> Path:
    """Refuse a report / output destination that is an input (always) or an existing file
    (unless ``overwrite``); return its absolute path. Raises :class:`SafeT2IError`."""
    path = Path(os.path.abspath(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise SafeT2IError(f"{what} {path} cannot be checked: {exc.strerror}") from exc
    if st is not None:
        if _ident(st) in inputs:
            raise SafeT2IError(f"{what} {path} is one of the input files; choose another path.")
        if stat.S_ISDIR(st.st_mode):
            raise SafeT2IError(f"{what} {path} is a folder.")
        if not overwrite:
            raise SafeT2IError(f"{what} {path} exists; pass --overwrite to replace it.")
    if not path.parent.is_dir():
        raise SafeT2IError(f"{what} {path}: the folder {path.parent} does not exist.")
    return path


@dataclass
class _File:
    entry: dict
    target: Path
    format: str
    loop: int | None
    notes: list
    frames: list = field(default_factory=list)
    durations: list = field(default_factory=list)
    verdicts: list = field(default_factory=list)
    decoded: bool = False
    failed: bool = False

    @property
    def complete(self) -> bool:
        return self.decoded and len(self.verdicts) == len(self.frames) and all(v is not None for v in self.verdicts)


class _Meta:
    """What :func:`encode_frames` needs of an input (format, timing), nothing else."""

    def __init__(self, f: _File):
        self.frames, self.format, self.durations, self.loop = f.frames, f.format, f.durations, f.loop


class FileFilter:
    """Runs a :class:`~safet2i.filter.SafetyFilter` over files and writes the outputs.

    ``out_dir`` must exist. ``inputs``: identities ``(st_dev, st_ino)`` of every input,
    never written. ``thumbnails``: collect HTML thumbnails of the written outputs.
    ``publish="new"`` (``safet2i audit``): an output never replaces an existing file, even one
    another process creates at the same moment (:func:`~safet2i.fileio.publish_new`); an
    existing file with exactly the bytes this run would write counts as written (a resumed or
    retried run), one with other content is a per-file error. ``overwrite`` is then ignored.
    """

    def __init__(self, flt, out_dir: Path, *, overwrite: bool = False, inputs: set | None = None,
                 batch_size: int = 16, batch_pixels: int | None = None, max_file_pixels: int | None = None,
                 thumbnails: bool = False, progress=None, publish: str = "replace"):
        if publish not in ("replace", "new"):
            raise ValueError(f"publish must be 'replace' or 'new', not {publish!r}")
        self.publish = publish
        self.flt = flt
        self.out_dir = Path(os.path.realpath(out_dir))
        self.overwrite = overwrite
        self.inputs = inputs or set()
        self.batch_size = max(1, int(batch_size))
        self.max_file_pixels = max_file_pixels or env_budget(ENV_MAX_FILE_PIXELS, MAX_FILE_PIXELS)
        self.batch_pixels = batch_pixels or env_budget(ENV_BATCH_PIXELS, BATCH_PIXELS)
        self.want_thumbs = thumbnails
        self.progress = progress
        self.files: list[dict] = []
        self.thumbs: dict[str, str] = {}
        self.status = 0
        self._claimed: set[Path] = set()
        self._open: list[_File] = []
        self._pending: list[tuple[_File, int]] = []
        self._pending_px = 0

    # ------------------------------------------------------------------ naming
    def claim(self, path: Path) -> None:
        """Keep every output off ``path`` (e.g. a report file inside ``out``)."""
        self._claimed.add(Path(os.path.realpath(path)))

    def target_for(self, rel: Path, fmt: str) -> Path:
        rel = Path(rel)
        if rel.suffix.lower() not in SUFFIXES.get(fmt, ()):
            rel = rel.with_name(rel.name + SUFFIXES[fmt][0]) if not rel.suffix else rel.with_suffix(SUFFIXES[fmt][0])
        target = self.out_dir / rel
        try:
            st = os.lstat(target)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        except OSError as exc:
            raise ImageInputError(f"{target} cannot be checked: {exc.strerror}") from exc
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise ImageInputError(f"{target} is a symbolic link; refusing to replace it")
        real = Path(os.path.realpath(target))
        if self.out_dir not in real.parents:
            raise ImageInputError(f"refusing to write outside --out: {rel}")
        if real in self._claimed:
            raise ImageInputError(f"{target} is already the output of another input in this run")
        if st is not None:
            if _ident(st) in self.inputs:
                raise ImageInputError(f"refusing to overwrite the original {target}")
            if stat.S_ISDIR(st.st_mode):
                raise ImageInputError(f"{target} is a folder")
            if not self.overwrite and self.publish == "replace":
                raise ImageInputError(f"{target} exists; pass --overwrite to replace it")
        self._claimed.add(real)
        return target

    # ------------------------------------------------------------------ the run
    def run(self, items: list[tuple[Path, Path]]) -> int:
        for path, rel in items:
            self.add(path, rel)
            if self.progress is not None:
                self.progress(1)
        self.drain()
        return self.status

    def drain(self) -> None:
        """Check what waits for a batch and finish every file added so far (its entry is final)."""
        self._flush()
        self._finish_ready()

    def add(self, path: Path, rel: Path, data: bytes | None = None) -> None:
        """One input: read from ``path``, or ``data`` (its bytes, already read; ``path`` then
        only names it, e.g. ``shard.tar/member.png``)."""
        name = os.fsdecode(path)
        entry = {"path": name, "output": None, "verdict": "error", "cost": None, "error": None}
        self.files.append(entry)
        f = None
        try:
            if data is None:
                data = read_file_bytes(path)
            entry["sha256"] = hashlib.sha256(data).hexdigest()
            with FrameDecoder(data, name, max_file_pixels=self.max_file_pixels) as dec:
                fmt = output_format(dec.format, dec.n_frames)
                f = _File(entry, self.target_for(rel, fmt), dec.format, dec.loop, dec.notes)
                self._open.append(f)
                del data
                for arr, duration in dec.frames():
                    n = arr.shape[0] * arr.shape[1]
                    if self._pending and self._pending_px + n > self.batch_pixels:
                        self._flush()          # the waiting frames never pass the batch budget
                        self._finish_ready()
                    f.frames.append(arr)
                    f.durations.append(duration)
                    f.verdicts.append(None)
                    self._pending.append((f, len(f.frames) - 1))
                    self._pending_px += n
                    if len(self._pending) >= self.batch_size or self._pending_px >= self.batch_pixels:
                        self._flush()
                        self._finish_ready()
                f.decoded = True
                if dec.notes:
                    entry["notes"] = list(dec.notes)
        except (ModelLoadError, MissingDependencyError):
            raise
        except ImageInputError as exc:
            self._fail(entry, f, str(exc))
        except MemoryError:
            self._fail(entry, f, f"{name}: not enough memory to process it; lower {ENV_MAX_FILE_PIXELS}.")
        except Exception as exc:  # noqa: BLE001 - one file never aborts the batch
            self._fail(entry, f, f"{name}: {type(exc).__name__}: {exc}")
        self._finish_ready()

    def _fail(self, entry: dict, f: _File | None, message: str) -> None:
        entry.update(verdict="error", output=None, error=message, cost=None)
        entry.pop("images", None)
        self.status |= EXIT_BROKEN
        if f is not None:
            f.failed = True
            f.frames = []
            self._pending = [(g, i) for g, i in self._pending if g is not f]
            self._pending_px = sum(g.frames[i].shape[0] * g.frames[i].shape[1] for g, i in self._pending)
            if f in self._open:
                self._open.remove(f)

    def _flush(self) -> None:
        pending, self._pending, self._pending_px = self._pending, [], 0
        if not pending:
            return
        try:
            verdicts = self.flt.check_uint8([g.frames[i] for g, i in pending])
        except (ModelLoadError, MissingDependencyError):
            raise
        except Exception:  # noqa: BLE001 - find the file it came from: one file at a time
            verdicts = None
        if verdicts is not None:
            for (g, i), v in zip(pending, verdicts):
                g.verdicts[i] = v
            return
        groups: dict[int, list] = {}
        for g, i in pending:
            groups.setdefault(id(g), []).append((g, i))
        errors = []
        for group in groups.values():
            g = group[0][0]
            try:
                vs = self.flt.check_uint8([g.frames[i] for _, i in group])
            except (ModelLoadError, MissingDependencyError):
                raise
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
                self._fail(g.entry, g, f"{g.entry['path']}: the filter failed on it ({type(exc).__name__}: {exc})")
                continue
            for (_, i), v in zip(group, vs):
                g.verdicts[i] = v
        if errors and len(errors) == len(groups) and all(isinstance(e, ModelRunError) for e in errors) \
                and len(groups) > 1:
            raise errors[0]  # every file failed: the model is broken, not the files

    def _finish_ready(self) -> None:
        while self._open and self._open[0].complete:
            f = self._open.pop(0)
            try:
                self._finish(f)
            except (ModelLoadError, MissingDependencyError):
                raise
            except MemoryError:
                self._fail(f.entry, None, f"{f.entry['path']}: not enough memory to censor it.")
            except Exception as exc:  # noqa: BLE001
                self._fail(f.entry, None, f"{f.entry['path']}: {type(exc).__name__}: {exc}")
            finally:
                f.frames = []

    def _censor(self, f: _File, unsafe_idx: list[int]) -> list[np.ndarray]:
        outs = list(f.frames)
        flt = self.flt
        chunk: list[int] = []
        px = 0

        def run_chunk():
            imgs = [f.frames[i].astype(np.float32) / 255.0 for i in chunk]
            vs = [f.verdicts[i] for i in chunk]
            if hasattr(flt, "censor_checked"):
                res = flt.censor_checked(imgs, vs)
            else:  # pragma: no cover - older core
                res = [flt.censor_one(img, v) for img, v in zip(imgs, vs)]
            for i, img in zip(chunk, res):
                outs[i] = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)

        for i in unsafe_idx:
            n = f.frames[i].shape[0] * f.frames[i].shape[1]
            if chunk and px + n > CENSOR_CHUNK_PIXELS:
                run_chunk()
                chunk, px = [], 0
            chunk.append(i)
            px += n
        if chunk:
            run_chunk()
        return outs

    def _finish(self, f: _File) -> None:
        entry, flt = f.entry, self.flt
        vs = f.verdicts
        for j, v in enumerate(vs):
            v.index = j
        unsafe_idx = [j for j, v in enumerate(vs) if v.unsafe]
        unsafe = bool(unsafe_idx)
        entry["cost"] = round(max(v.cost for v in vs), 6)
        entry["verdict"] = "unsafe" if unsafe else "safe"
        if unsafe:
            self.status |= EXIT_UNSAFE
        if unsafe and flt.action == "block":
            entry["verdict"], entry["output"] = "blocked", None
            entry["images"] = [v.to_dict() for v in vs]
            return
        outs = self._censor(f, unsafe_idx) if unsafe and flt.action != "pass" else f.frames
        entry["images"] = [v.to_dict() for v in vs]
        meta = _Meta(f)
        try:
            f.target.parent.mkdir(parents=True, exist_ok=True)
            if self.out_dir not in Path(os.path.realpath(f.target.parent)).parents \
                    and Path(os.path.realpath(f.target.parent)) != self.out_dir:
                raise OSError(f"{f.target.parent} leads outside --out")
            if self.publish == "new":
                publish_new(f.target, lambda fh: encode_frames(outs, meta, fh))
            else:
                atomic_write(f.target, lambda fh: encode_frames(outs, meta, fh))
        except FileExistsError as exc:
            entry["error"] = str(exc)
            self.status |= EXIT_BROKEN
            return
        except OSError as exc:
            entry["error"] = f"cannot write {f.target}: {exc.strerror or exc}"
            self.status |= EXIT_BROKEN
            return
        entry["output"] = os.fsdecode(f.target)
        if self.want_thumbs and not (unsafe and flt.action == "pass"):  # never embed an unsafe original
            from .report import thumbnail_data_uri  # noqa: PLC0415

            self.thumbs[entry["path"]] = thumbnail_data_uri(outs[0])
