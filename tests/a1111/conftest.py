"""Fixtures: the webui stand-in (``fakewebui/``) started with the extension, per variant."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kit import Webui  # noqa: E402

VARIANTS = ("a1111-1.10", "a1111-1.7", "forge", "reforge")


@pytest.fixture
def start(tmp_path):
    """``start(variant, argv=(), kind="sd1")`` → a running :class:`kit.Webui` (closed after the test)."""
    started = []

    def _start(variant="a1111-1.10", argv=(), kind="sd1"):
        w = Webui(variant, tmp_path / f"w{len(started)}", argv, kind).start()
        started.append(w)
        return w

    yield _start
    for w in reversed(started):
        w.close()


@pytest.fixture(params=VARIANTS)
def webui(request, start):
    return start(request.param)


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()   # a face: flagged by the face-only policy (FACE_FEMALE ~0.8)


@pytest.fixture(scope="session")
def coffee() -> np.ndarray:
    import skimage.data

    return skimage.data.coffee()[:, :400][:400]   # no person: passes every policy
