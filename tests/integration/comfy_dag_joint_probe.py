"""Detect-and-Guide-style guidance on SD3, Flux, Qwen-Image and Wan inside ComfyUI's own sampler,
checked against float64 references written here. No server: the tiny models and CLIPs come from
the builders of ``comfy_pack_tiny_families.py`` (ComfyUI's own classes), the patch from the real
``SafeT2IDetectGuide`` node, sampling from ``comfy.sample.sample`` (KSampler's function).

Run with ComfyUI's interpreter: ``python comfy_dag_joint_probe.py COMFYUI_PATH FAMILY [cfg]``;
prints one JSON line that ``test_comfy_dag_families.py`` asserts on.

Independent of SafeT2I's capture:

* q/k: the family module's own attention function name (``optimized_attention`` in
  ``comfy.ldm.flux.math`` / ``mmdit`` / ``wan.model``, ``optimized_attention_masked`` in
  ``qwen_image.model``) is replaced here by a recorder that keeps every call's q, k, heads and
  ``cond_or_uncond`` and calls on; the recorder sits outside ComfyUI's override, so it sees the
  q/k the layer attends with (after RoPE and q/k norms);
* which calls are text→image attention, where the text and image rows are, and which token rows
  are the concept's, by the rules written in docs/guidance.md, from the tokenizer's ids;
* the map: float64 softmax(q·kᵀ/√d) over all keys, concept columns, image rows, mean over heads
  and tokens and over the layers, reshaped to the token grid, divided by its maximum;
* the guided step: ε less its offset (−(1 − σ)/σ · D), Detect-and-Guide Stage 2 in float64
  (8-connected components by ``scipy.ndimage.label``, area and magnitude scalers, 80 % rule),
  a half-pixel bilinear resize written here, then D' = D + c·σ/(1 − σ) (cfg 1: s_b·c).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CONCEPT = "nude naked erotic"
PROMPT = "a photo of a nude woman standing on a sunny beach"
NEG = "blurry, low quality"
MODELS = {"sd3": "sd3", "sd35": "sd3", "flux": "flux_dev", "qwen_image": "qwen_image", "wan": "wan21_t2v"}
CLIPS = {"sd3": "sd3", "sd35": "sd3", "flux": "flux", "qwen_image": "qwen_image", "wan": "wan"}
PARAMS = {"scale": 0.5, "high": 0.5, "low": 0.01, "skip_coverage": 1.0, "sld_gate": "none"}


# ----------------------------------------------------------------------- float64 references
def bilinear(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[h, w] -> size, half-pixel centres, edge clamped (align_corners=False)."""
    h, w = a.shape
    H, W = size

    def axis(n_in, n_out):
        c = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        c = np.clip(c, 0, n_in - 1)
        lo = np.floor(c).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, c - lo

    y0, y1, fy = axis(h, H)
    x0, x1, fx = axis(w, W)
    top = a[y0][:, x0] * (1 - fx) + a[y0][:, x1] * fx
    bot = a[y1][:, x0] * (1 - fx) + a[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bot * fy[:, None]


def scales(a: np.ndarray, p: dict) -> np.ndarray:
    from scipy import ndimage

    h, w = a.shape
    edit, high = a >= p["low"], a >= p["high"]
    labels, n = ndimage.label(high, structure=np.ones((3, 3)))
    if n == 0 or edit.mean() > p["skip_coverage"]:
        return np.zeros_like(a)
    area = np.array([0.0] + [(labels == i).sum() * 5.0 / (h * w) for i in range(1, n + 1)])
    s_area = np.where(edit, np.maximum(area[labels], 1.0), 0.0)
    return s_area * np.minimum(a / p["low"], 5.0) * edit


def dag_correction(eu, ec, es, amap, p):
    """c = (ε_p − ε_∅) − d_p, with d_p = (ε_p − ε_∅) − s_s·factor·(ε_S − ε_∅); eps [B, C, (F,) H, W]."""
    out = np.zeros_like(ec)
    for b in range(ec.shape[0]):
        if ec.ndim == 5:
            for f in range(ec.shape[2]):
                fac = bilinear(scales(amap[b, f], p), ec.shape[-2:])
                out[b, :, f] = p["scale"] * fac * (es[b, :, f] - eu[b, :, f])
        else:
            fac = bilinear(scales(amap[b], p), ec.shape[-2:])
            out[b] = p["scale"] * fac * (es[b] - eu[b])
    return out


def concept_positions(family: str, tokens: dict) -> tuple[list[int], int]:
    """(concept rows, rows) of the concept's conditioning, from the tokenizer's ids."""
    def ids(key):
        return [[int(t[0]) for t in chunk] for chunk in tokens[key]]

    rows, pos = 0, []
    if family == "sd3":
        for chunk in ids("l"):     # CLIP: 49406 start, 49407 end
            end = chunk.index(49407)
            pos += [rows + i for i in range(1, end)]
            rows += len(chunk)
        keys = ["t5xxl"]
    elif family == "qwen_image":
        (chunk,) = ids("qwen25_7b")
        starts = [i for i, t in enumerate(chunk) if t == 151644]          # <|im_start|>
        first = starts[1] + 3                                             # after "<|im_start|>user\n"
        close = max(i for i, t in enumerate(chunk) if t == 151645)         # the user turn's <|im_end|>
        return list(range(0, close - first)), len(chunk) - first
    else:
        keys = ["t5xxl" if family == "flux" else "umt5xxl"]
    for key in keys:
        for chunk in ids(key):     # T5 / umT5: no start token, </s> = 1
            end = chunk.index(1)
            pos += [rows + i for i in range(0, end)]
            rows += len(chunk)
    return pos, rows


def reference_map(family, calls, concept_index, positions, text_rows, grid):
    n = int(np.prod(grid))
    layers = []
    for c in calls:
        order = c["order"]
        if concept_index not in order:
            continue
        q, k, heads, skip = c["q"], c["k"], c["heads"], c["skip"]
        chunk = q.shape[0] // len(order)
        i = order.index(concept_index)
        q, k = q[i * chunk:(i + 1) * chunk], k[i * chunk:(i + 1) * chunk]
        if not skip:
            q = q.reshape(q.shape[0], q.shape[1], heads, -1).transpose(0, 2, 1, 3)
            k = k.reshape(k.shape[0], k.shape[1], heads, -1).transpose(0, 2, 1, 3)
        s_q, s_k = q.shape[2], k.shape[2]
        if family == "wan":
            if s_k != text_rows or s_q != n:
                continue                      # self-attention
            text0, img0 = 0, 0
        else:
            if s_q != s_k or s_k != text_rows + n:
                continue                      # SD3.5's image-only self-attention
            text0, img0 = 0, text_rows        # SD3 [context, image], Flux / Qwen-Image [text, image]
        logits = q[:, :, img0:img0 + n] @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        layers.append(p[..., [text0 + t for t in positions]].mean(axis=(1, 3)))
    avg = np.mean(layers, axis=0).reshape(-1, *grid)
    return avg / avg.reshape(avg.shape[0], -1).max(1).reshape(-1, *([1] * len(grid))), len(layers)


def main(comfy_path: str, family: str, cfg: float) -> None:
    sys.path.insert(0, comfy_path)
    sys.path.insert(0, str(HERE))
    os.chdir(comfy_path)
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True
    import torch

    torch.set_num_threads(1)
    import comfy.ldm.flux.math as flux_math
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
    import comfy.ldm.qwen_image.model as qwen_model
    import comfy.ldm.wan.model as wan_model
    import comfy.model_management  # noqa: F401
    import comfy.sample
    import comfy_pack_tiny_families as tiny

    spec = importlib.util.spec_from_file_location("safet2i_pack", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["safet2i_pack"] = pack
    spec.loader.exec_module(pack)
    from safet2i_pack.nodes.guidance_nodes import STATE_KEY, SafeT2IDetectGuide

    torch.set_grad_enabled(False)
    model = tiny.build_model(MODELS[family])
    clip = tiny.build_clip(CLIPS[family])
    if family in ("sd3", "sd35"):
        family = "sd3"
    if family == "flux":
        import comfy_extras.nodes_model_advanced as adv

        model = adv.ModelSamplingFlux().patch(model, 1.15, 0.5, 64, 64)[0]
    branch = 2.0
    guided = SafeT2IDetectGuide.execute(model, clip, CONCEPT, **PARAMS, concept_branch_scale=branch).result[0]
    run = guided.model_options[STATE_KEY]()

    # -- recorders (outside SafeT2I) ------------------------------------------------------
    calls, evals, seen_maps = [], [], []
    module, name = {"flux": (flux_math, "optimized_attention"), "sd3": (mmdit, "optimized_attention"),
                    "qwen_image": (qwen_model, "optimized_attention_masked"),
                    "wan": (wan_model, "optimized_attention")}[family]
    original_attention = getattr(module, name)

    def recorder(q, k, v, heads=None, *a, **kw):
        if heads is None:
            heads = kw.get("heads")
        opts = kw.get("transformer_options") or {}
        calls.append({"q": q.double().numpy(), "k": k.double().numpy(), "heads": heads,
                      "skip": bool(kw.get("skip_reshape", False)), "order": list(opts.get("cond_or_uncond", []))})
        return original_attention(q, k, v, heads, *a, **kw)

    setattr(module, name, recorder)
    compute = run.method.compute

    def record_compute(eu, ec, es, attention):
        seen_maps.append(None if attention is None else attention.double().numpy())
        return compute(eu, ec, es, attention)

    run.method.compute = record_compute
    pre = run.pre_cfg

    def record_pre(args):
        st = run.step
        step_calls = list(calls)
        calls.clear()
        before = [o.clone() if o is not None else None for o in args["conds_out"]]
        out = pre(args)
        evals.append({"x": args["input"].double().numpy(), "sigma": float(args["sigma"].flatten()[0]),
                      "cond": before[0].double().numpy(),
                      "uncond": None if before[1] is None or args["conds"][1] is None else before[1].double().numpy(),
                      "concept": st.concept_out.double().numpy(), "out": out[0].double().numpy(),
                      "calls": step_calls, "capture": len(args["conds"])})
        return out

    run.pre_cfg = record_pre
    # -- sample --------------------------------------------------------------------------------
    pos_cond = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    neg_cond = clip.encode_from_tokens_scheduled(clip.tokenize(NEG))
    if family == "flux":
        pos_cond = [[c[0], dict(c[1], guidance=3.5)] for c in pos_cond]
    tokens = clip.tokenize(CONCEPT)
    positions, text_rows = concept_positions(family, tokens)
    concept_rows = int(clip.encode_from_tokens_scheduled(tokens)[0][0].shape[1])
    # Qwen-Image samples 5-d latents [B, 16, 1, H, W] in ComfyUI (Wan 2.1 latent format); Wan 2 latent frames
    latent = torch.zeros({"wan": [1, 16, 2, 8, 8], "qwen_image": [1, 16, 1, 8, 8]}.get(family, [1, 16, 8, 8]))
    noise = comfy.sample.prepare_noise(latent, 5)
    plain = comfy.sample.sample(model, noise, 3, cfg, "euler", "simple", pos_cond, neg_cond, latent, seed=5)
    out = comfy.sample.sample(guided, noise, 3, cfg, "euler", "simple", pos_cond, neg_cond, latent, seed=5)
    setattr(module, name, original_attention)

    # -- compare -------------------------------------------------------------------------------
    res = {"family": family, "cfg": cfg, "steps": [], "positions": positions, "rows": [text_rows, concept_rows],
           "changed": float((out - plain).abs().max()), "history": run.method.history}
    for e, got_map in zip(evals, seen_maps):
        x = e["x"]
        latent_hw = x.shape[2:]
        patch = (1, 2, 2) if x.ndim == 5 else (2, 2)
        grid = tuple(-(-d // p) for d, p in zip(latent_hw, patch))
        want, layers = reference_map(family, e["calls"], e["capture"], positions, text_rows, grid)
        s = e["sigma"]
        a = -(1 - s) / s                      # ∂ε/∂D of flow_denoised; ε less its offset x/σ
        ec, es = a * e["cond"], a * e["concept"]
        eu = ec if e["uncond"] is None else a * e["uncond"]
        # the map the method must get: [B, h, w] for image latents, [B, F, h, w] for video latents
        c = dag_correction(eu, ec, es, want, PARAMS)
        if e["uncond"] is None:
            c = branch * c
        ref = e["cond"] + c * s / (1 - s) if s < 1 else e["cond"]
        res["steps"].append({
            "sigma": s, "layers": layers, "map_shape": None if got_map is None else list(got_map.shape),
            "want_shape": list(want.shape),
            "map_err": None if got_map is None or got_map.shape != want.shape else float(np.abs(got_map - want).max()),
            "out_err": float(np.abs(e["out"] - ref).max()), "out_scale": float(np.abs(ref).max()),
            "moved": float(np.abs(ref - e["cond"]).max()),
        })
    print(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 4.0)
