"""Stand-in for Forge's ``backend.memory_management``: the loaded-model list. A patcher not
in ``current_loaded_models`` (compared by identity) is loaded: its clones there are unloaded
first and ``refresh_loras()`` merges its LoRA patches; one already there is only moved to the
front (no merge). The stand-in has no devices: loading moves nothing."""

current_loaded_models = []


class LoadedModel:
    def __init__(self, model):
        self.model = model

    def model_load(self):
        self.model.refresh_loras()
        return self.model.model

    def model_unload(self, avoid_model_moving=False):
        return

    def __eq__(self, other):
        return self.model is other.model


def unload_model_clones(model):
    to_unload = []
    for i in range(len(current_loaded_models)):
        if model.is_clone(current_loaded_models[i].model):
            to_unload = [i] + to_unload
    for i in to_unload:
        current_loaded_models.pop(i).model_unload(avoid_model_moving=True)


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    models_to_load = []
    for x in models:
        loaded_model = LoadedModel(x)
        if loaded_model in current_loaded_models:
            index = current_loaded_models.index(loaded_model)
            current_loaded_models.insert(0, current_loaded_models.pop(index))
        else:
            models_to_load.append(loaded_model)
    if len(models_to_load) == 0:
        return
    for loaded_model in models_to_load:
        unload_model_clones(loaded_model.model)
    for loaded_model in models_to_load:
        loaded_model.model_load()
        current_loaded_models.insert(0, loaded_model)


def load_model_gpu(model):
    return load_models_gpu([model])


def text_encoder_device():
    """Upstream: the device the text encoders run on (the stand-in has the CPU only)."""
    import torch
    return torch.device("cpu")
