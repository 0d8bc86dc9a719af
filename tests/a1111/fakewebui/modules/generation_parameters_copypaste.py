"""Stand-in for A1111 1.7's ``modules/generation_parameters_copypaste.py`` (renamed
``infotext_utils`` in 1.8)."""

from modules import _variant

if not _variant.is_17():
    raise ImportError("modules.generation_parameters_copypaste only exists before A1111 1.8")

from modules import _infotext_impl  # noqa: E402
from modules._infotext_impl import connect_paste, quote, re_imagesize, re_param, re_param_code, unquote  # noqa: E402,F401


def parse_generation_parameters(x: str):
    return _infotext_impl.parse_generation_parameters(x)
