"""Stand-in for ``modules/paths.py``."""

import os
import tempfile

script_path = os.environ.get("FAKEWEBUI_ROOT") or tempfile.mkdtemp(prefix="fakewebui-")
models_path = os.path.join(script_path, "models")
