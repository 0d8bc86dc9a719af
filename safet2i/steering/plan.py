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


class TextEncoder(Protocol):
    """What the core needs of one text encoder of a host.

    Optional attributes: ``width`` (channels of its rows; needed when several encoders share one
    conditioning), ``accepts_short`` (``encode`` takes id lists cut after the end token),
    ``encode_packed(original, variants) -> (rows of original, last row of each variant)`` (see
    :func:`packed_encode`) and ``packed_failed(difference)``.
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


def leave_one_out_ids(ids: list[int], n: int) -> list[list[int]]:
    """The chunk with token i (1..n) replaced by the mask token, one id list per i."""
    out = []
    for i in range(1, n + 1):
        v = list(ids)
        v[i] = MASK_TOKEN
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
    """End-token rows [n, d] of the chunk's leave-one-out variants (None for an empty chunk).

    ``rows``: the host's own rows [L, d] of the chunk on this encoder's channels; a packed
    encode is used only when they are there to check it against."""
    eos, n = chunk_span(ids, encoder.end_id)
    if n < 1:
        return None
    variants, length = leave_one_out_ids(ids, n), len(ids)
    cut = eos < length
    packed = getattr(encoder, "encode_packed", None)
    if packed is not None and cut and rows is not None:
        prompt_rows, last = packed(list(ids[:eos + 1]), [v[:eos + 1] for v in variants])
        ref = rows[eos].to(prompt_rows)
        if torch.allclose(prompt_rows[eos], ref, rtol=PACKED_RTOL, atol=PACKED_RTOL * max(1.0, float(ref.abs().max()))):
            return last
        encoder.packed_failed(float((prompt_rows[eos] - ref).abs().max()))
    if cut and getattr(encoder, "accepts_short", False):
        return encoder.encode([v[:eos + 1] for v in variants], [data] * n)[:, eos]
    return encoder.encode(variants, [data] * n)[:, min(eos, length - 1)]


def end_rows(encoder: TextEncoder, texts: list[str]) -> torch.Tensor:
    """SAFREE's pooled vectors [K, d]: the first end-token row of each text's first chunk, same
    encoder and layer as the conditioning (CLIP's pooler output for SD1.x)."""
    firsts = [encoder.chunks(t)[0] for t in texts]
    rows = encoder.encode([list(ids) for ids, _ in firsts], [data for _, data in firsts])
    return torch.stack([rows[i, first_index(list(ids), encoder.end_id)] for i, (ids, _) in enumerate(firsts)])


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
    n: int                            # prompt tokens (rows 1..n)
    loo: torch.Tensor | None          # [n, d] end-token rows of the leave-one-out variants
    rows: torch.Tensor | None = None  # [L, d] the encoder's own rows (plans built without host rows)
    pooled: torch.Tensor | None = None  # [d] the chunk's own end-token row (one-token chunks: the trigger test)

    @property
    def note(self) -> str | None:
        return "empty prompt: nothing to steer" if self.n < 1 else None


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
    ``rows`` [chunks·L, D]: the host's own conditioning of the text (its channels concatenate
    the encoders' rows in order; it checks packed encodes). Without it the plan encodes every
    chunk itself (``ChunkPlan.rows``, :meth:`own_rows`), e.g. to recognise the text's rows later.
    """

    def __init__(self, encoders: list[TextEncoder], projectors: list[torch.Tensor], text: str,
                 rows: torch.Tensor | None = None, *, alpha: float = 0.01, order: str = "code",
                 svf: tuple[float, float] | None = SVF_PRESETS["nudity"]):
        self.encoders, self.projectors, self.text = list(encoders), list(projectors), text
        self.settings = dict(alpha=alpha, order=order, svf=svf)
        chunked = [e.chunks(text) for e in self.encoders]
        self.length = len(chunked[0][0][0])
        if any(len(c) != len(chunked[0]) or any(len(ids) != self.length for ids, _ in c) for c in chunked):
            raise SafeT2IError("SAFREE-style steering: the text encoders chunk this prompt differently.")
        self.widths = [getattr(e, "width", None) for e in self.encoders]
        slices = None if rows is None else self.slices(rows.shape[-1])
        self.chunks: list[list[ChunkPlan]] = []
        for e, (encoder, chunks) in enumerate(zip(self.encoders, chunked)):
            plans = []
            for k, (ids, data) in enumerate(chunks):
                ids = [int(t) for t in ids]
                host = None if rows is None else rows[k * self.length:(k + 1) * self.length, slices[e]]
                own = encoder.encode([ids], [data])[0] if rows is None else None
                loo = leave_one_out(encoder, ids, data, host)
                eos, n = chunk_span(ids, encoder.end_id)
                pooled = (own if host is None else host)[min(eos, self.length - 1)] if n == 1 else None
                plans.append(ChunkPlan(e, k, ids, n, loo, own, pooled))
            self.chunks.append(plans)
        if rows is None:
            self.widths = [c[0].rows.shape[-1] for c in self.chunks]

    def slices(self, dim: int) -> list[slice]:
        """Each encoder's channels in a conditioning of width ``dim``."""
        return channel_slices(self.widths, dim, [e.name for e in self.encoders])

    def own_rows(self) -> torch.Tensor:
        """The plan's own encode of the text [chunks·L, D] (plans built without host rows)."""
        return torch.cat([torch.cat([c.rows for c in chunks]) for chunks in self.chunks], dim=-1)

    def similarity(self, rows: torch.Tensor) -> float:
        """How surely ``rows`` [≥ chunks·L, D] are this text's conditioning: the smallest |cos|
        between a row and the plan's own encode of it, over every row and encoder (emphasis
        only rescales rows); −1 when ``rows`` are too short for the text."""
        ref = self.own_rows()
        if ref.shape[0] > rows.shape[0]:
            return -1.0
        live, ref = rows[:ref.shape[0]].float(), ref.to(rows.device, torch.float32)
        return min(float(torch.nn.functional.cosine_similarity(live[:, s], ref[:, s], dim=-1, eps=1e-8).abs().min())
                   for s in self.slices(rows.shape[-1]))

    def steer(self, rows: torch.Tensor) -> Steered:
        """Steer ``rows`` [≥ chunks·L, D] (the text's conditioning, e.g. the host's weighted encode)
        chunk by chunk on each encoder's channels; rows after the chunks are left as they are."""
        slices = self.slices(rows.shape[-1])
        if rows.shape[0] < len(self.chunks[0]) * self.length:
            raise SafeT2IError(f"SAFREE-style steering: {rows.shape[0]} conditioning rows, the prompt has "
                               f"{len(self.chunks[0])} chunks of {self.length}.")
        out, results = rows, []
        for e, chunks in enumerate(self.chunks):
            for c in chunks:
                span = slice(c.index * self.length, (c.index + 1) * self.length)
                part = rows[span, slices[e]]
                res = SteerResult(part) if c.loo is None else steer_chunk(part, c.loo, self.projectors[e], c.n,
                                                                          pooled=c.pooled, **self.settings)
                if res.changed:
                    if out is rows:
                        out = rows.clone()
                    out[span, slices[e]] = res.rows
                results.append((c, res))
        return Steered(out, results)

    # ----------------------------------------------------------------- report
    def entries(self, steered: Steered) -> list[dict]:
        """One report entry per encoder and chunk: trigger positions, token ids and words, β, t'."""
        out = []
        for c, res in steered.results:
            ids = [c.ids[t] for t in res.triggers]
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
            tokens = "+".join(self.encoders[c.encoder].token_text([c.ids[t] for t in res.triggers]))
            where = (f"{self.encoders[c.encoder].name} " if len(self.encoders) > 1 else "") + \
                    (f"chunk {c.index + 1} " if len(self.chunks[0]) > 1 else "")
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
