"""The webui's global callbacks (CFG denoiser/denoised, before-image-saved, app started,
settings), the Extras safety net when enforced, and the model checks the hooks share."""

from __future__ import annotations

import functools
import logging

from modules import script_callbacks

from .filtering import blocked_image, filter_image, was_checked
from .job import _job, current_job
from .route import _on_app_started
from .settings import default_config, enforcement, guard_options_api, on_ui_settings, opt as _opt

log = logging.getLogger("safet2i")


def _encode_concept(p, text: str):
    """Concept embedding rows with the job's model: tensor [T, D], or SDXL dict."""
    from modules import prompt_parser  # noqa: PLC0415

    model = p.sd_model
    if getattr(model, "is_sdxl", False):
        cond = model.get_learned_conditioning(prompt_parser.SdConditioning([text], width=p.width, height=p.height))
        return {k: v[0].detach().clone() for k, v in cond.items()}
    cond = model.get_learned_conditioning([text])
    if isinstance(cond, dict):
        return {k: v[0].detach().clone() for k, v in cond.items()}
    return cond[0].detach().clone()


def _loaded_checkpoint_names(p) -> set:
    """The names the loaded checkpoint goes by (a hires / refiner choice equal to one of them
    is no switch)."""
    info = getattr(getattr(p, "sd_model", None), "sd_checkpoint_info", None)
    names = {getattr(info, a, None) for a in ("title", "name", "short_title", "model_name", "name_for_extra")}
    names.add(_opt("sd_model_checkpoint", None))
    return {n for n in names if isinstance(n, str) and n}


def _other_checkpoint(p, hires: bool = True) -> str | None:
    """The hires-fix checkpoint or Forge hires modules (``hires``) or the refiner a job switches
    to (None: it stays on the loaded model)."""
    loaded = _loaded_checkpoint_names(p)
    if hires and getattr(p, "enable_hr", False):
        hr = getattr(p, "hr_checkpoint_name", None)
        if hr and hr != "Use same checkpoint" and hr not in loaded:
            return f"a hires-fix checkpoint ({hr})"
        modules = getattr(p, "hr_additional_modules", None)       # Forge: hires VAE / text encoder
        if isinstance(modules, list) and "Use same choices" not in modules \
                and list(modules) != list(_opt("forge_additional_modules", []) or []):
            return f"other hires-fix modules ({', '.join(map(str, modules)) or 'built-in'})"
    refiner = getattr(p, "refiner_checkpoint", None)
    if refiner and refiner not in ("None", "none") and refiner not in loaded \
            and (getattr(p, "refiner_switch_at", None) or 0) < 1:
        return f"a refiner ({refiner})"
    return None


def _unet_replaced() -> str | None:
    """A1111 ``sd_unet``: an alternative UNet (TensorRT, ...) the webui routes the model's
    forward to; the weights in the model (safety weights, a merged safety LoRA) are then unused."""
    try:
        from modules import sd_unet  # noqa: PLC0415
    except ImportError:        # no such module: nothing replaces the UNet
        return None
    current = getattr(sd_unet, "current_unet", None)
    if current is None:
        return None
    return (f"the webui runs an alternative UNet ({type(current).__name__}, setting 'SD Unet'), not the model's "
            "weights; the safety weights / LoRA would not be used (set 'SD Unet' to None)")


def _guidance_model_error(model) -> str | None:
    """A1111's guidance assumes x = x0 + σ·ε (ε- and v-prediction SD1.x / SD2.x / SDXL); flow
    models would be guided wrongly there, so they are refused (the images are then blocked).
    Forge runs Flux and SD3.5 with a ``const`` (rectified-flow) predictor, which its guidance path
    converts (``forge_guidance.ForgeGuidanceRun.space_of``): allowed."""
    unet = getattr(getattr(model, "forge_objects", None), "unet", None)
    predictor = getattr(getattr(unet, "model", None), "predictor", None)
    if getattr(predictor, "prediction_type", None) == "const":
        return None
    if getattr(model, "is_sd3", False):
        return "SafeT2I guidance supports SD1.x, SD2.x and SDXL models, not SD3"
    kinds = [a for a in ("is_sd1", "is_sd2", "is_sdxl") if hasattr(model, a)]
    if kinds and not any(getattr(model, a) for a in kinds):
        return f"SafeT2I guidance supports SD1.x, SD2.x and SDXL models, not {type(model).__name__}"
    return None


def _is_eps_sampler(p, params=None) -> bool:
    denoiser = getattr(params, "denoiser", None) if params is not None else None
    names = [type(denoiser).__name__ if denoiser is not None else "", type(getattr(p, "sampler", None)).__name__]
    return any("Timesteps" in n or "CompVis" in n for n in names)


# --------------------------------------------------------------------------- global callbacks

def _on_cfg_denoiser(params):
    job = current_job()
    if not (job and job.hook):
        return
    p = getattr(getattr(params, "denoiser", None), "p", None)
    if p is not None and _job(p) is not job:
        return
    host_p = p if p is not None else job.p
    job.hook.eps_prediction = _is_eps_sampler(host_p, params)
    job.hook.total_hint = getattr(getattr(getattr(host_p, "sampler", None), "model_wrap_cfg", None), "total_steps", None)
    job.hook.before(params)


def _on_cfg_denoiser_steering(params):
    """``on_cfg_denoiser``, registered before the guidance callback so that it sees the
    webui's own cond rows: ``params.text_cond`` holds the cond rows only (all images, ``AND``
    sub-prompts in order; uncond rows are ``params.text_uncond``), already picked for this
    step from the prompt schedule. The steered rows go into a new tensor assigned to
    ``params.text_cond``, which the webui reads back after the callback (A1111 and Forge)."""
    job = current_job()
    if not (job and job.steering) or job.failed:
        return
    p = getattr(getattr(params, "denoiser", None), "p", None)
    if p is not None and _job(p) is not job:
        return
    try:
        job.steering.apply(params)
        (p or job.p).extra_generation_params["SafeT2I steering report"] = job.steering.report(job.steering_texts)
    except Exception as exc:  # noqa: BLE001 - recorded: the images are blocked
        job.fail("steering failed", exc)


def _on_cfg_denoised(params):
    job = current_job()
    if job and job.hook:
        job.hook.after(params)


def _on_before_image_saved(params):
    """Every image file the webui writes passes here (samples, intermediates, grids, Extras)."""
    try:
        img = params.image
        if img is None or was_checked(img):
            return
        job = current_job()
        enforce = enforcement()
        if job is None and not enforce:
            return
        cfg = job.cfg if job else default_config(enforce)
        if job and job.weights is not None and not job.failed:
            job.check_weights(None, "before saving an image")   # e.g. the image before hires fix
        if job and job.failed:
            params.image = blocked_image(img.size, "blocked")    # whatever a detector would say
            return
        if not cfg.filter_enabled:
            return
        params.image = filter_image(img, cfg.filter_policy, cfg.filter_action).image
    except Exception as exc:  # noqa: BLE001 - never let an unchecked image be written
        log.error("SafeT2I: save hook failed, writing a placeholder: %s", exc)
        params.image = blocked_image(getattr(params.image, "size", (64, 64)), "error")


#: ``POST /safet2i/filter``: request bodies over this many bytes are refused with 413 before
#: they are read; environment ``SAFET2I_API_MAX_BODY`` (bytes, read when the webui starts).


def _guard_callback(fn):
    """CFG callbacks: an error outside the hook's own handling still fails the job (the webui
    would log it and sample on unguided)."""
    @functools.wraps(fn)
    def callback(params):
        try:
            return fn(params)
        except Exception as exc:  # noqa: BLE001 - fail closed: any error in the layer blocks the job
            job = current_job()
            if job is not None and job.error is None:
                job.error = f"{fn.__name__.strip('_')} failed: {type(exc).__name__}: {exc}"
                log.error("SafeT2I: %s; images of this job will be blocked", job.error, exc_info=exc)
    return callback


_on_cfg_denoiser = _guard_callback(_on_cfg_denoiser)
_on_cfg_denoised = _guard_callback(_on_cfg_denoised)
_REGISTERED = []


def _registered(fn, category: str) -> bool:
    cmap = getattr(script_callbacks, "callback_map", None)
    if isinstance(cmap, dict) and f"callbacks_{category}" in cmap:
        return any(getattr(c, "callback", None) is fn for c in cmap[f"callbacks_{category}"])
    return bool(_REGISTERED)


def _enforce_extras() -> None:
    """With ``--safet2i-enforce``: every image the Extras tab produces is checked after its
    scripts ran, also when our Extras script is switched off in the settings
    (``postprocessing_disable_in_extras``) or an earlier script added copies it marked
    ``disable_processing`` (which the webui's runner never passes to later scripts)."""
    if not enforcement():
        return
    try:
        from modules import scripts_postprocessing  # noqa: PLC0415
    except ImportError:        # no Extras tab
        return
    runner = scripts_postprocessing.ScriptPostprocessingRunner
    if getattr(runner.run, "_safet2i", False):
        return
    original = runner.run

    def run(self, pp, args):
        original(self, pp, args)
        cfg = default_config(enforcement())
        for item in [pp, *(getattr(pp, "extra_images", None) or [])]:
            image = getattr(item, "image", None)
            if image is not None and not was_checked(image):
                item.image = filter_image(image, cfg.filter_policy, cfg.filter_action).image

    run._safet2i = True
    runner.run = run


def register_callbacks() -> None:
    """Idempotent; also after the webui cleared every callback: "Reload UI" re-runs the root
    ``scripts/safet2i.py`` (which calls this) while this module stays imported."""
    if _registered(_on_before_image_saved, "before_image_saved"):
        return
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_cfg_denoiser(_on_cfg_denoiser_steering)   # first: the webui's own cond rows
    script_callbacks.on_cfg_denoiser(_on_cfg_denoiser)
    if hasattr(script_callbacks, "on_cfg_denoised"):
        script_callbacks.on_cfg_denoised(_on_cfg_denoised)
    script_callbacks.on_before_image_saved(_on_before_image_saved)
    script_callbacks.on_app_started(_on_app_started)
    guard_options_api()
    _enforce_extras()
    _REGISTERED.append(True)
