"""Test-only ComfyUI custom nodes (installed into the test server's custom_nodes by conftest.py):
a minimal "other pack" that sets its own ``sampler_calc_cond_batch_function``, and a recorder
of every UNet call and every CFG result, so that tests can check a sampled trajectory against
an independent reference. Never part of the SafeT2I pack."""

RECORDS = {}


class SafeT2ITestScaleCondBatch:
    """Like many node packs: claims ``sampler_calc_cond_batch_function`` (replacing whatever
    was there) and scales the [cond, uncond] predictions by ``factor``. ``batched``: through
    ComfyUI's ``calc_cond_batch``; ``direct``: through its private ``_calc_cond_batch``, i.e.
    without ComfyUI's cond-batch wrappers (a pack that evaluates the model its own way)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "factor": ("FLOAT", {"default": 0.9, "min": 0.0, "max": 2.0}),
                             "mode": (["batched", "direct"],)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"
    CATEGORY = "_for_testing"

    def run(self, model, factor, mode):
        import comfy.samplers

        m = model.clone()
        fn = comfy.samplers.calc_cond_batch if mode == "batched" else comfy.samplers._calc_cond_batch

        def calc(args):
            out = fn(args["model"], args["conds"], args["input"], args["sigma"], args["model_options"])
            return [o * factor for o in out]

        m.set_model_sampler_calc_cond_batch_function(calc)
        return (m,)


class SafeT2ITestDropPreCfg:
    """A careless pack: replaces the whole ``sampler_pre_cfg_function`` list with its own no-op."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"
    CATEGORY = "_for_testing"

    def run(self, model):
        m = model.clone()
        m.model_options["sampler_pre_cfg_function"] = [lambda args: args["conds_out"]]
        return (m,)


class SafeT2ITestRecord:
    """Records every UNet call (inputs, ``cond_or_uncond``, per-chunk outputs) and every CFG
    result (``sampler_post_cfg_function``: x, sigma, cond_scale, denoised) under ``name``."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "name": ("STRING", {"default": "rec"})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"
    CATEGORY = "_for_testing"

    @classmethod
    def IS_CHANGED(cls, **kw):
        return float("nan")

    def run(self, model, name):
        m = model.clone()
        events = RECORDS.setdefault(name, [])
        events.clear()

        def unet(apply_model, args):
            out = apply_model(args["input"], args["timestep"], **args["c"])
            order = list(args["cond_or_uncond"])
            chunks = out.chunk(len(order))
            events.append({"kind": "unet", "order": order,
                           "out": [c.detach().float().cpu().clone() for c in chunks]})
            return out

        def post_cfg(args):
            events.append({"kind": "cfg", "x": args["input"].detach().float().cpu().clone(),
                            "sigma": args["sigma"].detach().float().cpu().clone(),
                            "cond_scale": float(args["cond_scale"]),
                            "denoised": args["denoised"].detach().float().cpu().clone()})
            return args["denoised"]

        m.set_model_unet_function_wrapper(unet)
        m.set_model_sampler_post_cfg_function(post_cfg)
        return (m,)


class SafeT2ITestSaveRecord:
    """Writes output/<name>.safetensors (step i: x, sigma, denoised, and each UNet call's chunk
    outputs as call<j>_<index>) and reports per step the UNet calls' ``cond_or_uncond``."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "name": ("STRING", {"default": "rec"})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    @classmethod
    def IS_CHANGED(cls, **kw):
        return float("nan")

    def run(self, samples, name):
        import json
        import os

        import folder_paths
        from safetensors.torch import save_file

        tensors, steps, calls = {}, [], []
        for ev in RECORDS.get(name, []):
            if ev["kind"] == "unet":
                calls.append(ev)
                continue
            i = len(steps)
            for k in ("x", "sigma", "denoised"):
                tensors[f"{i}/{k}"] = ev[k].contiguous()
            for j, call in enumerate(calls):
                for idx, out in zip(call["order"], call["out"]):
                    tensors[f"{i}/call{j}_{idx}"] = out.contiguous()
            steps.append({"cond_scale": ev["cond_scale"], "calls": [c["order"] for c in calls]})
            calls = []
        save_file(tensors, os.path.join(folder_paths.get_output_directory(), name + ".safetensors"))
        return {"ui": {"text": [json.dumps(steps)]}}


NODE_CLASS_MAPPINGS = {"SafeT2ITestScaleCondBatch": SafeT2ITestScaleCondBatch, "SafeT2ITestRecord": SafeT2ITestRecord,
                       "SafeT2ITestSaveRecord": SafeT2ITestSaveRecord, "SafeT2ITestDropPreCfg": SafeT2ITestDropPreCfg}
