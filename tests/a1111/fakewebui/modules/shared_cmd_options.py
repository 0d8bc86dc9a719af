"""Stand-in for ``modules/shared_cmd_options.py``: the parser extensions' ``preload(parser)``
extend, and the parsed ``cmd_opts``."""

import argparse

parser = argparse.ArgumentParser()
parser.add_argument("--api", action="store_true")
parser.add_argument("--api-auth", type=str, default=None)
parser.add_argument("--nowebui", action="store_true")
parser.add_argument("--freeze-settings", action="store_true")
parser.add_argument("--freeze-settings-in-sections", type=str, default=None)
parser.add_argument("--freeze-specific-settings", type=str, default=None)
parser.add_argument("--hide-ui-dir-config", action="store_true")
parser.add_argument("--no-prompt-history", action="store_true")
parser.add_argument("--embeddings-dir", type=str, default="")

cmd_opts = parser.parse_args([])
