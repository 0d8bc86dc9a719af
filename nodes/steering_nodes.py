"""ComfyUI node of the prompt layer (V3): SAFREE-style steering of a prompt's conditioning.

The steering itself is the core's :class:`safet2i.steering.SteeringPlan`; this module gives it
ComfyUI's text encoders (:class:`_ClipEncoder`: ComfyUI's own tokenizer, weighted encode and,
for the leave-one-out pass, a packed causal run of its CLIP modules) and applies the
self-validating window ComfyUI's way: CONDITIONING whose time ranges use the steered rows for
the first (t'+1)/50 of the schedule and the original afterwards. SDXL: CLIP-L and
OpenCLIP-bigG parts separately; SD2.x: its penultimate-layer rows. SD3, Flux, Wan and Qwen-Image
(:func:`family_encoders`, :class:`_SubEncoder`): each sub-model on its own rows and channels of
ComfyUI's conditioning (docs/steering.md). A prompt with no trigger token comes back as its plain
encoding.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging

import torch
from comfy_api.latest import io, ui

from ..safet2i.errors import SafeT2IError
from ..safet2i.steering import ORDERS, SVF_PRESETS, SteeringPlan, concept_projector, end_rows, load_concepts, report_lines
from ..safet2i.steering.concepts import preset_choices
from ..safet2i.steering.plan import chat_span, channel_slices, clip_span, packed_encode, t5_span, token_words
from ..safet2i.steering.reattention import fourier_reattention, stage_scales
from ..safet2i.steering.settings import CONFIGURATIONS, CUSTOM, SteeringSettings, concepts_negative, configure, describe
from .batching import EXTRA, calc_with_extra, check_no_other_batch_function

EOS = 49407
#: The steered and the original entry share the boundary ``(t'+1)/50 - BOUNDARY_EPS`` (schedule
#: percent): ComfyUI's entry ranges are inclusive at both ends, so at a sigma exactly on a shared
#: boundary both would be averaged (docs/steering.md, "The self-validating window in the hosts").
BOUNDARY_EPS = 1e-6
#: Order of the encoders' channel blocks in ComfyUI's concatenated conditioning, per tokenizer
#: key set (SDXL: ``torch.cat([clip_l, clip_g], -1)`` in ``SDXLClipModel.encode_token_weights``).
LAYOUTS = {("l",): ("l",), ("h",): ("h",), ("g", "l"): ("l", "g")}
#: Widths of the full-size encoders, used only when a sub-model's width cannot be read.
FULL_WIDTHS = {"l": 768, "g": 1280}

log = logging.getLogger("safet2i")
#: Sub-models (by id) whose packed encode did not reproduce ComfyUI's own: full-length encodes only.
_NO_TRUNCATION: set[int] = set()


def _encoder_width(clip, key: str) -> int | None:
    """Hidden width of ComfyUI's ``clip_<key>`` text encoder (its token embedding), or None."""
    sub = getattr(getattr(clip, "cond_stage_model", None), f"clip_{key}", None)
    text_model = getattr(getattr(sub, "transformer", None), "text_model", None)
    embedding = getattr(getattr(text_model, "embeddings", None), "token_embedding", None)
    weight = getattr(embedding, "weight", None)
    return int(weight.shape[-1]) if weight is not None and weight.ndim == 2 else None


#: Qwen-Image's chat template, as ComfyUI's ``QwenImageTEModel`` finds the user turn in it.
QWEN_IM_START, QWEN_USER, QWEN_NEWLINE, QWEN_IM_END, QWEN_PAD = 151644, 872, 198, 151645, 151643
#: Variants per encode of the large sub-models (T5-XXL, umT5-XXL, Qwen2.5-VL 7B): bounds memory.
SUB_BATCH = 8


def model_family(clip) -> str | None:
    """``sd3`` / ``flux`` / ``wan`` / ``qwen_image`` by ComfyUI's text-encoder class, else None
    (the CLIP families: SD1.x, SD2.x, SDXL, told apart by their tokenizer keys)."""
    model = getattr(clip, "cond_stage_model", None)
    try:
        import comfy.text_encoders.flux as flux
        import comfy.text_encoders.qwen_image as qwen_image
        import comfy.text_encoders.sd3_clip as sd3_clip
        import comfy.text_encoders.wan as wan
    except ImportError:  # pragma: no cover - an older ComfyUI without these families
        return None
    for cls, name in ((sd3_clip.SD3ClipModel, "sd3"), (flux.FluxClipModel, "flux"), (wan.WanT5Model, "wan"),
                      (qwen_image.QwenImageTEModel, "qwen_image")):
        if isinstance(model, cls):
            return name
    return None


def _splits(clip, tokens: dict, dim: int):
    """(key, lo, hi) channel slice of each encoder in the conditioning of width ``dim``: SDXL
    CLIP-L first, then OpenCLIP-bigG, from the encoders' actual widths (768 and 1280 full-size)."""
    keys = tuple(sorted(tokens))
    if keys not in LAYOUTS:
        raise SafeT2IError(f"SAFREE-style steering supports the SD1.x, SD2.x, SDXL, SD3, Flux, Wan and Qwen-Image "
                           f"text encoders, not {type(getattr(clip, 'cond_stage_model', None)).__name__} "
                           f"(tokenizer keys {keys}).")
    order = LAYOUTS[keys]
    widths = [None] if len(order) == 1 else [_encoder_width(clip, k) or FULL_WIDTHS[k] for k in order]
    return tuple((k, s.start, s.stop) for k, s in zip(order, channel_slices(widths, dim, list(order))))


def _ids(chunk) -> list[int]:
    return [int(t[0]) for t in chunk]


def _truncated_encoder(clip, key: str):
    """(sub-model, ``encode_packed``) for ComfyUI's ``clip_<key>``, or None.

    ComfyUI's CLIP forward adds all 77 position embeddings, so it only takes 77-token inputs;
    the core's packed leave-one-out encode (:func:`packed_encode`) needs one causal run over a
    packed sequence with explicit positions and mask. This is that run, by ComfyUI's own modules
    (token embedding, position embeddings by position, the encoder layers with the packed mask,
    the final layer norm, the layer selection of ``SDClipModel.forward``). The core checks every
    packed encode against ComfyUI's own encode of the prompt.
    """
    sub = getattr(clip.cond_stage_model, f"clip_{key}", None)
    text_model = getattr(getattr(sub, "transformer", None), "text_model", None)
    needed = ("embeddings", "encoder", "final_layer_norm")
    if text_model is None or id(sub) in _NO_TRUNCATION or not all(hasattr(text_model, n) for n in needed):
        return None
    # The same layer options and loaded weights as clip.encode_from_tokens uses.
    clip.cond_stage_model.reset_clip_options()
    if getattr(clip, "layer_idx", None) is not None:
        clip.cond_stage_model.set_clip_options({"layer": clip.layer_idx})
    if getattr(sub, "enable_attention_masks", False) or getattr(sub, "layer", None) not in ("last", "hidden"):
        return None
    import comfy.ops

    def run(ids: list[int], positions: list[int], allowed: torch.Tensor) -> torch.Tensor:
        clip.load_model()
        emb = text_model.embeddings
        device = emb.token_embedding.weight.device
        ids_t = torch.tensor([ids], dtype=torch.long, device=device)
        table = comfy.ops.cast_to(emb.position_embedding.weight, dtype=torch.float32, device=device)
        x = emb.token_embedding(ids_t, out_dtype=torch.float32) + table[torch.tensor(positions, device=device)][None]
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=device)
        mask.masked_fill_(~allowed.to(device), -torch.finfo(x.dtype).max)
        hidden = sub.layer == "hidden"
        x, inter = text_model.encoder(x, mask=mask, intermediate_output=sub.layer_idx if hidden else None)
        if not hidden:
            out = text_model.final_layer_norm(x)
        else:
            out = text_model.final_layer_norm(inter) if sub.layer_norm_hidden_state else inter
        return out[0].float()

    return sub, functools.partial(packed_encode, run)


def subspace_key(clip) -> tuple:
    """Cache key of the concept subspace of ``clip``: ``CLIP.clone()`` shares
    ``cond_stage_model``, so the patcher's ``patches_uuid`` (ComfyUI renews it whenever the
    weight patches change, e.g. a LoRA) and the layer are part of the key; the cache also
    holds a weak reference to the model (see :func:`concept_projector`)."""
    patcher = getattr(clip, "patcher", None)
    return (id(clip.cond_stage_model), getattr(clip, "layer_idx", None), getattr(patcher, "patches_uuid", None))


class _ClipEncoder:
    """ComfyUI's ``clip_<key>`` as the core's ``TextEncoder``: ``clip.tokenize`` chunks and
    ``clip.encode_from_tokens`` rows (variants keep the prompt's token weights) on this encoder's
    channels. ``memo`` (per prompt, shared by the encoders): tokens and plain encodes per text."""

    end_id = EOS

    def __init__(self, clip, key: str, cut: slice, width: int | None, memo: dict):
        self.clip, self.name, self.cut, self.width, self.memo = clip, key, cut, width, memo
        self.sub, self.encode_packed = _truncated_encoder(clip, key) or (None, None)

    def chunks(self, text):
        if text not in self.memo:
            self.memo[text] = self.clip.tokenize(text)
        tokens = self.memo[text]
        return [(_ids(c), (tokens, k)) for k, c in enumerate(tokens[self.name])]

    def encode(self, id_lists, data):
        out = []
        for (tokens, k), run in itertools.groupby(zip(id_lists, data), key=lambda x: x[1]):   # one encode per chunk
            group = [list(ids) for ids, _ in run]
            if all(ids == _ids(tokens[self.name][k]) for ids in group):        # the text itself: its plain encode
                if id(tokens) not in self.memo:
                    rows = self.clip.encode_from_tokens(tokens)
                    self.memo[id(tokens)] = rows.unflatten(1, (len(tokens[self.name]), -1))[0]
                out.append(self.memo[id(tokens)][k:k + 1].expand(len(group), -1, -1))
            else:
                rows = self.clip.encode_from_tokens({kk: [[(ids[m], *t[1:]) for m, t in enumerate(c[k])] for ids in group]
                                                     for kk, c in tokens.items()})
                out.append(rows.unflatten(1, (len(group), -1))[0])
        return torch.cat(out)[..., self.cut]

    def token_text(self, ids):
        return token_words(getattr(getattr(self.clip.tokenizer, f"clip_{self.name}", None), "tokenizer", None), ids)

    def packed_failed(self, difference: float) -> None:
        _NO_TRUNCATION.add(id(self.sub))
        log.warning("SafeT2I: the short leave-one-out encode of the %s text encoder differs from ComfyUI's "
                    "(max %.3g); using full-length encodes", self.name, difference)
        self.encode_packed = None


def _ints(chunk, key: str) -> list[int]:
    ids = []
    for t in chunk:
        if not isinstance(t[0], int) or isinstance(t[0], bool):
            raise SafeT2IError(f"SAFREE-style steering: the {key} tokens hold an embedding or image, not only token ids "
                               "(textual-inversion embeddings on this encoder and Qwen-Image-Edit images are not "
                               "supported).")
        ids.append(int(t[0]))
    return ids


def _qwen_start(ids: list[int]) -> int:
    """The first row ComfyUI's ``QwenImageTEModel`` keeps: its second ``<|im_start|>``, moved past
    ``user\n`` when that follows (the same rule, written from its description); -1 without one."""
    start, seen = -1, 0
    for i, t in enumerate(ids):
        if t == QWEN_IM_START and seen < 2:
            start, seen = i, seen + 1
    if start >= 0 and len(ids) > start + 3 and ids[start + 1] == QWEN_USER and ids[start + 2] == QWEN_NEWLINE:
        start += 3
    return start


class _SubEncoder:
    """One sub-model of ComfyUI's text encoder (``clip_l``/``clip_g`` of SD3, ``t5xxl``,
    ``umt5xxl``, ``qwen25_7b``) as the core's ``TextEncoder``: ``clip.tokenize`` chunks (the key's
    own), the sub-model's own ``encode_token_weights`` rows (the rows ComfyUI concatenates into
    the conditioning), after the same clip options and model load as ``encode_from_tokens``.
    ``kind``: ``clip`` (causal, pooled = first end token; a packed short encode), ``t5``
    (bidirectional, pooled = ``</s>``, full-length variants: SD3/Flux attend the padding) or
    ``chat`` (Qwen2.5-VL: causal, pooled = last row, rows from the user turn on)."""

    def __init__(self, clip, key: str, kind: str, memo: dict, *, block: int = 0, channels: slice | None = None,
                 width: int | None = None):
        self.clip, self.name, self.kind, self.memo, self.block = clip, key, kind, memo, block
        attr = f"clip_{key}" if kind == "clip" else key
        self.sub = getattr(clip.cond_stage_model, attr)
        special = getattr(self.sub, "special_tokens", {}) or {}
        self.end_id = QWEN_IM_END if kind == "chat" else special.get("end", EOS)
        self.width = width
        if channels is not None:
            self.channels = channels
        self.encode_packed = None
        if kind == "clip":
            self.packed_sub, self.encode_packed = _truncated_encoder(clip, key) or (None, None)

    def chunks(self, text):
        if text not in self.memo:
            self.memo[text] = self.clip.tokenize(text)
        tokens = self.memo[text]
        return [(_ints(c, self.name), (tokens, k)) for k, c in enumerate(tokens[self.name])]

    def span(self, ids):
        if self.kind == "clip":
            return clip_span(ids, self.end_id)
        if self.kind == "t5":
            return t5_span(ids, self.end_id)
        start = _qwen_start(ids)
        if start < 0:
            raise SafeT2IError("SAFREE-style steering: the Qwen-Image prompt has no chat-template user turn "
                               "(<|im_start|>user); ComfyUI's template was replaced by one steering cannot read.")
        return chat_span(ids, start, QWEN_IM_END, QWEN_PAD)

    def _run(self, pairs):
        model = self.clip.cond_stage_model
        model.reset_clip_options()
        if getattr(self.clip, "layer_idx", None) is not None:
            model.set_clip_options({"layer": self.clip.layer_idx})
        self.clip.load_model()
        rows = self.sub.encode_token_weights(pairs)[0]
        return rows.unflatten(1, (len(pairs), -1))[0]

    def encode(self, id_lists, data):
        out = []
        for (tokens, k), run in itertools.groupby(zip(id_lists, data), key=lambda x: (id(x[1][0]), x[1][1])):
            run = list(run)
            tokens, k = run[0][1]
            chunk = tokens[self.name][k]
            pairs = [[(ids[m], *t[1:]) for m, t in enumerate(chunk)] for ids, _ in run]
            for lo in range(0, len(pairs), SUB_BATCH):
                out.append(self._run(pairs[lo:lo + SUB_BATCH]))
        longest = max(o.shape[1] for o in out)
        return torch.cat([torch.nn.functional.pad(o, (0, 0, 0, longest - o.shape[1])) for o in out])

    def token_text(self, ids):
        tok = getattr(self.clip.tokenizer, self.name, None) or getattr(self.clip.tokenizer, f"clip_{self.name}", None)
        inv = getattr(tok, "inv_vocab", None)
        if inv is not None:
            return [str(inv.get(int(i), f"#{int(i)}")).replace("</w>", "").replace("\u2581", "").replace("\u0120", "")
                    for i in ids]
        return token_words(getattr(tok, "tokenizer", None), ids)

    def packed_failed(self, difference: float) -> None:
        _NO_TRUNCATION.add(id(self.packed_sub))
        log.warning("SafeT2I: the short leave-one-out encode of the %s text encoder differs from ComfyUI's "
                    "(max %.3g); using full-length encodes", self.name, difference)
        self.encode_packed = None


def family_encoders(clip, family: str, memo: dict) -> list[_SubEncoder]:
    """The steerable encoders of an SD3 / Flux / Wan / Qwen-Image CLIP object, in the layout of
    ComfyUI's conditioning (``*.encode_token_weights`` of each text-encoder class):

    * SD3 (``SD3ClipModel``): block 0 the CLIP rows, CLIP-L at channels 0:w_l and CLIP-G after it
      (768: without CLIP-L), zero-padded to 4096; block 1 the T5 rows. Missing sub-models are
      left out, as ComfyUI leaves them out of the conditioning.
    * Flux (``FluxClipModel``): the T5 rows (CLIP-L gives only the pooled vector, not steered).
    * Wan (``WanT5Model``): the umT5 rows (masked, zeroed padding rows untouched).
    * Qwen-Image (``QwenImageTEModel``): the Qwen2.5-VL rows from the user turn on.
    """
    model = clip.cond_stage_model
    if family == "sd3":
        out = []
        l_sub, g_sub = getattr(model, "clip_l", None), getattr(model, "clip_g", None)
        wl = _encoder_width(clip, "l") if l_sub is not None else None
        if l_sub is not None:
            out.append(_SubEncoder(clip, "l", "clip", memo, block=0, channels=slice(0, wl), width=wl))
        if g_sub is not None:
            wg = _encoder_width(clip, "g")
            lo = wl if l_sub is not None else FULL_WIDTHS["l"]
            out.append(_SubEncoder(clip, "g", "clip", memo, block=0, channels=slice(lo, lo + wg), width=wg))
        if getattr(model, "t5xxl", None) is not None:
            out.append(_SubEncoder(clip, "t5xxl", "t5", memo, block=1 if out else 0))
        return out
    if family == "flux":
        return [_SubEncoder(clip, "t5xxl", "t5", memo)]
    if family == "wan":
        return [_SubEncoder(clip, "umt5xxl", "t5", memo)]
    if family == "qwen_image":
        return [_SubEncoder(clip, "qwen25_7b", "chat", memo)]
    raise SafeT2IError(f"SAFREE-style steering: unknown text-encoder family {family!r}")


def steer_text(clip, text: str, concepts: list[str], svf_name: str, alpha: float, order: str, svf: bool):
    """(positive CONDITIONING, report) of ``text`` steered away from ``concepts``. The pooled
    output and every other entry of ComfyUI's encode (e.g. an attention mask) are passed as they are."""
    tokens = clip.tokenize(text)
    encoded = clip.encode_from_tokens(tokens, return_dict=True)
    cond = encoded.pop("cond")
    memo = {text: tokens}
    family = model_family(clip)
    if family is None:
        multi = len(tokens) > 1
        encoders = [_ClipEncoder(clip, key, slice(lo, hi), hi - lo if multi else None, memo)
                    for key, lo, hi in _splits(clip, tokens, cond.shape[-1])]
    else:
        encoders = family_encoders(clip, family, memo)
        if not encoders:
            raise SafeT2IError(f"SAFREE-style steering: this {family} text encoder has no sub-model to steer.")
    projectors = [concept_projector((subspace_key(clip), e.name), concepts, functools.partial(end_rows, e),
                                    owner=clip.cond_stage_model) for e in encoders]
    plan = SteeringPlan(encoders, projectors, text, cond[0], alpha=alpha, order=order,
                        svf=SVF_PRESETS[svf_name] if svf else None)
    out = plan.steer(cond[0])
    report = plan.report(out, len(concepts))
    if family is not None:
        report["family"] = family
    if not out.changed:
        return [[cond, dict(encoded)]], report
    steered = out.rows[None]
    if out.fraction >= 1.0:
        return [[steered, dict(encoded)]], report
    boundary = out.fraction - BOUNDARY_EPS
    report["boundary_percent"] = boundary
    return [
        [steered, {**encoded, "start_percent": 0.0, "end_percent": boundary}],
        [cond, {**encoded, "start_percent": boundary, "end_percent": 1.0}],
    ], report


class SafeT2IPromptSteer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SafeT2IPromptSteer",
            display_name="SafeT2I SAFREE-style Prompt Steering",
            category="SafeT2I/prompt",
            description=(
                "Training-free steering of the prompt embedding (after SAFREE, Yoon et al., ICLR 2025): tokens "
                "whose removal moves the prompt away from the toxic-concept subspace are projected out of it, "
                "for a self-validated number of early steps. Prompts with no trigger token are unchanged."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder (SD1.x, SD2.x, SDXL, SD3, Flux, Wan or Qwen-Image)."),
                io.String.Input("text", multiline=True, dynamic_prompts=True, tooltip="The prompt to encode and steer."),
                io.Combo.Input("concepts", options=preset_choices(), default="nudity",
                               tooltip="Toxic-concept list: a preset or 'custom' (below)."),
                io.String.Input("custom_concepts", default="", multiline=True,
                                tooltip="With concepts = custom: one concept per line or comma-separated."),
                io.Float.Input("alpha", default=0.01, min=0.0, max=10.0, step=0.001,
                               tooltip="Trigger margin α: a token triggers if removing it moves the prompt ≥ (1+α)× "
                                       "the others' mean away from the concepts."),
                io.Combo.Input("order", options=list(ORDERS), default="code",
                               tooltip="code: (I − P_C)·P_M (official code); paper: P_M·(I − P_C) (Eq. 5)."),
                io.Boolean.Input("self_validating", default=True,
                                 tooltip="Steer only the first t' of 50 steps (β rule); off: every step."),
                io.Boolean.Input("concepts_as_negative", default=False,
                                 tooltip="Also output the concept list as the negative prompt, as SAFREE's runs do."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Passed through as 'negative' unless concepts_as_negative is on."),
                io.Combo.Input("configuration", options=list(CONFIGURATIONS), default=CUSTOM, optional=True,
                               tooltip="'SAFREE (paper configuration)': the paper's runs (nudity concepts, α 0.01, "
                                       "code order, self-validating on, off on SDXL, concepts as the negative "
                                       "prompt), overriding the inputs above; 'custom settings': the inputs above."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive"),
                io.Conditioning.Output(display_name="negative"),
                io.String.Output(display_name="report"),
            ],
        )

    @classmethod
    def execute(cls, clip, text, concepts, custom_concepts="", alpha=0.01, order="code", self_validating=True,
                concepts_as_negative=False, negative=None, configuration=CUSTOM) -> io.NodeOutput:
        own = SteeringSettings(concepts, custom_concepts, alpha, order, self_validating, concepts_as_negative)
        arch = model_family(clip) or ("sdxl" if getattr(clip.cond_stage_model, "clip_g", None) is not None else None)
        s = configure(configuration, own, arch)
        items, svf_name = load_concepts(s.concepts, s.custom)
        positive, rep = steer_text(clip, text, items, svf_name, s.alpha, s.order, s.self_validating)
        rep["configuration"] = describe(configuration, s)
        if s.concepts_as_negative:
            negative = clip.encode_from_tokens_scheduled(clip.tokenize(concepts_negative(items)))
        elif negative is None:
            negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        return io.NodeOutput(positive, negative, json.dumps(rep), ui=ui.PreviewText("\n".join(report_lines(rep))))


class SafeT2ILatentReattention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SafeT2ILatentReattention",
            display_name="SafeT2I SAFREE Latent Re-attention",
            category="SafeT2I/prompt",
            description=(
                "SAFREE's adaptive latent re-attention (paper version): the original, unsteered prompt runs in the "
                "same UNet batch as a reference; at the two FreeU decoder stages the steered branch's skip features "
                "are damped in a low-frequency Fourier window where they exceed the reference's."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch."),
                io.Conditioning.Input("original", tooltip="The unsteered prompt (a plain text encode of the same text)."),
                io.Float.Input("s1", default=0.9, min=0.0, max=1.0, step=0.01, tooltip="Scale at the deepest stage."),
                io.Float.Input("s2", default=0.2, min=0.0, max=1.0, step=0.01, tooltip="Scale at the next stage."),
                io.Int.Input("window", default=1, min=1, max=64, tooltip="Half-size of the low-frequency window."),
                io.String.Input("channels", default="auto",
                                tooltip="auto: FreeU's stages (4x and 2x model channels); or 'C:scale, C:scale'."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, original, s1=0.9, s2=0.2, window=1, channels="auto") -> io.NodeOutput:
        check_no_other_batch_function(model, "latent re-attention")
        if channels.strip() == "auto":
            mc = model.model.model_config.unet_config.get("model_channels")
            if not mc:
                raise SafeT2IError("Latent re-attention needs a UNet model (model_channels unknown).")
            scales = stage_scales(mc, s1, s2)
        else:
            try:
                scales = {int(c.split(":")[0]): float(c.split(":")[1]) for c in channels.split(",") if c.strip()}
            except (ValueError, IndexError) as exc:
                raise SafeT2IError(f"channels must be 'auto' or 'C:scale, C:scale', not {channels!r}") from exc
            if not scales:
                raise SafeT2IError("Latent re-attention: the channel list is empty; use 'auto' or 'C:scale, C:scale'.")
        m = model.clone()
        # Per model call: the backbone channel counts seen with the positive entry, and how many matched.
        seen = {"channels": set(), "matched": 0}

        def calc(args):
            seen["channels"].clear()
            seen["matched"] = 0
            cond_d, uncond_d, _reference = calc_with_extra(args, original, "latent re-attention")
            if not seen["matched"]:
                # Fail closed: a filter that touches nothing would silently sample unfiltered.
                found = (f"backbone channels {sorted(seen['channels'])}" if seen["channels"]
                         else "no UNet decoder skip connection with the positive prompt")
                raise SafeT2IError(
                    f"Latent re-attention matched no decoder stage of this model in this step (found {found}; "
                    f"the filter is set for {sorted(scales)}, channels = {channels!r}). Set channels to "
                    "'C:scale, C:scale' with this model's backbone channels."
                )
            return [cond_d, uncond_d]

        def output_patch(h, hsp, transformer_options):
            order = list(transformer_options.get("cond_or_uncond", []))
            if 0 in order:
                seen["channels"].add(int(h.shape[1]))
            scale = scales.get(int(h.shape[1]))  # keyed on the backbone, as FreeU
            if scale is None or 0 not in order:
                return h, hsp
            seen["matched"] += 1
            if order.count(0) != 1 or order.count(EXTRA) != 1:
                # Fail closed: ComfyUI split [cond, original] over two UNet calls (low memory) or
                # several conditioning entries are active at once; the filter cannot pair them.
                raise SafeT2IError(
                    "Latent re-attention needs exactly one active positive entry and the original prompt in the "
                    f"same UNet batch (got {order}): use one conditioning entry each, or a smaller batch/resolution "
                    "so ComfyUI does not split the batch."
                )
            chunk = hsp.shape[0] // len(order)
            safe = slice(order.index(0) * chunk, (order.index(0) + 1) * chunk)
            ref = slice(order.index(EXTRA) * chunk, (order.index(EXTRA) + 1) * chunk)
            out = hsp.clone()
            out[safe] = fourier_reattention(hsp[safe], hsp[ref], scale, window)
            return h, out

        m.set_model_sampler_calc_cond_batch_function(calc)
        m.set_model_output_block_patch(output_patch)
        return io.NodeOutput(m)


NODES = [SafeT2IPromptSteer, SafeT2ILatentReattention]
