"""Full safety weights over a job's whole life, through the stand-in (every variant): a pass
that would run on another checkpoint (hires-fix checkpoint, refiner) is refused up front; a
model reloaded or swapped while the job runs blocks its images and is never overwritten with
the old originals; a restore that fails blocks later jobs on that model until its checkpoint
changes; on Forge the LoRAs the webui merged are merged again on top of the new weights (its
memory manager would otherwise keep the loaded patcher unmerged) and that merge is checked;
the prompt-cond caches are emptied around text-encoder weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import VARIANTS
from test_standin_lora import lora_args, write_duo
from test_weights import B, W, unet, write_weights


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().view(torch.int64)


def state(webui) -> dict:
    return {k: v.detach().clone() for k, v in unet(webui).state_dict().items()}


def same_state(webui, expected: dict) -> bool:
    return all(torch.equal(bits(v), bits(expected[k])) for k, v in unet(webui).state_dict().items())


def placeholders(processed) -> bool:
    from safet2i_a1111.filtering import was_checked
    return all(was_checked(im) and np.asarray(im).std() < 20 for im in processed.images)


def weights_args(webui, choice, **kw):
    return webui.ui_args(filter_enabled=False, weights_enabled=True, weights_file=choice, **kw)


@pytest.mark.parametrize("kw, reason", [
    ({"enable_hr": True, "hr_scale": 2.0, "hr_checkpoint_name": "other.safetensors [abc]"},
     "hires-fix checkpoint (other.safetensors [abc])"),
    ({"refiner_checkpoint": "refiner.safetensors", "refiner_switch_at": 0.8}, "a refiner (refiner.safetensors)"),
], ids=["hires-checkpoint", "refiner"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_hires_checkpoint_and_refiner_are_refused(start, variant, kw, reason):
    webui = start(variant)
    choice = write_weights(webui)
    original = state(webui)
    p, processed = webui.txt2img("a photo", steps=2, args=weights_args(webui, choice), **kw)
    failed = p._safet2i_job.failed
    assert failed and reason in failed and "Use same checkpoint" in failed, failed
    assert placeholders(processed)
    assert same_state(webui, original)            # nothing was applied


# the same checkpoint for the hires pass, or a refiner that never switches in: applied and verified
@pytest.mark.parametrize("kw", [{"enable_hr": True, "hr_scale": 2.0, "hr_checkpoint_name": "Use same checkpoint"},
                                {"refiner_checkpoint": "refiner.safetensors", "refiner_switch_at": 1.0},
                                {"refiner_checkpoint": "None"}],
                         ids=["hires-same-checkpoint", "refiner-switch-at-1", "refiner-none"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_same_checkpoint_hires_and_a_refiner_that_never_switches_in_are_applied(start, variant, kw):
    webui = start(variant)
    choice = write_weights(webui)
    original = state(webui)
    p, processed = webui.txt2img("a photo", steps=2, args=weights_args(webui, choice), **kw)
    assert p._safet2i_job.failed is None, (kw, p._safet2i_job.failed)
    assert "unet 2/2 verified]" in processed.infotexts[0]
    assert same_state(webui, original)


@pytest.mark.parametrize("variant", VARIANTS)
def test_weights_reloaded_into_the_model_mid_job_block_the_images(start, variant):
    """The webui loads another checkpoint's weights into the same model object (A1111's
    ``load_model_weights``) while the job samples: the images are blocked, and the clean-up
    does not write the first checkpoint's originals over the weights now there."""
    webui = start(variant)
    choice = write_weights(webui)
    toy = unet(webui)
    real_affine = toy.affine
    other = {"out.0.weight": torch.full((4,), 0.75, dtype=torch.float64), "out.0.bias": torch.full((4,), 0.25,
                                                                                                 dtype=torch.float64)}
    seen = {}

    def reload_once(x0):
        if not seen:
            seen["w"] = toy.out[0].weight.detach().clone()
            with torch.no_grad():
                for k, v in toy.state_dict(keep_vars=True).items():
                    v.copy_(other[k])
        return real_affine(x0)

    toy.affine = reload_once
    p, processed = webui.txt2img("a photo", steps=2, args=weights_args(webui, choice))
    toy.affine = real_affine
    assert torch.equal(bits(seen["w"]), bits(W))                 # the job did start on the safety weights
    failed = p._safet2i_job.failed
    assert failed and "no longer the safety weights'" in failed and "out.0.weight" in failed, failed
    assert placeholders(processed)
    assert all("blocked" in t for t in processed.infotexts)
    assert same_state(webui, other)                               # left as the reload made it
    assert "not restored" in p._safet2i_job.weights.notes[-1]
    # nothing is marked modified: the next job runs
    p, processed = webui.txt2img("a photo", steps=2, args=webui.ui_args(filter_enabled=False))
    assert p._safet2i_job.failed is None, p._safet2i_job.failed


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_swapped_mid_job_blocks_the_images(start, variant):
    """A new model object replaces the loaded one during the job (Forge's
    ``forge_model_reload``, a checkpoint switch): the job is blocked; the model the weights went
    into gets its originals back; the new model is left alone."""
    webui = start(variant)
    choice = write_weights(webui)
    old_model = webui.shared.sd_model
    original = state(webui)
    toy = unet(webui)
    real_affine = toy.affine
    from _toy import make_sd_model
    new_model = make_sd_model("sd1")
    new_state = {k: v.detach().clone() for k, v in new_model.math.unet.state_dict().items()}

    def swap(x0):
        webui.shared.sd_model = new_model
        return real_affine(x0)

    toy.affine = swap
    p, processed = webui.txt2img("a photo", steps=2, args=weights_args(webui, choice))
    toy.affine = real_affine
    failed = p._safet2i_job.failed
    assert failed and "switched or reloaded during the job" in failed, failed
    assert placeholders(processed)
    assert all(torch.equal(bits(v), bits(original[k])) for k, v in old_model.math.unet.state_dict().items())
    assert all(torch.equal(bits(v), bits(new_state[k])) for k, v in new_model.math.unet.state_dict().items())


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_failed_restore_blocks_later_jobs_until_the_checkpoint_changes(start, monkeypatch, variant):
    webui = start(variant)
    choice = write_weights(webui)
    import safet2i_a1111.weights as weights_layer

    real_restore = weights_layer.core.restore
    monkeypatch.setattr(weights_layer.core, "restore", lambda rep, host: (real_restore(rep, host), ["out.0.weight"])[1])
    p, processed = webui.txt2img("a photo", steps=2, args=weights_args(webui, choice))
    assert p._safet2i_job.failed is None                  # the job itself ran with the safety weights
    assert p._safet2i_job.weights.restored is False       # not marked done
    monkeypatch.setattr(weights_layer.core, "restore", real_restore)
    # any later job on that model is blocked, with the cause named
    for args in (webui.ui_args(filter_enabled=False), weights_args(webui, choice)):
        p, processed = webui.txt2img("a photo", steps=2, args=args)
        failed = p._safet2i_job.failed
        assert failed and "could not be taken out of the loaded model" in failed and choice in failed, failed
        assert placeholders(processed)
    # another checkpoint loaded into the model: the mark is gone
    model = webui.shared.sd_model
    model.sd_checkpoint_info = type("Info", (), {"name_for_extra": "other", "title": "other.safetensors [1]",
                                                 "short_title": "other"})()
    p, processed = webui.txt2img("a photo", steps=2, args=weights_args(webui, choice))
    assert p._safet2i_job.failed is None, p._safet2i_job.failed
    assert weights_layer.modified(model) is None


def test_forge_merges_the_loras_again_on_top_of_the_new_weights(start, monkeypatch):
    """Forge keeps a loaded patcher as it is (``load_models_gpu`` only merges LoRAs into a
    patcher it loads anew), so after the weights changed under a loaded, LoRA-merged patcher
    SafeT2I evicts it; the merge is then checked through ``lora_loader.loaded_hash``."""
    webui = start("forge")
    lora_choice = write_duo()
    choice = write_weights(webui)
    sd = webui.shared.sd_model
    toy = unet(webui)
    real_affine = toy.affine
    layer = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    seen = []

    def spy(x0):
        if not seen:
            loader = sd.forge_objects.unet.model.lora_loader
            weight = sd.lora_layers.unet.get_submodule(layer).weight
            seen.append((loader.loaded_hash == str(list(sd.forge_objects.unet.lora_patches.keys())),
                         float(weight.abs().max()), bits(toy.out[0].weight)))
        return real_affine(x0)

    toy.affine = spy
    p, _ = webui.txt2img("a photo", steps=2, args=lora_args(webui, lora_choice))
    assert p._safet2i_job.failed is None, p._safet2i_job.failed
    merged_alone = seen[-1]
    assert merged_alone[0] and merged_alone[1] > 0                 # Forge merged the LoRA (zeros before)
    seen.clear()
    # the same LoRA set again, now with the weights: Forge reuses the loaded patcher
    p, processed = webui.txt2img("a photo", steps=2, args=lora_args(webui, lora_choice, weights_enabled=True,
                                                                    weights_file=choice))
    assert p._safet2i_job.failed is None, p._safet2i_job.failed
    in_job = seen[0]
    assert in_job[0] and in_job[1] == merged_alone[1]              # merged again, the same patch
    assert torch.equal(in_job[2], bits(W))                         # on top of the safety weights
    assert "blocked" not in processed.infotexts[0]
    # the LoRA alone again (loaded and merged); then, without the eviction, Forge would sample
    # with the LoRA taken out: SafeT2I sees it and blocks
    seen.clear()
    p, _ = webui.txt2img("a photo", steps=2, args=lora_args(webui, lora_choice))
    assert p._safet2i_job.failed is None and seen[0][0] and seen[0][1] == merged_alone[1]
    import safet2i_a1111.weights as weights_layer
    monkeypatch.setattr(weights_layer, "evict_forge_patchers", lambda *a, **k: 0)
    seen.clear()
    p, processed = webui.txt2img("a photo", steps=2, args=lora_args(webui, lora_choice, weights_enabled=True,
                                                                    weights_file=choice))
    toy.affine = real_affine
    assert seen[0][0] is False and seen[0][1] == 0.0               # really not merged
    failed = p._safet2i_job.failed
    assert failed and "did not merge the safety LoRA" in failed, failed
    assert placeholders(processed)


@pytest.mark.parametrize("variant", ("a1111-1.10", "forge"))
def test_cond_caches_are_emptied_in_place(start, variant):
    webui = start(variant)
    sd = webui.shared.sd_model
    p, _ = webui.txt2img("a photo", steps=2, enable_hr=True, hr_scale=2.0)
    processing = webui.processing
    caches = [processing.StableDiffusionProcessing.cached_c, processing.StableDiffusionProcessing.cached_uc,
              processing.StableDiffusionProcessingTxt2Img.cached_hr_c]
    assert all(c[0] is not None for c in caches[:2])
    n = len(sd.encoded)
    webui.txt2img("a photo", steps=2)
    assert len(sd.encoded) == n                  # the same prompt: the webui reuses its cached conds
    import safet2i_a1111.weights as weights_layer
    assert weights_layer.clear_cond_caches(p) >= 3
    assert all(all(x is None for x in c) for c in caches)
    assert p.cached_c is caches[0] and all(x is None for x in p.cached_c)
    webui.txt2img("a photo", steps=2)
    assert len(sd.encoded) > n                   # encoded again


@pytest.mark.parametrize("variant", VARIANTS)
def test_safety_lora_refuses_a_refiner_not_a_hires_pass(start, variant):
    """The refiner takes over mid-sampling without the webui activating extra networks for it;
    the hires pass gets the LoRA through its own activation (verified there)."""
    webui = start(variant)
    choice = write_duo()
    p, processed = webui.txt2img("a photo", steps=2, args=lora_args(webui, choice),
                                 refiner_checkpoint="refiner.safetensors", refiner_switch_at=0.5)
    failed = p._safet2i_job.failed
    assert failed and "a refiner (refiner.safetensors)" in failed and "safety LoRA" in failed, failed
    assert placeholders(processed)
    p, processed = webui.txt2img("a photo", steps=2, args=lora_args(webui, choice), enable_hr=True, hr_scale=2.0,
                                 hr_checkpoint_name="Use same checkpoint")
    assert p._safet2i_job.failed is None, p._safet2i_job.failed


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_switch_is_not_refused_and_forge_hires_modules_are(start, variant):
    webui = start(variant)
    choice = write_weights(webui)
    title = webui.shared.sd_model.sd_checkpoint_info.title
    for kw in ({"enable_hr": True, "hr_scale": 2.0, "hr_checkpoint_name": title},   # the loaded one: no switch
               {"refiner_checkpoint": "none", "refiner_switch_at": 0.5},
               {"refiner_checkpoint": title, "refiner_switch_at": 0.5}):
        p, _ = webui.txt2img("a photo", steps=2, args=weights_args(webui, choice), **kw)
        assert p._safet2i_job.failed is None, (kw, p._safet2i_job.failed)
    if variant != "forge":
        return
    webui.shared.opts.forge_additional_modules = []
    p, processed = webui.txt2img("a photo", steps=2, args=weights_args(webui, choice), enable_hr=True, hr_scale=2.0,
                                 hr_additional_modules=["/models/VAE/other.safetensors"])
    failed = p._safet2i_job.failed
    assert failed and "other hires-fix modules (/models/VAE/other.safetensors)" in failed, failed
    assert placeholders(processed)
    for same in (["Use same choices"], []):
        p, _ = webui.txt2img("a photo", steps=2, args=weights_args(webui, choice), enable_hr=True, hr_scale=2.0,
                             hr_additional_modules=same)
        assert p._safet2i_job.failed is None, (same, p._safet2i_job.failed)


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_alternative_unet_blocks_the_model_layer(start, variant):
    """A1111 ``sd_unet`` (TensorRT, ...): the model's weights are not what samples."""
    webui = start(variant)
    choice = write_weights(webui)
    from modules import sd_unet
    sd_unet.current_unet = type("TrtUnet", (), {})()
    try:
        for args in (weights_args(webui, choice), lora_args(webui, write_duo())):
            p, processed = webui.txt2img("a photo", steps=2, args=args)
            failed = p._safet2i_job.failed
            assert failed and "alternative UNet (TrtUnet" in failed, failed
            assert placeholders(processed)
        p, _ = webui.txt2img("a photo", steps=2, args=webui.ui_args(filter_enabled=False))
        assert p._safet2i_job.failed is None        # the other layers do not depend on the UNet's weights
    finally:
        sd_unet.current_unet = None


def test_fp16_weight_caches_are_refused(start):
    """A1111 fp8 storage with "Cache FP16 weight for LoRA" keeps FP16 copies of the original
    weights that its LoRA merge writes back over ours."""
    webui = start("a1111-1.10")
    choice = write_weights(webui)
    original = state(webui)
    norm = unet(webui).out[0]
    norm.fp16_weight = norm.weight.detach().half()
    p, processed = webui.txt2img("a photo", steps=2, args=weights_args(webui, choice))
    failed = p._safet2i_job.failed
    assert failed and "Cache FP16 weight for LoRA" in failed and "out.0" in failed, failed
    assert placeholders(processed) and same_state(webui, original)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_partly_changed_model_is_marked_modified(start, variant):
    webui = start(variant)
    choice = write_weights(webui)
    toy = unet(webui)
    real_affine = toy.affine

    def change_one(x0):
        with torch.no_grad():
            toy.out[0].bias.copy_(torch.full((4,), 0.5, dtype=torch.float64))
        return real_affine(x0)

    toy.affine = change_one
    p, processed = webui.txt2img("a photo", steps=2, args=weights_args(webui, choice))
    toy.affine = real_affine
    assert p._safet2i_job.failed and placeholders(processed)
    p, processed = webui.txt2img("a photo", steps=2, args=webui.ui_args(filter_enabled=False))
    failed = p._safet2i_job.failed
    assert failed and "partly changed during the job" in failed and "out.0.bias" in failed, failed


@pytest.mark.parametrize("variant", ("a1111-1.10", "forge"))
def test_unchanged_tensors_are_not_read_again(start, monkeypatch, variant):
    """After the first full comparison, a check reads only tensors written since (their
    storage or in-place version changed); the restore compares everything once more."""
    webui = start(variant)
    choice = write_weights(webui)
    import safet2i_a1111.weights as weights_layer
    real, calls = weights_layer.core.same_bits, []
    monkeypatch.setattr(weights_layer.core, "same_bits", lambda a, b: calls.append(1) or real(a, b))
    p, _ = webui.txt2img("a photo", steps=2, n_iter=3, args=weights_args(webui, choice))
    assert p._safet2i_job.failed is None
    # 2 tensors: the apply's proof, the first check after a pass (the two later passes read
    # nothing), the restore's full check, the proof of the originals written back
    # (a comparison after every pass would be 2 + 3·2 + 2 + 2 = 12)
    assert len(calls) == 4 * 2, len(calls)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_image_saved_before_hires_fix_is_checked_too(start, variant):
    webui = start(variant)
    choice = write_weights(webui)
    webui.shared.opts.save_images_before_highres_fix = True
    toy = unet(webui)
    real_affine = toy.affine
    done = []

    def reload_once(x0):
        if not done:
            done.append(True)
            with torch.no_grad():
                toy.out[0].weight.copy_(torch.full((4,), 0.75, dtype=torch.float64))
        return real_affine(x0)

    toy.affine = reload_once
    kw = {"hr_cfg": 7.0} if variant in ("forge", "reforge") else {}
    p, processed = webui.txt2img("a photo", steps=2, enable_hr=True, hr_scale=2.0,
                                 args=weights_args(webui, choice), **kw)
    toy.affine = real_affine
    from PIL import Image
    from safet2i_a1111.filtering import blocked_image
    before = [f for f in webui.saved() if "-before-highres-fix" in f.name]
    assert len(before) == 1
    got = Image.open(before[0]).convert("RGB")
    assert np.array_equal(np.asarray(got), np.asarray(blocked_image(got.size, "blocked").convert("RGB")))
    assert "before saving an image" in p._safet2i_job.failed


def test_forge_extension_patches_added_after_ours_are_not_a_failure(start, monkeypatch):
    """Another extension clones the UNet before the pass and adds its own patches (LayerDiffuse,
    Fooocus inpaint do): the merged set is then ours plus theirs, which is fine."""
    webui = start("forge")
    lora_choice = write_duo()
    import backend.sampling.sampling_function as sf
    real_prepare = sf.sampling_prepare
    layer = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight"

    def their_extension(unet, x):
        fo = webui.shared.sd_model.forge_objects
        theirs = fo.unet.clone()
        theirs.add_patches(filename="their_patch.safetensors", patches={
            layer: ("lora", (torch.ones(320, 1), torch.ones(1, 320), None, None, None))})
        fo.unet = theirs
        return real_prepare(theirs, x)

    monkeypatch.setattr(sf, "sampling_prepare", their_extension)
    p, processed = webui.txt2img("a photo", steps=2, args=lora_args(webui, lora_choice))
    assert p._safet2i_job.failed is None, p._safet2i_job.failed
    loader = webui.shared.sd_model.forge_objects.unet.model.lora_loader
    assert "their_patch.safetensors" in loader.loaded_hash and p._safet2i_job.lora.name in loader.loaded_hash
    assert "blocked" not in processed.infotexts[0]
