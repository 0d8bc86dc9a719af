"""Stand-in for ``modules/infotext_utils.py`` (A1111 >= 1.8, Forge, reForge): infotext quoting,
parsing and pasting (see ``_infotext_impl``)."""

from modules import _variant

if _variant.is_17():   # 1.7 names it generation_parameters_copypaste
    raise ImportError("modules.infotext_utils does not exist before A1111 1.8")

from modules._infotext_impl import connect_paste, parse_generation_parameters, quote  # noqa: E402,F401
