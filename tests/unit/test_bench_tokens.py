"""Bench stacks with Detect-and-Guide guideline tokens (``Stack.guidance_tokens``)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from safet2i.bench import Stack  # noqa: E402
from safet2i.bench.stack import apply_stack  # noqa: E402
from safet2i.errors import SafeT2IError  # noqa: E402

from tiny_diffusers import tiny_sd_pipeline  # noqa: E402


def test_tokens_need_detect_and_guide_and_are_part_of_the_key(tmp_path):
    f = tmp_path / "t.safetensors"
    f.write_bytes(b"one")
    with pytest.raises(SafeT2IError, match="Detect-and-Guide"):
        Stack(name="x", guidance="SLD", guidance_tokens=str(f))
    s = Stack(name="x", guidance="Detect-and-Guide-style", guidance_tokens=str(f))
    assert f in s.files() and "with tokens t.safetensors" in s.describe()
    k1 = s.key()
    f.write_bytes(b"two")
    from safet2i.bench import stack as stack_mod

    stack_mod._DIGESTS.clear()
    assert s.key() != k1
    plain = Stack(name="y", guidance="Detect-and-Guide-style")
    assert "guidance_tokens" not in __import__("json").dumps(plain.key())  # a key, not the settings
    assert plain.key() == Stack(name="z", guidance="Detect-and-Guide-style").key()


def test_a_tokens_file_of_the_raw_concept_gives_the_raw_concept_images(tmp_path, monkeypatch):
    """The file holding the concept's own encoding and token positions must give exactly the
    images of guidance on the concept text; the guidance gets the file's context and positions
    (a spy on safety_guidance), and a file of another text width is refused. (On this tiny random
    model Stage 2's editing region covers the whole map, so guidance skips its steps and moved
    rows change no pixel: that is tested on real ComfyUI and in tests/unit/test_train_dag_tokens.py.)"""
    from safet2i.train.dag_tokens import encode_guideline, save_dag_tokens

    pipe = tiny_sd_pipeline(tmp_path / "tiny")
    ctx, pos, pooled = encode_guideline(pipe, "red")
    same = save_dag_tokens(tmp_path / "same.safetensors", ctx, pos, pooled, concept="red")
    wide = save_dag_tokens(tmp_path / "wide.safetensors", torch.zeros(1, ctx.shape[1], ctx.shape[-1] * 2), pos,
                           concept="red")
    kw = {"num_inference_steps": 3, "guidance_scale": 5.0, "height": 32, "width": 32}
    out = {}
    for name, stack in (("raw", Stack(name="raw", guidance="Detect-and-Guide-style", guidance_concept="red")),
                        ("same", Stack(name="same", guidance="Detect-and-Guide-style", guidance_tokens=str(same)))):
        with apply_stack(pipe, stack) as generate:
            out[name] = generate(["a red square", "a blue circle"], [1, 2], **kw)[0]
    assert np.array_equal(out["raw"], out["same"])
    # the stack hands the file's context and positions to the guidance (not the concept text)
    seen = {}
    import safet2i.diffusers_adapter as da

    real = da.safety_guidance

    def spy(pipe_, method, concept=None, **kw):
        seen.update(kw, concept=concept)
        return real(pipe_, method, concept, **kw)

    moved = ctx.clone()
    moved[0, pos] += 1.0
    moved_file = save_dag_tokens(tmp_path / "moved.safetensors", moved, pos, pooled, concept="red")
    with monkeypatch.context() as m:
        m.setattr(da, "safety_guidance", spy)
        with apply_stack(pipe, Stack(name="m", guidance="Detect-and-Guide-style", guidance_tokens=str(moved_file))):
            pass
    assert seen["concept"] is None and seen["token_positions"] == list(pos)
    assert torch.equal(seen["concept_embeds"].float(), moved)
    with pytest.raises(SafeT2IError, match="width"):
        with apply_stack(pipe, Stack(name="wide", guidance="Detect-and-Guide-style", guidance_tokens=str(wide))):
            pass
