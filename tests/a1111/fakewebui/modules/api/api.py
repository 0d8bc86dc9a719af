"""Stand-in for ``modules/api/api.py``: how an API request's script arguments are built —
every always-on script gets its UI defaults (``ui()`` is called to read them), then
``alwayson_scripts: {title: {"args": [...]}}`` overrides a prefix of them."""

from __future__ import annotations

from modules import _variant


class Api:
    def __init__(self, app, queue_lock):
        self.app = app
        self.queue_lock = queue_lock

    def set_config(self, req: dict):
        """``POST /sdapi/v1/options``: Forge hands the request to ``sysinfo.set_config`` (imported
        at each request, without ``is_api``); A1111 sets each option with ``is_api=True``."""
        if _variant.forge_like():
            from modules.sysinfo import set_config
            return set_config(req)
        from modules import shared
        for k, v in req.items():
            shared.opts.set(k, v, is_api=True)
        return True

    def get_script(self, script_name, script_runner):
        script_idx = [s.title().lower() for s in script_runner.scripts].index(script_name.lower())
        return script_runner.scripts[script_idx]

    def init_default_script_args(self, script_runner):
        import gradio as gr
        script_args = [None] * max(script.args_to for script in script_runner.scripts)
        script_args[0] = 0
        with gr.Blocks():
            for script in script_runner.scripts:
                ui_default_values = [elem.value for elem in script.ui(script.is_img2img)]
                script_args[script.args_from:script.args_to] = ui_default_values
        return script_args

    def _init_script_args(self, request, default_script_args, selectable_scripts, selectable_idx, script_runner,
                          input_script_args=None):
        script_args = default_script_args.copy()
        if input_script_args is not None:
            for index, value in input_script_args.items():
                script_args[index] = value
        if request.alwayson_scripts:
            for name in request.alwayson_scripts.keys():
                script = self.get_script(name, script_runner)
                given = request.alwayson_scripts[name]["args"]
                for idx in range(0, min((script.args_to - script.args_from), len(given))):
                    script_args[script.args_from + idx] = given[idx]
        return script_args

    if _variant.is_17():
        def init_script_args(self, request, default_script_args, selectable_scripts, selectable_idx, script_runner):
            return self._init_script_args(request, default_script_args, selectable_scripts, selectable_idx,
                                          script_runner)
    else:
        def init_script_args(self, request, default_script_args, selectable_scripts, selectable_idx, script_runner, *,
                             input_script_args=None):
            return self._init_script_args(request, default_script_args, selectable_scripts, selectable_idx,
                                          script_runner, input_script_args)
