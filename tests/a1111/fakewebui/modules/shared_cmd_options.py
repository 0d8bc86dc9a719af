"""Stand-in for ``modules/shared_cmd_options.py``: the parser extensions' ``preload(parser)``
extend, and the parsed ``cmd_opts``."""

import argparse

parser = argparse.ArgumentParser()
parser.add_argument("--api", action="store_true")
parser.add_argument("--api-auth", type=str, default=None)
parser.add_argument("--nowebui", action="store_true")

cmd_opts = parser.parse_args([])
