"""SAFREE-style prompt steering inside the webui's sampler (a1111.md §1.8, methods.md §2).

Two hooks, both documented where script.py registers them:

* ``process_batch`` (after the batch's extra networks are active, before ``p.setup_conds``
  encodes the prompts): :meth:`SteeringHook.prepare` encodes, with the webui's **own** text
  engine(s), everything SAFREE needs for every text the batch can condition on (each prompt,
  each ``AND`` sub-prompt, each prompt-editing/alternation variant, the hires prompts): the
  chunk's token ids as the webui chunks them (emphasis, ``BREAK``, textual inversion), its
  rows, and the leave-one-out pooled vectors. The concept subspace is encoded once per job.
* ``on_cfg_denoiser``: :meth:`SteeringHook.apply` identifies, for every cond row of
  ``params.text_cond``, the text it was encoded from (per-row cosine match against the
  reference encodes: emphasis only rescales rows, so it does not disturb the match), runs the
  core's :func:`safet2i.steering.steer_chunk` on the webui's own rows of each 77-token chunk
  and, for the self-validated first part of the schedule, puts a **new** tensor into
  ``params.text_cond``. The input tensor, the webui's ``cached_c``/``cached_uc`` and the
  uncond rows are never modified; a prompt without trigger tokens leaves ``params.text_cond``
  untouched (the very same object).

The self-validating window: SAFREE's t' is defined on 50 steps (steered rows for steps
0..t'); here a row is steered while ``step < fraction · total`` with ``fraction = (t'+1)/50``
and ``step/total`` the denoiser's own call counter (so img2img's shortened schedule, hires
passes and two-evaluation samplers are scaled). Several chunks or encoders (SDXL): the
largest window, as the diffusers and ComfyUI hosts do.

Text encoders: every engine that offers the webui's ``tokenize_line`` /
``encode_with_transformers`` pair: A1111's hijacked ``cond_stage_model`` (SD1 CLIP-L, SD2
OpenCLIP-H), the SDXL ``conditioner.embedders`` wrappers (CLIP-L and OpenCLIP-bigG, each on
its own channel slice of ``crossattn``; the pooled ``vector`` is left as it is), Forge's
``text_processing_engine[_l|_g]``; and a plain HF ``CLIPTextModel`` + tokenizer under
``cond_stage_model.wrapped`` (no emphasis). Any other text encoder is refused with an error
(the job's images are then blocked), never skipped silently.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from safet2i.errors import SafeT2IError
from safet2i.steering import SVF_PRESETS, concept_projector, load_concepts
from safet2i.steering.safree import MASK_TOKEN, SteerResult, first_index, steer_chunk

#: Minimum |cos| between every row of a cond row's chunk and the reference encode of a text
#: for the row to count as "encoded from that text" (fp16 vs fp32 encodes agree to ~1e-4).
MATCH = 0.99
#: sd-webui-controlnet prepends one marker row of ±1024 to every cond (hook.py).
CONTROLNET_MARK = 1024.0


class SteeringError(SafeT2IError):
    """Steering cannot run for this job; the job's images are blocked."""


# --------------------------------------------------------------------------- text engines

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
    """One text encoder of the loaded model, used exactly as the webui uses it."""

    def __init__(self, name: str, engine):
        self.name, self.engine = name, engine
        self.id_end = int(engine.id_end)
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

    def pooled(self, texts: list[str]) -> torch.Tensor:
        """The end-token rows of ``texts`` (SAFREE's pooled vectors, same encoder and layer)."""
        firsts = [self.chunks(t)[0] for t in texts]
        ids = [c[0] for c in firsts]
        rows = self.encode(ids, [c[1] for c in firsts])
        return torch.stack([rows[i, first_index(ids[i], self.id_end)] for i in range(len(ids))]).float()

    def token_text(self, token: int) -> str:
        tok = getattr(self.engine, "tokenizer", None) or getattr(getattr(self.engine, "wrapped", None), "tokenizer", None)
        try:
            if tok is not None and hasattr(tok, "convert_ids_to_tokens"):
                text = tok.convert_ids_to_tokens(int(token))
            else:
                from open_clip import tokenizer as oc  # noqa: PLC0415  (A1111's OpenCLIP engines)
                text = oc._tokenizer.decoder[int(token)]
        except Exception:  # noqa: BLE001 - a report detail only
            return f"#{int(token)}"
        return str(text).replace("</w>", "")


def find_encoders(sd_model) -> list[Encoder]:
    """The loaded model's text encoders, in the order their rows are concatenated."""
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


# --------------------------------------------------------------------------- the texts of a batch

def candidate_texts(prompts: list[str], steps: list[int]) -> list[str]:
    """Every text the webui may encode for ``prompts``: ``AND`` sub-prompts (weights removed)
    and their prompt-editing / alternation variants, through the webui's own prompt parser
    (the prompts themselves outside the webui)."""
    try:
        from modules import prompt_parser  # noqa: PLC0415
    except ImportError:
        prompt_parser = None
    split = getattr(prompt_parser, "get_multicond_prompt_list", None)
    schedules = getattr(prompt_parser, "get_learned_conditioning_prompt_schedules", None)
    flat = list(split(list(prompts))[1]) if split else list(prompts)
    if schedules is None:
        return list(dict.fromkeys(flat))
    out: list[str] = []
    for n in sorted({s for s in steps if s}) or [1]:
        for schedule in schedules(flat, n):
            out += [text for _, text in schedule]
    return list(dict.fromkeys(out))


# --------------------------------------------------------------------------- the hook

@dataclass
class ChunkPlan:
    ids: list[int]
    fixes: list
    n: int                              # prompt tokens in the chunk (rows 1..n)
    eos: int                            # row of the first end token
    ref: torch.Tensor                   # [L, d] our encode of the chunk (CPU)
    loo: torch.Tensor | None            # [n, d] end-token rows of the leave-one-out variants
    reference: SteerResult              # steer_chunk on ``ref`` (for the report)


@dataclass
class TextPlan:
    text: str
    chunks: list[list[ChunkPlan]]       # per encoder


def _progress(params) -> tuple[int, int]:
    """(model call index, expected calls) of this sampling pass."""
    den = getattr(params, "denoiser", None)
    step, total = getattr(den, "step", None), getattr(den, "total_steps", None)
    if isinstance(step, int) and isinstance(total, int) and total > 0:
        return step, total
    return int(params.sampling_step), max(1, int(params.total_sampling_steps or 1))


class SteeringHook:
    """One job's steering: concepts and settings, the per-text plans, caches and counters."""

    def __init__(self, encoders: list[Encoder], concepts: list[str], svf_name: str = "nudity", *,
                 alpha: float = 0.01, order: str = "code", self_validating: bool = True):
        if not encoders:
            raise SteeringError("no text encoder to steer")
        self.encoders, self.concepts = encoders, list(concepts)
        self.kw = dict(alpha=float(alpha), order=order, svf=SVF_PRESETS[svf_name] if self_validating else None)
        self.p_c = [concept_projector(("a1111", id(e.engine), id(self)), self.concepts, e.pooled) for e in encoders]
        self.plans: dict[str, TextPlan] = {}
        self._rows: dict[int, tuple[torch.Tensor, TextPlan]] = {}
        self._steered: dict[tuple, tuple[torch.Tensor, SteerResult, torch.Tensor]] = {}
        self.calls = self.steered_calls = 0
        self.before_encode = lambda: None

    @classmethod
    def for_model(cls, sd_model, concepts: str = "nudity", custom: str = "", **kw) -> SteeringHook:
        items, svf_name = load_concepts(concepts, custom)
        _forge_load_text_encoders(sd_model)
        hook = cls(find_encoders(sd_model), items, svf_name, **kw)
        hook.before_encode = lambda: _forge_load_text_encoders(sd_model)
        return hook

    # -- process_batch -------------------------------------------------------
    def prepare(self, texts: list[str]) -> None:
        if any(t not in self.plans for t in texts):
            self.before_encode()
        for text in texts:
            if text not in self.plans:
                self.plans[text] = self._plan(text)

    def _plan(self, text: str) -> TextPlan:
        per_encoder = []
        for e, enc in enumerate(self.encoders):
            chunks = []
            for ids, fixes in enc.chunks(text):
                length = len(ids)
                eos = first_index(ids, enc.id_end)
                n = max(0, min(eos, length) - 1)
                ref = enc.encode([ids], [fixes])[0]
                loo, res = None, SteerResult(ref)
                if n >= 2:       # the core's rule: a one-token chunk has no trigger
                    variants = []
                    for i in range(1, n + 1):
                        v = list(ids)
                        v[i] = MASK_TOKEN
                        variants.append(v)
                    loo = enc.encode(variants, [fixes] * n)[:, min(eos, length - 1)]
                    res = steer_chunk(ref, loo, self.p_c[e], n, **self.kw)
                chunks.append(ChunkPlan(ids, fixes, n, eos, ref, loo, res))
            per_encoder.append(chunks)
        return TextPlan(text, per_encoder)

    # -- on_cfg_denoiser -----------------------------------------------------
    def apply(self, params) -> bool:
        """Replace ``params.text_cond`` by a steered copy when a row is inside its window.
        Returns whether it did."""
        tc = params.text_cond
        cross = tc["crossattn"] if isinstance(tc, dict) else tc
        if not torch.is_tensor(cross) or cross.dim() != 3:
            raise SteeringError(f"unexpected text conditioning {type(tc).__name__}")
        step, total = _progress(params)
        self.calls += 1
        slices = self._slices(cross.shape[-1])
        length = len(next(iter(self.plans.values())).chunks[0][0].ids) if self.plans else 77
        offset = self._offset(cross, length)
        writes = []
        for r in range(cross.shape[0]):
            plan = self._match(r, cross[r], slices, length, offset)
            results = []
            for e, chunks in enumerate(plan.chunks):
                for k, c in enumerate(chunks):
                    if c.loo is None:
                        continue
                    a = offset + k * length
                    live = cross[r, a:a + length, slices[e]]
                    res, rows = self._steer(plan.text, e, k, live, c)
                    if res.changed:
                        results.append((res, rows, a, e))
            fraction = max((res.fraction for res, *_ in results), default=0.0)
            if fraction > 0.0 and step < fraction * total:
                writes += [(r, a, e, rows) for _, rows, a, e in results]
        if not writes:
            return False
        new = cross.clone()
        for r, a, e, rows in writes:
            new[r, a:a + length, slices[e]] = rows
        if isinstance(tc, dict):
            out = dict(tc)
            out["crossattn"] = new
            try:
                out = type(tc)(out)          # the webui's DictWithShape
            except Exception:  # noqa: BLE001
                pass
            params.text_cond = out
        else:
            params.text_cond = new
        self.steered_calls += 1
        return True

    def _slices(self, dim: int) -> list[slice]:
        if not self.plans:
            raise SteeringError("steering was not prepared for this batch")
        plan = next(iter(self.plans.values()))
        widths = [c[0].ref.shape[-1] for c in plan.chunks]
        if sum(widths) != dim:
            raise SteeringError(f"the conditioning has {dim} channels, the text encoders give {widths}")
        out, lo = [], 0
        for w in widths:
            out.append(slice(lo, lo + w))
            lo += w
        return out

    @staticmethod
    def _offset(cross: torch.Tensor, length: int) -> int:
        extra = cross.shape[1] % length
        if extra == 0:
            return 0
        if extra == 1 and bool(((cross[:, 0].abs().float() - CONTROLNET_MARK).abs() < 1e-3).all()):
            return 1     # ControlNet's marker row stays as it is
        raise SteeringError(f"the conditioning has {cross.shape[1]} tokens, not whole {length}-token chunks "
                            "(another extension changed it); steering refuses")

    def _match(self, r: int, row: torch.Tensor, slices, length: int, offset: int) -> TextPlan:
        cached = self._rows.get(r)
        if cached is not None and cached[0].shape == row.shape and torch.equal(cached[0], row):
            return cached[1]
        best, score = None, -1.0
        for plan in self.plans.values():
            s = _score(plan, row, slices, length, offset)
            if s > score:
                best, score = plan, s
        if best is None or score < MATCH:
            raise SteeringError(
                f"cond row {r} does not match any prompt of this batch (best |cos| {score:.3f}): the prompt was "
                "changed by another extension, a refiner or hires checkpoint switched models, or guidance rows were "
                "added first; steering refuses")
        self._rows[r] = (row.clone(), best)
        return best

    def _steer(self, text: str, e: int, k: int, live: torch.Tensor, c: ChunkPlan):
        key = (text, e, k)
        hit = self._steered.get(key)
        if hit is not None and hit[0].shape == live.shape and torch.equal(hit[0], live):
            return hit[1], hit[2]
        res = steer_chunk(live.detach().cpu(), c.loo, self.p_c[e], c.n, **self.kw)
        rows = res.rows.to(live.device, live.dtype)
        self._steered[key] = (live.clone(), res, rows)
        return res, rows

    # -- report --------------------------------------------------------------
    def describe(self, texts: list[str] | None = None) -> str:
        """Trigger tokens, β and t' of the texts (the reference encodes), for the infotext."""
        parts = []
        for text in texts if texts is not None else list(self.plans):
            plan = self.plans.get(text)
            if plan is None:
                continue
            for e, chunks in enumerate(plan.chunks):
                for k, c in enumerate(chunks):
                    res = c.reference
                    if not res.changed:
                        continue
                    tokens = "+".join(self.encoders[e].token_text(c.ids[t]) for t in res.triggers)
                    where = (f"{self.encoders[e].name} " if len(self.encoders) > 1 else "") + \
                            (f"chunk {k + 1} " if len(chunks) > 1 else "")
                    window = f"t' {res.t_prime}" if self.kw["svf"] is not None else "every step"
                    parts.append(f"{where}{tokens} β {res.beta:.3f} {window}")
        parts = list(dict.fromkeys(parts))
        return "; ".join(parts) if parts else "no trigger token"

    def report(self, texts: list[str] | None = None) -> str:
        return f"{self.describe(texts)} (steered {self.steered_calls} of {self.calls} model calls)"


def _score(plan: TextPlan, row: torch.Tensor, slices, length: int, offset: int) -> float:
    """Smallest |cos| between the row's chunks and the plan's reference rows (−1 if the row
    is too short for the plan)."""
    n_chunks = len(plan.chunks[0])
    if offset + n_chunks * length > row.shape[0] or any(len(c) != n_chunks for c in plan.chunks):
        return -1.0
    worst = 1.0
    for e, chunks in enumerate(plan.chunks):
        ref = torch.cat([c.ref for c in chunks]).to(row.device, torch.float32)
        live = row[offset:offset + n_chunks * length, slices[e]].float()
        cos = torch.nn.functional.cosine_similarity(live, ref, dim=-1, eps=1e-8).abs()
        worst = min(worst, float(cos.min()))
    return worst


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


__all__ = ["Encoder", "HFClipEngine", "SteeringError", "SteeringHook", "candidate_texts", "find_encoders"]
