"""Reading safety weights: safetensors only, with clear errors for everything else.

Pickled checkpoints (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) can run code when loaded, so they
are refused; :func:`convert_pickle` (CLI ``safet2i convert``) turns them into safetensors with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..runtime import file_sha256

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


def _pickle_hint(path: Path) -> str:
    return (f"{path.name} is a pickled checkpoint, which can execute code when loaded; SafeT2I only loads "
            f"safetensors. Convert it once with: safet2i convert \"{path}\" (it uses torch.load(weights_only=True) "
            "and writes a .safetensors file next to it).")


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


def convert_pickle(src: str | os.PathLike, dst: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Pickled checkpoint → ``.safetensors`` (tensors only), never overwriting without ``overwrite``."""
    src = Path(src)
    dst = Path(dst) if dst else src.with_suffix(".safetensors")
    if not src.is_file():
        raise ModelLoadError(f"{src}: no such file.")
    if dst.exists() and not overwrite:
        raise ModelLoadError(f"{dst} already exists; pass --overwrite to replace it.")
    if dst.resolve() == src.resolve():
        raise ModelLoadError("the output would replace the input; choose another name.")
    try:
        obj = torch.load(str(src), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, zip errors ...
        raise ModelLoadError(
            f"{src}: cannot be read safely with torch.load(weights_only=True) ({type(exc).__name__}: {exc}). "
            "It may contain code or custom classes; SafeT2I will not unpickle it."
        ) from exc
    flat = _flatten(obj)
    if not flat:
        raise ModelLoadError(f"{src}: contains no tensors.")
    from safetensors.torch import save_file  # noqa: PLC0415

    # Shared storage (tied weights) must be cloned for safetensors.
    tmp = dst.with_name(dst.name + ".part")
    save_file({k: v.detach().clone().contiguous() for k, v in flat.items()}, str(tmp),
              metadata={"converted_from": src.name, "converted_by": "safet2i convert"})
    os.replace(tmp, dst)
    return dst


def _flatten(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix.rstrip("."): obj}
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, dict):
        # Lightning/CompVis checkpoints keep weights under "state_dict".
        if prefix == "" and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    return out
