"""Stand-in for a reForge package (written from a reading of upstream); it exists on reForge only."""

from _variant import VARIANT as _VARIANT

if _VARIANT != "reforge":
    raise ImportError("this package is reForge's; this webui variant has none")
