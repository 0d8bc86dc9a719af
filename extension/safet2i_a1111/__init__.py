"""SafeT2I for AUTOMATIC1111 / Forge / reForge (the second host of the same core).

Loaded by the root ``scripts/safet2i.py`` shim, which puts ``extension/`` on ``sys.path``;
the package name is unique so it cannot clash with other extensions' modules. Everything
that touches the webui lives here; the safety logic is ``safet2i`` (the core).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]   # the repository: safet2i/ lives here
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TITLE = "SafeT2I"
