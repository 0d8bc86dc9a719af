"""The steering plans of every text a batch may condition on, for hosts that meet only the
conditioning rows at sampling time (the A1111/Forge denoiser callback).

Such a host plans its texts before sampling (:meth:`PlanBook.prepare`: each plan on its own
encode, which is also what the report shows) and, at every model call, asks which plan a row of
the live conditioning belongs to (:meth:`PlanBook.plan_of`) and for that plan's steering of the
live rows (:meth:`PlanBook.steer`, computed once per distinct content). A row is bound to a plan
either through the host's own bookkeeping (the tensor the row was stacked from and, where the
host keeps it, its text), checked once per such tensor, or, without bookkeeping, by content:
the plan whose own encode the rows match (:meth:`SteeringPlan.similarity` ≥ :data:`MATCH`),
once per distinct row. A row that matches no plan is refused.
"""

from __future__ import annotations

import torch

from ..errors import SafeT2IError
from .plan import Steered, SteeringPlan, TextEncoder
from .safree import SVF_PRESETS

#: Minimum |cos| between every row of a text's chunks and its own encode for rows to count as
#: "encoded from that text" (fp16 and fp32 encodes agree to ~1e-4; emphasis only rescales rows).
MATCH = 0.99


class PlanBook:
    """Plans by text (``plans``), their reports (``reference``) and the row bindings of one job.

    ``projectors[e]``: P_C of ``encoders[e]``; ``kw``: the plans' ``alpha``, ``order`` and
    ``svf`` (read when a text is prepared)."""

    def __init__(self, encoders: list[TextEncoder], projectors: list[torch.Tensor], *, alpha: float = 0.01,
                 order: str = "code", svf: tuple[float, float] | None = SVF_PRESETS["nudity"]):
        if not encoders:
            raise SafeT2IError("no text encoder to steer")
        self.encoders, self.p_c = list(encoders), list(projectors)
        self.kw = dict(alpha=float(alpha), order=order, svf=svf)
        self.plans: dict[str, SteeringPlan] = {}
        self.reference: dict[str, Steered] = {}
        self._bound: dict[int, tuple[torch.Tensor, SteeringPlan]] = {}    # id(host tensor) -> (tensor, plan)
        self._rows: dict[object, tuple[torch.Tensor, SteeringPlan]] = {}   # row key -> (row content, plan)
        self._steered: dict[str, tuple[torch.Tensor, Steered]] = {}

    def missing(self, texts: list[str]) -> bool:
        return any(t not in self.plans for t in texts)

    def prepare(self, texts: list[str]) -> None:
        for text in texts:
            if text not in self.plans:
                plan = self.plans[text] = SteeringPlan(self.encoders, self.p_c, text, **self.kw)
                self.reference[text] = plan.steer(plan.own_rows())

    def first(self) -> SteeringPlan:
        if not self.plans:
            raise SafeT2IError("steering was not prepared for this batch")
        return next(iter(self.plans.values()))

    def plan_of(self, key, row: torch.Tensor, offset: int = 0, source: torch.Tensor | None = None,
                text: str | None = None) -> SteeringPlan:
        """The plan of the conditioning row ``row`` [T, D] (the text's rows start at ``offset``).

        ``source``: the host tensor ``row`` was stacked from (bound to a plan once per tensor,
        used only while ``row`` starts with it); ``text``: its text when the host names it.
        Otherwise the binding is kept per ``key`` (e.g. the row index) and distinct content."""
        fits = source is not None and source.shape[0] <= row.shape[0]
        if fits and torch.equal(row[:source.shape[0]], source.to(row)):
            hit = self._bound.get(id(source))
            if hit is None or hit[0] is not source:
                hit = self._bound[id(source)] = (source, self.recognise(key, source[offset:], text))
            return hit[1]
        cached = self._rows.get(key)
        if cached is not None and cached[0].shape == row.shape and torch.equal(cached[0], row):
            return cached[1]
        plan = self.recognise(key, row[offset:])
        self._rows[key] = (row.clone(), plan)
        return plan

    def recognise(self, key, rows: torch.Tensor, text: str | None = None) -> SteeringPlan:
        """The plan whose own encode ``rows`` match (only ``text``'s when given and planned)."""
        candidates = [self.plans[text]] if text in self.plans else list(self.plans.values())
        if not candidates:
            raise SafeT2IError("steering was not prepared for this batch")
        score, best = max(((plan.similarity(rows), plan) for plan in candidates), key=lambda x: x[0])
        if score < MATCH:
            raise SafeT2IError(
                f"cond row {key} does not match any prompt of this batch (best |cos| {score:.3f}): the prompt was "
                "changed by another extension, a refiner or hires checkpoint switched models, or guidance rows were "
                "added first; steering refuses")
        return best

    def steer(self, plan: SteeringPlan, live: torch.Tensor) -> Steered:
        """``plan``'s steering of ``live`` (on its device and dtype), once per distinct content."""
        hit = self._steered.get(plan.text)
        if hit is not None and hit[0].shape == live.shape and torch.equal(hit[0], live):
            return hit[1]
        out = plan.steer(live.detach().cpu())
        out = Steered(out.rows.to(live.device, live.dtype), out.results)
        self._steered[plan.text] = (live.clone(), out)
        return out

    def describe(self, texts: list[str] | None = None) -> str:
        """Trigger tokens, β and t' of the texts (their own encodes), in one line."""
        parts = [part for text in (texts if texts is not None else list(self.plans)) if text in self.plans
                 for part in self.plans[text].summary(self.reference[text])]
        parts = list(dict.fromkeys(parts))
        return "; ".join(parts) if parts else "no trigger token"
