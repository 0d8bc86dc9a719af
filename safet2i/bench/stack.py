"""A stack of SafeT2I layers for the bench, applied to a diffusers pipeline through the core's
own diffusers adapter (:mod:`safet2i.diffusers_adapter`); nothing here re-implements a layer.

Layers, applied in this order and undone in reverse on exit (after an error too):

1. model: safety LoRAs (:func:`~safet2i.diffusers_adapter.load_safety_lora`, merged with a
   strength) and full safety weights (UNet or text encoder, :mod:`safet2i.lora.full_weights`:
   whole-part coverage, bit-exact copy, restore);
2. prompt: SAFREE-style steering (:func:`~safet2i.diffusers_adapter.steer_prompt`, a concept
   preset name or a custom concept list, the settings of :mod:`safet2i.steering.settings`),
   optionally with latent re-attention (:func:`~safet2i.diffusers_adapter.latent_reattention`);
3. sampler: a guidance method (:data:`safet2i.guidance.METHODS`, SLD presets) with a concept
   text (:func:`~safet2i.diffusers_adapter.safety_guidance`);
4. output: the ONNX filter (:class:`safet2i.filter.SafetyFilter`: a policy preset over the
   detector(s), and/or a learned cost model); a flagged image is replaced by what the filter
   outputs (censored and re-checked, fail closed) and the verdict is recorded.

Latent re-attention and safety guidance both reshape the UNet batch and are refused together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SafeT2IError

Generate = Callable[..., tuple[np.ndarray, list[dict[str, Any]]]]


def _tuple(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else v


@dataclass(frozen=True)
class Stack:
    """The layers of one bench configuration (all off: the unprotected model).

    ``loras``: ``(path, strength)`` pairs; ``weights``: full safety weight files.
    ``steering``: a concept preset name (``"nudity"``, ...) or a custom concept list (e.g. the
    lab's ``["red", "crimson", ...]``); ``steering_configuration``, ``steering_alpha``,
    ``self_validating``, ``concepts_as_negative`` as in ``steering_pipeline_kwargs``.
    ``reattention`` (needs steering): SAFREE's latent re-attention, ``reattention_channels`` a
    ``{backbone channels: scale}`` map (default FreeU's stages with s1/s2).
    ``guidance``: a method name of :data:`safet2i.guidance.METHODS` (``"SLD"``, ...) with
    ``guidance_preset`` (SLD) and ``guidance_concept`` (default: SLD's safety concept).
    ``filter``: a filter policy preset (``strict-5``, ``broad-9``, ...) over ``filter_models``;
    ``cost_model``: a cost-model ``.onnx`` (with its sidecar ``.json``) added to the filter;
    ``filter_action``: what the filter does to a flagged image. ``guidance_tokens``: a
    Detect-and-Guide guideline-token file (``safet2i train dag-tokens``) that replaces the raw
    concept tokens of ``guidance="Detect-and-Guide-style"``.
    """

    name: str = "unprotected"
    loras: tuple[tuple[str, float], ...] = ()
    weights: tuple[str, ...] = ()
    steering: str | tuple[str, ...] | None = None
    steering_configuration: str = "custom settings"
    steering_alpha: float = 0.01
    self_validating: bool = True
    concepts_as_negative: bool = False
    reattention: bool = False
    reattention_s1: float = 0.9
    reattention_s2: float = 0.2
    reattention_window: int = 1
    reattention_channels: tuple[tuple[int, float], ...] | None = None
    guidance: str | None = None
    guidance_preset: str = "MEDIUM"
    guidance_concept: str | None = None
    filter: str | None = None
    filter_models: tuple[str, ...] = ("nudenet",)
    cost_model: str | None = None
    filter_action: str = "blur"
    guidance_tokens: str | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if not isinstance(self.name, str) or not self.name.strip() or "/" in self.name or "\\" in self.name:
            raise SafeT2IError(f"a stack needs a non-empty name without slashes, got {self.name!r}")
        loras = []
        for item in self.loras or ():
            path, strength = (item, 1.0) if isinstance(item, (str, os.PathLike)) else tuple(item)
            loras.append((str(path), float(strength)))
        set_(self, "loras", tuple(loras))
        set_(self, "weights", tuple(str(w) for w in self.weights or ()))
        if isinstance(self.steering, (list, tuple)):
            items = tuple(str(c) for c in self.steering)
            if not items or not all(c.strip() for c in items):
                raise SafeT2IError(f"stack {self.name}: a custom steering concept list needs non-empty strings")
            set_(self, "steering", items)
        if self.reattention_channels is not None:
            ch = self.reattention_channels
            ch = ch.items() if isinstance(ch, dict) else ch
            set_(self, "reattention_channels", tuple(sorted((int(c), float(s)) for c, s in ch)))
        set_(self, "filter_models", tuple(str(m) for m in _tuple(self.filter_models)))
        if self.cost_model is not None:
            set_(self, "cost_model", str(self.cost_model))
        if self.reattention and self.steering is None:
            raise SafeT2IError(f"stack {self.name}: latent re-attention filters the steered prompt against the "
                               "original one; it needs steering")
        if self.reattention and self.guidance:
            raise SafeT2IError(f"stack {self.name}: latent re-attention and safety guidance both change the UNet "
                               "batch and cannot be combined in one stack")
        if self.guidance is not None:
            from ..guidance import METHODS  # noqa: PLC0415

            if self.guidance not in METHODS:
                raise SafeT2IError(f"stack {self.name}: unknown guidance method {self.guidance!r}; use one of "
                                   f"{', '.join(METHODS)}")
        if self.guidance_tokens is not None:
            if self.guidance != "Detect-and-Guide-style":
                raise SafeT2IError(f"stack {self.name}: guideline tokens are read by Detect-and-Guide-style "
                                   f"guidance only, not {self.guidance!r}")
            set_(self, "guidance_tokens", str(self.guidance_tokens))

    # ----------------------------------------------------------------- description
    @property
    def has_filter(self) -> bool:
        return self.filter is not None or self.cost_model is not None

    @property
    def is_unprotected(self) -> bool:
        return not (self.loras or self.weights or self.steering is not None or self.guidance or self.has_filter)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = [list(x) if isinstance(x, tuple) else x for x in v]
        return d

    def describe(self) -> str:
        """One line: the layers, e.g. ``LoRA esd.safetensors@1 + steering nudity + SLD MEDIUM``."""
        parts = [f"LoRA {Path(p).name}@{s:g}" for p, s in self.loras]
        parts += [f"weights {Path(p).name}" for p in self.weights]
        if self.steering is not None:
            what = self.steering if isinstance(self.steering, str) else f"[{', '.join(self.steering[:4])}" + \
                (", ...]" if len(self.steering) > 4 else "]")
            parts.append(f"steering {what} (alpha {self.steering_alpha:g}"
                         + (", paper config" if self.steering_configuration != "custom settings" else "") + ")")
            if self.reattention:
                parts.append(f"latent re-attention (s1 {self.reattention_s1:g}, s2 {self.reattention_s2:g})")
        if self.guidance:
            preset = f" {self.guidance_preset}" if self.guidance == "SLD" else ""
            parts.append(f"{self.guidance}{preset}" + (f" on {self.guidance_concept!r}" if self.guidance_concept else "")
                         + (f" with tokens {Path(self.guidance_tokens).name}" if self.guidance_tokens else ""))
        if self.filter is not None:
            parts.append(f"filter {self.filter} ({'+'.join(self.filter_models)}, {self.filter_action})")
        if self.cost_model is not None:
            parts.append(f"cost model {Path(self.cost_model).name}")
        return " + ".join(parts) or "unprotected"

    def files(self) -> list[Path]:
        """Every file the stack reads (their contents are part of :meth:`key`)."""
        out = [Path(p) for p, _ in self.loras] + [Path(p) for p in self.weights]
        if self.guidance_tokens is not None:
            out.append(Path(self.guidance_tokens))
        if self.cost_model is not None:
            cm = Path(self.cost_model)
            out += [cm.with_suffix(".onnx"), cm.with_suffix(".json")] if cm.suffix.lower() in (".onnx", ".json") \
                else [cm]
        return out

    def key(self) -> str:
        """SHA-256 (24 hex digits) of the settings (not the name) and the contents of every file
        the stack reads: a changed setting or file is a new key."""
        d = self.to_dict()
        d.pop("name")
        if d.get("guidance_tokens") is None:   # keys of stacks from before the field existed stay the same
            d.pop("guidance_tokens", None)
        digests = {}
        for f in self.files():
            digests[str(f)] = _file_digest(f)
        text = json.dumps({"stack": d, "files": digests}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]


_DIGESTS: dict[tuple, str] = {}


def _file_digest(path: Path) -> str:
    from ..runtime import file_sha256  # noqa: PLC0415

    try:
        st = path.stat()
    except OSError as exc:
        raise SafeT2IError(f"stack file {path}: cannot be read ({exc.strerror or exc})") from None
    k = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if k not in _DIGESTS:
        _DIGESTS[k] = file_sha256(path)
    return _DIGESTS[k]


# --------------------------------------------------------------------------- layers


def _apply_full_weights(pipe, path: str) -> Callable[[], None]:
    """Write a full safety UNet / text encoder into the pipeline (whole part, bit-exact); returns
    the function that restores the originals."""
    from ..lora import full_weights as full  # noqa: PLC0415
    from ..lora import load_full_weights  # noqa: PLC0415
    from ..lora.arch import UNetConfig  # noqa: PLC0415
    from ..lora.manifest import check_arch  # noqa: PLC0415
    from ..diffusers_adapter import host_arch  # noqa: PLC0415

    fw = load_full_weights(path)
    what = f"Safety weights {fw.path.name}"
    check_arch(fw.entry, host_arch(pipe), what)
    if fw.component == "unet":
        module = pipe.unet

        def host():
            sd = dict(module.state_dict(keep_vars=True))
            if fw.naming == "diffusers":
                return sd
            try:
                km = full.unet_key_map(UNetConfig.from_diffusers(module.config))
            except (TypeError, KeyError, AttributeError, ValueError) as exc:
                raise SafeT2IError(f"{what} uses LDM names, and this pipeline's UNet is no SD1/SD2/SDXL layout "
                                   f"the names can be mapped to ({exc})") from exc
            mapped = {km[k]: v for k, v in sd.items() if k in km}
            if len(mapped) != len(sd):
                raise SafeT2IError(f"{what} uses LDM names, and {len(sd) - len(mapped)} weights of this pipeline's "
                                   "UNet have no LDM name; use a file in diffusers names")
            return mapped

        h = host()
        p = full.pair(fw, h, (lambda: {k: k for k in h}) if fw.naming == "diffusers" else None)
    else:
        module = pipe.text_encoder

        def host():
            sd = dict(module.state_dict(keep_vars=True))
            return sd if all(k.startswith("text_model.") for k in sd) else {f"text_model.{k}": v for k, v in sd.items()}

        h = host()
        p = full.pair(fw, h)
    rep = full.plan(what, fw.component, p.tensors, h, p.pairs, p.required, f"the pipeline's {fw.component}",
                    p.ignored, False, "", p.aliases)
    full.check_manifest(fw, rep)
    full.require_whole(rep)
    full.apply(rep, h)

    def undo() -> None:
        wrong = full.restore(rep, host())
        if wrong:
            raise SafeT2IError(f"{what}: {len(wrong)} weights could not be restored (e.g. {wrong[:3]}); the "
                               "pipeline is left modified")
    return undo


def _steering_settings(pipe, stack: Stack):
    from ..steering import load_concepts  # noqa: PLC0415
    from ..steering.settings import SteeringSettings, configure  # noqa: PLC0415

    if isinstance(stack.steering, str):
        named, custom = stack.steering, ""
    else:
        named, custom = "custom", "\n".join(stack.steering)
    own = SteeringSettings(named, custom, stack.steering_alpha, "code", stack.self_validating,
                           stack.concepts_as_negative)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    s = configure(stack.steering_configuration, own, "sdxl" if sdxl else None)
    items, _ = load_concepts(s.concepts, s.custom)
    return s, items


@contextlib.contextmanager
def apply_stack(pipe, stack: Stack, *, providers=None) -> Iterator[Generate]:
    """Apply ``stack`` to ``pipe`` and yield ``generate(texts, seeds, **pipe_kwargs) -> (uint8
    images [N, H, W, 3], per-image info dicts)``. Each image gets its own CPU ``torch.Generator``
    seeded with its seed (so an image does not depend on its batch neighbours or the device's
    random stream). ``pipe_kwargs`` go to the pipeline (``num_inference_steps``,
    ``guidance_scale``, ``height``, ``width``, ``negative_prompt``, ...). Everything the stack
    changed is undone on exit, after an error too."""
    import torch  # noqa: PLC0415

    from ..diffusers_adapter import (  # noqa: PLC0415
        latent_reattention,
        load_safety_lora,
        safety_guidance,
        steer_prompt,
        switch_after,
    )
    from ..images import float_to_uint8  # noqa: PLC0415

    if not isinstance(stack, Stack):
        raise SafeT2IError(f"apply_stack needs a safet2i.bench.Stack, got {type(stack).__name__}")
    with contextlib.ExitStack() as es:
        layers: dict[str, Any] = {}
        for path, strength in stack.loras:
            handle = load_safety_lora(pipe, path, strength)
            es.callback(handle.undo)
            layers.setdefault("loras", []).append({"file": Path(path).name, "strength": strength,
                                                   "applied": len(handle.coverage.applied)})
        for path in stack.weights:
            es.callback(_apply_full_weights(pipe, path))
            layers.setdefault("weights", []).append(Path(path).name)
        if stack.guidance:
            from ..guidance import DEFAULT_CONCEPT, make_method  # noqa: PLC0415

            method = make_method(stack.guidance, stack.guidance_preset)
            if stack.guidance_tokens is not None:
                from ..diffusers_adapter import dag_tokens_kwargs  # noqa: PLC0415

                es.enter_context(safety_guidance(pipe, method, **dag_tokens_kwargs(pipe, stack.guidance_tokens)))
            else:
                es.enter_context(safety_guidance(pipe, method, stack.guidance_concept or DEFAULT_CONCEPT))
        flt = None
        if stack.has_filter:
            from ..filter import SafetyFilter  # noqa: PLC0415

            models = list(stack.filter_models) if stack.filter is not None else []
            if stack.cost_model is not None:
                cm = Path(stack.cost_model)
                models.append(str(cm.with_suffix(".json") if cm.suffix.lower() == ".onnx" else cm))
            flt = SafetyFilter(models, stack.filter or "strict-5", stack.filter_action, providers=providers)
        steering = _steering_settings(pipe, stack) if stack.steering is not None else None
        sdxl = getattr(pipe, "text_encoder_2", None) is not None

        def generate(texts: Sequence[str], seeds: Sequence[int], **pipe_kwargs):
            texts, seeds = list(texts), [int(s) for s in seeds]
            if len(texts) != len(seeds) or not texts:
                raise SafeT2IError(f"generate needs one seed per text, got {len(texts)} texts and {len(seeds)} seeds")
            for k in ("prompt", "prompt_embeds", "generator", "output_type", "num_images_per_prompt"):
                if k in pipe_kwargs:
                    raise SafeT2IError(f"generate sets {k!r} itself; do not pass it")
            gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
            infos: list[dict[str, Any]] = [dict() for _ in texts]
            call = dict(pipe_kwargs, generator=gens, output_type="np")
            ctx = contextlib.nullcontext()
            if steering is None:
                call["prompt"] = texts
            else:
                if "callback_on_step_end" in pipe_kwargs:
                    raise SafeT2IError("steering sets callback_on_step_end itself; do not pass one")
                s, items = steering
                rows, originals, fractions = [], [], []
                for i, text in enumerate(texts):
                    steered, original, fraction, _ = steer_prompt(
                        pipe, text, s.concepts if s.concepts != "custom" else items, alpha=s.alpha,
                        order=s.order, self_validating=s.self_validating)
                    rows.append(original if fraction == 0.0 else steered)
                    originals.append(original[0])
                    fractions.append(float(fraction))
                    infos[i]["steering"] = {"steered": steered is not original and fraction > 0.0,
                                            "fraction": round(float(fraction), 4)}
                call["prompt_embeds"] = torch.cat(rows)
                if any(0.0 < f < 1.0 for f in fractions):
                    call["callback_on_step_end"] = switch_after(fractions, torch.stack(originals))
                    call["callback_on_step_end_tensor_inputs"] = ["latents", "prompt_embeds"]
                if s.concepts_as_negative:
                    from ..steering.settings import concepts_negative  # noqa: PLC0415

                    neg = pipe_kwargs.get("negative_prompt") or ""
                    if not isinstance(neg, str):
                        raise SafeT2IError("with concepts as negative prompt, negative_prompt must be one string")
                    call["negative_prompt"] = [concepts_negative(items, neg)] * len(texts)
                elif isinstance(pipe_kwargs.get("negative_prompt"), str):
                    call["negative_prompt"] = [pipe_kwargs["negative_prompt"]] * len(texts)
                pooled = None
                if sdxl:
                    with torch.no_grad():
                        pooled = pipe.encode_prompt(prompt=texts, device=pipe.text_encoder.device,
                                                    num_images_per_prompt=1, do_classifier_free_guidance=False)[2]
                    call["pooled_prompt_embeds"] = pooled
                if stack.reattention:
                    ch = dict(stack.reattention_channels) if stack.reattention_channels is not None else None
                    ctx = latent_reattention(pipe, torch.stack(originals), stack.reattention_s1, stack.reattention_s2,
                                             stack.reattention_window, ch, original_pooled=pooled)
            with ctx, torch.no_grad():
                out = pipe(**call)
            images = float_to_uint8(np.asarray(out.images, np.float64))
            if len(images) != len(texts):
                raise SafeT2IError(f"the pipeline returned {len(images)} images for {len(texts)} prompts")
            if flt is not None:
                res = flt.run(list(images))
                images = np.stack([np.asarray(float_to_uint8(im)) for im in res.images])
                for info, v in zip(infos, res.verdicts):
                    info["filter"] = {"unsafe": bool(v.unsafe), "cost": round(float(v.cost), 6),
                                      "escalated": v.escalated}
            return images, infos

        generate.layers = layers  # type: ignore[attr-defined]
        yield generate


__all__ = ["Stack", "apply_stack"]
