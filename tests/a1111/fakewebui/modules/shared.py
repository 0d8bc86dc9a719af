"""Stand-in for ``modules/shared.py``: ``opts``, ``cmd_opts``, ``state``, ``sd_model``."""

from modules import options, shared_cmd_options

cmd_opts = shared_cmd_options.cmd_opts
parser = shared_cmd_options.parser

parallel_processing_allowed = True
options_section = options.options_section
OptionInfo = options.OptionInfo

options_templates: dict = None
opts: options.Options = None
restricted_opts: set = None
state = None
sd_model = None


def _init():
    """What ``modules/shared_init.py`` does at start-up (stand-in)."""
    global options_templates, opts, restricted_opts, state
    from modules import shared_options, shared_state
    options_templates = shared_options.options_templates
    restricted_opts = set()
    opts = options.Options(dict(options_templates), restricted_opts)
    state = shared_state.State()


_init()
