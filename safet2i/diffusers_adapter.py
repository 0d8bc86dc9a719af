"""diffusers adapter: the same safety-guidance core inside any ``StableDiffusionPipeline``
or ``StableDiffusionXLPipeline`` (the only module of the core that knows diffusers).

    from safet2i.diffusers_adapter import safety_guidance
    from safet2i.guidance import SLDGuidance, SLD_PRESETS

    with safety_guidance(pipe, SLDGuidance(SLD_PRESETS["MEDIUM"]), concept="nudity, sexual"):
        image = pipe("a photo of ...", guidance_scale=7.5).images[0]

While active, every UNet call of the pipeline's CFG batch ``[uncond; cond]`` gets the safety
concept appended (one UNet batch of 3·B instead of 2·B), the guidance method computes the
guided direction d_p, and the call returns ``[ε_∅; ε_∅ + d_p]`` so that the pipeline's own
``ε_∅ + s_g · (ε_c − ε_∅)`` yields the guided prediction. Nothing of the pipeline is
replaced; on exit the UNet is restored even after an error.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from .errors import SafeT2IError
from .guidance.dag import aggregate_attention, token_attention
from .guidance.spaces import from_eps, to_eps
from .steering.plan import token_words


def restore_attribute(obj, name: str, original) -> None:
    """Undo ``obj.<name> = patched``: the instance attribute goes, and where ``obj`` had one of
    its own before (accelerate's CPU offload wraps ``forward`` on the instance, another pack may
    have patched it), ``original`` is put back instead of the class's."""
    if name in vars(obj):
        delattr(obj, name)
    if getattr(obj, name) != original:
        setattr(obj, name, original)


def encode_concept(pipe, concept: str):
    """(embeddings [1, T, D], pooled or None) of ``concept`` with the pipeline's encoders."""
    device = pipe._execution_device if hasattr(pipe, "_execution_device") else pipe.device
    out = pipe.encode_prompt(concept, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    embeds = out[0]
    pooled = out[2] if len(out) >= 4 else None  # SDXL: (embeds, neg, pooled, neg_pooled)
    return embeds, pooled


def _batched(value, b: int, extra):
    """Append a third chunk to a CFG-batched tensor of batch 2·b (``extra`` or the cond part)."""
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == 2 * b:
        third = value[b:] if extra is None else extra.to(value.dtype).expand(b, *extra.shape[1:])
        return torch.cat([value, third])
    return value


def concept_token_positions(pipe, concept: str) -> list[int]:
    """Positions of the concept's own tokens (no start, end or padding tokens)."""
    ids = pipe.tokenizer(concept, truncation=True, max_length=pipe.tokenizer.model_max_length).input_ids
    return list(range(1, max(2, len(ids) - 1)))


class AttentionCapture:
    """Cross-attention processor wrapper: the layer's output comes from its own processor,
    untouched; for the concept rows of the batch it also records the softmax attention on
    the concept tokens, averaged over heads and tokens ([b, HW] per layer)."""

    def __init__(self, inner, sink):
        self.inner, self.sink = inner, sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        rows, tokens = self.sink.rows, self.sink.tokens
        if encoder_hidden_states is not None and rows is not None and tokens:
            q = attn.to_q(hidden_states[rows])
            k = attn.to_k(encoder_hidden_states[rows])
            self.sink.maps.append(token_attention(q, k, attn.heads, tokens, attn.scale))
        return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


class _Sink:
    def __init__(self, tokens):
        self.tokens, self.rows, self.maps = tokens, None, []


class _Key:
    """A run key that holds its schedule and compares by identity (no id reuse after GC)."""

    def __init__(self, schedule):
        self.schedule = schedule

    def __eq__(self, other):
        return isinstance(other, _Key) and other.schedule is self.schedule

    __hash__ = None


def _prediction_space(pipe) -> str:
    kind = getattr(getattr(pipe.scheduler, "config", None), "prediction_type", "epsilon")
    if kind in ("epsilon", None):
        return "eps"
    if kind == "v_prediction":
        if getattr(pipe.scheduler, "alphas_cumprod", None) is None:
            raise SafeT2IError("Safety guidance on a v-prediction UNet needs the scheduler's alphas_cumprod.")
        return "v"
    raise SafeT2IError(f"Safety guidance supports epsilon and v_prediction UNets, not {kind!r}.")


def _sigma_at(scheduler, t: float) -> torch.Tensor:
    """σ = √((1 − ᾱ_t)/ᾱ_t) of the DDPM timestep ``t`` (an integer timestep of the schedule)."""
    if abs(t - round(t)) > 1e-3:
        raise SafeT2IError(f"Safety guidance on a v-prediction UNet needs integer timesteps, not {t} "
                           "(interpolated schedules such as Karras sigmas are not supported).")
    a = scheduler.alphas_cumprod[int(round(t))].to(torch.float64)
    return torch.sqrt((1 - a) / a)


@contextlib.contextmanager
def safety_guidance(pipe, method, concept: str | None = None, *, concept_embeds=None, pooled_embeds=None,
                    token_positions: list[int] | None = None, concept_kwargs: dict | None = None,
                    branch_scale: float = 3.5):
    """Apply ``method`` (a :class:`safet2i.guidance.Guidance`: ``set_state`` and
    ``direction(eps_uncond, eps_cond, eps_safety[, attention]) -> d_p``) to every step of
    ``pipe``. Methods whose ``needs.attention`` is set (Detect-and-Guide-style) also get the
    concept tokens' cross-attention map of the same UNet call. ε-prediction UNets as they are;
    v-prediction ones (``scheduler.config.prediction_type``) are converted to ε and back.

    Flow-matching transformer pipelines (SD3, Flux, Qwen-Image, Wan) go through
    :mod:`safet2i.diffusers_flow`: ``concept_kwargs`` replaces the encoded concept there,
    ``branch_scale`` (s_b) is the concept-branch form's scale when a step evaluates no negative
    (guidance-distilled Flux at cfg 1; 0 refuses such steps), and ``token_positions`` are the
    concept's token rows in its text sequence (Detect-and-Guide-style; default: found from
    ``concept``)."""
    if not hasattr(method, "set_state"):
        raise SafeT2IError("safety_guidance needs a method following safet2i.guidance.contract (a Guidance).")
    from .diffusers_flow import flow_safety_guidance, is_flow_pipeline  # noqa: PLC0415

    if is_flow_pipeline(pipe):
        with flow_safety_guidance(pipe, method, concept, concept_kwargs=concept_kwargs,
                                  branch_scale=branch_scale, token_positions=token_positions) as m:
            yield m
        return
    space = _prediction_space(pipe)
    if concept_embeds is None:
        if concept is None:
            raise SafeT2IError("safety_guidance needs a concept text or concept_embeds.")
        concept_embeds, pooled_embeds = encode_concept(pipe, concept)
    unet = pipe.unet
    original = unet.forward
    sink = None
    saved_processors = None
    if method.needs.attention:
        if token_positions is None:
            if concept is None:
                raise SafeT2IError("Attention-based guidance with concept_embeds needs token_positions.")
            token_positions = concept_token_positions(pipe, concept)
        sink = _Sink(token_positions)
        saved_processors = dict(unet.attn_processors)
        unet.set_attn_processor({
            name: AttentionCapture(proc, sink) if name.endswith("attn2.processor") else proc
            for name, proc in saved_processors.items()
        })

    def forward(sample, timestep, encoder_hidden_states, *args, **kwargs):
        if sample.shape[0] % 2:
            raise SafeT2IError(
                "Safety guidance needs classifier-free guidance (a [uncond; cond] batch); "
                "use guidance_scale > 1."
            )
        b = sample.shape[0] // 2
        t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        # Run = the scheduler's schedule (a new tensor per pipeline call); -t only grows within a run.
        schedule = getattr(pipe.scheduler, "timesteps", None)
        method.set_state(-t, len(schedule) if schedule is not None else None, t, run=_Key(schedule))
        ehs = torch.cat([encoder_hidden_states,
                         concept_embeds.to(encoder_hidden_states).expand(b, *concept_embeds.shape[1:])])
        added = kwargs.get("added_cond_kwargs")
        if added:
            kwargs["added_cond_kwargs"] = {
                k: _batched(v, b, pooled_embeds if k == "text_embeds" else None) for k, v in added.items()
            }
        if sink is not None:
            sink.rows, sink.maps = slice(2 * b, 3 * b), []
        out = original(torch.cat([sample, sample[b:]]), _batched(timestep, b, None), ehs, *args, **kwargs)
        pred = out[0] if isinstance(out, tuple) else out.sample
        sigma = _sigma_at(pipe.scheduler, t) if space == "v" else None
        x_t = sample[b:]
        eu, ec, es = (to_eps(pred[k * b:(k + 1) * b], x_t, sigma, space) for k in range(3))
        attn = None
        if sink is not None:
            attn = aggregate_attention(sink.maps, tuple(sample.shape[-2:])) if sink.maps else None
            sink.rows, sink.maps = None, []
        d_p = method.direction(eu, ec, es, attn)
        guided = torch.cat([pred[:b], from_eps(eu + d_p, x_t, sigma, space).to(pred.dtype)])
        if isinstance(out, tuple):
            return (guided,) + tuple(out[1:])
        out.sample = guided
        return out

    unet.forward = forward
    try:
        yield method
    finally:
        restore_attribute(unet, "forward", original)
        if saved_processors is not None:
            unet.set_attn_processor(saved_processors)


# --------------------------------------------------------------------------- prompt steering


class HFTextEncoder:
    """A transformers CLIP text encoder + tokenizer as the core's steering ``TextEncoder``, built
    as the pipeline builds ``prompt_embeds``: one chunk, padded and truncated to the tokenizer's
    length; SD: last hidden state, SDXL: penultimate hidden state of both encoders."""

    accepts_short = True   # causal: the end-token row does not depend on what follows it

    def __init__(self, name: str, tokenizer, model, layer: int | None, width: int | None):
        self.name, self.tokenizer, self.model, self.layer, self.width = name, tokenizer, model, layer, width
        self.end_id = tokenizer.eos_token_id

    def chunks(self, text):
        tok = self.tokenizer
        return [(tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids, None)]

    def encode(self, id_lists, data=None):
        with torch.no_grad():
            out = self.model(torch.tensor(id_lists, device=self.model.device),
                             output_hidden_states=self.layer is not None)
        return out.hidden_states[self.layer] if self.layer is not None else out[0]

    def token_text(self, ids):
        return token_words(self.tokenizer, ids)


class HFT5Encoder:
    """A transformers T5 / umT5 encoder + tokenizer as the core's steering ``TextEncoder``, built as
    the pipeline builds its rows: one sequence padded and truncated to ``max_length``, the last
    hidden state; SD3 and Flux run it without an attention mask (the padding is attended), Wan
    with the tokenizer's mask and zero rows after the sequence (``masked``). Bidirectional: the
    pooled row is the end token ``</s>`` (:func:`~safet2i.steering.plan.t5_span`), and every
    leave-one-out variant is encoded at full length (the padding rows it attends depend on it)."""

    def __init__(self, name: str, tokenizer, model, max_length: int, *, masked: bool = False, clean=None,
                 block: int = 0, channels: slice | None = None, batch: int = 8):
        self.name, self.tokenizer, self.model, self.max_length = name, tokenizer, model, int(max_length)
        self.masked, self.clean, self.block, self.batch = masked, clean, block, batch
        self.end_id = tokenizer.eos_token_id
        self.width = model.config.d_model
        if channels is not None:
            self.channels = channels
        self.layer = "t5"

    def chunks(self, text):
        text = self.clean(text) if self.clean is not None else text
        out = self.tokenizer(text, padding="max_length", max_length=self.max_length, truncation=True,
                             add_special_tokens=True, return_attention_mask=True)
        return [(list(out.input_ids), list(out.attention_mask) if self.masked else None)]

    def span(self, ids):
        from .steering import t5_span  # noqa: PLC0415

        return t5_span(ids, self.end_id)

    def encode(self, id_lists, data=None):
        data = data if data is not None else [None] * len(id_lists)
        device = self.model.device
        parts = []
        with torch.no_grad():
            for lo in range(0, len(id_lists), self.batch):
                ids = torch.tensor(id_lists[lo:lo + self.batch], device=device)
                mask = None
                if self.masked:
                    # the chunk's own mask: a left-out token (id 0) is attended as the prompt's token was
                    mask = torch.tensor([m if m is not None else [int(t != self.tokenizer.pad_token_id) for t in i]
                                         for m, i in zip(data[lo:lo + self.batch], id_lists[lo:lo + self.batch])],
                                        device=device)
                rows = self.model(ids, mask)[0] if mask is not None else self.model(ids)[0]
                if mask is not None:
                    rows = rows * mask[..., None].to(rows.dtype)
                parts.append(rows)
        return torch.cat(parts)

    def token_text(self, ids):
        return [w.replace("\u2581", "") for w in token_words(self.tokenizer, ids)]


class HFChatEncoder:
    """A causal LLM behind a chat template (Qwen-Image's Qwen2.5-VL) as the core's ``TextEncoder``:
    the template around the prompt, the last hidden state (after the final norm), the host keeping
    rows from ``start`` on (``prompt_template_encode_start_idx``). The pooled row is the last row
    (:func:`~safet2i.steering.plan.chat_span`); the template's prefix rows are never steered or
    counted."""

    accepts_short = True   # causal (the pooled row is the last one anyway)

    def __init__(self, name: str, tokenizer, model, template: str, start: int, max_length: int, batch: int = 8):
        self.name, self.tokenizer, self.model, self.template = name, tokenizer, model, template
        self.start, self.max_length, self.batch = int(start), int(max_length), batch
        self.close_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.end_id = self.close_id
        if self.close_id is None or self.close_id == getattr(tokenizer, "unk_token_id", None):
            raise SafeT2IError(f"steering: the {name} tokenizer has no <|im_end|> token (not a chat-template encoder).")
        self.layer = "chat"

    def chunks(self, text):
        ids = self.tokenizer(self.template.format(text), max_length=self.max_length + self.start,
                             truncation=True).input_ids
        return [(list(ids), None)]

    def span(self, ids):
        from .steering import chat_span  # noqa: PLC0415

        return chat_span(ids, self.start, self.close_id, self.tokenizer.pad_token_id)

    def encode(self, id_lists, data=None):
        """Rows [N, L, d]; id lists of different lengths (concept texts) are encoded apart, unpadded,
        and returned zero-padded to the longest (the rows the core reads are within each one)."""
        device = self.model.device
        by_length: dict[int, list[int]] = {}
        for i, ids in enumerate(id_lists):
            by_length.setdefault(len(ids), []).append(i)
        longest = max(by_length)
        out = None
        with torch.no_grad():
            for length, members in by_length.items():
                for lo in range(0, len(members), self.batch):
                    part = members[lo:lo + self.batch]
                    ids = torch.tensor([id_lists[i] for i in part], device=device)
                    rows = self.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      output_hidden_states=True).hidden_states[-1]
                    if out is None:
                        out = rows.new_zeros(len(id_lists), longest, rows.shape[-1])
                    out[part, :length] = rows
        return out

    def token_text(self, ids):
        return [w.replace("\u0120", "") for w in token_words(self.tokenizer, ids)]


#: The diffusers pipelines prompt steering knows, by the name of a class in the pipeline's MRO.
FAMILIES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux", "QwenImagePipeline": "qwen_image",
            "WanPipeline": "wan"}
#: The ``max_sequence_length`` each family's ``__call__`` uses by default.
SEQUENCE_LENGTHS = {"sd3": 256, "flux": 512, "qwen_image": 512, "wan": 512}


def pipeline_family(pipe) -> str:
    """``sd`` / ``sdxl`` (UNet pipelines with one or two CLIP encoders), ``sd3``, ``flux``,
    ``qwen_image`` or ``wan``; anything else is refused."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    if getattr(pipe, "unet", None) is not None and getattr(pipe, "text_encoder", None) is not None:
        return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"
    raise SafeT2IError(f"SAFREE-style steering supports Stable Diffusion 1.x/2.x/XL, SD3, Flux, Qwen-Image and Wan "
                       f"pipelines, not {type(pipe).__name__}.")


def _encoders(pipe, family: str | None = None, max_sequence_length: int | None = None) -> list:
    """The pipeline's steerable text encoders, in the layout of its ``prompt_embeds``: SD/SDXL one
    block of CLIP rows; SD3 the CLIP-L‖G block (channels 0:768 and 768:2048 of T5's width, the
    rest zero padding) then the T5 block; Flux and Wan their T5 / umT5 rows; Qwen-Image the
    Qwen2.5-VL rows after the template. Pooled vectors (SDXL, SD3, Flux's CLIP-L) are not steered."""
    family = family or pipeline_family(pipe)
    length = max_sequence_length or SEQUENCE_LENGTHS.get(family)
    if family == "sdxl":
        return [HFTextEncoder("text_encoder", pipe.tokenizer, pipe.text_encoder, -2, pipe.text_encoder.config.hidden_size),
                HFTextEncoder("text_encoder_2", pipe.tokenizer_2, pipe.text_encoder_2, -2,
                              pipe.text_encoder_2.config.hidden_size)]
    if family == "sd":
        return [HFTextEncoder("text_encoder", pipe.tokenizer, pipe.text_encoder, None, None)]
    if family == "sd3":
        out, lo = [], 0
        for name, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            model = getattr(pipe, name)
            width = model.config.hidden_size
            enc = HFTextEncoder(name, getattr(pipe, tok), model, -2, width)
            enc.channels, enc.block = slice(lo, lo + width), 0
            out.append(enc)
            lo += width
        if getattr(pipe, "text_encoder_3", None) is not None:
            out.append(HFT5Encoder("text_encoder_3", pipe.tokenizer_3, pipe.text_encoder_3, length, block=1))
        return out
    if family == "flux":
        return [HFT5Encoder("text_encoder_2", pipe.tokenizer_2, pipe.text_encoder_2, length)]
    if family == "wan":
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean  # noqa: PLC0415

        return [HFT5Encoder("text_encoder", pipe.tokenizer, pipe.text_encoder, length, masked=True, clean=prompt_clean)]
    if family == "qwen_image":
        return [HFChatEncoder("text_encoder", pipe.tokenizer, pipe.text_encoder, pipe.prompt_template_encode,
                              pipe.prompt_template_encode_start_idx, getattr(pipe, "tokenizer_max_length", 1024))]
    raise SafeT2IError(f"SAFREE-style steering: unknown pipeline family {family!r}")


def _device(pipe):
    return pipe._execution_device if hasattr(pipe, "_execution_device") else pipe.device


def encode_for_steering(pipe, prompt: str, family: str, max_sequence_length: int | None = None):
    """``(prompt_embeds [1, T, D], extra kwargs)``: the pipeline's own ``encode_prompt`` of one
    prompt, one image, no CFG; ``extra`` holds what ``pipe(...)`` needs with ``prompt_embeds``
    (SDXL/SD3/Flux ``pooled_prompt_embeds``, Qwen-Image ``prompt_embeds_mask``), unchanged."""
    length = max_sequence_length or SEQUENCE_LENGTHS.get(family)
    with torch.no_grad():
        if family in ("sd", "sdxl"):
            out = pipe.encode_prompt(prompt=prompt, device=pipe.text_encoder.device, num_images_per_prompt=1,
                                     do_classifier_free_guidance=False)
            return out[0], ({"pooled_prompt_embeds": out[2]} if family == "sdxl" else {})
        if family == "sd3":
            out = pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None, device=_device(pipe),
                                     num_images_per_prompt=1, do_classifier_free_guidance=False,
                                     max_sequence_length=length)
            return out[0], {"pooled_prompt_embeds": out[2]}
        if family == "flux":
            out = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=_device(pipe), num_images_per_prompt=1,
                                     max_sequence_length=length)
            return out[0], {"pooled_prompt_embeds": out[1]}
        if family == "qwen_image":
            embeds, mask = pipe.encode_prompt(prompt=prompt, device=_device(pipe), num_images_per_prompt=1,
                                              max_sequence_length=length)
            return embeds, ({} if mask is None else {"prompt_embeds_mask": mask})
        if family == "wan":
            embeds, _ = pipe.encode_prompt(prompt=prompt, negative_prompt=None, do_classifier_free_guidance=False,
                                           num_videos_per_prompt=1, max_sequence_length=length, device=_device(pipe))
            return embeds, {}
    raise SafeT2IError(f"SAFREE-style steering: unknown pipeline family {family!r}")


def weights_state(module) -> tuple:
    """What tells a cached concept subspace that ``module``'s weights are still as they were,
    without reading a single weight: each parameter's storage and in-place version counter
    (every tracked in-place write bumps it: :func:`load_safety_lora`, ``w += …`` under
    ``no_grad``; a replaced tensor has another storage) and the state of its PEFT LoRA layers
    (active adapters, disabled, merged adapters, scaling: ``set_adapters``, ``disable_lora``
    and ``fuse_lora`` change the output through them). Writes through ``param.data`` are not
    tracked by PyTorch and are not seen."""
    params = tuple((p.data_ptr(), p._version) for p in module.parameters())
    peft = []
    for name, m in module.named_modules():
        if hasattr(m, "active_adapters") and isinstance(getattr(m, "scaling", None), dict):
            peft.append((name, tuple(m.active_adapters), bool(getattr(m, "disable_adapters", False)),
                         tuple(getattr(m, "merged_adapters", ()) or ()),
                         tuple(sorted((str(k), float(v)) for k, v in m.scaling.items()))))
    return params, tuple(peft)


def steer_prompt(pipe, prompt: str, concepts: list[str] | str = "nudity", *, alpha: float = 0.01,
                 order: str = "code", self_validating: bool = True, max_sequence_length: int | None = None):
    """SAFREE-style steered ``prompt_embeds`` for an SD, SDXL, SD3, Flux, Qwen-Image or Wan pipeline.

    Returns ``(steered, original, fraction, report)``; ``pipe(**steering_kwargs(steered,
    original, fraction), ...)`` uses the steered rows for the self-validated window and the
    original ones afterwards (SDXL/SD3/Flux: also pass ``pooled_prompt_embeds``, Qwen-Image
    ``prompt_embeds_mask``, from :func:`encode_for_steering`, unchanged; or use
    :func:`steering_pipeline_kwargs`, which does it all). ``original`` is the pipeline's own
    ``encode_prompt`` output; with no trigger token ``steered`` is that very tensor. Each encoder
    is steered on its own rows and channels in its own concept subspace (docs/steering.md, per
    family). ``max_sequence_length``: the T5 / Qwen length the pipeline call will use (default
    the family's ``__call__`` default). The concept subspace is cached per text encoder (weakly
    referenced) and the state of its weights (:func:`weights_state`), so merging a LoRA into the
    encoder in place or changing its PEFT adapters gives a new subspace. A one-token prompt is
    steered when removing the token moves it away from the concepts (docs/steering.md).
    Concepts as negative prompt and the paper's configuration: :func:`steering_pipeline_kwargs`.
    """
    return _steer(pipe, prompt, concepts, alpha=alpha, order=order, self_validating=self_validating,
                  max_sequence_length=max_sequence_length)[:4]


def _steer(pipe, prompt: str, concepts, *, alpha: float, order: str, self_validating: bool,
           max_sequence_length: int | None):
    """:func:`steer_prompt`'s four results and the encoding's extra kwargs (pooled embeddings,
    mask): one text-encoder pass for both."""
    from . import steering  # noqa: PLC0415  (steering.concept_projector looked up at call time)

    svf_name = "nudity"
    if isinstance(concepts, str):
        concepts, svf_name = steering.load_concepts(concepts)
    family = pipeline_family(pipe)
    original, extra = encode_for_steering(pipe, prompt, family, max_sequence_length)
    encoders = _encoders(pipe, family, max_sequence_length)
    projectors = [steering.concept_projector((id(e.model), e.layer, getattr(e, "max_length", None),
                                              weights_state(e.model)), concepts,
                                             functools.partial(steering.end_rows, e), owner=e.model)
                  for e in encoders]
    plan = steering.SteeringPlan(encoders, projectors, prompt, original[0], alpha=alpha, order=order,
                                 svf=steering.SVF_PRESETS[svf_name] if self_validating else None)
    out = plan.steer(original[0])
    steered = out.rows[None] if out.changed else original
    return steered, original, out.fraction, plan.entries(out), extra


def steering_pipeline_kwargs(pipe, prompt: str, concepts: list[str] | str = "nudity", *,
                             configuration: str = "custom settings", negative_prompt: str = "",
                             alpha: float = 0.01, order: str = "code", self_validating: bool = True,
                             concepts_as_negative: bool = False,
                             max_sequence_length: int | None = None) -> tuple[dict, dict]:
    """``(kwargs, report)``: ``pipe(prompt=None, **kwargs, ...)`` runs ``prompt`` steered (and,
    with ``concepts_as_negative``, with the concept list joined by ", " after ``negative_prompt``
    as the negative prompt, as SAFREE's runs do). ``configuration="SAFREE (paper
    configuration)"`` runs it as the paper did (``safet2i.steering.settings.PAPER``: the nudity
    concepts, α 0.01, code order, self-validating on, off for SDXL/SD3/Flux/Qwen-Image/Wan,
    concepts as negative), overriding the other settings. SDXL/SD3/Flux: the pipeline's pooled
    embeddings are passed, unchanged; Qwen-Image its ``prompt_embeds_mask``; SD3/Flux/Qwen-Image/Wan
    ``max_sequence_length`` (pass the same to ``pipe``). Flux and Qwen-Image use a negative prompt
    only with ``true_cfg_scale > 1`` (the report says so)."""
    from .steering import load_concepts  # noqa: PLC0415
    from .steering.settings import SteeringSettings, concepts_negative, configure, describe  # noqa: PLC0415

    family = pipeline_family(pipe)
    named, custom = (concepts, "") if isinstance(concepts, str) else ("custom", "\n".join(concepts))
    own = SteeringSettings(named, custom, alpha, order, self_validating, concepts_as_negative)
    s = configure(configuration, own, family if family != "sd" else None)
    items, _ = load_concepts(s.concepts, s.custom)
    steered, original, fraction, entries, extra = _steer(
        pipe, prompt, s.concepts if s.concepts != "custom" else items, alpha=s.alpha, order=s.order,
        self_validating=s.self_validating, max_sequence_length=max_sequence_length)
    kwargs = steering_kwargs(steered, original, fraction, negatives_in_batch=None if family in ("sd", "sdxl", "sd3")
                             else False)
    negative = concepts_negative(items, negative_prompt) if s.concepts_as_negative else negative_prompt
    if negative:
        kwargs["negative_prompt"] = negative
    kwargs.update(extra)
    if family in SEQUENCE_LENGTHS:
        kwargs["max_sequence_length"] = max_sequence_length or SEQUENCE_LENGTHS[family]
    report = {"configuration": describe(configuration, s), "concepts": len(items),
              "steered_fraction": round(fraction, 4), "chunks": entries}
    if negative and family in ("flux", "qwen_image"):
        report["note"] = (f"{type(pipe).__name__} uses the negative prompt only with true_cfg_scale > 1 "
                          "(true classifier-free guidance)")
    return kwargs, report


def switch_after(fraction, original: torch.Tensor, negatives_in_batch: bool | None = None):
    """``callback_on_step_end`` that swaps the steered prompt rows for ``original`` once
    ``max(1, round(fraction · steps))`` steps are done.

    ``prompt_embeds`` in the callback is the pipeline's batch: ``[negatives; positives]`` with
    classifier-free guidance (every prompt repeated ``num_images_per_prompt`` times), only the
    positives without it. ``original`` holds one row per prompt ([P, T, D]); ``fraction`` is one
    number for all of them or one per prompt (a batch of prompts steered for different shares of
    the schedule). A prompt's positive rows are swapped once its fraction is due; the negative
    half is kept. ``negatives_in_batch``: whether the pipeline's ``prompt_embeds`` holds the
    negatives too (SD/SDXL/SD3 with CFG; None: ask ``pipe.do_classifier_free_guidance``); Flux,
    Qwen-Image and Wan keep them apart (False)."""
    fractions = [float(fraction)] * original.shape[0] if isinstance(fraction, (int, float)) \
        else [float(f) for f in fraction]
    if len(fractions) != original.shape[0]:
        raise SafeT2IError(f"steering: {len(fractions)} fractions for {original.shape[0]} original prompt(s)")

    def callback(pipe, step, timestep, kwargs):
        total = pipe.num_timesteps if hasattr(pipe, "num_timesteps") else None
        emb = kwargs.get("prompt_embeds")
        if not total or emb is None:
            return kwargs
        due = [i for i, f in enumerate(fractions) if (step + 1) >= round(f * total)]
        if not due:
            return kwargs
        cfg = negatives_in_batch if negatives_in_batch is not None else \
            bool(getattr(pipe, "do_classifier_free_guidance", emb.shape[0] > original.shape[0]))
        n_neg = emb.shape[0] // 2 if cfg else 0
        n_pos = emb.shape[0] - n_neg
        if n_pos % original.shape[0]:
            raise SafeT2IError(f"steering: {n_pos} positive prompt rows do not repeat the "
                               f"{original.shape[0]} original prompt(s)")
        rep = n_pos // original.shape[0]
        emb = emb.clone()
        for i in due:
            emb[n_neg + i * rep:n_neg + (i + 1) * rep] = original[i].to(emb)
        kwargs["prompt_embeds"] = emb
        return kwargs
    return callback


def steering_kwargs(steered: torch.Tensor, original: torch.Tensor, fraction: float,
                    negatives_in_batch: bool | None = None) -> dict:
    """Keyword arguments for ``pipe(...)`` that apply steered rows for the self-validated
    window and the original rows afterwards (``negatives_in_batch``: :func:`switch_after`)."""
    kw = {"prompt_embeds": steered}
    if 0.0 < fraction < 1.0:
        kw["callback_on_step_end"] = switch_after(fraction, original, negatives_in_batch)
        kw["callback_on_step_end_tensor_inputs"] = ["latents", "prompt_embeds"]
    elif fraction == 0.0:
        kw["prompt_embeds"] = original
    return kw


# --------------------------------------------------------------------------- model layer

class SafetyLoRAHandle:
    """What :func:`load_safety_lora` changed: its coverage report, and ``undo()``."""

    def __init__(self, lora, coverage, originals: dict):
        self.lora, self.coverage, self._originals = lora, coverage, originals

    def undo(self) -> None:
        with torch.no_grad():
            for param, value in self._originals.values():
                param.copy_(value)
        self._originals.clear()


def _components(pipe) -> dict:
    # The denoiser is component "unet" for a UNet and for a diffusion transformer alike (as
    # kohya's lora_unet_ and ComfyUI's diffusion_model. name both); for Wan 2.2's second expert
    # `pipe` is an _Expert view whose transformer is transformer_2 (one LoRA per expert).
    unet = getattr(pipe, "unet", None)
    comps = {"unet": unet if unet is not None else _dit(pipe)[1], "te1": getattr(pipe, "text_encoder", None),
             "te2": getattr(pipe, "text_encoder_2", None)}
    return {k: v for k, v in comps.items() if v is not None}


def _dit(pipe) -> tuple[str | None, object]:
    """(family, module) of the pipeline's diffusion transformer (Flux, SD3, Qwen-Image, Wan), else (None, None)."""
    from .lora.dit_arch import DIFFUSERS_CLASSES  # noqa: PLC0415

    tr = getattr(pipe, "transformer", None)
    fam = DIFFUSERS_CLASSES.get(type(tr).__name__) if tr is not None else None
    return (fam, tr) if fam else (None, None)


def host_arch(pipe) -> str | None:
    """``sd1`` / ``sd2`` / ``sdxl`` when ``pipe.unet`` has exactly that layout; for a diffusion
    transformer the released architecture its config equals (``flux-dev``, ``sd3-medium``,
    ``qwen-image``, ``wan-14b``, … see ``safet2i.lora.dit_arch``) or ``"<family> (…)"`` for
    another size; else None (unknown)."""
    from .lora.arch import ARCHITECTURES, UNetConfig  # noqa: PLC0415

    fam, tr = _dit(pipe)
    if fam is not None:
        from .lora.dit_arch import match_config  # noqa: PLC0415

        return match_config(fam, tr.config) or f"{fam} (a {type(tr).__name__} of no released size)"
    unet = getattr(pipe, "unet", None)
    try:
        cfg = UNetConfig.from_diffusers(unet.config)
    except (TypeError, KeyError, AttributeError, ValueError):
        return None
    return next((a for a, arch in ARCHITECTURES.items() if arch.unet == cfg), None)


_EXPERTS = ("transformer", "transformer_2")


class _Expert:
    """A pipeline as :func:`load_safety_lora` sees it when patching Wan 2.2's second expert:
    ``transformer`` is the pipeline's ``transformer_2``, every other attribute the pipeline's."""

    def __init__(self, pipe, expert: str):
        self._pipe, self.transformer = pipe, getattr(pipe, expert)

    def __getattr__(self, name):
        return getattr(self._pipe, name)


def _expert_view(pipe, expert: str):
    """``pipe`` itself for ``expert="transformer"``; for ``"transformer_2"`` (Wan 2.2 A14B's
    low-noise expert) an :class:`_Expert` view, after checking the pipeline has that expert."""
    if expert == "transformer":
        return pipe
    if expert not in _EXPERTS:
        raise SafeT2IError(f"expert must be one of {', '.join(_EXPERTS)}, not {expert!r}")
    if getattr(pipe, expert, None) is None:
        raise SafeT2IError(f"{type(pipe).__name__} has no {expert}: only Wan 2.2 A14B pipelines have a "
                           "second expert (transformer = high noise, transformer_2 = low noise); use "
                           "expert='transformer'.")
    view = _Expert(pipe, expert)
    if getattr(pipe, "unet", None) is not None or _dit(view)[0] is None:
        raise SafeT2IError(f"{type(pipe).__name__}.{expert} is a {type(view.transformer).__name__}, not a "
                           "diffusion transformer safet2i knows; nothing was loaded.")
    return view


def load_safety_lora(pipe, path, strength: float = 1.0, allow_partial: bool = False,
                     expert: str = "transformer") -> SafetyLoRAHandle:
    """Merge a safety LoRA (any key format) into the pipeline's weights, after proving coverage.

    Every target is resolved to a module of ``pipe.unet`` (or ``pipe.transformer``) /
    ``pipe.text_encoder`` / ``pipe.text_encoder_2`` by name and shape first; nothing is changed
    unless all of them match (or ``allow_partial``). Weights become ``W + strength·scale·B·A``
    (DoRA per :func:`safet2i.lora.merged`). ``handle.undo()`` restores the originals. A file the
    manifest knows must contain what its entry says and fit the pipeline's architecture;
    ``strength`` must be positive (negative inverts a safety LoRA, 0 disables it).

    ``expert``: Wan 2.2 A14B pipelines have two experts; ``"transformer"`` (the default, the
    high-noise expert) or ``"transformer_2"`` (the low-noise one) is the one patched, with the
    same checks against that expert's own config. One LoRA per expert: to protect both, call
    once per expert (each with its file) and keep both handles.
    """
    from .lora import check, check_made_for, load_lora, merged, require_full  # noqa: PLC0415
    from .lora.arch import UNetConfig, unet_modules  # noqa: PLC0415
    from .lora.coverage import check_strengths  # noqa: PLC0415

    host_name = type(pipe).__name__ + ("" if expert == "transformer" else f".{expert}")
    pipe = _expert_view(pipe, expert)
    lora = load_lora(path)
    what = f"Safety LoRA {lora.path.name}"
    check_strengths(lora.components, strength, strength, what, ("strength", "strength"))
    lora.verify_manifest()
    check_made_for(lora, host_arch(pipe), what)
    comps = _components(pipe)
    fam, tr = _dit(pipe)
    if fam is not None and getattr(pipe, "unet", None) is None:
        # Transformer targets in the host's own naming: native names renamed, stacked native
        # weights (Flux qkv / linear1, SD3 qkv) split exactly, from the host's config.
        from .lora.dit_arch import build  # noqa: PLC0415
        from .lora.keys import normalise_dit  # noqa: PLC0415

        lora.targets = normalise_dit(lora.targets, build(fam, tr.config))
    params: dict[str, dict[str, torch.nn.Parameter]] = {}
    flat: dict[str, dict[str, str]] = {}
    for comp, mod in comps.items():
        params[comp] = {n: m.weight for n, m in mod.named_modules()
                        if isinstance(getattr(m, "weight", None), torch.nn.Parameter)}
        if comp != "unet" and not hasattr(mod, "text_model"):
            # transformers >= 5 builds CLIPTextModel without the text_model. level that LoRA files
            # (kohya lora_te_text_model_..., PEFT text_encoder.text_model....) name
            params[comp].update({"text_model." + n: w for n, w in list(params[comp].items())})
        flat[comp] = {n.replace(".", "_"): n for n in params[comp]}
    ldm = {}
    if "unet" in comps:
        try:
            ldm = {m.ldm: m.diffusers for m in unet_modules(UNetConfig.from_diffusers(comps["unet"].config))}
        except (TypeError, KeyError, AttributeError):  # not a UNet2DConditionModel layout
            ldm = {}
    ldm_flat = {k.replace(".", "_"): v for k, v in ldm.items()}

    def resolve(t):
        names = params.get(t.component, {})
        name = {"diffusers": t.module, "ldm": ldm.get(t.module),
                "flat": flat.get(t.component, {}).get(t.module)}.get(t.naming)
        if name is None and t.naming == "flat" and t.component == "unet":
            name = ldm_flat.get(t.module)  # kohya flat LDM names of a model we could not name otherwise
        w = names.get(name) if name else None
        return (f"{t.component}.{name}", tuple(w.shape)) if w is not None else (None, None)

    cov = check(lora.targets, resolve, host=host_name)
    require_full(cov, f"Safety LoRA {lora.path.name}", allow_partial)
    originals = {}
    by_name = {t.name: t for t in lora.targets}
    with torch.no_grad():
        for s in cov.matched:
            comp, name = s.host_key.split(".", 1)
            param = params[comp][name]
            originals[s.host_key] = (param, param.detach().clone())
            param.copy_(merged(param, by_name[s.target], strength))
            cov.applied.append(s.host_key)
    return SafetyLoRAHandle(lora, cov, originals)


# --------------------------------------------------------------------------- latent re-attention


def reattention_scales(pipe, s1: float = 0.9, s2: float = 0.2, channels: dict[int, float] | None = None) -> dict[int, float]:
    """Backbone channel count -> scale for :func:`latent_reattention`: ``channels`` as given, else
    FreeU's two stages of the UNet (:func:`safet2i.steering.reattention.stage_scales` of its first
    ``block_out_channels``: 1280 -> s1, 640 -> s2 on SD1.x/SD2.x; SDXL: 1280 -> s1, 640 -> s2)."""
    from .steering.reattention import stage_scales  # noqa: PLC0415

    if channels is not None:
        try:
            scales = {int(c): float(s) for c, s in dict(channels).items()}
        except (TypeError, ValueError) as exc:
            raise SafeT2IError(f"latent re-attention: channels must map channel counts to scales, not {channels!r}") from exc
        if not scales:
            raise SafeT2IError("latent re-attention: the channel map is empty.")
        return scales
    widths = getattr(getattr(pipe.unet, "config", None), "block_out_channels", None)
    if not widths:
        raise SafeT2IError("latent re-attention needs a UNet2DConditionModel (block_out_channels unknown); "
                           "pass channels={C: scale, ...}.")
    return stage_scales(int(widths[0]), s1, s2)


@contextlib.contextmanager
def latent_reattention(pipe, original_embeds, s1: float = 0.9, s2: float = 0.2, window: int = 1,
                       channels: dict[int, float] | None = None, *, original_pooled=None):
    """SAFREE's adaptive latent re-attention (:mod:`safet2i.steering.reattention`) in a diffusers
    SD/SDXL pipeline, the counterpart of ComfyUI's ``SafeT2ILatentReattention`` node.

    While active, every UNet call of the pipeline's CFG batch ``[uncond; steered]`` (B rows each)
    runs as ``[uncond; steered; original]`` (``original_embeds``: the unsteered prompt rows,
    [B or 1, T, D]; SDXL: ``original_pooled`` for the third chunk's ``text_embeds``, default the
    steered rows' pooled embeddings). At every decoder resnet whose *backbone* input has a channel
    count in the scale map (:func:`reattention_scales`: ``channels``, else FreeU's stages; as
    FreeU and the ComfyUI node key them), the steered rows' skip features are replaced by
    :func:`~safet2i.steering.reattention.fourier_reattention` of them against the original rows'
    skip features; the call returns the ``[uncond; steered]`` rows. Inputs are never written.

    Fails closed: a UNet call that is not a CFG batch, or in which no decoder stage matched the
    scale map, raises :class:`SafeT2IError`; the UNet (forward and hooks) is restored on exit,
    after an error too. Does not combine with :func:`safety_guidance` (both change the batch)."""
    from .steering.reattention import fourier_reattention  # noqa: PLC0415

    unet = pipe.unet
    if "forward" in vars(unet):
        raise SafeT2IError("latent re-attention: the UNet's forward is already patched (safety guidance or "
                           "another re-attention is active); the two cannot share one UNet batch.")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise SafeT2IError(f"latent re-attention: window must be a positive integer, not {window!r}")
    scales = reattention_scales(pipe, s1, s2, channels)
    for c, s in scales.items():
        if not (0.0 <= s <= 1.0):
            raise SafeT2IError(f"latent re-attention: the scale for {c} channels must be in [0, 1], not {s}")
    ups = list(getattr(unet, "up_blocks", []) or [])
    if not ups or not all(hasattr(b, "resnets") for b in ups):
        raise SafeT2IError("latent re-attention needs a diffusers UNet2DConditionModel (up_blocks with resnets).")
    state = {"b": None, "skips": None, "matched": 0, "seen": set()}
    handles = []

    def block_hook(block):
        def hook(module, args, kwargs):
            skips = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
            state["skips"] = tuple(skips) if skips is not None else None
        return hook

    def resnet_hook(j):
        def hook(module, args, kwargs):
            b, skips = state["b"], state["skips"]
            if b is None or skips is None or j >= len(skips):
                return None
            x = args[0] if args else kwargs["input_tensor"]
            skip_c = int(skips[-(j + 1)].shape[1])
            h_c = int(x.shape[1]) - skip_c
            if h_c <= 0 or x.shape[0] != 3 * b:
                raise SafeT2IError(f"latent re-attention: decoder input of {x.shape[1]} channels does not hold a "
                                   f"{skip_c}-channel skip connection, or the batch is not [uncond; steered; original].")
            state["seen"].add(h_c)
            scale = scales.get(h_c)
            if scale is None:
                return None
            state["matched"] += 1
            skip = x[:, h_c:]
            filtered = fourier_reattention(skip[b:2 * b], skip[2 * b:], scale, window)
            new = torch.cat([x[:, :h_c], torch.cat([skip[:b], filtered, skip[2 * b:]])], dim=1)
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "input_tensor": new}
        return hook

    original = unet.forward

    def forward(sample, timestep, encoder_hidden_states, *args, **kwargs):
        if sample.shape[0] % 2:
            raise SafeT2IError("Latent re-attention needs classifier-free guidance (a [uncond; steered] batch); "
                               "use guidance_scale > 1.")
        b = sample.shape[0] // 2
        orig = original_embeds.to(encoder_hidden_states)
        if orig.shape[0] not in (1, b) or orig.shape[1:] != encoder_hidden_states.shape[1:]:
            raise SafeT2IError(f"latent re-attention: original embeddings of shape {list(orig.shape)} do not fit "
                               f"the pipeline's prompt rows {list(encoder_hidden_states.shape)} (batch {b}).")
        ehs = torch.cat([encoder_hidden_states, orig.expand(b, *orig.shape[1:])])
        added = kwargs.get("added_cond_kwargs")
        if added:
            kwargs["added_cond_kwargs"] = {
                k: _batched(v, b, original_pooled if k == "text_embeds" else None) for k, v in added.items()
            }
        state.update(b=b, skips=None, matched=0, seen=set())
        try:
            out = original(torch.cat([sample, sample[b:]]), _batched(timestep, b, None), ehs, *args, **kwargs)
        finally:
            state["b"], state["skips"] = None, None
        if not state["matched"]:
            raise SafeT2IError(
                f"Latent re-attention matched no decoder stage of this UNet (backbone channels "
                f"{sorted(state['seen'])}; the filter is set for {sorted(scales)}). Pass channels={{C: scale, ...}} "
                "with this model's backbone channels.")
        pred = out[0] if isinstance(out, tuple) else out.sample
        kept = pred[:2 * b]
        if isinstance(out, tuple):
            return (kept,) + tuple(out[1:])
        out.sample = kept
        return out

    try:
        for block in ups:
            handles.append(block.register_forward_pre_hook(block_hook(block), with_kwargs=True))
            for j, resnet in enumerate(block.resnets):
                handles.append(resnet.register_forward_pre_hook(resnet_hook(j), with_kwargs=True))
        unet.forward = forward
        yield scales
    finally:
        for h in handles:
            h.remove()
        restore_attribute(unet, "forward", original)


# --------------------------------------------------------------------------- Detect-and-Guide tokens


def dag_tokens_kwargs(pipe, path) -> dict:
    """Keyword arguments of :func:`safety_guidance` that make Detect-and-Guide-style guidance
    read the optimised guideline tokens of a Stage 1 file (:mod:`safet2i.train.dag_tokens`)
    instead of the raw concept tokens::

        with safety_guidance(pipe, DAGGuidance(), **dag_tokens_kwargs(pipe, "tokens.safetensors")):
            image = pipe(prompt, guidance_scale=7.5).images[0]

    ``concept_embeds``: the file's whole context (the concept branch's conditioning),
    ``token_positions``: its guideline rows, ``pooled_embeds``: its pooled embedding (SDXL).
    A file of another text width (or without the pooled embedding SDXL needs) is refused."""
    from .train.dag_tokens import load_dag_tokens  # noqa: PLC0415

    tokens = load_dag_tokens(path).check_for(pipe)
    device = pipe._execution_device if hasattr(pipe, "_execution_device") else pipe.device
    dtype = pipe.unet.dtype
    return {"concept_embeds": tokens.context.to(device=device, dtype=dtype),
            "pooled_embeds": None if tokens.pooled is None else tokens.pooled.to(device=device, dtype=dtype),
            "token_positions": list(tokens.positions)}
