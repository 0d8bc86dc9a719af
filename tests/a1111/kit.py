"""Test kit: starts the webui stand-in (``fakewebui/``) for one variant the way the webui
starts with the extension installed, and drives jobs through it.

Start-up order (as upstream): extensions' ``preload.py`` extend the argument parser, the
command line is parsed, the model is loaded, ``scripts.load_scripts()`` clears all callbacks
and executes each extension's top-level ``scripts/*.py`` (here the repository's root shim
``scripts/safet2i.py``, with the repository first on ``sys.path``), ``ui_settings``
callbacks add settings, the txt2img / img2img / Extras UIs are built (``ui()``; arguments
are positional: ``args_from``/``args_to``), then ``app_started`` (API routes).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

FAKE = Path(__file__).resolve().parent / "fakewebui"
REPO = Path(__file__).resolve().parents[2]
STANDIN = ("modules", "backend", "modules_forge", "ldm_patched", "gradio", "fastapi", "_variant", "_toy")
#: The built-in Lora extension (``extensions-builtin/Lora``; its folder is on ``sys.path`` as upstream).
BUILTIN_LORA = FAKE / "extensions-builtin" / "Lora"
LORA_MODULES = ("networks", "network", "extra_networks_lora")
EXTENSION = ("safet2i_a1111",)


def purge() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in STANDIN + EXTENSION + LORA_MODULES:
            del sys.modules[name]


class FakeApp:
    """The webui's FastAPI app (the stand-in ``fastapi.FastAPI``, ``fakewebui/fastapi``), with
    short-cuts for tests: ``routes`` / ``route_kwargs`` by path, ``post(path, payload)`` → the
    response's JSON body; ``client`` (a ``TestClient``) for status codes and headers."""

    def __init__(self):
        from fastapi import FastAPI
        from fastapi.testclient import TestClient
        self.fastapi = FastAPI()
        self.client = TestClient(self.fastapi)
        self.routes = {}
        self.route_kwargs = {}

    def add_api_route(self, path, endpoint, methods=None, **kwargs):
        self.fastapi.add_api_route(path, endpoint, methods=methods, **kwargs)
        self.routes[path] = endpoint
        self.route_kwargs[path] = kwargs

    def post(self, path, payload):
        return self.client.post(path, json=payload).json()


class Webui:
    def __init__(self, variant: str, tmp: Path, argv=(), kind: str = "sd1"):
        self.variant = variant
        self.tmp = Path(tmp)
        self.argv = list(argv)
        self.kind = kind
        self._syspath = list(sys.path)
        self._env = os.environ.get("FAKEWEBUI_VARIANT")

    # ------------------------------------------------------------------ start-up
    def start(self) -> Webui:
        purge()
        os.environ["FAKEWEBUI_VARIANT"] = self.variant
        os.environ["FAKEWEBUI_ROOT"] = str(self.tmp / "webui")
        sys.path.insert(0, str(FAKE))
        import _toy
        import gradio as gr
        from modules import script_callbacks, script_loading, scripts, shared, shared_cmd_options

        script_loading.preload_extensions(str(BUILTIN_LORA.parent), shared_cmd_options.parser, [BUILTIN_LORA.name])
        script_loading.preload_extensions(str(REPO.parent), shared_cmd_options.parser, [REPO.name])
        vars(shared.cmd_opts).update(vars(shared_cmd_options.parser.parse_args(self.argv)))
        shared.sd_model = _toy.make_sd_model(self.kind)
        shared.opts.outdir_samples = str(self.tmp / "outputs")
        shared.opts.show_progress_every_n_steps = 1

        scripts._extension_dirs[:] = [str(BUILTIN_LORA), str(REPO)]   # built-in extensions first
        scripts.load_scripts()
        script_callbacks.before_ui_callback()
        script_callbacks.ui_settings_callback()
        with gr.Blocks():
            scripts.scripts_txt2img.initialize_scripts(False)
            scripts.scripts_txt2img.setup_ui()
            scripts.scripts_img2img.initialize_scripts(True)
            scripts.scripts_img2img.setup_ui()
            self.extras_inputs = scripts.scripts_postproc.setup_ui()
        self.app = FakeApp()
        script_callbacks.app_started_callback(None, self.app)

        self.gr, self.toy = gr, _toy
        self.scripts, self.shared, self.callbacks = scripts, shared, script_callbacks
        import modules.processing as processing
        self.processing = processing
        return self

    def close(self) -> None:
        purge()
        sys.path[:] = self._syspath
        if self._env is None:
            os.environ.pop("FAKEWEBUI_VARIANT", None)
        else:
            os.environ["FAKEWEBUI_VARIANT"] = self._env

    # ------------------------------------------------------------------ helpers
    def runner(self, img2img=False):
        return self.scripts.scripts_img2img if img2img else self.scripts.scripts_txt2img

    def ours(self, img2img=False):
        return next(s for s in self.runner(img2img).alwayson_scripts if s.title() == "SafeT2I")

    def arg_names(self) -> list[str]:
        from safet2i_a1111.config import JobConfig
        return JobConfig.arg_names()

    def ui_args(self, img2img=False, **ours) -> list:
        """What the browser submits: every input's current value, ours overridden by name."""
        runner = self.runner(img2img)
        args = [0] + [c.value for c in runner.inputs[1:]]
        script = self.ours(img2img)
        names = self.arg_names()
        for k, v in ours.items():
            args[script.args_from + names.index(k)] = v
        return args

    def api_args(self, img2img=False, alwayson=None, infotext_args=None) -> list:
        from modules.api.api import Api
        api = Api(self.app, None)
        runner = self.runner(img2img)
        defaults = api.init_default_script_args(runner)
        request = SimpleNamespace(alwayson_scripts=alwayson or {})
        if infotext_args is None:
            return api.init_script_args(request, defaults, None, None, runner)
        return api.init_script_args(request, defaults, None, None, runner, input_script_args=infotext_args)

    def register(self, prompt: str, picture) -> None:
        self.shared.sd_model.vae.register(prompt, picture)

    def _run(self, p, args, api):
        p.is_api = api
        p.outpath_samples = str(self.tmp / "samples")
        p.outpath_grids = str(self.tmp / "grids")
        p.scripts = self.runner(isinstance(p, self.processing.StableDiffusionProcessingImg2Img))
        p.script_args = args
        self.shared.state.begin(job="test")
        try:
            processed = self.processing.process_images(p)
        finally:
            p.close()
            self.shared.state.end()
        return processed

    def txt2img(self, prompt="a photo", *, args=None, api=False, **kw):
        kw.setdefault("steps", 4)
        kw.setdefault("width", 64)
        kw.setdefault("height", 64)
        kw.setdefault("sampler_name", "Euler")
        kw.setdefault("seed", 1)
        p = self.processing.StableDiffusionProcessingTxt2Img(prompt=prompt, **kw)
        return p, self._run(p, args if args is not None else self.ui_args(), api)

    def img2img(self, init_image, prompt="a photo", *, args=None, api=False, **kw):
        kw.setdefault("steps", 4)
        kw.setdefault("width", init_image.width)
        kw.setdefault("height", init_image.height)
        kw.setdefault("sampler_name", "Euler")
        kw.setdefault("seed", 1)
        p = self.processing.StableDiffusionProcessingImg2Img(prompt=prompt, init_images=[init_image], **kw)
        return p, self._run(p, args if args is not None else self.ui_args(img2img=True), api)

    def extras(self, image, save_output=True, **ours):
        from modules import postprocessing
        runner = self.scripts.scripts_postproc
        args = [c.value for c in self.extras_inputs]
        for script in runner.scripts_in_preferred_order():
            for i, name in enumerate(script.controls):
                if script.name == "SafeT2I output filter" and name in ours:
                    args[script.args_from + i] = ours[name]
        return postprocessing.run_postprocessing(0, image, None, None, "", True, *args, save_output=save_output)

    def paste(self, infotext: str, img2img=False) -> dict:
        """Values the paste button would set on our components (None = left unchanged)."""
        mod = "generation_parameters_copypaste" if self.variant == "a1111-1.7" else "infotext_utils"
        infotext_utils = __import__(f"modules.{mod}", fromlist=["x"])
        script = self.ours(img2img)
        fields = list(script.infotext_fields)
        values = infotext_utils.connect_paste(None, fields, None, None, "txt2img")(infotext)
        controls = self.runner(img2img).inputs[script.args_from:script.args_to]
        comp_to_name = {id(c): n for c, n in zip(controls, self.arg_names())}
        return {comp_to_name[id(c)]: (u.get("value") if "value" in u else None) for (c, _), u in zip(fields, values)}

    def saved(self, pattern="*") -> list[Path]:
        return sorted(p for p in self.tmp.rglob(pattern) if p.suffix == ".png")
