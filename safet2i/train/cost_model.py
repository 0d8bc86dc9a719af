"""The learned safety cost model ``C(x)`` (a reconstruction of SC-DPO's cost model).

SC-DPO trains a cost model with two objectives, which we reconstruct after the cost model of
Safe-RLHF (the paper gives the objectives' roles, not this exact code; see
``docs/cost-model.md``). With ``C_u = C(x_unsafe)`` and ``C_s = C(x_safe)``:

* **contrastive ranking** over unsafe/safe pairs: an unsafe image must cost more than a safe
  one, ::

      L_rank = mean over pairs (u, s) of  -log sigmoid(C_u - C_s)

  (``pairs="all"``: every unsafe image of a batch against every safe one; ``"matched"``: the
  i-th unsafe image against the i-th safe one);

* **cost anchoring**, which pins the *sign*: ``C > 0`` unsafe, ``C < 0`` safe, ::

      L_anchor = mean_u -log sigmoid(C_u) + mean_s -log sigmoid(-C_s)

  This is the binary cross-entropy of ``sigmoid(C)`` against the label, so ``sigmoid(C)`` is
  trained to be the probability that the image is unsafe: the cost is *calibrated* and
  usable as an absolute threshold (0 by default), not only as a ranking.

The total is ``L = w_rank * L_rank + w_anchor * L_anchor`` (both weights 1 by default).
``-log sigmoid(z)`` is computed as ``-logsigmoid(z)``, exact for any ``z`` (no overflow).

Metrics on a held-out split (:func:`evaluate`): AUROC, the expected calibration error of
``sigmoid(C)`` and the threshold on ``C`` for a chosen false-positive rate. Training
(:func:`train_cost_model`) is deterministic for a seed; :meth:`TrainedCostModel.export`
writes ONE ONNX graph (backbone + head) with a ``kind: "cost"`` sidecar the output filter
loads like any other model.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ModelRunError
from .backbones import Backbone, _torch, make_backbone
from .data import ImageSet

#: Name of the cost model's one label (its policy/sidecar threshold is keyed by it).
COST_LABEL = "cost"
#: Largest |ONNX - torch| accepted when an export is verified.
EXPORT_TOLERANCE = 1e-4


# --------------------------------------------------------------------------- losses


def ranking_loss(c_unsafe, c_safe, *, pairs: str = "all"):
    """``mean -log sigmoid(C_u - C_s)`` over unsafe/safe pairs (module docstring).

    ``c_unsafe`` ``[U]``, ``c_safe`` ``[S]`` (torch tensors, any float dtype). ``pairs="all"``
    takes all ``U * S`` pairs, ``"matched"`` needs ``U == S`` and pairs them by position."""
    torch = _torch()
    c_unsafe, c_safe = c_unsafe.reshape(-1), c_safe.reshape(-1)
    if pairs == "all":
        diff = c_unsafe[:, None] - c_safe[None, :]
    elif pairs == "matched":
        if c_unsafe.shape != c_safe.shape:
            raise ValueError(f"matched pairs need as many unsafe as safe costs, got {c_unsafe.numel()} and "
                             f"{c_safe.numel()}.")
        diff = c_unsafe - c_safe
    else:
        raise ValueError(f"pairs must be 'all' or 'matched', got {pairs!r}.")
    return -torch.nn.functional.logsigmoid(diff).mean()


def anchoring_loss(c_unsafe, c_safe):
    """``mean_u -log sigmoid(C_u) + mean_s -log sigmoid(-C_s)``: pins ``C > 0`` on unsafe and
    ``C < 0`` on safe images (module docstring)."""
    torch = _torch()
    logsig = torch.nn.functional.logsigmoid
    return -logsig(c_unsafe.reshape(-1)).mean() - logsig(-c_safe.reshape(-1)).mean()


def cost_model_loss(c_unsafe, c_safe, *, ranking_weight: float = 1.0, anchor_weight: float = 1.0,
                    pairs: str = "all"):
    """``w_rank * L_rank + w_anchor * L_anchor`` (module docstring)."""
    return (ranking_weight * ranking_loss(c_unsafe, c_safe, pairs=pairs)
            + anchor_weight * anchoring_loss(c_unsafe, c_safe))


# --------------------------------------------------------------------------- metrics


def _check(costs, labels) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(costs, np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if c.shape != y.shape:
        raise ValueError(f"{c.size} costs for {y.size} labels.")
    if not np.isfinite(c).all():
        raise ValueError("Costs must be finite.")
    if not set(np.unique(y)) <= {0, 1} or y.min() == y.max():
        raise ValueError("Labels must be 0 (safe) and 1 (unsafe), both present.")
    return c, y


def auroc(costs, labels) -> float:
    """Area under the ROC curve of ``costs`` for ``labels`` (1 unsafe): the probability that a
    random unsafe image costs more than a random safe one, ties counting one half
    (Mann-Whitney U from average ranks)."""
    c, y = _check(costs, labels)
    _, inverse, counts = np.unique(c, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]            # average 1-based rank of each value
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def sigmoid(x) -> np.ndarray:
    """``1 / (1 + exp(-x))`` in float64 without overflow."""
    return np.exp(-np.logaddexp(0.0, -np.asarray(x, np.float64)))


def reliability(costs, labels, bins: int = 10) -> list[dict]:
    """Per equal-width bin of ``p = sigmoid(C)`` over [0, 1] (bin ``k`` holds
    ``k/bins <= p < (k+1)/bins``, the last one includes 1): count, mean ``p`` and the fraction
    of unsafe images. Empty bins are left out."""
    c, y = _check(costs, labels)
    p = sigmoid(c)
    idx = np.minimum((p * bins).astype(np.int64), bins - 1)
    out = []
    for k in range(bins):
        sel = idx == k
        if sel.any():
            out.append({"bin": [k / bins, (k + 1) / bins], "count": int(sel.sum()),
                        "mean_probability": float(p[sel].mean()), "unsafe_fraction": float(y[sel].mean())})
    return out


def expected_calibration_error(costs, labels, bins: int = 10) -> float:
    """ECE of ``p = sigmoid(C)`` as the probability of *unsafe*: ``sum_k n_k / n * |unsafe
    fraction_k - mean p_k|`` over the equal-width bins of :func:`reliability`."""
    n = len(np.asarray(labels).reshape(-1))
    return float(sum(b["count"] / n * abs(b["unsafe_fraction"] - b["mean_probability"])
                     for b in reliability(costs, labels, bins)))


def threshold_at_fpr(costs, labels, fpr: float) -> dict:
    """The smallest threshold ``tau`` on ``C`` whose false-positive rate on these images is at
    most ``fpr``, with the rule *unsafe when C >= tau*.

    With the safe costs sorted in decreasing order ``s_1 >= s_2 >= ...`` and ``k =
    floor(fpr * n_safe)`` false positives allowed, ``tau`` is the next float64 above
    ``s_(k+1)``: at most ``k`` safe images (those above ``s_(k+1)``) reach it. Returns
    ``threshold`` (on C), ``probability`` (``sigmoid(tau)``, the filter's threshold for it),
    and the ``fpr`` and ``tpr`` achieved here."""
    c, y = _check(costs, labels)
    if not 0.0 < float(fpr) < 1.0:
        raise ValueError(f"The false-positive rate must be in (0, 1), got {fpr}.")
    safe = np.sort(c[y == 0])[::-1]
    k = int(math.floor(float(fpr) * len(safe) + 1e-9))
    tau = float(np.nextafter(safe[k], np.inf)) if k < len(safe) else float(c.min())
    return {"target_fpr": float(fpr), "threshold": tau, "probability": float(sigmoid(tau)),
            "fpr": float((c[y == 0] >= tau).mean()), "tpr": float((c[y == 1] >= tau).mean())}


def evaluate(costs, labels, fpr: float = 0.05, bins: int = 10) -> dict:
    """AUROC, ECE (``bins`` bins), the threshold at ``fpr``, the sign rule's rates (``C >= 0``)
    and the mean cost of each class, for held-out ``costs`` and ``labels`` (1 unsafe)."""
    c, y = _check(costs, labels)
    return {
        "n_unsafe": int(y.sum()), "n_safe": int((1 - y).sum()),
        "auroc": auroc(c, y), "ece": expected_calibration_error(c, y, bins), "ece_bins": bins,
        "at_fpr": threshold_at_fpr(c, y, fpr),
        "sign_rule": {"threshold": 0.0, "fpr": float((c[y == 0] >= 0).mean()),
                      "tpr": float((c[y == 1] >= 0).mean())},
        "mean_cost_unsafe": float(c[y == 1].mean()), "mean_cost_safe": float(c[y == 0].mean()),
        "reliability": reliability(c, y, bins),
    }


# --------------------------------------------------------------------------- model


def cost_head(dim: int, hidden: int = 64):
    """Features ``[B, dim]`` -> cost ``[B, 1]``: fixed feature standardisation (buffers
    ``shift``/``scale``, set from the training features of a frozen backbone, identity
    otherwise), then ``Linear-ReLU-Linear`` (``hidden`` units) or one ``Linear`` (``hidden=0``)."""
    torch = _torch()
    nn = torch.nn

    class CostHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("shift", torch.zeros(dim))
            self.register_buffer("scale", torch.ones(dim))
            self.net = (nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1)) if hidden
                        else nn.Linear(dim, 1))

        def forward(self, f):
            return self.net((f - self.shift) * self.scale)

    return CostHead()


@dataclass
class TrainConfig:
    """What :func:`train_cost_model` does. ``size``/``widths``: CNN input side and channels;
    ``clip_path``: the CLIP checkpoint folder; ``batch_size``: images of *each* class per step;
    ``fpr``: the false-positive rate of the reported threshold; ``threshold``: the sidecar's
    default rule, ``"sign"`` (``C >= 0``) or ``"fpr"`` (the held-out threshold at ``fpr``)."""

    backbone: str = "cnn"
    epochs: int = 8
    seed: int = 0
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    hidden: int = 64
    ranking_weight: float = 1.0
    anchor_weight: float = 1.0
    pairs: str = "all"
    fpr: float = 0.05
    threshold: str = "sign"
    size: int = 32
    widths: tuple[int, ...] = (16, 32, 64)
    clip_path: str | None = None
    feature_batch: int = 32
    progress: bool = True
    data: str = ""          # a description of the training data, recorded in the sidecar

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1.")
        if self.threshold not in ("sign", "fpr"):
            raise ValueError(f"threshold must be 'sign' or 'fpr', got {self.threshold!r}.")
        if not 0.0 < self.fpr < 1.0:
            raise ValueError(f"fpr must be in (0, 1), got {self.fpr}.")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}.")


@dataclass
class TrainedCostModel:
    """A trained backbone + head, its held-out metrics and the data it was trained on."""

    backbone: Backbone
    head: object
    config: TrainConfig
    metrics: dict
    history: list[dict] = field(default_factory=list)
    heldout_inputs: np.ndarray | None = None     # a few prepared held-out images, for export checks
    counts: dict = field(default_factory=dict)

    def module(self):
        """Prepared image batch -> features -> cost, as one torch callable (eval mode)."""
        torch = _torch()
        self.backbone.train(False)
        self.head.eval()

        def run(x):
            with torch.no_grad():
                return self.head(self.backbone.features(x)).reshape(-1)
        return run

    def costs_prepared(self, x: np.ndarray) -> np.ndarray:
        """Costs ``C`` (float64 ``[B]``) of a prepared batch, with the torch model."""
        torch = _torch()
        return self.module()(torch.from_numpy(np.ascontiguousarray(x, np.float32))).double().numpy()

    def costs(self, images: list[np.ndarray]) -> np.ndarray:
        """Costs ``C`` of ``uint8 [H,W,3]`` RGB images (the filter's preprocessing, torch model)."""
        out = [self.costs_prepared(self.backbone.prepare(images[i:i + 64]))
               for i in range(0, len(images), 64)]
        return np.concatenate(out) if out else np.zeros(0)

    @property
    def default_threshold(self) -> float:
        """The sidecar's threshold, a probability ``sigmoid(C)``: 0.5 (sign) or the one at ``fpr``."""
        if self.config.threshold == "sign":
            return 0.5
        return float(min(max(self.metrics["at_fpr"]["probability"], 1e-12), 1 - 1e-12))

    def export(self, out: str | os.PathLike, *, name: str | None = None, overwrite: bool = False) -> Path:
        """Write ``out`` (.onnx, ONE graph: backbone + head, input in the sidecar's layout, output
        ``cost`` ``[B, 1]``), the sidecar ``out.json`` (``kind: "cost"``, sha256, input block,
        metrics, training record) and the trained weights ``out.safetensors`` (head, and the CNN
        when trained). The ONNX graph is checked against the torch model with onnxruntime on
        held-out images first; a difference above :data:`EXPORT_TOLERANCE` is an error and
        nothing is written. Returns the sidecar's path."""
        from ..fileio import atomic_write, save_safetensors  # noqa: PLC0415

        out = Path(out)
        if out.suffix.lower() != ".onnx":
            raise ValueError(f"The cost model file must end in .onnx, got {out}.")
        sidecar, weights = out.with_suffix(".json"), out.with_suffix(".safetensors")
        if not overwrite:
            for p in (out, sidecar, weights):
                if p.exists():
                    raise FileExistsError(f"{p} exists; choose another --out or allow overwriting.")
        sample = self.heldout_inputs
        self.backbone.train(False)
        self.head.eval()
        data = self.backbone.export(self.head, sample[:2])
        check = verify_onnx(data, sample, self.costs_prepared(sample))
        if check["max_abs_diff"] > EXPORT_TOLERANCE:
            raise ModelRunError(f"The exported ONNX graph differs from the torch model by "
                                f"{check['max_abs_diff']:.3g} (> {EXPORT_TOLERANCE}); nothing was written.")
        import hashlib  # noqa: PLC0415

        digest = hashlib.sha256(data).hexdigest()
        spec = self.sidecar(out.name, digest, name or out.stem, check)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda fh: fh.write(data))
        tensors = {f"head.{k}": v.detach().contiguous() for k, v in self.head.state_dict().items()}
        tensors.update({k: v.detach().contiguous() for k, v in self.backbone.state_dict().items()})
        save_safetensors(weights, tensors, {"safet2i": "cost-model", "backbone": self.backbone.name,
                                            "hidden": str(self.config.hidden), "onnx_sha256": digest})
        atomic_write(sidecar, lambda fh: fh.write((json.dumps(spec, indent=2) + "\n").encode()))
        return sidecar

    def sidecar(self, file: str, digest: str, name: str, check: dict) -> dict:
        """The ``kind: "cost"`` sidecar (schema in ``docs/filter.md`` and ``docs/cost-model.md``)."""
        m = self.metrics
        cfg = asdict(self.config)
        cfg.pop("progress", None)
        cfg["widths"] = list(self.config.widths)
        return {
            "schema": 1, "name": name, "kind": "cost",
            "title": f"SafeT2I learned safety cost model ({self.backbone.name} backbone)",
            "model": {"file": file}, "sha256": digest,
            "licence": self.backbone.licence, "source": self.backbone.source,
            "input": dict(self.backbone.input_spec),
            "output": {"labels": [COST_LABEL], "name": "cost", "activation": "none",
                       "meaning": "C: a logit; C > 0 unsafe, sigmoid(C) = probability of unsafe"},
            "thresholds": {COST_LABEL: self.default_threshold},
            "metrics": {
                "split": "held-out", "auroc": m["auroc"], "ece": m["ece"], "ece_bins": m["ece_bins"],
                "at_fpr": m["at_fpr"], "sign_rule": m["sign_rule"], "n_unsafe": m["n_unsafe"],
                "n_safe": m["n_safe"], "mean_cost_unsafe": m["mean_cost_unsafe"],
                "mean_cost_safe": m["mean_cost_safe"], "reliability": m["reliability"],
            },
            "training": {**cfg, "objective": "SC-DPO cost model (reconstruction): ranking + anchoring",
                         "counts": self.counts, "backbone_info": self.backbone.describe(),
                         "final_loss": self.history[-1]["loss"] if self.history else None},
            "export_check": check,
        }


def verify_onnx(data: bytes, x: np.ndarray, expected: np.ndarray) -> dict:
    """Run ONNX ``data`` with onnxruntime (CPU) on the prepared batch ``x`` and compare its costs
    with ``expected`` (the torch model's): ``{"max_abs_diff", "n"}``."""
    from ..runtime import import_onnxruntime  # noqa: PLC0415

    ort = import_onnxruntime()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = np.asarray(sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(x, np.float32)})[0])
    got = got.reshape(len(x), -1)[:, 0].astype(np.float64)
    return {"max_abs_diff": float(np.abs(got - np.asarray(expected, np.float64)).max()), "n": int(len(x)),
            "runtime": f"onnxruntime {ort.__version__} CPU"}


# --------------------------------------------------------------------------- training


def _inputs(backbone: Backbone, data: ImageSet, chunk: int, progress: bool, what: str):
    """The whole set as backbone inputs: prepared images (trainable backbone) or frozen features."""
    torch = _torch()
    from tqdm import tqdm  # noqa: PLC0415

    parts = []
    with tqdm(total=len(data), desc=what, unit="img", disable=not progress, leave=False) as bar:
        for images in data.chunks(chunk):
            x = torch.from_numpy(backbone.prepare(images))
            parts.append(x if not backbone.frozen else backbone.features(x).detach().float())
            bar.update(len(images))
    return torch.cat(parts)


def train_cost_model(
    train: ImageSet, heldout: ImageSet, config: TrainConfig | None = None
) -> TrainedCostModel:
    """Train ``C(x)`` on ``train`` with the SC-DPO objectives (module docstring) and evaluate it
    on ``heldout``. Deterministic for ``config.seed`` (torch's and numpy's generators are
    seeded; each step takes ``batch_size`` unsafe and ``batch_size`` safe images, the smaller
    class cycled). Frozen backbones are run once per image and only the head is trained; the
    CNN is trained with it."""
    torch = _torch()
    from tqdm import tqdm  # noqa: PLC0415

    config = config or TrainConfig()
    config.check()
    for what, s in (("training", train), ("held-out", heldout)):
        if s.labels.min() == s.labels.max():
            raise ValueError(f"The {what} images need both safe and unsafe examples ({s.counts()}).")
    torch.manual_seed(config.seed)
    backbone = make_backbone(config.backbone, size=config.size, clip_path=config.clip_path,
                             widths=config.widths)
    x_train = _inputs(backbone, train, config.feature_batch, config.progress, "train inputs")
    x_held = _inputs(backbone, heldout, config.feature_batch, config.progress, "held-out inputs")
    head = cost_head(backbone.feature_dim, config.hidden)
    if backbone.frozen:   # standardise frozen features with training statistics (fixed, exported)
        head.shift.copy_(x_train.mean(0))
        head.scale.copy_(1.0 / (x_train.std(0) + 1e-6))
    params = list(head.parameters()) + list(backbone.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    rng = np.random.default_rng([config.seed, 2])
    unsafe, safe = np.flatnonzero(train.labels == 1), np.flatnonzero(train.labels == 0)
    b = config.batch_size
    steps = max(1, math.ceil(max(len(unsafe), len(safe)) / b))

    def draw(idx: np.ndarray) -> np.ndarray:        # one epoch's order, cycled to steps * b
        reps = math.ceil(steps * b / len(idx))
        return np.concatenate([rng.permutation(idx) for _ in range(reps)])[:steps * b]

    # x_train / x_held already hold the features of a frozen backbone.
    encode = (lambda x: x) if backbone.frozen else backbone.features
    history = []
    backbone.train(True)
    head.train()
    with tqdm(total=config.epochs * steps, desc=f"train cost-model ({backbone.name})", unit="step",
              disable=not config.progress) as bar:
        for epoch in range(config.epochs):
            order_u, order_s = draw(unsafe), draw(safe)
            total = 0.0
            for step in range(steps):
                iu, is_ = order_u[step * b:(step + 1) * b], order_s[step * b:(step + 1) * b]
                x = x_train[torch.from_numpy(np.concatenate([iu, is_]))]
                c = head(encode(x)).reshape(-1)
                loss = cost_model_loss(c[:len(iu)], c[len(iu):], ranking_weight=config.ranking_weight,
                                       anchor_weight=config.anchor_weight, pairs=config.pairs)
                opt.zero_grad()
                loss.backward()
                opt.step()
                value = float(loss.detach())
                total += value
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{value:.4f}")
            history.append({"epoch": epoch + 1, "loss": total / steps})
    backbone.train(False)
    head.eval()
    with torch.no_grad():
        held_costs = torch.cat([head(encode(x_held[i:i + 256])).reshape(-1)
                                for i in range(0, len(x_held), 256)]).double().numpy()
    metrics = evaluate(held_costs, heldout.labels, config.fpr)
    # A few prepared held-out images of both classes, kept to verify the ONNX export.
    pick = np.concatenate([np.flatnonzero(heldout.labels == 1)[:8], np.flatnonzero(heldout.labels == 0)[:8]])
    sample = np.stack([backbone.prepare([heldout.load(int(i))])[0] for i in pick])
    return TrainedCostModel(backbone, head, config, metrics, history, sample,
                            {"train": train.counts(), "heldout": heldout.counts()})
