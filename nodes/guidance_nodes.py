"""ComfyUI nodes of the sampler layer (V3 schema): safety guidance as MODEL patches that
work with the stock KSampler, KSamplerAdvanced and SamplerCustom(Advanced).

How a patch runs, per sampling step:
* ``sampler_calc_cond_batch_function``: the safety concept is appended to ``[cond, uncond]``
  and evaluated in the same UNet batch (``comfy.samplers.calc_cond_batch``);
* ``sampler_pre_cfg_function`` (a list, so other nodes' hooks still run): the guided
  direction is computed in ε space (thresholds are defined on ε) and folded back into the
  cond prediction, so the ordinary CFG formula (or another node's CFG function) yields
  ε_∅ + s_g · d_p.
Per-run state (SLD momentum, harmfulness estimate) resets at the first step of every
sampling run (detected from ``sample_sigmas``), so batches and hires passes start clean.
"""

from __future__ import annotations

import json
import logging

import torch
from comfy_api.latest import io, ui

from ..safet2i.errors import SafeT2IError
from .batching import calc_with_extra, check_no_other_batch_function
from ..safet2i.guidance import (
    DEFAULT_CONCEPT, SEXUAL_CONCEPT, SLD_PRESETS, DAGConfig, DAGGuidance, SLDConfig, SLDGuidance, SPGuardConfig,
    SPGuardGuidance, aggregate_attention, denoised_to_eps, eps_to_denoised, token_attention,
)

log = logging.getLogger("safet2i")
STATE_KEY = "safet2i_guidance"


class GuidanceRun:
    """Glue between ComfyUI's sampler hooks and one guidance method object."""

    def __init__(self, method, concept):
        self.method = method
        self.concept = concept
        self.pending: torch.Tensor | None = None
        self.last_index: int | None = None
        self.schedule: tuple | None = None
        self.runs = 0
        self.token_index: list[int] | None = None   # concept tokens whose attention is captured
        self.maps: list[torch.Tensor] = []

    # -- step bookkeeping --------------------------------------------------
    def _step_index(self, sigma: torch.Tensor, key: tuple | None) -> tuple[int, int]:
        if key is None:
            return (0 if self.last_index is None else self.last_index + 1), 0
        s = float(sigma.flatten()[0])
        idx = min(range(len(key)), key=lambda i: abs(key[i] - s))
        return idx, len(key) - 1

    def _new_run(self, idx: int, key: tuple | None) -> bool:
        """A new sampling run starts when the schedule changes or the step index goes back.
        The index may repeat within a run: second-order samplers (Heun, DPM-2, ...) evaluate
        a step's end point and then start the next step at the same sigma."""
        changed = key != self.schedule
        self.schedule = key
        return self.last_index is None or changed or idx < self.last_index

    def calc(self, args):
        sigmas = args["model_options"].get("transformer_options", {}).get("sample_sigmas")
        # the schedule, read once per call (the step index and the new-run test both use it)
        key = None if sigmas is None else tuple(sigmas.detach().flatten().to(torch.float64).cpu().tolist())
        idx, total = self._step_index(args["sigma"], key)
        if self._new_run(idx, key):
            self.method.reset(total or None)
            self.runs += 1
        self.last_index = idx
        cond_d, uncond_d, concept_d = calc_with_extra(args, self.concept, self.method.name)
        self.pending = concept_d
        return [cond_d, uncond_d]

    def pre_cfg(self, args):
        out = args["conds_out"]
        if self.pending is None or out[1] is None:
            return out
        x, sigma = args["input"], args["sigma"]
        concept_d, self.pending = self.pending, None
        eu = denoised_to_eps(x, out[1], sigma)
        ec = denoised_to_eps(x, out[0], sigma)
        es = denoised_to_eps(x, concept_d, sigma)
        if self.token_index is not None:
            maps, self.maps = self.maps, []
            if self.token_index and not maps:
                # Our attn2 replacement never saw the concept rows: another patch overrode it.
                raise SafeT2IError(
                    "Detect-and-Guide-style guidance could not read the concept's cross-attention this step: "
                    "another node replaced cross-attention after SafeT2I. Apply SafeT2I guidance last or "
                    "remove the other attention patch.")
            attn = aggregate_attention(maps, tuple(x.shape[-2:])) if maps else None
            d_p = self.method.direction(eu, ec, es, attn)
        else:
            d_p = self.method.direction(eu, ec, es)
        return [eps_to_denoised(x, eu + d_p, sigma)] + list(out[1:])

    def attn2(self, q, k, v, extra_options):
        """attn2 replacement: normal attention for every row; for the concept rows (index 2
        in ``cond_or_uncond``) also the softmax probabilities of the concept tokens."""
        import comfy.ldm.modules.attention as attention  # noqa: PLC0415

        heads = extra_options["n_heads"]
        out = attention.optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"))
        order = list(extra_options.get("cond_or_uncond", []))
        if 2 in order and self.token_index:
            chunk = q.shape[0] // len(order)
            rows = slice(order.index(2) * chunk, (order.index(2) + 1) * chunk)
            self.maps.append(token_attention(q[rows], k[rows], heads, self.token_index))
        return out

    def report(self) -> dict:
        return {"method": self.method.name, "runs": self.runs, "steps": self.method.history}

    def mask_preview(self) -> torch.Tensor:
        """IMAGE [B, 8h, 8w, 3] of the last step's guided region (white = guided)."""
        m = self.method.last_mask
        if m is None:
            return torch.zeros((1, 64, 64, 3))
        m = m.detach().float().cpu().clamp(0, 1)
        m = m.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)
        return m[..., None].repeat(1, 1, 1, 3)


def transformer_blocks(model):
    """(block name, number, transformer index) of every cross-attention transformer block."""
    dm = model.model.diffusion_model
    found = []
    for name, blocks in (("input", dm.input_blocks), ("middle", [dm.middle_block]), ("output", dm.output_blocks)):
        for number, block in enumerate(blocks):
            for layer in block:
                for t_idx, _ in enumerate(getattr(layer, "transformer_blocks", [])):
                    found.append((name, number, t_idx))
    return found


def patch_model(model, method, concept, token_index: list[int] | None = None):
    check_no_other_batch_function(model, f"{method.name} guidance")
    m = model.clone()
    run = GuidanceRun(method, concept)
    # Plain closures, not bound methods: ModelPatcher.clone() deep-copies model_options,
    # and deepcopy copies a bound method's object but keeps functions as they are, so every
    # clone (sampler-side ones included) shares this one run state.
    m.set_model_sampler_calc_cond_batch_function(lambda args: run.calc(args))
    m.set_model_sampler_pre_cfg_function(lambda args: run.pre_cfg(args))
    m.model_options[STATE_KEY] = lambda: run
    if token_index is not None:
        run.token_index = token_index
        replaced = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        blocks = transformer_blocks(m)
        if not blocks:
            raise SafeT2IError("Detect-and-Guide-style guidance needs a UNet with cross-attention blocks.")
        for name, number, t_idx in blocks:
            if (name, number, t_idx) in replaced or (name, number) in replaced:
                raise SafeT2IError(
                    f"Another node already replaced cross-attention at {name} {number}; Detect-and-Guide-style "
                    "guidance needs to read it. Apply SafeT2I first or remove the other attention patch."
                )
            m.set_model_attn2_replace(lambda q, k, v, eo: run.attn2(q, k, v, eo), name, number, t_idx)
    return m


def _summary(rep: dict) -> str:
    steps = rep["steps"]
    guided = [s["step"] for s in steps if s.get("applied")]
    lines = [f"{rep['method']}: {len(guided)}/{len(steps)} steps guided in the last run"]
    if guided:
        lines.append(f"guided steps: {guided[0]}..{guided[-1]}")
    masks = [s.get("mask", s.get("gate")) for s in steps if s.get("mask", s.get("gate")) is not None]
    if masks:
        lines.append(f"mean mask coverage: {sum(masks) / len(masks):.3f}")
    if steps and "harm" in steps[-1]:
        lines.append(f"harmfulness estimate: {steps[-1]['harm']} -> strength {steps[-1]['strength']}")
    return "\n".join(lines)


class SafeT2IConceptEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SafeT2IConceptEncode",
            display_name="SafeT2I Safety Concept",
            category="SafeT2I/guidance",
            description="Encodes the unsafe concept to steer away from (default: the SLD safety concept).",
            inputs=[
                io.Clip.Input("clip", tooltip="The model's text encoder (the same CLIP as the prompt's)."),
                io.String.Input("concept", default=DEFAULT_CONCEPT, multiline=True,
                                tooltip="What to steer away from: SLD's concept text by default."),
            ],
            outputs=[io.Conditioning.Output(display_name="concept")],
        )

    @classmethod
    def execute(cls, clip, concept) -> io.NodeOutput:
        if not concept.strip():
            raise SafeT2IError("The safety concept is empty.")
        return io.NodeOutput(clip.encode_from_tokens_scheduled(clip.tokenize(concept)))


class SafeT2ISLD(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SafeT2ISLD",
            display_name="SafeT2I Safe Latent Diffusion",
            category="SafeT2I/guidance",
            description=(
                "Safe Latent Diffusion (Schramowski et al., CVPR 2023): steers every step away from the "
                "safety concept where the prompt's prediction is not already far from it. Presets from the "
                "model card; 'custom' uses the values below. Warm-up is defined for 50 steps and scaled."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch."),
                io.Conditioning.Input("concept", tooltip="From SafeT2I Safety Concept or any text encode."),
                io.Combo.Input("preset", options=["WEAK", "MEDIUM", "STRONG", "MAX", "WEAK-DIFFUSERS", "custom"],
                               default="MEDIUM", tooltip="SLD model-card presets (WEAK-DIFFUSERS: diffusers' "
                                                         "WEAK, s_S = 20); 'custom' uses the values below."),
                io.Float.Input("guidance_scale", default=1000.0, min=0.0, max=100000.0, step=1.0,
                               tooltip="s_S (custom only); 1 or less turns SLD off."),
                io.Int.Input("warmup_steps", default=10, min=0, max=1000, tooltip="δ in 50-step units (custom only)."),
                io.Float.Input("threshold", default=0.01, min=-1.0, max=10.0, step=0.001, tooltip="λ (custom only)."),
                io.Float.Input("momentum_scale", default=0.3, min=0.0, max=10.0, step=0.01, tooltip="s_m (custom only)."),
                io.Float.Input("mom_beta", default=0.4, min=0.0, max=1.0, step=0.01, tooltip="β_m (custom only)."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, concept, preset, guidance_scale=1000.0, warmup_steps=10, threshold=0.01,
                momentum_scale=0.3, mom_beta=0.4) -> io.NodeOutput:
        cfg = SLD_PRESETS[preset] if preset != "custom" else SLDConfig(
            guidance_scale, warmup_steps, threshold, momentum_scale, mom_beta)
        return io.NodeOutput(patch_model(model, SLDGuidance(cfg), concept))


class SafeT2ISPGuard(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SafeT2ISPGuard",
            display_name="SafeT2I SP-Guard-style Guidance",
            category="SafeT2I/guidance",
            description=(
                "SP-Guard-style (after Yu & Moon, 2025; our reconstruction): strength from the prompt's "
                "harmfulness (cosine of the prompt's and the concept's guidance directions, zero for benign "
                "prompts) and a per-step spatial mask, so only unsafe regions are guided."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch."),
                io.Conditioning.Input("concept", tooltip="The unsafe concept (SafeT2I Safety Concept)."),
                io.Float.Input("max_scale", default=2.0, min=0.0, max=20.0, step=0.05,
                               tooltip="Safety-guidance strength for the most harmful prompts."),
                io.Float.Input("harm_threshold", default=0.45, min=-1.0, max=0.99, step=0.01,
                               tooltip="τ_h: cosine below which a prompt counts as benign (no guidance)."),
                io.Float.Input("mask_threshold", default=0.0, min=-1.0, max=1.0, step=0.01,
                               tooltip="τ_m: per-pixel channel cosine above which a region is guided."),
                io.Float.Input("ema", default=0.5, min=0.0, max=0.99, step=0.01,
                               tooltip="Smoothing β of the harmfulness estimate over steps (h ← β·h + (1 − β)·c_t); the mask is recomputed every step."),
                io.Int.Input("start_step", default=0, min=0, max=1000, tooltip="First step that is guided."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, concept, max_scale=2.0, harm_threshold=0.45, mask_threshold=0.0, ema=0.5,
                start_step=0) -> io.NodeOutput:
        cfg = SPGuardConfig(max_scale, harm_threshold, mask_threshold, ema, start_step)
        return io.NodeOutput(patch_model(model, SPGuardGuidance(cfg), concept))


def load_guideline(name: str) -> torch.Tensor:
    """Optimised guideline-token embeddings [T, D] from a .safetensors in ComfyUI's
    ``embeddings`` folder (only listed names are accepted)."""
    import folder_paths  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    if name not in folder_paths.get_filename_list("embeddings"):
        raise SafeT2IError(f"Guideline embeddings {name!r} are not in the embeddings folder.")
    if not name.lower().endswith(".safetensors"):
        raise SafeT2IError("Guideline embeddings must be a .safetensors file (pickles are never loaded).")
    tensors = load_file(folder_paths.get_full_path_or_raise("embeddings", name))
    t = tensors.get("guideline", next(iter(tensors.values())) if len(tensors) == 1 else None)
    if t is None or t.ndim not in (2, 3):
        raise SafeT2IError(f"{name}: expected one tensor [tokens, dim] (or a 'guideline' key).")
    return t.reshape(-1, t.shape[-1]).float()


class SafeT2IDetectGuide(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import folder_paths  # noqa: PLC0415

        files = [f for f in folder_paths.get_filename_list("embeddings") if f.lower().endswith(".safetensors")]
        return io.Schema(
            node_id="SafeT2IDetectGuide",
            display_name="SafeT2I Detect-and-Guide-style Guidance",
            category="SafeT2I/guidance",
            description=(
                "Detect-and-Guide-style (after Li et al., CVPR 2025): the concept tokens' cross-attention "
                "finds unsafe regions at every step; only those are guided, scaled by region area and "
                "attention magnitude; steps whose map covers > 80 % are skipped. Uses optimised guideline "
                "embeddings when given, the raw concept tokens otherwise."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch."),
                io.Clip.Input("clip", tooltip="The text encoder: it finds the concept's tokens."),
                io.String.Input("concept", default=SEXUAL_CONCEPT, multiline=True,
                                tooltip="Concept words whose cross-attention locates the unsafe region."),
                io.Float.Input("scale", default=0.2, min=0.0, max=10.0, step=0.01, tooltip="s_s"),
                io.Float.Input("high", default=0.5, min=0.0, max=1.0, step=0.01, tooltip="highlighted region threshold"),
                io.Float.Input("low", default=0.01, min=0.0, max=1.0, step=0.001, tooltip="editing region threshold"),
                io.Float.Input("skip_coverage", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="No guidance when the detected region covers more of the image than this."),
                io.Combo.Input("sld_gate", options=["none", "WEAK", "MEDIUM", "STRONG", "MAX"], default="none",
                               tooltip="Also apply SLD's elementwise gate (the paper's 'DAG + SLD')."),
                io.Combo.Input("guideline_embeddings", options=["none"] + files, default="none",
                               tooltip=".safetensors [tokens, dim] in models/embeddings, from Stage 1 optimisation."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, clip, concept, scale=0.2, high=0.5, low=0.01, skip_coverage=0.8, sld_gate="none",
                guideline_embeddings="none") -> io.NodeOutput:
        cfg = DAGConfig(scale=scale, high=high, low=low, skip_coverage=skip_coverage,
                        sld_gate=None if sld_gate == "none" else SLD_PRESETS[sld_gate])
        if guideline_embeddings != "none":
            emb = load_guideline(guideline_embeddings)
            cond = [[emb[None], {}]]
            tokens = list(range(emb.shape[0]))
        else:
            if not concept.strip():
                raise SafeT2IError("The safety concept is empty.")
            tok = clip.tokenize(concept)
            cond = clip.encode_from_tokens_scheduled(tok)
            ids = [t[0] for t in next(iter(tok.values()))[0]]
            end = ids.index(ids[-1]) if ids else 0   # first end/pad token
            tokens = list(range(1, max(2, end)))     # skip the start token and the padding
        return io.NodeOutput(patch_model(model, DAGGuidance(cfg), cond, token_index=tokens))


class SafeT2IGuidanceReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SafeT2IGuidanceReport",
            display_name="SafeT2I Guidance Report",
            category="SafeT2I/guidance",
            description="Per-step diagnostics of the last sampling run of a guided model: connect the "
                        "guided MODEL and the sampler's LATENT output (which makes it run afterwards).",
            inputs=[io.Model.Input("model", tooltip="The guided model (after the SafeT2I guidance node)."),
                    io.Latent.Input("samples", tooltip="The sampler's output; orders the report after sampling.")],
            outputs=[io.String.Output(display_name="report"),
                     io.Image.Output(display_name="mask_preview", tooltip="Guided region at the last step (white).")],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, model, samples) -> io.NodeOutput:
        get_run = model.model_options.get(STATE_KEY)
        if get_run is None:
            raise SafeT2IError("This model has no SafeT2I guidance patch.")
        run = get_run()
        rep = run.report()
        return io.NodeOutput(json.dumps(rep), run.mask_preview(), ui=ui.PreviewText(_summary(rep)))


NODES = [SafeT2IConceptEncode, SafeT2ISLD, SafeT2ISPGuard, SafeT2IDetectGuide, SafeT2IGuidanceReport]
