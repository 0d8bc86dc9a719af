"""Shared fixtures: benign pictures of people that ship in pip packages (no NSFW material
is ever used or committed) and paths to them on disk."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()  # FACE_FEMALE ~0.81 (RGB) at (173, 82, 100, 97)


@pytest.fixture(scope="session")
def benign_set() -> dict[str, np.ndarray]:
    import matplotlib.cbook as cb
    import skimage.data as d
    from PIL import Image

    with cb.get_sample_data("grace_hopper.jpg") as fh:
        grace = np.asarray(Image.open(fh).convert("RGB"))
    cam = d.camera()
    return {
        "astronaut": d.astronaut(),
        "camera": np.repeat(cam[:, :, None], 3, axis=2),
        "grace_hopper": grace,
        "coffee": d.coffee(),
        "chelsea": d.chelsea(),
        "rocket": d.rocket(),
    }


@pytest.fixture(scope="session")
def benign_files(tmp_path_factory, benign_set) -> dict[str, str]:
    from PIL import Image

    root = tmp_path_factory.mktemp("benign")
    out = {}
    for name, arr in benign_set.items():
        p = root / f"{name}.png"
        Image.fromarray(arr).save(p)
        out[name] = str(p)
    return out
