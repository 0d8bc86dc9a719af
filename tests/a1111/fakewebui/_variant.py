"""Which webui the stand-in imitates (stand-in internal, not an upstream module).

``a1111-1.10`` (AUTOMATIC1111 1.10.x), ``a1111-1.7`` (1.7.0: no
``postprocess_image_after_composite``, ``CFGDenoiserParams`` without ``denoiser``, callbacks
without ``name=`` and unordered), ``forge`` (lllyasviel Forge 2, ``backend/``) and ``reforge``
(Panchovix reForge, ``modules_forge/`` + ``ldm_patched/``). Modules read it when imported;
``tests/a1111/conftest.py`` re-imports the whole stand-in to switch.
"""

import os

VARIANT = os.environ.get("FAKEWEBUI_VARIANT", "a1111-1.10")


def is_17() -> bool:
    return VARIANT == "a1111-1.7"


def forge_like() -> bool:
    return VARIANT in ("forge", "reforge")
