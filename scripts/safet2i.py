"""A1111 / Forge / reForge entry point (the webui only loads top-level ``scripts/*.py``).

This shim makes the extension package importable under its unique name and exposes its
script classes in this module's namespace, where the webui's loader registers them.
ComfyUI ignores this folder.
"""

import sys
from pathlib import Path

_EXT = str(Path(__file__).resolve().parents[1] / "extension")
if _EXT not in sys.path:
    sys.path.insert(0, _EXT)

from safet2i_a1111.script import SafeT2IScript, register_callbacks  # noqa: E402,F401  (registered by the webui)
from safet2i_a1111.extras import SafeT2IExtras  # noqa: E402,F401  (Extras tab)

# The webui clears every callback before it (re)loads scripts ("Reload UI"); the package above
# stays imported, so its callbacks are registered again from here each time.
register_callbacks()
