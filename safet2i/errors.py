"""Typed errors shared by every layer.

Every safety step fails *closed*: when it cannot run it raises one of these, naming the
cause, instead of letting an unchecked image or an unpatched model through.
"""

from __future__ import annotations


class SafeT2IError(RuntimeError):
    """Base class of every error raised by SafeT2I."""


class MissingDependencyError(SafeT2IError, ImportError):
    """An optional package a feature needs is not installed."""

    def __init__(self, package: str, feature: str, hint: str | None = None):
        self.package = package
        self.feature = feature
        msg = f"{feature} needs the Python package '{package}', which is not installed."
        msg += " " + (hint or f"Install it with: python -m pip install {package}")
        super().__init__(msg)


class ModelLoadError(SafeT2IError):
    """A safety model file is missing, corrupt, of the wrong kind, or cannot be opened."""


class ModelRunError(SafeT2IError):
    """A safety model was loaded but failed while running."""


class ImageInputError(SafeT2IError, ValueError):
    """An image cannot be read or has a form SafeT2I cannot check."""


class ImageBudgetError(ImageInputError):
    """An image file is over the decoded-pixel or byte budget (it is refused before the
    memory is taken, never with a ``MemoryError``)."""


class PolicyError(SafeT2IError, ValueError):
    """A filter policy (class set, thresholds, expansion) is malformed."""


class UnsafeContentError(SafeT2IError):
    """Raised by the ``block`` action: an image was judged unsafe and must not leave.

    ``indices`` are the batch positions judged unsafe and ``report`` the per-image
    findings (a list of dicts, the same shape as a JSON report's ``images``).
    """

    def __init__(self, indices: list[int], report: list[dict] | None = None):
        self.indices = list(indices)
        self.report = report or []
        labels = sorted(
            {d["label"] for r in self.report for d in r.get("detections", []) if d.get("flagged")}
        )
        what = f" ({', '.join(labels)})" if labels else ""
        super().__init__(
            f"SafeT2I blocked {len(self.indices)} unsafe image(s) at batch position(s) "
            f"{self.indices}{what}."
        )
