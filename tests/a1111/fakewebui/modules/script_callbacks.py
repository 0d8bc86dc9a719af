"""Stand-in for ``modules/script_callbacks.py``.

Registration (``on_*``), the parameter classes the webui passes, and the invokers, which
(as upstream) catch and log every exception a callback raises and carry on. A1111 1.7
registers without ``name=`` and calls callbacks in registration order; 1.10, Forge and
reForge take ``name=`` and order them (``ordered_callbacks``; no metadata.ini ordering here).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections import namedtuple

from modules import _variant, errors


def report_exception(c, job):
    errors.report(f"Error executing callback {job} for {c.script}", exc_info=True)


class ImageSaveParams:
    def __init__(self, image, p, filename, pnginfo):
        self.image = image
        self.p = p
        self.filename = filename
        self.pnginfo = pnginfo


class ExtraNoiseParams:
    def __init__(self, noise, x, xi):
        self.noise = noise
        self.x = x
        self.xi = xi


if _variant.is_17():
    class CFGDenoiserParams:
        def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond):
            self.x = x
            self.image_cond = image_cond
            self.sigma = sigma
            self.sampling_step = sampling_step
            self.total_sampling_steps = total_sampling_steps
            self.text_cond = text_cond
            self.text_uncond = text_uncond
else:
    class CFGDenoiserParams:
        def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond,
                     denoiser=None):
            self.x = x
            self.image_cond = image_cond
            self.sigma = sigma
            self.sampling_step = sampling_step
            self.total_sampling_steps = total_sampling_steps
            self.text_cond = text_cond
            self.text_uncond = text_uncond
            self.denoiser = denoiser


class CFGDenoisedParams:
    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.inner_model = inner_model


class AfterCFGCallbackParams:
    def __init__(self, x, sampling_step, total_sampling_steps):
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps


class ImageGridLoopParams:
    def __init__(self, imgs, cols, rows):
        self.imgs = imgs
        self.cols = cols
        self.rows = rows


if _variant.is_17():
    ScriptCallback = namedtuple("ScriptCallback", ["script", "callback"])
else:
    @dataclasses.dataclass
    class ScriptCallback:
        script: str
        callback: object
        name: str = "unnamed"

_CATEGORIES = ("app_started", "model_loaded", "ui_tabs", "ui_train_tabs", "ui_settings", "before_image_saved",
               "image_saved", "extra_noise", "cfg_denoiser", "cfg_denoised", "cfg_after_cfg", "before_component",
               "after_component", "image_grid", "infotext_pasted", "script_unloaded", "before_ui", "on_reload",
               "list_optimizers", "list_unets")
callback_map = {f"callbacks_{c}": [] for c in _CATEGORIES}
_ordered = {}


def _caller_file() -> str:
    stack = [x for x in inspect.stack() if x.filename != __file__]
    return stack[0].filename if stack else "unknown file"


def _add_17(callbacks, fun):
    callbacks.append(ScriptCallback(_caller_file(), fun))


def _add(callbacks, fun, *, name=None, category='unknown', filename=None):
    if filename is None:
        filename = _caller_file()
    callback_name = f"base/{os.path.basename(filename)}/{category}" + (f"/{name}" if name is not None else "")
    unique = callback_name
    for index in range(1000):
        if not any(x.name == unique for x in callbacks):
            break
        unique = f"{callback_name}-{index + 1}"
    callbacks.append(ScriptCallback(filename, fun, unique))


def _ordered_impl(category, unordered_callbacks=None, *, enable_user_sort=True):
    if unordered_callbacks is None:
        unordered_callbacks = callback_map.get('callbacks_' + category, [])
    return list(unordered_callbacks)


if _variant.is_17():
    add_callback = _add_17
else:
    add_callback = _add
    ordered_callbacks = _ordered_impl
    ordered_callbacks_map = _ordered


def _each(category):
    return _ordered_impl(category)


def clear_callbacks():
    for callback_list in callback_map.values():
        callback_list.clear()
    _ordered.clear()


def _invoke(category, job, *args):
    for c in _each(category):
        try:
            c.callback(*args)
        except Exception:
            report_exception(c, job)


def app_started_callback(demo, app):
    _invoke('app_started', 'app_started_callback', demo, app)


def model_loaded_callback(sd_model):
    _invoke('model_loaded', 'model_loaded_callback', sd_model)


def ui_settings_callback():
    _invoke('ui_settings', 'ui_settings_callback')


def before_ui_callback():
    _invoke('before_ui', 'before_ui_callback')


def before_image_saved_callback(params: ImageSaveParams):
    _invoke('before_image_saved', 'before_image_saved_callback', params)


def image_saved_callback(params: ImageSaveParams):
    _invoke('image_saved', 'image_saved_callback', params)


def cfg_denoiser_callback(params: CFGDenoiserParams):
    _invoke('cfg_denoiser', 'cfg_denoiser_callback', params)


def cfg_denoised_callback(params: CFGDenoisedParams):
    _invoke('cfg_denoised', 'cfg_denoised_callback', params)


def cfg_after_cfg_callback(params: AfterCFGCallbackParams):
    _invoke('cfg_after_cfg', 'cfg_after_cfg_callback', params)


def image_grid_callback(params: ImageGridLoopParams):
    _invoke('image_grid', 'image_grid', params)


def infotext_pasted_callback(infotext: str, params: dict):
    _invoke('infotext_pasted', 'infotext_pasted', infotext, params)


def script_unloaded_callback():
    _invoke('script_unloaded', 'script_unloaded')


def remove_current_script_callbacks():
    filename = _caller_file()
    if filename == 'unknown file':
        return
    for callback_list in callback_map.values():
        for cb in [cb for cb in callback_list if cb.script == filename]:
            callback_list.remove(cb)


def remove_callbacks_for_function(callback_func):
    for callback_list in callback_map.values():
        for cb in [cb for cb in callback_list if cb.callback == callback_func]:
            callback_list.remove(cb)


def _register(category):
    if _variant.is_17():
        def on(callback):
            _add_17(callback_map['callbacks_' + category], callback)
    else:
        def on(callback, *, name=None):
            _add(callback_map['callbacks_' + category], callback, name=name, category=category,
                 filename=_caller_file())
    return on


on_app_started = _register('app_started')
on_model_loaded = _register('model_loaded')
on_ui_tabs = _register('ui_tabs')
on_ui_settings = _register('ui_settings')
on_before_image_saved = _register('before_image_saved')
on_image_saved = _register('image_saved')
on_extra_noise = _register('extra_noise')
on_cfg_denoiser = _register('cfg_denoiser')
on_cfg_denoised = _register('cfg_denoised')
on_cfg_after_cfg = _register('cfg_after_cfg')
on_image_grid = _register('image_grid')
on_infotext_pasted = _register('infotext_pasted')
on_script_unloaded = _register('script_unloaded')
on_before_ui = _register('before_ui')
