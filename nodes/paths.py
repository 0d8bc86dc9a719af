"""ComfyUI glue shared by the nodes: our model folder, progress bars, the --cpu flag.

We register our *own* folder name (``safet2i_filters``, extension ``.json``); ComfyUI's
shared extension sets and other folders are never touched.
"""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from ..safet2i.errors import ModelLoadError
from ..safet2i.filter import BUILTIN

FOLDER = "safet2i_filters"
PACK_MODELS = Path(__file__).resolve().parent.parent / "models" / "filters"
SAFETY_FOLDER = "safety_models"
PACK_SAFETY = Path(__file__).resolve().parent.parent / "models" / "safety_models"
# Our own set object (pickles listed so that choosing one explains how to convert it).
SAFETY_EXTENSIONS = {".safetensors", ".ckpt", ".pt", ".pth", ".bin"}


def _register(name: str, paths: list[str], extensions: set[str]) -> None:
    """Add ``paths`` to folder ``name`` with our own extension set; never mutates another set.

    When ``extra_model_paths.yaml`` (or another pack) registered ``name`` first, its paths are
    kept and ours appended; ComfyUI then gave the folder an empty set (= every file) or a shared
    set such as ``supported_pt_extensions``: we replace the tuple's set by a *new* set (theirs ∪
    ours) instead of adding to it, so ComfyUI's global sets and other folders stay unchanged.
    """
    fnp = folder_paths.folder_names_and_paths
    if name not in fnp:
        fnp[name] = (list(paths), set(extensions))
    else:
        for path in paths:
            folder_paths.add_model_folder_path(name, path)
        folder_list, exts = fnp[name]
        fnp[name] = (folder_list, set(extensions) | set(exts or ()))
    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.pop(name, None)


def register_folders() -> None:
    """``models/safet2i_filters`` (+ the pack's ``models/filters``: sidecar ``.json``) and
    ``models/safety_models`` (+ the pack's ``models/safety_models``: weights), honouring
    ``extra_model_paths.yaml``; the pack's own folders are added in every case."""
    _register(FOLDER, [os.path.join(folder_paths.models_dir, FOLDER), str(PACK_MODELS)], {".json"})
    _register(SAFETY_FOLDER, [os.path.join(folder_paths.models_dir, SAFETY_FOLDER), str(PACK_SAFETY)],
              SAFETY_EXTENSIONS)


def _folders(lora: bool) -> tuple[str, ...]:
    return (SAFETY_FOLDER, "loras") if lora else (SAFETY_FOLDER,)


def safety_weight_names(lora: bool) -> list[str]:
    names: list[str] = []
    for folder in _folders(lora):
        try:
            names += [n for n in folder_paths.get_filename_list(folder) if n not in names]
        except Exception:  # noqa: BLE001 - listing is cosmetic; loading re-checks
            pass
    return names


def safety_weight_path(name: str, lora: bool) -> str:
    """Only names ComfyUI lists are accepted (no ``../`` tricks from workflow JSON)."""
    for folder in _folders(lora):
        try:
            if name in folder_paths.get_filename_list(folder):
                return folder_paths.get_full_path_or_raise(folder, name)
        except Exception:  # noqa: BLE001
            continue
    where = "models/safety_models or models/loras" if lora else "models/safety_models"
    raise ModelLoadError(f"Safety weights {name!r} not found in {where}; put the .safetensors file there and refresh.")


def filter_model_names() -> list[str]:
    names = list(BUILTIN)
    try:
        names += [n for n in folder_paths.get_filename_list(FOLDER) if n not in names]
    except Exception:  # noqa: BLE001 - listing is cosmetic; loading re-checks
        pass
    return names


def sidecar_path(name: str) -> str:
    """Resolve a sidecar chosen in the UI; only names ComfyUI lists are accepted, so a
    workflow cannot point the loader at arbitrary paths (``../../etc``)."""
    if name not in folder_paths.get_filename_list(FOLDER):
        raise ModelLoadError(
            f"Filter model {name!r} is not a built-in model nor a sidecar .json in "
            f"models/{FOLDER}; put the .onnx and its .json there and refresh."
        )
    return folder_paths.get_full_path_or_raise(FOLDER, name)


def comfy_cpu_only() -> bool:
    try:
        from comfy.cli_args import args  # noqa: PLC0415

        return bool(getattr(args, "cpu", False))
    except Exception:  # noqa: BLE001
        return False


def progress_bar(total: int):
    """``update(n)`` callable driving ComfyUI's progress bar (a no-op outside ComfyUI)."""
    try:
        import comfy.utils  # noqa: PLC0415

        bar = comfy.utils.ProgressBar(max(1, total))
        return bar.update
    except Exception:  # noqa: BLE001
        return lambda n: None
