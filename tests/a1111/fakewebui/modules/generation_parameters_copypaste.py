"""Stand-in for A1111 1.7's ``modules/generation_parameters_copypaste.py`` (renamed
``infotext_utils`` in 1.8)."""

from modules import _variant

if not _variant.is_17():
    raise ImportError("modules.generation_parameters_copypaste only exists before A1111 1.8")

from modules._infotext_impl import connect_paste, parse_generation_parameters, quote  # noqa: E402,F401
