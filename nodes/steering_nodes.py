"""ComfyUI node of the prompt layer (V3): SAFREE-style steering of a prompt's conditioning.

The node encodes the prompt itself (it needs the token ids), steers each 77-token chunk with
``safet2i.steering`` per text encoder (SDXL: CLIP-L and OpenCLIP-bigG parts separately;
SD2.x: its penultimate-layer rows), and returns CONDITIONING whose time ranges implement the
self-validating window: steered rows for the first (t'+1)/50 of the schedule, the original
afterwards. A prompt with no trigger token comes back as its plain encoding.
"""

from __future__ import annotations

import json
import logging

import torch
from comfy_api.latest import io, ui

from ..safet2i.errors import SafeT2IError
from ..safet2i.steering import SVF_PRESETS, concept_projector, load_concepts, steer_sequence
from ..safet2i.steering.concepts import preset_choices
from ..safet2i.steering.safree import first_index, packed_layout
from ..safet2i.steering.reattention import fourier_reattention, stage_scales
from .batching import EXTRA, calc_with_extra, check_no_other_batch_function

EOS = 49407
#: The steered and the original entry share one boundary, ``(t'+1)/50 - BOUNDARY_EPS`` as
#: ComfyUI schedule percent. ComfyUI makes an entry active for ``timestep_end <= sigma <=
#: timestep_start`` (both ends inclusive), so a sigma exactly at a shared boundary would make
#: both entries active and averaged; ComfyUI's uniform schedulers (normal, sgm_uniform) do hit
#: ``percent_to_sigma((t'+1)/50)`` exactly (e.g. sgm_uniform at 50 steps, step t'+1).
#: Moving the shared boundary down by 1e-6 leaves no sigma without an active entry, gives the
#: step at exactly (t'+1)/50 to the original entry as the DDIM-50 reference does, and no
#: built-in scheduler at 1..400 steps samples the moved boundary (integration test).
BOUNDARY_EPS = 1e-6
#: Order of the encoders' channel blocks in ComfyUI's concatenated conditioning, per tokenizer
#: key set (SDXL: ``torch.cat([clip_l, clip_g], -1)`` in ``SDXLClipModel.encode_token_weights``).
LAYOUTS = {("l",): ("l",), ("h",): ("h",), ("g", "l"): ("l", "g")}
#: Widths of the full-size encoders, used only when a sub-model's width cannot be read.
FULL_WIDTHS = {"l": 768, "g": 1280}


def _encoder_width(clip, key: str) -> int | None:
    """Hidden width of ComfyUI's ``clip_<key>`` text encoder (its token embedding), or None."""
    sub = getattr(getattr(clip, "cond_stage_model", None), f"clip_{key}", None)
    text_model = getattr(getattr(sub, "transformer", None), "text_model", None)
    embedding = getattr(getattr(text_model, "embeddings", None), "token_embedding", None)
    weight = getattr(embedding, "weight", None)
    return int(weight.shape[-1]) if weight is not None and weight.ndim == 2 else None


def _splits(clip, tokens: dict, dim: int):
    """(key, lo, hi) channel slice of each encoder in the conditioning of width ``dim``.

    SDXL: CLIP-L first, then OpenCLIP-bigG; the slices come from the encoders' actual widths
    (768 and 1280 for the full-size models), so a resized encoder is never steered on another
    encoder's channels."""
    keys = tuple(sorted(tokens))
    if keys not in LAYOUTS:
        raise SafeT2IError(f"SAFREE-style steering supports SD1.x, SD2.x and SDXL text encoders, not {keys}.")
    order = LAYOUTS[keys]
    if len(order) == 1:
        return ((order[0], 0, dim),)
    widths = [_encoder_width(clip, k) or FULL_WIDTHS[k] for k in order]
    if sum(widths) != dim:
        raise SafeT2IError(f"SAFREE-style steering: the {'+'.join(order)} encoder widths {widths} do not add "
                           f"up to the conditioning width {dim}.")
    out, lo = [], 0
    for k, w in zip(order, widths):
        out.append((k, lo, lo + w))
        lo += w
    return tuple(out)


def _ids(chunk) -> list[int]:
    return [int(t[0]) for t in chunk]


log = logging.getLogger("safet2i")
#: Sub-models (by id) whose truncated encode did not reproduce ComfyUI's own: full-length encodes only.
_NO_TRUNCATION: set[int] = set()


def _truncated_encoder(clip, key: str):
    """Leave-one-out EOS rows through ComfyUI's own CLIP modules with shared prefixes, or None.

    ComfyUI's CLIP forward adds all 77 position embeddings, so it only takes 77-token inputs.
    The leave-one-out pass needs only each variant's EOS row, and CLIP text encoders are
    causal: that row depends on the tokens up to the EOS only, and a variant's rows before
    its masked token equal the prompt's. So the prompt (cut after its EOS) and every
    variant's suffix are encoded as ONE packed sequence (:func:`packed_layout`) by the same
    modules (token embedding, position embeddings by position, the encoder layers with the
    packed causal mask, the final layer norm, the layer selection of ``SDClipModel.forward``):
    about half the token rows of encoding every variant. Every call is checked against
    ComfyUI's own encode of the prompt (see ``steer_text``).
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

    def encode(original: list[int], variants: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt rows [L, d], each variant's last row [N, d])."""
        clip.load_model()
        emb = text_model.embeddings
        device = emb.token_embedding.weight.device
        ids, pos, allowed, last = packed_layout(original, variants)
        ids_t = torch.tensor([ids], dtype=torch.long, device=device)
        table = comfy.ops.cast_to(emb.position_embedding.weight, dtype=torch.float32, device=device)
        x = emb.token_embedding(ids_t, out_dtype=torch.float32) + table[torch.tensor(pos, device=device)][None]
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=device)
        mask.masked_fill_(~allowed.to(device), -torch.finfo(x.dtype).max)
        hidden = sub.layer == "hidden"
        x, inter = text_model.encoder(x, mask=mask, intermediate_output=sub.layer_idx if hidden else None)
        if not hidden:
            out = text_model.final_layer_norm(x)
        else:
            out = text_model.final_layer_norm(inter) if sub.layer_norm_hidden_state else inter
        out = out[0].float()
        return out[:len(original)], out[last.to(device)]

    return sub, encode


def subspace_key(clip) -> tuple:
    """Cache key of the concept subspace of ``clip``: ``CLIP.clone()`` shares
    ``cond_stage_model``, so the patcher's ``patches_uuid`` (ComfyUI renews it whenever the
    weight patches change, e.g. a LoRA) and the layer are part of the key; the cache also
    holds a weak reference to the model (see :func:`concept_projector`)."""
    patcher = getattr(clip, "patcher", None)
    return (id(clip.cond_stage_model), getattr(clip, "layer_idx", None), getattr(patcher, "patches_uuid", None))


def token_strings(clip, key: str, ids: list[int]) -> list[str]:
    """Decoded tokens (CLIP BPE, without the ``</w>`` end-of-word marker) of ``ids``."""
    sub = getattr(getattr(clip, "tokenizer", None), f"clip_{key}", None)
    hf = getattr(sub, "tokenizer", None)
    if hf is None or not hasattr(hf, "convert_ids_to_tokens"):
        return [str(i) for i in ids]
    return [t.replace("</w>", "") for t in hf.convert_ids_to_tokens(list(ids))]


def steer_text(clip, text: str, concepts: list[str], svf_name: str, alpha: float, order: str, svf: bool):
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    splits = _splits(clip, tokens, cond.shape[-1])
    n_chunks = len(next(iter(tokens.values())))

    def encode_variants(variant_tokens: dict) -> torch.Tensor:
        out = clip.encode_from_tokens(variant_tokens)
        n = len(next(iter(variant_tokens.values())))
        return out.reshape(n, out.shape[1] // n, out.shape[2])

    def concept_rows(texts):
        rows = []
        for t in texts:
            tk = clip.tokenize(t)
            enc = clip.encode_from_tokens(tk)[0]
            rows.append((tk, enc))
        return rows

    cache_key = subspace_key(clip)
    steered = cond.clone()
    report = {"concepts": len(concepts), "order": order, "chunks": []}
    fraction, changed = 0.0, False
    encoded_concepts = None
    for key, lo, hi in splits:
        def pooled_of(texts, key=key, lo=lo, hi=hi):
            nonlocal encoded_concepts
            encoded_concepts = encoded_concepts or concept_rows(texts)
            return torch.stack([enc[_ids(tk[key][0]).index(EOS), lo:hi] for tk, enc in encoded_concepts])

        p_c = concept_projector((cache_key, key), concepts, pooled_of, owner=clip.cond_stage_model)

        def encode_rows(id_lists, key=key, lo=lo, hi=hi):
            # Leave-one-out variants, all encoders changed at the same position, one batch.
            base = {k: v for k, v in tokens.items()}
            variants = {}
            for k, chunks in base.items():
                template = chunks[chunk_index]
                variants[k] = [[(ids[i], template[i][1]) + tuple(template[i][2:]) for i in range(len(template))]
                               for ids in id_lists]
            return encode_variants(variants)[:, :, lo:hi]

        chunk_ids = [_ids(c) for c in tokens[key]]
        fast = _truncated_encoder(clip, key)
        for chunk_index in range(n_chunks):
            rows = cond[0, :, lo:hi]
            length = rows.shape[0] // n_chunks
            chunk_rows = rows[chunk_index * length:(chunk_index + 1) * length]
            full_ids = chunk_ids[chunk_index]
            eos = first_index(full_ids, EOS)

            def encode_short(id_lists, key=key, chunk_rows=chunk_rows, full_ids=full_ids, eos=eos):
                # The prompt itself rides along: its EOS row must equal ComfyUI's own encode,
                # otherwise this sub-model gets full-length encodes from now on.
                nonlocal fast
                if fast is not None:
                    prompt_rows, last_rows = fast[1](full_ids[:eos + 1], [list(v) for v in id_lists])
                    ref = chunk_rows[eos].to(prompt_rows)
                    tol = 1e-4 * max(1.0, float(ref.abs().max()))
                    if torch.allclose(prompt_rows[eos], ref, rtol=1e-4, atol=tol):
                        # steer_sequence reads only the EOS (last) row of each variant.
                        out = torch.zeros((len(id_lists), eos + 1, last_rows.shape[-1]), dtype=last_rows.dtype,
                                          device=last_rows.device)
                        out[:, eos] = last_rows
                        return out
                    _NO_TRUNCATION.add(id(fast[0]))
                    log.warning("SafeT2I: the short leave-one-out encode of the %s text encoder differs from "
                                "ComfyUI's (max %.3g); using full-length encodes", key,
                                float((prompt_rows[eos] - ref).abs().max()))
                    fast = None
                return encode_rows([list(ids) + full_ids[len(ids):] for ids in id_lists])

            res = steer_sequence(
                [full_ids], chunk_rows, encode_short, p_c, EOS, truncate=fast is not None,
                alpha=alpha, order=order, svf=SVF_PRESETS[svf_name] if svf else None,
            )[0]
            if res.changed:
                changed = True
                fraction = max(fraction, res.fraction)
                steered[0, chunk_index * length:(chunk_index + 1) * length, lo:hi] = res.rows
            entry = {
                "encoder": key, "chunk": chunk_index, "triggers": res.triggers,
                "trigger_tokens": [chunk_ids[chunk_index][t] for t in res.triggers],
                "trigger_words": token_strings(clip, key, [chunk_ids[chunk_index][t] for t in res.triggers]),
                "beta": round(res.beta, 4), "t_prime": res.t_prime,
            }
            n_tokens = max(0, min(eos, length) - 1)
            if n_tokens < 2:  # SAFREE's rule: the trigger test needs another token to compare with
                entry["note"] = f"prompt too short to steer ({n_tokens} token{'' if n_tokens == 1 else 's'})"
            report["chunks"].append(entry)
    report["steered_fraction"] = round(fraction, 4)
    if not changed:
        return [[cond, {"pooled_output": pooled}]], report
    if fraction >= 1.0:
        return [[steered, {"pooled_output": pooled}]], report
    boundary = fraction - BOUNDARY_EPS
    report["boundary_percent"] = boundary
    return [
        [steered, {"pooled_output": pooled, "start_percent": 0.0, "end_percent": boundary}],
        [cond, {"pooled_output": pooled, "start_percent": boundary, "end_percent": 1.0}],
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
                io.Clip.Input("clip", tooltip="The text encoder (SD1.x, SD2.x or SDXL)."),
                io.String.Input("text", multiline=True, dynamic_prompts=True, tooltip="The prompt to encode and steer."),
                io.Combo.Input("concepts", options=preset_choices(), default="nudity",
                               tooltip="Toxic-concept list: a preset or 'custom' (below)."),
                io.String.Input("custom_concepts", default="", multiline=True,
                                tooltip="With concepts = custom: one concept per line or comma-separated."),
                io.Float.Input("alpha", default=0.01, min=0.0, max=10.0, step=0.001,
                               tooltip="Trigger margin α: a token triggers if removing it moves the prompt ≥ (1+α)× "
                                       "the others' mean away from the concepts."),
                io.Combo.Input("order", options=["code", "paper"], default="code",
                               tooltip="code: (I − P_C)·P_M (official code); paper: P_M·(I − P_C) (Eq. 5)."),
                io.Boolean.Input("self_validating", default=True,
                                 tooltip="Steer only the first t' of 50 steps (β rule); off: every step."),
                io.Boolean.Input("concepts_as_negative", default=False,
                                 tooltip="Also output the concept list as the negative prompt, as SAFREE's runs do."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Passed through as 'negative' unless concepts_as_negative is on."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive"),
                io.Conditioning.Output(display_name="negative"),
                io.String.Output(display_name="report"),
            ],
        )

    @classmethod
    def execute(cls, clip, text, concepts, custom_concepts="", alpha=0.01, order="code", self_validating=True,
                concepts_as_negative=False, negative=None) -> io.NodeOutput:
        items, svf_name = load_concepts(concepts, custom_concepts)
        positive, rep = steer_text(clip, text, items, svf_name, alpha, order, self_validating)
        if concepts_as_negative:
            negative = clip.encode_from_tokens_scheduled(clip.tokenize(", ".join(items)))
        elif negative is None:
            negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        lines = [f"SAFREE-style steering: {len(items)} concepts, steered for {rep['steered_fraction']:.0%} of the steps"]
        for c in rep["chunks"]:
            if c["triggers"]:
                words = ", ".join(repr(w) for w in c["trigger_words"])
                lines.append(f"{c['encoder']} chunk {c['chunk']}: trigger tokens {words} at positions {c['triggers']}, "
                             f"β = {c['beta']}, t' = {c['t_prime']}")
            elif "note" in c:
                lines.append(f"{c['encoder']} chunk {c['chunk']}: {c['note']}")
        if not any(c["triggers"] for c in rep["chunks"]):
            lines.append("no trigger token: conditioning unchanged")
        return io.NodeOutput(positive, negative, json.dumps(rep), ui=ui.PreviewText("\n".join(lines)))


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
