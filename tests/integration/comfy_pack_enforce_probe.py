"""Test-only ComfyUI custom nodes (installed into the test server's custom_nodes by conftest.py):
"third-party" output nodes that write the pixels they receive straight to the output folder
with their own code (no SaveImage), one V1 class, one V3 ``io.ComfyNode`` taking IMAGE and one
V3 node taking VIDEO; and a node that sends a live preview. Only loads its nodes. Never part of the SafeT2I pack."""

import os


def _write(images, name):
    import numpy as np
    from PIL import Image

    import folder_paths

    path = os.path.join(folder_paths.get_output_directory(), f"{name}.png")
    arr = (images[0].detach().cpu().float().clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    Image.fromarray(arr).save(path)
    return {"ui": {"text": [path]}}


class SafeT2ITestEnforceProbe:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "name": ("STRING", {"default": "probe_v1"})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    def run(self, images, name):
        return _write(images, name)


class SafeT2ITestPreviewProbe:
    """Not an output node: passes its images on and, like a sampler, sends the first one as a
    live preview through ComfyUI's progress bar."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "_for_testing"

    def run(self, images):
        import numpy as np
        from PIL import Image

        import comfy.utils

        arr = (images[0].detach().cpu().float().clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
        comfy.utils.ProgressBar(2).update_absolute(1, 2, ("JPEG", Image.fromarray(arr), 512))
        return (images,)


NODE_CLASS_MAPPINGS = {"SafeT2ITestEnforceProbe": SafeT2ITestEnforceProbe,
                       "SafeT2ITestPreviewProbe": SafeT2ITestPreviewProbe}

try:
    from comfy_api.latest import io

    class SafeT2ITestEnforceProbeV3(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="SafeT2ITestEnforceProbeV3", category="_for_testing", is_output_node=True,
                             inputs=[io.Image.Input("images"), io.String.Input("name", default="probe_v3")],
                             outputs=[])

        @classmethod
        def execute(cls, images, name):
            _write(images, name)
            return io.NodeOutput()

    class SafeT2ITestEnforceVideoProbe(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="SafeT2ITestEnforceVideoProbe", category="_for_testing", is_output_node=True,
                             inputs=[io.Video.Input("video"), io.String.Input("name", default="probe_video")],
                             outputs=[])

        @classmethod
        def execute(cls, video, name):
            comps = video.get_components()
            _write(comps.images, name)
            return io.NodeOutput()

    NODE_CLASS_MAPPINGS["SafeT2ITestEnforceProbeV3"] = SafeT2ITestEnforceProbeV3
    NODE_CLASS_MAPPINGS["SafeT2ITestEnforceVideoProbe"] = SafeT2ITestEnforceVideoProbe
except (ImportError, AttributeError):   # a ComfyUI without the V3 API: the V1 probe only
    pass
