"""diffusers adapter, flow-matching part: safety guidance inside the transformer pipelines of
rectified-flow models (``StableDiffusion3Pipeline``, ``FluxPipeline``, ``QwenImagePipeline``,
``WanPipeline``, and pipelines built like them). Entered through
:func:`safet2i.diffusers_adapter.safety_guidance`, which dispatches here for pipelines with a
``transformer`` instead of a ``unet``.

The transformer predicts the velocity v = ε − x0 of x = (1 − σ)·x0 + σ·ε (space ``flow_v`` of
:mod:`safet2i.guidance.spaces`); the method works on ε = x + (1 − σ)·v (passed less the common
offset x, :func:`~safet2i.guidance.spaces.eps_offset_free`) and its correction c goes back as
v_p − c/(1 − σ). A method whose configuration cannot change anything (``inert``: zero strength)
adds no concept evaluation, so the pipeline runs exactly as without SafeT2I. How the pipelines evaluate CFG decides where that happens:

* **one batched call** ``[uncond; cond]`` (SD3): the concept is appended to the batch (3·B rows)
  and the call returns ``[v_∅; v_p − c/(1 − σ)]``;
* **separate calls** (Flux and Qwen-Image with true CFG, Wan): the first call of a step is the
  prompt; the concept is batched into it (or evaluated right after it when its text sequence has
  another length). The second call at the same timestep is the negative: when it returns, the
  prompt's output of the first call — the pipeline's own tensor, not yet combined — is corrected
  in place, so the pipeline's CFG formula (Qwen-Image's norm rescale included) gets the guided
  prompt prediction;
* **no negative** (guidance-distilled Flux at cfg 1, or any pipeline run without CFG): the
  concept-branch form (``branch_scale`` > 0, :mod:`safet2i.guidance.contract`) corrects the
  prompt's output just before ``scheduler.step`` consumes it; without it the step stops with an
  error instead of running unguided.

``scheduler.step`` is wrapped to check, every step, that the guidance ran; the scheduler's own
timesteps and sigmas give each call's σ and step index. On exit the transformer(s) and the
scheduler are restored, also after an error.

**Detect-and-Guide-style** (``method.needs.attention``): forward pre-hooks on the transformer's
text→image attention modules (SD3's and Flux's joint attention, Flux's single blocks, Qwen-Image's
joint attention, Wan's text cross-attention ``attn2``) recompute, for the concept rows of the call
only, q and k as the layer's own processor does (its projections, q/k norms and RoPE functions;
:class:`JointCapture`) and keep the image queries' softmax probabilities on the concept tokens,
the softmax taken over all keys (:func:`~safet2i.guidance.dag.joint_token_attention`). The layers'
outputs are untouched (a hook only reads its inputs). The maps are averaged over the layers at the
token grid (Wan: frames × h × w, each frame detected on its own). Every method works on the
unpacked latent: Flux and Qwen-Image pack 2×2 patches into tokens; they are unpacked to
[B, C, H, W] for the method (SP-Guard-style's channel cosines need it too) and the correction
is packed back. A processor SafeT2I does not know
(replaced by another library) is refused, as is a call whose image tokens do not form the grid.
"""

from __future__ import annotations

import contextlib

import torch

from .diffusers_adapter import _device, _Key, restore_attribute
from .errors import SafeT2IError
from .guidance.dag import aggregate_joint, joint_token_attention
from .guidance.spaces import correct_prediction, eps_offset_free

SPACE = "flow_v"


def is_flow_pipeline(pipe) -> bool:
    return getattr(pipe, "transformer", None) is not None and getattr(pipe, "unet", None) is None

#: Pipelines whose CFG calls SafeT2I knows (SD3: one [uncond; cond] batch; the others: the prompt's
#: call first, then the negative's), by class-name prefix (FluxImg2ImgPipeline etc. included).
KNOWN_PIPELINES = ("StableDiffusion3", "Flux", "QwenImage", "Wan")


def check_flow_pipeline(pipe) -> None:
    """Refuse a transformer pipeline the flow adapter would guide wrongly: a scheduler that is not
    rectified flow (PixArt, HunyuanDiT: the velocity conversions would not hold), or a pipeline
    whose order of CFG calls SafeT2I does not know (the first call of a step is taken as the
    prompt's)."""
    sched = pipe.scheduler
    cfg = getattr(sched, "config", {}) or {}
    flow = (type(sched).__name__.startswith("FlowMatch") or cfg.get("prediction_type") == "flow_prediction"
            or bool(cfg.get("use_flow_sigmas")))
    if not flow:
        raise SafeT2IError(
            f"Safety guidance on {type(pipe).__name__}: its scheduler {type(sched).__name__} is not a rectified-flow "
            "scheduler (FlowMatchEulerDiscreteScheduler, or UniPC with flow prediction), so the velocity conversions "
            "of the flow adapter do not hold; the pipeline is not guided.")
    if not type(pipe).__name__.startswith(KNOWN_PIPELINES):
        raise SafeT2IError(
            f"Safety guidance does not know the order of {type(pipe).__name__}'s classifier-free guidance calls "
            f"(supported: {', '.join(p + '*Pipeline' for p in KNOWN_PIPELINES)}); guiding it could correct the "
            "negative prompt instead of the prompt, so it is refused.")


def encode_concept_kwargs(pipe, concept: str, **encode_kwargs) -> dict:
    """The transformer keyword arguments that carry the text, for ``concept`` encoded by the
    pipeline's own ``encode_prompt`` (batch 1; ``encode_kwargs`` such as ``max_sequence_length``
    are passed on: the same length as the prompt's lets the concept share its transformer call)."""
    name = type(pipe).__name__
    device = _device(pipe)
    with torch.no_grad():
        if "StableDiffusion3" in name:
            embeds, _, pooled, _ = pipe.encode_prompt(concept, concept, concept, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False, **encode_kwargs)
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if "Flux" in name:
            embeds, pooled, _ = pipe.encode_prompt(concept, concept, device=device, num_images_per_prompt=1,
                                                   **encode_kwargs)
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if "QwenImage" in name:
            embeds, mask = pipe.encode_prompt(concept, device=device, num_images_per_prompt=1, **encode_kwargs)
            return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}
        if "Wan" in name:
            embeds, _ = pipe.encode_prompt(concept, do_classifier_free_guidance=False, num_videos_per_prompt=1,
                                           device=device, **encode_kwargs)
            return {"encoder_hidden_states": embeds}
    raise SafeT2IError(f"Safety guidance does not know how {name} encodes text; pass concept_kwargs (the "
                       "transformer keyword arguments of the concept's text, batch 1).")


JOINT_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux",
                  "QwenImageTransformer2DModel": "qwen_image", "WanTransformer3DModel": "wan"}
#: The attention processors whose q/k path :class:`JointCapture` recomputes, per family.
JOINT_PROCESSORS = {"sd3": ("JointAttnProcessor2_0",), "flux": ("FluxAttnProcessor",),
                    "qwen_image": ("QwenDoubleStreamAttnProcessor2_0",), "wan": ("WanAttnProcessor",)}


def joint_family(transformer) -> str:
    name = type(transformer).__name__
    if name not in JOINT_FAMILIES:
        raise SafeT2IError(
            f"Detect-and-Guide-style guidance reads the text→image attention of SD3, Flux, Qwen-Image and Wan "
            f"transformers; {name} is none of them, so its concept-token attention is not located. Use SLD or "
            "SP-Guard-style guidance on this pipeline.")
    return JOINT_FAMILIES[name]


def _first_or_len(ids: list[int], token: int) -> int:
    return ids.index(token) if token in ids else len(ids)


def concept_token_rows(pipe, concept: str, family: str, max_sequence_length: int | None = None) -> list[int]:
    """The concept's own token rows in the transformer's text sequence, as the pipeline's
    ``encode_prompt`` lays it out: SD3 the CLIP tokens between start and end (rows 1..n of the 77
    CLIP-L‖G rows) and the T5 tokens before ``</s>`` (from row 77); Flux and Wan the T5 / umT5
    tokens before ``</s>``; Qwen-Image the user turn after the dropped template prefix (its closing
    ``<|im_end|>`` and the assistant header are not concept tokens)."""
    if family == "qwen_image":
        from .steering.plan import chat_span  # noqa: PLC0415

        tok = pipe.tokenizer
        ids = tok(pipe.prompt_template_encode.format(concept)).input_ids
        start = pipe.prompt_template_encode_start_idx
        sp = chat_span(ids, start, tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id)
        return list(range(sp.first - start, sp.first - start + sp.n))

    def t5_rows(tok):
        kw = {} if max_sequence_length is None else {"max_length": max_sequence_length, "truncation": True}
        ids = tok(concept, **kw).input_ids
        return list(range(_first_or_len(ids, tok.eos_token_id)))

    if family == "sd3":
        tok = pipe.tokenizer
        ids = tok(concept, max_length=pipe.tokenizer_max_length, truncation=True).input_ids
        rows = list(range(1, _first_or_len(ids, tok.eos_token_id)))
        if getattr(pipe, "tokenizer_3", None) is not None and getattr(pipe, "text_encoder_3", None) is not None:
            rows += [pipe.tokenizer_max_length + r for r in t5_rows(pipe.tokenizer_3)]
        return rows
    return t5_rows(pipe.tokenizer_2 if family == "flux" else pipe.tokenizer)


class JointCapture:
    """Forward pre-hooks on a transformer's text→image attention modules (module docstring).

    While ``rows`` is set (the concept's rows of the call under way), each hooked layer appends a
    map [b, N] of its image queries' probabilities on ``columns`` (the concept tokens' rows in the
    text sequence of ``text`` rows); ``grid`` is the call's image-token grid."""

    def __init__(self, models, family: str, columns: list[int]):
        self.family, self.columns = family, list(columns)
        self.rows: slice | None = None
        self.text = 0
        self.grid: tuple[int, ...] = ()
        self.maps: list[torch.Tensor] = []
        self.handles = []
        modules = []
        for model in models:
            for name, mod in model.named_modules():
                if family == "wan" and not name.endswith("attn2"):
                    continue
                if family in ("sd3", "qwen_image") and not (name.endswith(".attn") and hasattr(mod, "add_k_proj")):
                    continue
                if family == "flux" and not name.endswith(".attn"):
                    continue
                modules.append((name, mod))
        if not modules:
            raise SafeT2IError(f"Detect-and-Guide-style guidance found no text→image attention in this {family} "
                               "transformer.")
        for name, mod in modules:
            proc = type(getattr(mod, "processor", None)).__name__
            if proc not in JOINT_PROCESSORS[family]:
                raise SafeT2IError(
                    f"Detect-and-Guide-style guidance: the attention processor of {name} is {proc}, not the "
                    f"{family} processor ({', '.join(JOINT_PROCESSORS[family])}) whose q/k SafeT2I recomputes; "
                    "another library replaced it. Restore the default processors to use it.")
        for _, mod in modules:
            self.handles.append(mod.register_forward_pre_hook(self._hook, with_kwargs=True))

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def take(self) -> torch.Tensor | None:
        """The maps of the call(s) since the last ``take``, aggregated on the grid ([B, h, w] or
        [B, F, h, w]), or None when no layer saw the concept rows."""
        maps, self.maps = self.maps, []
        if not maps:
            return None
        return aggregate_joint(maps, self.grid)

    # -- q/k as each family's processor computes them, for the concept rows only ---------------
    def _hook(self, attn, args, kwargs):
        if self.rows is None:
            return None
        names = ("hidden_states", "encoder_hidden_states")
        given = dict(zip(names, args))
        given.update({k: v for k, v in kwargs.items()})
        hs, ehs = given.get("hidden_states"), given.get("encoder_hidden_states")
        n = 1
        for g in self.grid:
            n *= g
        with torch.no_grad():
            q, k, queries, text0, mask = getattr(self, f"_{self.family}")(attn, hs[self.rows], ehs, given, n)
            if q is None:
                return None
            cols = [text0 + c for c in self.columns]
            self.maps.append(joint_token_attention(q, k, cols, queries, mask=mask))
        return None

    def _sd3(self, attn, hs, ehs, given, n):   # JointAttnProcessor2_0: [image, text], no RoPE
        if ehs is None:
            return None, None, None, 0, None
        ehs = ehs[self.rows]
        b = hs.shape[0]

        def heads(t):
            return t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        q, k = heads(attn.to_q(hs)), heads(attn.to_k(hs))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        ek = heads(attn.add_k_proj(ehs))
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        s_img = hs.shape[1]
        return q, torch.cat([k, ek], dim=2), slice(0, n), s_img, None

    def _flux(self, attn, hs, ehs, given, n):  # FluxAttnProcessor: [text, image], RoPE on both
        from diffusers.models.embeddings import apply_rotary_emb  # noqa: PLC0415
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections  # noqa: PLC0415

        ehs = None if ehs is None else ehs[self.rows]
        query, key, _, eq, ek, _ = _get_qkv_projections(attn, hs, ehs)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        if attn.added_kv_proj_dim is not None and ehs is not None:
            eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
            query, key = torch.cat([eq, query], dim=1), torch.cat([ek, key], dim=1)
        rope = given.get("image_rotary_emb")
        if rope is not None:
            query = apply_rotary_emb(query, rope, sequence_dim=1)
            key = apply_rotary_emb(key, rope, sequence_dim=1)
        if query.shape[1] < self.text + n:
            raise SafeT2IError(f"Detect-and-Guide-style guidance: a Flux attention call has {query.shape[1]} rows, "
                               f"fewer than its {self.text} text and {n} image tokens.")
        return query.transpose(1, 2), key.transpose(1, 2), slice(self.text, self.text + n), 0, None

    def _qwen_image(self, attn, hs, ehs, given, n):  # QwenDoubleStreamAttnProcessor2_0: [text, image]
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen  # noqa: PLC0415

        ehs = ehs[self.rows]
        hd = attn.inner_dim // attn.heads
        q = attn.to_q(hs).unflatten(-1, (-1, hd))
        k = attn.to_k(hs).unflatten(-1, (-1, hd))
        tk = attn.add_k_proj(ehs).unflatten(-1, (-1, hd))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if attn.norm_added_k is not None:
            tk = attn.norm_added_k(tk)
        rope = given.get("image_rotary_emb")
        if rope is not None:
            img_freqs, txt_freqs = rope
            q = apply_rotary_emb_qwen(q, img_freqs, use_real=False)
            k = apply_rotary_emb_qwen(k, img_freqs, use_real=False)
            tk = apply_rotary_emb_qwen(tk, txt_freqs, use_real=False)
        mask = given.get("encoder_hidden_states_mask")
        if mask is not None:
            mask = mask[self.rows].bool()
            mask = torch.cat([mask, torch.ones(mask.shape[0], hs.shape[1], dtype=torch.bool, device=mask.device)], 1)
            mask = mask[:, None, None, :]
        key = torch.cat([tk, k], dim=1).transpose(1, 2)
        return q.transpose(1, 2), key, slice(0, n), 0, mask

    def _wan(self, attn, hs, ehs, given, n):   # WanAttnProcessor (attn2): image queries × text keys
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections  # noqa: PLC0415

        ehs = ehs[self.rows]
        if attn.add_k_proj is not None:          # I2V: the processor's image context comes first (512 text rows)
            ehs = ehs[:, ehs.shape[1] - 512:]
        q, k, _ = _get_qkv_projections(attn, hs, ehs)
        q = attn.norm_q(q).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(k).unflatten(2, (attn.heads, -1))
        if q.shape[1] != n:
            raise SafeT2IError(f"Detect-and-Guide-style guidance: Wan's cross-attention has {q.shape[1]} queries, "
                               f"not the {n} video tokens.")
        return q.transpose(1, 2), k.transpose(1, 2), slice(0, n), 0, None


def token_grid(family: str, kwargs: dict, patch) -> tuple[int, ...]:
    """The image-token grid of a transformer call: (h, w), or (frames, h, w) for Wan."""
    x = kwargs["hidden_states"]
    if family in ("sd3", "wan"):
        patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
        dims = x.shape[2:]
        patch = patch[-len(dims):] if len(patch) >= len(dims) else (1,) * (len(dims) - len(patch)) + patch
        return tuple(-(-d // p) for d, p in zip(dims, patch))
    if family == "flux":
        ids = kwargs.get("img_ids")
        ids = ids[0] if ids is not None and ids.ndim == 3 else ids
        if ids is None:
            raise SafeT2IError("Detect-and-Guide-style guidance on Flux needs the call's img_ids.")
        h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    else:
        shapes = kwargs.get("img_shapes")
        if not shapes:
            raise SafeT2IError("Detect-and-Guide-style guidance on Qwen-Image needs the call's img_shapes.")
        f, h, w = shapes[0][0]
        if f != 1:
            raise SafeT2IError("Detect-and-Guide-style guidance on Qwen-Image supports single-frame image latents.")
    if h * w != x.shape[1]:
        raise SafeT2IError(f"Detect-and-Guide-style guidance: the call has {x.shape[1]} image tokens, not the "
                           f"{h}x{w} grid of its ids (reference images in the sequence are not supported).")
    return h, w


def unpack(t: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Packed tokens [B, h·w, C·4] (2×2 patches, features ordered (C, dy, dx) as diffusers packs
    Flux / Qwen-Image latents) -> [B, C, 2h, 2w]."""
    h, w = grid
    b, _, f = t.shape
    return t.reshape(b, h, w, f // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, f // 4, 2 * h, 2 * w)


def pack(t: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`unpack`."""
    b, c, hh, ww = t.shape
    return t.reshape(b, c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (hh // 2) * (ww // 2), c * 4)


class _Step:
    """One sampling step: where the prompt's output lives until the step is corrected."""

    def __init__(self, index: int, sigma: float, x: torch.Tensor):
        self.index, self.sigma, self.x = index, sigma, x
        self.cond_out: torch.Tensor | None = None
        self.concept_out: torch.Tensor | None = None
        self.attn: torch.Tensor | None = None   # the concept's attention map (Detect-and-Guide-style)
        self.grid: tuple[int, int] | None = None  # packed latents' token grid (Flux, Qwen-Image)
        self.calls = 0
        self.applied = False


class FlowGuidance:
    """The glue between a flow pipeline and a guidance method (module docstring)."""

    def __init__(self, pipe, method, concept_kwargs: dict, branch_scale: float, capture: JointCapture | None = None):
        self.pipe, self.method = pipe, method
        self.capture = capture
        family = JOINT_FAMILIES.get(type(pipe.transformer).__name__)
        self.packed = family if family in ("flux", "qwen_image") else None
        # Keys the concept leaves None (e.g. Qwen-Image's mask when no row is padding) are passed as None.
        self.concept = {k: v for k, v in concept_kwargs.items() if v is not None}
        self.concept_none = [k for k, v in concept_kwargs.items() if v is None]
        self.branch_scale = float(branch_scale)
        self.step: _Step | None = None
        self.run = None
        # SD3 evaluates CFG as one [uncond; cond] batch; Flux, Qwen-Image and Wan call twice.
        self.batched_cfg = type(pipe).__name__.startswith("StableDiffusion3")

    # -- where in the schedule ---------------------------------------------------
    def locate(self, timestep) -> tuple[int, float]:
        sched = self.pipe.scheduler
        steps = getattr(sched, "timesteps", None)
        sigmas = getattr(sched, "sigmas", None)
        if steps is None or sigmas is None:
            raise SafeT2IError("Safety guidance on a flow pipeline needs a scheduler with timesteps and sigmas "
                               "(FlowMatchEulerDiscreteScheduler, UniPC with flow sigmas).")
        current = getattr(self.pipe, "_current_timestep", None)
        t = current if current is not None else timestep
        t = float(torch.as_tensor(t).detach().float().flatten().max())
        ts = steps.detach().double().cpu()
        i = int((ts - t).abs().argmin())
        if abs(float(ts[i]) - t) > 1e-3 * max(1.0, abs(t)):
            raise SafeT2IError(f"Safety guidance: the transformer was called at timestep {t}, which is not in the "
                               "scheduler's schedule, so its σ is unknown. The image is not produced unguided.")
        if self.run is None or self.run.schedule is not steps:
            self.run = _Key(steps)   # a run per pipeline call: the scheduler's new timesteps tensor
        sigma = float(sigmas[i])
        self.method.set_state(i, len(ts), sigma, run=self.run)
        return i, sigma

    # -- the transformer ----------------------------------------------------------
    def forward(self, original, args, kwargs):
        kwargs = dict(kwargs)
        if args:
            kwargs["hidden_states"], args = args[0], args[1:]
        if args:
            raise SafeT2IError("Safety guidance expects the pipeline to call its transformer with keyword arguments.")
        if kwargs.get("skip_layers") is not None:   # SD3's skip-layer guidance: an extra, unguided term
            return original(**kwargs)
        x = kwargs["hidden_states"]
        index, sigma = self.locate(kwargs.get("timestep"))
        st = self.step
        if st is not None and st.index == index and st.cond_out is not None and not st.applied:
            st.calls += 1
            out = original(**kwargs)   # the negative prompt at the same step
            self._apply(st, eps_offset_free(_first(out), sigma, SPACE), scale=None)
            return out
        if st is not None and not st.applied and st.cond_out is not None:
            raise SafeT2IError("Safety guidance: a sampling step ended without its guidance (the scheduler was "
                               "bypassed). The image is not produced unguided.")
        st = self.step = _Step(index, sigma, x)
        if self.method.inert:   # nothing can change: no concept, plain sampling bit for bit
            st.applied = True
            return original(**kwargs)
        if self.packed:     # Flux / Qwen-Image: tokens of 2x2 patches; the methods see [B, C, H, W]
            st.grid = token_grid(self.packed, kwargs, None)
        elif x.ndim == 3 and not self.method.elementwise:
            raise SafeT2IError(
                f"{self.method.name} reads the latent's channels and pixels, and this pipeline's latents are "
                f"packed tokens of a layout SafeT2I does not know ({type(self.pipe.transformer).__name__}). "
                "SLD (elementwise) works on it.")
        batch = x.shape[0]
        cfg_batch = self.batched_cfg and bool(getattr(self.pipe, "do_classifier_free_guidance", False))
        if cfg_batch and batch % 2:
            raise SafeT2IError("Safety guidance: SD3's CFG batch has an odd number of rows.")
        if cfg_batch:   # [uncond; cond] in one call (SD3)
            b = batch // 2
            joint = self._with_concept(kwargs, rows=slice(b, None))
            if joint is not None:
                self._watch(kwargs, slice(2 * b, 3 * b))
                out = original(**joint)
                pred = _first(out)
            else:   # the concept's text does not stack with the call's: its own call on the cond half
                out = original(**kwargs)
                alone = self._concept_alone(_rows(kwargs, slice(b, None)), b)
                self._watch(alone, slice(0, b))
                concept = original(**alone)
                pred = torch.cat([_first(out), _first(concept)])
            attn = self._taken()
            eu, ec, es = (eps_offset_free(pred[k * b:(k + 1) * b], sigma, SPACE) for k in range(3))
            c = self._correction(eu, ec, es, attn, None)
            guided = torch.cat([pred[:b], correct_prediction(pred[b:2 * b], c, sigma, SPACE)])
            st.applied = True
            return _replace_first(out, guided)
        joint = self._with_concept(kwargs, rows=slice(0, None))
        if joint is not None:
            self._watch(kwargs, slice(batch, 2 * batch))
            out = original(**joint)
            st.attn = self._taken()
            pred = _first(out)
            st.cond_out, st.concept_out = pred[:batch], pred[batch:]
            return _replace_first(out, st.cond_out)
        out = original(**kwargs)
        st.cond_out = _first(out)
        alone = self._concept_alone(kwargs, batch)
        self._watch(alone, slice(0, batch))
        st.concept_out = _first(original(**alone))
        st.attn = self._taken()
        return out

    # -- the concept's attention (Detect-and-Guide-style) ---------------------------------------
    def _watch(self, kwargs, rows: slice):
        """The next transformer call holds the concept at ``rows``: its attention is read."""
        cap = self.capture
        if cap is None:
            return
        text = kwargs.get("encoder_hidden_states")
        cap.text = int(text.shape[1]) if text is not None else 0
        cap.grid = token_grid(cap.family, kwargs, getattr(self.pipe.transformer.config, "patch_size", 2))
        if max(cap.columns) >= cap.text:
            raise SafeT2IError(f"Detect-and-Guide-style guidance: concept token row {max(cap.columns)} is outside "
                               f"the call's {cap.text} text rows.")
        cap.rows, cap.maps = rows, []

    def _taken(self) -> torch.Tensor | None:
        cap = self.capture
        if cap is None:
            return None
        cap.rows = None
        attn = cap.take()
        if attn is None:
            raise SafeT2IError("Detect-and-Guide-style guidance: no attention layer saw the concept in this "
                               "transformer call (another wrapper bypassed the attention modules). The image is "
                               "not produced unguided.")
        return attn

    def _correction(self, eu, ec, es, attn, scale):
        """The method's correction c (``scale``: the concept-branch form's s_b·c). Packed latents
        (Flux, Qwen-Image) are unpacked to [B, C, H, W] for every method (SP-Guard-style's channel
        cosines and Detect-and-Guide-style's regions need the pixel grid) and the correction is
        packed back."""
        packed = self.packed is not None
        if packed:
            grid = self.step.grid
            eu, ec, es = (None if t is None else unpack(t, grid) for t in (eu, ec, es))
        if scale is None:
            c = self.method.correction(eu, ec, es, attn)
        else:
            c = self.method.branch_correction(ec, es, scale, attn)
        return pack(c) if packed else c

    def _with_concept(self, kwargs, rows: slice):
        """kwargs with the concept appended to the batch (its rows copy ``rows`` of the call for every
        non-text input), or None when the concept's text does not stack with the call's."""
        x = kwargs["hidden_states"]
        n = x.shape[0]
        src = range(n)[rows]
        b = len(src)
        idx = torch.tensor(list(src), device=x.device)
        out = {}
        for k, v in kwargs.items():
            if k in self.concept:
                c = self.concept[k]
                if v is None or not torch.is_tensor(v) or v.shape[1:] != c.shape[1:]:
                    return None
                out[k] = torch.cat([v, c.to(v.device, v.dtype).expand(b, *c.shape[1:])])
            elif torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n and not k.endswith("_ids"):
                out[k] = torch.cat([v, v.index_select(0, idx)])
            elif isinstance(v, list) and len(v) == n:
                out[k] = v + [v[i] for i in src]
            else:
                out[k] = v
        missing = [k for k in self.concept if k not in kwargs or kwargs[k] is None]
        if missing or any(kwargs.get(k) is not None for k in self.concept_none):
            return None
        return out

    def _concept_alone(self, kwargs, batch: int) -> dict:
        out = dict(kwargs)
        out.update({k: None for k in self.concept_none})
        for k, c in self.concept.items():
            ref = kwargs.get(k)
            dtype = ref.dtype if torch.is_tensor(ref) else (c.dtype if not c.is_floating_point()
                                                               else kwargs["hidden_states"].dtype)
            out[k] = c.to(kwargs["hidden_states"].device, dtype).expand(batch, *c.shape[1:])
        ids, text = kwargs.get("txt_ids"), out.get("encoder_hidden_states")
        if torch.is_tensor(ids) and torch.is_tensor(text) and ids.ndim >= 2 and ids.shape[-2] != text.shape[1]:
            # Flux: one position id row per text row; the pipeline's are all zeros (its encode_prompt),
            # so the concept's text of another length gets zeros of its own length.
            if bool(ids.ne(0).any()):
                raise SafeT2IError("Safety guidance: the concept's text has another length than the prompt's and "
                                   "this pipeline's text position ids are not all zero; encode the concept with the "
                                   "call's max_sequence_length.")
            shape = list(ids.shape)
            shape[-2] = int(text.shape[1])
            out["txt_ids"] = ids.new_zeros(shape)
        return out

    # -- corrections ---------------------------------------------------------------
    def _apply(self, st: _Step, eps_uncond, scale):
        sigma = st.sigma
        ec = eps_offset_free(st.cond_out, sigma, SPACE)
        es = eps_offset_free(st.concept_out, sigma, SPACE)
        c = self._correction(eps_uncond, ec, es, st.attn, scale)
        with torch.no_grad():
            st.cond_out.copy_(correct_prediction(st.cond_out, c, sigma, SPACE))
        st.applied = True

    def scheduler_step(self, original, model_output, *args, **kwargs):
        st = self.step
        if st is None:
            raise SafeT2IError("Safety guidance: the scheduler stepped without a transformer call that SafeT2I saw "
                               "(another wrapper replaced the transformer's forward). The image is not produced "
                               "unguided.")
        if not st.applied:
            if not (self.branch_scale > 0 and self.method.supports_concept_branch):
                why = ("its harmfulness estimate reads the direction from the negative to the prompt"
                       if not self.method.supports_concept_branch else
                       "set branch_scale > 0 to use the concept-branch form for guidance-distilled models")
                raise SafeT2IError(
                    f"Safety guidance {self.method.name} needs classifier-free guidance, and this pipeline evaluated "
                    f"no negative prompt at this step ({why}; or run with a negative prompt and guidance_scale / "
                    "true_cfg_scale > 1). It is not applied without it.")
            if model_output.data_ptr() != st.cond_out.data_ptr():
                raise SafeT2IError("Safety guidance (concept branch): the pipeline passed the scheduler something "
                                   "other than the transformer's prediction, so it cannot be guided here.")
            self._apply(st, None, self.branch_scale)
        self.step = None
        return original(model_output, *args, **kwargs)


def _rows(kwargs: dict, rows: slice) -> dict:
    """The call's keyword arguments for the batch rows ``rows`` (batched tensors and lists)."""
    n = kwargs["hidden_states"].shape[0]
    out = {}
    for k, v in kwargs.items():
        if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n and not k.endswith("_ids"):
            out[k] = v[rows]
        elif isinstance(v, list) and len(v) == n:
            out[k] = v[rows]
        else:
            out[k] = v
    return out


def _first(out):
    return out[0] if isinstance(out, tuple) else out.sample


def _replace_first(out, pred):
    if isinstance(out, tuple):
        return (pred,) + tuple(out[1:])
    out.sample = pred
    return out


@contextlib.contextmanager
def flow_safety_guidance(pipe, method, concept: str | None = None, *, concept_kwargs: dict | None = None,
                         branch_scale: float = 0.0, token_positions: list[int] | None = None):
    """See the module docstring; ``concept_kwargs`` overrides the encoded concept (the
    transformer's text keyword arguments, batch 1). Detect-and-Guide-style: ``token_positions``
    (the concept's token rows in its text sequence) default to :func:`concept_token_rows` of
    ``concept`` (T5 / umT5 read at the length of the concept's encoding)."""
    check_flow_pipeline(pipe)
    models = [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]
    family = joint_family(pipe.transformer) if method.needs.attention else None
    if concept_kwargs is None:
        if concept is None:
            raise SafeT2IError("safety_guidance needs a concept text or concept_kwargs.")
        concept_kwargs = encode_concept_kwargs(pipe, concept)
    capture = None
    if family is not None:
        rows = int(concept_kwargs["encoder_hidden_states"].shape[1])
        if token_positions is None:
            if concept is None:
                raise SafeT2IError("Detect-and-Guide-style guidance with concept_kwargs needs the concept text too "
                                   "(or token_positions: the concept's token rows in its text sequence).")
            t5_length = None if family == "qwen_image" else rows - (pipe.tokenizer_max_length if family == "sd3" else 0)
            token_positions = concept_token_rows(pipe, concept, family, t5_length)
        token_positions = list(token_positions)
        if not token_positions or max(token_positions) >= rows or min(token_positions) < 0:
            raise SafeT2IError(f"Detect-and-Guide-style guidance: the concept's token rows {token_positions} do not fit "
                               f"its {rows} text rows.")
        capture = JointCapture(models, family, token_positions)
    run = FlowGuidance(pipe, method, concept_kwargs, branch_scale, capture)
    sched = pipe.scheduler
    patched = []
    original_step = sched.step
    try:
        for m in models:
            original = m.forward
            m.forward = (lambda orig: lambda *a, **k: run.forward(orig, a, k))(original)
            patched.append((m, original))
        sched.step = lambda model_output, *a, **k: run.scheduler_step(original_step, model_output, *a, **k)
        yield method
    finally:
        if capture is not None:
            capture.close()
        for m, original in patched:
            restore_attribute(m, "forward", original)
        restore_attribute(sched, "step", original_step)
