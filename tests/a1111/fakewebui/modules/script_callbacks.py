"""Stand-in for ``modules/script_callbacks.py``.

Registration (``on_*``), the parameter classes the webui passes, and the invokers, which
(as upstream) catch and log every exception a callback raises and carry on. Callbacks run in
registration order (A1111 1.7 registers without ``name=``; later versions take ``name=`` and
may reorder them by the user's settings, which the stand-in does not model).
"""

from __future__ import annotations

import inspect
from collections import namedtuple

from modules import _variant, errors


class ImageSaveParams:
    def __init__(self, image, p, filename, pnginfo):
        self.image = image
        self.p = p
        self.filename = filename
        self.pnginfo = pnginfo


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


ScriptCallback = namedtuple("ScriptCallback", ["script", "callback"])

callback_map = {f"callbacks_{c}": [] for c in ("app_started", "ui_settings", "before_image_saved", "cfg_denoiser",
                                               "cfg_denoised", "before_ui")}


def clear_callbacks():
    for callback_list in callback_map.values():
        callback_list.clear()


def _invoke(category, *args):
    for c in callback_map['callbacks_' + category]:
        try:
            c.callback(*args)
        except Exception:
            errors.report(f"Error executing callback {category}_callback for {c.script}", exc_info=True)


def app_started_callback(demo, app):
    _invoke('app_started', demo, app)


def ui_settings_callback():
    _invoke('ui_settings')


def before_ui_callback():
    _invoke('before_ui')


def before_image_saved_callback(params: ImageSaveParams):
    _invoke('before_image_saved', params)


def cfg_denoiser_callback(params: CFGDenoiserParams):
    _invoke('cfg_denoiser', params)


def cfg_denoised_callback(params: CFGDenoisedParams):
    _invoke('cfg_denoised', params)


def remove_callbacks_for_function(callback_func):
    for callback_list in callback_map.values():
        for cb in [cb for cb in callback_list if cb.callback == callback_func]:
            callback_list.remove(cb)


def _register(category):
    def add(callback):
        caller = next((f.filename for f in inspect.stack(0) if f.filename != __file__), "unknown file")
        callback_map['callbacks_' + category].append(ScriptCallback(caller, callback))

    if _variant.is_17():
        return add

    def on(callback, *, name=None):
        add(callback)
    return on


on_app_started = _register('app_started')
on_ui_settings = _register('ui_settings')
on_before_image_saved = _register('before_image_saved')
on_cfg_denoiser = _register('cfg_denoiser')
on_cfg_denoised = _register('cfg_denoised')
on_before_ui = _register('before_ui')
