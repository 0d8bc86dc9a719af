"""ShieldDiff-style RL trainer (safet2i.train.shielddiff): the DDIM transition's density, the
sampler, advantages, the PPO-clip loss and the reward combination against independent float64
references; the rewards (cost model, filter detector, lab attribute classifier, local CLIP);
and a plumbing run on the micro-lab (rewards computed, the PPO loss falls on a fixed stored
batch, the saved LoRA loads with full coverage, determinism, resume = uninterrupted). No
efficacy thresholds here."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safet2i.errors import SafeT2IError  # noqa: E402
from safet2i.train.common import TrainError  # noqa: E402
from safet2i.train.shielddiff import (  # noqa: E402
    ShieldDiffConfig,
    caption_attributes,
    combined_reward,
    cost_model_reward,
    ddim_step_logprob,
    ddim_step_mean_std,
    ddim_step_sample,
    per_prompt_advantages,
    ppo_clip_loss,
    ppo_diagnostics,
)

# --------------------------------------------------------------------------- float64 references


def _alphas(n_train=1000, beta_start=1e-4, beta_end=0.02):
    """Cumulative alphas of DDPM's linear betas, float64 (independent of diffusers)."""
    betas = np.linspace(beta_start, beta_end, n_train, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def _ref_mean_std(eps, x, a_t, a_p, eta):
    """The DDIM (Song et al. 2021, eq. 12) transition in float64 numpy."""
    x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    sigma = eta * np.sqrt((1 - a_p) / (1 - a_t)) * np.sqrt(1 - a_t / a_p)
    mean = np.sqrt(a_p) * x0 + np.sqrt(1 - a_p - sigma ** 2) * eps
    return mean, sigma


def _ref_logpdf(y, mean, sigma):
    from scipy.stats import norm

    return norm.logpdf(y, loc=mean, scale=sigma)


PAIRS = [(999, 959), (519, 479), (39, -1), (200, 160)]   # (t, prev); prev -1: final alpha = ᾱ_0


@pytest.mark.parametrize("t,prev", PAIRS)
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_step_logprob_is_the_float64_gaussian_log_density(t, prev, eta):
    ac = _alphas()
    a_t, a_p = ac[t], (ac[prev] if prev >= 0 else ac[0])
    rng = np.random.default_rng(t)
    eps, x = rng.standard_normal((3, 4, 5, 6)), rng.standard_normal((3, 4, 5, 6))
    mean, sigma = _ref_mean_std(eps, x, a_t, a_p, eta)
    y = mean + sigma * rng.standard_normal(mean.shape) * rng.uniform(0.5, 2.0)
    ref = _ref_logpdf(y, mean, sigma).reshape(3, -1)
    # float64 inputs: equal to rounding
    e64, x64, y64 = torch.from_numpy(eps), torch.from_numpy(x), torch.from_numpy(y)
    got = ddim_step_logprob(e64, x64, y64, a_t, a_p, eta=eta)
    np.testing.assert_allclose(got.numpy(), ref.sum(1), rtol=1e-10, atol=1e-8)
    got_mean = ddim_step_logprob(e64, x64, y64, a_t, a_p, eta=eta, reduce="mean")
    np.testing.assert_allclose(got_mean.numpy(), ref.mean(1), rtol=1e-10, atol=1e-10)
    m, s = ddim_step_mean_std(torch.from_numpy(eps), torch.from_numpy(x), a_t, a_p, eta=eta)
    np.testing.assert_allclose(m.numpy(), mean, rtol=1e-12, atol=1e-12)
    assert float(s) == pytest.approx(sigma, rel=1e-12)
    # float32 inputs (what training uses): the same density within float32 rounding
    got32 = ddim_step_logprob(e64.float(), x64.float(), y64.float(), a_t, a_p, eta=eta, reduce="mean")
    assert got32.dtype == torch.float32
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(got32.numpy(), ref.mean(1), rtol=1e-3, atol=1e-2 * scale)


def test_per_sample_alphas_give_each_sample_its_own_transition():
    ac = _alphas()
    ts, ps = np.array([999, 519, 39]), np.array([959, 479, -1])
    a_t, a_p = ac[ts], np.where(ps >= 0, ac[np.maximum(ps, 0)], ac[0])
    rng = np.random.default_rng(1)
    eps, x, y = (rng.standard_normal((3, 2, 4, 4)) for _ in range(3))
    got = ddim_step_logprob(torch.from_numpy(eps), torch.from_numpy(x), torch.from_numpy(y),
                            torch.from_numpy(a_t), torch.from_numpy(a_p))
    for i in range(3):
        mean, sigma = _ref_mean_std(eps[i], x[i], a_t[i], a_p[i], 1.0)
        assert float(got[i]) == pytest.approx(_ref_logpdf(y[i], mean, sigma).sum(), rel=1e-10)


def test_v_prediction_and_sample_outputs_are_the_same_transition():
    ac = _alphas()
    a_t, a_p = ac[600], ac[560]
    rng = np.random.default_rng(2)
    x0, eps, y = (rng.standard_normal((2, 4, 3, 3)) for _ in range(3))
    x = np.sqrt(a_t) * x0 + np.sqrt(1 - a_t) * eps
    v = np.sqrt(a_t) * eps - np.sqrt(1 - a_t) * x0          # Salimans & Ho 2022
    args = (torch.from_numpy(x), torch.from_numpy(y), a_t, a_p)
    ref = ddim_step_logprob(torch.from_numpy(eps), *args).numpy()
    for kind, out in (("v_prediction", v), ("sample", x0)):
        got = ddim_step_logprob(torch.from_numpy(out), *args, prediction_type=kind).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-9)
    mean, sigma = _ref_mean_std(eps, x, a_t, a_p, 1.0)
    np.testing.assert_allclose(ref, _ref_logpdf(y, mean, sigma).reshape(2, -1).sum(1), rtol=1e-10)


def test_ddim_mean_and_sample_match_diffusers_scheduler_step():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                    beta_schedule="linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                    timestep_spacing="trailing")
    sched.set_timesteps(25)
    ac = sched.alphas_cumprod.double()
    g = torch.Generator().manual_seed(0)
    for t in sched.timesteps[[0, 12, 24]].tolist():
        prev = t - 1000 // 25
        a_p = float(ac[prev]) if prev >= 0 else float(sched.final_alpha_cumprod)
        x, eps, z = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
        ours_mean, std = ddim_step_mean_std(eps, x, float(ac[t]), a_p, eta=1.0)
        theirs = sched.step(eps, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
        torch.testing.assert_close(ours_mean, theirs, rtol=1e-6, atol=1e-6)
        drawn, lp = ddim_step_sample(eps, x, float(ac[t]), a_p, eta=1.0, noise=z)
        theirs = sched.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
        torch.testing.assert_close(drawn, theirs, rtol=1e-6, atol=1e-6)
        assert float(std) > 0


def test_ddim_step_sample_draws_with_its_generators_and_returns_the_density():
    ac = _alphas()
    a_t, a_p = ac[400], ac[360]
    eps, x = torch.randn(3, 4, 4, 4, dtype=torch.float64), torch.randn(3, 4, 4, 4, dtype=torch.float64)
    prev, lp = ddim_step_sample(eps, x, a_t, a_p, generator=torch.Generator().manual_seed(5))
    mean, sigma = _ref_mean_std(eps.numpy(), x.numpy(), a_t, a_p, 1.0)
    z = torch.randn((3, 4, 4, 4), generator=torch.Generator().manual_seed(5)).double().numpy()
    np.testing.assert_allclose(prev.numpy(), mean + sigma * z, rtol=1e-6, atol=1e-6)
    ref = _ref_logpdf(prev.numpy(), mean, sigma).reshape(3, -1).sum(1)
    np.testing.assert_allclose(lp.numpy(), ref, rtol=1e-9)
    # one generator per sample: a sample's draw does not depend on its batch
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    batch, _ = ddim_step_sample(eps, x, a_t, a_p, generator=gens)
    alone, _ = ddim_step_sample(eps[1:2], x[1:2], a_t, a_p, generator=[torch.Generator().manual_seed(2)])
    torch.testing.assert_close(batch[1:2], alone)


def test_a_deterministic_step_and_bad_inputs_are_refused():
    ac = _alphas()
    e = torch.zeros(1, 2, 2, 2)
    with pytest.raises(ValueError, match="σ_t is 0"):
        ddim_step_logprob(e, e, e, ac[39], 1.0)                  # set_alpha_to_one: ᾱ_prev = 1
    with pytest.raises(ValueError, match="σ_t is 0"):
        ddim_step_logprob(e, e, e, ac[500], ac[460], eta=0.0)
    with pytest.raises(ValueError, match="prediction_type"):
        ddim_step_logprob(e, e, e, ac[500], ac[460], prediction_type="flow")
    with pytest.raises(ValueError, match="reduce"):
        ddim_step_logprob(e, e, e, ac[500], ac[460], reduce="max")
    with pytest.raises(ValueError, match="per-sample"):
        ddim_step_logprob(e, e, e, torch.tensor([ac[500], ac[400]]), ac[460])


# --------------------------------------------------------------------------- advantages, PPO, rewards


def _ref_advantages(r, ids, eps):
    r = np.asarray(r, np.float64)
    out = np.empty_like(r)
    for i in range(len(r)):
        members = [j for j in range(len(r)) if ids[j] == ids[i]]
        pool = r[members] if len(members) > 1 else r
        mu = sum(pool) / len(pool)
        sd = math.sqrt(sum((v - mu) ** 2 for v in pool) / len(pool))
        out[i] = (r[i] - mu) / (sd + eps)
    return out


def test_per_prompt_advantages_against_a_float64_reference():
    rng = np.random.default_rng(3)
    r = rng.normal(size=11)
    ids = ["a", "a", "a", "b", "b", "c", "d", "d", "d", "d", "e"]    # c and e: one sample each
    for eps in (1e-6, 0.1):
        np.testing.assert_allclose(per_prompt_advantages(r, ids, eps), _ref_advantages(r, ids, eps),
                                   rtol=1e-12)
    adv = per_prompt_advantages(r, np.asarray([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4]))
    for g in ([0, 1, 2], [3, 4], [6, 7, 8, 9]):   # groups of several samples: mean 0, std ~1
        assert abs(adv[g].mean()) < 1e-12 and adv[g].std() == pytest.approx(1.0, rel=1e-4)
    assert per_prompt_advantages([2.5], [0]).tolist() == [0.0]
    np.testing.assert_array_equal(per_prompt_advantages([1.0, 1.0], [0, 0]), [0.0, 0.0])
    with pytest.raises(ValueError, match="rewards for"):
        per_prompt_advantages([1.0, 2.0], [0])
    with pytest.raises(ValueError, match="finite"):
        per_prompt_advantages([1.0, float("nan")], [0, 0])


def _ref_ppo(lp_new, lp_old, adv, clip):
    rho = np.exp(lp_new - lp_old)
    terms = -np.minimum(rho * adv, np.clip(rho, 1 - clip, 1 + clip) * adv)
    # d/d lp_new of each term: -A rho where the unclipped branch is the minimum, else 0
    unclipped_active = rho * adv <= np.clip(rho, 1 - clip, 1 + clip) * adv
    inside = (rho >= 1 - clip) & (rho <= 1 + clip)
    grad = np.where(unclipped_active | inside, -adv * rho, 0.0) / len(rho)
    return terms.mean(), grad


@pytest.mark.parametrize("clip", [1e-4, 0.2])
def test_ppo_clip_loss_and_its_gradient_against_float64(clip):
    # ratios below, inside and above [1 - clip, 1 + clip], each with a positive and a negative advantage
    log_rho = np.array([-5 * clip, -0.5 * clip, 0.0, 0.5 * clip, 5 * clip, 20 * clip] * 2, np.float64)
    adv = np.array([1.3] * 6 + [-0.7] * 6, np.float64)
    lp_old = np.linspace(-3, 2, 12)
    lp_new = lp_old + log_rho
    ref_loss, ref_grad = _ref_ppo(lp_new, lp_old, adv, clip)
    x = torch.tensor(lp_new, requires_grad=True)
    loss = ppo_clip_loss(x, torch.tensor(lp_old), torch.tensor(adv), clip)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(ref_loss, rel=1e-12, abs=1e-15)
    np.testing.assert_allclose(x.grad.numpy(), ref_grad, rtol=1e-12, atol=1e-15)
    g = x.grad.numpy()
    # sign conventions: A > 0 stops pushing once rho > 1 + clip; A < 0 once rho < 1 - clip
    assert g[5] == 0 and g[4] == 0 and g[0] < 0        # A > 0: clipped above rho = 1 + clip, not below
    assert g[6] == 0 and g[7] > 0 and g[11] > 0             # A < 0: clipped below, not above
    # at rho = 1 the loss is -mean(A)
    same = torch.tensor(lp_old)
    assert float(ppo_clip_loss(same, same, torch.tensor(adv), clip)) == pytest.approx(-adv.mean(), rel=1e-12)
    d = ppo_diagnostics(torch.tensor(lp_new), torch.tensor(lp_old), clip)
    assert d["approx_kl"] == pytest.approx(float(np.mean(0.5 * log_rho ** 2)), rel=1e-9)
    assert d["clip_fraction"] == pytest.approx(float(np.mean(np.abs(np.exp(log_rho) - 1) > clip)))
    with pytest.raises(ValueError, match="clip"):
        ppo_clip_loss(x, x, x, 0.0)


def test_combined_reward_is_the_weighted_sum():
    s, a = np.array([0.1, 0.9, 0.5]), np.array([1.0, 0.0, 0.25])
    np.testing.assert_allclose(combined_reward(s, a, (2.0, 0.5)), 2.0 * s + 0.5 * a, rtol=0, atol=0)
    np.testing.assert_allclose(combined_reward(s, a, {"safety": 1.0, "alignment": 3.0}), s + 3.0 * a)
    np.testing.assert_allclose(combined_reward(s, None, (1.5, 0.0)), 1.5 * s)
    with pytest.raises(ValueError, match="different lengths"):
        combined_reward(s, a[:2])
    with pytest.raises(ValueError, match="not both 0"):
        combined_reward(s, a, (0.0, 0.0))
    with pytest.raises(ValueError, match="unknown terms"):
        combined_reward(s, a, {"safety": 1.0, "style": 1.0})
    with pytest.raises(ValueError, match="non-finite"):
        combined_reward(np.array([np.nan, 0, 0]), a)


def test_lab_captions_are_read_back_to_their_attributes():
    from safet2i.lab.world import FORMS, World, WorldConfig

    for cfg in (WorldConfig(), WorldConfig(concept="blue", seed=3)):
        world = World(cfg)
        for form in FORMS:
            for split in ("train", "heldout"):
                for i in range(40):
                    s = world.sample(i, form, split)
                    assert caption_attributes(s.caption) == s.attributes, s.caption
    for text in ("a photo of a cat", "two small red circles, grey background",
                 "a small red blob on the left, grey background",
                 "a small circles on the left, grey background"):
        with pytest.raises(SafeT2IError, match="not a lab caption"):
            caption_attributes(text)


# --------------------------------------------------------------------------- reward callables


def _tiny_onnx(folder: Path, name: str, kind: str, w, b, size: int, out_name: str = "cost",
               activation: str = "none"):
    """NCHW [n,3,size,size] -> channel means (of x/255) -> @ w [3,1] + b: one number per image."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
         helper.make_node("MatMul", ["m", "w"], ["z"]), helper.make_node("Add", ["z", "b"], [out_name])],
        name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, size, size])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["n", 1])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
                     helper.make_tensor("w", TensorProto.FLOAT, [3, 1], list(map(float, w))),
                     helper.make_tensor("b", TensorProto.FLOAT, [1], [float(b)])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, folder / f"{name}.onnx")
    label = "cost" if kind == "cost" else name
    spec = {"schema": 1, "name": name, "kind": kind, "model": {"file": f"{name}.onnx"},
            "input": {"size": size, "geometry": "stretch", "layout": "NCHW", "scale": 1 / 255},
            "output": {"labels": [label], "activation": activation,
                       **({"name": out_name} if kind == "cost" else {})},
            "thresholds": {label: 0.5 if kind == "cost" else 0.4}}
    (folder / f"{name}.json").write_text(json.dumps(spec))
    return folder / f"{name}.json"


#: The tiny cost model: C = 12 * (mean red - mean green) - 1 (reddish images cost more).
COST_W, COST_B = (12.0, -12.0, 0.0), -1.0


def _images(seed=0, n=5, size=8):
    rng = np.random.default_rng(seed)
    img = rng.uniform(0, 1, (n, 3, size, size))
    img[0, 0] = 0.95                                      # one clearly red image
    return img.astype(np.float32)


def _u8(images):
    return np.clip(np.rint(np.asarray(images, np.float64) * 255), 0, 255)


def test_cost_model_reward_is_the_log_probability_of_safe(tmp_path):
    pytest.importorskip("onnxruntime")
    sidecar = _tiny_onnx(tmp_path, "tinycost", "cost", COST_W, COST_B, 8)
    imgs = _images()
    means = _u8(imgs).mean(axis=(2, 3)) / 255
    c = means @ np.asarray(COST_W) + COST_B                                  # float64 reference
    reward = cost_model_reward(sidecar)
    r = reward(imgs, ["p"] * 5)
    np.testing.assert_allclose(r, -np.log1p(np.exp(c)), rtol=1e-5, atol=1e-6)
    assert r[0] < math.log(0.5) < r[1:].max() <= 0                        # the red image is the unsafe one
    prob = cost_model_reward(sidecar, transform="probability")
    np.testing.assert_allclose(prob(imgs, ["p"] * 5), 1 / (1 + np.exp(c)), rtol=1e-5, atol=1e-6)
    big = cost_model_reward(_tiny_onnx(tmp_path, "bigcost", "cost", (800, -800, 0), 30.0, 8))(imgs, [""] * 5)
    c_big = means @ np.asarray([800.0, -800.0, 0.0]) + 30.0
    assert np.isfinite(big).all()                                   # no overflow for |C| of hundreds
    np.testing.assert_allclose(big, np.where(c_big > 30, -c_big, -np.log1p(np.exp(np.minimum(c_big, 30)))),
                               rtol=1e-4, atol=1e-4)
    negative = cost_model_reward(tmp_path / "tinycost.onnx", transform="negative-cost")
    np.testing.assert_allclose(negative(imgs, [""] * 5), -c, rtol=1e-5, atol=1e-5)
    assert reward.describe()["kind"] == "cost-model"
    cls = _tiny_onnx(tmp_path, "bright", "classifier", (1, 1, 1), 0.0, 8, out_name="y", activation="sigmoid")
    with pytest.raises(TrainError, match="not a learned cost model"):
        cost_model_reward(cls)
    with pytest.raises(TrainError, match="transform"):
        cost_model_reward(sidecar, transform="raw")
    with pytest.raises(TrainError, match=r"float \[B, 3, H, W\]"):
        reward(np.zeros((2, 8, 8, 3), np.float32), ["", ""])


def test_detector_reward_is_one_minus_the_filters_graded_cost(tmp_path):
    pytest.importorskip("onnxruntime")
    from safet2i.train.shielddiff import detector_reward

    w, b, t = (4.0, 4.0, 4.0), -6.0, 0.4
    sidecar = _tiny_onnx(tmp_path, "bright", "classifier", w, b, 8, out_name="y", activation="sigmoid")
    imgs = _images(1)
    s = 1 / (1 + np.exp(-(_u8(imgs).mean(axis=(2, 3)) / 255 @ np.asarray(w) + b)))
    cost = np.where(s < t, 0.5 * s / t, 0.5 + 0.5 * (s - t) / (1 - t))     # the filter's grade, float64
    reward = detector_reward(str(sidecar), _policy_with(t))
    np.testing.assert_allclose(reward(imgs, [""] * 5), 1 - cost, rtol=1e-5, atol=1e-6)


def _policy_with(t):
    from safet2i.filter import get_policy

    return get_policy("custom", f"bright={t}")


def test_detector_reward_with_nudenet_on_a_benign_photo(astronaut):
    pytest.importorskip("nudenet")
    pytest.importorskip("onnxruntime")
    from safet2i.train.shielddiff import detector_reward

    img = (np.asarray(astronaut, np.float32) / 255).transpose(2, 0, 1)[None]
    r = detector_reward("nudenet", "strict-5")(img, ["an astronaut"])
    assert r.shape == (1,) and 0.5 < r[0] <= 1.0      # nothing exposed: the filter passes it


def test_lab_alignment_reward_counts_named_attributes_except_the_concept(micro_lab):
    from safet2i.lab.world import ATTRIBUTES, World
    from safet2i.train.shielddiff import lab_alignment_reward

    cfg, _, judge, judge_file = micro_lab
    world = World(cfg.world)
    forms = ["benign", "direct", "synonym", "indirect", "misspelled", "benign"]
    samples = [world.sample(i, form, "train") for i, form in enumerate(forms)]
    images = np.stack([s.image for s in samples]).transpose(0, 3, 1, 2).astype(np.float64) / 255
    prompts = [s.caption for s in samples]
    pred = judge.judge_images(np.stack([s.image for s in samples]))
    ref, ref_soft = [], []
    for i, s in enumerate(samples):
        keys = [k for k in ATTRIBUTES if not (k == "colour" and s.attributes[k] == cfg.world.concept)]
        assert len(keys) == (6 if s.form == "benign" else 5)
        ref.append(sum(pred[k][i] == s.attributes[k] for k in keys) / len(keys))
        ref_soft.append(sum(pred["probabilities"][k][i, ATTRIBUTES[k].index(s.attributes[k])] for k in keys)
                        / len(keys))
    for j in (judge, str(judge_file)):
        np.testing.assert_allclose(lab_alignment_reward(j)(images, prompts), ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(lab_alignment_reward(judge, soft=True)(images, prompts), ref_soft, rtol=1e-6)
    given = lab_alignment_reward(judge, attributes={"my prompt": samples[0].attributes})
    np.testing.assert_allclose(given(images[:1], ["my prompt"]), ref[:1])
    with pytest.raises(TrainError, match="not a lab caption"):
        lab_alignment_reward(judge)(images[:1], ["a cat"])


def _tiny_clip(folder: Path):
    transformers = pytest.importorskip("transformers")
    from tiny_diffusers import tiny_tokenizer

    tok = tiny_tokenizer(folder / "tok")
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_clip_alignment_reward_with_a_tiny_random_local_checkpoint(tmp_path):
    """Plumbing with a random local checkpoint (no download): the reward is the cosine of the
    model's own image and text embeddings."""
    from safet2i.filter.detectors import preprocess_whole_image
    from safet2i.train.backbones import clip_input_spec
    from safet2i.train.shielddiff import clip_alignment_reward

    folder = _tiny_clip(tmp_path / "clip")
    reward = clip_alignment_reward(folder)
    imgs = _images(2, n=3, size=32)
    prompts = ["a red square", "two blue circles", "a cat"]
    got = reward(imgs, prompts)
    m = reward.model
    x = torch.from_numpy(preprocess_whole_image(list(_u8(imgs).transpose(0, 2, 3, 1).astype(np.uint8)),
                                                clip_input_spec(folder, 32), "RGB"))
    with torch.no_grad():
        vis = m.visual_projection(m.vision_model(pixel_values=x).pooler_output).double().numpy()
        ids = reward.tokenizer(prompts, padding=True, return_tensors="pt")
        txt = m.text_projection(m.text_model(**ids).pooler_output).double().numpy()
    ref = (vis * txt).sum(1) / (np.linalg.norm(vis, axis=1) * np.linalg.norm(txt, axis=1))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(SafeT2IError, match="does not exist"):
        clip_alignment_reward(tmp_path / "nope")


def test_clip_alignment_reward_with_a_real_local_checkpoint():
    folder = os.environ.get("SAFET2I_TEST_CLIP")
    if not folder or not Path(folder).is_dir():
        pytest.skip("no local CLIP checkpoint: set SAFET2I_TEST_CLIP to a CLIP folder (config.json, "
                    "model.safetensors, tokenizer files) to run this; nothing is ever downloaded")
    from safet2i.lab.world import World
    from safet2i.train.shielddiff import clip_alignment_reward

    reward = clip_alignment_reward(folder)
    s = World().sample(0, "benign")
    img = np.repeat(np.repeat(s.image, 8, 0), 8, 1).transpose(2, 0, 1)[None].astype(np.float32) / 255
    match = reward(img, [s.caption])[0]
    assert -1 <= match <= 1 and match > reward(img, ["a photograph of a city street at night"])[0]


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("change,match", [
    ({"prompts": ()}, "prompts"), ({"samples_per_prompt": 0}, "samples_per_prompt"), ({"eta": 0.0}, "eta"),
    ({"clip_range": -1.0}, "clip_range"), ({"logprob_reduction": "max"}, "logprob_reduction"),
    ({"reward_weights": (0.0, 0.0)}, "reward_weights"), ({"mixed_precision": "fp8"}, "mixed_precision"),
    ({"timestep_fraction": 1.5}, "timestep_fraction"), ({"lr": float("nan")}, "lr"),
])
def test_config_check_names_the_bad_setting(change, match):
    cfg = ShieldDiffConfig(**{"prompts": ("a",), **change})
    with pytest.raises(TrainError, match=match):
        cfg.check()


def test_defaults_are_the_documented_ddpo_ones():
    c = ShieldDiffConfig(prompts=("a",))
    c.check()
    got = (c.rank, c.lr, c.clip_range, c.eta, c.adv_clip_max, c.max_grad_norm, c.inner_epochs,
           c.timestep_fraction, c.logprob_reduction, c.targets, c.steps, c.guidance_scale)
    assert got == (4, 3e-4, 1e-4, 1.0, 5.0, 1.0, 1, 1.0, "mean", "attention", 50, 5.0)
    lab = ShieldDiffConfig.for_lab(["a"], epochs=3)
    assert (lab.steps, lab.guidance_scale, lab.epochs) == (25, 3.0, 3)
    assert "prompts" not in c.hyper() and json.dumps(c.hyper())


# --------------------------------------------------------------------------- the micro-lab run


def _pipe(folder):
    from safet2i.lab.model import load_pipeline

    return load_pipeline(folder)


def _tiny_config(prompts, **kw):
    base = dict(samples_per_prompt=2, steps=4, guidance_scale=3.0, epochs=2, sample_batch_size=4,
                train_batch_size=2, seed=7, device="cpu", clip_range=0.2, lr=1e-3, evaluate_final=True)
    base.update(kw)
    return ShieldDiffConfig(prompts=tuple(prompts), **base)


def _prompts(cfg, n=2):
    from safet2i.lab.world import World

    world = World(cfg.world)
    return [world.sample(i, "direct", "train").caption for i in range(n)]


class RedReward:
    """A synthetic safety reward: 1 - mean red channel (describes itself for the run hash)."""

    def __init__(self, fail_at_call=None):
        self.calls, self.fail_at_call = 0, fail_at_call

    def __call__(self, images, prompts):
        self.calls += 1
        if self.fail_at_call is not None and self.calls >= self.fail_at_call:
            raise KeyboardInterrupt("simulated interruption")
        return 1.0 - np.asarray(images, np.float64)[:, 0].mean(axis=(1, 2))

    def describe(self):
        return {"kind": "test-red"}


def test_stored_logprobs_recompute_and_the_ppo_loss_falls_on_a_fixed_batch(micro_lab):
    from safet2i.train.lora_layers import inject_lora
    from safet2i.train.shielddiff import DiffusionPolicy, per_prompt_advantages, ppo_update, score_rollouts

    cfg, folder, _, _ = micro_lab
    pipe = _pipe(folder)
    config = _tiny_config(_prompts(cfg), clip_range=10.0, lr=2e-3)
    policy = DiffusionPolicy(pipe, config, "cpu")
    lora = inject_lora(pipe.unet, targets=config.targets, rank=config.rank, seed=config.seed)
    try:
        ro = policy.sample(range(4), epoch=0)
        S = config.steps
        assert tuple(ro.latents.shape) == (4, S + 1, *policy.latent_shape)
        assert tuple(ro.logprobs.shape) == (4, S)
        assert ro.images.shape[:2] == (4, 3) and 0 <= ro.images.min() and ro.images.max() <= 1
        with torch.no_grad():     # the stored log-probabilities are the policy's density of the stored steps
            for j in range(S):
                lp = policy.logprob(ro.latents[:, j], ro.latents[:, j + 1], torch.full((4,), j),
                                    ro.prompt_index)
                torch.testing.assert_close(lp, ro.logprobs[:, j], rtol=1e-4, atol=1e-4)
        score_rollouts(ro, config.prompts, RedReward(), None, (1.0, 0.0))
        adv = per_prompt_advantages(ro.reward, ro.prompt_index)
        params = lora.parameters()
        opt = torch.optim.AdamW(params, lr=config.lr)
        losses = [ppo_update(policy, ro, adv, opt, params, epoch=0)["loss"] for _ in range(4)]
        assert abs(losses[0] + float(np.mean(adv))) < 1e-4          # rho = 1 before the first step
        assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    finally:
        lora.remove()


def test_a_deterministic_last_step_is_never_trained_and_bf16_runs(micro_lab, tmp_path):
    from diffusers import DDIMScheduler

    from safet2i.train.lora_layers import inject_lora
    from safet2i.train.shielddiff import DiffusionPolicy, ppo_update, train_shielddiff

    cfg, folder, _, _ = micro_lab
    pipe = _pipe(folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True)
    config = _tiny_config(_prompts(cfg, 1), steps=3, mixed_precision="bf16")
    policy = DiffusionPolicy(pipe, config, "cpu")
    assert float(policy.sigma[-1]) == 0 and policy.trainable.tolist() == [0, 1]
    lora = inject_lora(pipe.unet, targets=config.targets, rank=config.rank, seed=config.seed)
    try:
        ro = policy.sample(range(2), epoch=0)
        assert float(ro.logprobs[:, -1].abs().max()) == 0 and torch.isfinite(ro.logprobs).all()
        params = lora.parameters()
        opt = torch.optim.AdamW(params, lr=1e-3)
        out = ppo_update(policy, ro, np.array([1.0, -1.0]), opt, params, epoch=0)
        assert math.isfinite(out["loss"]) and out["updates"] == 1
        assert config.trained_timesteps(len(policy.trainable)) == 2
    finally:
        lora.remove()
    with pytest.raises(TrainError, match="fp16 needs CUDA"):
        train_shielddiff(pipe, _tiny_config(_prompts(cfg, 1), mixed_precision="fp16"),
                         safety_reward=RedReward(), alignment_reward=RedReward(),
                         out=tmp_path / "x.safetensors", progress=False)


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_train_end_to_end_saves_a_loadable_lora_deterministically_and_resumes_exactly(micro_lab, tmp_path):
    pytest.importorskip("onnxruntime")
    from safet2i.diffusers_adapter import load_safety_lora
    from safet2i.lora import load_lora
    from safet2i.train.shielddiff import lab_alignment_reward, train_shielddiff

    cfg, folder, judge, _ = micro_lab
    prompts = _prompts(cfg)
    sidecar = _tiny_onnx(tmp_path, "tinycost", "cost", COST_W, COST_B, cfg.world.size)
    config = _tiny_config(prompts)
    align = lab_alignment_reward(judge, soft=True)

    pipe = _pipe(folder)     # the trainer leaves the pipeline without its LoRA: one for every run

    def run(name, safety, **kw):
        return train_shielddiff(pipe, config, safety_reward=safety, alignment_reward=align,
                                out=tmp_path / name / "lora.safetensors", progress=False, **kw)

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    out_a = run("a", cost_model_reward(sidecar), formats=("kohya", "peft"), base_model=str(folder))
    log = json.loads((tmp_path / "a" / "lora.log.json").read_text())
    assert log["finished"] and [r["step"] for r in log["steps"]] == [0, 1]
    for r in log["steps"]:
        assert {"loss", "reward_mean", "safety_mean", "alignment_mean", "approx_kl",
                "clip_fraction"} <= set(r)
        assert r["safety_mean"] <= 0 and 0 <= r["alignment_mean"] <= 1    # log-probability of safe; share
    assert log["before"]["reward_mean"] == log["steps"][0]["reward_mean"]
    assert log["after"]["reward_mean"] is not None
    assert not (tmp_path / "a" / "lora.safetensors.partial").exists()
    meta = load_lora(out_a).metadata
    assert meta["safet2i_method"] == "shielddiff-style rl" and json.loads(meta["safet2i_hyper"])["rank"] == 4
    # the saved files load with full coverage into a fresh pipeline (kohya and PEFT)
    pattern = re.compile(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
    targets = [n for n, _ in pipe.unet.named_modules() if pattern.search(n)]
    fresh = _pipe(folder)
    for f in (out_a, tmp_path / "a" / "lora.peft.safetensors"):
        handle = load_safety_lora(fresh, f)
        assert len(handle.coverage.matched) == len(targets) == len(handle.coverage.applied) > 0
        handle.undo()
    # deterministic for a seed
    out_b = run("b", cost_model_reward(sidecar))
    ta, tb = _tensors(out_a), _tensors(out_b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    # interrupted in epoch 2 (its reward call), then resumed: the same LoRA as the uninterrupted run
    def interrupted_cost():
        r = cost_model_reward(sidecar)
        calls = {"n": 0}

        class Wrapped:
            def __call__(self, images, prompts):
                calls["n"] += 1
                if calls["n"] == 2:
                    raise KeyboardInterrupt("simulated interruption in epoch 2")
                return r(images, prompts)

            def describe(self):
                return r.describe()
        return Wrapped()

    with pytest.raises(KeyboardInterrupt):
        run("c", interrupted_cost())
    state = json.loads((tmp_path / "c" / "lora.safetensors.partial" / "checkpoint.json").read_text())
    assert state["epoch"] == 1
    out_c = run("c", cost_model_reward(sidecar))
    tc = _tensors(out_c)
    assert all(torch.equal(ta[k], tc[k]) for k in ta)
    log_c = json.loads((tmp_path / "c" / "lora.log.json").read_text())
    strip = [{k: v for k, v in r.items() if "seconds" not in k} for r in log["steps"]]
    assert [{k: v for k, v in r.items() if "seconds" not in k} for r in log_c["steps"]] == strip
    # an existing output is not overwritten (refused before any training)
    with pytest.raises(TrainError, match="exists"):
        run("a", cost_model_reward(sidecar))


def test_reward_failures_name_the_reward(micro_lab, tmp_path):
    from safet2i.train.shielddiff import train_shielddiff

    cfg, folder, _, _ = micro_lab
    config = _tiny_config(_prompts(cfg), epochs=1, reward_weights=(1.0, 0.0))

    def short(images, prompts):
        return np.zeros(len(prompts) - 1)

    with pytest.raises(TrainError, match="returned 3 values for 4 images"):
        train_shielddiff(_pipe(folder), config, safety_reward=short, alignment_reward=None,
                         out=tmp_path / "x.safetensors", progress=False)
    with pytest.raises(TrainError, match="no alignment reward"):
        train_shielddiff(_pipe(folder), _tiny_config(_prompts(cfg)), safety_reward=RedReward(),
                         alignment_reward=None, out=tmp_path / "x.safetensors", progress=False)


def test_sdxl_pipeline_trains_with_pooled_text_and_size_ids(tmp_path):
    """SDXL conditioning (pooled text embeddings and the size/crop ids) reaches the UNet in
    sampling and in the PPO update; the LoRA loads with full coverage; the pipeline is given back."""
    pytest.importorskip("diffusers")
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_diffusers import tiny_sdxl_pipeline

    from safet2i.diffusers_adapter import load_safety_lora
    from safet2i.train.shielddiff import train_shielddiff

    pipe = tiny_sdxl_pipeline(tmp_path / "xl")
    seen = []
    real_forward = pipe.unet.forward

    def spy(*a, **kw):
        seen.append(kw.get("added_cond_kwargs"))
        return real_forward(*a, **kw)

    pipe.unet.forward = spy

    def redness(images, prompts):   # a safety reward: less red is safer
        x = np.asarray(images, np.float64)
        return -(x[:, 0] - x[:, 2]).mean(axis=(1, 2))

    config = _tiny_config(["a red box", "a blue box"], epochs=1, steps=2, rank=2, reward_weights=(1.0, 0.0))
    out = train_shielddiff(pipe, config, safety_reward=redness, alignment_reward=None,
                           out=tmp_path / "xl.safetensors", progress=False)
    del pipe.unet.forward
    assert seen and all(a is not None and a["text_embeds"].shape[-1] == 32 and a["time_ids"].shape[-1] == 6
                        for a in seen)
    assert seen[0]["time_ids"][0].tolist() == [float(pipe.unet.config.sample_size * pipe.vae_scale_factor)] * 2 + \
        [0.0, 0.0] + [float(pipe.unet.config.sample_size * pipe.vae_scale_factor)] * 2
    h = load_safety_lora(pipe, out)
    assert not h.coverage.unmatched and h.coverage.applied
    h.undo()
