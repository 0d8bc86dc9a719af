"""Detect-and-Guide-style guidance on joint attention: the core (joint softmax part, video frames)
and diffusers' SD3, Flux, Qwen-Image and Wan pipelines (tiny random components of the real classes).

References, independent of the adapter's capture:

* q/k: the attention kernel the layers really call is replaced by a recorder while the test
  re-evaluates the transformer's class ``forward`` (bypassing the adapter) on the concept alone at
  each step's latent (``dispatch_attention_fn`` in the Flux / Qwen-Image / Wan modules;
  ``F.scaled_dot_product_attention`` for SD3's ``JointAttnProcessor2_0``): the q/k after the
  layers' own norms and RoPE;
* the concept's token rows from the tokenizers' ids (T5 / umT5 before ``</s>``, CLIP between
  start and end, Qwen's user turn after the 34 dropped template tokens);
* the map: float64 softmax over all keys, image-query rows, concept columns, mean over heads,
  tokens and layers, token grid, divided by its maximum;
* the step: ε = x + (1 − σ)·v in float64 from the pipeline's own transformer calls, unpacked by
  the pipeline's own ``_unpack_latents`` (Flux, Qwen-Image), Detect-and-Guide Stage 2 in float64
  (``scipy.ndimage.label`` components, a half-pixel bilinear resize written here) given the map the
  method received, then the pipeline's CFG formula (or the concept branch at cfg 1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safet2i.diffusers_adapter import safety_guidance
from safet2i.diffusers_flow import encode_concept_kwargs
from safet2i.errors import SafeT2IError
from safet2i.guidance.dag import DAGConfig, DAGGuidance, joint_token_attention

from tiny_families import FAMILIES, call_kwargs
from test_diffusers_flow_guidance import Recorder as FlowRecorder, _forward, _with_text  # noqa: E402

STEPS = 3
PROMPT = "a photo of a nude woman on a beach"
CONCEPT = "nudity, sexual"
CFG = DAGConfig(scale=0.5, skip_coverage=1.0)
TRUE_CFG = {"sd3": ({}, 4.0), "flux": ({"true_cfg_scale": 4.0, "negative_prompt": "blurry"}, 4.0),
            "qwen_image": ({}, 4.0), "wan": ({}, 5.0)}


# ----------------------------------------------------------------------------- float64 helpers
def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def bilinear(a, size):
    """[h, w] -> size with half-pixel centres, clamped at the edges (align_corners=False)."""
    (h, w), (H, W) = a.shape, size

    def axis(n_in, n_out):
        c = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(c).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), c - lo

    y0, y1, fy = axis(h, H)
    x0, x1, fx = axis(w, W)
    top = a[y0][:, x0] * (1 - fx) + a[y0][:, x1] * fx
    bot = a[y1][:, x0] * (1 - fx) + a[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bot * fy[:, None]


def scales(a, cfg):
    from scipy import ndimage

    h, w = a.shape
    edit, high = a >= cfg.low, a >= cfg.high
    labels, n = ndimage.label(high, structure=np.ones((3, 3)))
    if n == 0 or edit.mean() > cfg.skip_coverage:
        return np.zeros_like(a)
    area = np.array([0.0] + [(labels == i).sum() * cfg.area_max / (h * w) for i in range(1, n + 1)])
    return np.where(edit, np.maximum(area[labels], 1.0), 0.0) * np.minimum(a / cfg.low, cfg.magnitude_max) * edit


def dag_d_p(eu, ec, es, amap, cfg):
    """d_p for eps [B, C, H, W] with map [B, h, w], or [B, C, F, H, W] with [B, F, h, w]."""
    d = ec - eu
    for b in range(ec.shape[0]):
        frames = range(ec.shape[2]) if ec.ndim == 5 else [None]
        for f in frames:
            idx = (b, slice(None), f) if f is not None else (b,)
            fac = bilinear(scales(amap[b, f] if f is not None else amap[b], cfg), ec.shape[-2:])
            d[idx] = d[idx] - cfg.scale * fac * (es[idx] - eu[idx])
    return d


# ----------------------------------------------------------------------------- core
def test_joint_token_attention_matches_a_float64_softmax_over_all_keys():
    rng = np.random.default_rng(0)
    b, heads, s, dh = 2, 3, 11, 4
    q, k = rng.normal(size=(b, heads, s, dh)), rng.normal(size=(b, heads, s, dh))
    mask = rng.random((b, 1, 1, s)) > 0.2
    mask[..., [1, 2, 4, 5]] = True
    cols = [[1, 4], [2, 5]]                      # two tokens, each with a copy
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh)
    for m in (None, mask, np.where(mask, 0.0, -1e9)):
        lg = logits if m is None else (np.where(m, logits, -np.inf) if m.dtype == bool else logits + m)
        p = softmax(lg)[:, :, 6:11]
        want = (p[..., [1, 2]] + p[..., [4, 5]]).mean(axis=(1, 3))
        got = joint_token_attention(torch.tensor(q), torch.tensor(k), cols, slice(6, 11),
                                    mask=None if m is None else torch.tensor(m), max_elements=2 * heads * s)
        np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        joint_token_attention(torch.tensor(q), torch.tensor(k), [s], slice(0, 2))


def test_video_latents_are_guided_frame_by_frame():
    rng = np.random.default_rng(1)
    eu, ec, es = (rng.normal(size=(1, 4, 2, 8, 8)) for _ in range(3))
    amap = rng.random((1, 2, 4, 4)) * 0.4
    amap[0, 0, 1:3, 1:3] = 1.0                   # an object in frame 0 only
    got = DAGGuidance(CFG).direction(*(torch.tensor(t) for t in (eu, ec, es)), torch.tensor(amap)).numpy()
    np.testing.assert_allclose(got, dag_d_p(eu, ec, es, amap, CFG), atol=1e-6)
    with pytest.raises(ValueError, match=r"\[B, F, h, w\]"):
        DAGGuidance(CFG).direction(*(torch.tensor(t) for t in (eu, ec, es)), torch.tensor(amap[:, 0]))


# ----------------------------------------------------------------------------- pipelines
@pytest.fixture
def pipes(family_pipes):   # the session's seed-0 pipelines (conftest.py)
    return family_pipes


def _kwargs(family, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    return call_kwargs(family, seed=3, **kw)


def concept_rows(pipe, family):
    """The concept's token rows, from the tokenizers' ids (module docstring)."""
    msl = FAMILIES[family].call["max_sequence_length"]
    if family == "qwen_image":
        ids = pipe.tokenizer(pipe.prompt_template_encode.format(CONCEPT)).input_ids[34:]
        end = max(i for i, t in enumerate(ids) if t == pipe.tokenizer.convert_tokens_to_ids("<|im_end|>"))
        return list(range(end))
    if family == "sd3":
        ids = pipe.tokenizer(CONCEPT).input_ids          # CLIP: start, tokens, end
        t5 = pipe.tokenizer_3(CONCEPT, max_length=msl).input_ids
        return list(range(1, len(ids) - 1)) + [77 + i for i in range(t5.index(1))]
    tok = pipe.tokenizer_2 if family == "flux" else pipe.tokenizer
    return list(range(tok(CONCEPT, max_length=msl).input_ids.index(1)))


class Kernel:
    """Records the q/k of every attention-kernel call (module docstring) while active."""

    def __init__(self, family):
        import diffusers.models.transformers.transformer_flux as flux
        import diffusers.models.transformers.transformer_qwenimage as qwen
        import diffusers.models.transformers.transformer_wan as wan
        import torch.nn.functional as F

        self.target, self.name = {"sd3": (F, "scaled_dot_product_attention"), "flux": (flux, "dispatch_attention_fn"),
                                  "qwen_image": (qwen, "dispatch_attention_fn"),
                                  "wan": (wan, "dispatch_attention_fn")}[family]
        self.heads_first = family == "sd3"          # SDPA takes [B, H, S, D]; dispatch takes [B, S, H, D]
        self.calls = []

    def __enter__(self):
        self.orig = getattr(self.target, self.name)

        def rec(q, k, v, *a, **kw):
            qq, kk = (q, k) if self.heads_first else (q.transpose(1, 2), k.transpose(1, 2))
            m = kw.get("attn_mask")
            self.calls.append((qq.double().numpy(), kk.double().numpy(), None if m is None else m.numpy()))
            return self.orig(q, k, v, *a, **kw)

        setattr(self.target, self.name, rec)
        return self

    def __exit__(self, *exc):
        setattr(self.target, self.name, self.orig)


def reference_map(family, calls, rows, text, grid):
    n = int(np.prod(grid))
    layers = []
    for q, k, mask in calls:
        s_q, s_k = q.shape[2], k.shape[2]
        if family == "wan":
            if s_k != text:
                continue                             # attn1: self-attention
            img0, text0 = 0, 0
        elif family == "sd3":
            img0, text0 = 0, n                       # JointAttnProcessor2_0: [image, text]
        else:
            img0, text0 = text, 0                    # [text, image]
        logits = q[:, :, img0:img0 + n] @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
        if mask is not None:
            logits = np.where(mask, logits, -np.inf)
        layers.append(softmax(logits)[..., [text0 + r for r in rows]].mean(axis=(1, 3)))
    avg = np.mean(layers, axis=0).reshape(-1, *grid)
    return avg / avg.reshape(avg.shape[0], -1).max(1).reshape(-1, *[1] * len(grid)), len(layers)


class Recorder(FlowRecorder):
    """The pipeline's own transformer calls and the scheduler's inputs (``FlowRecorder``), and the
    maps the method got."""

    def __init__(self, pipe, method):
        super().__init__(pipe)
        self.maps = []
        compute = method.compute

        def record(eu, ec, es, attention):
            self.maps.append(attention.double().numpy())
            return compute(eu, ec, es, attention)

        method.compute = record


def grid_of(family, kw):
    x = kw["hidden_states"]
    if family == "sd3":
        return (x.shape[2] // 2, x.shape[3] // 2)
    if family == "wan":
        return (x.shape[2], x.shape[3] // 2, x.shape[4] // 2)
    side = int(round(x.shape[1] ** 0.5))         # 32 px: a square token grid
    return (side, side)


def run_and_check(pipe, family, extra, scale, branch_scale=None, length=None):
    concept = encode_concept_kwargs(pipe, CONCEPT,
                                    max_sequence_length=length or FAMILIES[family].call["max_sequence_length"])
    method = DAGGuidance(CFG)
    rec = Recorder(pipe, method)
    try:
        with safety_guidance(pipe, method, CONCEPT, concept_kwargs=concept, branch_scale=branch_scale or 0.0):
            pipe(prompt=PROMPT, **_kwargs(family, **extra))
    finally:
        rec.close()
    rows = concept_rows(pipe, family)
    text = concept["encoder_hidden_states"].shape[1]
    packed = family in ("flux", "qwen_image")
    sigmas = pipe.scheduler.sigmas.double()
    assert len(rec.steps) == STEPS and len(rec.maps) == STEPS
    worst = 0.0
    for i, st in enumerate(rec.steps):
        s = float(sigmas[i])
        module, kw = st["calls"][0]
        x = kw["hidden_states"].double()
        b = x.shape[0] // 2 if family == "sd3" else x.shape[0]
        if family == "sd3":
            v = _forward(module, kw)
            vu, vc = v[:b], v[b:]
            kw = {k: (t[b:] if torch.is_tensor(t) and t.ndim and t.shape[0] == 2 * b else t) for k, t in kw.items()}
            x = x[b:]
        else:
            vc = _forward(module, kw)
            vu = _forward(*st["calls"][1]) if len(st["calls"]) > 1 else None
        with Kernel(family) as kern:
            vs = _forward(module, _with_text(kw, concept, b))
        grid = grid_of(family, kw)
        want, layers = reference_map(family, kern.calls, rows, text, grid)
        got_map = rec.maps[i]
        assert got_map.shape == want.shape and layers >= 2
        np.testing.assert_allclose(got_map, want, atol=1e-4, err_msg=f"map at step {i}")

        def spatial(v):
            if not packed:
                return v.numpy()
            u = pipe._unpack_latents(v, 32, 32, pipe.vae_scale_factor)
            return (u[:, :, 0] if u.ndim == 5 else u).numpy()

        def flat(u):
            return pipe._pack_latents(torch.tensor(u), u.shape[0], u.shape[1], u.shape[2], u.shape[3]).numpy() \
                if packed else u

        xs = spatial(x)
        eps = lambda v: xs + (1 - s) * spatial(v)   # noqa: E731
        ec, es = eps(vc), eps(vs)
        eu = ec if vu is None else eps(vu)
        d_p = dag_d_p(eu, ec, es, got_map, CFG)
        if vu is None:                            # concept branch: ε_p − s_b·c, c = (ε_p − ε_p) − d_p
            guided = ec + branch_scale * d_p
            want_out = vc.numpy() if s == 1.0 else flat((guided - xs) / (1 - s))
            plain = vc.numpy()
        else:
            vcg = vc.numpy() if s == 1.0 else flat((eu + d_p - xs) / (1 - s))

            def combine(vcond):
                comb = vu.numpy() + scale * (vcond - vu.numpy())
                if family == "qwen_image":
                    comb = comb * (np.linalg.norm(vcond, axis=-1, keepdims=True)
                                   / np.linalg.norm(comb, axis=-1, keepdims=True))
                return comb

            want_out, plain = combine(vcg), combine(vc.numpy())
        atol = 1e-4 * float(np.abs(want_out).max())
        np.testing.assert_allclose(st["out"].numpy(), want_out, rtol=0, atol=atol, err_msg=f"step {i} (σ = {s})")
        worst = max(worst, float(np.abs(want_out - plain).max()) / atol)
    assert worst > 50, worst
    return method


def test_flux_concept_of_another_text_length_is_read_from_its_own_call(pipes):
    """A Flux concept encoded at another T5 length than the call's gets its own transformer call
    (text position ids of its own length) and its map is read from that call's text rows."""
    extra, scale = TRUE_CFG["flux"]
    method = run_and_check(pipes["flux"], "flux", extra, scale, length=FAMILIES["flux"].call["max_sequence_length"] // 2)
    assert all(h["applied"] for h in method.history)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_map_and_step_match_float64_references(pipes, family):
    extra, scale = TRUE_CFG[family]
    method = run_and_check(pipes[family], family, extra, scale)
    assert all(h["applied"] for h in method.history)
    if family == "wan":                           # two latent frames, each an image of its own
        assert all(len(h["images"]) == 2 for h in method.history)


def test_flux_at_cfg_one_uses_the_concept_branch(pipes):
    run_and_check(pipes["flux"], "flux", {}, 1.0, branch_scale=3.5)


def test_outputs_unchanged_by_the_capture_and_everything_restored(pipes):
    """Zero strength reads no attention and is bit-identical; a wrong processor is refused; the
    hooks are gone afterwards."""
    pipe = pipes["flux"]
    extra = TRUE_CFG["flux"][0]
    plain = pipe(prompt=PROMPT, **_kwargs("flux", **extra)).images
    with safety_guidance(pipe, DAGGuidance(DAGConfig(scale=0.0)), CONCEPT):
        off = pipe(prompt=PROMPT, **_kwargs("flux", **extra)).images
    assert np.array_equal(plain, off)
    attn = pipe.transformer.transformer_blocks[0].attn
    saved = attn.processor
    attn.processor = type("OtherProcessor", (), {"__call__": saved.__call__})()
    try:
        with pytest.raises(SafeT2IError, match="OtherProcessor"):
            with safety_guidance(pipe, DAGGuidance(CFG), CONCEPT):
                pass
    finally:
        attn.processor = saved
    assert not any(m._forward_pre_hooks for m in pipe.transformer.modules())
    assert np.array_equal(pipe(prompt=PROMPT, **_kwargs("flux", **extra)).images, plain)


def test_concept_kwargs_without_text_or_positions_is_refused(pipes):
    pipe = pipes["wan"]
    concept = encode_concept_kwargs(pipe, CONCEPT, max_sequence_length=64)
    with pytest.raises(SafeT2IError, match="token_positions"):
        with safety_guidance(pipe, DAGGuidance(CFG), concept_kwargs=concept):
            pass
