"""Stand-in for ``modules/script_loading.py``: script files are loaded by path, under their
base name, without being registered in ``sys.modules``."""

import importlib.util
import os


def load_module(path):
    module_spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def preload_extensions(extensions_dir, parser, extension_list=None):
    for dirname in sorted(extension_list):
        load_module(os.path.join(extensions_dir, dirname, "preload.py")).preload(parser)
