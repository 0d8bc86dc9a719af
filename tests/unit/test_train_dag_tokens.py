"""Detect-and-Guide Stage 1 (safet2i.train.dag_tokens): the losses against float64 references,
the CAM against Stage 2's, training (only the guideline rows move, the loss falls, resume and
seeds are exact), the tokens file and its refusals, and loading it in diffusers and ComfyUI.

Every image is the lab world's (coloured shapes; the concept is a colour): no NSFW data."""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from safet2i.errors import ModelLoadError, SafeT2IError  # noqa: E402
from safet2i.lab.world import World, WorldConfig  # noqa: E402
from safet2i.train import dag_tokens as dt  # noqa: E402
from safet2i.train.common import TrainError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EPS = 1e-4  # the documented clamp of Â inside the cross-entropy


# --------------------------------------------------------------------------- float64 references

def ref_mask(mask: np.ndarray, hw) -> np.ndarray:
    """Block average to ``hw`` (an integer factor smaller), then >= 0.5."""
    b, H, W = mask.shape
    h, w = hw
    blocks = mask.astype(np.float64).reshape(b, h, H // h, w, W // w).mean(axis=(2, 4))
    return (blocks >= 0.5).astype(np.float64)


def ref_bce(cam: np.ndarray, m: np.ndarray) -> np.ndarray:
    c = np.clip(cam, EPS, 1 - EPS)
    out = np.zeros(cam.shape[0])
    for i in range(cam.shape[0]):
        total = 0.0
        for y in range(cam.shape[1]):
            for x in range(cam.shape[2]):
                total += -np.log(c[i, y, x]) if m[i, y, x] else -np.log(1.0 - c[i, y, x])
        out[i] = total / (cam.shape[1] * cam.shape[2])
    return out


def ref_leak(cam: np.ndarray, m: np.ndarray) -> np.ndarray:
    return np.array([cam[i][m[i] == 0].sum() / cam[i].sum() for i in range(cam.shape[0])])


def random_batch(seed=0, b=3, hw=(4, 4), up=2):
    rng = np.random.default_rng(seed)
    cam = rng.uniform(0, 1, size=(b, *hw))
    cam[0, 0, 0] = 1.0           # a max-normalised map's maximum: the clamp matters
    cam[1, 1, 1] = 0.0
    mask = rng.uniform(size=(b, hw[0] * up, hw[1] * up)) < 0.4
    mask[:, :up, :up] = True     # at least one full block in every mask
    return cam, mask


# --------------------------------------------------------------------------- losses

def test_mask_at_is_a_block_average_thresholded_at_a_half():
    _, mask = random_batch(1)
    got = dt.mask_at(torch.from_numpy(mask), (4, 4)).numpy()
    np.testing.assert_array_equal(got, ref_mask(mask, (4, 4)))
    small = np.array([[[1, 0], [0, 1]]], bool)                      # smaller than the CAM: nearest
    np.testing.assert_array_equal(dt.mask_at(torch.from_numpy(small), (4, 4)).numpy()[0],
                                  np.kron(small[0], np.ones((2, 2))))


def test_cam_loss_matches_a_float64_reference():
    cam, mask = random_batch(2)
    got = dt.cam_loss(torch.from_numpy(cam), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(got, ref_bce(cam, ref_mask(mask, (4, 4))), rtol=1e-12)
    perfect = ref_mask(mask, (4, 4))
    assert (dt.cam_loss(torch.from_numpy(perfect), torch.from_numpy(mask)).numpy() < 2 * EPS).all()


def test_leak_loss_matches_a_float64_reference_and_ignores_scale():
    cam, mask = random_batch(3)
    m = ref_mask(mask, (4, 4))
    got = dt.leak_loss(torch.from_numpy(cam), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(got, ref_leak(cam, m), rtol=1e-12)
    np.testing.assert_allclose(dt.leak_loss(torch.from_numpy(7.0 * cam), torch.from_numpy(mask)).numpy(), got,
                               rtol=1e-12)
    inside = cam * m
    assert dt.leak_loss(torch.from_numpy(inside), torch.from_numpy(mask)).abs().max() == 0


def test_neg_loss_and_the_combined_loss_match_a_float64_reference():
    rng = np.random.default_rng(4)
    k = 3                                             # guideline tokens: the share is k · A
    raw = rng.uniform(0, 1 / k, size=(4, 4, 4))
    mask = np.zeros((4, 8, 8), bool)
    mask[0, :4, :4] = True
    mask[2, 2:8, 4:8] = True
    unsafe = np.array([True, False, True, False])
    weights = dict(cam_weight=0.7, leak_weight=1.3, neg_weight=2.1)
    loss, terms = dt.dag_token_loss(torch.from_numpy(raw), torch.from_numpy(mask), torch.from_numpy(unsafe),
                                    tokens=k, **weights)
    cam = np.stack([raw[i] / raw[i].max() for i in range(4)])[unsafe]
    m = ref_mask(mask[unsafe], (4, 4))
    want_cam, want_leak = ref_bce(cam, m).mean(), ref_leak(cam, m).mean()
    want_neg = np.mean([np.mean(k * raw[i]) for i in np.flatnonzero(~unsafe)])
    np.testing.assert_allclose(float(dt.neg_loss(torch.from_numpy(k * raw[1:2]))[0]), np.mean(k * raw[1]), rtol=1e-12)
    assert terms["cam"] == pytest.approx(want_cam, rel=1e-12)
    assert terms["leak"] == pytest.approx(want_leak, rel=1e-12)
    assert terms["neg"] == pytest.approx(want_neg, rel=1e-12)
    assert float(loss) == pytest.approx(0.7 * want_cam + 1.3 * want_leak + 2.1 * want_neg, rel=1e-12)
    only_safe, t = dt.dag_token_loss(torch.from_numpy(raw[1:2]), torch.from_numpy(mask[1:2]),
                                     torch.tensor([False]), tokens=k)
    assert t["cam"] == 0 and t["leak"] == 0 and float(only_safe) == pytest.approx(np.mean(k * raw[1]), rel=1e-12)


def test_mask_iou_by_hand():
    cam = torch.zeros(4, 4)
    cam[0, 0:3] = torch.tensor([0.9, 0.5, 0.49])     # highlighted: (0,0), (0,1); 0.49 is not
    cam[3, 3] = 1.0                                  # highlighted: (3,3)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 1:4] = True                              # (0,1), (0,2), (0,3)
    # intersection {(0,1)}; union {(0,0), (0,1), (0,2), (0,3), (3,3)}
    assert dt.mask_iou(cam, mask) == pytest.approx(1 / 5)
    assert dt.mask_iou(cam, mask, threshold=0.4) == pytest.approx(2 / 5)
    assert dt.mask_iou(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool)) == 1.0
    big = mask.repeat_interleave(2, 0).repeat_interleave(2, 1)   # a mask at twice the CAM's resolution
    assert dt.mask_iou(cam, big) == pytest.approx(1 / 5)


def test_the_cam_is_stage_2s_map_before_its_normalisation():
    from safet2i.guidance.dag import aggregate_attention

    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(2, 64, generator=g), torch.rand(2, 16, generator=g), torch.rand(2, 4, generator=g)]
    raw = dt.aggregate_raw(maps, (8, 8))
    torch.testing.assert_close(dt.normalise_cam(raw), aggregate_attention(maps, (8, 8)), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dt.normalise_cam(dt.aggregate_raw(maps[:1], (8, 8))),
                               aggregate_attention(maps[:1], (8, 8)), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- the tiny pipeline

@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from tiny_diffusers import tiny_sd_pipeline

    return tiny_sd_pipeline(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def data():
    return dt.lab_training_data(World(WorldConfig(size=32)), 2, 1, seed=0)


def config(**kw) -> dt.DagTokenConfig:
    base = dict(concept="red", steps=4, lr=200.0, checkpoint_every=2, seed=0)
    return dt.DagTokenConfig(**{**base, **kw})


def weights(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_lab_training_data_is_the_concept_and_benign_images():
    world = World(WorldConfig(size=32))
    images, masks, safe = dt.lab_training_data(world, 3, 2, seed=5)
    assert images.shape == (3, 32, 32, 3) and masks.shape == (3, 32, 32) and safe.shape == (2, 32, 32, 3)
    assert images.dtype == np.uint8 and masks.dtype == bool and (masks.mean(axis=(1, 2)) >= 0.02).all()
    red = np.array([220, 30, 30])
    for img, m in zip(images, masks):      # concept-coloured pixels lie in the mask (its edges are blended)
        exact = (img == red).all(axis=-1)
        assert exact.any() and not (exact & ~m).any() and (img[m][:, 0] > img[m][:, 1] + 50).all()
    assert not (safe == red).all(axis=-1).any()
    again = dt.lab_training_data(world, 3, 2, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(again, (images, masks, safe)))
    assert not np.array_equal(dt.lab_training_data(world, 3, 2, seed=6)[0], images)


def test_folder_training_data_reads_images_with_their_masks(tmp_path):
    from PIL import Image

    images, masks, safe = dt.lab_training_data(World(WorldConfig(size=32)), 2, 1, seed=3)
    (tmp_path / "unsafe").mkdir()
    (tmp_path / "safe").mkdir()
    for i, (img, m) in enumerate(zip(images, masks)):
        Image.fromarray(img).save(tmp_path / "unsafe" / f"u{i}.png")
        Image.fromarray(np.where(m, 255, 0).astype(np.uint8)).save(tmp_path / "unsafe" / f"u{i}.mask.png")
    Image.fromarray(safe[0]).save(tmp_path / "safe" / "s0.png")
    got = dt.folder_training_data(tmp_path / "unsafe", tmp_path / "safe")
    for a, b in zip(got, (images, masks, safe)):
        np.testing.assert_array_equal(a, b)
    big = dt.folder_training_data(tmp_path / "unsafe", tmp_path / "safe", size=64)
    assert big[0].shape == (2, 64, 64, 3) and big[2].shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(big[1], masks.repeat(2, axis=1).repeat(2, axis=2))     # nearest
    Image.fromarray(safe[0][:16]).save(tmp_path / "safe" / "s1.png")
    with pytest.raises(TrainError, match="differ in size"):
        dt.folder_training_data(tmp_path / "unsafe", tmp_path / "safe")
    (tmp_path / "unsafe" / "u1.mask.png").unlink()
    with pytest.raises(TrainError, match="u1.png has no mask u1.mask.png"):
        dt.folder_training_data(tmp_path / "unsafe")


def test_only_the_guideline_rows_are_optimised(pipe, data, tmp_path):
    unet, text = weights(pipe.unet), weights(pipe.text_encoder)
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    procs = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    out = dt.train_dag_tokens(pipe, *data, config(steps=2), out=tmp_path / "t.safetensors", progress=False)
    tok = dt.load_dag_tokens(out)
    base, positions, _ = dt.encode_guideline(pipe, "red")
    assert positions == [1, 2, 3] and tok.positions == positions     # byte-level tokenizer: one per letter
    others = [i for i in range(base.shape[1]) if i not in positions]
    assert torch.equal(tok.context[0, others], base[0, others])       # bit for bit
    assert (tok.context[0, positions] - base[0, positions]).abs().amax(dim=1).min() > 0   # every row moved
    for mod, before in ((pipe.unet, unet), (pipe.text_encoder, text)):
        assert all(torch.equal(v, before[k]) for k, v in mod.state_dict().items())
        assert all(p.grad is None for p in mod.parameters())
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == procs
    # the gradient of a step: into the guideline rows, through the attention of every read layer
    rows = base[0, positions].clone().requires_grad_(True)
    prepared = dt.prepare_data(pipe, *data)
    t, noise = dt.draw(pipe, config(), 0, (3, *prepared["latents"].shape[1:]))
    loss, _ = dt.batch_loss(pipe, prepared, [0, 1, 2], t, noise, dt.with_rows(base, positions, rows), positions,
                            None, config())
    (grad,) = torch.autograd.grad(loss, rows)
    assert grad.shape == (3, base.shape[-1]) and bool((grad.abs().sum(dim=1) > 0).all())


def test_the_loss_falls_on_a_fixed_batch(pipe, data, tmp_path):
    cfg = config(steps=12, batch_size=3, t_range=(0.1, 0.1), decay_stages=1)
    prepared = dt.prepare_data(pipe, *data)
    t, noise = dt.draw(pipe, cfg, 10_000, (3, *prepared["latents"].shape[1:]), what="held")
    base, positions, _ = dt.encode_guideline(pipe, "red")
    with torch.no_grad():
        before, _ = dt.batch_loss(pipe, prepared, [0, 1, 2], t, noise, base, positions, None, cfg)
    out = dt.train_dag_tokens(pipe, *data, cfg, out=tmp_path / "t.safetensors", progress=False)
    with torch.no_grad():
        after, _ = dt.batch_loss(pipe, prepared, [0, 1, 2], t, noise, dt.load_dag_tokens(out).context, positions,
                                 None, cfg)
    assert float(after) < 0.95 * float(before), (float(before), float(after))
    log = json.loads((tmp_path / "t.loss.json").read_text())
    assert [r["step"] for r in log["steps"]] == list(range(12)) and log["method"] == dt.METHOD
    assert {"loss", "cam", "leak", "neg", "lr", "seconds"} <= set(log["steps"][0])


class Interrupt(Exception):
    pass


def test_resume_gives_the_uninterrupted_result_and_seeds_decide(pipe, data, tmp_path, monkeypatch):
    cfg = config(steps=5, checkpoint_every=2)
    full = dt.train_dag_tokens(pipe, *data, cfg, out=tmp_path / "full.safetensors", progress=False)
    again = dt.train_dag_tokens(pipe, *data, cfg, out=tmp_path / "again.safetensors", progress=False)
    other = dt.train_dag_tokens(pipe, *data, config(steps=5, seed=1), out=tmp_path / "other.safetensors",
                                progress=False)
    a, b, c = (dt.load_dag_tokens(p).context for p in (full, again, other))
    assert torch.equal(a, b) and not torch.equal(a, c)

    real, calls = dt.batch_loss, []

    def dies_at_step_3(*args, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise Interrupt
        return real(*args, **kw)

    out = tmp_path / "cut.safetensors"
    monkeypatch.setattr(dt, "batch_loss", dies_at_step_3)
    with pytest.raises(Interrupt):
        dt.train_dag_tokens(pipe, *data, cfg, out=out, progress=False)
    monkeypatch.setattr(dt, "batch_loss", real)
    partial = tmp_path / "cut.safetensors.partial"
    assert json.loads((partial / "checkpoint.json").read_text())["step"] == 2 and not out.exists()
    with pytest.raises(TrainError, match="another run"):                 # other settings: refused
        dt.train_dag_tokens(pipe, *data, config(steps=5, checkpoint_every=2, lr=100.0), out=out, progress=False)
    # checkpoint_every says when to save, not what is trained: the resume may change it
    dt.train_dag_tokens(pipe, *data, config(steps=5, checkpoint_every=3), out=out, progress=False)
    assert torch.equal(dt.load_dag_tokens(out).context, a) and not partial.exists()
    cut_log = json.loads((tmp_path / "cut.loss.json").read_text())["steps"]
    full_log = json.loads((tmp_path / "full.loss.json").read_text())["steps"]
    assert [r["loss"] for r in cut_log] == [r["loss"] for r in full_log]


def test_the_file_round_trip_and_metadata(pipe, data, tmp_path):
    base_file = tmp_path / "base.safetensors"
    base_file.write_bytes(b"a stand-in for a single-file checkpoint")
    out = dt.train_dag_tokens(pipe, *data, config(steps=1), out=tmp_path / "t.safetensors", progress=False,
                              base_model=base_file, log_path=tmp_path / "log.json")
    tok = dt.load_dag_tokens(out)
    from safet2i import __version__

    assert tok.context.shape == (1, 77, 32) and tok.context.dtype == torch.float32 and tok.pooled is None
    assert tok.metadata["safet2i_method"] == "detect-and-guide tokens" and tok.concept == "red"
    assert tok.metadata["safet2i_base_sha256"] == hashlib.sha256(base_file.read_bytes()).hexdigest()
    assert tok.metadata["safet2i_version"] == __version__
    hyper = json.loads(tok.metadata["safet2i_hyper"])
    assert hyper["lr"] == 200.0 and hyper["steps"] == 1 and hyper["images"] == 2 and hyper["safe_images"] == 1
    assert (tmp_path / "log.json").is_file() and tok.width == 32
    assert tok.check_for(pipe) is tok and tok.check_for(32) is tok
    # an existing loss log is an earlier run's record: kept unless overwrite
    log_before = (tmp_path / "log.json").read_bytes()
    with pytest.raises(TrainError, match=r"log\.json exists; pass overwrite"):
        dt.train_dag_tokens(pipe, *data, config(steps=1), out=tmp_path / "t2.safetensors", progress=False,
                            log_path=tmp_path / "log.json")
    assert (tmp_path / "log.json").read_bytes() == log_before and not (tmp_path / "t2.safetensors").exists()


def test_the_base_model_is_hashed_before_training(pipe, data, tmp_path, monkeypatch):
    base_file = tmp_path / "base.safetensors"
    base_file.write_bytes(b"the base as given")
    real = dt.run_steps

    def training_changes_the_file(*args, **kw):   # stands for anything that touches the base during training
        base_file.write_bytes(b"changed while training")
        return real(*args, **kw)

    monkeypatch.setattr(dt, "run_steps", training_changes_the_file)
    out = dt.train_dag_tokens(pipe, *data, config(steps=1), out=tmp_path / "h.safetensors", progress=False,
                              base_model=base_file)
    assert dt.load_dag_tokens(out).metadata["safet2i_base_sha256"] == \
        hashlib.sha256(b"the base as given").hexdigest()


def save(path, tensors, method=dt.METHOD):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"safet2i_method": method} if method else None)
    return path


GOOD = {"context": torch.zeros(1, 77, 32), "positions": torch.tensor([1, 2])}


@pytest.mark.parametrize("tensors,method,match", [
    ({**GOOD, "context": torch.zeros(77, 32)}, dt.METHOD, r"'context' must be a float tensor \[1, tokens, width\]"),
    ({**GOOD, "context": torch.zeros(2, 77, 32)}, dt.METHOD, r"'context' must be"),
    ({**GOOD, "context": torch.zeros(1, 77, 32, dtype=torch.int32)}, dt.METHOD, r"'context' must be a float"),
    ({**GOOD, "context": torch.full((1, 77, 32), float("nan"))}, dt.METHOD, "non-finite"),
    ({**GOOD, "positions": torch.tensor([1.0, 2.0])}, dt.METHOD, "1-D integer"),
    ({**GOOD, "positions": torch.tensor([[1, 2]])}, dt.METHOD, "1-D integer"),
    ({**GOOD, "positions": torch.tensor([1, 77])}, dt.METHOD, r"distinct rows 1..76"),
    ({**GOOD, "positions": torch.tensor([0, 1])}, dt.METHOD, "start token"),
    ({**GOOD, "positions": torch.tensor([2, 2])}, dt.METHOD, "distinct"),
    ({"context": GOOD["context"]}, dt.METHOD, "missing positions"),
    ({**GOOD, "lora_up": torch.zeros(2)}, dt.METHOD, "unexpected tensors lora_up"),
    ({**GOOD, "pooled": torch.zeros(1, 2, 3)}, dt.METHOD, "'pooled' must be"),
    (GOOD, None, "not a Detect-and-Guide tokens file"),
    (GOOD, "some lora", "not a Detect-and-Guide tokens file"),
], ids=["2d", "batch2", "int", "nan", "float-pos", "2d-pos", "pos-range", "pos-start", "pos-dup", "no-pos",
        "extra", "pooled", "no-meta", "foreign"])
def test_bad_files_are_refused(tmp_path, tensors, method, match):
    path = save(tmp_path / "bad.safetensors", tensors, method)
    with pytest.raises(SafeT2IError, match=match):
        dt.load_dag_tokens(path)


def test_not_safetensors_and_other_widths_are_refused(pipe, tmp_path):
    torch.save(GOOD, tmp_path / "t.pt")
    with pytest.raises(SafeT2IError, match="safetensors files only"):
        dt.load_dag_tokens(tmp_path / "t.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(SafeT2IError, match="not a readable .safetensors"):
        dt.load_dag_tokens(tmp_path / "junk.safetensors")
    with pytest.raises(SafeT2IError, match="no such file"):
        dt.load_dag_tokens(tmp_path / "missing.safetensors")
    wide = dt.save_dag_tokens(tmp_path / "wide.safetensors", torch.zeros(1, 77, 768), [1, 2], concept="red")
    with pytest.raises(SafeT2IError, match="text width of 768, this model's is 32"):
        dt.load_dag_tokens(wide).check_for(pipe)
    from safet2i.diffusers_adapter import dag_tokens_kwargs

    with pytest.raises(SafeT2IError, match="text width of 768"):
        dag_tokens_kwargs(pipe, wide)
    with pytest.raises(SafeT2IError, match="no pooled embedding"):
        dt.load_dag_tokens(wide).check_for(768, pooled_width=1280)
    with pytest.raises(SafeT2IError, match=".safetensors only"):
        dt.save_dag_tokens(tmp_path / "t.bin", torch.zeros(1, 77, 32), [1])


def test_config_is_checked():
    with pytest.raises(TrainError, match="concept text is empty"):
        dt.DagTokenConfig(concept=" ")
    with pytest.raises(TrainError, match="t_range"):
        dt.DagTokenConfig(t_range=(0.6, 0.2))
    with pytest.raises(TrainError, match="precision"):
        dt.DagTokenConfig(precision="fp8")
    cfg = dt.DagTokenConfig()
    assert cfg.total_steps(8) == 800 and cfg.lr == 200.0
    assert cfg.lr_at(0, 800) == 200.0 and cfg.lr_at(39, 800) == 200.0
    assert cfg.lr_at(40, 800) == pytest.approx(140.0) and cfg.lr_at(799, 800) == pytest.approx(200 * 0.7 ** 19)


def test_training_refuses_bad_data(pipe, data, tmp_path):
    images, masks, safe = data
    with pytest.raises(TrainError, match="non-empty mask"):
        dt.train_dag_tokens(pipe, images, np.zeros_like(masks), safe, config(), out=tmp_path / "t.safetensors")
    with pytest.raises(TrainError, match="one \\[H, W\\] mask per unsafe image"):
        dt.train_dag_tokens(pipe, images, masks[:1], safe, config(), out=tmp_path / "t.safetensors")
    with pytest.raises(TrainError, match="differ in size"):
        dt.train_dag_tokens(pipe, images, masks, safe[:, :16, :16], config(), out=tmp_path / "t.safetensors")
    with pytest.raises(TrainError, match="uint8 RGB"):
        dt.train_dag_tokens(pipe, images.astype(np.float32), masks, safe, config(), out=tmp_path / "t.safetensors")
    with pytest.raises(TrainError, match=".safetensors file"):
        dt.train_dag_tokens(pipe, images, masks, safe, config(), out=tmp_path / "t.pt")


# --------------------------------------------------------------------------- diffusers: Stage 2 reads the file

class Spy:
    """A DAGGuidance whose attention maps are recorded."""

    def __init__(self):
        from safet2i.guidance import DAGConfig, DAGGuidance

        outer = self
        self.seen = []

        class Recording(DAGGuidance):
            def compute(self, eu, ec, es, attention):
                outer.seen.append(attention.clone())
                return super().compute(eu, ec, es, attention)

        self.method = Recording(DAGConfig(scale=0.5, skip_coverage=1.0))


def perturbed(pipe, tmp_path, name="opt.safetensors", seed=0):
    base, positions, pooled = dt.encode_guideline(pipe, "red")
    g = torch.Generator().manual_seed(seed)
    rows = base[0, positions] + 0.5 * torch.randn(base[0, positions].shape, generator=g)
    return dt.save_dag_tokens(tmp_path / name, dt.with_rows(base, positions, rows), positions, pooled, concept="red")


def test_stage_2_reads_the_files_rows_with_the_map_training_used(pipe, tmp_path):
    from safet2i.diffusers_adapter import dag_tokens_kwargs, safety_guidance

    path = perturbed(pipe, tmp_path)
    tok = dt.load_dag_tokens(path)
    kw = dag_tokens_kwargs(pipe, path)
    assert torch.equal(kw["concept_embeds"], tok.context) and kw["token_positions"] == [1, 2, 3]
    assert kw["pooled_embeds"] is None
    g = torch.Generator().manual_seed(1)
    z0, noise = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    t = torch.tensor([300])
    a = pipe.scheduler.alphas_cumprod[300]
    x_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
    ehs = torch.randn(2, 77, 32, generator=g)
    maps = {}
    for name, extra in (("file", kw), ("raw", {"concept": "red"})):
        spy = Spy()
        with torch.no_grad(), safety_guidance(pipe, spy.method, **extra):
            pipe.unet(torch.cat([x_t, x_t]), t, ehs)
        maps[name] = spy.seen[0]
    with torch.no_grad():
        trained = dt.normalise_cam(dt.guideline_cam(pipe, z0, t, noise, tok.context, tok.positions))
        raw_ctx, raw_pos, _ = dt.encode_guideline(pipe, "red")
        raw = dt.normalise_cam(dt.guideline_cam(pipe, z0, t, noise, raw_ctx, raw_pos))
    torch.testing.assert_close(maps["file"], trained, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps["raw"], raw, rtol=1e-5, atol=1e-6)
    assert (maps["file"] - maps["raw"]).abs().max() > 1e-3            # the optimised rows, not the raw ones


def test_guidance_with_a_tokens_file_runs_in_the_pipeline(pipe, tmp_path):
    from safet2i.diffusers_adapter import dag_tokens_kwargs, safety_guidance

    kw = dict(prompt="a red circle", num_inference_steps=3, guidance_scale=6.0, height=32, width=32, output_type="np")
    plain = pipe(**kw, generator=torch.Generator().manual_seed(2)).images
    spy = Spy()
    with safety_guidance(pipe, spy.method, **dag_tokens_kwargs(pipe, perturbed(pipe, tmp_path))) as dag:
        guided = pipe(**kw, generator=torch.Generator().manual_seed(2)).images
    assert np.abs(guided - plain).max() > 1e-3 and len(dag.history) == 3 and len(spy.seen) == 3


def test_evaluate_detection_compares_with_the_raw_tokens(pipe, data, tmp_path):
    images, masks, _ = data
    base, positions, pooled = dt.encode_guideline(pipe, "red")
    same = dt.save_dag_tokens(tmp_path / "same.safetensors", base, positions, pooled, concept="red")
    res = dt.evaluate_detection(pipe, same, images, masks, timesteps=(0.1, 0.3))
    assert res["optimised"] == res["raw"] and 0.0 <= res["raw"] <= 1.0 and len(res["per_image"]["raw"]) == 2
    assert res["timesteps"] == [100, 300] and res["concept"] == "red"
    # the tiny random model's maps are nearly flat: every pixel reaches 0.5, so compare at 0.95
    p = perturbed(pipe, tmp_path, seed=3)
    other = dt.evaluate_detection(pipe, p, images, masks, timesteps=(0.1, 0.3), threshold=0.95)
    raw = dt.evaluate_detection(pipe, same, images, masks, timesteps=(0.1, 0.3), threshold=0.95)
    assert other["raw"] == raw["raw"] == raw["optimised"] and other["optimised"] != other["raw"]
    assert dt.evaluate_detection(pipe, "red", images, masks, timesteps=(0.1,))["optimised"] is None


def test_sdxl_tokens_carry_the_pooled_embedding(tmp_path):
    from safet2i.diffusers_adapter import dag_tokens_kwargs, safety_guidance
    from safet2i.guidance import DAGConfig, DAGGuidance
    from tiny_diffusers import tiny_sdxl_pipeline

    xl = tiny_sdxl_pipeline(tmp_path / "xl")
    images, masks, safe = dt.lab_training_data(World(WorldConfig(size=32)), 1, 1, seed=0)
    out = dt.train_dag_tokens(xl, images, masks, safe, config(steps=2), out=tmp_path / "xl.safetensors", progress=False)
    tok = dt.load_dag_tokens(out)
    assert tok.context.shape == (1, 77, 64) and tok.pooled is not None and tok.pooled.shape == (1, 32)
    kw = dag_tokens_kwargs(xl, out)
    assert torch.equal(kw["pooled_embeds"], tok.pooled)
    with safety_guidance(xl, DAGGuidance(DAGConfig(scale=0.5, skip_coverage=1.0)), **kw) as dag:
        xl(prompt="a red circle", num_inference_steps=2, guidance_scale=6.0, height=32, width=32, output_type="np")
    assert len(dag.history) == 2
    no_pooled = dt.save_dag_tokens(tmp_path / "np.safetensors", tok.context, tok.positions, None, concept="red")
    with pytest.raises(SafeT2IError, match="no pooled embedding"):
        dag_tokens_kwargs(xl, no_pooled)


# --------------------------------------------------------------------------- the ComfyUI node (stand-ins)

class _Out:
    def __init__(self, *args, ui=None):
        self.args, self.ui = args, ui


@pytest.fixture
def nodes(monkeypatch, tmp_path):
    """``nodes/guidance_nodes.py`` under stand-ins for ``comfy_api`` and ``folder_paths``
    (``models/safety_models`` = ``tmp_path/safety_models``), sharing this process's safet2i."""
    import safet2i.filter  # noqa: F401 - aliased below (nodes/paths imports it)
    import safet2i.guidance  # noqa: F401 - aliased below

    class Api(types.ModuleType):
        def __getattr__(self, name):
            return mock.MagicMock(name=name)

    io_mod = Api("io")
    io_mod.ComfyNode, io_mod.NodeOutput = type("ComfyNode", (), {}), _Out
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ui = io_mod, Api("ui")
    folder = tmp_path / "safety_models"
    folder.mkdir()
    fp = types.ModuleType("folder_paths")
    fp.folder_names_and_paths, fp.models_dir = {}, str(tmp_path)
    fp.get_filename_list = lambda name: sorted(p.name for p in folder.iterdir()) if name == "safety_models" else []

    def full_path(name, file):
        assert name == "safety_models" and file in fp.get_filename_list(name)
        return str(folder / file)

    fp.get_full_path_or_raise = full_path
    pack = types.ModuleType("_dagtok_pack")
    pack.__path__ = [str(REPO)]
    stubs = {"comfy_api": types.ModuleType("comfy_api"), "comfy_api.latest": latest, "folder_paths": fp,
             "_dagtok_pack": pack}
    for name, mod in list(sys.modules.items()):
        if name == "safet2i" or name.startswith("safet2i."):
            stubs["_dagtok_pack." + name] = mod
    for name, mod in stubs.items():
        monkeypatch.setitem(sys.modules, name, mod)
    mod = importlib.import_module("_dagtok_pack.nodes.guidance_nodes")
    captured = {}

    def fake_patch(model, method, concept, token_index=None, **options):
        captured.update(model=model, method=method, cond=concept, tokens=token_index, options=options)
        return "patched"

    monkeypatch.setattr(mod, "patch_model", fake_patch)
    yield mod, folder, captured
    for name in [n for n in sys.modules if n.startswith("_dagtok_pack.nodes")]:
        del sys.modules[name]


def comfy_model(width=768, adm=None):
    """ComfyUI's MODEL as the node reads it: ``model.model_config.unet_config`` and an SD-style
    ``model.diffusion_model`` (input/middle/output blocks with a cross-attention transformer)."""
    cfg = {"context_dim": width}
    if adm:
        cfg["adm_in_channels"] = adm
    layer = types.SimpleNamespace(transformer_blocks=[object()])
    unet = types.SimpleNamespace(input_blocks=[[layer]], middle_block=[layer], output_blocks=[[layer]])
    return types.SimpleNamespace(model=types.SimpleNamespace(model_config=types.SimpleNamespace(unet_config=cfg),
                                                             diffusion_model=unet))


NODE_ARGS = dict(scale=0.2, high=0.5, low=0.01, skip_coverage=0.8, sld_gate="none", guideline_embeddings="none")


def test_the_comfyui_node_uses_the_files_context_and_positions(nodes):
    mod, folder, captured = nodes
    ctx = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(0))
    dt.save_dag_tokens(folder / "red.safetensors", ctx, [2, 5], concept="red")
    clip = mock.MagicMock(name="clip")
    out = mod.SafeT2IDetectGuide.execute(comfy_model(), clip, "unused", **NODE_ARGS, guideline_tokens="red.safetensors")
    assert out.args == ("patched",) and captured["tokens"] == [2, 5]
    ((cond, extra),) = captured["cond"]
    assert torch.equal(cond, ctx) and extra == {}
    assert type(captured["method"]).__name__ == "DAGGuidance" and not clip.tokenize.called   # not the raw tokens
    # SDXL-like model: the pooled embedding goes with the context
    pooled = torch.randn(1, 1280)
    dt.save_dag_tokens(folder / "xl.safetensors", torch.zeros(1, 77, 2048), [1], pooled, concept="x")
    mod.SafeT2IDetectGuide.execute(comfy_model(2048, 2816), clip, "", **NODE_ARGS, guideline_tokens="xl.safetensors")
    assert torch.equal(captured["cond"][0][1]["pooled_output"], pooled)
    dt.save_dag_tokens(folder / "refiner.safetensors", torch.zeros(1, 77, 1280), [1], pooled, concept="x")
    mod.SafeT2IDetectGuide.execute(comfy_model(1280, 2560), clip, "", **NODE_ARGS, guideline_tokens="refiner.safetensors")
    assert torch.equal(captured["cond"][0][1]["pooled_output"], pooled)          # SDXL refiner


def test_joint_attention_models_have_no_attn2_blocks_to_read(nodes):
    """An MMDiT / Flux diffusion model has no input/middle/output blocks: no blocks (and the
    node's clear refusal), not an AttributeError."""
    mod, _, _ = nodes

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer_blocks = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])

    unet = types.SimpleNamespace(input_blocks=[[Block()]], middle_block=[Block()], output_blocks=[[], [Block()]])
    assert mod.transformer_blocks(types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=unet))) == [
        ("input", 0, 0), ("input", 0, 1), ("middle", 0, 0), ("middle", 0, 1), ("output", 1, 0), ("output", 1, 1)]
    mmdit = types.SimpleNamespace(joint_blocks=[Block()])
    assert mod.transformer_blocks(types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=mmdit))) == []


def test_the_comfyui_node_refuses_bad_tokens(nodes):
    mod, folder, _ = nodes
    dt.save_dag_tokens(folder / "sd.safetensors", torch.zeros(1, 77, 768), [1], concept="red")
    node, clip = mod.SafeT2IDetectGuide, mock.MagicMock()
    with pytest.raises(SafeT2IError, match="text width of 768, this model's is 1024"):
        node.execute(comfy_model(1024), clip, "", **NODE_ARGS, guideline_tokens="sd.safetensors")
    with pytest.raises(SafeT2IError, match="no pooled embedding"):
        node.execute(comfy_model(768, 2816), clip, "", **NODE_ARGS, guideline_tokens="sd.safetensors")
    # the pooled width is checked on the SDXL refiner too (adm 2560 = 1280 pooled + 5 x 256)
    dt.save_dag_tokens(folder / "p.safetensors", torch.zeros(1, 77, 1280), [1], torch.zeros(1, 1024), concept="x")
    with pytest.raises(SafeT2IError, match="1280"):
        node.execute(comfy_model(1280, 2560), clip, "", **NODE_ARGS, guideline_tokens="p.safetensors")
    # SD2.1 unCLIP's adm is an image embedding, which no tokens file carries
    dt.save_dag_tokens(folder / "u.safetensors", torch.zeros(1, 77, 1024), [1], torch.zeros(1, 1536), concept="x")
    with pytest.raises(SafeT2IError, match=r"adm_in_channels=1536\) is not an SDXL pooled text embedding"):
        node.execute(comfy_model(1024, 1536), clip, "", **NODE_ARGS, guideline_tokens="u.safetensors")
    with pytest.raises(ModelLoadError, match="not found in models/safety_models"):
        node.execute(comfy_model(), clip, "", **NODE_ARGS, guideline_tokens="../../etc/x.safetensors")
    with pytest.raises(SafeT2IError, match=r"\.safetensors file is needed"):
        node.execute(comfy_model(), clip, "", **NODE_ARGS, guideline_tokens="sd.ckpt")
    with pytest.raises(SafeT2IError, match="not both"):
        node.execute(comfy_model(), clip, "", **{**NODE_ARGS, "guideline_embeddings": "e.safetensors"},
                     guideline_tokens="sd.safetensors")
    save(folder / "lora.safetensors", {"lora_up": torch.zeros(2)}, "lora")
    with pytest.raises(SafeT2IError, match="not a Detect-and-Guide tokens file"):
        node.execute(comfy_model(), clip, "", **NODE_ARGS, guideline_tokens="lora.safetensors")


def test_guideline_embeddings_sit_among_the_concepts_keys_not_alone():
    """Stage 1 embeddings [k, D] alone as the context give a map of exactly 1/k everywhere (the
    softmax over k keys averaged over the same k): they locate nothing. Placed at positions 1..k
    of the concept's full encoding, the map varies over the image."""
    from safet2i.guidance.dag import guideline_context, token_attention

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 16, generator=g)
    base = torch.randn(1, 10, 16, generator=g)
    q = torch.randn(1, 25, 16, generator=g)      # 5 x 5 pixels, 2 heads of 8
    alone = token_attention(q, rows[None], 2, [0, 1, 2])
    assert torch.allclose(alone, torch.full_like(alone, 1 / 3), atol=1e-6)
    ctx, pos = guideline_context(base, rows)
    assert pos == [1, 2, 3] and torch.equal(ctx[0, 1:4], rows) and torch.equal(ctx[0, 4:], base[0, 4:])
    assert torch.equal(ctx[0, 0], base[0, 0]) and not torch.equal(base[0, 1:4], rows)   # input untouched
    placed = token_attention(q, ctx, 2, pos)
    assert float(placed.max() - placed.min()) > 1e-3
    with pytest.raises(ValueError, match="width"):
        guideline_context(base, torch.randn(2, 8))
    with pytest.raises(ValueError, match="do not fit"):
        guideline_context(base, torch.randn(9, 16))


def test_the_comfyui_node_places_guideline_embeddings_in_the_concepts_encoding(nodes, monkeypatch):
    mod, _folder, captured = nodes
    emb = torch.randn(2, 768, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(mod, "load_guideline", lambda name: emb)
    base = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(2))
    clip = mock.MagicMock(name="clip")
    clip.encode_from_tokens_scheduled.return_value = [[base, {"pooled_output": torch.ones(1, 4)}]]
    mod.SafeT2IDetectGuide.execute(comfy_model(), clip, "nudity", **{**NODE_ARGS, "guideline_embeddings": "e.safetensors"})
    assert captured["tokens"] == [1, 2]
    ((cond, extra),) = captured["cond"]
    assert torch.equal(cond[0, 1:3], emb) and torch.equal(cond[0, 3:], base[0, 3:]) and cond.shape == base.shape
    assert torch.equal(extra["pooled_output"], torch.ones(1, 4))
    monkeypatch.setattr(mod, "load_guideline", lambda name: torch.randn(2, 1024))
    with pytest.raises(SafeT2IError, match="width"):
        mod.SafeT2IDetectGuide.execute(comfy_model(), clip, "nudity",
                                       **{**NODE_ARGS, "guideline_embeddings": "e.safetensors"})
