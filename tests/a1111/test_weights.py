"""Full safety weights through the stand-in on every variant: the toy UNet's real parameters
(``out.0``, LDM names) are replaced for the job, bit for bit, and restored afterwards; the
infotext round-trips; a failure blocks the images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import VARIANTS

W = torch.tensor([1.5, 0.5, 2.0, 1.25], dtype=torch.float64)
B = torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=torch.float64)


def write_weights(webui, name="toy_esd.safetensors", tensors=None) -> str:
    from modules import paths

    folder = Path(paths.models_path) / "safety_models"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors or {"out.0.weight": W, "out.0.bias": B}, str(folder / name))
    return f"safety_models/{name}"


def unet(webui):
    return webui.shared.sd_model.math.unet


def pixels(processed):
    return [np.asarray(im, dtype=np.float64) for im in processed.images]


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_weights_replace_the_unet_for_the_job_only(start, variant):
    webui = start(variant)
    choice = write_weights(webui)
    original = {k: v.clone() for k, v in unet(webui).state_dict().items()}
    seen = {}
    toy = unet(webui)
    real_affine = toy.affine

    def spy(x0):     # what the sampler's model really uses during the job
        seen.setdefault("w", toy.out[0].weight.clone())
        seen.setdefault("b", toy.out[0].bias.clone())
        return real_affine(x0)

    toy.affine = spy
    _, plain = webui.txt2img("a photo", steps=2, args=webui.ui_args(filter_enabled=False))
    assert torch.equal(seen.pop("w"), original["out.0.weight"])
    seen.clear()
    p, on = webui.txt2img("a photo", steps=2, args=webui.ui_args(filter_enabled=False, weights_enabled=True,
                                                                  weights_file=choice))
    job = p._safet2i_job
    assert job.failed is None, job.failed
    assert torch.equal(seen["w"].view(torch.int64), W.view(torch.int64)) and torch.equal(seen["b"], B)
    # the images differ from those of the original model
    assert any(np.abs(a - b).max() > 0 for a, b in zip(pixels(plain), pixels(on)))
    # restored exactly after the job
    for k, v in unet(webui).state_dict().items():
        assert torch.equal(v.view(torch.int64), original[k].view(torch.int64)), k
    info = on.infotexts[0] if hasattr(on, "infotexts") else on.info
    assert f"SafeT2I weights: {choice} [sha256 " in info and "unet 2/2 verified]" in info
    # paste restores the option; parameters without the key leave it as it is
    pasted = webui.paste(info)
    assert pasted["weights_enabled"] is True and pasted["weights_file"] == choice and pasted["weights_part"] == "auto"
    other = webui.paste("a cat\nSteps: 2, Seed: 1")
    assert other["weights_enabled"] is None and other["weights_file"] is None
    # the next job without the option runs on the original model and gives the same images
    _, again = webui.txt2img("a photo", steps=2, args=webui.ui_args(filter_enabled=False))
    assert all(np.array_equal(a, b) for a, b in zip(pixels(plain), pixels(again)))


def write_failing_weights(webui) -> dict:
    """The good file and two that fail, side by side; the choices by failure."""
    write_weights(webui)
    bad = write_weights(webui, "wrong_shape.safetensors", {"out.0.weight": torch.ones(5, dtype=torch.float64),
                                                            "out.0.bias": B})
    partial = write_weights(webui, "partial.safetensors", {"out.0.weight": W})
    return {"wrong-shape": bad, "partial": partial, "outside-the-folder": "safety_models/../x.safetensors"}


@pytest.mark.parametrize("failure, reason", [("wrong-shape", "match no tensor"), ("partial", "partial file"),
                                             ("outside-the-folder", "refused")],
                         ids=["wrong-shape", "partial", "outside-the-folder"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_weights_failures_block_the_images(start, variant, failure, reason):
    webui = start(variant)
    choice = write_failing_weights(webui)[failure]
    from safet2i_a1111.filtering import was_checked
    p, processed = webui.txt2img("a photo", steps=2, args=webui.ui_args(weights_enabled=True, weights_file=choice))
    assert p._safet2i_job.failed and reason in p._safet2i_job.failed, p._safet2i_job.failed
    assert all(was_checked(im) for im in processed.images)
    assert all(np.asarray(im).std() < 20 for im in processed.images)        # placeholders
    assert all("blocked" in t and "safety weights" in t for t in processed.infotexts)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_failure_after_the_weights_were_applied_blocks_and_restores(start, monkeypatch, variant):
    webui = start(variant)
    good = write_weights(webui)
    original = {k: v.clone() for k, v in unet(webui).state_dict().items()}
    # an injected failure during sampling (after the weights were applied): blocked, still restored
    import safet2i_a1111.script as S

    def boom(*a, **k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(S.Job, "check_layers", boom)
    p, processed = webui.txt2img("a photo", steps=2, args=webui.ui_args(weights_enabled=True, weights_file=good))
    assert p._safet2i_job.failed and "injected failure" in p._safet2i_job.failed
    assert all(np.asarray(im).std() < 20 for im in processed.images)
    for k, v in unet(webui).state_dict().items():
        assert torch.equal(v, original[k]), k
