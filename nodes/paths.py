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


def register_folders() -> None:
    """Make ``models/safet2i_filters`` (and the pack's ``models/filters``) a model folder
    listing sidecar ``.json`` files; honours ``extra_model_paths.yaml``."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([default, str(PACK_MODELS)], {".json"})
    else:
        folder_paths.add_model_folder_path(FOLDER, default)
    safety = os.path.join(folder_paths.models_dir, SAFETY_FOLDER)
    if SAFETY_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[SAFETY_FOLDER] = ([safety, str(PACK_SAFETY)], set(SAFETY_EXTENSIONS))
    else:
        folder_paths.add_model_folder_path(SAFETY_FOLDER, safety)


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
