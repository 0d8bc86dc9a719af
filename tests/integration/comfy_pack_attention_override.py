"""Test-only ComfyUI custom node (installed into the test server's custom_nodes by conftest.py):
another pack's ``transformer_options["optimized_attention_override"]`` (a single slot). ``chain``
calls the override that was there before (as SafeT2I does), ``replace`` drops it (a careless
pack). Both count their calls and leave the attention's result unchanged. Never part of the
SafeT2I pack."""

CALLS = {"chain": 0, "replace": 0}


class SafeT2ITestAttentionOverride:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "mode": (["chain", "replace"],)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"
    CATEGORY = "_for_testing"

    def run(self, model, mode):
        m = model.clone()
        opts = m.model_options.setdefault("transformer_options", {})
        inner = opts.get("optimized_attention_override") if mode == "chain" else None

        def override(func, *args, **kwargs):
            CALLS[mode] += 1
            return inner(func, *args, **kwargs) if inner is not None else func(*args, **kwargs)

        opts["optimized_attention_override"] = override
        return (m,)


NODE_CLASS_MAPPINGS = {"SafeT2ITestAttentionOverride": SafeT2ITestAttentionOverride}
