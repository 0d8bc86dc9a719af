"""Evaluating one extra conditioning in the same UNet batch as ComfyUI's [cond, uncond]."""

from __future__ import annotations

from ..safet2i.errors import SafeT2IError

#: Index the extra conditioning gets in ``cond_or_uncond`` (0 = cond, 1 = uncond).
EXTRA = 2


def check_no_other_batch_function(model, what: str) -> None:
    if "sampler_calc_cond_batch_function" in model.model_options:
        raise SafeT2IError(
            f"Another node already replaced this model's cond-batch function (only one can), so {what} cannot "
            "be added: use one SafeT2I re-attention node per model, or remove the other node."
        )


def calc_with_extra(args: dict, extra_conditioning, who: str):
    """``(cond_out, uncond_out, extra_out)`` of one ``calc_cond_batch`` call."""
    import comfy.sampler_helpers  # noqa: PLC0415
    import comfy.samplers  # noqa: PLC0415

    conds, x, sigma = args["conds"], args["input"], args["sigma"]
    model, mo = args["model"], args["model_options"]
    if conds[1] is None:
        raise SafeT2IError(
            f"SafeT2I {who} needs classifier-free guidance: set cfg above 1.0 and connect a negative "
            "conditioning (it is not applied without it)."
        )
    extra = comfy.sampler_helpers.convert_cond(extra_conditioning)
    extra = comfy.samplers.encode_model_conds(model.extra_conds, [c.copy() for c in extra], x, x.device, "negative")
    return comfy.samplers.calc_cond_batch(model, [conds[0], conds[1], extra], x, sigma, mo)
