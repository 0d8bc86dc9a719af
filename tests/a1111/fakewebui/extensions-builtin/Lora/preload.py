"""Stand-in for the built-in Lora extension's ``preload.py`` (A1111/reForge ``Lora``, Forge
``sd_forge_lora``): the ``--lora-dir`` option."""

import os

from modules import paths


def preload(parser):
    parser.add_argument("--lora-dir", type=str, help="Path to directory with Lora networks.",
                        default=os.path.join(paths.models_path, 'Lora'))
