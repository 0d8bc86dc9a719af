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


def register_folders() -> None:
    """Make ``models/safet2i_filters`` (and the pack's ``models/filters``) a model folder
    listing sidecar ``.json`` files; honours ``extra_model_paths.yaml``."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([default, str(PACK_MODELS)], {".json"})
    else:
        folder_paths.add_model_folder_path(FOLDER, default)


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
