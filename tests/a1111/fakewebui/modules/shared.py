"""Stand-in for ``modules/shared.py``: ``opts``, ``cmd_opts``, ``state``, ``sd_model`` (set up as
``modules/shared_init.py`` does at start-up)."""

from modules import options, shared_cmd_options, shared_options, shared_state

cmd_opts = shared_cmd_options.cmd_opts
parallel_processing_allowed = True
OptionInfo = options.OptionInfo
opts = options.Options(dict(shared_options.options_templates), set())
state = shared_state.State()
sd_model = None
