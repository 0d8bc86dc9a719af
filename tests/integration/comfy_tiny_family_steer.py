"""SD3, Flux, Wan and Qwen-Image prompt steering through ComfyUI's real text-encoder classes, no checkpoint.

Run with ComfyUI's interpreter: ``python comfy_tiny_family_steer.py COMFYUI_PATH``; prints one JSON
line of measurements that ``test_comfy_steering_families.py`` asserts on.

The CLIP objects are ComfyUI's own ``comfy.sd.CLIP`` built from its text-encoder classes
(``sd3_clip.sd3_clip()`` + ``SD3Tokenizer``, ``flux.flux_clip()`` + ``FluxTokenizer``, ``wan.te()`` +
``WanT5Tokenizer``, ``qwen_image.te()`` + ``QwenImageTokenizer``) with ComfyUI's real T5 and Qwen2.5
tokenizers. umT5's SentencePiece model comes with a checkpoint in ComfyUI, so a small one is trained
here from a few sentences (in memory, pad 0 / end 1 as in umT5). Only the model configs are made
tiny, through ComfyUI's ``model_options["<model_name>_model_config"]`` override; widths differ per
encoder (CLIP-L 32, CLIP-G 48; SD3's T5 must be 4096 wide: ComfyUI pads CLIP-L‖G to 4096 before
joining it with T5; Flux's T5 40, umT5 24, Qwen 32). ComfyUI's ops skip weight init, so every
parameter of the text models is set from a fixed seed (Qwen's unused vision tower is left alone).

The reference is computed here, independently of the node and of ``safet2i.steering``: rows from each
ComfyUI sub-model alone (``<sub>.encode_token_weights``), the pooled row by each family's rule as
written in docs/steering.md (CLIP: first end token; T5/umT5: first ``</s>``; Qwen: last row), every
leave-one-out variant encoded on its own at full length, then the trigger rule, projections,
β and t' as float64 formulas below.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import math
import os
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLIP_EOS, T5_EOS = 49407, 1
QWEN_IM_START, QWEN_USER, QWEN_NL, QWEN_IM_END = 151644, 872, 198, 151645
NUDE = "a photo of a nude woman on a sunny beach, erotic art"
LONG = ", ".join(["a nude figure drawing in a quiet museum hall"] * 8)  # > 77 CLIP tokens: two CLIP chunks
CLIP_CFG = {
    "l": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
          "projection_dim": 32},
    "g": {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 4, "num_hidden_layers": 3,
          "projection_dim": 48},
}
T5_SMALL = {"d_ff": 64, "d_kv": 8, "num_heads": 2, "num_layers": 2}


def t5_cfg(width: int, **kw) -> dict:
    return {**T5_SMALL, "d_model": width, **kw}


def spiece_model() -> bytes:
    """A small SentencePiece unigram model (umT5 layout: pad 0, end 1, unk 2, no start token)."""
    import sentencepiece as spm

    words = ("a photo of nude woman on sunny beach erotic art figure drawing in quiet museum hall cat dog "
             "with red hat sexual acts lustful seductive kinky pornography nudity").split()
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 4
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=out, vocab_size=96,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    return out.getvalue()


def main(comfy_path: str) -> None:
    sys.path.insert(0, comfy_path)
    os.chdir(comfy_path)
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True
    import torch

    import comfy.model_management  # noqa: F401
    import comfy.sd
    import comfy.text_encoders.flux as flux
    import comfy.text_encoders.qwen_image as qwen_image
    import comfy.text_encoders.sd3_clip as sd3_clip
    import comfy.text_encoders.wan as wan

    spec = importlib.util.spec_from_file_location("safet2i_pack", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["safet2i_pack"] = pack
    spec.loader.exec_module(pack)
    from safet2i_pack.nodes import steering_nodes
    from safet2i_pack.nodes.steering_nodes import SafeT2IPromptSteer
    from safet2i_pack.safet2i.steering import load_concepts

    warnings = []

    class Catch(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING and "safet2i" in record.name:
                warnings.append(record.getMessage())

    logging.getLogger("safet2i").addHandler(Catch())
    torch.set_grad_enabled(False)
    concepts, _ = load_concepts("nudity")

    def build(clip_cls, tok_cls, configs, seed, tokenizer_data=None):
        opts = {"dtype": torch.float32, **{f"{k}_model_config": dict(v) for k, v in configs.items()}}
        target = types.SimpleNamespace(params={}, clip=clip_cls, tokenizer=tok_cls)
        clip = comfy.sd.CLIP(target=target, model_options=opts, tokenizer_data=tokenizer_data or {})
        g = torch.Generator().manual_seed(seed)
        for name, p in sorted(clip.cond_stage_model.named_parameters()):
            if ".visual." in f".{name}":
                continue
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1]) ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
        return clip

    def sub_rows(clip, attr, pairs):
        """Rows [T, d] of ComfyUI's sub-model ``attr`` alone for one token list, as encode_from_tokens runs it."""
        clip.cond_stage_model.reset_clip_options()
        clip.load_model()
        return getattr(clip.cond_stage_model, attr).encode_token_weights([pairs])[0][0]

    def pool_row(kind, ids):
        if kind == "clip":
            return ids.index(CLIP_EOS)
        if kind == "t5":
            return ids.index(T5_EOS)
        return len(ids) - 1                                    # causal LLM: the last row

    def prompt_rows(kind, ids):
        """(first prompt row, n, first row kept in the conditioning) by each family's rule."""
        if kind == "clip":
            return 1, ids.index(CLIP_EOS) - 1, 0
        if kind == "t5":
            return 0, ids.index(T5_EOS), 0
        starts = [i for i, t in enumerate(ids) if t == QWEN_IM_START]
        user = starts[1] + 3
        assert ids[starts[1] + 1:user] == [QWEN_USER, QWEN_NL]
        close = max(i for i, t in enumerate(ids) if t == QWEN_IM_END)
        return user, close - user, user

    def f64_projector(vectors):
        a = vectors.double().T
        return a @ torch.linalg.pinv(a.T @ a) @ a.T

    def reference(clip, key, attr, kind, text, alpha, svf=None):
        """Independent steering of one encoder: (rows as in the conditioning, steered rows, info per chunk)."""
        chunks = clip.tokenize(text)[key]
        cvec = []
        for c in concepts:
            pairs = clip.tokenize(c)[key][0]
            ids = [t[0] for t in pairs]
            cvec.append(sub_rows(clip, attr, pairs)[pool_row(kind, ids)])
        p_c = f64_projector(torch.stack(cvec))
        eye = torch.eye(p_c.shape[0], dtype=torch.float64)
        all_rows, all_out, info = [], [], []
        for chunk in chunks:
            ids = [t[0] for t in chunk]
            first, n, start = prompt_rows(kind, ids)
            pool = pool_row(kind, ids)
            rows = sub_rows(clip, attr, chunk)
            loo = []
            for i in range(first, first + n):
                variant = [(0 if j == i else t[0], *t[1:]) for j, t in enumerate(chunk)]
                loo.append(sub_rows(clip, attr, variant)[pool])
            loo = torch.stack(loo).double()
            dist = ((eye - p_c) @ loo.T).norm(dim=0)
            others = (dist.sum() - dist) / (n - 1)
            trig = [i for i in range(n) if dist[i] >= (1.0 + alpha) * others[i]]
            p_m = f64_projector(loo)
            kept = rows[start:]
            proj = ((eye - p_c) @ p_m @ kept.double().T).T
            real = pool - start + 1
            cos = torch.nn.functional.cosine_similarity(kept[:real].double(), proj[:real], dim=1)
            beta = float(1.0 - cos.mean())
            t_prime = None if svf is None else int(round(10.0 / (1.0 + math.exp(-2 * svf[0] * (10 * beta - svf[1])))))
            out = kept.clone()
            for i in trig:
                out[first - start + i] = proj[first - start + i].float()
            all_rows.append(kept)
            all_out.append(out)
            info.append({"triggers": [first - start + i for i in trig], "n": n, "beta": round(beta, 4),
                         "t_prime": t_prime, "words_at": [ids[first + i] for i in trig]})
        return torch.cat(all_rows), torch.cat(all_out), info

    def diff(a, b):
        return {"max": float((a.double() - b.double()).abs().max()) if a.numel() else 0.0,
                "scale": float(b.abs().max()) if b.numel() else 0.0,
                "equal": bool(torch.equal(a, b)), "shape": [list(a.shape), list(b.shape)]}

    def run_node(clip, text, alpha, svf=False):
        out = SafeT2IPromptSteer.execute(clip, text, "nudity", alpha=alpha, self_validating=svf)
        return out.args[0], json.loads(out.args[2])

    def entries(positive):
        return [{k: v for k, v in e[1].items() if k not in ("pooled_output", "attention_mask")} for e in positive]

    def keep_rows(info, length_per_chunk, total):
        steered = {ci * length_per_chunk + t for ci, c in enumerate(info) for t in c["triggers"]}
        return [r for r in range(total) if r not in steered]

    def no_trigger(clip, text, cond, encoded):
        positive, rep = run_node(clip, text, 10.0)
        extra = {k: diff(positive[0][1][k], encoded[k]) for k in encoded if k != "cond" and torch.is_tensor(encoded[k])}
        return {"entries": entries(positive), "cond": diff(positive[0][0], cond), "extra": extra,
                "n_entries": len(positive), "triggers": [c["triggers"] for c in rep["chunks"]]}

    result = {}
    nudity_svf = (2.5, 5.333)

    # ---------------------------------------------------------------- SD3: CLIP-L, CLIP-G, T5 (4096 wide)
    sd3 = build(sd3_clip.sd3_clip(), sd3_clip.SD3Tokenizer,
                {"clip_l": CLIP_CFG["l"], "clip_g": CLIP_CFG["g"], "t5xxl": t5_cfg(4096)}, seed=3)
    wl, wg = CLIP_CFG["l"]["hidden_size"], CLIP_CFG["g"]["hidden_size"]
    r = {"family": steering_nodes.model_family(sd3)}
    for name, text in (("short", NUDE), ("long", LONG)):
        tokens = sd3.tokenize(text)
        encoded = sd3.encode_from_tokens(tokens, return_dict=True)
        cond = encoded["cond"]
        refs = {"l": reference(sd3, "l", "clip_l", "clip", text, 0.0),
                "g": reference(sd3, "g", "clip_g", "clip", text, 0.0),
                "t5xxl": reference(sd3, "t5xxl", "t5xxl", "t5", text, 0.0)}
        n_clip = refs["l"][0].shape[0]
        layout = torch.cat([torch.nn.functional.pad(torch.cat([refs["l"][0], refs["g"][0]], -1), (0, 4096 - wl - wg)),
                            refs["t5xxl"][0]])
        positive, rep = run_node(sd3, text, 0.0)
        (entry,) = positive
        got = entry[0][0]
        n_t5 = cond.shape[1] - n_clip
        untouched = [("l", slice(0, n_clip), slice(0, wl), keep_rows(refs["l"][2], 77, n_clip)),
                     ("g", slice(0, n_clip), slice(wl, wl + wg), keep_rows(refs["g"][2], 77, n_clip)),
                     ("t5xxl", slice(n_clip, None), slice(None), keep_rows(refs["t5xxl"][2], 10 ** 6, n_t5))]
        r[name] = {
            "chunks": {k: len(v) for k, v in tokens.items()}, "clip_rows": n_clip,
            "cond_layout": diff(cond[0], layout),
            "steered_l": diff(got[:n_clip, :wl], refs["l"][1]),
            "steered_g": diff(got[:n_clip, wl:wl + wg], refs["g"][1]),
            "steered_t5": diff(got[n_clip:], refs["t5xxl"][1]),
            "changed": {k: diff(a, b)["max"] for k, a, b in (
                ("l", got[:n_clip, :wl], cond[0, :n_clip, :wl]),
                ("g", got[:n_clip, wl:wl + wg], cond[0, :n_clip, wl:wl + wg]),
                ("t5xxl", got[n_clip:], cond[0, n_clip:]))},
            "padding_channels": diff(got[:n_clip, wl + wg:], cond[0, :n_clip, wl + wg:]),
            "untouched": {key: bool(torch.equal(got[rows_at][kept, ch], cond[0][rows_at][kept, ch]))
                          for key, rows_at, ch, kept in untouched},
            "pooled": diff(entry[1]["pooled_output"], encoded["pooled_output"]),
            "entries": entries(positive),
            "report": rep["chunks"], "ref": {k: v[2] for k, v in refs.items()},
            "no_trigger": no_trigger(sd3, text, cond, encoded),
        }
    result["sd3"] = r

    # ---------------------------------------------------------------- Flux: T5 rows, CLIP-L pooled only
    fx = build(flux.flux_clip(), flux.FluxTokenizer, {"clip_l": CLIP_CFG["l"], "t5xxl": t5_cfg(40)}, seed=4)
    tokens = fx.tokenize(NUDE)
    encoded = fx.encode_from_tokens(tokens, return_dict=True)
    cond = encoded["cond"]
    rows, ref, info = reference(fx, "t5xxl", "t5xxl", "t5", NUDE, 0.0)
    l_pooled = fx.cond_stage_model.clip_l.encode_token_weights(tokens["l"])[1]
    positive, rep = run_node(fx, NUDE, 0.0)
    (entry,) = positive
    result["flux"] = {
        "family": steering_nodes.model_family(fx), "t5_length": len(tokens["t5xxl"][0]),
        "cond_is_t5": diff(cond[0], rows), "steered": diff(entry[0][0], ref), "changed": diff(entry[0][0], cond[0]),
        "untouched": bool(torch.equal(entry[0][0, keep_rows(info, 10 ** 6, cond.shape[1])],
                                      cond[0, keep_rows(info, 10 ** 6, cond.shape[1])])),
        "pooled": diff(entry[1]["pooled_output"], encoded["pooled_output"]),
        "pooled_is_clip_l": diff(encoded["pooled_output"], l_pooled),
        "entries": entries(positive), "report": rep["chunks"], "ref": info,
        "no_trigger": no_trigger(fx, NUDE, cond, encoded),
    }

    # ---------------------------------------------------------------- Wan: umT5 (masked, zeroed padding)
    wn = build(wan.te(), wan.WanT5Tokenizer, {"umt5xxl": t5_cfg(24, vocab_size=128, model_type="umt5")}, seed=5,
               tokenizer_data={"spiece_model": spiece_model()})
    tokens = wn.tokenize(NUDE)
    encoded = wn.encode_from_tokens(tokens, return_dict=True)
    cond = encoded["cond"]
    rows, ref, info = reference(wn, "umt5xxl", "umt5xxl", "t5", NUDE, 0.0, svf=nudity_svf)
    ids = [t[0] for t in tokens["umt5xxl"][0]]
    eos = ids.index(T5_EOS)
    positive, rep = run_node(wn, NUDE, 0.0)
    (entry,) = positive
    positive_svf, rep_svf = run_node(wn, NUDE, 0.0, svf=True)
    result["wan"] = {
        "family": steering_nodes.model_family(wn), "length": len(ids), "eos": eos,
        "cond_is_umt5": diff(cond[0], rows), "padding_zero": bool(torch.all(cond[0, eos + 1:] == 0)),
        "steered": diff(entry[0][0], ref), "changed": diff(entry[0][0], cond[0]),
        "padding_after": bool(torch.all(entry[0][0, eos + 1:] == 0)),
        "untouched": bool(torch.equal(entry[0][0, keep_rows(info, 10 ** 6, cond.shape[1])],
                                      cond[0, keep_rows(info, 10 ** 6, cond.shape[1])])),
        "entries": entries(positive), "report": rep["chunks"], "ref": info,
        "window": {"entries": entries(positive_svf), "report": rep_svf["chunks"],
                   "steered": diff(positive_svf[0][0][0], ref), "original": diff(positive_svf[-1][0][0], cond[0])},
        "no_trigger": no_trigger(wn, NUDE, cond, encoded),
    }

    # ---------------------------------------------------------------- Qwen-Image: Qwen2.5-VL after the template
    qw = build(qwen_image.te(), qwen_image.QwenImageTokenizer,
               {"qwen25_7b": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 1, "num_key_value_heads": 1}}, seed=6)
    tokens = qw.tokenize(NUDE)
    encoded = qw.encode_from_tokens(tokens, return_dict=True)
    cond = encoded["cond"]
    rows, ref, info = reference(qw, "qwen25_7b", "qwen25_7b", "chat", NUDE, 0.0, svf=nudity_svf)
    ids = [t[0] for t in tokens["qwen25_7b"][0]]
    first, n, start = prompt_rows("chat", ids)
    prompt_ids = qw.tokenizer.qwen25_7b.tokenizer(NUDE)["input_ids"]
    positive, rep = run_node(qw, NUDE, 0.0)
    (entry,) = positive
    positive_svf, rep_svf = run_node(qw, NUDE, 0.0, svf=True)
    # The template prefix never matters to the kept rows' steering: the rows before the user turn are
    # not in the conditioning, and the prompt's own tokens are the only candidates.
    result["qwen_image"] = {
        "family": steering_nodes.model_family(qw), "start": start, "n": n, "prompt_tokens": len(prompt_ids),
        "prompt_ids_match": ids[first:first + n] == prompt_ids, "suffix": ids[first + n:],
        "cond_is_kept_rows": diff(cond[0], rows), "steered": diff(entry[0][0], ref),
        "changed": diff(entry[0][0], cond[0]),
        "untouched": bool(torch.equal(entry[0][0, keep_rows(info, 10 ** 6, cond.shape[1])],
                                      cond[0, keep_rows(info, 10 ** 6, cond.shape[1])])),
        "entries": entries(positive), "report": rep["chunks"], "ref": info,
        "window": {"entries": entries(positive_svf), "report": rep_svf["chunks"],
                   "steered": diff(positive_svf[0][0][0], ref), "original": diff(positive_svf[-1][0][0], cond[0])},
        "no_trigger": no_trigger(qw, NUDE, cond, encoded),
    }
    try:  # a user-written template (ComfyUI keeps it as it is) whose user turn is never closed
        run_node(qw, "<|im_start|>user\na nude woman, no closing token", 0.0)
        result["qwen_image"]["no_template"] = None
    except Exception as exc:  # noqa: BLE001 - reported to the test
        result["qwen_image"]["no_template"] = f"{type(exc).__name__}: {exc}"

    result["warnings"] = warnings
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
