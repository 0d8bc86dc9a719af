"""SD2.x and SDXL prompt steering through ComfyUI's real text-encoder classes, no checkpoint.

Run with ComfyUI's interpreter: ``python comfy_tiny_clip_steer.py COMFYUI_PATH``; prints one
JSON line of measurements that ``test_comfy_steering_sd2_sdxl.py`` asserts on.

The CLIP objects are ComfyUI's own: ``comfy.sd.CLIP(target=SD20().clip_target())`` and
``SDXL(...).clip_target()`` (SD2Tokenizer/SD2ClipModel, SDXLTokenizer/SDXLClipModel, the real
CLIP BPE tokenizers). Only the text-model configs are made tiny, through ComfyUI's own
``model_options["<model_name>_model_config"]`` override of ``textmodel_json_config``
(``sd1_clip.SDClipModel``): 3 layers (the penultimate-layer selection ``layer_idx=-2`` needs
``abs(-2) < num_layers``), vocabulary 49408 and 77 positions as in the JSON files; the
widths differ per encoder (SD2 ``h`` 48; SDXL ``l`` 32, ``g`` 64) so a wrong channel split
cannot pass. ComfyUI's ops skip weight init, so every parameter is set from a fixed seed.

The reference is computed here, independently of the node: rows from each ComfyUI encoder
alone (``clip_<key>.encode_token_weights``, the layer ComfyUI uses), concept subspace from
the EOS rows of the same encoder, leave-one-out EOS rows from full-length 77-token encodes
(the node uses its packed short encodes), then ``projector`` / ``steer_chunk`` of
``safet2i.steering``. Everything is float32 on CPU.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EOS = 49407
TINY = {  # per ComfyUI model_name: clip_h (SD2), clip_l and clip_g (SDXL)
    "h": {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 4, "num_hidden_layers": 3,
          "projection_dim": 48},
    "l": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
          "projection_dim": 32},
    "g": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 3,
          "projection_dim": 64},
}
NUDE = "a photo of a nude woman on a sunny beach, erotic art"
LONG = ", ".join(["a nude figure drawing in a quiet museum hall"] * 12)  # > 77 tokens: several chunks


def main(comfy_path: str) -> None:
    sys.path.insert(0, comfy_path)
    os.chdir(comfy_path)
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True
    import torch

    import comfy.model_management  # noqa: F401
    import comfy.sd
    import comfy.supported_models

    spec = importlib.util.spec_from_file_location("safet2i_pack", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["safet2i_pack"] = pack
    spec.loader.exec_module(pack)
    from safet2i_pack.nodes import steering_nodes
    from safet2i_pack.nodes.steering_nodes import SafeT2IPromptSteer
    from safet2i_pack.safet2i.steering import SVF_PRESETS, load_concepts, projector, steer_chunk

    warnings = []

    class Catch(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    logging.getLogger("safet2i").addHandler(Catch())
    torch.set_grad_enabled(False)

    def build(target, seed):
        opts = {"dtype": torch.float32}
        for key, cfg in TINY.items():
            opts[f"clip_{key}_model_config"] = dict(cfg)
        clip = comfy.sd.CLIP(target=target, model_options=opts)
        g = torch.Generator().manual_seed(seed)
        for name, p in sorted(clip.cond_stage_model.named_parameters()):
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1]) ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
        return clip

    def sub_of(clip, key):
        return getattr(clip.cond_stage_model, f"clip_{key}")

    def sub_encode(clip, key, chunks):
        """(rows [chunks*77, d], pooled) of ComfyUI's clip_<key> encoder alone, its default layer."""
        clip.cond_stage_model.reset_clip_options()
        clip.load_model()
        rows, pooled = sub_of(clip, key).encode_token_weights(chunks)[:2]
        return rows[0], pooled

    def layers_matching(clip, key, text, rows):
        """0-based layers whose (ComfyUI-normalised) hidden states equal ``rows`` (first chunk)."""
        sub = sub_of(clip, key)
        ids = torch.tensor([[t[0] for t in clip.tokenize(text)[key][0]]])
        tm = sub.transformer.text_model
        _, every, _ = tm(input_tokens=ids, intermediate_output="all",
                         final_layer_norm_intermediate=sub.layer_norm_hidden_state)
        return [i for i in range(every.shape[1]) if torch.allclose(every[0, i], rows[:77], rtol=0, atol=1e-6)]

    def reference(clip, key, text, concepts, alpha, svf):
        """Independent steering of encoder ``key``'s rows: (rows, [(triggers, t')] per chunk)."""
        chunks = clip.tokenize(text)[key]
        rows, _ = sub_encode(clip, key, chunks)
        cvec = []
        for c in concepts:
            tk = clip.tokenize(c)[key]
            crow, _ = sub_encode(clip, key, tk)
            cvec.append(crow[[t[0] for t in tk[0]].index(EOS)])
        p_c = projector(torch.stack(cvec))
        out, info = rows.clone(), []
        for ci, chunk in enumerate(chunks):
            ids = [t[0] for t in chunk]
            eos = ids.index(EOS)
            loo = []
            for i in range(1, eos):
                variant = [(0 if j == i else t[0], t[1]) for j, t in enumerate(chunk)]
                loo.append(sub_encode(clip, key, [variant])[0][eos])
            res = steer_chunk(rows[ci * 77:(ci + 1) * 77], torch.stack(loo), p_c, eos - 1, alpha=alpha,
                              order="code", svf=svf)
            out[ci * 77:(ci + 1) * 77] = res.rows
            info.append({"triggers": res.triggers, "t_prime": res.t_prime})
        return rows, out, info

    def diff(a, b):
        return {"max": float((a.double() - b.double()).abs().max()), "scale": float(b.abs().max()),
                "equal": bool(torch.equal(a, b)), "shape": [list(a.shape), list(b.shape)]}

    def run_node(clip, text, concepts, alpha, svf):
        out = SafeT2IPromptSteer.execute(clip, text, concepts, alpha=alpha, self_validating=svf)
        return out.args[0], json.loads(out.args[2])

    def keep(info):
        """Row indices (all chunks) that are no trigger position."""
        return [ci * 77 + j for ci, c in enumerate(info) for j in range(77) if j not in c["triggers"]]

    def summary(positive):
        return [{k: v for k, v in e[1].items() if k != "pooled_output"} for e in positive]

    concepts, svf_name = load_concepts("nudity")
    svf = SVF_PRESETS[svf_name]
    result = {}

    # ---------------------------------------------------------------- SD2.x
    sd2 = build(comfy.supported_models.SD20({}).clip_target(), seed=1)
    r = {"width": steering_nodes._encoder_width(sd2, "h"), "keys": sorted(sd2.tokenize(NUDE)),
         "layer": [sub_of(sd2, "h").layer, sub_of(sd2, "h").layer_idx],
         "num_layers": TINY["h"]["num_hidden_layers"]}
    cond, pooled = sd2.encode_from_tokens(sd2.tokenize(NUDE), return_pooled=True)
    rows, ref, info = reference(sd2, "h", NUDE, concepts, 0.0, None)
    r["cond_is_h_rows"] = diff(cond[0], rows)
    r["layers_matching"] = layers_matching(sd2, "h", NUDE, rows)
    positive, rep = run_node(sd2, NUDE, "nudity", 0.0, False)
    (entry,) = positive
    r["always"] = {"steered": diff(entry[0][0], ref), "pooled": diff(entry[1]["pooled_output"], pooled),
                   "changed": diff(entry[0][0], cond[0]), "shape": [list(entry[0].shape), list(cond.shape)],
                   "entries": summary(positive), "report": rep["chunks"], "ref": info,
                   "untouched_rows_equal": bool(torch.equal(entry[0][0, keep(info)], cond[0, keep(info)]))}
    # last-layer rows would give a different result: the layer really matters
    sd2.clip_layer(-1)
    r["last_layer_cond_differs"] = diff(sd2.encode_from_tokens(sd2.tokenize(NUDE)), cond)
    sd2.clip_layer(None)
    _, ref_svf, info_svf = reference(sd2, "h", NUDE, concepts, 0.0, svf)
    positive, rep = run_node(sd2, NUDE, "nudity", 0.0, True)
    r["window"] = {"entries": summary(positive), "report": rep["chunks"], "ref": info_svf,
                   "steered": diff(positive[0][0][0], ref_svf),
                   "original": diff(positive[-1][0][0], cond[0])}
    positive, rep = run_node(sd2, NUDE, "nudity", 10.0, True)  # no trigger possible
    r["no_trigger"] = {"entries": summary(positive), "cond": diff(positive[0][0], cond),
                       "pooled": diff(positive[0][1]["pooled_output"], pooled),
                       "triggers": [c["triggers"] for c in rep["chunks"]]}
    result["sd2"] = r

    # ---------------------------------------------------------------- SDXL
    xl = build(comfy.supported_models.SDXL({}).clip_target(), seed=2)
    r = {"widths": {k: steering_nodes._encoder_width(xl, k) for k in ("l", "g")},
         "splits": steering_nodes._splits(xl, xl.tokenize(NUDE), 96),
         "layers": {k: [sub_of(xl, k).layer, sub_of(xl, k).layer_idx] for k in ("l", "g")},
         # no readable sub-models: the full-size layout (CLIP-L 768 | bigG 1280), as before
         "full_size_splits": steering_nodes._splits(object(), xl.tokenize(NUDE), 2048)}
    try:
        steering_nodes._splits(xl, xl.tokenize(NUDE), 2048)
        r["width_mismatch"] = None
    except Exception as exc:  # noqa: BLE001 - reported to the test
        r["width_mismatch"] = f"{type(exc).__name__}: {exc}"
    for name, text in (("short", NUDE), ("long", LONG)):
        tokens = xl.tokenize(text)
        cond, pooled = xl.encode_from_tokens(tokens, return_pooled=True)
        refs = {k: reference(xl, k, text, concepts, 0.0, None) for k in ("l", "g")}
        g_pooled = sub_encode(xl, "g", tokens["g"])[1]
        positive, rep = run_node(xl, text, "nudity", 0.0, False)
        (entry,) = positive
        w = r["widths"]["l"]
        r[name] = {
            "chunks": {k: len(tokens[k]) for k in tokens},
            "cond_layout": diff(cond[0], torch.cat([refs["l"][0], refs["g"][0]], dim=-1)),
            "layers_matching": {k: layers_matching(xl, k, text, refs[k][0]) for k in ("l", "g")},
            "steered_l": diff(entry[0][0, :, :w], refs["l"][1]),
            "steered_g": diff(entry[0][0, :, w:], refs["g"][1]),
            "changed_l": diff(entry[0][0, :, :w], cond[0, :, :w]),
            "changed_g": diff(entry[0][0, :, w:], cond[0, :, w:]),
            "untouched_equal": {
                k: bool(torch.equal(entry[0][0, keep(refs[k][2]), lo:hi], cond[0, keep(refs[k][2]), lo:hi]))
                for k, lo, hi in (("l", 0, w), ("g", w, cond.shape[-1]))},
            "shape": [list(entry[0].shape), list(cond.shape)],
            "pooled_vs_comfy": diff(entry[1]["pooled_output"], pooled),
            "pooled_vs_clip_g": diff(entry[1]["pooled_output"], g_pooled),
            "entries": summary(positive), "report": rep["chunks"],
            "ref": {k: refs[k][2] for k in ("l", "g")},
        }
        positive, rep = run_node(xl, text, "nudity", 10.0, True)
        r[name]["no_trigger"] = {"entries": summary(positive), "cond": diff(positive[0][0], cond),
                                 "pooled": diff(positive[0][1]["pooled_output"], pooled),
                                 "triggers": [c["triggers"] for c in rep["chunks"]]}
    result["sdxl"] = r
    result["warnings"] = warnings
    result["no_truncation"] = len(steering_nodes._NO_TRUNCATION)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
