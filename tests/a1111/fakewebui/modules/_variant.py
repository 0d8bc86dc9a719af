"""Stand-in internal: the variant switch (see ``fakewebui/_variant.py``)."""

from _variant import VARIANT, forge_like, is_17  # noqa: F401
