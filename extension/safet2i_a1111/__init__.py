"""SafeT2I for AUTOMATIC1111 / Forge / reForge (the second host of the same core).

Loaded by the root ``scripts/safet2i.py`` shim, which puts ``extension/`` on ``sys.path``;
the package name is unique so it cannot clash with other extensions' modules. Everything
that touches the webui lives here; the safety logic is ``safet2i`` (the core).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]   # the repository: safet2i/ lives here


def _load_core() -> None:
    """Makes ``import safet2i`` give this checkout's core without putting the repository root
    on ``sys.path`` (its ``nodes/``, ``install.py``, ``preload.py``, ``tests/``, ``tools/``
    would then shadow the webui's or other extensions' modules of the same names)."""
    core = ROOT / "safet2i"
    loaded = sys.modules.get("safet2i")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve().parent == core:
        return
    # Another copy (an older install, a pip-installed safet2i): drop it and every submodule
    # it loaded, so this checkout's modules are never mixed with that copy's.
    for name in [n for n in sys.modules if n == "safet2i" or n.startswith("safet2i.")]:
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location("safet2i", core / "__init__.py",
                                                  submodule_search_locations=[str(core)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["safet2i"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("safet2i", None)
        raise


_load_core()

TITLE = "SafeT2I"
