"""The guidance contract: what a method asks of a host, and one run state for all hosts.

As diffusers' guiders do, a method declares what it needs and is driven through two calls
per model evaluation; hosts (ComfyUI nodes, the A1111/Forge extension, the diffusers adapter)
only gather predictions and put the result back::

    method.needs                                 # predictions, extra conditionings, attention
    method.set_state(step, total, sigma, run)    # the core decides whether a new run started
    d_p = method.direction(ε_∅, ε_p, ε_c[, attention])
    ε̂ = ε_∅ + s_g · d_p                           # the host's own CFG formula, fed ε_∅ + d_p

Every prediction is ε (noise) of the host's rows, converted with :mod:`.spaces`; the host's
CFG scale s_g is applied by the host. A method is a pure function on tensors plus a small
state object derived from :class:`RunState` (reset at the start of each run).

**Runs.** ``set_state`` starts a new run when the host's ``run`` key changes or its ``step``
goes back; the same step twice is one run (second-order samplers evaluate the model twice per
step). What the hosts pass:

* ComfyUI: ``run`` = a token per sampling run (``WrappersMP.OUTER_SAMPLE``), ``step`` = the
  index of σ in the run's schedule, ``total`` = the schedule's steps;
* A1111: ``run`` = (the CFG denoiser, its step count), ``step`` = the webui's sampling step,
  ``total`` = the model calls of the pass;
* Forge/reForge: ``run`` = the pass's UNet patch (one per pass), ``total`` = the pass's calls;
* diffusers: ``run`` = the scheduler's timestep schedule (a new one per pipeline call),
  ``step`` = −t (timesteps decrease within a run), ``total`` = the schedule's length.

Warm-ups and ``start``/``stop`` count model evaluations (``state.step``) against ``total``.

**Translation invariance.** A method may depend on its ε inputs only through their differences
(SLD, SP-Guard-style and Detect-and-Guide-style do), so hosts may pass every ε less one common
offset per image: flow hosts pass a(σ)·pred instead of a(σ)·pred + b(x, σ)
(:func:`.spaces.eps_offset_free`), which keeps full float precision near σ = 1.

**Inert methods.** ``inert`` is True when a method's configuration cannot change anything
(SLD with s_S ≤ 1, zero strength); hosts may then skip evaluating the concept, so zero strength
is plain sampling bit for bit.

**Corrections.** Hosts put the result back as the correction c = (ε_p − ε_∅) − d_p of the
conditional prediction (:meth:`Guidance.correction`, mapped into the host's space by
:func:`.spaces.correct_prediction`), so a method that changes nothing leaves the host's
predictions bit for bit.

**Concept branch** (guidance-distilled models run at cfg 1, e.g. Flux.1 dev/schnell: no ε_∅ is
evaluated). A method that supports it (``supports_concept_branch``) is evaluated with the
conditional prediction as its reference, ε_∅ := ε_p, and the host's result becomes
ε̂ = ε_p − s_b · c (:meth:`Guidance.branch_correction`). For SLD that is
ε̂ = ε_p − s_b · (μ ⊙ (ε_S − ε_p) + s_m · ν) with the gate μ unchanged (it only reads
ε_p − ε_S): the safety concept is measured against the conditional prediction, and s_b takes
the place of the CFG scale s_g that multiplies SLD's γ in ε̂ = ε_∅ + s_g · (d_p − γ). Cost: one
extra model evaluation per step (the concept), i.e. 2× a cfg-1 run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Needs:
    """What a method asks of its host each model evaluation."""

    #: ε predictions ``direction`` takes, in order (after the host's CFG pair).
    predictions: tuple[str, ...] = ("uncond", "cond", "concept")
    #: Conditionings the host evaluates besides [cond, uncond] (here: the safety concept).
    extra_conditionings: int = 1
    #: The concept tokens' attention map in [0, 1] (``direction``'s 4th argument): [B, H, W] for
    #: images, [B, F, H, W] for video latents [B, C, F, H, W].
    attention: bool = False


class RunState:
    """Per-run state every method has: ``step`` counts this run's model evaluations,
    ``history`` has one entry per evaluation, ``last_mask`` [B, H, W] is the last guided region."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self.total: int | None = None
        self.sigma = None
        self.history: list[dict] = []
        self.last_mask: torch.Tensor | None = None

    def advance(self, entry: dict, mask: torch.Tensor | None) -> None:
        """Record this evaluation (``entry`` gets the step index) and move to the next."""
        self.history.append({"step": self.step, **entry})
        self.last_mask = mask
        self.step += 1


class Guidance:
    """Base of the guidance methods: the run bookkeeping of the contract, ``start``/``stop``
    (fractions of the run's evaluations outside which the method is not called), and the
    common report. Subclasses set ``name``, ``needs``, ``new_state(total)`` and ``compute``."""

    name = "guidance"
    needs = Needs()
    #: Whether the method has a concept-branch form (module docstring): it must not need ε_∅
    #: beyond its role as the reference of the concept (SP-Guard's harmfulness does).
    supports_concept_branch = True
    #: Whether the method acts element by element on ε (no channels, pixels or neighbourhoods),
    #: so it runs on latents of any layout, e.g. packed tokens a host cannot unpack.
    elementwise = False

    @property
    def inert(self) -> bool:
        """True when this configuration never changes a prediction (module docstring)."""
        return False

    def __init__(self, start: float = 0.0, stop: float = 1.0):
        if not 0.0 <= start <= stop <= 1.0:
            raise ValueError(f"guidance start/stop must satisfy 0 <= start <= stop <= 1, not {start}/{stop}")
        self.start, self.stop = float(start), float(stop)
        self.runs = 0
        self._run = self._last_step = None
        self._started = False
        self.state = self.new_state(None)

    # -- the contract ----------------------------------------------------------
    def set_state(self, step: int | float | None = None, total: int | None = None, sigma=None, run=None) -> bool:
        """Tell the method where the host is; returns True when this starts a new run (the
        state was reset). ``step`` may be None when ``run`` alone marks runs."""
        new = (not self._started or run != self._run
               or (step is not None and self._last_step is not None and step < self._last_step))
        if new:
            self.reset(total)
            self._started, self._run = True, run
            self.runs += 1
        self._last_step = step
        self.state.sigma = sigma
        return new

    def reset(self, total: int | None = None) -> None:
        """Start a new run of ``total`` model evaluations (None: unknown)."""
        self.state = self.new_state(total)
        self.state.total = total

    def direction(self, eps_uncond, eps_cond, eps_concept, attention=None) -> torch.Tensor:
        """The guided CFG direction d_p for this evaluation (advances the state)."""
        if not self.active:
            d_p = eps_cond - eps_uncond
            self.state.advance({"applied": False, "reason": "outside start/stop"}, torch.zeros_like(d_p[:, 0]))
            return d_p
        return self.compute(eps_uncond, eps_cond, eps_concept, attention)

    def correction(self, eps_uncond, eps_cond, eps_concept, attention=None) -> torch.Tensor:
        """c = (ε_p − ε_∅) − d_p for this evaluation (advances the state): what the host takes
        off its conditional prediction (in ε) so that its CFG formula gives ε_∅ + s_g · d_p."""
        plain = eps_cond - eps_uncond
        return plain - self.direction(eps_uncond, eps_cond, eps_concept, attention)

    def branch_correction(self, eps_cond, eps_concept, scale: float, attention=None) -> torch.Tensor:
        """s_b · c with ε_∅ := ε_p (the concept-branch form, module docstring; advances the state)."""
        if not self.supports_concept_branch:
            raise ValueError(f"{self.name} has no concept-branch form")
        return scale * self.correction(eps_cond, eps_cond, eps_concept, attention)

    @property
    def active(self) -> bool:
        total = self.state.total
        if not total or (self.start == 0.0 and self.stop == 1.0):
            return True
        return self.start <= self.state.step / total < self.stop

    # -- for subclasses --------------------------------------------------------
    def new_state(self, total: int | None) -> RunState:
        return RunState()

    def compute(self, eps_uncond, eps_cond, eps_concept, attention) -> torch.Tensor:
        raise NotImplementedError

    # -- reporting -------------------------------------------------------------
    @property
    def history(self) -> list[dict]:
        return self.state.history

    @property
    def last_mask(self) -> torch.Tensor | None:
        return self.state.last_mask

    @property
    def needs_attention(self) -> bool:
        return self.needs.attention

    def report(self) -> dict:
        return {"method": self.name, "runs": self.runs, "steps": self.history}
