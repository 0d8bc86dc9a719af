"""One prompt's SAFREE-style steering over any host's text encoders: the plan every host uses.

A host describes each text encoder of its model by a small adapter (:class:`TextEncoder`): how
it splits a text into fixed-length token chunks, how it encodes token ids into the rows its
conditioning is made of, its end-of-text token and how a token reads. Everything else is here,
once: the leave-one-token-out variants and how they are encoded (full length; cut after the end
token; or packed into one causal sequence, :func:`packed_encode`), the pooled end-token rows
(:func:`end_rows`), each encoder's channel slice of a concatenated conditioning
(:func:`channel_slices`), the steering of a conditioning (:meth:`SteeringPlan.steer`), the
report and the steered fraction of the schedule (:class:`Steered`). A host keeps only its step
window (when the steered rows are used: ComfyUI schedule percent, a diffusers step callback,
the A1111 denoiser's call counter) and the cache key of its concept subspace.

The leave-one-out encodes. SAFREE needs, for every prompt token ``i`` of a chunk, the end-token
row of the chunk with token ``i`` replaced by :data:`~safet2i.steering.safree.MASK_TOKEN`. CLIP
text encoders are causal: a row depends on the tokens up to it only. So an encoder that says
``accepts_short`` is given each variant cut after its end token (a short prompt's pass is several
times cheaper), and an encoder with ``encode_packed`` gets the prompt and every variant's changed
suffix as one packed sequence (:func:`packed_layout`: about half the rows again). A packed encode
is checked against the host's own rows of the prompt every time (the prompt rides along); if it
differs, the encoder is told (``packed_failed``) and full-length encodes are used from then on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..errors import SafeT2IError
from .safree import MASK_TOKEN, SVF_PRESETS, SteerResult, first_index, packed_layout, steer_chunk

log = logging.getLogger("safet2i")
#: A packed encode must reproduce the host's end-token row of the prompt to this relative tolerance.
PACKED_RTOL = 1e-4


@dataclass(frozen=True)
class Span:
    """Where a chunk's prompt is, in the rows its encoder returns for it.

    ``first``..``first + n - 1``: the prompt's tokens (each left out in turn; the only rows that
    may be steered); ``pool``: the row that stands for the whole chunk (SAFREE's pooled vector);
    ``start``: the first row the host's conditioning keeps (rows before it, e.g. Qwen-Image's chat
    template prefix, are dropped by the host: never steered, never counted)."""

    first: int
    n: int
    pool: int
    start: int = 0


class TextEncoder(Protocol):
    """What the core needs of one text encoder of a host.

    Optional attributes: ``width`` (channels of its rows; needed when several encoders share one
    conditioning), ``channels`` (its channel slice of the conditioning, where the encoders' rows
    are zero-padded: SD3's CLIP-L‖G rows padded to T5's 4096), ``block`` (encoders of the same
    block share rows, concatenated along channels; blocks follow each other along the tokens in
    increasing order: SD3's CLIP block 0, T5 block 1), ``span(ids) -> Span`` (default
    :func:`clip_span`; :func:`t5_span` for T5/umT5; causal LLMs with a chat template give their
    own), ``accepts_short`` (``encode`` takes id lists cut after the pooled row: causal encoders
    only), ``encode_packed(original, variants) -> (rows of original, last row of each variant)``
    (see :func:`packed_encode`) and ``packed_failed(difference)``.
    """

    name: str      # in reports: ComfyUI "l" / "g", A1111 "te1", diffusers "text_encoder_2"
    end_id: int    # the end-of-text token; its first row is the pooled vector

    def chunks(self, text: str) -> list[tuple[list[int], Any]]:
        """(token ids, host data) per chunk of ``text``, as the host chunks it: BOS first, the
        encoder's fixed length. The data (token weights, embedding fixes) goes back to ``encode``."""

    def encode(self, id_lists: list[list[int]], data: list[Any]) -> torch.Tensor:
        """Rows [N, L, d] of the layer the host's conditioning comes from; ``data[i]`` is the
        host data of the chunk id list ``i`` was made from."""

    def token_text(self, ids: list[int]) -> list[str]:
        """How each token reads (for reports)."""


def token_words(tokenizer, ids: list[int]) -> list[str]:
    """How CLIP BPE tokens read, without the end-of-word marker (``#id`` where ``tokenizer``
    has no ``convert_ids_to_tokens``): ``TextEncoder.token_text`` of the CLIP hosts."""
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    return [str(convert(int(i)) if convert is not None else f"#{int(i)}").replace("</w>", "") for i in ids]


def chunk_span(ids: list[int], end_id: int) -> tuple[int, int]:
    """(row of the first end token, prompt tokens n): the prompt occupies rows 1..n."""
    eos = first_index(list(ids), end_id)
    return eos, max(0, min(eos, len(ids)) - 1)


def clip_span(ids: list[int], end_id: int) -> Span:
    """CLIP: start token at row 0, the prompt in rows 1..n, pooled row = the first end token
    (the last row of a chunk without one)."""
    eos, n = chunk_span(ids, end_id)
    return Span(1, n, min(eos, len(ids) - 1))


def t5_span(ids: list[int], end_id: int) -> Span:
    """T5 / umT5 (no start token, bidirectional): the prompt in rows 0..n−1, pooled row = the
    end token ``</s>`` at row n. Every row of a bidirectional encoder sees every token; the end
    row is the one row that is no prompt token (its own input never changes when a token is left
    out), the counterpart of CLIP's end-token row. A chunk cut without an end token pools its last
    row, which is then no candidate."""
    eos = first_index(list(ids), end_id)
    if eos < len(ids):
        return Span(0, eos, eos)
    return Span(0, max(0, len(ids) - 1), len(ids) - 1)


def chat_span(ids: list[int], start: int, close_id: int, pad_id: int | None = None) -> Span:
    """A causal LLM behind a chat template whose host keeps the rows from ``start`` on (the user
    turn; Qwen-Image drops the system prefix): the prompt runs from ``start`` to the last
    ``close_id`` (``<|im_end|>``, the template's closing turn), the pooled row is the last row
    that is no trailing ``pad_id``.

    Why the last row (docs/steering.md, "Causal encoders"): in a causal encoder a token changes
    only the rows at and after it, so the one row every leave-one-out variant changes, and that
    sees the whole prompt, is the last; it is what CLIP's end-token row is (CLIP is causal too).
    The prefix rows are equal in every variant and never candidates; the closing rows after the
    prompt are kept as they are, like CLIP's end and padding rows."""
    ids = list(ids)
    last = len(ids) - 1
    while pad_id is not None and last > start and ids[last] == pad_id:
        last -= 1
    closes = [i for i in range(start, last + 1) if ids[i] == close_id]
    if not closes:
        raise SafeT2IError("SAFREE-style steering: the prompt has no closing chat-template token after the user "
                           "turn (the prompt was cut, or it does not use the model's chat template).")
    return Span(start, closes[-1] - start, last, start)


def span_of(encoder, ids: list[int]) -> Span:
    """The encoder's :class:`Span` of chunk ``ids`` (its ``span`` method, else :func:`clip_span`),
    checked."""
    fn = getattr(encoder, "span", None)
    sp = fn(list(ids)) if fn is not None else clip_span(list(ids), encoder.end_id)
    length = len(ids)
    if not (0 <= sp.start <= length and 0 <= sp.pool < length and sp.n >= 0
            and (sp.n == 0 or (sp.start <= sp.first and sp.first + sp.n <= length))):
        raise SafeT2IError(f"SAFREE-style steering: the {encoder.name} text encoder gave an invalid span {sp} "
                           f"for a chunk of {length} tokens.")
    return sp


def leave_one_out_ids(ids: list[int], n: int, first: int = 1, mask: int = MASK_TOKEN) -> list[list[int]]:
    """The chunk with token i (first..first+n−1) replaced by the mask token, one id list per i."""
    out = []
    for i in range(first, first + n):
        v = list(ids)
        v[i] = mask
        out.append(v)
    return out


def packed_encode(run, original: list[int], variants: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of ``original`` [len, d], last row of each variant [N, d]) from ONE causal pass.

    ``run(ids, positions, allowed)`` encodes one sequence with explicit position ids and a
    boolean attention mask ``allowed`` [T, T] (query row, key row) and returns its rows [T, d]:
    the one thing a host with a raw causal text transformer supplies. The layout is
    :func:`packed_layout`'s."""
    ids, positions, allowed, last = packed_layout(original, variants)
    out = run(ids, positions, allowed)
    return out[:len(original)], out[last.to(out.device)]


def leave_one_out(encoder: TextEncoder, ids: list[int], data=None, rows: torch.Tensor | None = None):
    """Pooled rows [n, d] of the chunk's leave-one-out variants (None for an empty chunk): each
    prompt token (``span.first``..) replaced in turn by the mask token (the encoder's ``mask_id``,
    default :data:`MASK_TOKEN`), the ``span.pool`` row of each variant.

    ``rows``: the host's own rows of the chunk on this encoder's channels, as its conditioning
    holds them (from ``span.start``); a packed encode is used only when they are there to check
    it against."""
    sp = span_of(encoder, ids)
    if sp.n < 1:
        return None
    n, pool, length = sp.n, sp.pool, len(ids)
    variants = leave_one_out_ids(ids, n, sp.first, getattr(encoder, "mask_id", MASK_TOKEN))
    cut = pool < length - 1
    packed = getattr(encoder, "encode_packed", None)
    if packed is not None and pool < length and rows is not None:
        prompt_rows, last = packed(list(ids[:pool + 1]), [v[:pool + 1] for v in variants])
        ref = rows[pool - sp.start].to(prompt_rows)
        if torch.allclose(prompt_rows[pool], ref, rtol=PACKED_RTOL, atol=PACKED_RTOL * max(1.0, float(ref.abs().max()))):
            return last
        encoder.packed_failed(float((prompt_rows[pool] - ref).abs().max()))
    if cut and getattr(encoder, "accepts_short", False):
        return encoder.encode([v[:pool + 1] for v in variants], [data] * n)[:, pool]
    return encoder.encode(variants, [data] * n)[:, pool]


def end_rows(encoder: TextEncoder, texts: list[str]) -> torch.Tensor:
    """SAFREE's pooled vectors [K, d]: the pooled row (``span.pool``: CLIP's and T5's first end
    token, a causal LLM's last row) of each text's first chunk, same encoder and layer as the
    conditioning (CLIP's pooler output for SD1.x)."""
    firsts = [encoder.chunks(t)[0] for t in texts]
    rows = encoder.encode([list(ids) for ids, _ in firsts], [data for _, data in firsts])
    return torch.stack([rows[i, span_of(encoder, list(ids)).pool] for i, (ids, _) in enumerate(firsts)])


def channel_slices(widths: list[int | None], dim: int, names: list[str] | None = None) -> list[slice]:
    """Each encoder's channels in a conditioning of width ``dim`` that concatenates their rows in
    order. One encoder of unknown width takes them all; otherwise the widths must add up."""
    if len(widths) == 1 and widths[0] is None:
        return [slice(0, dim)]
    if None in widths or sum(widths) != dim:
        names = names or [str(i) for i in range(len(widths))]
        raise SafeT2IError(f"SAFREE-style steering: the {'+'.join(names)} text encoder widths {list(widths)} do not "
                           f"add up to the conditioning's {dim} channels.")
    out, lo = [], 0
    for w in widths:
        out.append(slice(lo, lo + w))
        lo += w
    return out


@dataclass
class ChunkPlan:
    encoder: int                      # index in the plan's encoders
    index: int                        # chunk index in the prompt
    ids: list[int]
    n: int                            # prompt tokens (rows span.first.. of the encode)
    loo: torch.Tensor | None          # [n, d] pooled rows of the leave-one-out variants
    rows: torch.Tensor | None = None  # [L - start, d] the encoder's own rows (plans built without host rows)
    pooled: torch.Tensor | None = None  # [d] the chunk's own pooled row (one-token chunks: the trigger test)
    span: Span | None = None          # where the prompt is in the encode (CLIP: Span(1, n, eos))
    at: slice | None = None           # the chunk's rows in the conditioning

    @property
    def note(self) -> str | None:
        return "empty prompt: nothing to steer" if self.n < 1 else None

    @property
    def first(self) -> int:
        """Row of the first prompt token in the conditioning's rows of this chunk."""
        return 1 if self.span is None else self.span.first - self.span.start

    @property
    def real(self) -> int | None:
        """Rows of the chunk that β is taken over (up to and with the pooled row)."""
        return None if self.span is None else self.span.pool - self.span.start + 1

    @property
    def start(self) -> int:
        return 0 if self.span is None else self.span.start


@dataclass
class Steered:
    rows: torch.Tensor                               # the input itself when nothing changed
    results: list[tuple[ChunkPlan, SteerResult]]     # encoder by encoder, chunk by chunk

    @property
    def changed(self) -> bool:
        return any(res.changed for _, res in self.results)

    @property
    def fraction(self) -> float:
        """Share of the schedule that uses the steered rows: the largest window of any chunk."""
        return max((res.fraction for _, res in self.results if res.changed), default=0.0)


class SteeringPlan:
    """Everything SAFREE needs to steer one text's conditioning on a model's encoders.

    ``projectors[e]``: P_C of encoder ``e`` (hosts cache it: :func:`concept_projector`).
    ``rows`` [T, D]: the host's own conditioning of the text (checks packed encodes). Its layout:
    the encoders of one ``block`` (default 0) share rows and concatenate theirs along channels in
    order (each ``width`` wide, or at its own ``channels``); blocks follow each other along the
    tokens, each block its chunks in order, each chunk the rows of its encode from
    ``span.start`` on (SD1/SD2/SDXL: one block of 77-row chunks; SD3: CLIP-L‖G block, then T5).
    Without ``rows`` the plan encodes every chunk itself (``ChunkPlan.rows``, :meth:`own_rows`),
    e.g. to recognise the text's rows later.
    """

    def __init__(self, encoders: list[TextEncoder], projectors: list[torch.Tensor], text: str,
                 rows: torch.Tensor | None = None, *, alpha: float = 0.01, order: str = "code",
                 svf: tuple[float, float] | None = SVF_PRESETS["nudity"]):
        self.encoders, self.projectors, self.text = list(encoders), list(projectors), text
        self.settings = dict(alpha=alpha, order=order, svf=svf)
        chunked = [e.chunks(text) for e in self.encoders]
        spans = [[span_of(e, [int(t) for t in ids]) for ids, _ in c] for e, c in zip(self.encoders, chunked)]
        self.blocks = [getattr(e, "block", 0) for e in self.encoders]
        # Rows of each chunk in the conditioning: encoders of one block must agree on them.
        lengths = [[len(ids) - sp.start for (ids, _), sp in zip(c, s)] for c, s in zip(chunked, spans)]
        offset, self.at = 0, [None] * len(self.encoders)
        for b in sorted(set(self.blocks)):
            members = [e for e in range(len(self.encoders)) if self.blocks[e] == b]
            if any(lengths[e] != lengths[members[0]] for e in members):
                raise SafeT2IError("SAFREE-style steering: the text encoders chunk this prompt differently.")
            ats, lo = [], offset
            for n_rows in lengths[members[0]]:
                ats.append(slice(lo, lo + n_rows))
                lo += n_rows
            for e in members:
                self.at[e] = ats
            offset = lo
        self.total = offset
        self.length = lengths[0][0] if lengths[0] else 0   # rows per chunk of the first encoder
        self.widths = [getattr(e, "width", None) for e in self.encoders]
        slices = None if rows is None else self.slices(rows.shape[-1])
        self.chunks: list[list[ChunkPlan]] = []
        for e, (encoder, chunks) in enumerate(zip(self.encoders, chunked)):
            plans = []
            for k, (ids, data) in enumerate(chunks):
                ids, sp, at = [int(t) for t in ids], spans[e][k], self.at[e][k]
                host = None if rows is None else rows[at, slices[e]]
                own = encoder.encode([ids], [data])[0][sp.start:] if rows is None else None
                loo = leave_one_out(encoder, ids, data, host)
                pooled = (own if host is None else host)[sp.pool - sp.start] if sp.n == 1 else None
                plans.append(ChunkPlan(e, k, ids, sp.n, loo, own, pooled, sp, at))
            self.chunks.append(plans)
        if rows is None:
            self.widths = [c[0].rows.shape[-1] for c in self.chunks]

    def slices(self, dim: int) -> list[slice]:
        """Each encoder's channels in a conditioning of width ``dim``: its own ``channels``, else
        its block's widths concatenated in order (:func:`channel_slices`)."""
        out: list[slice | None] = [None] * len(self.encoders)
        names = [e.name for e in self.encoders]
        for b in sorted(set(self.blocks)):
            members = [e for e in range(len(self.encoders)) if self.blocks[e] == b]
            fixed = [getattr(self.encoders[e], "channels", None) for e in members]
            if all(f is not None for f in fixed):
                for e, f in zip(members, fixed):
                    width = self.widths[e]
                    if f.stop > dim or (width is not None and f.stop - f.start != width):
                        raise SafeT2IError(f"SAFREE-style steering: the {names[e]} text encoder's channels "
                                           f"{f.start}:{f.stop} do not fit the conditioning's {dim} channels.")
                    out[e] = f
            else:
                for e, s in zip(members, channel_slices([self.widths[e] for e in members], dim,
                                                        [names[e] for e in members])):
                    out[e] = s
        return out

    def dim(self) -> int:
        """Channels of the plan's own conditioning (:meth:`own_rows`)."""
        stops = [getattr(e, "channels", None) for e in self.encoders]
        per_block: dict[int, int] = {}
        for e, b in enumerate(self.blocks):
            stop = stops[e].stop if stops[e] is not None else None
            per_block[b] = max(per_block.get(b, 0), stop) if stop is not None else per_block.get(b, 0) + self.widths[e]
        return max(per_block.values())

    def own_rows(self) -> torch.Tensor:
        """The plan's own encode of the text [rows, D] (plans built without host rows); channels an
        encoder does not fill (SD3's padding) are zero."""
        dim = self.dim()
        slices = self.slices(dim)
        ref = self.chunks[0][0].rows
        out = torch.zeros(self.total, dim, dtype=ref.dtype, device=ref.device)
        for e, chunks in enumerate(self.chunks):
            for c in chunks:
                out[c.at, slices[e]] = c.rows.to(out)
        return out

    def similarity(self, rows: torch.Tensor) -> float:
        """How surely ``rows`` [≥ rows of the plan, D] are this text's conditioning: the smallest |cos|
        between a row and the plan's own encode of it, over every row and encoder (emphasis only
        rescales rows; rows that are zero in both count as equal); −1 when ``rows`` are too short."""
        ref = self.own_rows()
        if ref.shape[0] > rows.shape[0] or ref.shape[-1] != rows.shape[-1]:
            return -1.0
        live, ref = rows[:ref.shape[0]].float(), ref.to(rows.device, torch.float32)
        worst = 1.0
        for e, s in enumerate(self.slices(rows.shape[-1])):
            for c in self.chunks[e]:
                a, b = live[c.at, s], ref[c.at, s]
                cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8).abs()
                both_zero = (a.abs().amax(-1) == 0) & (b.abs().amax(-1) == 0)
                worst = min(worst, float(torch.where(both_zero, torch.ones_like(cos), cos).min()))
        return worst

    def steer(self, rows: torch.Tensor) -> Steered:
        """Steer ``rows`` [≥ rows of the plan, D] (the text's conditioning, e.g. the host's weighted
        encode) chunk by chunk on each encoder's rows and channels; rows after the plan's (and
        channels no encoder owns) are left as they are."""
        slices = self.slices(rows.shape[-1])
        if rows.shape[0] < self.total:
            raise SafeT2IError(f"SAFREE-style steering: {rows.shape[0]} conditioning rows, the prompt's encoders "
                               f"need {self.total} ({len(self.chunks[0])} chunks of {self.length} on the first).")
        out, results = rows, []
        for e, chunks in enumerate(self.chunks):
            for c in chunks:
                part = rows[c.at, slices[e]]
                res = SteerResult(part) if c.loo is None else steer_chunk(
                    part, c.loo, self.projectors[e], c.n, pooled=c.pooled, first=c.first, real=c.real,
                    **self.settings)
                if res.changed:
                    if out is rows:
                        out = rows.clone()
                    out[c.at, slices[e]] = res.rows
                results.append((c, res))
        return Steered(out, results)

    # ----------------------------------------------------------------- report
    def entries(self, steered: Steered) -> list[dict]:
        """One report entry per encoder and chunk: trigger positions, token ids and words, β, t'."""
        out = []
        for c, res in steered.results:
            ids = [c.ids[t + c.start] for t in res.triggers]
            entry = {"encoder": self.encoders[c.encoder].name, "chunk": c.index, "triggers": res.triggers,
                     "trigger_tokens": ids, "trigger_words": self.encoders[c.encoder].token_text(ids),
                     "beta": round(res.beta, 4), "t_prime": res.t_prime}
            if c.note:
                entry["note"] = c.note
            out.append(entry)
        return out

    def report(self, steered: Steered, concepts: int) -> dict:
        return {"concepts": concepts, "order": self.settings["order"], "chunks": self.entries(steered),
                "steered_fraction": round(steered.fraction, 4)}

    def summary(self, steered: Steered) -> list[str]:
        """Short parts for one line (A1111 infotext): ``[encoder ][chunk k ]tok+tok β 0.123 t' 3``."""
        parts = []
        for c, res in steered.results:
            if not res.changed:
                continue
            tokens = "+".join(self.encoders[c.encoder].token_text([c.ids[t + c.start] for t in res.triggers]))
            where = (f"{self.encoders[c.encoder].name} " if len(self.encoders) > 1 else "") + \
                    (f"chunk {c.index + 1} " if len(self.chunks[c.encoder]) > 1 else "")
            window = f"t' {res.t_prime}" if self.settings["svf"] is not None else "every step"
            parts.append(f"{where}{tokens} β {res.beta:.3f} {window}")
        return parts


def report_lines(report: dict) -> list[str]:
    """The report as a few lines of text (ComfyUI's preview)."""
    lines = [f"SAFREE-style steering: {report['concepts']} concepts, steered for {report['steered_fraction']:.0%} "
             "of the steps"]
    if "configuration" in report:
        lines.append(f"settings: {report['configuration']}")
    for c in report["chunks"]:
        if c["triggers"]:
            words = ", ".join(repr(w) for w in c["trigger_words"])
            lines.append(f"{c['encoder']} chunk {c['chunk']}: trigger tokens {words} at positions {c['triggers']}, "
                         f"β = {c['beta']}, t' = {c['t_prime']}")
        elif "note" in c:
            lines.append(f"{c['encoder']} chunk {c['chunk']}: {c['note']}")
    if not any(c["triggers"] for c in report["chunks"]):
        lines.append("no trigger token: conditioning unchanged")
    return lines


class _Callable:
    """``encode_rows(id lists) -> [N, L, d]`` as a :class:`TextEncoder` (for :func:`steer_sequence`)."""

    name = "encoder"

    def __init__(self, encode_rows, end_id: int, accepts_short: bool):
        self.encode_rows, self.end_id, self.accepts_short = encode_rows, end_id, accepts_short

    def encode(self, id_lists, data=None):
        return self.encode_rows(id_lists)


def steer_sequence(
    chunk_ids: list[list[int]],
    rows: torch.Tensor,
    encode_rows,
    p_concept: torch.Tensor,
    eos_id: int,
    truncate: bool = False,
    **kw,
) -> list[SteerResult]:
    """Steer every chunk of one prompt with a bare encoder callable (no host adapter).

    ``chunk_ids``: token ids per chunk (BOS first); ``rows`` [chunks·L, d] the prompt's
    conditioning; ``encode_rows(list of id lists) -> [N, L, d]`` encodes variants with the
    same encoder and layer (all leave-one-out variants of a chunk in one batch). ``truncate``:
    the variants are cut after the end token (only for encoders that accept short inputs).
    """
    length = rows.shape[0] // max(1, len(chunk_ids))
    encoder = _Callable(encode_rows, eos_id, truncate)
    results = []
    for c, ids in enumerate(chunk_ids):
        chunk_rows = rows[c * length:(c + 1) * length]
        loo = leave_one_out(encoder, list(ids))
        eos, n = chunk_span(list(ids), eos_id)
        if loo is None:
            results.append(SteerResult(chunk_rows))
        else:
            pooled = chunk_rows[min(eos, length - 1)] if n == 1 else None
            results.append(steer_chunk(chunk_rows, loo, p_concept, n, pooled=pooled, **kw))
    return results
