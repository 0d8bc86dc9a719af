"""Safety guidance on Forge and reForge, through their UNet patcher (``docs/a1111.md``, "Guidance").

Both webuis rebuild ``p.sd_model.forge_objects`` before every sampling pass and then call the
scripts' ``process_before_every_sampling``; there we clone ``forge_objects.unet``, add our
functions to the clone's ``model_options`` and put the clone back. Nothing global changes, so
nothing needs undoing, and a pass we did not patch is simply unguided — which the script
notices (no guided step) and turns into blocked images.

The same core method and the same ε-space math as the A1111 path (``guidance.py``): with ε
predictions ε_u (negative prompt), ε_c (prompt) and ε_s (unsafe concept), the method gives the
guided direction d_p and the result is ε_u + s·d_p instead of ε_u + s·(ε_c − ε_u). Forge and
reForge work in x0 ("denoised") space, x = x0 + σ·ε, so ε = (x − D)/σ and D = x − σ·ε
(``safet2i.guidance.spaces``); DDIM is converted to that space by the webui before it reaches us.

* Forge (``backend/``): a conditioning modifier records the step's ``cond_scale`` (the
  value after hires CFG / NGMS adjustments); a post-cfg function evaluates the concept with
  ``backend.sampling.sampling_function.calc_cond_uncond_batch`` on copies of the negative
  prompt's cond dicts (same latent, σ, inpainting ``c_concat`` and ControlNet, only the text
  replaced) and adds the safety correction −σ·s·(d_p − (ε_c − ε_u)) to the result: exactly
  x − σ·(ε_u + s·d_p) when nothing else changed the result, and composable with other
  post-cfg functions (PAG) and a custom cfg function (dynamic thresholding).
  Old Forge (Feb–Jul 2024, continued as "Forge Classic": ``ldm_patched`` with Forge's own
  tuple-style pre-cfg functions) gets the same functions, with ``ldm_patched``'s
  ``calc_cond_uncond_batch``.
* reForge (``ldm_patched``, ComfyUI semantics): a pre-cfg function receives both predictions
  and the cond lists, evaluates the concept with ``ldm_patched.modules.samplers.calc_cond_batch``
  and folds the guidance into the cond prediction (as the ComfyUI nodes do), so the ordinary
  CFG formula — or another cfg function — yields ε_u + s·d_p.

Both disable the "CFG = 1" shortcut (the negative prompt is always evaluated, as in A1111).
When the webui skips the negative prompt itself (NGMS, "skip early CFG"), ε_u := ε_c, which
is what A1111's denoiser substitutes too. Any error is recorded and the job's images are
blocked (the webui would log and swallow it).
"""

from __future__ import annotations

import logging

from safet2i.guidance import correct_prediction, eps_offset_free, to_eps

from .guidance import GuidanceError, fit_tokens

log = logging.getLogger("safet2i")
MARK = "safet2i_guidance"       # model_options key: this UNet clone carries our functions


class ForgeGuidanceRun:
    """One sampling pass's guidance state; its functions are plain closures over it."""

    def __init__(self, method, concept, job, flavour: str, total_steps, distilled: bool = False,
                 branch_scale: float = 3.5):
        self.method = method
        # Guidance-distilled models (Forge's Flux dev/schnell, ``sd_model.use_distilled_cfg_scale``) at
        # CFG 1 use the concept-branch form with s_b (safet2i.guidance.contract).
        self.distilled, self.branch_scale = bool(distilled), float(branch_scale)
        self.concept = concept
        self.job = job
        self.flavour = flavour          # "forge", "forge-classic" or "reforge"
        self.total_steps = total_steps  # callable → expected model calls of the pass
        self.cond_scale = None
        self.steps_guided = 0
        self.error: str | None = None

    # -- helpers ---------------------------------------------------------------
    def _start(self, sigma) -> None:
        """One run per pass: this object (a new one per pass) is the run key."""
        self.method.set_state(None, self.total_steps(), sigma, run=id(self))

    def concept_entry(self, base: dict, batch: int) -> dict:
        """A copy of one cond dict with the concept's text in place of its own."""
        mc = dict(base["model_conds"])
        concept = self.concept
        if isinstance(concept, dict):
            ref = base.get("cross_attn", getattr(mc.get("c_crossattn"), "cond", None))
            ctx = fit_tokens(concept["crossattn"].to(ref.device, ref.dtype), ref.shape[1])
            ctx = ctx.unsqueeze(0).expand(batch, *ctx.shape).contiguous()
            vec = concept["vector"].to(ref.device, ref.dtype).unsqueeze(0).expand(batch, -1).contiguous()
            if "y" not in mc:
                raise GuidanceError("SDXL concept embedding but the sampler's conds have no pooled vector")
            mc["y"] = type(mc["y"])(vec)
            out = {**base, "cross_attn": ctx, "pooled_output": vec}
        else:
            ref = base.get("cross_attn", getattr(mc.get("c_crossattn"), "cond", None))
            ctx = fit_tokens(concept.to(ref.device, ref.dtype), ref.shape[1])
            ctx = ctx.unsqueeze(0).expand(batch, *ctx.shape).contiguous()
            out = {**base, "cross_attn": ctx}
        mc["c_crossattn"] = type(mc["c_crossattn"])(ctx)
        out["model_conds"] = mc
        out.pop("strength", None)
        return out

    @staticmethod
    def space_of(model) -> str:
        """``denoised`` (x = x0 + σ·ε: SD1.x/2.x/XL) or ``flow_denoised`` (rectified flow, x =
        (1 − σ)·x0 + σ·ε: Forge's Flux and SD3.5, prediction type ``const``)."""
        kind = getattr(getattr(model, "predictor", None), "prediction_type", None)   # Forge backend/
        if kind is None:                                                               # ldm_patched
            sampling = getattr(model, "model_sampling", None)
            names = {c.__name__ for c in type(sampling).__mro__} if sampling is not None else set()
            kind = "const" if "CONST" in names else ("eps" if "EPS" in names else None)
        if kind == "const":
            return "flow_denoised"
        if kind in ("eps", "epsilon", "v_prediction", "edm"):
            return "denoised"
        raise GuidanceError(f"unknown prediction type {kind!r}: SafeT2I guidance supports x0 + σ·noise models "
                            "(SD1.x, SD2.x, SDXL) and rectified flow (Flux, SD3.5)")

    def _correction(self, model, x, sigma, cond_d, uncond_d, concept_d, cond_scale, scaled: bool = True):
        """(the ε correction to take off in the host's denoised space, and the space): times the CFG
        scale when ``scaled`` (applied to the CFG result), the concept-branch form at CFG 1 on
        guidance-distilled models."""
        space = self.space_of(model)
        if space == "flow_denoised":   # ε less its common offset: exact near σ = 1 (guidance contract)
            def eps(d):
                return eps_offset_free(d, sigma, space)
        else:
            def eps(d):
                return to_eps(d, x, sigma, space)
        ec, es = eps(cond_d), eps(concept_d)
        if self.distilled and abs(float(cond_scale) - 1.0) < 1e-6:
            if not self.method.supports_concept_branch:
                raise GuidanceError(f"{self.method.name} needs classifier-free guidance (its harmfulness estimate "
                                    "reads the direction from the negative to the prompt); this guidance-distilled "
                                    "model runs at CFG 1. Raise CFG above 1 or use SLD, whose concept branch works "
                                    "at CFG 1.")
            return self.method.branch_correction(ec, es, self.branch_scale), space
        eu = ec if uncond_d is None else eps(uncond_d)
        c = self.method.correction(eu, ec, es)
        return (float(cond_scale) * c if scaled else c), space

    def fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("SafeT2I guidance failed; the image will be blocked: %s", self.error, exc_info=exc)
            if self.job is not None and self.job.error is None:
                self.job.error = f"guidance failed: {self.error}"

    # -- Forge -----------------------------------------------------------------
    def forge_modifier(self, model, x, timestep, uncond, cond, cond_scale, model_options, seed):
        self.cond_scale = cond_scale
        return model, x, timestep, uncond, cond, cond_scale, model_options, seed

    def forge_post_cfg(self, args):
        denoised = args["denoised"]
        if self.error:
            return denoised
        try:
            if self.flavour == "forge":
                from backend.sampling.sampling_function import calc_cond_uncond_batch  # noqa: PLC0415
            else:
                from ldm_patched.modules.samplers import calc_cond_uncond_batch  # noqa: PLC0415

            x, sigma = args["input"], args["sigma"]
            self._start(sigma)
            conds, unconds = args["cond"], args["uncond"]
            if len(conds) != 1:
                raise GuidanceError("AND / composable prompts are not supported with SafeT2I guidance yet "
                                    f"({len(conds)} sub-prompts)")
            if self.cond_scale is None:
                raise GuidanceError("the CFG scale of this step is unknown (another extension replaced the "
                                    "UNet's conditioning modifiers)")
            base = unconds[0] if unconds else conds[0]
            concept_d, _ = calc_cond_uncond_batch(args["model"], [self.concept_entry(base, x.shape[0])], None, x,
                                                  sigma, args["model_options"])
            c, space = self._correction(args["model"], x, sigma, args["cond_denoised"],
                                        args["uncond_denoised"] if unconds else None, concept_d, self.cond_scale)
            self.steps_guided += 1
            return correct_prediction(denoised, c, sigma, space)
        except Exception as exc:  # noqa: BLE001 - recorded; the images are blocked
            self.fail(exc)
            return denoised

    # -- reForge ---------------------------------------------------------------
    def reforge_pre_cfg(self, args):
        out = args["conds_out"]
        if self.error:
            return out
        try:
            from ldm_patched.modules.samplers import calc_cond_batch  # noqa: PLC0415

            x, sigma = args["input"], args["sigma"]
            self._start(sigma)
            cond_list, uncond_list = args["conds"][0], args["conds"][1]
            if len(cond_list) != 1:
                raise GuidanceError("AND / composable prompts are not supported with SafeT2I guidance yet "
                                    f"({len(cond_list)} sub-prompts)")
            base = uncond_list[0] if uncond_list else cond_list[0]
            concept_d = calc_cond_batch(args["model"], [[self.concept_entry(base, x.shape[0])]], x, sigma,
                                        args["model_options"])[0]
            scale = float(args.get("cond_scale", 1.0))
            # folded into the cond prediction, which the CFG formula then scales by s
            c, space = self._correction(args["model"], x, sigma, out[0], out[1] if uncond_list else None,
                                        concept_d, scale, scaled=False)
            self.steps_guided += 1
            return [correct_prediction(out[0], c, sigma, space)] + list(out[1:])
        except Exception as exc:  # noqa: BLE001
            self.fail(exc)
            return out


def flavour_of(unet) -> str:
    """``forge`` (backend/), ``reforge`` (ldm_patched with ComfyUI's dict-style pre-cfg
    functions and ``calc_cond_batch``), ``forge-classic`` (ldm_patched with Forge's own
    sampling function) — or an error for anything else."""
    import importlib.util  # noqa: PLC0415

    post_cfg = hasattr(unet, "add_conditioning_modifier") and hasattr(unet, "set_model_sampler_post_cfg_function")
    if importlib.util.find_spec("backend") is not None and post_cfg:
        try:
            import backend.sampling.sampling_function  # noqa: F401,PLC0415
            return "forge"
        except ImportError:
            pass
    if importlib.util.find_spec("ldm_patched") is not None:
        try:
            import ldm_patched.modules.samplers as samplers  # noqa: PLC0415
        except ImportError:
            samplers = None
        if samplers is not None and hasattr(samplers, "calc_cond_batch") \
                and hasattr(unet, "set_model_sampler_pre_cfg_function"):
            return "reforge"
        if samplers is not None and hasattr(samplers, "calc_cond_uncond_batch") and post_cfg:
            return "forge-classic"
    raise GuidanceError(f"unknown UNet patcher {type(unet).__module__}.{type(unet).__name__}: SafeT2I guidance "
                        "supports Forge (backend/) and reForge (ldm_patched)")


def patch_unet(p, method, concept, job) -> ForgeGuidanceRun | None:
    """Clone ``p.sd_model.forge_objects.unet`` with the guidance added; returns the run, or
    None when this UNet already carries it (Forge asks twice before a hires pass)."""
    objects = p.sd_model.forge_objects
    unet = objects.unet
    if MARK in unet.model_options:
        return None
    flavour = flavour_of(unet)

    def total_steps():
        """Model calls the pass makes (second-order samplers: two per step), read at its first call."""
        from modules import shared  # noqa: PLC0415

        denoiser = getattr(getattr(p, "sampler", None), "model_wrap_cfg", None)
        return getattr(denoiser, "total_steps", None) or getattr(shared.state, "sampling_steps", None)

    run = ForgeGuidanceRun(method, concept, job, flavour, total_steps,
                           distilled=bool(getattr(p.sd_model, "use_distilled_cfg_scale", False)))
    clone = unet.clone()
    if flavour in ("forge", "forge-classic"):
        clone.add_conditioning_modifier(lambda *a: run.forge_modifier(*a))
        clone.set_model_sampler_post_cfg_function(lambda args: run.forge_post_cfg(args),
                                                  disable_cfg1_optimization=True)
    else:
        clone.set_model_sampler_pre_cfg_function(lambda args: run.reforge_pre_cfg(args),
                                                 disable_cfg1_optimization=True)
    # A plain function (deepcopy of model_options by later clones keeps it as it is).
    clone.model_options[MARK] = lambda: run
    objects.unet = clone
    return run
