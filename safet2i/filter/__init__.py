"""Output layer: ONNX safety models score finished images, a policy grades them, and
unsafe regions are censored. See ``docs/filter.md``."""

from .censor import ACTIONS
from .cost import Finding, ImageVerdict, grade
from .detectors import BUILTIN, Detection, ModelSpec, OnnxClassifier, OnnxModel, YoloDetector, load_model
from .pipeline import FilterOutput, SafetyFilter
from .policy import DEFAULT_POLICY, PRESETS, Policy, get_policy, parse_thresholds
from .video import DEFAULT_WINDOW, UnsafeClipError, VideoFilterOutput, filter_frames

__all__ = [
    "ACTIONS", "BUILTIN", "DEFAULT_POLICY", "DEFAULT_WINDOW", "PRESETS", "Detection", "FilterOutput", "Finding",
    "ImageVerdict", "ModelSpec", "OnnxClassifier", "OnnxModel", "Policy", "SafetyFilter",
    "UnsafeClipError", "VideoFilterOutput", "YoloDetector", "filter_frames", "get_policy", "grade",
    "load_model", "parse_thresholds",
]
