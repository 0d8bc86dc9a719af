"""SafeT2I: safety layers for text-to-image diffusion, host-agnostic core.

Subpackages, one per defence layer: ``filter`` (output filter, ONNX cost models). The
core imports no host (ComfyUI, A1111); hosts live in ``nodes/`` and ``extension/``.
"""

__version__ = "0.1.0"
