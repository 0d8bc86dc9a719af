"""Reading safety weights: safetensors only, with clear errors for everything else.

Pickled checkpoints (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) can run code when loaded, so they
are refused; :func:`convert_pickle` (CLI ``safet2i convert``) turns them into safetensors with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers.

Conversion never drops a tensor silently: every tensor is stored under a stable dotted name of
its path (``a.0.b`` for ``{"a": [{"b": t}]}``); two paths giving the same name, and tensors
safetensors cannot store (sparse, quantized, unsupported dtypes), are errors naming them; leaves
that are not tensors (numbers, strings, ...) and the entries beside a ``state_dict`` are skipped
and listed (returned, printed by the CLI, and in the output's ``safet2i_skipped`` metadata).
A pickle that needs code (a class or function outside torch's weights-only allowlist) is refused
with the global it names; torch's own advice (re-running with ``weights_only=False``) is never
passed on.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..runtime import file_sha256

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


def default_converted_path(src: str | os.PathLike) -> Path:
    """Where ``safet2i convert SRC`` writes without ``--out``: ``SRC`` with a ``.safetensors``
    suffix, or ``<stem>.converted.safetensors`` for a pickle that already has a ``.safetensors`` name."""
    src = Path(src)
    if src.suffix.lower() == ".safetensors":
        return src.with_name(src.stem + ".converted.safetensors")
    return src.with_suffix(".safetensors")


def _shell_quote(text: str) -> str:
    return subprocess.list2cmdline([text]) if os.name == "nt" else shlex.quote(text)


def _pickle_hint(path: Path) -> str:
    dst = default_converted_path(path)
    return (f"{path.name} is a pickled checkpoint, which can execute code when loaded; SafeT2I only loads "
            f"safetensors. Convert it once with: safet2i convert {_shell_quote(str(path))} (it uses "
            f"torch.load(weights_only=True) and writes {dst.name} next to it; use that file).")


def _looks_pickled(head: bytes) -> bool:
    """torch's zip container, or a raw pickle (protocol 2-5); a safetensors file has '{' at byte 8."""
    if head[8:9] == b"{":
        return False
    return head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


@dataclass
class WeightsFile:
    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    adapter_config: dict | None = None
    sha256: str = ""
    adapter_config_path: Path | None = None  # which config file was used (None: none)


def read_safetensors(path: str | os.PathLike, hash_file: bool = True) -> WeightsFile:
    """All tensors of a ``.safetensors`` file (CPU), or a :class:`ModelLoadError` naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file.")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(_pickle_hint(path))
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{path}: the file is empty (0 bytes): an interrupted download or copy?")
    with open(path, "rb") as f:
        head = f.read(16)
    if _looks_pickled(head):
        raise ModelLoadError(_pickle_hint(path) + " (The file has a .safetensors name but pickle content.)")
    if size < 8 or int.from_bytes(head[:8], "little") > size - 8:
        raise ModelLoadError(f"{path}: not a safetensors file or truncated (header larger than the file).")
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path}: corrupt or truncated safetensors file ({exc}).") from exc
    cfg, cfg_path = None, adapter_config_path(path)
    if cfg_path is not None:
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{cfg_path}: unreadable adapter config ({exc}).") from exc
        if not isinstance(cfg, dict):
            raise ModelLoadError(f"{cfg_path}: an adapter config must be a JSON object.")
    return WeightsFile(path, tensors, metadata, cfg, file_sha256(path) if hash_file else "", cfg_path)


PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_config_path(path: str | os.PathLike) -> Path | None:
    """The PEFT config that belongs to ``path``, or None.

    ``<stem>.adapter_config.json`` (a renamed adapter keeps its own config) comes first; the
    folder's generic ``adapter_config.json`` belongs only to PEFT's own layout, a file named
    ``adapter_model.safetensors`` (``save_pretrained``). A stray ``adapter_config.json`` next to
    any other file is never used: it would silently change that file's scale.
    """
    path = Path(path)
    own = path.parent / (path.stem + ".adapter_config.json")
    if own.is_file():
        return own
    generic = path.parent / "adapter_config.json"
    if path.name == PEFT_WEIGHTS_NAME and generic.is_file():
        return generic
    return None


@dataclass
class PickleConversion:
    """What :func:`convert_pickle_report` wrote: the output, its tensor names and what it skipped."""
    path: Path
    tensors: list[str]
    skipped: list[str]          # "name (why)" of every entry not stored


_ADVICE = re.compile(r"weights_only|safe_globals|allowlist|trusted source|file an issue|Check the documentation|"
                     r"Weights only load failed|two options|PyTorch 2\.6|arbitrary code", re.IGNORECASE)


def _torch_detail(exc: BaseException) -> str:
    """torch's error text without its advice (re-run with weights_only=False, add_safe_globals, ...)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    text = text.split("WeightsUnpickler error:")[-1]
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    kept = " ".join(p.strip() for p in parts if p.strip() and not _ADVICE.search(p))
    if len(kept) > 300:
        kept = kept[:300].rsplit(" ", 1)[0] + " …"
    return kept or type(exc).__name__


def _pickle_globals(path: Path, limit: int = 8) -> list[str]:
    """Globals (``module.name``) the pickle in ``path`` imports that torch's weights-only loader does
    not allow, read with :mod:`pickletools` (nothing is executed)."""
    import io  # noqa: PLC0415
    import pickletools  # noqa: PLC0415
    import zipfile  # noqa: PLC0415

    try:
        from torch._weights_only_unpickler import _get_allowed_globals  # noqa: PLC0415
        allowed = set(_get_allowed_globals())
    except Exception:  # noqa: BLE001 - private API: fall back to torch's own names
        allowed = None

    strings_ops = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING",
                   "STRING"}

    def scan(f) -> list[str]:
        found, strings, memo, n_memo, last = [], [], {}, 0, None
        for op, arg, _ in pickletools.genops(f):
            name = op.name
            if name in strings_ops:
                last = str(arg)
                strings.append(last)
                continue
            if name == "MEMOIZE":
                memo[n_memo], n_memo = last, n_memo + 1
                continue
            if name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(arg)] = last
                continue
            if name in ("BINGET", "LONG_BINGET", "GET") and memo.get(int(arg)) is not None:
                last = memo[int(arg)]
                strings.append(last)
                continue
            last = None
            if name in ("GLOBAL", "INST"):
                found.append(".".join(str(arg).split(" ", 1)))
            elif name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
        return found

    names: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    if info.filename.endswith(".pkl") and info.file_size <= 256 << 20:
                        names += scan(io.BytesIO(z.read(info)))
        else:
            with open(path, "rb") as f:
                for _ in range(8):  # torch's legacy format: several pickles, then raw storages
                    names += scan(f)
    except Exception:  # noqa: BLE001 - garbage after the pickles, or a damaged file: keep what was found
        pass
    from _compat_pickle import IMPORT_MAPPING  # noqa: PLC0415 - protocol 2 writes Python 2 module names

    out = []
    for n in names:
        module, _, attr = n.rpartition(".")
        n = f"{IMPORT_MAPPING.get(module, module)}.{attr}"
        short = n.removeprefix("builtins.")
        ok = n in allowed if allowed is not None else (n.startswith("torch.") or n == "collections.OrderedDict")
        if not ok and n not in out and short not in out:
            out.append(n)
    return out[:limit]


def _refuse_unpicklable(src: Path, exc: BaseException) -> ModelLoadError:
    names = _pickle_globals(src)
    if not names:
        m = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", str(exc)) or \
            re.search(r"unrecognized function (.+?)(?: which belongs|$)", str(exc), re.MULTILINE)
        if m:
            names = [m.group(1)]
    if names:
        need = (f"it needs {names[0]}, which is" if len(names) == 1 else f"it needs {', '.join(names)}, which are")
        return ModelLoadError(
            f"{src}: cannot be read safely with torch.load(weights_only=True): {need} not a tensor or a plain "
            "container but code (a class or function) that unpickling would import and run. SafeT2I never "
            "unpickles code and has not converted it; get these weights as a .safetensors file from their "
            "publisher.")
    return ModelLoadError(
        f"{src}: cannot be read safely with torch.load(weights_only=True) ({type(exc).__name__}: "
        f"{_torch_detail(exc)}). It is damaged, not a torch checkpoint, or needs objects beyond tensors and plain "
        "containers; SafeT2I will not unpickle it.")


def _storable(t: torch.Tensor) -> str | None:
    """Why safetensors cannot store ``t`` (None: it can)."""
    if t.layout != torch.strided:
        return f"a {str(t.layout).removeprefix('torch.')} tensor"
    if t.is_quantized:
        return f"a quantized tensor ({t.dtype})"
    try:
        from safetensors.torch import _SIZE  # noqa: PLC0415
    except ImportError:  # pragma: no cover - private table moved: let save_file decide
        return None
    if t.dtype not in _SIZE:
        return f"dtype {t.dtype}, which safetensors does not store"
    return None


def _path_text(path: tuple) -> str:
    return "".join(f"[{p!r}]" for p in path) or "the whole file"


_MAX_DEPTH, _MAX_ENTRIES = 64, 1_000_000


def _flatten(obj, src: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """({dotted name: tensor}, skipped entries) of an unpickled object; raises on collisions and
    on tensors that cannot be stored."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, tuple] = {}
    skipped: list[str] = []
    bad: list[str] = []

    def count(v) -> int:
        """Tensors held by ``v`` (each container once; bounded work for hostile structures)."""
        n, stack, seen, budget = 0, [v], set(), 100_000
        while stack and budget:
            x, budget = stack.pop(), budget - 1
            if isinstance(x, torch.Tensor):
                n += 1
            elif id(x) not in seen:
                seen.add(id(x))
                stack.extend(x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple, set, frozenset))
                             else ())
        return n

    visits = [0]

    def walk(v, path: tuple, ancestors: frozenset):
        visits[0] += 1
        if len(path) > _MAX_DEPTH or visits[0] > _MAX_ENTRIES:
            raise ModelLoadError(f"{src}: nested deeper than {_MAX_DEPTH} levels or more than {_MAX_ENTRIES} entries "
                                 f"(at {_path_text(path[:8])}…): not a checkpoint SafeT2I converts.")
        name = ".".join(str(p) for p in path)
        if isinstance(v, torch.Tensor):
            why = _storable(v)
            if why:
                bad.append(f"{name or 'the whole file'} ({why})")
                return
            name = name or "tensor"
            if name in out:
                raise ModelLoadError(
                    f"{src}: two tensors would both be stored as {name!r}: {_path_text(origin[name])} and "
                    f"{_path_text(path)}. SafeT2I will not drop either; rename one in the source.")
            out[name], origin[name] = v, path
            return
        if id(v) in ancestors:
            skipped.append(f"{name} (refers to itself)")
            return
        inner = ancestors | {id(v)}
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, (*path, k), inner)
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(x, (*path, i), inner)
        elif isinstance(v, (set, frozenset)) and count(v):
            bad.append(f"{name} (a set of {count(v)} tensors: no stable names)")
        else:
            skipped.append(f"{name or 'the whole file'} ({type(v).__name__}: not a tensor)")

    root = obj
    # Lightning/CompVis checkpoints keep the weights under "state_dict": the other entries
    # (epoch, optimizer states, ...) are skipped, and listed.
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        root = obj["state_dict"]
        for k, v in obj.items():
            if k != "state_dict":
                n = count(v)
                skipped.append(f"{k} (beside state_dict: {type(v).__name__}"
                               + (f", holding {n} tensor{'s' * (n != 1)}, not stored)" if n else ")"))
    walk(root, (), frozenset())
    if bad:
        more = f"; … and {len(bad) - 12} more" if len(bad) > 12 else ""
        raise ModelLoadError(f"{src}: safetensors cannot store {len(bad)} of its tensors, and SafeT2I will not drop "
                             "them: " + "; ".join(bad[:12]) + more)
    return out, skipped


def convert_pickle_report(src: str | os.PathLike, dst: str | os.PathLike | None = None,
                          overwrite: bool = False) -> PickleConversion:
    """Pickled checkpoint → ``.safetensors`` (tensors only, never overwriting without ``overwrite``),
    with the list of what was not stored. See the module docstring for the rules."""
    src = Path(src)
    dst = Path(dst) if dst else default_converted_path(src)
    if not src.is_file():
        raise ModelLoadError(f"{src}: no such file.")
    if dst.resolve() == src.resolve():
        raise ModelLoadError("the output would replace the input; choose another name.")
    if dst.exists() and not overwrite:
        raise ModelLoadError(f"{dst} already exists; pass --overwrite to replace it.")
    with open(src, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and not _looks_pickled(head) and head[8:9] == b"{":
        raise ModelLoadError(f"{src}: already a safetensors file, not a pickle; nothing to convert.")
    try:
        # A file object, not a path: torch >= 2.10 reads a path ending in .safetensors as safetensors.
        with open(src, "rb") as fh:
            obj = torch.load(fh, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, zip errors ...
        raise _refuse_unpicklable(src, exc) from None   # torch's advice (weights_only=False) is not passed on
    flat, skipped = _flatten(obj, src)
    if not flat:
        raise ModelLoadError(f"{src}: contains no tensors" + (f" (only: {'; '.join(skipped[:12])})" if skipped else "")
                             + ".")
    from ..fileio import save_safetensors  # noqa: PLC0415

    meta = {"converted_from": src.name, "converted_by": "safet2i convert", "source_sha256": file_sha256(src)}
    if skipped:
        meta["safet2i_skipped"] = json.dumps(skipped)
    try:
        # Shared storage (tied weights) must be cloned for safetensors.
        save_safetensors(dst, {k: v.detach().clone().contiguous() for k, v in flat.items()}, meta)
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"{dst}: cannot be written ({exc}).") from exc
    return PickleConversion(dst, list(flat), skipped)


def convert_pickle(src: str | os.PathLike, dst: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """:func:`convert_pickle_report`, returning the output path; entries not stored are logged as a
    warning (and listed in the output's ``safet2i_skipped`` metadata)."""
    rep = convert_pickle_report(src, dst, overwrite)
    if rep.skipped:
        logging.getLogger(__name__).warning("%s: not stored (not tensors): %s", Path(src).name, "; ".join(rep.skipped))
    return rep.path
