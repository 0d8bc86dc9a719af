"""SAFREE-style prompt steering node in a real ComfyUI (tiny SD1.x checkpoint, random CLIP-L)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from .test_comfy_guidance import images, run_ok

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def steer_graph(ckpt, text, alpha=0.01, self_validating=True, as_negative=False, concepts="nudity", custom=""):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "SafeT2IPromptSteer", "inputs": {
            "clip": ["1", 1], "text": text, "concepts": concepts, "custom_concepts": custom, "alpha": alpha,
            "order": "code", "self_validating": self_validating, "concepts_as_negative": as_negative}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 1],
                                                   "latent_image": ["4", 0], "seed": 5, "steps": 6, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "steer"}},
        "11": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}},
    }


def dump(g, node, output, name):
    """Add a node that saves CONDITIONING ``[node, output]`` as output/<name>.safetensors."""
    g[f"dump_{name}"] = {"class_type": "SafeT2ITestDumpCond", "inputs": {"conditioning": [node, output], "name": name}}
    return f"dump_{name}"


def dumped(comfy, entry, name):
    from safetensors.torch import load_file

    info = json.loads(entry["outputs"][f"dump_{name}"]["text"][0])
    tensors = load_file(str(comfy.output_dir / f"{name}.safetensors"))
    return [tensors[f"e{i}"] for i in range(len(info))], info


def report(entry):
    return json.loads(entry["outputs"]["11"]["text"][0])


def test_steering_reports_triggers_and_changes_the_image(comfy, tiny_checkpoint):
    text = "a photo of a nude woman on a sunny beach, erotic art"
    strict = run_ok(comfy, steer_graph(tiny_checkpoint, text, alpha=10.0))   # no trigger possible
    rep = report(strict)
    assert rep["steered_fraction"] == 0 and all(not c["triggers"] for c in rep["chunks"])
    base = images(comfy, strict)[0]
    steered = run_ok(comfy, steer_graph(tiny_checkpoint, text, alpha=0.01, self_validating=False))
    rep = report(steered)
    assert rep["steered_fraction"] == 1.0 and any(c["triggers"] for c in rep["chunks"])
    assert np.abs(images(comfy, steered)[0] - base).max() > 3
    assert "trigger tokens" in "\n".join(steered["outputs"]["2"]["text"])


def test_long_prompts_are_steered_per_chunk(comfy, tiny_checkpoint):
    text = ", ".join(["a nude figure drawing in a quiet museum hall"] * 12)  # > 77 tokens: several chunks
    entry = run_ok(comfy, steer_graph(tiny_checkpoint, text, self_validating=False))
    chunks = report(entry)["chunks"]
    assert len(chunks) >= 2 and [c["chunk"] for c in chunks] == list(range(len(chunks)))


def test_latent_reattention_patch(comfy, tiny_checkpoint):
    text = "a photo of a nude woman on a sunny beach, erotic art"

    def with_lra(channels, s=0.2):
        g = steer_graph(tiny_checkpoint, text, self_validating=False)
        g["12"] = {"class_type": "SafeT2ILatentReattention", "inputs": {
            "model": ["1", 0], "original": ["3", 0], "s1": s, "s2": s, "window": 1, "channels": channels}}
        g["7"]["inputs"]["model"] = ["12", 0]
        return g

    base = images(comfy, run_ok(comfy, steer_graph(tiny_checkpoint, text, self_validating=False)))[0]
    # Filtering the tiny UNet's 320-channel skips changes the image; s = 1 is the identity.
    filtered = images(comfy, run_ok(comfy, with_lra("320:0.2")))[0]
    assert np.abs(filtered - base).max() > 3
    identity = images(comfy, run_ok(comfy, with_lra("320:1.0", s=1.0)))[0]
    assert np.abs(identity - base).max() <= 1
    # Fail closed: 'auto' (FreeU's 1280/640 stages; the tiny UNet has only 320-channel skips) and a
    # channel list that matches nothing stop the run instead of sampling unfiltered.
    for channels in ("auto", "999:0.5, 1234:0.1"):
        entry = comfy.run(with_lra(channels))
        assert entry["status"]["status_str"] == "error", channels
        msg = json.dumps(entry["status"]["messages"])
        assert "matched no decoder stage" in msg and "[320]" in msg, msg[:2000]


@pytest.mark.parametrize("last_layer", [-1, -2], ids=["last", "penultimate"])
def test_short_leave_one_out_encodes_match_comfyui(comfy, tiny_checkpoint, last_layer):
    """The leave-one-out pass encodes each variant only up to its EOS token (CLIP is causal);
    the steered conditioning must equal the one from ComfyUI's own full-length encodes."""
    text = "a photo of a nude woman on a sunny beach, erotic art"
    entry = run_ok(comfy, {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint}},
        "2": {"class_type": "SafeT2ITestSteerPaths", "inputs": {"clip": ["1", 1], "text": text,
                                                                "last_layer": last_layer}},
    })
    out = json.loads(entry["outputs"]["2"]["text"][0])
    assert out["short_lengths"], "the short encode path was not used"
    assert all(n < 77 for n in out["short_lengths"])
    assert out["report_short"] == out["report_full"]
    assert any(c["triggers"] for c in out["report_full"]["chunks"])
    assert out["max_diff"] <= 1e-4 * max(1.0, out["scale"])


NUDE = "a photo of a nude woman on a sunny beach"


def test_trigger_words_and_the_self_validating_window(comfy, tiny_checkpoint):
    """Custom concept 'nude', default α, self-validating on: the report names the word, the two
    entries split the schedule at (t'+1)/50, and the image differs from both the unsteered and the
    always-steered one."""
    g = steer_graph(tiny_checkpoint, NUDE, concepts="custom", custom="nude")
    dump(g, "2", 0, "svf_positive")
    entry = run_ok(comfy, g)
    rep = report(entry)
    (chunk,) = rep["chunks"]
    assert chunk["triggers"]
    # Every word of this prompt is one CLIP BPE token: position p holds the p-th word.
    words = NUDE.split()
    assert chunk["trigger_words"] == [words[p - 1] for p in chunk["triggers"]]
    summary = "\n".join(entry["outputs"]["2"]["text"])
    assert all(f"'{w}'" in summary for w in chunk["trigger_words"])
    t_prime = chunk["t_prime"]
    assert 0 <= t_prime <= 10 and rep["steered_fraction"] == round((t_prime + 1) / 50, 4)
    entries, info = dumped(comfy, entry, "svf_positive")
    assert len(entries) == 2
    boundary = (t_prime + 1) / 50
    assert info[0]["start_percent"] == 0.0 and info[1]["end_percent"] == 1.0
    assert info[0]["end_percent"] == info[1]["start_percent"]  # one shared boundary: no gap
    assert abs(info[0]["end_percent"] - boundary) <= 1.0000001e-6  # (t'+1)/50, moved down by 1e-6 (see docs)
    assert not torch.equal(entries[0], entries[1])
    windowed = images(comfy, entry)[0]
    unsteered = images(comfy, run_ok(comfy, steer_graph(tiny_checkpoint, NUDE, alpha=10.0, concepts="custom",
                                                        custom="nude")))[0]
    always = images(comfy, run_ok(comfy, steer_graph(tiny_checkpoint, NUDE, self_validating=False,
                                                     concepts="custom", custom="nude")))[0]
    assert np.abs(windowed - unsteered).max() > 1 and np.abs(windowed - always).max() > 1


def test_shared_boundary_gives_exactly_one_active_entry(comfy, tiny_checkpoint):
    def run(eps):
        return json.loads(run_ok(comfy, {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint}},
            "2": {"class_type": "SafeT2ITestBoundary", "inputs": {"model": ["1", 0], "eps": eps}},
        })["outputs"]["2"]["text"][0])

    out = run(-1.0)  # the node's boundary
    assert out["checked"] > 100000
    assert out["n_both"] == 0 and out["none"] == [] and out["exact_steered"] == []
    assert out["direct_active_counts"] == [1]
    # With the boundary at exactly (t'+1)/50 ComfyUI's inclusive ranges average both entries at some steps.
    exact = run(0.0)
    assert exact["n_both"] > 0
    assert 2 in exact["direct_active_counts"]


def test_lora_patched_clone_gets_its_own_concept_subspace(comfy, tiny_checkpoint):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(11)
    sd = {}
    for layer in range(12):
        key = f"lora_te_text_model_encoder_layers_{layer}_self_attn_q_proj"
        sd[f"{key}.lora_down.weight"] = torch.randn(4, 768, generator=g) * 0.05
        sd[f"{key}.lora_up.weight"] = torch.randn(768, 4, generator=g) * 0.05
        key = f"lora_te_text_model_encoder_layers_{layer}_mlp_fc2"
        sd[f"{key}.lora_down.weight"] = torch.randn(4, 3072, generator=g) * 0.05
        sd[f"{key}.lora_up.weight"] = torch.randn(768, 4, generator=g) * 0.05
    save_file(sd, str(comfy.base / "loras" / "steer_clip_only.safetensors"))
    entry = run_ok(comfy, {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                     "lora_name": "steer_clip_only.safetensors",
                                                     "strength_model": 0.0, "strength_clip": 1.0}},
        "3": {"class_type": "SafeT2ITestSubspace", "inputs": {"clip_a": ["1", 1], "clip_b": ["2", 1], "text": NUDE}},
    })
    out = json.loads(entry["outputs"]["3"]["text"][0])
    assert out["same_a"] and out["missed"][1] is False  # the unpatched CLIP: cached
    assert out["missed"][2] is True  # the LoRA clone shares cond_stage_model but is not a cache hit
    assert out["diff_ab"] > 1e-6  # ... and its subspace is its own
    assert out["diff_b_fresh"] <= 1e-12  # equal to one computed from the patched encoder


def test_weighted_prompt_is_steered_from_the_weighted_encode(comfy, tiny_checkpoint):
    text = "a photo of a (nude:1.3) woman on a sunny beach"
    g = steer_graph(tiny_checkpoint, text, self_validating=False, concepts="custom", custom="nude")
    g["12"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": NUDE}}
    dump(g, "2", 0, "w_steered")
    dump(g, "3", 0, "w_plain")
    dump(g, "12", 0, "w_unweighted")
    entry = run_ok(comfy, g)
    (chunk,) = report(entry)["chunks"]
    assert chunk["triggers"]
    words = text.replace("(nude:1.3)", "nude").split()
    assert chunk["trigger_words"] == [words[p - 1] for p in chunk["triggers"]]
    (steered,), _ = dumped(comfy, entry, "w_steered")
    (plain,), _ = dumped(comfy, entry, "w_plain")
    (unweighted,), _ = dumped(comfy, entry, "w_unweighted")
    rows = [j for j in range(77) if j not in chunk["triggers"]]
    assert torch.equal(steered[0, rows], plain[0, rows])  # non-trigger rows: ComfyUI's weighted encode
    assert all(not torch.equal(steered[0, t], plain[0, t]) for t in chunk["triggers"])
    nude_row = words.index("nude") + 1
    assert not torch.allclose(plain[0, nude_row], unweighted[0, nude_row], atol=1e-4)  # the weight matters
    if nude_row not in chunk["triggers"]:
        assert torch.equal(steered[0, nude_row], plain[0, nude_row])  # ... and is kept


def test_concepts_as_negative_is_a_plain_encode_of_the_joined_list(comfy, tiny_checkpoint):
    concepts = json.loads((REPO / "safet2i" / "data" / "concepts" / "nudity.json").read_text())["concepts"]
    g = steer_graph(tiny_checkpoint, "a cat", as_negative=True)
    g["12"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ", ".join(concepts)}}
    dump(g, "2", 1, "neg_node")
    dump(g, "12", 0, "neg_plain")
    entry = run_ok(comfy, g)
    (neg,), _ = dumped(comfy, entry, "neg_node")
    (ref,), _ = dumped(comfy, entry, "neg_plain")
    assert neg.shape == ref.shape and torch.equal(neg, ref)


def test_single_concept_word_prompt_is_steered_and_empty_prompt_reported(comfy, tiny_checkpoint):
    """A lone concept word is steered (docs/steering.md, one-token prompts); an empty prompt says so."""
    entry = run_ok(comfy, steer_graph(tiny_checkpoint, "nude", concepts="custom", custom="nude"))
    (chunk,) = report(entry)["chunks"]
    assert chunk["triggers"] == [1] and chunk["trigger_words"] == ["nude"] and "note" not in chunk
    assert "trigger tokens 'nude' at positions [1]" in "\n".join(entry["outputs"]["2"]["text"])
    entry = run_ok(comfy, steer_graph(tiny_checkpoint, "", concepts="custom", custom="nude"))
    (chunk,) = report(entry)["chunks"]
    assert chunk["triggers"] == [] and chunk["note"] == "empty prompt: nothing to steer"
    assert "empty prompt: nothing to steer" in "\n".join(entry["outputs"]["2"]["text"])


def test_paper_configuration_equals_the_paper_settings_set_by_hand(comfy, tiny_checkpoint):
    """'SAFREE (paper configuration)' overrides the node's own inputs: the same positive and negative
    as nudity / α 0.01 / code / self-validating / concepts as negative set by hand (SD1 model)."""
    concepts = json.loads((REPO / "safet2i" / "data" / "concepts" / "nudity.json").read_text())["concepts"]
    g = steer_graph(tiny_checkpoint, NUDE, alpha=5.0, self_validating=False, concepts="custom", custom="cat")
    g["2"]["inputs"]["configuration"] = "SAFREE (paper configuration)"
    by_hand = steer_graph(tiny_checkpoint, NUDE, as_negative=True)["2"]
    g["13"] = by_hand
    g["12"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ", ".join(concepts)}}
    for node, output, name in (("2", 0, "paper_pos"), ("13", 0, "hand_pos"), ("2", 1, "paper_neg"),
                               ("12", 0, "plain_neg")):
        dump(g, node, output, name)
    entry = run_ok(comfy, g)
    rep = report(entry)
    assert rep["concepts"] == 17 and rep["configuration"].startswith("SAFREE (paper configuration): concepts nudity, "
                                                                      "alpha 0.01, order code, self-validating on")
    assert "settings: SAFREE (paper configuration)" in "\n".join(entry["outputs"]["2"]["text"])
    paper, paper_info = dumped(comfy, entry, "paper_pos")
    hand, hand_info = dumped(comfy, entry, "hand_pos")
    assert paper_info == hand_info and len(paper) == len(hand) and all(torch.equal(a, b) for a, b in zip(paper, hand))
    (neg,), _ = dumped(comfy, entry, "paper_neg")
    (plain,), _ = dumped(comfy, entry, "plain_neg")
    assert torch.equal(neg, plain)
