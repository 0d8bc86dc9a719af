"""The webui script: one always-visible SafeT2I accordion and its hooks.

Hook map (docs/a1111.md): ``setup`` (job state, live-preview filter), ``process``
(infotext), ``process_batch`` (guidance callbacks armed for this batch), the CFG callbacks
(``callbacks.py``: guidance rows), ``postprocess_image_after_composite`` (or
``postprocess_image`` on older webuis: the output filter on the full composited image),
``on_before_image_saved`` (``callbacks.py``: every file written while a job runs, and
everything when enforced: intermediate saves, grids, Extras), ``postprocess`` (clean-up).
The webui swallows exceptions raised in hooks, so every hook is wrapped (:func:`_fail_closed`):
any exception marks the job failed and its images are blocked.

The other concerns live in their own modules: ``settings.py`` (operator settings),
``job.py`` (job state), ``callbacks.py`` (global callbacks), ``route.py`` (HTTP route),
``ui.py`` (the accordion).
"""

from __future__ import annotations

import functools
import logging

import modules.scripts as scripts
from modules import shared

from safet2i.steering import load_concepts
from safet2i.steering.settings import concepts_negative

from . import TITLE, forge_guidance, ui
from . import lora as lora_layer
from . import weights as weights_layer
from .callbacks import (  # noqa: F401  (names the tests and the root shim use)
    _encode_concept, _guidance_model_error, _is_eps_sampler, _on_before_image_saved, _on_cfg_denoised,
    _on_cfg_denoiser, _on_cfg_denoiser_steering, _other_checkpoint, _unet_replaced, register_callbacks,
)
from .config import JobConfig
from .filtering import blocked_image, filter_image, verdict_text, was_checked
from .guidance import GuidanceHook, make_method
from .job import _ACTIVE, Job, _fallback_config, _job
from .route import _encode_frames, _on_app_started, api_max_body  # noqa: F401
from .settings import enforcement, opt as _opt
from .steering import SteeringHook, candidate_texts


def _arch(sd_model) -> str | None:
    """The model family a named steering configuration depends on (the paper's SDXL and SD3
    runs steer every step, and so do the other transformer families: ``EVERY_STEP``)."""
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    return lora_layer.forge_family(sd_model)


log = logging.getLogger("safet2i")

register_callbacks()


# --------------------------------------------------------------------------- the script

HAS_AFTER_COMPOSITE = hasattr(scripts.Script, "postprocess_image_after_composite")


class SafeT2IScript(scripts.Script):
    sorting_priority = 99  # Forge/reForge: place in the UI only (hook order is the script load order)

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        components, self.infotext_fields, self.paste_field_names = ui.build(is_img2img)
        return components

    # -- lifecycle -------------------------------------------------------------
    def setup(self, p, *args):
        try:
            job = Job(JobConfig.from_args(args, enforcement()), p)
        except Exception as exc:  # noqa: BLE001 - bad arguments: fail closed
            job = Job(_fallback_config(), p, error=f"bad SafeT2I arguments: {exc}")
            log.error("SafeT2I: %s", job.error)
        p._safet2i_job = job
        self._activate(job)
        original_close = p.close

        def close(*a, **k):
            self._finish(p)
            return original_close(*a, **k)

        p.close = close

    def _activate(self, job: Job) -> None:
        """This job is the one being generated: callbacks and previews act for it. Called at
        ``setup`` and again at every ``before_process`` (scripts such as X/Y/Z plot run
        ``process_images`` on copies of ``p``, which share the job)."""
        for stale in [j for j in _ACTIVE if j is not job]:    # left behind by a job that raised
            self._finish_job(stale)
        if job not in _ACTIVE:
            _ACTIVE.append(job)
        if not job.restore:
            self._wrap_previews(job)

    def _wrap_previews(self, job: Job) -> None:
        state = getattr(shared, "state", None)
        assign = getattr(state, "assign_current_image", None)
        cfg = job.cfg
        layers = cfg.guidance_active or cfg.steering_enabled or cfg.lora_enabled or cfg.weights_enabled
        if not callable(assign) or not (cfg.filter_enabled or cfg.enforced or layers or job.failed):
            return

        own = "assign_current_image" in vars(state)
        done = []

        def safe_assign(image, *a, **k):
            try:
                if image is None or done:       # done: another wrapper kept us after the job
                    pass
                elif job.failed or _opt("safet2i_previews", "filter") != "filter":
                    image = blocked_image(image.size, "preview")
                elif cfg.filter_enabled:
                    image = filter_image(image, cfg.filter_policy, cfg.filter_action).image
            except Exception:  # noqa: BLE001 - no unchecked preview; the webui cannot show None
                image = blocked_image(getattr(image, "size", (64, 64)), "preview")
            return assign(image, *a, **k)

        def restore():
            done.append(True)
            if vars(state).get("assign_current_image") is safe_assign:
                if own:
                    state.assign_current_image = assign
                else:
                    del state.assign_current_image

        state.assign_current_image = safe_assign
        job.restore.append(restore)

    def _finish(self, p) -> None:
        job = _job(p)
        if job is not None:
            self._finish_job(job)

    def _finish_job(self, job: Job) -> None:
        for undo in reversed(job.restore):
            undo()
        job.restore.clear()
        if job in _ACTIVE:
            _ACTIVE.remove(job)

    def before_process(self, p, *args):
        job = _job(p)
        if job is not None:
            self._activate(job)

    def process(self, p, *args):
        job = _job(p)
        if job is None:
            return
        p.extra_generation_params.update(job.cfg.infotext())
        if job.cfg.steering_enabled and not job.failed:
            self._steering_settings(p, job)
        modified = weights_layer.modified(p.sd_model)
        if modified and not job.failed:
            job.fail(modified)
        if job.cfg.weights_enabled and not job.failed:
            self._apply_weights(p, job)
        if job.cfg.lora_enabled and not job.failed:
            try:
                refiner = _other_checkpoint(p, hires=False)
                if refiner:
                    raise lora_layer.LoraLayerError(f"the job uses {refiner}: the webui switches to it mid-sampling "
                                                    "and the safety LoRA is not applied to it (no refiner)")
                job.lora = lora_layer.prepare(job.cfg.lora_file, p.sd_model, job.cfg.lora_strength,
                                              job.cfg.lora_allow_partial)
                p.extra_generation_params["SafeT2I LoRA coverage"] = job.lora.infotext()
            except Exception as exc:  # noqa: BLE001 - fail closed: any error in the layer blocks the job
                job.fail("safety LoRA", exc)

    def _steering_settings(self, p, job: Job) -> None:
        """The job's steering settings (a named configuration applied for this model family) and,
        with concepts as negative, the concept list added to every negative prompt of the job
        (after ``setup_prompts``, before the batches: the infotext shows it)."""
        try:
            job.steering_settings = s = job.cfg.steering(_arch(p.sd_model))
            if s.concepts_as_negative:
                items, _ = load_concepts(s.concepts, s.custom)
                for name in ("all_negative_prompts", "all_hr_negative_prompts"):
                    if isinstance(getattr(p, name, None), list):
                        setattr(p, name, [concepts_negative(items, n) for n in getattr(p, name)])
                if getattr(p, "all_negative_prompts", None) and hasattr(p, "main_negative_prompt"):
                    p.main_negative_prompt = p.all_negative_prompts[0]
        except Exception as exc:  # noqa: BLE001 - fail closed: any error in the layer blocks the job
            job.fail("steering", exc)

    def _apply_weights(self, p, job: Job) -> None:
        """Full safety weights into the loaded model for this job; the originals come back in
        ``job.restore`` (postprocess, or the clean-up of a failed / interrupted job). A copy of
        ``p`` (X/Y/Z plot) comes here after the previous copy's clean-up restored the model."""
        try:
            other = _other_checkpoint(p)
            if other:
                raise weights_layer.WeightsLayerError(
                    f"the job uses {other}; the safety weights go into the loaded checkpoint only and that pass would "
                    "run without them (choose 'Use same checkpoint' / no refiner)")
            if job.weights is not None:               # an earlier copy of p: its model back first
                job.weights.restore()
            sw = weights_layer.prepare(job.cfg.weights_file, p.sd_model, job.cfg.weights_part)
            job.weights = sw

            def undo(sw=sw):
                try:
                    sw.restore()
                except Exception as exc:  # noqa: BLE001 - recorded: later jobs on this model are blocked
                    log.error("SafeT2I: %s", exc)
                finally:
                    if sw.part == "text_encoder":     # conds of this job are the safety encoder's
                        weights_layer.clear_cond_caches(p)

            job.restore.append(undo)
            weights_layer.apply(sw)
            if sw.part == "text_encoder":             # conds cached before are the original encoder's
                weights_layer.clear_cond_caches(p)
            p.extra_generation_params["SafeT2I weights"] = sw.infotext()
        except Exception as exc:  # noqa: BLE001 - fail closed: any error in the layer blocks the job
            job.fail("safety weights", exc)

    def before_process_batch(self, p, *args, **kwargs):
        """Before the webui parses the batch's extra-network tags (``kwargs['prompts']`` is
        ``p.prompts``; edits in place are what the webui then parses)."""
        job = _job(p)
        if job is None or job.lora is None or job.failed:
            return
        try:
            lora_layer.add_tag(kwargs.get("prompts", p.prompts), job.lora)
        except Exception as exc:  # noqa: BLE001 - fail closed: any error in the layer blocks the job
            job.fail("safety LoRA", exc)

    def after_extra_networks_activate(self, p, *args, **kwargs):
        """A1111 ≥ 1.7 / Forge, after ``extra_networks.activate`` (first pass and hires pass):
        the networks are loaded now, so prove ours is, with every target weight."""
        job = _job(p)
        if job is None or job.lora is None or job.failed:
            return
        try:
            loaded = lora_layer.verify_loaded(p, job.lora)
            p.extra_generation_params["SafeT2I LoRA coverage"] = f"{job.lora.infotext()} loaded {loaded}"
        except Exception as exc:  # noqa: BLE001 - fail closed: any error in the layer blocks the job
            job.fail("safety LoRA", exc)

    def _layers_batch(self, p, job: Job) -> None:
        """``process_batch`` part of the LoRA and steering layers (after extra networks are
        active, before ``p.setup_conds`` encodes the prompts)."""
        if job.lora is not None:
            try:
                if job.lora.pending:
                    raise lora_layer.LoraLayerError("the webui did not activate extra networks for this batch "
                                                    "(disabled?); the safety LoRA is not applied")
                lora_layer.add_hires(p, job.lora)
            except Exception as exc:  # noqa: BLE001 - fail closed: any error in the layer blocks the job
                job.fail("safety LoRA", exc)
                return
        if not job.cfg.steering_enabled:
            return
        try:
            if job.steering is None:
                s = job.steering_settings or job.cfg.steering(_arch(p.sd_model))
                job.steering = SteeringHook.for_model(p.sd_model, s.concepts, s.custom, alpha=s.alpha, order=s.order,
                                                      self_validating=s.self_validating)
            hires = list(getattr(p, "hr_prompts", None) or []) if getattr(p, "enable_hr", False) else []
            steps = [p.steps, getattr(p, "hr_second_pass_steps", 0) or p.steps]
            job.steering_texts = candidate_texts(list(p.prompts) + hires, steps)
            job.steering.prepare(job.steering_texts)
            p.extra_generation_params["SafeT2I steering report"] = job.steering.report(job.steering_texts)
        except Exception as exc:  # noqa: BLE001 - fail closed: any error in the layer blocks the job
            job.fail("steering", exc)

    def process_batch(self, p, *args, **kwargs):
        job = _job(p)
        if job is not None and not job.failed and (job.weights is not None or job.lora is not None):
            replaced = _unet_replaced()       # after sd_unet.apply_unet() (it runs after process)
            if replaced:
                job.fail("model layer", replaced)
        if job is not None:
            job.check_weights(p, "before sampling", full=False)
        if job is not None and not job.failed and (job.lora is not None or job.cfg.steering_enabled):
            self._layers_batch(p, job)
        if job is None or not job.cfg.guidance_active or job.failed:
            return
        try:
            unsupported = _guidance_model_error(p.sd_model)
            if unsupported:
                raise RuntimeError(unsupported)
            concept = _encode_concept(p, job.cfg.guidance_concept)
            make_method(job.cfg.guidance_method, job.cfg.guidance_preset)   # refuses unavailable methods now
            job.guided_mark = job.guided_steps()
            if hasattr(p.sd_model, "forge_objects"):
                job.concept = concept       # Forge/reForge: patched in process_before_every_sampling
            else:
                job.hook = GuidanceHook(make_method(job.cfg.guidance_method, job.cfg.guidance_preset), concept,
                                        eps_prediction=_is_eps_sampler(p))
                job.runs.append(job.hook)
        except Exception as exc:  # noqa: BLE001 - fail closed: any error in the layer blocks the job
            job.fail("guidance could not start", exc)

    def process_before_every_sampling(self, p, *args, **kwargs):
        """Forge / reForge (and called, unused, by A1111 1.10): right before each sampling pass,
        after the webui rebuilt ``forge_objects``; the guidance goes into a UNet clone."""
        job = _job(p)
        if job is not None:
            job.check_weights(p, "before the hires pass" if getattr(p, "is_hr_pass", False) else "before sampling",
                              full=False)
        if job is not None and job.lora is not None and not job.failed:
            self._lora_before_sampling(p, job)
        if job is None or not job.cfg.guidance_active or job.failed or job.concept is None:
            return
        if not hasattr(p.sd_model, "forge_objects"):
            return
        try:
            run = forge_guidance.patch_unet(p, make_method(job.cfg.guidance_method, job.cfg.guidance_preset),
                                            job.concept, job)
            if run is not None:
                job.runs.append(run)
        except Exception as exc:  # noqa: BLE001 - fail closed: any error in the layer blocks the job
            job.fail("guidance could not start", exc)

    @staticmethod
    def _lora_before_sampling(p, job: Job) -> None:
        """Forge: the conds of the pass are encoded, so the CLIP patcher was loaded: our LoRA
        must be merged in it now; the UNet patcher is recorded and checked after its pass."""
        try:
            patchers = lora_layer.forge_patchers(p.sd_model)
            if "clip" in patchers:
                lora_layer.check_merged([patchers["clip"]], job.lora, "text encoder")
            if "unet" in patchers:
                job.lora.sampled.append(patchers["unet"])
        except Exception as exc:  # noqa: BLE001 - fail closed: any error in the layer blocks the job
            job.fail("safety LoRA", exc)

    @staticmethod
    def _lora_after_sampling(job: Job, where: str) -> None:
        if job.lora is None or job.failed:
            return
        try:
            sampled, job.lora.sampled = job.lora.sampled, []
            lora_layer.check_merged(sampled, job.lora, f"UNet of the {where}")
        except Exception as exc:  # noqa: BLE001 - fail closed: any error in the layer blocks the job
            job.fail("safety LoRA", exc)

    def before_hr(self, p, *args):
        job = _job(p)
        if job is not None and getattr(p, "firstpass_image", None) is None:
            job.check_layers("first pass", p)
            self._lora_after_sampling(job, "first pass")

    def postprocess_batch(self, p, *args, **kwargs):
        job = _job(p)
        if job is None:
            return
        where = "hires pass" if getattr(p, "enable_hr", False) else "sampling pass"
        job.check_layers(where, p)
        self._lora_after_sampling(job, where)
        if job.lora is not None and not job.failed:
            try:
                lora_layer.check_verified(job.lora, where)
            except Exception as exc:  # noqa: BLE001 - fail closed: any error in the layer blocks the job
                job.fail("safety LoRA", exc)

    # -- the output filter -----------------------------------------------------
    def _filter(self, p, pp) -> None:
        job = _job(p)
        if job is None:
            return
        index = getattr(pp, "index", len(job.verdicts))
        try:
            if job.failed:
                # The job failed (guidance, steering, LoRA, a hook): the image is replaced whatever
                # a detector would say of it ("placeholder" would only replace unsafe images).
                pp.image = blocked_image(pp.image.size, "blocked")
                text = f"blocked ({job.failed})"
            elif job.cfg.filter_enabled:
                o = filter_image(pp.image, job.cfg.filter_policy, job.cfg.filter_action)
                pp.image = o.image
                text = verdict_text(o)
            else:
                return
        except Exception as exc:  # noqa: BLE001 - fail closed: any error in the layer blocks the job
            pp.image = blocked_image(getattr(pp.image, "size", (64, 64)), "error")
            text = f"blocked (error: {exc})"
        job.verdicts[index] = text
        p.extra_generation_params["SafeT2I verdict"] = text   # infotext of the image saved next

    def postprocess_image(self, p, pp, *args):
        if not HAS_AFTER_COMPOSITE:
            self._filter(p, pp)

    def postprocess_image_after_composite(self, p, pp, *args):
        self._filter(p, pp)

    def postprocess(self, p, processed, *args):
        """Last hook: every image the job returns (gallery, API) must have been checked. An image
        another extension replaced after our filter, a grid, or on A1111 1.7 the composite of
        "inpaint only masked" (the filter saw the crop) is checked here."""
        job = _job(p)
        try:
            images = getattr(processed, "images", None)
            if job is not None and images and (job.cfg.filter_enabled or job.failed):
                for i, image in enumerate(images):
                    if image is None or not hasattr(image, "size") or was_checked(image):
                        continue
                    if job.failed:
                        new = blocked_image(image.size, "blocked")
                    else:
                        new = filter_image(image, job.cfg.filter_policy, job.cfg.filter_action).image
                    if "parameters" in getattr(image, "info", {}):
                        new.info["parameters"] = image.info["parameters"]
                    images[i] = new
        except Exception as exc:  # noqa: BLE001 - fail closed: any error in the layer blocks the job
            log.error("SafeT2I: final check failed, images replaced by placeholders: %s", exc)
            if job is not None and job.error is None:
                job.error = f"final check failed: {type(exc).__name__}: {exc}"
            for i, image in enumerate(getattr(processed, "images", None) or []):
                processed.images[i] = blocked_image(getattr(image, "size", (64, 64)), "error")
        finally:
            self._finish(p)


# --------------------------------------------------------------------------- fail closed

#: Script hooks the webui calls and whose exceptions it only logs.
HOOKS = ("setup", "before_process", "process", "before_process_batch", "after_extra_networks_activate",
         "process_batch", "process_before_every_sampling", "before_hr", "postprocess_batch",
         "postprocess_batch_list", "postprocess_image", "postprocess_image_after_composite", "postprocess")


def _hook_failed(script, name: str, p, args, exc: Exception) -> None:
    message = f"{name} failed: {type(exc).__name__}: {exc}"
    log.error("SafeT2I: %s; images of this job will be blocked", message, exc_info=exc)
    job = _job(p)
    if job is None:                       # setup itself failed: a failed job in its place
        job = Job(_fallback_config(), p)
        try:
            p._safet2i_job = job
        except (AttributeError, TypeError):      # a p that takes no attributes: the job is still active
            pass
        _ACTIVE.append(job)
    if job.error is None:
        job.error = message
    if name in ("postprocess_image", "postprocess_image_after_composite") and args:
        pp = args[0]
        pp.image = blocked_image(getattr(pp.image, "size", (64, 64)), "error")
        p.extra_generation_params["SafeT2I verdict"] = f"blocked ({message})"
    elif name == "postprocess" and args:
        processed = args[0]
        for i, image in enumerate(getattr(processed, "images", None) or []):
            processed.images[i] = blocked_image(getattr(image, "size", (64, 64)), "error")
        script._finish(p)


def _fail_closed(name: str, fn):
    @functools.wraps(fn)
    def hook(self, p, *args, **kwargs):
        try:
            return fn(self, p, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the webui would log it and carry on unprotected
            _hook_failed(self, name, p, args, exc)
            return None
    return hook


for _name in HOOKS:
    if _name in SafeT2IScript.__dict__:
        setattr(SafeT2IScript, _name, _fail_closed(_name, SafeT2IScript.__dict__[_name]))
