"""SafeT2I for ComfyUI: entry point (V3 ``comfy_entrypoint``).

Missing optional packages (onnxruntime, opencv, nudenet) never break the import: the
affected nodes raise an error naming the package to install when they run.
"""

import importlib
import logging
import os as _os
import sys as _sys

WEB_DIRECTORY = "./web"

try:
    from comfy_api.latest import ComfyExtension
except ImportError:  # imported outside ComfyUI (e.g. by pip or pytest): nothing to register
    ComfyExtension = None

# Operator enforcement (SAFET2I_ENFORCE, docs/deploy.md): unset -> nothing is installed. Set, it
# is installed whatever else of the pack fails to load, or ComfyUI does not start.
_ENFORCE_ON = bool(str(_os.environ.get("SAFET2I_ENFORCE", "") or "").strip())
if ComfyExtension is None and _ENFORCE_ON and "folder_paths" in _sys.modules:   # inside a ComfyUI
    raise SystemExit("SafeT2I enforcement is on (SAFET2I_ENFORCE) but this ComfyUI has no comfy_api.latest "
                     "(too old for SafeT2I); refusing to run it unfiltered.")

if ComfyExtension is not None:
    try:
        from .nodes import paths as _paths

        _paths.register_folders()
    except Exception as _exc:  # noqa: BLE001 - the nodes report it; enforcement must still be installed
        logging.getLogger("safet2i").error("SafeT2I: model folders could not be registered: %s", _exc)

    try:
        from .nodes import enforce as _enforce
    except Exception as _exc:  # noqa: BLE001 - enforcement asked for but unavailable: refuse to run
        if _ENFORCE_ON:
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
