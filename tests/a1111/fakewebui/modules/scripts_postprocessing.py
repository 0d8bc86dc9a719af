"""Stand-in for ``modules/scripts_postprocessing.py`` (the Extras tab's scripts).

The runner orders scripts by ``order``, skips those named in the
``postprocessing_disable_in_extras`` setting, and runs each on the image with its UI values
(by control name), as upstream.
"""

from modules import shared


class PostprocessedImage:
    def __init__(self, image):
        self.image = image
        self.info = {}


class ScriptPostprocessing:
    filename = None
    controls = None
    args_from = None
    args_to = None
    order = 1000
    name = None

    def ui(self):
        pass

    def process(self, pp: PostprocessedImage, **args):
        pass


class ScriptPostprocessingRunner:
    def __init__(self):
        self.scripts = None

    def initialize_scripts(self, scripts_data):
        self.scripts = []
        for script_data in scripts_data:
            script = script_data.script_class()
            script.filename = script_data.path
            self.scripts.append(script)

    def scripts_in_preferred_order(self):
        if self.scripts is None:
            import modules.scripts
            self.initialize_scripts(modules.scripts.postprocessing_scripts_data)
        disabled = set(getattr(shared.opts, "postprocessing_disable_in_extras", []) or [])
        return sorted((s for s in self.scripts if s.name not in disabled), key=lambda s: s.order)

    def setup_ui(self):
        inputs = []
        for script in self.scripts_in_preferred_order():
            script.args_from = len(inputs)
            script.controls = script.ui()
            inputs += list(script.controls.values())
            script.args_to = len(inputs)
        return inputs

    def run(self, pp: PostprocessedImage, args):
        for script in self.scripts_in_preferred_order():
            script_args = args[script.args_from:script.args_to]
            script.process(pp, **dict(zip(script.controls, script_args)))
