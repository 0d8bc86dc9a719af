"""DUO and SC-DPO (safet2i.train.dpo): every loss against a float64 formula written here, the
Lagrange multiplier, pair ranking, and tiny end-to-end runs (plumbing only: the loss goes down
on a fixed batch, the files load with full coverage, a resumed run equals an uninterrupted one)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from safet2i.train import dpo  # noqa: E402
from safet2i.train.common import TrainError  # noqa: E402

from tiny_diffusers import tiny_sd_pipeline  # noqa: E402


def _log1p_exp(x):  # −log σ(m) = log(1 + e^{−m}), stably, float64
    x = np.asarray(x, np.float64)
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def _sig(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


@pytest.fixture
def errors():
    g = np.random.default_rng(3)
    return [g.uniform(0.05, 0.3, 6) for _ in range(4)]


def test_duo_loss_against_float64(errors):
    ep, rp, en, rn = errors
    beta = 500.0
    loss, margin = dpo.duo_loss(*(torch.tensor(e, dtype=torch.float64) for e in errors), beta)
    m = -beta * ((ep - rp) - (en - rn))
    np.testing.assert_allclose(margin.numpy(), m, rtol=1e-12)
    np.testing.assert_allclose(float(loss), _log1p_exp(-m).mean(), rtol=1e-12)


def test_duo_loss_sign_convention():
    """Descent lowers the safe image's error and raises the unsafe one's (DUO prefers x⁺)."""
    ep = torch.tensor([0.2], dtype=torch.float64, requires_grad=True)
    en = torch.tensor([0.2], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([0.2], dtype=torch.float64)
    loss, margin = dpo.duo_loss(ep, ref, en, ref, 10.0)
    loss.backward()
    assert float(margin.detach()) == 0.0 and math.isclose(float(loss.detach()), math.log(2.0), rel_tol=1e-12)
    assert float(ep.grad) > 0 > float(en.grad)
    # d/dΔ⁺ of log(1 + exp(β(Δ⁺ − Δ⁻))) at 0 is β/2
    assert math.isclose(float(ep.grad), 10.0 / 2, rel_tol=1e-12)


def test_prior_loss_against_float64():
    g = np.random.default_rng(0)
    a, b = g.normal(size=(2, 4, 5, 5)), g.normal(size=(2, 4, 5, 5))
    assert math.isclose(float(dpo.prior_loss(torch.tensor(a), torch.tensor(b))), ((a - b) ** 2).mean(), rel_tol=1e-6)


def test_per_sample_error_against_float64():
    g = np.random.default_rng(1)
    a, b = g.normal(size=(3, 4, 2, 2)), g.normal(size=(3, 4, 2, 2))
    np.testing.assert_allclose(dpo.per_sample_error(torch.tensor(a), torch.tensor(b)).numpy(),
                               ((a - b) ** 2).reshape(3, -1).mean(1), rtol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 3.5])
def test_dfm_weights_against_float64(gamma):
    m = np.array([-3.0, -0.5, 0.0, 0.7, 4.0])
    w = dpo.dfm_weights(torch.tensor(m, requires_grad=True), gamma)
    ref = (1 - _sig(m)) ** gamma
    np.testing.assert_allclose(w.numpy(), ref / ref.mean(), rtol=1e-6)
    assert not w.requires_grad                       # detached: a re-weighting of pairs
    if gamma > 0:
        assert np.all(np.diff(w.numpy()) < 0)        # harder pairs (lower margin) weigh more
    with pytest.raises(TrainError):
        dpo.dfm_weights(torch.tensor(m), -1.0)
    # normalised over the batch: one pair always weighs 1 (documented: DFM does nothing at batch 1)
    assert dpo.dfm_weights(torch.tensor([m[0]]), gamma).tolist() == [1.0]


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_diffusion_dpo_loss_against_float64(errors, gamma):
    ew, rw, el, rl = errors
    beta = 2500.0
    loss, margin, w = dpo.diffusion_dpo_loss(*(torch.tensor(e, dtype=torch.float64) for e in errors), beta, gamma)
    m = -beta * ((ew - rw) - (el - rl))
    weights = (1 - _sig(m)) ** gamma
    weights = weights / weights.mean()
    np.testing.assert_allclose(margin.numpy(), m, rtol=1e-12)
    np.testing.assert_allclose(float(loss), (weights * _log1p_exp(-m)).mean(), rtol=1e-9)


def test_lagrangian_reward_and_multiplier():
    np.testing.assert_allclose(dpo.lagrangian_reward([1.0, 0.5], [2.0, -1.0], 0.25), [0.5, 0.75])
    assert dpo.lagrange_update(1.0, 0.8, 0.0, 0.5) == pytest.approx(1.4)     # over budget: λ grows
    assert dpo.lagrange_update(1.0, -1.0, 0.0, 0.5) == pytest.approx(0.5)    # under budget: λ shrinks
    assert dpo.lagrange_update(0.2, -5.0, 0.0, 0.5) == 0.0                    # projected onto λ ≥ 0
    with pytest.raises(TrainError):
        dpo.lagrange_update(1.0, float("nan"), 0.0, 0.5)


def test_rank_pairs_against_brute_force():
    g = np.random.default_rng(5)
    s = g.normal(size=(7, 4))
    s[2] = 1.0                                         # all tied: no pair
    s[3] = [0.0, 2.0, 2.0, -1.0]                       # tie for the best: the first wins
    got = dpo.rank_pairs(s, min_margin=0.0)
    want = []
    for p in range(7):
        best = max(range(4), key=lambda k: (s[p, k], -k))
        worst = min(range(4), key=lambda k: (s[p, k], k))
        if s[p, best] - s[p, worst] > 0:
            want.append((p, best, worst, s[p, best] - s[p, worst]))
    assert [(a, b, c) for a, b, c, _ in got] == [(a, b, c) for a, b, c, _ in want]
    assert (3, 1, 3) in [(a, b, c) for a, b, c, _ in got]
    assert all(2 != p for p, *_ in got)
    assert len(dpo.rank_pairs(s, min_margin=10.0)) == 0
    with pytest.raises(TrainError):
        dpo.rank_pairs(np.zeros((3, 1)))


def test_duo_config_coupling():
    c = dpo.DuoConfig()
    assert c.effective_lr == pytest.approx(6e-5) and c.effective_prior_weight == pytest.approx(5e6)
    c = dpo.DuoConfig(beta=250.0)
    assert c.effective_lr == pytest.approx(1.2e-4) and c.effective_prior_weight == pytest.approx(2.5e6)
    assert dpo.DuoConfig(beta=250.0, lr=1e-3, prior_weight=0.0).effective_prior_weight == 0.0
    with pytest.raises(TrainError):
        dpo.DuoConfig(beta=0.0).check()


# ----------------------------------------------------------------------------- on a model

@pytest.fixture
def pipe(tmp_path):
    return tiny_sd_pipeline(tmp_path / "tiny", seed=0)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_denoiser_noising_against_float64(pipe, prediction):
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction)
    den = dpo.Denoiser(pipe, "cpu")
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    x, target = den.noised(z, t, eps)
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2   # scaled_linear
    abar = np.cumprod(1 - betas)[t.numpy()][:, None, None, None]
    zn, en = z.double().numpy(), eps.double().numpy()
    np.testing.assert_allclose(x.numpy(), np.sqrt(abar) * zn + np.sqrt(1 - abar) * en, atol=1e-5)
    want = en if prediction == "epsilon" else np.sqrt(abar) * en - np.sqrt(1 - abar) * zn
    np.testing.assert_allclose(target.numpy(), want, atol=1e-5)


def _pairs(n=3, size=32, seed=0):
    g = np.random.default_rng(seed)
    unsafe = g.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    unsafe[..., 0] = 230                                  # "red" unsafe images, grey safe ones
    safe = g.integers(90, 160, (n, size, size, 3), dtype=np.uint8)
    return dpo.DuoPairs(unsafe, safe, ["a red thing"] * n, ["a grey thing"] * n)


def test_duo_loss_goes_down_on_a_fixed_batch(pipe):
    """The LoRA, the reference switch and the loss together: 15 Adam steps on one fixed
    (pair, t, ε) batch lower DUO's loss (plumbing; no efficacy claim)."""
    from safet2i.train.lora_layers import inject_lora

    pairs = _pairs()
    den = dpo.Denoiser(pipe, "cpu")
    zp, zn = den.encode_images(pairs.safe), den.encode_images(pairs.unsafe)
    lora = inject_lora(pipe.unet, targets="self-attention", rank=4, seed=0)
    pipe.unet.requires_grad_(False)
    for p in lora.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(lora.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(zp.shape, generator=g)
    t = torch.tensor([300, 500, 700])
    xp, tp = den.noised(zp, t, eps)
    xn, tn = den.noised(zn, t, eps)
    losses = []
    for _ in range(15):
        pred = den(torch.cat([xp, xn]), torch.cat([t, t]), [""] * 6)
        with torch.no_grad(), lora.disabled():
            ref = den(torch.cat([xp, xn]), torch.cat([t, t]), [""] * 6)
        loss, _ = dpo.duo_loss(dpo.per_sample_error(pred[:3], tp), dpo.per_sample_error(ref[:3], tp),
                               dpo.per_sample_error(pred[3:], tn), dpo.per_sample_error(ref[3:], tn), 500.0)
        losses.append(float(loss))
        opt.zero_grad()
        loss.backward()
        opt.step()
    lora.remove()
    assert losses[0] == pytest.approx(math.log(2.0), rel=1e-4)   # the LoRA starts as a no-op
    assert losses[-1] < 0.5 * losses[0]


def _unet_out(pipe):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, 4, 8, 8, generator=g)
    hidden = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([400]), encoder_hidden_states=hidden).sample


def test_train_duo_end_to_end_and_resume(pipe, tmp_path):
    from safet2i.diffusers_adapter import load_safety_lora

    pairs = _pairs()
    cfg = dpo.DuoConfig(steps=6, batch_size=2, rank=4, lr=1e-3, prior_weight=1.0)
    before = _unet_out(pipe)
    res = dpo.train_duo(pipe, pairs, cfg, out=tmp_path / "a" / "duo.safetensors", formats=("kohya", "peft"),
                        progress=False, base_model="tiny", base_sha256="0" * 64, arch="tiny-sd")
    assert torch.equal(_unet_out(pipe), before)        # the caller's pipeline is given back unchanged
    kohya, peft = res.files
    assert kohya.name == "duo.safetensors" and peft.name == "duo.peft.safetensors"
    log = json.loads(res.log.read_text())
    assert [r["step"] for r in log["steps"]] == list(range(6)) and log["method"] == "duo"
    assert not (tmp_path / "a" / "duo.safetensors.partial").exists()
    outs = []
    for f in (kohya, peft):
        h = load_safety_lora(pipe, f)
        assert not h.coverage.unmatched and len(h.coverage.applied) == len(h.lora.targets) > 0
        assert all("attn1" in t.module for t in h.lora.targets)
        outs.append(_unet_out(pipe))
        h.undo()
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert not torch.equal(outs[0], before)
    from safetensors import safe_open

    with safe_open(str(kohya), "pt") as fh:
        meta = fh.metadata()
    assert meta["safet2i_method"] == "duo" and json.loads(meta["safet2i_hyper"])["beta"] == 500.0

    # interrupted after step 3 (a checkpoint is due there), then resumed: the same file
    class Stop(Exception):
        pass

    def stop(done, terms):
        if done == 3:
            raise Stop

    out_b = tmp_path / "b" / "duo.safetensors"
    with pytest.raises(Stop):
        dpo.train_duo(pipe, pairs, cfg, out=out_b, progress=False, base_sha256="0" * 64, checkpoint_every=3,
                      callback=stop)
    assert (tmp_path / "b" / "duo.safetensors.partial" / "checkpoint.json").is_file()
    assert torch.equal(_unet_out(pipe), before)
    res_b = dpo.train_duo(pipe, pairs, cfg, out=out_b, progress=False, base_sha256="0" * 64, checkpoint_every=3)
    from safetensors.torch import load_file

    a, b = load_file(str(kohya)), load_file(str(res_b.files[0]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # other settings: the checkpoint of another run is refused, not silently mixed in
    with pytest.raises(Stop):
        dpo.train_duo(pipe, pairs, cfg, out=tmp_path / "c" / "duo.safetensors", progress=False,
                      checkpoint_every=3, callback=stop)
    with pytest.raises(TrainError, match="another run"):
        dpo.train_duo(pipe, pairs, dpo.DuoConfig(steps=6, batch_size=2, rank=4, lr=2e-3, prior_weight=1.0),
                      out=tmp_path / "c" / "duo.safetensors", progress=False)
    with pytest.raises(TrainError, match="exists"):
        dpo.train_duo(pipe, pairs, cfg, out=kohya, progress=False)


def test_make_duo_pairs_resamples_until_the_judge_agrees(pipe):
    """The judge decides: unsafe draws it does not flag are redrawn, SDEdit outputs it flags
    are redrawn, and a judge that never agrees is an error naming the prompt."""
    calls = {"n": 0}

    def judge(images):   # call 1: unsafe draws not flagged (redrawn); 2: flagged (kept);
        calls["n"] += 1  # 3: SDEdit outputs still flagged (redrawn); 4: passed (kept)
        return np.full(len(images), calls["n"] in (2, 3))

    pairs = dpo.make_duo_pairs(pipe, ["a red thing"], ["a grey thing"], judge, n=2, steps=2, max_tries=4,
                               progress=False)
    assert pairs.unsafe.shape == pairs.safe.shape == (2, 32, 32, 3)
    assert pairs.rejected["unsafe"] == 2 and pairs.rejected["safe"] == 2
    assert not np.array_equal(pairs.unsafe, pairs.safe)
    with pytest.raises(TrainError, match="a red thing"):
        dpo.make_duo_pairs(pipe, ["a red thing"], ["a grey thing"], lambda im: np.zeros(len(im), bool), n=1,
                           steps=2, max_tries=2, progress=False)


def test_train_sc_dpo_end_to_end(pipe, tmp_path):
    """Candidates ranked by r − λC, Lagrange updates of λ from the harmful candidates' cost,
    DFM on: the plumbing runs, λ follows the rule, and the file loads with full coverage."""
    from safet2i.diffusers_adapter import load_safety_lora

    def reward(images, prompts):
        return images.astype(np.float64).mean(axis=(1, 2, 3)) / 255.0

    def cost(images):
        x = images.astype(np.float64)
        return (x[..., 0] - x[..., 2]).mean(axis=(1, 2)) / 32.0

    cfg = dpo.ScDpoConfig(rounds=2, steps_per_round=2, candidates=2, batch_size=2, sample_steps=2, rank=4,
                          lam=1.0, lam_mode="lagrange", lam_lr=0.5, cost_budget=-10.0, dfm_gamma=2.0,
                          generate_batch=4)
    res = dpo.train_sc_dpo(pipe, ["a red thing", "a crimson box"], ["a grey thing"], cfg, reward=reward,
                           cost=cost, out=tmp_path / "sc.safetensors", progress=False)
    rounds = res.summary["rounds"]
    assert len(rounds) == 2
    for r in rounds:
        assert r["lam_next"] == pytest.approx(max(0.0, r["lam"] + 0.5 * (r["harmful_mean_cost"] + 10.0)))
    assert rounds[1]["lam"] == rounds[0]["lam_next"]
    log = json.loads(res.log.read_text())
    assert len(log["steps"]) == 4 and all("dfm_max_weight" in s for s in log["steps"])
    h = load_safety_lora(pipe, res.files[0])
    assert not h.coverage.unmatched and all("attn" in t.module for t in h.lora.targets)
    h.undo()
    with pytest.raises(TrainError, match="lam_mode"):
        dpo.ScDpoConfig(lam_mode="other").check()


def test_duo_on_sdxl_with_bf16_and_gradient_checkpointing(tmp_path):
    """The SDXL conditioning (pooled text and size ids), CPU bf16 autocast and activation
    checkpointing: two steps run, the loss is finite, and the file loads with full coverage."""
    from safet2i.diffusers_adapter import load_safety_lora

    from tiny_diffusers import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(tmp_path / "xl")
    pipe.unet.requires_grad_(False)
    cfg = dpo.DuoConfig(steps=2, batch_size=1, rank=2, lr=1e-3, prior_weight=1.0, precision="bf16",
                        gradient_checkpointing=True)
    res = dpo.train_duo(pipe, _pairs(n=2), cfg, out=tmp_path / "xl.safetensors", progress=False)
    log = json.loads(res.log.read_text())
    assert len(log["steps"]) == 2 and all(math.isfinite(s["loss"]) for s in log["steps"])
    assert not pipe.unet.is_gradient_checkpointing and not pipe.unet.training   # the caller's pipeline as it was
    assert not any(p.requires_grad for p in pipe.unet.parameters())
    h = load_safety_lora(pipe, res.files[0])
    assert not h.coverage.unmatched and h.coverage.applied
    h.undo()
    with pytest.raises(TrainError, match="fp16 needs CUDA"):
        dpo.train_duo(pipe, _pairs(n=1), dpo.DuoConfig(steps=1, rank=2, precision="fp16"),
                      out=tmp_path / "fp16.safetensors", progress=False)


@pytest.mark.parametrize("stop_at", [2, 3])   # at a round boundary, and inside a round
def test_sc_dpo_resumed_equals_uninterrupted(pipe, tmp_path, stop_at):
    """Pairs, λ and round statistics are part of the checkpoint: an interrupted run resumed
    gives the same file and the same log as an uninterrupted one."""
    from safetensors.torch import load_file

    def reward(images, prompts):
        return images.astype(np.float64).mean(axis=(1, 2, 3)) / 255.0

    def cost(images):
        x = images.astype(np.float64)
        return (x[..., 0] - x[..., 2]).mean(axis=(1, 2)) / 32.0

    cfg = dpo.ScDpoConfig(rounds=2, steps_per_round=2, candidates=2, batch_size=2, sample_steps=2, rank=2,
                          lam_mode="lagrange", cost_budget=-10.0, generate_batch=4)
    args = (["a red thing", "a crimson box"], ["a grey thing"], cfg)
    full = dpo.train_sc_dpo(pipe, *args, reward=reward, cost=cost, out=tmp_path / "a" / "s.safetensors",
                            progress=False)

    class Stop(Exception):
        pass

    def stop(done, terms):
        if done == stop_at:
            raise Stop

    out = tmp_path / "b" / "s.safetensors"
    with pytest.raises(Stop):
        dpo.train_sc_dpo(pipe, *args, reward=reward, cost=cost, out=out, progress=False, checkpoint_every=1,
                         callback=stop)
    res = dpo.train_sc_dpo(pipe, *args, reward=reward, cost=cost, out=out, progress=False, checkpoint_every=1)
    a, b = load_file(str(full.files[0])), load_file(str(res.files[0]))
    assert a.keys() == b.keys()
    # The UNet's outputs for the same inputs can differ in the last float bits between a fresh
    # process state and a continuing one (CPU kernel choice); β = 2500 multiplies such
    # differences of the denoising error, so a run resumed inside a round is equal to float
    # tolerance, not bit for bit. The state itself (pairs, λ, rounds, optimiser) is restored.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    assert res.summary["rounds"] == full.summary["rounds"] and res.summary["final_lambda"] == full.summary["final_lambda"]
    la, lb = json.loads(full.log.read_text())["steps"], json.loads(res.log.read_text())["steps"]
    assert [r["step"] for r in la] == [r["step"] for r in lb] == [0, 1, 2, 3]
    assert [r["round"] for r in la] == [r["round"] for r in lb] and [r["lam"] for r in la] == [r["lam"] for r in lb]
    assert [r["loss"] for r in la[:stop_at]] == [r["loss"] for r in lb[:stop_at]]     # logged before the stop
    np.testing.assert_allclose([r["loss"] for r in la], [r["loss"] for r in lb], rtol=1e-3)


def test_generated_pairs_are_kept_and_read_back(tmp_path):
    pairs = _pairs(n=2)
    pairs.rejected = {"unsafe": 3, "safe": 1}
    back = dpo.load_duo_pairs(dpo.save_duo_pairs(pairs, tmp_path / "p" / "pairs.safetensors"))
    assert np.array_equal(back.unsafe, pairs.unsafe) and np.array_equal(back.safe, pairs.safe)
    assert back.unsafe_prompts == pairs.unsafe_prompts and back.rejected == pairs.rejected
    assert back.sha256() == pairs.sha256()          # the same run identity on resume
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(TrainError, match="not a file of DUO pairs"):
        dpo.load_duo_pairs(tmp_path / "bad.safetensors")
