"""Stand-in for Forge's ``backend`` package (written from a reading of upstream); it exists on Forge only."""

from _variant import VARIANT as _VARIANT

if _VARIANT != "forge":
    raise ImportError("backend is Forge's package; this webui variant has none")
