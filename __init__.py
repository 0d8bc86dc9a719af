"""SafeT2I for ComfyUI: entry point (V3 ``comfy_entrypoint``).

Missing optional packages (onnxruntime, opencv, nudenet) never break the import: the
affected nodes raise an error naming the package to install when they run.
"""

import importlib
import logging

WEB_DIRECTORY = "./web"

try:
    from comfy_api.latest import ComfyExtension
except ImportError:  # imported outside ComfyUI (e.g. by pip or pytest): nothing to register
    ComfyExtension = None

if ComfyExtension is not None:
    from .nodes import paths as _paths

    _paths.register_folders()

    class SafeT2IExtension(ComfyExtension):
        async def get_node_list(self):
            nodes = []
            for module in ("filter_nodes", "guidance_nodes", "steering_nodes", "lora_nodes"):  # one module per layer
                try:
                    nodes += importlib.import_module(f".nodes.{module}", __name__).NODES
                except Exception as exc:  # noqa: BLE001 - one broken layer must not hide the others
                    logging.getLogger("safet2i").error("SafeT2I: %s unavailable: %s", module, exc)
            return nodes

    async def comfy_entrypoint():
        return SafeT2IExtension()

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
