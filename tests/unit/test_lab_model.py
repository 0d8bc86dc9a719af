"""The lab's model (safet2i.lab.model), its tokenizer and `safet2i lab train`: the real CLIP
BPE tokenizer, a micro training run that saves a diffusers folder StableDiffusionPipeline
loads, the cache, bit-identical resume, the config hash, and SafeT2I's diffusers paths on the
saved pipeline. Micro configs only (16 px, a handful of steps): the images are noise."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from safet2i.errors import SafeT2IError  # noqa: E402
from safet2i.lab import model as lab_model  # noqa: E402
from safet2i.lab.model import LabModelConfig, load_pipeline, model_folder, train, training_info  # noqa: E402
from safet2i.lab.world import WorldConfig  # noqa: E402

needs_bpe = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("open_clip") is None,
    reason="open-clip-torch (for its CLIP BPE file) is not installed")


def micro(**kw) -> LabModelConfig:
    kw.setdefault("size", 16)
    return LabModelConfig.quick(**kw)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file of a saved pipeline, keyed by file and name."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.relative_to(folder)}:{k}"] = v
    return out


# --------------------------------------------------------------------------- tokenizer


@needs_bpe
def test_clip_tokenizer_is_the_real_bpe_vocabulary(tmp_path):
    from safet2i.lab.tokenizer import clip_tokenizer

    tok = clip_tokenizer(tmp_path / "tok")
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id) == (49406, 49407)
    assert tok("nudity").input_ids[1:-1] == tok.convert_tokens_to_ids(["nu", "dity</w>"])
    assert tok.convert_ids_to_tokens(tok("a red circle").input_ids) == [
        "<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]
    assert tok("a red circle").input_ids == [49406, 320, 736, 7117, 49407]  # SD 1.x's ids
    assert (tmp_path / "tok" / "vocab.json").is_file() and (tmp_path / "tok" / "merges.txt").is_file()
    assert len(json.loads((tmp_path / "tok" / "vocab.json").read_text())) == 49408


def test_clip_tokenizer_without_open_clip_names_the_install(monkeypatch):
    import importlib.util

    from safet2i.lab import tokenizer

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "open_clip" else real(name, *a))
    with pytest.raises(SafeT2IError, match=r"pip install open-clip-torch --no-deps"):
        tokenizer.clip_tokenizer()


# --------------------------------------------------------------------------- config and cache


def test_config_hash_follows_the_config():
    a = micro()
    assert a.config_hash() == micro().config_hash() and len(a.config_hash()) == 16
    int(a.config_hash(), 16)
    others = [micro(steps=5), micro(seed=1), micro(lr=2e-3), micro(text_width=64),
              micro(world=WorldConfig(size=16, concept="blue")), micro(world=WorldConfig(size=16, seed=3)),
              micro(form_mix=(("benign", 1), ("direct", 1)))]
    hashes = {c.config_hash() for c in others}
    assert len(hashes) == len(others) and a.config_hash() not in hashes
    back = LabModelConfig.from_dict(json.loads(a.to_json()))
    assert back == a and back.config_hash() == a.config_hash()
    assert LabModelConfig().config_hash() != a.config_hash()


@pytest.mark.parametrize("kw,match", [
    (dict(size=17), "divide"), (dict(steps=0), "steps"), (dict(unet_channels=(32, 48)), "norm_groups"),
    (dict(world=WorldConfig(size=32)), "differ"), (dict(form_mix=(("weird", 1),)), "form_mix"),
    (dict(lr=0.0), "lr"), (dict(unet_cross_attention=(True,)), "unet_cross_attention"),
    (dict(vae_gradient_weight=-1.0), "vae_gradient_weight"), (dict(object_weight=-0.5), "object_weight"),
])
def test_bad_configs_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        micro(**kw)


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("SAFET2I_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert lab_model.default_cache_dir() == tmp_path / "xdg" / "safet2i" / "lab"
    monkeypatch.setenv("SAFET2I_CACHE", str(tmp_path / "s"))
    assert lab_model.default_cache_dir() == tmp_path / "s" / "lab"
    cfg = micro()
    assert model_folder(cfg) == tmp_path / "s" / "lab" / cfg.config_hash()
    assert model_folder(cfg, tmp_path / "c") == tmp_path / "c" / cfg.config_hash()


def test_form_mix_and_learning_rate():
    pattern = lab_model.form_pattern(LabModelConfig().form_mix)
    assert len(pattern) == 20 and pattern.count("benign") == 15 and pattern.count("direct") == 2
    assert {f: pattern.count(f) for f in ("synonym", "indirect", "misspelled")} == \
        {"synonym": 1, "indirect": 1, "misspelled": 1}
    assert pattern[:10].count("direct") == 1 and pattern[:10].count("benign") in (7, 8)  # spread evenly, not in blocks
    cfg = LabModelConfig()
    assert lab_model.lr_at(cfg, 0) == pytest.approx(cfg.lr / cfg.warmup_steps)
    assert lab_model.lr_at(cfg, cfg.warmup_steps) == pytest.approx(cfg.lr)
    assert lab_model.lr_at(cfg, cfg.steps - 1) == pytest.approx(cfg.lr * cfg.lr_final, rel=1e-3)


@needs_bpe
def test_the_edge_term_adds_to_the_first_autoencoder_loss(tmp_path):
    """vae_gradient_weight adds the L1 of the image-gradient error: at the first step (same
    initial weights, same batch) the loss is the plain one plus a positive term."""
    plain = training_info(train(micro(steps=1, vae_gradient_weight=0.0), cache_dir=tmp_path, progress=False))
    edged = training_info(train(micro(steps=1, vae_gradient_weight=1.0), cache_dir=tmp_path, progress=False))
    assert edged["losses"]["vae"][0] > plain["losses"]["vae"][0] > 0


@needs_bpe
def test_object_weight_reweighs_the_first_diffusion_loss(tmp_path):
    """object_weight weighs latent pixels under objects up: the same first diffusion step (same
    weights, batch, noise and timesteps) gives another loss than the unweighted one."""
    plain = training_info(train(micro(steps=1, object_weight=0.0), cache_dir=tmp_path, progress=False))
    heavy = training_info(train(micro(steps=1, object_weight=4.0), cache_dir=tmp_path, progress=False))
    assert plain["losses"]["vae"] == heavy["losses"]["vae"]
    assert heavy["losses"]["diffusion"][0] != pytest.approx(plain["losses"]["diffusion"][0], rel=1e-4)


@needs_bpe
def test_saved_weights_are_the_final_ones_by_default_or_their_ema(tmp_path, monkeypatch):
    """ema_decay 0 (the default) saves the UNet and text encoder as the last step left them;
    ema_decay 0.9 saves their EMA with decay min(0.9, (1 + n) / (10 + n)) from the weights the
    phase started with, recomputed here in float64 from every step's weights. The EMA never
    feeds back: both runs train identically (same losses)."""
    starts, steps = [], []
    real = lab_model._diffusion_step

    def recorded(run, step):
        if step == 0:
            starts.append([p.detach().double().clone() for p in run.trained()])
        loss = real(run, step)
        steps.append([p.detach().double().clone() for p in run.trained()])
        return loss

    monkeypatch.setattr(lab_model, "_diffusion_step", recorded)

    def saved(folder):
        pipe = load_pipeline(folder)
        return [p.detach().double() for p in list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())]

    assert LabModelConfig().ema_decay == 0.0
    raw = train(micro(steps=4), cache_dir=tmp_path / "raw", progress=False)
    got = saved(raw)
    assert len(got) == len(steps[-1]) > 50 and all(torch.equal(a, b) for a, b in zip(got, steps[-1]))

    first = steps
    starts.clear()
    steps = []
    ema = train(micro(steps=4, ema_decay=0.9), cache_dir=tmp_path / "ema", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(steps[-1], first[-1]))         # the same training
    assert training_info(ema)["losses"] == training_info(raw)["losses"]
    expected = starts[0]
    for n, params in enumerate(steps):
        d = min(0.9, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * p for e, p in zip(expected, params)]
    got = saved(ema)
    assert max(float((a - b).abs().max()) for a, b in zip(got, expected)) < 1e-6
    assert any(not torch.equal(a, b) for a, b in zip(got, first[-1]))               # not the final weights


@needs_bpe
def test_default_architecture():
    """The lab model's sizes (docs/lab.md, "The model")."""
    cfg = LabModelConfig()
    pipe = lab_model.build_pipeline(cfg)
    assert pipe.vae_scale_factor == 2 and cfg.latent_size == 16
    assert lab_model.parameter_counts(pipe) == {"vae": 658375, "unet": 10944132, "text_encoder": 7127424}
    assert pipe.unet.config.addition_embed_type == "text"  # pooled text in the timestep embedding
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 128
    assert pipe.scheduler.config.prediction_type == "epsilon"


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    if __import__("importlib.util").util.find_spec("open_clip") is None:
        pytest.skip("open-clip-torch (for its CLIP BPE file) is not installed")
    cache = tmp_path_factory.mktemp("labcache")
    cfg = micro()
    return cfg, cache, train(cfg, cache_dir=cache, progress=False)


def test_micro_training_saves_a_diffusers_folder(trained):
    from diffusers import StableDiffusionPipeline

    cfg, cache, folder = trained
    assert folder == cache / cfg.config_hash()
    assert not (cache / (cfg.config_hash() + ".partial")).exists()  # checkpoints cleaned up
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
            "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    info = training_info(folder)
    assert info["config_hash"] == cfg.config_hash() and info["finished"]
    assert len(info["losses"]["vae"]) == cfg.vae_steps and len(info["losses"]["diffusion"]) == cfg.steps
    assert all(np.isfinite(info["losses"]["diffusion"]))
    assert len(info["losses"]["text_probe"]) == cfg.steps and all(np.isfinite(info["losses"]["text_probe"]))

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None and len(pipe.tokenizer) == 49408
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    image = pipe(["a red circle"], num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
    assert 0.0 <= image.min() and image.max() <= 1.0
    # the saved weights are the trained (EMA) ones, not the initial ones
    init = lab_model.build_pipeline(cfg)
    assert not torch.equal(init.unet.conv_out.weight, pipe.unet.conv_out.weight)
    assert not torch.equal(init.vae.decoder.conv_out.weight, pipe.vae.decoder.conv_out.weight)


def test_the_latent_is_standardised_and_decoding_unchanged():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, latent_channels=4).eval()
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean * 3 + 0.5  # an off-centre latent, decoded before ...
        vae.quant_conv.weight.mul_(3)
        vae.quant_conv.bias.mul_(3).add_(torch.tensor([0.5] * 4 + [0.0] * 4))
        vae.post_quant_conv.weight.div_(3)
        before = vae.decode(vae.encode(x).latent_dist.mean).sample
        lab_model.standardise_latents(vae, z)
        post = vae.encode(x).latent_dist
        after = vae.decode(post.mean).sample
    assert torch.allclose(post.mean.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(post.mean.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4)
    assert torch.allclose(before, after, atol=1e-4) and vae.config.scaling_factor == 1.0


def test_a_finished_model_is_returned_without_training(trained, monkeypatch):
    cfg, cache, folder = trained

    def boom(*a, **k):
        raise AssertionError("trained again")

    for name in ("_vae_step", "_diffusion_step", "_Run", "build_pipeline"):
        monkeypatch.setattr(lab_model, name, boom)
    before = weights(folder)
    assert train(cfg, cache_dir=cache, progress=False) == folder
    assert train(cfg, cache_dir=cache, resume=False, progress=False) == folder
    after = weights(folder)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_load_pipeline_refuses_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(SafeT2IError, match="not a saved lab model"):
        load_pipeline(tmp_path)


class Stop(Exception):
    pass


@needs_bpe
@pytest.mark.parametrize("stop_at", [("vae", 3), ("diffusion", 3)])
def test_an_interrupted_run_resumes_bit_identically(tmp_path, monkeypatch, stop_at):
    """Checkpoints every 2 steps; interrupted after step 3 of a phase, the resumed run redoes
    step 3 only and ends with exactly the weights of an uninterrupted run (CPU, fixed seeds)."""
    cfg = micro(vae_steps=4, steps=5)
    ref = train(cfg, cache_dir=tmp_path / "a", progress=False, checkpoint_every=2)

    def stop(phase, step, loss):
        if (phase, step) == stop_at:
            raise Stop()

    with pytest.raises(Stop):
        train(cfg, cache_dir=tmp_path / "b", progress=False, checkpoint_every=2, callback=stop)
    partial = tmp_path / "b" / (cfg.config_hash() + ".partial")
    state = json.loads((partial / lab_model.CHECKPOINT_STATE).read_text())
    assert (state["phase"], state["step"]) == (stop_at[0], 2)
    assert not (tmp_path / "b" / cfg.config_hash()).exists()

    done = []

    def counted(name):
        real = getattr(lab_model, name)

        def step_fn(run, step):
            done.append((name, step))
            return real(run, step)
        return step_fn

    for name in ("_vae_step", "_diffusion_step"):
        monkeypatch.setattr(lab_model, name, counted(name))
    got = train(cfg, cache_dir=tmp_path / "b", progress=False, checkpoint_every=2)
    expected = [("_vae_step", s) for s in range(2, 4)] if stop_at[0] == "vae" else []
    expected += [("_diffusion_step", s) for s in range(2 if stop_at[0] == "diffusion" else 0, 5)]
    assert done == expected
    a, b = weights(ref), weights(got)
    assert a.keys() == b.keys() and len(a) > 50
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    ia, ib = training_info(ref), training_info(got)
    assert ia["losses"] == ib["losses"] and len(ib["losses"]["diffusion"]) == 5


@needs_bpe
def test_no_resume_starts_over(tmp_path, monkeypatch):
    cfg = micro(vae_steps=2, steps=3)
    def stop(phase, step, loss):
        if phase == "diffusion":
            raise Stop()

    with pytest.raises(Stop):
        train(cfg, cache_dir=tmp_path, progress=False, checkpoint_every=1, callback=stop)
    steps = []
    real = lab_model._vae_step
    monkeypatch.setattr(lab_model, "_vae_step", lambda run, step: (steps.append(step), real(run, step))[1])
    train(cfg, cache_dir=tmp_path, resume=False, progress=False)
    assert steps == [0, 1]  # the autoencoder phase ran again from the start


@needs_bpe
def test_a_second_process_on_the_same_config_is_refused_and_a_stale_lock_taken_over(tmp_path):
    import os
    import subprocess
    import sys

    cfg = micro(vae_steps=1, steps=1)
    lock = tmp_path / (cfg.config_hash() + ".lock")
    lock.write_text(str(os.getppid()))  # a live process that is not us
    with pytest.raises(SafeT2IError, match=r"another process \(pid \d+\) is training"):
        train(cfg, cache_dir=tmp_path, progress=False)
    assert not (tmp_path / cfg.config_hash()).exists() and lock.exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    lock.write_text(gone)  # its process has exited
    assert lab_model.is_finished(train(cfg, cache_dir=tmp_path, progress=False), cfg)
    assert not lock.exists()


def test_cuda_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SafeT2IError, match="no CUDA device"):
        lab_model._check_device("cuda")
    with pytest.raises(SafeT2IError, match="unknown device"):
        lab_model._check_device("tpu")


# --------------------------------------------------------------------------- SafeT2I on the lab model


@pytest.fixture(scope="module")
def lab_pipe(trained):
    pipe = load_pipeline(trained[2])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_prompt_steering_runs_on_the_lab_model(lab_pipe):
    from safet2i.diffusers_adapter import steer_prompt, steering_kwargs

    steered, original, fraction, report = steer_prompt(lab_pipe, "a red circle", ["red"])
    assert original.shape == (1, 77, lab_pipe.text_encoder.config.hidden_size)
    assert steered.shape == original.shape and 0.0 <= fraction <= 1.0
    image = lab_pipe(**steering_kwargs(steered, original, fraction), num_inference_steps=2,
                     output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


def test_sld_guidance_runs_on_the_lab_model(lab_pipe):
    from safet2i.diffusers_adapter import safety_guidance
    from safet2i.guidance import SLDGuidance

    kw = dict(num_inference_steps=3, guidance_scale=7.5, output_type="np")
    with safety_guidance(lab_pipe, SLDGuidance("MEDIUM"), concept="red") as method:
        image = lab_pipe(["a red circle"], **kw, generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
    assert len(method.state.history) == 3
    assert lab_pipe.unet.forward.__func__ is type(lab_pipe.unet).forward  # restored


# --------------------------------------------------------------------------- command line


def parse(argv):
    from safet2i.lab.cli import register

    p = argparse.ArgumentParser(prog="safet2i")
    register(p.add_subparsers(dest="command", required=True))
    return p.parse_args(argv)


def test_cli_quick_train_prints_the_folder(trained, capsys):
    from safet2i.lab.cli import run

    cfg, cache, folder = trained
    args = parse(["lab", "train", "--quick", "--cache", str(cache), "--no-progress"])
    assert args.command == "lab" and args.lab_command == "train"
    assert run(args) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(folder) and "cached" in err


def test_cli_errors_exit_2(tmp_path, capsys):
    from safet2i.lab.cli import run

    assert run(parse(["lab", "train", "--quick", "--size", "17", "--cache", str(tmp_path)])) == 2
    assert "divide" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert run(parse(["lab", "train", "--quick", "--device", "cuda", "--cache", str(tmp_path)])) == 2
        assert "no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["lab", "train", "--steps", "0"])
