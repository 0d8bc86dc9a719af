"""Stand-in for ``modules/scripts.py``: the ``Script`` base class, argument objects and the
``ScriptRunner`` that slices ``p.script_args`` for each always-on script and calls its hooks,
logging (not raising) whatever a hook raises, as upstream does.

Variants: A1111 1.7 has no ``postprocess_image_after_composite``, ``postprocess_maskoverlay``
or ``process_before_every_sampling`` and calls every always-on script; Forge adds
``PostprocessImageArgs.index``.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections import namedtuple

from modules import _variant, errors, script_callbacks, script_loading, scripts_postprocessing

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
    class PostProcessMaskOverlayArgs:
        def __init__(self, index, mask_for_overlay, overlay_image):
            self.index = index
            self.mask_for_overlay = mask_for_overlay
            self.overlay_image = overlay_image


class Script:
    filename = None
    args_from = None
    args_to = None
    is_img2img = False

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

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


ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data = []
postprocessing_scripts_data = []
_extension_dirs: list[str] = []      # stand-in: the installed extensions (upstream: extensions.active())


def load_scripts():
    """Clears every registered callback, then executes each extension's ``scripts/*.py``
    (with the extension folder first on ``sys.path``) and registers its Script classes."""
    global scripts_txt2img, scripts_img2img, scripts_postproc
    scripts_data.clear()
    postprocessing_scripts_data.clear()
    script_callbacks.clear_callbacks()
    syspath = sys.path
    for basedir in _extension_dirs:
        folder = os.path.join(basedir, "scripts")
        for filename in sorted(f for f in os.listdir(folder) if f.endswith(".py")):
            path = os.path.join(folder, filename)
            sys.path = [basedir] + sys.path
            try:
                module = script_loading.load_module(path)
            finally:
                sys.path = syspath
            for script_class in module.__dict__.values():
                if not inspect.isclass(script_class):
                    continue
                if issubclass(script_class, Script):
                    scripts_data.append(ScriptClassData(script_class, path, basedir, module))
                elif issubclass(script_class, scripts_postprocessing.ScriptPostprocessing):
                    postprocessing_scripts_data.append(ScriptClassData(script_class, path, basedir, module))
    scripts_txt2img = ScriptRunner()
    scripts_img2img = ScriptRunner()
    scripts_postproc = scripts_postprocessing.ScriptPostprocessingRunner()


class ScriptRunner:
    def __init__(self):
        self.scripts = []
        self.alwayson_scripts = []
        self.inputs = [None]        # upstream: [0] is the dropdown of the selectable scripts

    def initialize_scripts(self, is_img2img):
        self.scripts.clear()
        self.alwayson_scripts.clear()
        for script_data in scripts_data:
            script = script_data.script_class()
            script.filename = script_data.path
            script.is_img2img = is_img2img
            if script.show(script.is_img2img) == AlwaysVisible:
                self.scripts.append(script)
                self.alwayson_scripts.append(script)

    def setup_ui(self):
        for script in self.alwayson_scripts:
            script.args_from = len(self.inputs)
            self.inputs += script.ui(script.is_img2img)
            script.args_to = len(self.inputs)
        return self.inputs

    def _call(self, method_name, p, *before, every=False, **kwargs):
        """Each always-on script's hook with its slice of ``p.script_args``; what a hook raises
        is logged and the job goes on, as upstream. Since 1.8 only the scripts that override the
        hook are called (``every``: all of them, as 1.7 and Forge's ``process_before_every_sampling``)."""
        scripts = self.alwayson_scripts
        if not (every or _V17):
            scripts = [s for s in scripts if getattr(type(s), method_name) is not getattr(Script, method_name)]
        for script in scripts:
            try:
                script_args = p.script_args[script.args_from:script.args_to]
                getattr(script, method_name)(p, *before, *script_args, **kwargs)
            except Exception:
                errors.report(f"Error running {method_name}: {script.filename}", exc_info=True)

    def setup_scrips(self, p):
        self._call('setup', p)

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
            self._call('process_before_every_sampling', p, every=_FORGE, **kwargs)

    def postprocess(self, p, processed):
        self._call('postprocess', p, processed)

    def postprocess_batch(self, p, images, **kwargs):
        self._call('postprocess_batch', p, images=images, **kwargs)

    def postprocess_batch_list(self, p, pp, **kwargs):
        self._call('postprocess_batch_list', p, pp, **kwargs)

    if not _V17:
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
