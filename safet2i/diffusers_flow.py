"""diffusers adapter, flow-matching part: safety guidance inside the transformer pipelines of
rectified-flow models (``StableDiffusion3Pipeline``, ``FluxPipeline``, ``QwenImagePipeline``,
``WanPipeline``, and pipelines built like them). Entered through
:func:`safet2i.diffusers_adapter.safety_guidance`, which dispatches here for pipelines with a
``transformer`` instead of a ``unet``.

The transformer predicts the velocity v = ε − x0 of x = (1 − σ)·x0 + σ·ε (space ``flow_v`` of
:mod:`safet2i.guidance.spaces`); the method works on ε = x + (1 − σ)·v (passed less the common
offset x, :func:`~safet2i.guidance.spaces.eps_offset_free`) and its correction c goes back as
v_p − c/(1 − σ). A method whose configuration cannot change anything (``inert``: zero strength)
adds no concept evaluation, so the pipeline runs exactly as without SafeT2I. How the pipelines evaluate CFG decides where that happens:

* **one batched call** ``[uncond; cond]`` (SD3): the concept is appended to the batch (3·B rows)
  and the call returns ``[v_∅; v_p − c/(1 − σ)]``;
* **separate calls** (Flux and Qwen-Image with true CFG, Wan): the first call of a step is the
  prompt; the concept is batched into it (or evaluated right after it when its text sequence has
  another length). The second call at the same timestep is the negative: when it returns, the
  prompt's output of the first call — the pipeline's own tensor, not yet combined — is corrected
  in place, so the pipeline's CFG formula (Qwen-Image's norm rescale included) gets the guided
  prompt prediction;
* **no negative** (guidance-distilled Flux at cfg 1, or any pipeline run without CFG): the
  concept-branch form (``branch_scale`` > 0, :mod:`safet2i.guidance.contract`) corrects the
  prompt's output just before ``scheduler.step`` consumes it; without it the step stops with an
  error instead of running unguided.

``scheduler.step`` is wrapped to check, every step, that the guidance ran; the scheduler's own
timesteps and sigmas give each call's σ and step index. On exit the transformer(s) and the
scheduler are restored, also after an error. Detect-and-Guide-style guidance needs cross-attention
maps, which these joint-attention transformers do not expose to the adapter: refused.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import SafeT2IError
from .guidance.spaces import correct_prediction, eps_offset_free

SPACE = "flow_v"


def is_flow_pipeline(pipe) -> bool:
    return getattr(pipe, "transformer", None) is not None and getattr(pipe, "unet", None) is None


def _device(pipe):
    return pipe._execution_device if hasattr(pipe, "_execution_device") else pipe.device


def encode_concept_kwargs(pipe, concept: str, **encode_kwargs) -> dict:
    """The transformer keyword arguments that carry the text, for ``concept`` encoded by the
    pipeline's own ``encode_prompt`` (batch 1; ``encode_kwargs`` such as ``max_sequence_length``
    are passed on: the same length as the prompt's lets the concept share its transformer call)."""
    name = type(pipe).__name__
    device = _device(pipe)
    with torch.no_grad():
        if "StableDiffusion3" in name:
            embeds, _, pooled, _ = pipe.encode_prompt(concept, concept, concept, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False, **encode_kwargs)
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if "Flux" in name:
            embeds, pooled, _ = pipe.encode_prompt(concept, concept, device=device, num_images_per_prompt=1,
                                                   **encode_kwargs)
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if "QwenImage" in name:
            embeds, mask = pipe.encode_prompt(concept, device=device, num_images_per_prompt=1, **encode_kwargs)
            return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}
        if "Wan" in name:
            embeds, _ = pipe.encode_prompt(concept, do_classifier_free_guidance=False, num_videos_per_prompt=1,
                                           device=device, **encode_kwargs)
            return {"encoder_hidden_states": embeds}
    raise SafeT2IError(f"Safety guidance does not know how {name} encodes text; pass concept_kwargs (the "
                       "transformer keyword arguments of the concept's text, batch 1).")


class _Step:
    """One sampling step: where the prompt's output lives until the step is corrected."""

    def __init__(self, index: int, sigma: float, x: torch.Tensor):
        self.index, self.sigma, self.x = index, sigma, x
        self.cond_out: torch.Tensor | None = None
        self.concept_out: torch.Tensor | None = None
        self.calls = 0
        self.applied = False


class FlowGuidance:
    """The glue between a flow pipeline and a guidance method (module docstring)."""

    def __init__(self, pipe, method, concept_kwargs: dict, branch_scale: float):
        self.pipe, self.method = pipe, method
        # Keys the concept leaves None (e.g. Qwen-Image's mask when no row is padding) are passed as None.
        self.concept = {k: v for k, v in concept_kwargs.items() if v is not None}
        self.concept_none = [k for k, v in concept_kwargs.items() if v is None]
        self.branch_scale = float(branch_scale)
        self.step: _Step | None = None
        self.run = None
        # SD3 evaluates CFG as one [uncond; cond] batch; Flux, Qwen-Image and Wan call twice.
        self.batched_cfg = type(pipe).__name__.startswith("StableDiffusion3")

    # -- where in the schedule ---------------------------------------------------
    def locate(self, timestep) -> tuple[int, float]:
        sched = self.pipe.scheduler
        steps = getattr(sched, "timesteps", None)
        sigmas = getattr(sched, "sigmas", None)
        if steps is None or sigmas is None:
            raise SafeT2IError("Safety guidance on a flow pipeline needs a scheduler with timesteps and sigmas "
                               "(FlowMatchEulerDiscreteScheduler, UniPC with flow sigmas).")
        current = getattr(self.pipe, "_current_timestep", None)
        t = current if current is not None else timestep
        t = float(torch.as_tensor(t).detach().float().flatten().max())
        ts = steps.detach().double().cpu()
        i = int((ts - t).abs().argmin())
        if abs(float(ts[i]) - t) > 1e-3 * max(1.0, abs(t)):
            raise SafeT2IError(f"Safety guidance: the transformer was called at timestep {t}, which is not in the "
                               "scheduler's schedule, so its σ is unknown. The image is not produced unguided.")
        if self.run is None or self.run.schedule is not steps:
            self.run = _Run(steps)
        sigma = float(sigmas[i])
        self.method.set_state(i, len(ts), sigma, run=self.run)
        return i, sigma

    # -- the transformer ----------------------------------------------------------
    def forward(self, original, args, kwargs):
        kwargs = dict(kwargs)
        if args:
            kwargs["hidden_states"], args = args[0], args[1:]
        if args:
            raise SafeT2IError("Safety guidance expects the pipeline to call its transformer with keyword arguments.")
        if kwargs.get("skip_layers") is not None:   # SD3's skip-layer guidance: an extra, unguided term
            return original(**kwargs)
        x = kwargs["hidden_states"]
        index, sigma = self.locate(kwargs.get("timestep"))
        st = self.step
        if st is not None and st.index == index and st.cond_out is not None and not st.applied:
            st.calls += 1
            out = original(**kwargs)   # the negative prompt at the same step
            self._apply(st, eps_offset_free(_first(out), sigma, SPACE), scale=None)
            return out
        if st is not None and not st.applied and st.cond_out is not None:
            raise SafeT2IError("Safety guidance: a sampling step ended without its guidance (the scheduler was "
                               "bypassed). The image is not produced unguided.")
        st = self.step = _Step(index, sigma, x)
        if self.method.inert:   # nothing can change: no concept, plain sampling bit for bit
            st.applied = True
            return original(**kwargs)
        batch = x.shape[0]
        cfg_batch = self.batched_cfg and bool(getattr(self.pipe, "do_classifier_free_guidance", False))
        if cfg_batch and batch % 2:
            raise SafeT2IError("Safety guidance: SD3's CFG batch has an odd number of rows.")
        if cfg_batch:   # [uncond; cond] in one call (SD3)
            b = batch // 2
            joint = self._with_concept(kwargs, rows=slice(b, None))
            if joint is not None:
                out = original(**joint)
                pred = _first(out)
            else:   # the concept's text does not stack with the call's: its own call on the cond half
                out = original(**kwargs)
                concept = original(**self._concept_alone(_rows(kwargs, slice(b, None)), b))
                pred = torch.cat([_first(out), _first(concept)])
            eu, ec, es = (eps_offset_free(pred[k * b:(k + 1) * b], sigma, SPACE) for k in range(3))
            c = self.method.correction(eu, ec, es)
            guided = torch.cat([pred[:b], correct_prediction(pred[b:2 * b], c, sigma, SPACE)])
            st.applied = True
            return _replace_first(out, guided)
        joint = self._with_concept(kwargs, rows=slice(0, None))
        if joint is not None:
            out = original(**joint)
            pred = _first(out)
            st.cond_out, st.concept_out = pred[:batch], pred[batch:]
            return _replace_first(out, st.cond_out)
        out = original(**kwargs)
        st.cond_out = _first(out)
        st.concept_out = _first(original(**self._concept_alone(kwargs, batch)))
        return out

    def _with_concept(self, kwargs, rows: slice):
        """kwargs with the concept appended to the batch (its rows copy ``rows`` of the call for every
        non-text input), or None when the concept's text does not stack with the call's."""
        x = kwargs["hidden_states"]
        n = x.shape[0]
        src = range(n)[rows]
        b = len(src)
        idx = torch.tensor(list(src), device=x.device)
        out = {}
        for k, v in kwargs.items():
            if k in self.concept:
                c = self.concept[k]
                if v is None or not torch.is_tensor(v) or v.shape[1:] != c.shape[1:]:
                    return None
                out[k] = torch.cat([v, c.to(v.device, v.dtype).expand(b, *c.shape[1:])])
            elif torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n and not k.endswith("_ids"):
                out[k] = torch.cat([v, v.index_select(0, idx)])
            elif isinstance(v, list) and len(v) == n:
                out[k] = v + [v[i] for i in src]
            else:
                out[k] = v
        missing = [k for k in self.concept if k not in kwargs or kwargs[k] is None]
        if missing or any(kwargs.get(k) is not None for k in self.concept_none):
            return None
        return out

    def _concept_alone(self, kwargs, batch: int) -> dict:
        out = dict(kwargs)
        out.update({k: None for k in self.concept_none})
        for k, c in self.concept.items():
            ref = kwargs.get(k)
            dtype = ref.dtype if torch.is_tensor(ref) else (c.dtype if not c.is_floating_point()
                                                               else kwargs["hidden_states"].dtype)
            out[k] = c.to(kwargs["hidden_states"].device, dtype).expand(batch, *c.shape[1:])
        return out

    # -- corrections ---------------------------------------------------------------
    def _apply(self, st: _Step, eps_uncond, scale):
        sigma = st.sigma
        ec = eps_offset_free(st.cond_out, sigma, SPACE)
        es = eps_offset_free(st.concept_out, sigma, SPACE)
        if scale is None:
            c = self.method.correction(eps_uncond, ec, es)
        else:
            c = self.method.branch_correction(ec, es, scale)
        with torch.no_grad():
            st.cond_out.copy_(correct_prediction(st.cond_out, c, sigma, SPACE))
        st.applied = True

    def scheduler_step(self, original, model_output, *args, **kwargs):
        st = self.step
        if st is None:
            raise SafeT2IError("Safety guidance: the scheduler stepped without a transformer call that SafeT2I saw "
                               "(another wrapper replaced the transformer's forward). The image is not produced "
                               "unguided.")
        if not st.applied:
            if not (self.branch_scale > 0 and self.method.supports_concept_branch):
                why = ("its harmfulness estimate reads the direction from the negative to the prompt"
                       if not self.method.supports_concept_branch else
                       "set branch_scale > 0 to use the concept-branch form for guidance-distilled models")
                raise SafeT2IError(
                    f"Safety guidance {self.method.name} needs classifier-free guidance, and this pipeline evaluated "
                    f"no negative prompt at this step ({why}; or run with a negative prompt and guidance_scale / "
                    "true_cfg_scale > 1). It is not applied without it.")
            if model_output.data_ptr() != st.cond_out.data_ptr():
                raise SafeT2IError("Safety guidance (concept branch): the pipeline passed the scheduler something "
                                   "other than the transformer's prediction, so it cannot be guided here.")
            self._apply(st, None, self.branch_scale)
        self.step = None
        return original(model_output, *args, **kwargs)


class _Run:
    """A run key holding its schedule (compares by identity)."""

    def __init__(self, schedule):
        self.schedule = schedule

    def __eq__(self, other):
        return isinstance(other, _Run) and other.schedule is self.schedule

    __hash__ = None


def _rows(kwargs: dict, rows: slice) -> dict:
    """The call's keyword arguments for the batch rows ``rows`` (batched tensors and lists)."""
    n = kwargs["hidden_states"].shape[0]
    out = {}
    for k, v in kwargs.items():
        if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n and not k.endswith("_ids"):
            out[k] = v[rows]
        elif isinstance(v, list) and len(v) == n:
            out[k] = v[rows]
        else:
            out[k] = v
    return out


def _first(out):
    return out[0] if isinstance(out, tuple) else out.sample


def _replace_first(out, pred):
    if isinstance(out, tuple):
        return (pred,) + tuple(out[1:])
    out.sample = pred
    return out


@contextlib.contextmanager
def flow_safety_guidance(pipe, method, concept: str | None = None, *, concept_kwargs: dict | None = None,
                         branch_scale: float = 0.0):
    """See the module docstring; ``concept_kwargs`` overrides the encoded concept (the
    transformer's text keyword arguments, batch 1)."""
    if method.needs.attention:
        raise SafeT2IError(
            f"{method.name} needs the concept tokens' cross-attention maps; this joint-attention transformer "
            f"({type(pipe.transformer).__name__}) does not expose them to the diffusers adapter. Use SLD or "
            "SP-Guard-style guidance on this pipeline.")
    if concept_kwargs is None:
        if concept is None:
            raise SafeT2IError("safety_guidance needs a concept text or concept_kwargs.")
        concept_kwargs = encode_concept_kwargs(pipe, concept)
    run = FlowGuidance(pipe, method, concept_kwargs, branch_scale)
    models = [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]
    sched = pipe.scheduler
    patched = []
    try:
        for m in models:
            original = m.forward
            m.forward = (lambda orig: lambda *a, **k: run.forward(orig, a, k))(original)
            patched.append(m)
        original_step = sched.step
        sched.step = lambda model_output, *a, **k: run.scheduler_step(original_step, model_output, *a, **k)
        yield method
    finally:
        for m in patched:
            del m.forward
        if "step" in vars(sched):
            del sched.step
