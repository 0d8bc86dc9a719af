"""ComfyUI nodes of the output layer (V3 schema). Thin: parse inputs, call
``safet2i.filter``, format outputs. Node IDs are stable forever; new inputs are only ever
appended at the end."""

from __future__ import annotations

import json
import logging
from fractions import Fraction

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..safet2i.errors import ImageInputError, ModelLoadError
from ..safet2i.runtime import host_providers
from ..safet2i.filter import (
    ACTIONS, BUILTIN, DEFAULT_WINDOW, PRESETS, SafetyFilter, filter_frames, get_policy, load_model,
)
from ..safet2i.filter.report import pin_warnings, unpinned_models
from . import paths

FilterModels = io.Custom("SAFET2I_FILTER_MODELS")

PROVIDERS = ["auto", "cpu", "cuda", "tensorrt", "directml", "coreml", "rocm", "openvino"]
POLICIES = list(PRESETS) + ["custom"]
MASK_SHAPES = ["rect", "ellipse"]


def _summary(verdicts, filter_description: dict | None = None) -> str:
    lines = pin_warnings(filter_description) if filter_description is not None else []
    for v in verdicts:
        worst = ", ".join(f"{f.detection.label} {f.detection.score:.2f}" for f in v.flagged[:4])
        state = "UNSAFE" if v.unsafe else "safe"
        note = f" [still flagged after censoring: {v.escalated} used]" if v.escalated else ""
        lines.append(f"image {v.index}: {state} (cost {v.cost:.3f})" + (f": {worst}" if worst else "") + note)
    n_bad = sum(v.unsafe for v in verdicts)
    head = f"SafeT2I filter: {len(verdicts)} image(s), {n_bad} unsafe"
    return "\n".join([head] + lines)


def _loader_text(model) -> str:
    """The loader's preview: the model, its sha256 and whether a sidecar pin verified it."""
    d = model.describe()
    warn = pin_warnings({"models": [d]})
    if warn:
        return warn[0]
    return f"{d['name']}: pinned, sha256 {d['sha256']} verified; on {', '.join(d['providers'])}"


def _policy_enforced(node: str, policy: str, action: str, thresholds: str, expand: float, shape: str):
    """The node's Policy and action, or under operator enforcement (``SAFET2I_ENFORCE``,
    ``nodes/enforce.py``) the operator's where the node asks for something weaker (its thresholds,
    box growth or action); the attempt is logged. Returns (policy, action, enforcer or None)."""
    from . import enforce  # noqa: PLC0415

    pol = get_policy(policy, thresholds, expand=float(expand), shape=shape)
    enforcer = enforce.active()
    if enforcer is None:
        return pol, action, None
    from ..safet2i.enforce import policy_at_least  # noqa: PLC0415

    _, new_action, weaker = enforcer.override(pol, action)
    if weaker:
        logging.getLogger("safet2i").warning(
            "SafeT2I enforcement: %s asked for policy %r (thresholds %r, expand %s), action %r: weaker than the "
            "operator's (policy %r, action %r), which is used instead.", node, policy, thresholds, expand,
            action, enforcer.config.policy, enforcer.config.action)
    if not policy_at_least(pol, enforcer.policy):
        pol = get_policy(enforcer.config.policy, enforcer.config.thresholds or None,
                         expand=max(float(expand), float(enforcer.policy.expand)), shape=shape)
    return pol, new_action, enforcer


def _mark_checked(enforcer, filter_models, pol, action: str, strength: float, tensor) -> None:
    """Tell the enforcer these output pixels were checked at least as strictly as it would (it
    compares policy and action itself; here: the same models by content, mask shape and automatic
    censor strength), so the output node reuses the verdict instead of running the models again.
    Otherwise no mark: the output node checks the pixels again."""
    if enforcer is None:
        return
    if (not enforcer.uses_models(filter_models) or float(strength or 0.0) != 0.0
            or getattr(pol, "shape", None) != getattr(enforcer.policy, "shape", None)):
        return
    enforcer.mark_checked(tensor, policy=pol, action=action)


class SafeT2IFilterModelLoader(io.ComfyNode):
    """Loads an ONNX safety model once per process (shared by every node and run)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SafeT2IFilterModelLoader",
            display_name="SafeT2I Load Filter Model",
            category="SafeT2I/filter",
            description=(
                "Loads an ONNX safety model for the SafeT2I Image Filter: the NudeNet 3.4.2 detector "
                "(from the nudenet wheel), its reference-compatible BGR mode, Yahoo Open-NSFW, or any "
                "model with a sidecar .json in models/safet2i_filters. Chain loaders to combine models."
            ),
            inputs=[
                io.Combo.Input("model", options=paths.filter_model_names(), default="nudenet",
                               tooltip="nudenet: RGB input, per-class NMS. nudenet-reference: the nudenet "
                                       "package's BGR input, for reproducing paper numbers. opennsfw: "
                                       "whole-image classifier (threshold 0.8)."),
                io.Combo.Input("providers", options=PROVIDERS, default="auto",
                               tooltip="onnxruntime execution provider; auto picks the fastest available "
                                       "(TensorRT, CUDA, DirectML, CoreML, ..., CPU)."),
                FilterModels.Input("chain", optional=True,
                                   tooltip="Models loaded by another loader, to run together with this one."),
            ],
            outputs=[FilterModels.Output(display_name="filter_models")],
        )

    @classmethod
    def execute(cls, model, providers="auto", chain=None) -> io.NodeOutput:
        path = model if model in BUILTIN else paths.sidecar_path(model)
        loaded = load_model(path, providers=host_providers(providers, paths.comfy_cpu_only()))
        return io.NodeOutput(tuple(chain or ()) + (loaded,), ui=ui.PreviewText(_loader_text(loaded)))


class SafeT2IImageFilter(io.ComfyNode):
    """Checks every image of a batch and censors what is unsafe."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SafeT2IImageFilter",
            display_name="SafeT2I Image Filter",
            category="SafeT2I/filter",
            description=(
                "Scores every image of the batch with the loaded safety models, grades a safety cost "
                "(0.5 = at the threshold), and censors unsafe regions. Fails closed: if a model cannot "
                "run, the workflow stops with an error and no image goes on."
            ),
            inputs=[
                io.Image.Input("images", tooltip="Images to check; every image of the batch is checked."),
                FilterModels.Input("filter_models", tooltip="From SafeT2I Load Filter Model (chain several)."),
                io.Combo.Input("policy", options=POLICIES, default="strict-5",
                               tooltip="strict-5: I2P/SLD exposed classes. broad-9: adds male breast, belly, "
                                       "feet, armpits (RECE/UnlearnDiffAtk). face-only: faces, for tests. "
                                       "custom: only the thresholds below."),
                io.Combo.Input("action", options=list(ACTIONS), default="blur",
                               tooltip="pass: flag only. blur/pixelate/fill: unsafe regions. black/"
                                       "placeholder: the whole image. block: stop the workflow with an error."),
                io.String.Input("thresholds", default="", multiline=True,
                                tooltip="Per-label overrides, e.g. FEET_EXPOSED=0.8, one per line or comma-separated."),
                io.Float.Input("expand", default=0.1, min=0.0, max=2.0, step=0.01,
                               tooltip="Grow each flagged box by this fraction of its size on every side."),
                io.Combo.Input("mask_shape", options=MASK_SHAPES, default="rect", tooltip="Shape of each censored region."),
                io.Float.Input("feather", default=0.0, min=0.0, max=256.0, step=0.5,
                               tooltip="Soften mask edges outwards by this many pixels."),
                io.Float.Input("strength", default=0.0, min=0.0, max=512.0, step=1.0,
                               tooltip="Blur sigma or pixelate block size in pixels; 0 = automatic."),
            ],
            outputs=[
                io.Image.Output(display_name="images"),
                io.Mask.Output(display_name="mask"),
                io.Float.Output(display_name="cost", is_output_list=True),
                io.Boolean.Output(display_name="is_safe"),
                io.String.Output(display_name="report"),
            ],
        )

    @classmethod
    def execute(cls, images, filter_models, policy, action, thresholds="", expand=0.1,
                mask_shape="rect", feather=0.0, strength=0.0) -> io.NodeOutput:
        if not filter_models:
            raise ModelLoadError("SafeT2I Image Filter got no filter model; connect a SafeT2I Load Filter Model.")
        pol, action, enforcer = _policy_enforced("SafeT2IImageFilter", policy, action, thresholds, expand, mask_shape)
        flt = SafetyFilter(list(filter_models), pol, action, feather=feather, strength=strength or None)
        if images.ndim != 4:
            raise ValueError(f"SafeT2I Image Filter expects an IMAGE batch [B,H,W,C], got {tuple(images.shape)}.")
        b, h, w = images.shape[0], images.shape[1], images.shape[2]
        src = images.detach().cpu()
        # Preallocated outputs: a long video batch is never held twice as lists.
        out_img = torch.empty((b, h, w, 3), dtype=torch.float32)
        out_mask = torch.zeros((b, h, w), dtype=torch.float32)
        verdicts = []
        pbar = paths.progress_bar(b)
        chunk = 16
        for start in range(0, b, chunk):
            res = flt.run(src[start:start + chunk])  # 'block' raises UnsafeContentError here
            for j, v in enumerate(res.verdicts):
                v.index += start
                out_img[start + j] = torch.from_numpy(res.images[j])
                out_mask[start + j] = torch.from_numpy(res.masks[j])
            verdicts.extend(res.verdicts)
            pbar(min(chunk, b - start))
        if images.dtype in (torch.float16, torch.bfloat16, torch.float64):
            out_img = out_img.to(images.dtype)   # other dtypes (bool, ...) stay float32 0..1
        _mark_checked(enforcer, filter_models, pol, action, strength, out_img)
        described = flt.describe()
        report = json.dumps({"filter": described, "images": [v.to_dict() for v in verdicts],
                             "unpinned_models": [m.get("name") for m in unpinned_models(described)]})
        return io.NodeOutput(
            out_img, out_mask, [float(v.cost) for v in verdicts], all(not v.unsafe for v in verdicts), report,
            ui=ui.PreviewText(_summary(verdicts, described)),
        )


#: Frames listed one by one in the Video Filter's summary text (the report has them all).
_SUMMARY_FRAMES = 40


def _video_summary(res, filter_description: dict, source: str, rate, audio: bool) -> str:
    clip = res.clip
    lines = [
        f"SafeT2I video filter: {clip['frames']} frame(s) from {source} at {float(rate):.3f} fps"
        f"{' with audio (passed through, not checked)' if audio else ''}: {len(clip['unsafe_frames'])} unsafe, "
        f"{len(clip['censored_frames'])} censored (window {clip['window']}, action {clip['action']})"
    ] + pin_warnings(filter_description)
    shown = [f for f in res.frames if f["verdict"] == "unsafe" or f["censored"]]
    for f in shown[:_SUMMARY_FRAMES]:
        worst = ", ".join(f"{d['label']} {d['score']:.2f}" for d in f["detections"] if d["flagged"])
        state = "UNSAFE" if f["verdict"] == "unsafe" else "safe"
        note = f" [still flagged after censoring: {f['escalated']} used]" if f["escalated"] else ""
        near = f"; censored for frame(s) {f['propagated_from']}" if f["propagated_from"] and f["censored"] else ""
        lines.append(f"frame {f['frame']}: {state} (cost {f['cost']:.3f})" + (f": {worst}" if worst else "")
                     + near + note)
    if len(shown) > _SUMMARY_FRAMES:
        lines.append(f"... {len(shown) - _SUMMARY_FRAMES} more frame(s) unsafe or censored: see the report output.")
    return "\n".join(lines)


class SafeT2IVideoFilter(io.ComfyNode):
    """Checks every frame of a clip; a region found in one frame is censored in its neighbours."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SafeT2IVideoFilter",
            display_name="SafeT2I Video Filter",
            category="SafeT2I/filter",
            description=(
                "Checks every frame of a clip (IMAGE frames or a VIDEO) with the loaded safety models, in "
                "batches, and censors unsafe regions; a region found in frame t is also censored in the "
                "frames within the window around t, so the censoring does not flicker. With action block, "
                "one unsafe frame stops the workflow and no frame goes on. Fails closed."
            ),
            inputs=[
                FilterModels.Input("filter_models", tooltip="From SafeT2I Load Filter Model (chain several)."),
                io.Combo.Input("policy", options=POLICIES, default="strict-5",
                               tooltip="strict-5: I2P/SLD exposed classes. broad-9: adds male breast, belly, "
                                       "feet, armpits (RECE/UnlearnDiffAtk). face-only: faces, for tests. "
                                       "custom: only the thresholds below."),
                io.Combo.Input("action", options=list(ACTIONS), default="blur",
                               tooltip="pass: flag only. blur/pixelate/fill: unsafe regions. black/placeholder: "
                                       "the whole frame. block: one unsafe frame stops the workflow with an "
                                       "error; no frame goes on."),
                io.Int.Input("window", default=DEFAULT_WINDOW, min=0, max=240, step=1,
                             tooltip="Frames on each side: a region flagged in frame t is also censored, at the "
                                     "same place, in frames t-window..t+window. 0 = each frame on its own."),
                io.String.Input("thresholds", default="", multiline=True,
                                tooltip="Per-label overrides, e.g. FEET_EXPOSED=0.8, one per line or comma-separated."),
                io.Float.Input("expand", default=0.1, min=0.0, max=2.0, step=0.01,
                               tooltip="Grow each flagged box by this fraction of its size on every side "
                                       "(more helps with fast motion, since regions are carried unmoved)."),
                io.Combo.Input("mask_shape", options=MASK_SHAPES, default="rect", tooltip="Shape of each censored region."),
                io.Float.Input("feather", default=0.0, min=0.0, max=256.0, step=0.5,
                               tooltip="Soften mask edges outwards by this many pixels."),
                io.Float.Input("strength", default=0.0, min=0.0, max=512.0, step=1.0,
                               tooltip="Blur sigma or pixelate block size in pixels; 0 = automatic."),
                io.Float.Input("fps", default=24.0, min=1.0, max=240.0, step=1.0, round=0.001,
                               tooltip="Frame rate of the video output when the frames come from images. A "
                                       "connected video keeps its own frame rate and audio."),
                io.Image.Input("images", optional=True,
                               tooltip="The clip as an IMAGE batch of frames [T,H,W,C]; every frame is checked. "
                                       "Connect this or video, not both."),
                io.Video.Input("video", optional=True,
                               tooltip="A VIDEO (e.g. from Load Video or Create Video): decoded to frames, "
                                       "filtered, and rebuilt with the same frame rate and audio. Connect this "
                                       "or images, not both."),
            ],
            outputs=[
                io.Image.Output(display_name="images"),
                io.Mask.Output(display_name="mask"),
                io.Float.Output(display_name="cost", is_output_list=True),
                io.Boolean.Output(display_name="is_safe"),
                io.String.Output(display_name="report"),
                io.Video.Output(display_name="video"),
            ],
        )

    @classmethod
    def execute(cls, filter_models, policy, action, window=DEFAULT_WINDOW, thresholds="", expand=0.1,
                mask_shape="rect", feather=0.0, strength=0.0, fps=24.0, images=None, video=None) -> io.NodeOutput:
        from comfy_api.latest import InputImpl, Types  # noqa: PLC0415 - only where VIDEO exists

        if not filter_models:
            raise ModelLoadError("SafeT2I Video Filter got no filter model; connect a SafeT2I Load Filter Model.")
        if (images is None) == (video is None):
            raise ImageInputError(
                "SafeT2I Video Filter needs exactly one clip: connect either images (IMAGE frames) or video "
                f"(VIDEO); got {'both' if images is not None else 'neither'}."
            )
        if not (np.isfinite(float(fps)) and float(fps) > 0):
            raise ValueError(f"SafeT2I Video Filter: fps must be a positive number, got {fps!r}.")
        pol, action, enforcer = _policy_enforced("SafeT2IVideoFilter", policy, action, thresholds, expand, mask_shape)
        flt = SafetyFilter(list(filter_models), pol, action, feather=feather, strength=strength or None)
        audio, rate, source = None, Fraction(float(fps)), "images"
        if video is not None:
            comps = video.get_components()
            frames, audio, source = comps.images, comps.audio, "video"
            rate = Fraction(comps.frame_rate) if comps.frame_rate else rate
        else:
            frames = images
        if not isinstance(frames, torch.Tensor) or frames.ndim != 4:
            raise ImageInputError(
                f"SafeT2I Video Filter expects frames [T,H,W,C], got {tuple(getattr(frames, 'shape', ()))}."
            )
        src = frames.detach().cpu()
        res = filter_frames(src, flt, window=window, progress=paths.progress_bar(2 * max(1, src.shape[0])))
        out_img = torch.from_numpy(res.images)                  # no copy: the clip is not held twice
        if out_img.dtype == torch.uint8:
            out_img = out_img.to(torch.float32).div_(255.0)
        if frames.dtype in (torch.float16, torch.bfloat16, torch.float64):
            out_img = out_img.to(frames.dtype)   # other dtypes (bool, uint8, ...) become float32 0..1
        _mark_checked(enforcer, filter_models, pol, action, strength, out_img)
        out_video = InputImpl.VideoFromComponents(
            Types.VideoComponents(images=out_img, audio=audio, frame_rate=rate))
        described = flt.describe()
        report = json.dumps({"filter": described, "source": source, "frame_rate": float(rate),
                             "audio": audio is not None, "clip": res.clip, "frames": res.frames,
                             "unpinned_models": [m.get("name") for m in unpinned_models(described)]})
        return io.NodeOutput(
            out_img, torch.from_numpy(res.masks), [float(c) for c in res.costs], res.is_safe, report, out_video,
            ui=ui.PreviewText(_video_summary(res, described, source, rate, audio is not None)),
        )


NODES = [SafeT2IFilterModelLoader, SafeT2IImageFilter]
if hasattr(io, "Video"):   # ComfyUI versions whose V3 API has VIDEO
    NODES.append(SafeT2IVideoFilter)
