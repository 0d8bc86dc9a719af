"""ComfyUI nodes of the sampler layer (V3 schema): safety guidance as MODEL patches that
work with the stock KSampler, KSamplerAdvanced and SamplerCustom(Advanced), and compose with
other packs' patches.

How a patch runs (ComfyUI's chained wrappers, ``comfy.patcher_extension.WrappersMP``, plus one
entry of the ``sampler_pre_cfg_function`` list; no single-slot option is claimed):
* ``OUTER_SAMPLE``, once per sampling run: adds the safety concept to the guider's conds, so
  ComfyUI prepares it like the negative prompt (model conds, areas, ControlNet), and starts a
  new run of the method with the run's σ schedule;
* ``PREDICT_NOISE``, once per model evaluation: tells the method the step (``set_state``),
  and afterwards checks that the guidance ran; if anything kept it from running (a node
  that replaced the pre-CFG list or ComfyUI's sampling function), sampling stops with an
  error instead of returning an unguided image;
* ``CALC_COND_BATCH``: the first ``calc_cond_batch`` call at the step's latent and model
  options, whoever makes it (ComfyUI, or another pack's ``sampler_calc_cond_batch_function``
  set before or after ours), gets the concept appended, so it runs in the same UNet batch
  as the host's conds; the caller receives its own outputs only;
* ``sampler_pre_cfg_function``: the guided direction is computed in ε space (thresholds are
  defined on ε) and folded into the cond prediction, so the ordinary CFG formula (or another
  node's CFG function) yields ε_∅ + s_g · d_p. When no call went through ComfyUI's
  ``calc_cond_batch`` at this step (a function that evaluates the model its own way), the
  concept is evaluated here in a separate call.
"""

from __future__ import annotations

import json
import logging

import torch
from comfy_api.latest import io, ui

from ..safet2i.errors import SafeT2IError
from ..safet2i.guidance.dag import aggregate_joint, guideline_context, joint_token_attention
from ..safet2i.guidance.sld import CARD_PRESETS
from ..safet2i.guidance import (
    DEFAULT_CONCEPT, SEXUAL_CONCEPT, SLD_PRESETS, DAGConfig, DAGGuidance, SLDConfig, SLDGuidance, SPGuardConfig,
    SPGuardGuidance, aggregate_attention, correct_prediction, eps_offset_free, to_eps, token_attention,
)

log = logging.getLogger("safet2i")
STATE_KEY = "safet2i_guidance"      # model_options entry (the report reads it) and wrapper key
CONCEPT_KEY = "safet2i_concept"     # the guider's conds entry of the safety concept


class Step:
    """One model evaluation: its latent and options (to recognise the host's call), the
    prepared concept conds, and what happened."""

    def __init__(self, x, model_options, concept):
        self.x, self.model_options, self.concept = x, model_options, concept
        self.concept_out: torch.Tensor | None = None
        self.busy = False
        self.applied = False


def sampling_space(sampling, method_name: str) -> str:
    """The :mod:`safet2i.guidance.spaces` space of a ComfyUI model's sampling object: ``denoised``
    for the EPS family (x = x0 + σ·ε: eps, v, EDM, x0 prediction), ``flow_denoised`` for CONST
    (rectified flow: SD3, Flux, Qwen-Image, Wan, ModelSamplingSD3/Flux/AuraFlow). Checked on the
    model that samples, so a ModelSampling node applied after SafeT2I counts."""
    import comfy.model_sampling  # noqa: PLC0415

    if isinstance(sampling, comfy.model_sampling.EPS):
        return "denoised"
    if isinstance(sampling, comfy.model_sampling.CONST):
        return "flow_denoised"
    raise SafeT2IError(
        f"SafeT2I {method_name} guidance works on models whose latent is x0 + σ·noise (SD1.x, SD2.x, SDXL) or "
        f"(1 − σ)·x0 + σ·noise (flow matching: SD3, Flux, Qwen-Image, Wan); this model samples with "
        f"{type(sampling).__name__}, which it does not support. The image is not produced unguided.")


class GuidanceRun:
    """Glue between ComfyUI's sampler wrappers and one guidance method (see the module docstring)."""

    def __init__(self, method, concept, token_index: list[int] | None = None, branch_scale: float = 0.0):
        self.method = method
        self.branch_scale = float(branch_scale)  # s_b of the concept-branch form at cfg 1 (0: refuse cfg 1)
        self.concept = concept
        self.token_index = token_index   # concept tokens whose attention is captured (Detect-and-Guide)
        self.run = 0
        self.schedule: list[float] | None = None
        self.step: Step | None = None
        self.capture: int | None = None  # cond_or_uncond index of the concept in the UNet call under way
        self.maps: list[torch.Tensor] = []
        # Joint-attention transformers (SD3, Flux, Qwen-Image, Wan): the family, its patch size,
        # the model call under way (text rows, image-token grid) and the grid of the maps taken.
        self.joint: str | None = None
        self.patch: tuple[int, ...] = ()
        self.call: dict | None = None
        self.grid: tuple[int, ...] | None = None
        self.concept_rows: int | None = None

    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        import comfy.sampler_helpers  # noqa: PLC0415

        conds = executor.class_obj.conds
        concept = [dict(c, prompt_type="negative") for c in comfy.sampler_helpers.convert_cond(self.concept)]
        # Guidance-distilled models (Flux) take the distilled guidance from the prompt's conditioning
        # (FluxGuidance); the concept is evaluated at the same value so ε_p − ε_S compares like with like.
        distilled = [c["guidance"] for c in conds.get("positive", []) if c.get("guidance") is not None]
        if distilled:
            concept = [c if c.get("guidance") is not None else dict(c, guidance=distilled[0]) for c in concept]
        conds[CONCEPT_KEY] = concept
        self.run += 1
        self.schedule = sigmas.detach().flatten().to(torch.float64).cpu().tolist()
        try:
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            self.schedule = None
            conds.pop(CONCEPT_KEY, None)

    def predict_noise(self, executor, x, timestep, model_options, seed):
        if self.schedule is None:
            raise SafeT2IError(f"SafeT2I {self.method.name} guidance: the model was evaluated outside a ComfyUI "
                               "sampling run (the sampler bypassed CFGGuider.sample), so it cannot be guided.")
        s = float(timestep.flatten()[0])
        index = min(range(len(self.schedule)), key=lambda i: abs(self.schedule[i] - s))
        self.method.set_state(index, len(self.schedule) - 1 or None, s, run=self.run)
        self.step, self.maps = Step(x, model_options, executor.class_obj.conds.get(CONCEPT_KEY)), []
        try:
            out = executor(x, timestep, model_options, seed)
            if not self.step.applied:
                raise SafeT2IError(
                    f"SafeT2I {self.method.name} guidance did not run in this step: the sampler's guider computes CFG "
                    "without ComfyUI's sampling function or pre-CFG functions (e.g. DualCFGGuider), or another node replaced "
                    "the pre-CFG functions after SafeT2I. The image is not produced unguided; use CFGGuider or "
                    "KSampler, and apply such nodes before the SafeT2I guidance node.")
            return out
        finally:
            self.step = None

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        st = self.step
        if st is None or st.busy or st.concept_out is not None or not st.concept \
                or x_in is not st.x or model_options is not st.model_options or self.method.inert:
            return executor(model, conds, x_in, timestep, model_options)
        out = self._with_concept(executor, model, list(conds), x_in, timestep, model_options)
        st.concept_out = out[-1]
        return out[:-1]

    def _with_concept(self, calc, model, conds, x, sigma, model_options):
        """``calc`` on ``conds`` + the concept, recording the concept's attention on the way."""
        st = self.step
        st.busy, self.capture = True, len(conds)
        try:
            return calc(model, conds + [st.concept], x, sigma, model_options)
        finally:
            st.busy, self.capture = False, None

    def pre_cfg(self, args):
        import comfy.samplers  # noqa: PLC0415

        st, out = self.step, args["conds_out"]
        if st is None:
            raise SafeT2IError(f"SafeT2I {self.method.name} guidance: this sampler calls ComfyUI's sampling function "
                               "without its predict-noise entry point, so the guidance cannot follow the run.")
        space = sampling_space(getattr(args.get("model"), "model_sampling", None), self.method.name)
        branch = args["conds"][1] is None or out[1] is None   # cfg 1: ComfyUI evaluates no uncond
        if branch and not (self.branch_scale > 0 and self.method.supports_concept_branch):
            if not self.method.supports_concept_branch:
                raise SafeT2IError(
                    f"SafeT2I {self.method.name} needs classifier-free guidance (its harmfulness estimate reads the "
                    "direction from the negative to the prompt): set cfg above 1.0 and connect a negative "
                    "conditioning. Guidance-distilled models (Flux dev/schnell) can use SafeT2I SLD, whose concept "
                    "branch works at cfg 1. It is not applied without it.")
            raise SafeT2IError(
                f"SafeT2I {self.method.name} needs classifier-free guidance: set cfg above 1.0 and connect a "
                "negative conditioning, or set concept_branch_scale above 0 to use the concept-branch form at cfg 1 "
                "(for guidance-distilled models such as Flux). It is not applied without it.")
        if not st.concept:
            raise SafeT2IError(f"SafeT2I {self.method.name} guidance: the safety concept is missing from the "
                               "sampler's conditionings (another node replaced them).")
        x, sigma = args["input"], args["sigma"]
        if self.method.inert:   # zero strength: no concept evaluated, the host's predictions as they are
            st.applied = True
            return out
        if st.concept_out is None:   # no calc_cond_batch call at this latent: a separate one
            st.concept_out = self._with_concept(comfy.samplers.calc_cond_batch, args["model"], [], x, sigma,
                                                args["model_options"])[0]
        if space == "flow_denoised":   # ε less its common offset x/σ: exact near σ = 1 (contract)
            def eps(pred):
                return eps_offset_free(pred, sigma, space)
        else:
            def eps(pred):
                return to_eps(pred, x, sigma, space)
        ec, es = eps(out[0]), eps(st.concept_out)
        attn = None
        if self.method.needs.attention:
            maps, self.maps = self.maps, []
            if self.token_index and not maps:
                if self.joint:
                    # Our attention override never saw the concept rows: a later node replaced it.
                    raise SafeT2IError(
                        "Detect-and-Guide-style guidance could not read the concept's joint attention this step: "
                        "another node replaced ComfyUI's attention override (optimized_attention_override) after "
                        "SafeT2I without calling it. Apply SafeT2I guidance last or remove the other attention patch.")
                # Our attn2 replacement never saw the concept rows: another patch overrode it.
                raise SafeT2IError(
                    "Detect-and-Guide-style guidance could not read the concept's cross-attention this step: "
                    "another node replaced cross-attention after SafeT2I. Apply SafeT2I guidance last or "
                    "remove the other attention patch.")
            if self.joint and maps:
                attn = latent_map(aggregate_joint(maps, self.grid), x)
            else:
                attn = aggregate_attention(maps, tuple(x.shape[-2:])) if maps else None
        if branch:
            c = self.method.branch_correction(ec, es, self.branch_scale, attn)
        else:
            c = self.method.correction(eps(out[1]), ec, es, attn)
        st.applied = True
        return [correct_prediction(out[0], c, sigma, space)] + list(out[1:])

    def attn2(self, q, k, v, extra_options):
        """attn2 replacement: normal attention for every row; for the concept rows also the
        softmax probabilities of the concept tokens."""
        import comfy.ldm.modules.attention as attention  # noqa: PLC0415

        heads = extra_options["n_heads"]
        out = attention.optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"))
        order = list(extra_options.get("cond_or_uncond", []))
        if self.capture in order and self.token_index:
            chunk = q.shape[0] // len(order)
            rows = slice(order.index(self.capture) * chunk, (order.index(self.capture) + 1) * chunk)
            self.maps.append(token_attention(q[rows], k[rows], heads, self.token_index))
        return out

    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                    **kwargs):
        """APPLY_MODEL wrapper (joint-attention models): notes the call's text rows and image-token
        grid for :meth:`joint_attention`, which runs inside this call."""
        prev = self.call
        self.call = {"text": int(c_crossattn.shape[1]) if c_crossattn is not None else 0,
                     "grid": token_grid(tuple(x.shape), self.patch)}
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            self.call = prev

    def joint_attention(self, inner, func, *args, **kwargs):
        """``optimized_attention_override``: the attention runs as before (through ``inner``, an
        override set before ours, or ComfyUI's own function); for the concept rows of a joint
        (SD3, Flux, Qwen-Image) or text cross-attention (Wan) call it also records the image
        queries' softmax probabilities on the concept tokens."""
        self._joint_capture(args, kwargs)
        return inner(func, *args, **kwargs) if inner is not None else func(*args, **kwargs)

    def _joint_capture(self, args, kwargs):
        opts = kwargs.get("transformer_options") or {}
        order = list(opts.get("cond_or_uncond") or [])
        call = self.call
        if call is None or not self.token_index or self.capture not in order or len(args) < 2:
            return
        q, k = args[0], args[1]
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        mask = args[4] if len(args) > 4 else kwargs.get("mask")
        skip = args[6] if len(args) > 6 else kwargs.get("skip_reshape", False)
        s_q, s_k = (q.shape[2], k.shape[2]) if skip else (q.shape[1], k.shape[1])
        text, grid = call["text"], call["grid"]
        n = 1
        for g in grid:
            n *= g
        if self.joint == "wan":   # text cross-attention: image queries × text keys
            if s_k != text:
                return               # self-attention, or the image-encoder cross-attention of I2V
            if text == n:
                raise SafeT2IError(
                    f"Detect-and-Guide-style guidance on Wan: the text has as many rows ({text}) as the video has "
                    "tokens, so cross-attention cannot be told from self-attention. Change the resolution or the "
                    "frame count. The video is not produced unguided.")
            if s_q != n:
                raise SafeT2IError(
                    f"Detect-and-Guide-style guidance on Wan: the cross-attention has {s_q} queries, not the "
                    f"{n} video tokens (reference or extra frames are not supported). The video is not produced "
                    "unguided.")
            text0, img0 = 0, 0
        else:
            if s_q != s_k or s_k < text + n:
                return               # not the joint attention (e.g. SD3.5's image-only self-attention)
            img0 = s_k - n if self.joint == "sd3" else text          # SD3: [context, image]; Flux/Qwen: [text, image, refs]
            text0 = img0 - text if self.joint == "sd3" else 0
        if text != self.concept_rows:
            raise SafeT2IError(
                f"Detect-and-Guide-style guidance: the model call that holds the concept has {text} text rows, "
                f"its encoding {self.concept_rows}; another node changed the conditioning, so its tokens cannot "
                "be located. The image is not produced unguided.")
        chunk = q.shape[0] // len(order)
        i = order.index(self.capture)
        rows = slice(i * chunk, (i + 1) * chunk)

        def heads_first(t):
            t = t[rows]
            return t if skip else t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

        if mask is not None:
            mask = mask.reshape(1, 1, *mask.shape) if mask.ndim == 2 else mask
            mask = mask[:, None] if mask.ndim == 3 else mask
            mask = mask[rows] if mask.shape[0] == q.shape[0] else mask
        cols = [text0 + t for t in self.token_index]
        with torch.no_grad():
            self.maps.append(joint_token_attention(heads_first(q), heads_first(k), cols, slice(img0, img0 + n),
                                                   mask=mask))
        self.grid = grid

    def report(self) -> dict:
        return self.method.report()

    def mask_preview(self) -> torch.Tensor:
        """IMAGE [B, 8h, 8w, 3] of the last step's guided region (white = guided); video latents'
        masks [B, F, h, w] give one picture per latent frame ([B·F, 8h, 8w, 3])."""
        m = self.method.last_mask
        if m is None:
            return torch.zeros((1, 64, 64, 3))
        m = m.detach().float().cpu().clamp(0, 1)
        if m.ndim == 4:
            m = m.reshape(-1, *m.shape[-2:])
        m = m.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)
        return m[..., None].repeat(1, 1, 1, 3)


def token_grid(shape: tuple[int, ...], patch: tuple[int, ...]) -> tuple[int, ...]:
    """The image-token grid of a latent ``shape`` ([B, C, H, W] or [B, C, F, H, W]) patchified by
    ``patch`` (the models pad to whole patches): (h, w) or (frames, h, w)."""
    dims = shape[2:]
    patch = tuple(patch)[-len(dims):] if len(patch) >= len(dims) else (1,) * (len(dims) - len(patch)) + tuple(patch)
    return tuple(-(-d // p) for d, p in zip(dims, patch))


def latent_map(attn: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A joint-attention map [B, (F,) h, w] in the layout the method needs for latent ``x``:
    [B, h, w] for images, [B, F, h, w] for video latents [B, C, F, H, W] (a single frame's axis is
    dropped or added to match)."""
    if x.ndim == 4 and attn.ndim == 4 and attn.shape[1] == 1:
        return attn[:, 0]
    if x.ndim == 5 and attn.ndim == 3 and x.shape[2] == 1:
        return attn[:, None]
    return attn


def joint_family(model) -> str | None:
    """``sd3`` / ``flux`` / ``qwen_image`` / ``wan`` for the joint-attention transformers whose
    text→image attention SafeT2I reads, None for SD-style UNets; any other model is refused."""
    if transformer_blocks(model):
        return None
    dm = model.model.diffusion_model
    import comfy.ldm.flux.model as flux  # noqa: PLC0415
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit  # noqa: PLC0415
    import comfy.ldm.qwen_image.model as qwen  # noqa: PLC0415
    import comfy.ldm.wan.model as wan  # noqa: PLC0415

    if isinstance(dm, mmdit.MMDiT):
        return "sd3"
    if isinstance(dm, flux.Flux):
        if any(getattr(b, "flipped_img_txt", False) for b in dm.double_blocks):
            raise SafeT2IError("Detect-and-Guide-style guidance: this Flux-type model puts the image before the text "
                               "in its joint attention (flipped_img_txt), which SafeT2I does not read.")
        return "flux"
    if isinstance(dm, qwen.QwenImageTransformer2DModel):
        return "qwen_image"
    if isinstance(dm, wan.WanModel):
        return "wan"
    raise SafeT2IError(
        "Detect-and-Guide-style guidance needs the concept tokens' attention: it reads the cross-attention of "
        "SD1.x/SD2.x/SDXL UNets and the joint attention of SD3, Flux, Qwen-Image and Wan; this model "
        f"({type(dm).__name__}) is none of them, so the text-to-image part of its attention is not located. "
        "Use SafeT2I SLD on it.")


def transformer_blocks(model):
    """(block name, number, transformer index) of every cross-attention transformer block."""
    dm = model.model.diffusion_model
    found = []
    if not all(hasattr(dm, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        return found   # not an SD-style UNet (e.g. an MMDiT / Flux transformer): no attn2 blocks to read
    for name, blocks in (("input", dm.input_blocks), ("middle", [dm.middle_block]), ("output", dm.output_blocks)):
        for number, block in enumerate(blocks):
            for layer in block:
                for t_idx, _ in enumerate(getattr(layer, "transformer_blocks", [])):
                    found.append((name, number, t_idx))
    return found


def patch_model(model, method, concept, token_index: list[int] | None = None, branch_scale: float = 0.0):
    from comfy.patcher_extension import WrappersMP  # noqa: PLC0415

    if STATE_KEY in model.model_options:
        raise SafeT2IError(
            f"This model already has SafeT2I guidance (only one can be applied per model: {method.name} would guide "
            "the other one's result). Use one SafeT2I guidance node per model.")
    if not hasattr(model, "add_wrapper_with_key"):
        raise SafeT2IError("SafeT2I guidance needs a ComfyUI with model wrappers (ModelPatcher.add_wrapper_with_key).")
    m = model.clone()
    run = GuidanceRun(method, concept, token_index, branch_scale)
    # Plain closures, not bound methods: ModelPatcher.clone() deep-copies model_options,
    # and deepcopy copies a bound method's object but keeps functions as they are, so every
    # clone (sampler-side ones included) shares this one run state.
    m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, STATE_KEY, lambda ex, *a, **k: run.outer_sample(ex, *a, **k))
    m.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, STATE_KEY, lambda ex, *a, **k: run.predict_noise(ex, *a, **k))
    m.add_wrapper_with_key(WrappersMP.CALC_COND_BATCH, STATE_KEY, lambda ex, *a, **k: run.calc_cond_batch(ex, *a, **k))
    m.set_model_sampler_pre_cfg_function(lambda args: run.pre_cfg(args))
    m.model_options[STATE_KEY] = lambda: run
    if method.needs.attention:
        replaced = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        blocks = transformer_blocks(m)
        family = joint_family(m) if not blocks else None
        if family is not None:
            # ComfyUI's attention override is one slot: the one set before ours is chained (called
            # as the inner function); one set after ours that drops it is detected at the step.
            dm = m.model.diffusion_model
            patch = dm.patch_size
            run.joint, run.patch = family, tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
            run.concept_rows = int(concept[0][0].shape[1])
            opts = m.model_options.setdefault("transformer_options", {})
            inner = opts.get("optimized_attention_override")
            opts["optimized_attention_override"] = lambda func, *a, **k: run.joint_attention(inner, func, *a, **k)
            m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, STATE_KEY, lambda ex, *a, **k: run.apply_model(ex, *a, **k))
        for name, number, t_idx in blocks:
            if (name, number, t_idx) in replaced or (name, number) in replaced:
                raise SafeT2IError(
                    f"Another node already replaced cross-attention at {name} {number}; Detect-and-Guide-style "
                    "guidance needs to read it. Apply SafeT2I first or remove the other attention patch."
                )
            m.set_model_attn2_replace(lambda q, k, v, eo: run.attn2(q, k, v, eo), name, number, t_idx)
    return m


def _summary(rep: dict) -> str:
    steps = rep["steps"]
    guided = [s["step"] for s in steps if s.get("applied")]
    lines = [f"{rep['method']}: {len(guided)}/{len(steps)} steps guided in the last run"]
    if guided:
        lines.append(f"guided steps: {guided[0]}..{guided[-1]}")
    masks = [s.get("mask", s.get("gate")) for s in steps if s.get("mask", s.get("gate")) is not None]
    if masks:
        lines.append(f"mean mask coverage: {sum(masks) / len(masks):.3f}")
    if steps and "harm" in steps[-1]:
        lines.append(f"harmfulness estimate: {steps[-1]['harm']} -> strength {steps[-1]['strength']}")
    return "\n".join(lines)


class SafeT2IConceptEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SafeT2IConceptEncode",
            display_name="SafeT2I Safety Concept",
            category="SafeT2I/guidance",
            description="Encodes the unsafe concept to steer away from (default: the SLD safety concept).",
            inputs=[
                io.Clip.Input("clip", tooltip="The model's text encoder (the same CLIP as the prompt's)."),
                io.String.Input("concept", default=DEFAULT_CONCEPT, multiline=True,
                                tooltip="What to steer away from: SLD's concept text by default."),
            ],
            outputs=[io.Conditioning.Output(display_name="concept")],
        )

    @classmethod
    def execute(cls, clip, concept) -> io.NodeOutput:
        if not concept.strip():
            raise SafeT2IError("The safety concept is empty.")
        return io.NodeOutput(clip.encode_from_tokens_scheduled(clip.tokenize(concept)))


class SafeT2ISLD(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SafeT2ISLD",
            display_name="SafeT2I Safe Latent Diffusion",
            category="SafeT2I/guidance",
            description=(
                "Safe Latent Diffusion (Schramowski et al., CVPR 2023): steers every step away from the "
                "safety concept where the prompt's prediction is not already far from it. Presets from the "
                "model card; 'custom' uses the values below. Warm-up is defined for 50 steps and scaled."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch."),
                io.Conditioning.Input("concept", tooltip="From SafeT2I Safety Concept or any text encode."),
                io.Combo.Input("preset", options=[*SLD_PRESETS, "custom"],
                               default="MEDIUM", tooltip="SLD model-card presets (WEAK-DIFFUSERS: diffusers' "
                                                         "WEAK, s_S = 20); 'custom' uses the values below."),
                io.Float.Input("guidance_scale", default=1000.0, min=0.0, max=100000.0, step=1.0,
                               tooltip="s_S (custom only); 1 or less turns SLD off."),
                io.Int.Input("warmup_steps", default=10, min=0, max=1000, tooltip="δ in 50-step units (custom only)."),
                io.Float.Input("threshold", default=0.01, min=-1.0, max=10.0, step=0.001, tooltip="λ (custom only)."),
                io.Float.Input("momentum_scale", default=0.3, min=0.0, max=10.0, step=0.01, tooltip="s_m (custom only)."),
                io.Float.Input("mom_beta", default=0.4, min=0.0, max=1.0, step=0.01, tooltip="β_m (custom only)."),
                io.Float.Input("concept_branch_scale", default=3.5, min=0.0, max=100.0, step=0.05, optional=True,
                               tooltip="s_b of the concept-branch form used at cfg 1 (guidance-distilled models such "
                                       "as Flux dev/schnell, which evaluate no negative): the safety concept is "
                                       "measured against the prompt's own prediction and the result is "
                                       "ε_p − s_b·γ (s_b takes the place of the CFG scale). 0 refuses cfg 1. "
                                       "Costs one extra model evaluation per step."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, concept, preset, guidance_scale=1000.0, warmup_steps=10, threshold=0.01,
                momentum_scale=0.3, mom_beta=0.4, concept_branch_scale=3.5) -> io.NodeOutput:
        cfg = SLD_PRESETS[preset] if preset != "custom" else SLDConfig(
            guidance_scale, warmup_steps, threshold, momentum_scale, mom_beta)
        return io.NodeOutput(patch_model(model, SLDGuidance(cfg), concept, branch_scale=concept_branch_scale))


class SafeT2ISPGuard(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SafeT2ISPGuard",
            display_name="SafeT2I SP-Guard-style Guidance",
            category="SafeT2I/guidance",
            description=(
                "SP-Guard-style (after Yu & Moon, 2025; our reconstruction): strength from the prompt's "
                "harmfulness (cosine of the prompt's and the concept's guidance directions, zero for benign "
                "prompts) and a per-step spatial mask, so only unsafe regions are guided."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch."),
                io.Conditioning.Input("concept", tooltip="The unsafe concept (SafeT2I Safety Concept)."),
                io.Float.Input("max_scale", default=2.0, min=0.0, max=20.0, step=0.05,
                               tooltip="Safety-guidance strength for the most harmful prompts."),
                io.Float.Input("harm_threshold", default=0.45, min=-1.0, max=0.99, step=0.01,
                               tooltip="τ_h: cosine below which a prompt counts as benign (no guidance)."),
                io.Float.Input("mask_threshold", default=0.0, min=-1.0, max=1.0, step=0.01,
                               tooltip="τ_m: per-pixel channel cosine above which a region is guided."),
                io.Float.Input("ema", default=0.5, min=0.0, max=0.99, step=0.01,
                               tooltip="Smoothing β of the harmfulness estimate over steps (h ← β·h + (1 − β)·c_t); the mask is recomputed every step."),
                io.Int.Input("start_step", default=0, min=0, max=1000, tooltip="First step that is guided."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, concept, max_scale=2.0, harm_threshold=0.45, mask_threshold=0.0, ema=0.5,
                start_step=0) -> io.NodeOutput:
        cfg = SPGuardConfig(max_scale, harm_threshold, mask_threshold, ema, start_step)
        return io.NodeOutput(patch_model(model, SPGuardGuidance(cfg), concept))


def load_guideline(name: str) -> torch.Tensor:
    """Optimised guideline-token embeddings [T, D] from a .safetensors in ComfyUI's
    ``embeddings`` folder (only listed names are accepted)."""
    import folder_paths  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    if name not in folder_paths.get_filename_list("embeddings"):
        raise SafeT2IError(f"Guideline embeddings {name!r} are not in the embeddings folder.")
    if not name.lower().endswith(".safetensors"):
        raise SafeT2IError("Guideline embeddings must be a .safetensors file (pickles are never loaded).")
    tensors = load_file(folder_paths.get_full_path_or_raise("embeddings", name))
    t = tensors.get("guideline", next(iter(tensors.values())) if len(tensors) == 1 else None)
    if t is None or t.ndim not in (2, 3):
        raise SafeT2IError(f"{name}: expected one tensor [tokens, dim] (or a 'guideline' key).")
    return t.reshape(-1, t.shape[-1]).float()


def load_guideline_tokens(name: str, model):
    """A Detect-and-Guide tokens file (``safet2i.train.dag_tokens``: the whole concept context
    with the optimised guideline rows, and their positions) from ``models/safety_models``;
    only listed names are accepted, and a file of another text width than ``model``'s is refused.
    Returns ``(cond, token positions)``."""
    from ..safet2i.train.dag_tokens import load_dag_tokens  # noqa: PLC0415
    from .paths import safety_weight_path  # noqa: PLC0415

    if not name.lower().endswith(".safetensors"):
        raise SafeT2IError(f"Guideline tokens {name!r}: a .safetensors file is needed (pickles are never loaded).")
    tokens = load_dag_tokens(safety_weight_path(name, lora=False))
    unet_config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
    width = unet_config.get("context_dim")
    if not isinstance(width, int):
        raise SafeT2IError(f"Guideline tokens {name}: this model has no cross-attention text width (context_dim).")
    adm = unet_config.get("adm_in_channels")
    # SDXL base: 1280 pooled CLIP-G + 6 x 256 size/crop ids; SDXL refiner: 1280 + 5 x 256 (aesthetic score)
    pooled_width = {2816: 1280, 2560: 1280}.get(adm) if adm else None
    if adm and pooled_width is None:
        raise SafeT2IError(f"Guideline tokens {name}: this model's extra conditioning (adm_in_channels={adm}) is not "
                           "an SDXL pooled text embedding (e.g. SD2.1 unCLIP's image embedding); guideline tokens "
                           "support SD1.x, SD2.x and SDXL base/refiner.")
    tokens.check_for(width, pooled_width=pooled_width)
    if adm and tokens.pooled is None:
        raise SafeT2IError(f"Guideline tokens {name} have no pooled embedding, which this model needs.")
    extra = {} if tokens.pooled is None else {"pooled_output": tokens.pooled}
    return [[tokens.context, extra]], list(tokens.positions)


def joint_token_positions(clip, tokens: dict, family: str, rows: int) -> list[int]:
    """The concept's own token rows in its conditioning (``rows`` long) for a joint-attention
    model: SD3 the CLIP tokens between start and end in each 77-row chunk of the CLIP-L‖G block,
    then the T5 tokens before ``</s>`` (offset by the CLIP rows); Flux and Wan the T5 / umT5 tokens
    before ``</s>``; Qwen-Image the user turn (ComfyUI drops the template prefix; the closing
    ``<|im_end|>`` and the assistant header are not concept tokens). Start, end, padding and
    template rows are never counted."""
    from ..safet2i.steering.plan import chat_span, clip_span, t5_span  # noqa: PLC0415
    from .steering_nodes import EOS, QWEN_IM_END, QWEN_PAD, _qwen_start, model_family  # noqa: PLC0415

    found = model_family(clip)
    if found != family:
        raise SafeT2IError(f"Detect-and-Guide-style guidance: the model is {family} but the CLIP is "
                           f"{found or type(getattr(clip, 'cond_stage_model', None)).__name__}'s text encoder; "
                           "connect the model's own text encoder.")

    def ids(chunk):
        out = []
        for t in chunk:
            if not isinstance(t[0], int) or isinstance(t[0], bool):
                raise SafeT2IError("Detect-and-Guide-style guidance: the concept holds an embedding or image, not "
                                   "only words; write the concept as text.")
            out.append(int(t[0]))
        return out

    positions, offset = [], 0

    def add(key, span):
        nonlocal offset
        for chunk in tokens.get(key, []):
            c = ids(chunk)
            sp = span(c)
            positions.extend(offset + i for i in range(sp.first, sp.first + sp.n))
            offset += len(c)

    model = clip.cond_stage_model
    if family == "sd3":
        if getattr(model, "clip_l", None) is not None or getattr(model, "clip_g", None) is not None:
            add("l" if getattr(model, "clip_l", None) is not None else "g", lambda c: clip_span(c, EOS))
        if getattr(model, "t5xxl", None) is not None:
            add("t5xxl", lambda c: t5_span(c, 1))
    elif family in ("flux", "wan"):
        add("t5xxl" if family == "flux" else "umt5xxl", lambda c: t5_span(c, 1))
    else:
        c = ids(tokens["qwen25_7b"][0])
        start = _qwen_start(c)
        if start < 0:
            raise SafeT2IError("Detect-and-Guide-style guidance: the Qwen-Image concept has no chat-template user "
                               "turn; ComfyUI's template was replaced by one SafeT2I cannot read.")
        sp = chat_span(c, start, QWEN_IM_END, QWEN_PAD)
        positions, offset = list(range(sp.first - start, sp.first - start + sp.n)), len(c) - start
    if offset != rows:
        raise SafeT2IError(f"Detect-and-Guide-style guidance: the concept's encoding has {rows} rows, its tokens "
                           f"{offset}; the text encoder's layout is not one SafeT2I reads.")
    if not positions:
        raise SafeT2IError("Detect-and-Guide-style guidance: the concept has no tokens of its own.")
    return positions


class SafeT2IDetectGuide(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import folder_paths  # noqa: PLC0415

        from .paths import safety_weight_names  # noqa: PLC0415

        files = [f for f in folder_paths.get_filename_list("embeddings") if f.lower().endswith(".safetensors")]
        token_files = [f for f in safety_weight_names(lora=False) if f.lower().endswith(".safetensors")]
        return io.Schema(
            node_id="SafeT2IDetectGuide",
            display_name="SafeT2I Detect-and-Guide-style Guidance",
            category="SafeT2I/guidance",
            description=(
                "Detect-and-Guide-style (after Li et al., CVPR 2025): the concept tokens' cross-attention "
                "finds unsafe regions at every step; only those are guided, scaled by region area and "
                "attention magnitude; steps whose map covers > 80 % are skipped. Uses optimised guideline "
                "tokens (from SafeT2I's Detect-and-Guide token trainer) or guideline embeddings when given, the "
                "raw concept tokens otherwise."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch."),
                io.Clip.Input("clip", tooltip="The text encoder: it finds the concept's tokens."),
                io.String.Input("concept", default=SEXUAL_CONCEPT, multiline=True,
                                tooltip="Concept words whose cross-attention locates the unsafe region "
                                        "(unused with guideline tokens or embeddings)."),
                io.Float.Input("scale", default=0.2, min=0.0, max=10.0, step=0.01, tooltip="s_s"),
                io.Float.Input("high", default=0.5, min=0.0, max=1.0, step=0.01, tooltip="highlighted region threshold"),
                io.Float.Input("low", default=0.01, min=0.0, max=1.0, step=0.001, tooltip="editing region threshold"),
                io.Float.Input("skip_coverage", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="No guidance when the detected region covers more of the image than this."),
                io.Combo.Input("sld_gate", options=["none", *CARD_PRESETS], default="none",
                               tooltip="Also apply SLD's elementwise gate (the paper's 'DAG + SLD')."),
                io.Combo.Input("guideline_embeddings", options=["none"] + files, default="none",
                               tooltip=".safetensors [tokens, dim] in models/embeddings, from Stage 1 optimisation: the "
                                       "rows replace the concept's token rows in its own encoding."),
                io.Combo.Input("guideline_tokens", options=["none"] + token_files, default="none", optional=True,
                               tooltip="Optimised guideline tokens (.safetensors in models/safety_models, made by "
                                       "SafeT2I's Detect-and-Guide token trainer): their context and positions "
                                       "replace the concept's raw tokens."),
                io.Float.Input("concept_branch_scale", default=3.5, min=0.0, max=100.0, step=0.05, optional=True,
                               tooltip="s_b of the concept-branch form used at cfg 1 (guidance-distilled models such "
                                       "as Flux dev/schnell, which evaluate no negative): the concept is measured "
                                       "against the prompt's own prediction and the result is ε_p − s_b·c. "
                                       "0 refuses cfg 1. Costs one extra model evaluation per step."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, clip, concept, scale=0.2, high=0.5, low=0.01, skip_coverage=0.8, sld_gate="none",
                guideline_embeddings="none", guideline_tokens="none", concept_branch_scale=3.5) -> io.NodeOutput:
        cfg = DAGConfig(scale=scale, high=high, low=low, skip_coverage=skip_coverage,
                        sld_gate=None if sld_gate == "none" else SLD_PRESETS[sld_gate])
        family = joint_family(model)
        if family is not None:
            if guideline_tokens != "none" or guideline_embeddings != "none":
                raise SafeT2IError(
                    "Detect-and-Guide-style guideline tokens and embeddings are trained for the cross-attention of "
                    f"SD1.x/SD2.x/SDXL UNets; this {family} model reads the raw concept tokens in its joint "
                    "attention. Set both to 'none'.")
            if not concept.strip():
                raise SafeT2IError("The safety concept is empty.")
            tok = clip.tokenize(concept)
            cond = clip.encode_from_tokens_scheduled(tok)
            tokens = joint_token_positions(clip, tok, family, int(cond[0][0].shape[1]))
            return io.NodeOutput(patch_model(model, DAGGuidance(cfg), cond, token_index=tokens,
                                             branch_scale=concept_branch_scale))
        if guideline_tokens != "none":
            if guideline_embeddings != "none":
                raise SafeT2IError("Detect-and-Guide: choose guideline_tokens or guideline_embeddings, not both.")
            cond, tokens = load_guideline_tokens(guideline_tokens, model)
        elif guideline_embeddings != "none":
            # the rows go into the concept's own encoding (start token, padding) at positions 1..k
            emb = load_guideline(guideline_embeddings)
            base = clip.encode_from_tokens_scheduled(clip.tokenize(concept if concept.strip() else " "))
            try:
                ctx, tokens = guideline_context(base[0][0], emb)
            except ValueError as exc:
                raise SafeT2IError(f"Guideline embeddings {guideline_embeddings}: {exc}.") from exc
            cond = [[ctx, dict(base[0][1])]]
        else:
            if not concept.strip():
                raise SafeT2IError("The safety concept is empty.")
            tok = clip.tokenize(concept)
            cond = clip.encode_from_tokens_scheduled(tok)
            ids = [t[0] for t in next(iter(tok.values()))[0]]
            end = ids.index(ids[-1]) if ids else 0   # first end/pad token
            tokens = list(range(1, max(2, end)))     # skip the start token and the padding
        return io.NodeOutput(patch_model(model, DAGGuidance(cfg), cond, token_index=tokens,
                                         branch_scale=concept_branch_scale))


class SafeT2IGuidanceReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SafeT2IGuidanceReport",
            display_name="SafeT2I Guidance Report",
            category="SafeT2I/guidance",
            description="Per-step diagnostics of the last sampling run of a guided model: connect the "
                        "guided MODEL and the sampler's LATENT output (which makes it run afterwards).",
            inputs=[io.Model.Input("model", tooltip="The guided model (after the SafeT2I guidance node)."),
                    io.Latent.Input("samples", tooltip="The sampler's output; orders the report after sampling.")],
            outputs=[io.String.Output(display_name="report"),
                     io.Image.Output(display_name="mask_preview", tooltip="Guided region at the last step (white).")],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, model, samples) -> io.NodeOutput:
        get_run = model.model_options.get(STATE_KEY)
        if get_run is None:
            raise SafeT2IError("This model has no SafeT2I guidance patch.")
        run = get_run()
        rep = run.report()
        return io.NodeOutput(json.dumps(rep), run.mask_preview(), ui=ui.PreviewText(_summary(rep)))


NODES = [SafeT2IConceptEncode, SafeT2ISLD, SafeT2ISPGuard, SafeT2IDetectGuide, SafeT2IGuidanceReport]
