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


@pytest.fixture(scope="session")
def micro_lab(tmp_path_factory):
    """The micro-lab: a 16 px lab model trained for 3 steps (its images are noise) and a small
    judge of its world, saved; ``(config, model folder, judge, judge file)``."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    if __import__("importlib.util").util.find_spec("open_clip") is None:
        pytest.skip("open-clip-torch (for its CLIP BPE file) is not installed")
    from safet2i.lab.judge import JudgeConfig, train_classifier
    from safet2i.lab.model import LabModelConfig, train

    root = tmp_path_factory.mktemp("microlab")
    cfg = LabModelConfig.quick(size=16, steps=3)
    folder = train(cfg, cache_dir=root / "models", progress=False)
    judge = train_classifier(JudgeConfig(world=cfg.world, n_train=96, epochs=1, batch_size=32, n_eval=10),
                             progress=False)
    return cfg, folder, judge, judge.save(root / "judge.safetensors")


@pytest.fixture(scope="session")
def family_pipes(tmp_path_factory):
    """The tiny random SD3, Flux, Qwen-Image and Wan pipelines of ``tiny_families`` (seed 0),
    built once per session and shared by the modules that use them unchanged (a test that swaps a
    scheduler or wraps a module restores it)."""
    import torch
    from tiny_families import FAMILIES

    torch.set_num_threads(1)
    return {name: fam.build(tmp_path_factory.mktemp(name)) for name, fam in FAMILIES.items()}

