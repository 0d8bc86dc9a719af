"""SAFREE-style prompt steering inside the webui's sampler (docs/a1111-steering-lora.md).

The steering is the core's :class:`safet2i.steering.SteeringPlan` over the webui's own text
engines (``text_engines.py``). Two hooks, both registered by script.py:

* ``process_batch`` (extra networks active, ``p.setup_conds`` not yet run):
  :meth:`SteeringHook.prepare` plans every text the batch can condition on
  (:func:`candidate_texts`).
* ``on_cfg_denoiser``: :meth:`SteeringHook.apply` finds which text each cond row of
  ``params.text_cond`` belongs to (:func:`webui_rows`), steers **the webui's rows** and, inside
  the self-validated window (``step < (t'+1)/50 · total`` by the denoiser's own call counter),
  assigns a **new** tensor to ``params.text_cond``. The input, ``cached_c``/``cached_uc`` and
  the uncond rows are never written; without trigger tokens ``params.text_cond`` is left as
  the very same object.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import weakref

import torch

from safet2i.errors import SafeT2IError
from safet2i.steering import SVF_PRESETS, concept_projector, end_rows, load_concepts
from safet2i.steering.book import PlanBook

from .text_engines import Encoder, HFClipEngine, SteeringError, _forge_load_text_encoders, find_encoders

#: sd-webui-controlnet prepends one marker row of ±1024 to every cond (hook.py).
CONTROLNET_MARK = 1024.0


@contextlib.contextmanager
def _refusing():
    """The core's refusals as this layer's (the job's images are blocked)."""
    try:
        yield
    except SteeringError:
        raise
    except SafeT2IError as exc:
        raise SteeringError(str(exc)) from exc


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


# --------------------------------------------------------------------------- the webui's bookkeeping

def _progress(params) -> tuple[int, int]:
    """(model call index, expected calls) of this sampling pass."""
    den = getattr(params, "denoiser", None)
    step, total = getattr(den, "step", None), getattr(den, "total_steps", None)
    if isinstance(step, int) and isinstance(total, int) and total > 0:
        return step, total
    return int(params.sampling_step), max(1, int(params.total_sampling_steps or 1))


def webui_rows(params, n_rows: int) -> list[tuple[str | None, torch.Tensor]] | None:
    """For every row of ``params.text_cond``: (its text, when the webui's bookkeeping names it;
    the webui's tensor it was stacked from), or None without that bookkeeping (A1111 <= 1.7).

    ``reconstruct_multicond_batch`` stacks the rows from the sampler's conditioning
    (``sampler_extra_args['cond']``, also after a refiner switch) at the denoiser's ``step``:
    images in order, ``AND`` parts in order, each part's schedule entry with ``step <=
    end_at_step``; a part's text is ``get_multicond_prompt_list``'s of ``p.prompts``
    (``p.hr_prompts`` in the hires pass). The text of one entry of a prompt-editing schedule is
    not kept (``ScheduledPromptConditioning`` is ``(end_at_step, cond)``): None there."""
    den = getattr(params, "denoiser", None)
    cond = (getattr(getattr(den, "sampler", None), "sampler_extra_args", None) or {}).get("cond")
    step, p = getattr(den, "step", None), getattr(den, "p", None)
    if not hasattr(cond, "batch") or not isinstance(step, int):
        return None
    try:
        from modules import prompt_parser  # noqa: PLC0415
        prompts = p.hr_prompts if getattr(p, "is_hr_pass", False) else p.prompts
        indexes, flat, _ = prompt_parser.get_multicond_prompt_list(list(prompts))
    except Exception:  # noqa: BLE001 - no texts from the bookkeeping: rows are recognised by content
        indexes = flat = None
    out = []
    for b, parts in enumerate(cond.batch):
        for j, part in enumerate(parts):
            k = next((i for i, s in enumerate(part.schedules) if step <= s.end_at_step), 0)
            c = part.schedules[k].cond
            single = len(part.schedules) == 1 and indexes is not None and b < len(indexes) and j < len(indexes[b])
            out.append((flat[indexes[b][j][0]] if single else None, c["crossattn"] if isinstance(c, dict) else c))
    return out if len(out) == n_rows else None


# --------------------------------------------------------------------------- the hook

_JOBS = itertools.count()


def _weakrefable(obj):
    """``obj`` when the cache can hold a weak reference to it, else None (key-only caching)."""
    try:
        weakref.ref(obj)
    except TypeError:
        return None
    return obj


class SteeringHook(PlanBook):
    """One job's steering: the core's plans of the batch's texts (:class:`PlanBook`), the
    webui's encoders and the call counters."""

    def __init__(self, encoders: list[Encoder], concepts: list[str], svf_name: str = "nudity", *,
                 alpha: float = 0.01, order: str = "code", self_validating: bool = True):
        if not encoders:
            raise SteeringError("no text encoder to steer")
        self.concepts = list(concepts)
        # One subspace per job and encoder: a job number that is never reused (``id(self)`` is, once
        # a hook is collected, and would hand a later job an earlier model's subspace); the engine
        # is held weakly by the cache, so an engine object that took over a collected one's id misses.
        job = next(_JOBS)
        p_c = [concept_projector(("a1111", id(e.engine), job), self.concepts, functools.partial(end_rows, e),
                                 owner=_weakrefable(e.engine)) for e in encoders]
        super().__init__(encoders, p_c, alpha=alpha, order=order,
                         svf=SVF_PRESETS[svf_name] if self_validating else None)
        self.calls = self.steered_calls = 0
        self.before_encode = lambda: None
        # Encoders on their own channels (Forge's SD3.5: CLIP-L‖G block, then T5 rows): the text's
        # rows start at row 0 and run over the blocks laid end to end (``SteeringPlan.total``), not
        # whole chunks of one length; rows after them (padding, T5's zero rows) are left alone.
        self.blocks = any(getattr(e, "channels", None) is not None or getattr(e, "block", 0) for e in encoders)

    @classmethod
    def for_model(cls, sd_model, concepts: str = "nudity", custom: str = "", **kw) -> SteeringHook:
        items, svf_name = load_concepts(concepts, custom)
        _forge_load_text_encoders(sd_model)
        hook = cls(find_encoders(sd_model), items, svf_name, **kw)
        hook.before_encode = lambda: _forge_load_text_encoders(sd_model)
        return hook

    def prepare(self, texts: list[str]) -> None:
        """process_batch: plan every text the batch can condition on."""
        if self.missing(texts):
            self.before_encode()
        with _refusing():
            super().prepare(texts)

    def apply(self, params) -> bool:
        """on_cfg_denoiser: replace ``params.text_cond`` by a steered copy when a row is inside
        its window. Returns whether it did."""
        tc = params.text_cond
        cross = tc["crossattn"] if isinstance(tc, dict) else tc
        if not torch.is_tensor(cross) or cross.dim() != 3:
            raise SteeringError(f"unexpected text conditioning {type(tc).__name__}")
        step, total = _progress(params)
        self.calls += 1
        with _refusing():
            first = self.first()
            # Encoders on their own channels: the channels after the last one an encoder owns are
            # zero padding (SD3.5 with T5 off: CLIP-L‖G padded to 4096); they are never read or written.
            width = first.dim() if self.blocks else cross.shape[-1]
            if width > cross.shape[-1]:
                raise SteeringError(f"the conditioning has {cross.shape[-1]} channels, the text encoders need {width}; "
                                    "steering refuses")
            view = cross[..., :width]
            first.slices(width)
            offset = 0 if self.blocks else self._offset(cross, first.length)
            bookkeeping = webui_rows(params, cross.shape[0])
            writes = []
            for r in range(cross.shape[0]):
                text, source = bookkeeping[r] if bookkeeping else (None, None)
                if source is not None and width < cross.shape[-1]:
                    source = source[..., :width]
                plan = self.plan_of(r, view[r], offset, source, text)
                out = self.steer(plan, view[r, offset:offset + plan.total])
                if out.fraction > 0.0 and step < out.fraction * total:
                    writes.append((r, slice(offset, offset + out.rows.shape[0]), out.rows))
        if not writes:
            return False
        new = cross.clone()
        for r, span, rows in writes:
            new[r, span, :width] = rows
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

    @staticmethod
    def _offset(cross: torch.Tensor, length: int) -> int:
        extra = cross.shape[1] % length
        if extra == 0:
            return 0
        if extra == 1 and bool(((cross[:, 0].abs().float() - CONTROLNET_MARK).abs() < 1e-3).all()):
            return 1     # ControlNet's marker row stays as it is
        raise SteeringError(f"the conditioning has {cross.shape[1]} tokens, not whole {length}-token chunks "
                            "(another extension changed it); steering refuses")

    def report(self, texts: list[str] | None = None) -> str:
        return f"{self.describe(texts)} (steered {self.steered_calls} of {self.calls} model calls)"


__all__ = ["Encoder", "HFClipEngine", "SteeringError", "SteeringHook", "candidate_texts", "find_encoders", "webui_rows"]
