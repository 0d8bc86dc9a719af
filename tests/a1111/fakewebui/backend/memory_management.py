"""Stand-in for Forge's ``backend.memory_management`` (the one function the extension calls)."""

_LOADED: list = []


def load_model_gpu(model):
    """Upstream moves the patcher's model to the GPU; the stand-in records the call."""
    _LOADED.append(model)
