"""The webui's text engines as the core's steering ``TextEncoder`` (see ``steering.py``).

Every engine with the webui's ``tokenize_line`` / ``encode_with_transformers`` pair, used
exactly as the webui uses it: A1111's hijacked ``cond_stage_model`` (SD1 CLIP-L, SD2
OpenCLIP-H), the SDXL ``conditioner.embedders`` (CLIP-L and OpenCLIP-bigG, each on its own
channel slice of ``crossattn``), Forge's ``text_processing_engine[_l|_g]``, Forge's Flux T5
engine ``text_processing_engine_t5`` (:class:`T5Encoder`: ``crossattn`` is its rows; the CLIP-L
engine only gives the pooled ``vector``, which is left alone), Forge's SD3.5 (CLIP-L and CLIP-G
engines on their own channels of one block of rows, zero-padded to the T5 width, then the T5
engine's rows: :func:`_forge_sd35_encoders`; the pooled ``vector`` is left alone); and a plain HF
``CLIPTextModel`` + tokenizer under ``cond_stage_model.wrapped`` (:class:`HFClipEngine`, no
emphasis). Any other text encoder is refused with an error (the job's images are blocked).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from safet2i.errors import SafeT2IError
from safet2i.steering.plan import t5_span, token_words
from safet2i.steering.safree import first_index


class SteeringError(SafeT2IError):
    """Steering cannot run for this job; the job's images are blocked."""


@dataclass
class _Chunk:
    tokens: list
    multipliers: list
    fixes: list = field(default_factory=list)


class HFClipEngine:
    """The webui engine interface over a plain HF ``CLIPTextModel`` + tokenizer (no emphasis,
    no textual inversion, no ``BREAK``): 75-token chunks, BOS + tokens + EOS padding, rows of
    the last hidden state (or ``hidden_states[-clip_skip]`` + the final layer norm)."""

    chunk_length = 75

    def __init__(self, transformer, tokenizer, clip_skip: int = 1):
        self.transformer, self.tokenizer, self.clip_skip = transformer, tokenizer, clip_skip
        self.id_start = tokenizer.bos_token_id
        self.id_end = tokenizer.eos_token_id
        self.id_pad = self.id_end

    def tokenize_line(self, line: str):
        ids = self.tokenizer(line, truncation=False, add_special_tokens=False)["input_ids"]
        chunks = []
        for start in range(0, max(1, len(ids)), self.chunk_length):
            part = ids[start:start + self.chunk_length]
            pad = self.chunk_length + 1 - len(part)
            chunks.append(_Chunk([self.id_start] + part + [self.id_end] * pad, [1.0] * (self.chunk_length + 2)))
        return chunks, len(ids)

    def encode_with_transformers(self, tokens: torch.Tensor) -> torch.Tensor:
        device = next(self.transformer.parameters()).device
        out = self.transformer(input_ids=tokens.to(device), output_hidden_states=self.clip_skip > 1)
        if self.clip_skip <= 1:
            return out.last_hidden_state
        z = out.hidden_states[-self.clip_skip]
        text_model = getattr(self.transformer, "text_model", self.transformer)
        return text_model.final_layer_norm(z)


def _is_engine(obj) -> bool:
    return callable(getattr(obj, "tokenize_line", None)) and callable(getattr(obj, "encode_with_transformers", None))


def _device():
    try:
        from modules import devices  # noqa: PLC0415
        return devices.device
    except Exception:  # noqa: BLE001 - outside the webui
        return None


def _autocast():
    try:
        from modules import devices  # noqa: PLC0415
        return devices.autocast()
    except Exception:  # noqa: BLE001
        return contextlib.nullcontext()


class Encoder:
    """One text encoder of the loaded model, used exactly as the webui uses it: the core's
    steering ``TextEncoder`` (chunks with their textual-inversion fixes as the host data)."""

    def __init__(self, name: str, engine):
        self.name, self.engine = name, engine
        self.id_end = self.end_id = int(engine.id_end)
        self.id_pad = int(getattr(engine, "id_pad", engine.id_end))

    def chunks(self, text: str) -> list[tuple[list[int], list]]:
        """(77 token ids, textual-inversion fixes) per chunk, as the webui chunks ``text``."""
        chunks, _ = self.engine.tokenize_line(text)
        return [([int(t) for t in c.tokens], list(getattr(c, "fixes", None) or [])) for c in chunks]

    def _set_fixes(self, batch_fixes: list[list]) -> None:
        has = any(batch_fixes)
        for holder in (getattr(self.engine, "hijack", None), getattr(self.engine, "embeddings", None)):
            if holder is not None and not isinstance(holder, torch.nn.Module):
                holder.fixes = batch_fixes if has else None   # A1111: model_hijack; Forge: EmbeddingDatabase
                return
        if has:
            raise SteeringError(f"the prompt uses textual-inversion embeddings, which SafeT2I cannot reproduce with "
                                f"this text encoder ({type(self.engine).__name__}); steering refuses")

    @torch.no_grad()
    def encode(self, id_lists: list[list[int]], batch_fixes: list[list] | None = None) -> torch.Tensor:
        """Rows [N, L, d] (CPU) of the engine's ``encode_with_transformers``: the layer the
        webui's conditioning comes from, before emphasis. The padding after the first end token
        is replaced by the pad token where the engine does that (OpenCLIP)."""
        tokens = torch.tensor(id_lists, dtype=torch.long)
        if self.id_pad != self.id_end:
            for row, ids in enumerate(id_lists):
                tokens[row, first_index(list(ids), self.id_end) + 1:] = self.id_pad
        self._set_fixes(batch_fixes or [[] for _ in id_lists])
        device = _device()
        if device is not None:
            tokens = tokens.to(device)
        with _autocast():
            z = self.engine.encode_with_transformers(tokens)
        return z.detach().cpu()

    def token_text(self, ids: list[int]) -> list[str]:
        tok = getattr(self.engine, "tokenizer", None) or getattr(getattr(self.engine, "wrapped", None), "tokenizer", None)
        if not hasattr(tok, "convert_ids_to_tokens"):
            with contextlib.suppress(ImportError):
                from open_clip import tokenizer as oc  # noqa: PLC0415  (A1111's OpenCLIP engines)
                tok = SimpleNamespace(convert_ids_to_tokens=lambda i: oc._tokenizer.decoder.get(i, f"#{i}"))
        return token_words(tok, ids)


class T5Encoder(Encoder):
    """Forge's ``T5TextProcessingEngine`` (Flux) as the core's T5 ``TextEncoder``: the engine's
    own chunks (the prompt's tokens, ``</s>`` = ``id_end``, ``id_pad`` padding to ``min_length``
    256; no start token), rows of ``encode_with_transformers`` (the T5 encoder, no attention mask,
    before emphasis), the span :func:`~safet2i.steering.plan.t5_span` (prompt rows 0..n−1, pooled
    row = the first ``</s>``) and the leave-one-out mask token ``id_pad`` (0)."""

    def __init__(self, name: str, engine):
        super().__init__(name, engine)
        self.mask_id = self.id_pad

    def span(self, ids: list[int]):
        return t5_span(list(ids), self.end_id)

    def token_text(self, ids: list[int]) -> list[str]:
        tok = getattr(self.engine, "tokenizer", None)
        convert = getattr(tok, "convert_ids_to_tokens", None)
        return [str(convert(int(i)) if convert is not None else f"#{int(i)}").replace("\u2581", "") for i in ids]


def _forge_t5_engine(t5, model: str) -> None:
    if type(t5).__name__ != "T5TextProcessingEngine" or int(t5.id_end) != 1 or int(getattr(t5, "id_pad", -1)) != 0:
        raise SteeringError(f"SAFREE-style steering: {model}'s T5 engine is a {type(t5).__name__} with end/pad ids "
                            f"{getattr(t5, 'id_end', None)}/{getattr(t5, 'id_pad', None)}, not Forge's "
                            "T5TextProcessingEngine (</s> 1, <pad> 0); steering refuses")


def _width(encoder: Encoder) -> int:
    """Channels of the encoder's rows (one encode of the empty prompt's chunk)."""
    ids, fixes = encoder.chunks("")[0]
    return int(encoder.encode([ids], [fixes]).shape[-1])


def _sd3_t5_enabled() -> bool:
    try:
        from modules import shared  # noqa: PLC0415
        return bool(getattr(shared.opts, "sd3_enable_t5", False))
    except Exception:  # noqa: BLE001 - outside the webui
        return True


def _forge_sd35_encoders(sd_model) -> list[Encoder]:
    """Forge's SD3.5 (``backend/diffusion_engine/sd35.py``): ``crossattn`` = the CLIP-L and CLIP-G
    engines' rows concatenated along channels (L first) and zero-padded to the T5 width, followed
    along the tokens by the T5 engine's rows; ``vector`` (pooled L ‖ G) is not steered. Each
    engine is steered in its own subspace on its own rows and channels: CLIP-L ``block`` 0
    channels ``0:wL``, CLIP-G ``block`` 0 channels ``wL:wL+wG``, T5 ``block`` 1. With the setting
    ``sd3_enable_t5`` off Forge conditions on zero rows in place of T5's: only the CLIP block is
    steered, the zero rows are left as they are."""
    t5 = sd_model.text_processing_engine_t5
    _forge_t5_engine(t5, "SD3.5")
    lo, out = 0, []
    for name, attr in (("l", "text_processing_engine_l"), ("g", "text_processing_engine_g")):
        enc = Encoder(name, getattr(sd_model, attr))
        width = _width(enc)
        enc.block, enc.channels, enc.width = 0, slice(lo, lo + width), width
        lo += width
        out.append(enc)
    if _sd3_t5_enabled():
        enc = T5Encoder("t5", t5)
        enc.block = 1
        out.append(enc)
    return out


def _forge_t5_encoders(sd_model) -> list[Encoder] | None:
    """Forge's Flux (``text_processing_engine_l`` + ``_t5``, no ``_g``): ``crossattn`` is the T5
    engine's rows (``backend/diffusion_engine/flux.py``); the CLIP-L engine only makes the pooled
    ``vector``, not steered. Forge's SD3.5 (``_l``, ``_g`` and ``_t5``): :func:`_forge_sd35_encoders`.
    Other T5 models (e.g. Chroma, T5 alone) are refused."""
    t5 = getattr(sd_model, "text_processing_engine_t5", None)
    if not _is_engine(t5):
        return None
    has_l = _is_engine(getattr(sd_model, "text_processing_engine_l", None))
    g = getattr(sd_model, "text_processing_engine_g", None)
    if has_l and g is None:
        _forge_t5_engine(t5, "Flux")
        return [T5Encoder("t5", t5)]
    if has_l and _is_engine(g):
        return _forge_sd35_encoders(sd_model)
    raise SteeringError(f"SAFREE-style steering does not support this Forge model's text encoders "
                        f"({type(sd_model).__name__}: a T5 engine without Flux's or SD3.5's CLIP engines) yet")


def find_encoders(sd_model) -> list[Encoder]:
    """The loaded model's text encoders, in the order their rows are concatenated."""
    t5 = _forge_t5_encoders(sd_model)
    if t5 is not None:
        return t5
    for attrs in (("text_processing_engine_l", "text_processing_engine_g"), ("text_processing_engine_g",),
                  ("text_processing_engine",)):      # Forge: SDXL, SDXL refiner, SD1/SD2
        engines = [getattr(sd_model, a, None) for a in attrs]
        if all(_is_engine(e) for e in engines):
            return [Encoder(a.replace("text_processing_engine", "te").strip("_") or "te", e)
                    for a, e in zip(attrs, engines)]
    conditioner = getattr(sd_model, "conditioner", None)
    if conditioner is not None and hasattr(conditioner, "embedders"):   # A1111 SDXL
        out = []
        for i, emb in enumerate(conditioner.embedders):
            if _is_engine(emb):
                out.append(Encoder(f"te{len(out) + 1}", emb))
            elif "txt" in (getattr(emb, "input_key", None), getattr(getattr(emb, "wrapped", None), "input_key", None)):
                raise SteeringError(f"SAFREE-style steering does not support the text encoder {type(emb).__name__} "
                                    f"(conditioner.embedders[{i}]) yet")
        if out:
            return out
    csm = getattr(sd_model, "cond_stage_model", None)
    if _is_engine(csm):                                   # A1111 SD1 / SD2 (hijacked)
        return [Encoder("te", csm)]
    wrapped = getattr(csm, "wrapped", csm)
    transformer, tokenizer = getattr(wrapped, "transformer", None), getattr(wrapped, "tokenizer", None)
    if transformer is not None and tokenizer is not None and type(transformer).__name__.startswith("CLIPText"):
        return [Encoder("te", HFClipEngine(transformer, tokenizer, _clip_skip()))]
    raise SteeringError("SAFREE-style steering does not support this model's text encoder "
                        f"({type(csm).__name__ if csm is not None else type(sd_model).__name__}) yet")


def _clip_skip() -> int:
    try:
        from modules import shared  # noqa: PLC0415
        return int(getattr(shared.opts, "CLIP_stop_at_last_layers", 1) or 1)
    except Exception:  # noqa: BLE001
        return 1


def _forge_load_text_encoders(sd_model) -> None:
    """Forge keeps the text encoders off the GPU between encodes: load them as its own
    ``get_learned_conditioning`` does (before sampling, so the UNet is loaded again after)."""
    forge = getattr(sd_model, "forge_objects", None)
    if forge is None:
        return
    try:
        from backend import memory_management  # noqa: PLC0415  (Forge)
    except ImportError:
        try:
            from ldm_patched.modules import model_management as memory_management  # noqa: PLC0415  (reForge)
        except ImportError as exc:
            raise SteeringError("this webui has Forge objects but neither Forge's backend.memory_management nor "
                                "reForge's ldm_patched.modules.model_management: cannot load its text encoders "
                                "for steering") from exc
    memory_management.load_model_gpu(forge.clip.patcher)
