"""Stand-in for ``modules/scripts.py``: the ``Script`` base class, argument objects and the
``ScriptRunner`` that slices ``p.script_args`` for each always-on script and calls its hooks,
logging (not raising) whatever a hook raises, as upstream does.

Variants: A1111 1.7 has no ``postprocess_image_after_composite``, ``post_sample``,
``postprocess_maskoverlay``, ``on_mask_blend`` or ``process_before_every_sampling`` and
iterates ``alwayson_scripts`` in load order; Forge/reForge add ``sorting_priority``,
``before_process_init_images`` and ``PostprocessImageArgs.index`` (Forge).
"""

from __future__ import annotations

import inspect
import os
import sys
from collections import namedtuple

from modules import _variant, errors, paths, script_callbacks, script_loading, scripts_postprocessing

AlwaysVisible = object()
_V17 = _variant.is_17()
_FORGE = _variant.VARIANT == "forge"


class PostprocessBatchListArgs:
    def __init__(self, images):
        self.images = images


if _FORGE:
    class PostprocessImageArgs:
        def __init__(self, image, index):
            self.image = image
            self.index = index
else:
    class PostprocessImageArgs:
        def __init__(self, image):
            self.image = image

if not _V17:
    class MaskBlendArgs:
        def __init__(self, current_latent, nmask, init_latent, mask, blended_latent, denoiser=None, sigma=None):
            self.current_latent = current_latent
            self.nmask = nmask
            self.init_latent = init_latent
            self.mask = mask
            self.blended_latent = blended_latent
            self.denoiser = denoiser
            self.is_final_blend = denoiser is None
            self.sigma = sigma

    class PostSampleArgs:
        def __init__(self, samples):
            self.samples = samples

    class PostProcessMaskOverlayArgs:
        def __init__(self, index, mask_for_overlay, overlay_image):
            self.index = index
            self.mask_for_overlay = mask_for_overlay
            self.overlay_image = overlay_image


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    setup_for_ui_only = False
    if not _variant.is_17():
        controls = None
    if _variant.forge_like():
        sorting_priority = 0

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def after_extra_networks_activate(self, p, *args, **kwargs):
        pass

    if not _V17:
        def process_before_every_sampling(self, p, *args, **kwargs):
            pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch_list(self, p, pp, *args, **kwargs):
        pass

    if not _V17:
        def on_mask_blend(self, p, mba, *args):
            pass

        def post_sample(self, p, ps, *args):
            pass

    def postprocess_image(self, p, pp, *args):
        pass

    if not _V17:
        def postprocess_maskoverlay(self, p, ppmo, *args):
            pass

        def postprocess_image_after_composite(self, p, pp, *args):
            pass

    def postprocess(self, p, processed, *args):
        pass

    def before_hr(self, p, *args):
        pass


current_basedir = paths.script_path


def basedir():
    return current_basedir


ScriptFile = namedtuple("ScriptFile", ["basedir", "filename", "path"])
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data = []
postprocessing_scripts_data = []
_extension_dirs: list[str] = []      # stand-in: the installed extensions (upstream: extensions.active())


def list_scripts(scriptdirname, extension, *, include_extensions=True):
    found = []
    for ext_dir in _extension_dirs if include_extensions else []:
        d = os.path.join(ext_dir, scriptdirname)
        if not os.path.isdir(d):
            continue
        for filename in sorted(os.listdir(d)):
            path = os.path.join(d, filename)
            if os.path.isfile(path) and os.path.splitext(filename)[1].lower() == extension:
                found.append(ScriptFile(ext_dir, filename, path))
    return found


def load_scripts():
    """Clears every registered callback, then executes each extension's ``scripts/*.py``
    (with the extension folder first on ``sys.path``) and registers its Script classes."""
    global current_basedir, scripts_txt2img, scripts_img2img, scripts_postproc
    scripts_data.clear()
    postprocessing_scripts_data.clear()
    script_callbacks.clear_callbacks()
    syspath = sys.path
    for scriptfile in list_scripts("scripts", ".py"):
        try:
            if scriptfile.basedir != paths.script_path:
                sys.path = [scriptfile.basedir] + sys.path
            current_basedir = scriptfile.basedir
            module = script_loading.load_module(scriptfile.path)
            for script_class in module.__dict__.values():
                if not inspect.isclass(script_class):
                    continue
                if issubclass(script_class, Script):
                    scripts_data.append(ScriptClassData(script_class, scriptfile.path, scriptfile.basedir, module))
                elif issubclass(script_class, scripts_postprocessing.ScriptPostprocessing):
                    postprocessing_scripts_data.append(
                        ScriptClassData(script_class, scriptfile.path, scriptfile.basedir, module))
        except Exception:
            errors.report(f"Error loading script: {scriptfile.filename}", exc_info=True)
        finally:
            sys.path = syspath
            current_basedir = paths.script_path
    scripts_txt2img = ScriptRunner()
    scripts_img2img = ScriptRunner()
    scripts_postproc = scripts_postprocessing.ScriptPostprocessingRunner()


def wrap_call(func, filename, funcname, *args, default=None, **kwargs):
    try:
        return func(*args, **kwargs)
    except Exception:
        errors.report(f"Error calling: {filename}/{funcname}", exc_info=True)
    return default


class ScriptRunner:
    def __init__(self):
        self.scripts = []
        self.selectable_scripts = []
        self.alwayson_scripts = []
        self.titles = []
        self.title_map = {}
        self.infotext_fields = []
        self.paste_field_names = []
        self.inputs = [None]

    def initialize_scripts(self, is_img2img):
        self.scripts.clear()
        self.alwayson_scripts.clear()
        self.selectable_scripts.clear()
        for script_data in scripts_data:
            script = script_data.script_class()
            script.filename = script_data.path
            script.is_txt2img = not is_img2img
            script.is_img2img = is_img2img
            script.tabname = "img2img" if is_img2img else "txt2img"
            visibility = script.show(script.is_img2img)
            if visibility == AlwaysVisible:
                self.scripts.append(script)
                self.alwayson_scripts.append(script)
                script.alwayson = True
            elif visibility:
                self.scripts.append(script)
                self.selectable_scripts.append(script)

    def create_script_ui(self, script):
        script.args_from = len(self.inputs)
        script.args_to = len(self.inputs)
        controls = wrap_call(script.ui, script.filename, "ui", script.is_img2img)
        if not _V17:
            script.controls = controls
        if controls is None:
            return
        script.name = wrap_call(script.title, script.filename, "title", default=script.filename).lower()
        if script.infotext_fields is not None:
            self.infotext_fields += script.infotext_fields
        if script.paste_field_names is not None:
            self.paste_field_names += script.paste_field_names
        self.inputs += controls
        script.args_to = len(self.inputs)

    def setup_ui(self):
        import gradio as gr
        all_titles = [wrap_call(s.title, s.filename, "title") or s.filename for s in self.scripts]
        self.title_map = {title.lower(): s for title, s in zip(all_titles, self.scripts)}
        self.titles = [wrap_call(s.title, s.filename, "title") for s in self.selectable_scripts]
        scriptlist = self.alwayson_scripts
        if _variant.forge_like():
            scriptlist = sorted(scriptlist, key=lambda x: x.sorting_priority)
        for script in scriptlist:
            with gr.Group(visible=script.alwayson) as group:
                self.create_script_ui(script)
            script.group = group
        self.inputs[0] = gr.Dropdown(label="Script", choices=["None"] + self.titles, value="None", type="index")
        for script in self.selectable_scripts:
            with gr.Group(visible=False) as group:
                self.create_script_ui(script)
            script.group = group
        return self.inputs

    def script(self, title):
        return self.title_map.get(title.lower())

    def _ordered_scripts(self, method_name):
        """Always-on scripts that override ``method_name`` (1.7: all, in load order)."""
        if _V17:
            return list(self.alwayson_scripts)
        return [s for s in self.alwayson_scripts
                if getattr(s.__class__, method_name, None) != getattr(Script, method_name, None)]

    def _call(self, method_name, p, *before, **kwargs):
        for script in self._ordered_scripts(method_name):
            try:
                script_args = p.script_args[script.args_from:script.args_to]
                getattr(script, method_name)(p, *before, *script_args, **kwargs)
            except Exception:
                errors.report(f"Error running {method_name}: {script.filename}", exc_info=True)

    def setup_scrips(self, p, *, is_ui=True):
        for script in self._ordered_scripts('setup'):
            if not is_ui and script.setup_for_ui_only:
                continue
            try:
                script_args = p.script_args[script.args_from:script.args_to]
                script.setup(p, *script_args)
            except Exception:
                errors.report(f"Error running setup: {script.filename}", exc_info=True)

    def before_process(self, p):
        self._call('before_process', p)

    def process(self, p):
        self._call('process', p)

    def before_process_batch(self, p, **kwargs):
        self._call('before_process_batch', p, **kwargs)

    def after_extra_networks_activate(self, p, **kwargs):
        self._call('after_extra_networks_activate', p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._call('process_batch', p, **kwargs)

    if not _V17:
        def process_before_every_sampling(self, p, **kwargs):
            if _FORGE:   # Forge calls every always-on script, in load order
                for script in self.alwayson_scripts:
                    try:
                        script_args = p.script_args[script.args_from:script.args_to]
                        script.process_before_every_sampling(p, *script_args, **kwargs)
                    except Exception:
                        errors.report(f"Error running process_before_every_sampling: {script.filename}",
                                      exc_info=True)
                return
            self._call('process_before_every_sampling', p, **kwargs)

    def postprocess(self, p, processed):
        self._call('postprocess', p, processed)

    def postprocess_batch(self, p, images, **kwargs):
        for script in self._ordered_scripts('postprocess_batch'):
            try:
                script_args = p.script_args[script.args_from:script.args_to]
                script.postprocess_batch(p, *script_args, images=images, **kwargs)
            except Exception:
                errors.report(f"Error running postprocess_batch: {script.filename}", exc_info=True)

    def postprocess_batch_list(self, p, pp, **kwargs):
        self._call('postprocess_batch_list', p, pp, **kwargs)

    if not _V17:
        def post_sample(self, p, ps):
            self._call('post_sample', p, ps)

        def on_mask_blend(self, p, mba):
            self._call('on_mask_blend', p, mba)

        def postprocess_maskoverlay(self, p, ppmo):
            self._call('postprocess_maskoverlay', p, ppmo)

        def postprocess_image_after_composite(self, p, pp):
            self._call('postprocess_image_after_composite', p, pp)

    def postprocess_image(self, p, pp):
        self._call('postprocess_image', p, pp)

    def before_hr(self, p):
        self._call('before_hr', p)


scripts_txt2img: ScriptRunner = None
scripts_img2img: ScriptRunner = None
scripts_postproc: scripts_postprocessing.ScriptPostprocessingRunner = None
