"""Training SafeT2I's learned safety models.

:mod:`safet2i.train.cost_model`: the learned safety cost model ``C(x)`` (a reconstruction of
SC-DPO's cost model: contrastive ranking + cost anchoring), its metrics and its ONNX export
for the output filter (sidecar ``kind: "cost"``). ``safet2i train cost-model`` is the command
line (:mod:`safet2i.train.cli`). See ``docs/cost-model.md``.

Importing this package imports no torch; the functions import it when called.
"""

from __future__ import annotations

from .backbones import BACKBONES, make_backbone
from .cost_model import (
    COST_LABEL,
    TrainConfig,
    TrainedCostModel,
    anchoring_loss,
    auroc,
    cost_model_loss,
    evaluate,
    expected_calibration_error,
    ranking_loss,
    reliability,
    threshold_at_fpr,
    train_cost_model,
    verify_onnx,
)
from .data import ImageSet, from_csv, from_folders, from_world, split_heldout

__all__ = [
    "BACKBONES", "COST_LABEL", "ImageSet", "TrainConfig", "TrainedCostModel", "anchoring_loss", "auroc",
    "cost_model_loss", "evaluate", "expected_calibration_error", "from_csv", "from_folders", "from_world",
    "make_backbone", "ranking_loss", "reliability", "split_heldout", "threshold_at_fpr", "train_cost_model",
    "verify_onnx",
]
