"""Stand-in for ``modules/images.py``: ``save_image`` (every file the webui writes passes
``before_image_saved`` first, which may replace ``params.image``), ``image_grid`` and
``resize_image``."""

from __future__ import annotations

import math
import os

from PIL import Image, PngImagePlugin

from modules import script_callbacks


def image_grid(imgs, batch_size=1, rows=None):
    rows = min(round(math.sqrt(len(imgs))), len(imgs))     # the "Grid row count" setting's default (-1)
    cols = math.ceil(len(imgs) / rows)
    w, h = map(max, zip(*(img.size for img in imgs)))
    grid = Image.new('RGB', size=(cols * w, rows * h), color="white")
    for i, img in enumerate(imgs):
        grid.paste(img, box=(i % cols * w, i // cols * h))
    return grid


def resize_image(resize_mode, im, width, height, upscaler_name=None):
    return im.resize((width, height), Image.LANCZOS)


def save_image(image, path, basename, seed=None, prompt=None, extension='png', info=None, short_filename=False,
               no_prompt=False, grid=False, pnginfo_section_name='parameters', p=None, existing_info=None, *,
               suffix=""):
    os.makedirs(path, exist_ok=True)
    n = len(os.listdir(path))
    name = f"{basename + '-' if basename else ''}{n:05}" + ("" if short_filename or seed is None else f"-{seed}")
    fullfn = os.path.join(path, f"{name}{suffix}.{extension}")
    pnginfo = existing_info or {}
    pnginfo[pnginfo_section_name] = info
    params = script_callbacks.ImageSaveParams(image, p, fullfn, pnginfo)
    script_callbacks.before_image_saved_callback(params)
    png = PngImagePlugin.PngInfo()
    for k, v in params.pnginfo.items():
        png.add_text(k, str(v))
    params.image.save(params.filename, format="PNG", pnginfo=png)
    return params.filename, None
