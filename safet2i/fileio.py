"""Writing files safely: one mechanism for every file SafeT2I writes (filter outputs and
reports, converted LoRAs and checkpoints)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

TMP_SUFFIX = ".safet2i-tmp"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(target: str | os.PathLike, write) -> None:
    """``write(fh)`` into a temporary file next to ``target``, flushed to disk, then renamed
    over ``target`` (a link at ``target`` is replaced, never written through). On any
    failure the temporary file is removed and nothing appears under ``target``."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix="." + target.name[:64] + ".", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "w+b") as fh:   # readable too: multi-page TIFF writing seeks back
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)   # mkstemp makes 0600: outputs get the user's usual mode
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_safetensors(target: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` through :func:`atomic_write`."""
    from safetensors.torch import save  # noqa: PLC0415

    data = save(tensors, metadata=metadata)
    atomic_write(target, lambda fh: fh.write(data))


def publish_new(target: str | os.PathLike, write) -> bool:
    """Like :func:`atomic_write`, but **never replaces** anything at ``target``: the
    temporary file is hard-linked into place (atomic, and refused by the OS when ``target``
    exists, even when another process writes it at the same moment). If ``target`` already
    exists with exactly the bytes just written (an interrupted run wrote it, or a retried
    worker did), that is success and ``False`` is returned; other content raises
    :class:`FileExistsError` and ``target`` is left as it was. ``True``: the file was created.
    Needs a file system with hard links (every local one; most network ones)."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix="." + target.name[:64] + ".", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "w+b") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        try:
            os.link(tmp, target, follow_symlinks=False)
            return True
        except FileExistsError:
            if os.path.islink(target) or not os.path.isfile(target) or not _same_bytes(tmp, target):
                raise FileExistsError(f"{target} exists with other content; it is never replaced") from None
            return False
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _same_bytes(a, b, block: int = 1 << 20) -> bool:
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(block), fb.read(block)
            if x != y:
                return False
            if not x:
                return True
