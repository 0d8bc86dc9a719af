"""Fail closed: the webui logs and swallows exceptions raised by extension hooks and callbacks,
so an error anywhere in ours must block the job's images (with the reason in the infotext),
never let them through unchecked or unguided."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import VARIANTS


def boom(*args, **kwargs):
    raise RuntimeError("injected failure")


def script_module():
    return sys.modules["safet2i_a1111.script"]


# (where to inject, what, needs guidance, variants)
INJECTIONS = {
    "setup": ("JobConfig.from_args", False),                  # the job's config cannot even be built
    "before_process": ("SafeT2IScript._activate", False),
    "process": ("JobConfig.infotext", False),
    "process_batch": ("_encode_concept", True),
    "process_before_every_sampling": ("forge_guidance.patch_unet", True),
    "cfg_denoiser": ("callbacks:_is_eps_sampler", True),
    "postprocess_batch": ("Job.check_guided", True),
    "postprocess_image": ("verdict_text", False),
}


def inject(monkeypatch, target: str):
    module, _, target = target.rpartition(":")           # "module:name" for another module of ours
    mod = sys.modules[f"safet2i_a1111.{module}"] if module else script_module()
    owner_name, _, attr = target.rpartition(".")
    owner = mod
    for part in owner_name.split(".") if owner_name else []:
        owner = getattr(owner, part)
    monkeypatch.setattr(owner, attr, boom)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("hook", list(INJECTIONS))
def test_an_exception_in_any_hook_blocks_the_images(start, monkeypatch, variant, hook):
    target, guidance = INJECTIONS[hook]
    if hook == "process_before_every_sampling" and variant.startswith("a1111"):
        pytest.skip("A1111 guidance does not patch the UNet")
    if hook == "cfg_denoiser" and not variant.startswith("a1111"):
        pytest.skip("Forge/reForge guidance does not use the CFG callbacks")
    webui = start(variant)
    args = webui.ui_args(guidance_enabled=guidance)
    inject(monkeypatch, target)
    p, processed = webui.txt2img(["a", "b"], batch_size=2, steps=2, args=args)
    job = p._safet2i_job
    if hook != "postprocess_image":      # a failure while filtering one image blocks that image
        assert job.failed and "injected failure" in job.failed
    from safet2i_a1111.filtering import was_checked
    for image, text in zip(processed.images[1:], processed.infotexts[1:]):
        assert was_checked(image) and np.asarray(image).std() < 20, hook          # placeholders
        assert "SafeT2I verdict" in text and "blocked" in text and "injected failure" in text
    assert was_checked(processed.images[0])                                      # the grid too


@pytest.mark.parametrize("variant", ["a1111-1.10", "a1111-1.7"])
def test_an_exception_in_postprocess_blocks_what_is_returned(start, monkeypatch, variant):
    webui = start(variant)
    monkeypatch.setattr(script_module(), "was_checked", boom)
    p, processed = webui.txt2img(["a", "b"], batch_size=2, steps=2)
    assert "injected failure" in p._safet2i_job.failed
    assert all(np.asarray(im).std() < 20 for im in processed.images)
    assert script_module()._ACTIVE == []


@pytest.mark.parametrize("variant", ["a1111-1.10", "forge"])
def test_a_failing_save_check_writes_a_placeholder(start, monkeypatch, variant):
    webui = start(variant)
    webui.shared.opts.save_images_before_face_restoration = True
    monkeypatch.setattr(sys.modules["safet2i_a1111.callbacks"], "filter_image", boom)   # the save hook's
    p, processed = webui.txt2img("a", steps=2, restore_faces=True)
    from PIL import Image
    files = webui.saved("*-before-face-restoration.png")
    assert len(files) == 1 and np.asarray(Image.open(files[0])).std() < 20


def test_unknown_arguments_block_the_job(start):
    webui = start("a1111-1.10")
    args = webui.ui_args(filter_policy="lenient")
    p, processed = webui.txt2img("a", steps=2, args=args)
    assert "bad SafeT2I arguments" in p._safet2i_job.failed
    assert "blocked" in processed.infotexts[0] and np.asarray(processed.images[0]).std() < 20


@pytest.mark.parametrize("variant", ["a1111-1.10", "forge"])
def test_an_exception_in_the_extras_script_blocks_its_image(start, monkeypatch, variant):
    webui = start(variant)
    monkeypatch.setattr(sys.modules["safet2i_a1111.extras"], "filter_image", boom)
    from PIL import Image
    outputs, info, _ = webui.extras(Image.new("RGB", (64, 64), "red"), save_output=False)
    assert np.asarray(outputs[0]).std() < 20 and "injected failure" in info


def test_which_webui_models_guidance_accepts(start):
    """Forge's flow models (const predictor) are guided; A1111's SD3 and unknown models are refused."""
    from types import SimpleNamespace

    start("forge")
    _guidance_model_error = sys.modules["safet2i_a1111.callbacks"]._guidance_model_error

    forge_flux = SimpleNamespace(is_sd1=False, is_sd2=False, is_sdxl=False, is_sd3=False, forge_objects=SimpleNamespace(
        unet=SimpleNamespace(model=SimpleNamespace(predictor=SimpleNamespace(prediction_type="const")))))
    assert _guidance_model_error(forge_flux) is None
    a1111_sd3 = SimpleNamespace(is_sd1=False, is_sd2=False, is_sdxl=False, is_sd3=True)
    assert "not SD3" in _guidance_model_error(a1111_sd3)
    forge_other = SimpleNamespace(is_sd1=False, is_sd2=False, is_sdxl=False, forge_objects=SimpleNamespace(
        unet=SimpleNamespace(model=SimpleNamespace(predictor=SimpleNamespace(prediction_type="epsilon")))))
    assert "SimpleNamespace" in _guidance_model_error(forge_other)
    assert _guidance_model_error(SimpleNamespace(is_sd1=True, is_sd2=False, is_sdxl=False)) is None
