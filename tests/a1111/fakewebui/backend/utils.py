"""Stand-in for Forge's ``backend/utils.py`` (the attribute helpers the LoRA loader uses).

The toy KModel keeps its LoRA-targetable layers beside ``diffusion_model`` (in
``lora_layers.unet``) while naming them ``diffusion_model.…`` as upstream; ``_resolve``
(the stand-in's own) follows that naming."""


def _resolve(obj, attrs):
    if attrs and attrs[0] == "diffusion_model" and getattr(obj, "lora_layers", None) is not None:
        try:
            return _walk(obj, attrs)
        except AttributeError:
            return _walk(obj.lora_layers.unet, attrs[1:])
    return _walk(obj, attrs)


def _walk(obj, attrs):
    for name in attrs:
        obj = getattr(obj, name)
    return obj


def get_attr_with_parent(obj, attr):
    attrs = attr.split(".")
    parent = _resolve(obj, attrs[:-1])
    return parent, attrs[-1], getattr(parent, attrs[-1])


def set_attr_raw(obj, attr, value):
    attrs = attr.split(".")
    setattr(_resolve(obj, attrs[:-1]), attrs[-1], value)
