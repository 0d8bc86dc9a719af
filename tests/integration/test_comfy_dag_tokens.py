"""Detect-and-Guide guideline tokens (files of safet2i.train.dag_tokens) in the real ComfyUI
Detect-and-Guide node, with the tiny SD1.x checkpoint.

A file that holds exactly ComfyUI's own encoding of the concept and the concept's token
positions must give the raw-concept result bit for bit (the node then reads the file's rows and
positions, nothing else); a file whose guideline rows differ must change the image; bad files
stop the workflow with an error naming the cause."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from .test_comfy_guidance import STEPS, dag_graph, images, run_ok

pytestmark = pytest.mark.integration

CONCEPT = "nudity, sexual"   # dag_graph's concept


@pytest.fixture(scope="module")
def concept(comfy, tiny_checkpoint):
    """(ComfyUI's conditioning of CONCEPT [1, 77, 768], the concept's token positions)."""
    import os
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint}},
         "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": CONCEPT}},
         "3": {"class_type": "SafeT2ITestDumpCond", "inputs": {"conditioning": ["2", 0], "name": "dagtok_concept"}}}
    run_ok(comfy, g)
    context = load_file(str(comfy.output_dir / "dagtok_concept.safetensors"))["e0"]
    tokenizer = CLIPTokenizer.from_pretrained(str(Path(os.environ["COMFYUI_PATH"]) / "comfy" / "sd1_tokenizer"))
    ids = tokenizer(CONCEPT).input_ids
    return context, list(range(1, len(ids) - 1))


def tokens_file(comfy, name, context, positions, pooled=None):
    from safet2i.train.dag_tokens import save_dag_tokens

    save_dag_tokens(comfy.base / "safety_models" / name, context, positions, pooled, concept=CONCEPT)
    return name


def failure(comfy, g) -> str:
    """The error of a workflow that must not run: refused at validation or failed while running."""
    code, resp = comfy.post_prompt(g)
    if code != 200:
        return json.dumps(resp)
    pid = resp["prompt_id"]
    deadline = time.time() + 180
    while time.time() < deadline:
        entry = comfy.get(f"/history/{pid}").get(pid)
        if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
            assert entry["status"]["status_str"] == "error", "the workflow ran"
            return json.dumps(entry["status"]["messages"])
        time.sleep(0.2)
    raise TimeoutError(pid)


def test_a_tokens_file_replaces_the_raw_concept_tokens(comfy, tiny_checkpoint, concept):
    import torch

    context, positions = concept
    assert context.shape == (1, 77, 768) and positions == [1, 2, 3, 4]
    raw = images(comfy, run_ok(comfy, dag_graph(tiny_checkpoint)))[0]
    same = tokens_file(comfy, "dagtok_same.safetensors", context, positions)
    entry = run_ok(comfy, dag_graph(tiny_checkpoint, guideline_tokens=same))
    assert np.abs(images(comfy, entry)[0] - raw).max() <= 1         # the file's rows and positions = the raw ones
    assert f"{STEPS}/{STEPS} steps guided" in "\n".join(entry["outputs"]["11"]["text"])

    g = torch.Generator().manual_seed(0)
    moved = context.clone()
    moved[0, positions] = -context[0, positions] + torch.randn(len(positions), 768, generator=g)
    other = tokens_file(comfy, "dagtok_moved.safetensors", moved, positions)
    entry = run_ok(comfy, dag_graph(tiny_checkpoint, guideline_tokens=other))
    assert np.abs(images(comfy, entry)[0] - raw).max() > 3           # the optimised rows are what is read
    assert f"{STEPS}/{STEPS} steps guided" in "\n".join(entry["outputs"]["11"]["text"])
    # the concept text is not read with a tokens file: another text gives the same image
    again = run_ok(comfy, dag_graph(tiny_checkpoint, guideline_tokens=other, concept="something else"))
    assert np.abs(images(comfy, again)[0] - images(comfy, entry)[0]).max() <= 1


def test_bad_tokens_files_stop_the_workflow(comfy, tiny_checkpoint, concept):
    import torch
    from safetensors.torch import save_file

    wide = tokens_file(comfy, "dagtok_wide.safetensors", torch.zeros(1, 77, 1024), [1, 2])
    text = failure(comfy, dag_graph(tiny_checkpoint, guideline_tokens=wide))
    assert "text width of 1024, this model's is 768" in text
    save_file({"lora_up": torch.zeros(4, 2)}, str(comfy.base / "safety_models" / "dagtok_lora.safetensors"))
    text = failure(comfy, dag_graph(tiny_checkpoint, guideline_tokens="dagtok_lora.safetensors"))
    assert "not a Detect-and-Guide tokens file" in text
    text = failure(comfy, dag_graph(tiny_checkpoint, guideline_tokens="../../etc/passwd.safetensors"))
    assert "etc/passwd" in text
