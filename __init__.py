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

    # Operator enforcement (SAFET2I_ENFORCE, docs/deploy.md): unset -> nothing is installed.
    try:
        from .nodes import enforce as _enforce
    except Exception as _exc:  # noqa: BLE001 - enforcement asked for but unavailable: refuse to run
        import os as _os

        if str(_os.environ.get("SAFET2I_ENFORCE", "") or "").strip():
            raise SystemExit(f"SafeT2I enforcement is on (SAFET2I_ENFORCE) but could not be imported: {_exc}")
        logging.getLogger("safet2i").error("SafeT2I: enforcement module unavailable: %s", _exc)
    else:
        _enforce.install_from_env()

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
