"""Stand-in for ``modules/images.py``: ``save_image`` (every file the webui writes passes
``before_image_saved`` first, which may replace ``params.image``; then ``image_saved``),
``image_grid`` and ``resize_image``."""

from __future__ import annotations

import math
import os

from PIL import Image, PngImagePlugin

from modules import script_callbacks
from modules.shared import opts


def image_grid(imgs, batch_size=1, rows=None):
    if rows is None:
        if opts.n_rows > 0:
            rows = opts.n_rows
        elif opts.n_rows == 0:
            rows = batch_size
        else:
            rows = round(math.sqrt(len(imgs)))
    rows = min(rows, len(imgs))
    cols = math.ceil(len(imgs) / rows)
    params = script_callbacks.ImageGridLoopParams(imgs, cols, rows)
    script_callbacks.image_grid_callback(params)
    w, h = map(max, zip(*(img.size for img in imgs)))
    grid = Image.new('RGB', size=(params.cols * w, params.rows * h), color="white")
    for i, img in enumerate(params.imgs):
        grid.paste(img, box=(i % params.cols * w, i // params.cols * h))
    return grid


def resize_image(resize_mode, im, width, height, upscaler_name=None):
    return im.resize((width, height), Image.LANCZOS)


def save_image_with_geninfo(image, geninfo, filename, extension=None, existing_pnginfo=None,
                            pnginfo_section_name='parameters'):
    pnginfo = PngImagePlugin.PngInfo()
    for k, v in (existing_pnginfo or {}).items():
        pnginfo.add_text(k, str(v))
    if geninfo is not None:
        pnginfo.add_text(pnginfo_section_name, geninfo)
    image.save(filename, format="PNG", pnginfo=pnginfo)


def save_image(image, path, basename, seed=None, prompt=None, extension='png', info=None, short_filename=False,
               no_prompt=False, grid=False, pnginfo_section_name='parameters', p=None, existing_info=None,
               forced_filename=None, suffix="", save_to_dirs=None):
    os.makedirs(path, exist_ok=True)
    if forced_filename is None:
        n = len([f for f in os.listdir(path) if not f.endswith(".txt")])
        name = f"{basename + '-' if basename else ''}{n:05}" + ("" if short_filename or seed is None else f"-{seed}")
        fullfn = os.path.join(path, f"{name}{suffix}.{extension}")
    else:
        fullfn = os.path.join(path, f"{forced_filename}.{extension}")
    pnginfo = existing_info or {}
    if info is not None:
        pnginfo[pnginfo_section_name] = info
    params = script_callbacks.ImageSaveParams(image, p, fullfn, pnginfo)
    script_callbacks.before_image_saved_callback(params)
    image = params.image
    fullfn = params.filename
    info = params.pnginfo.get(pnginfo_section_name, None)
    save_image_with_geninfo(image, info, fullfn, extension, existing_pnginfo={
        k: v for k, v in params.pnginfo.items() if k != pnginfo_section_name}, pnginfo_section_name=pnginfo_section_name)
    image.already_saved_as = fullfn
    script_callbacks.image_saved_callback(params)
    return fullfn, None


def read_info_from_image(image):
    items = dict(image.info or {})
    geninfo = items.pop('parameters', None)
    return geninfo, items
