"""Concept steering through the stand-in webui (all four variants): the script's
``on_cfg_denoiser`` callback replaces the cond rows the sampler sees by the core's steered
rows for the self-validated window and leaves them alone afterwards; the images are blocked
when steering never saw the conditioning.

The toy model's text encoder (``kind="sd1-text"``) is a :class:`_toy.ToyTextEngine`, exposed
as A1111's hijacked ``cond_stage_model`` (A1111, reForge) or Forge's
``text_processing_engine``; the reference is ``safet2i.steering.steer_sequence`` with the
same engine's rows, computed here independently of the extension."""

from __future__ import annotations

import pytest
import torch

from conftest import VARIANTS
from safet2i.steering import projector, steer_sequence

PROMPT = "a photo of a nude woman on a sunny beach"
STEPS = 6


def reference(engine, concepts, text, **kw):
    def rows_of(id_lists):
        return engine.encode_with_transformers(torch.tensor(id_lists))

    cids = [engine.tokenize_line(c)[0][0].tokens for c in concepts]
    crow = rows_of(cids)
    pc = projector(torch.stack([crow[i, cids[i].index(engine.id_end)] for i in range(len(cids))]))
    ids = engine.tokenize_line(text)[0][0].tokens
    rows = rows_of([ids])[0]
    return rows, steer_sequence([ids], rows, rows_of, pc, engine.id_end, **kw)[0]


def capture(webui):
    """The cond rows after every callback, per step (registered after the extension's)."""
    seen = []

    def cb(params):
        tc = params.text_cond
        den = getattr(params, "denoiser", None)
        # The webui's own counters: the denoiser's model-call index where it has one (1.8+), else the step.
        step, total = getattr(den, "step", None), getattr(den, "total_steps", None)
        if not isinstance(step, int):
            step, total = int(params.sampling_step), int(params.total_sampling_steps)
        seen.append((step, total, (tc["crossattn"] if isinstance(tc, dict) else tc).clone()))

    webui.callbacks.on_cfg_denoiser(cb)
    return seen


def args_for(webui, svf):
    return webui.ui_args(steering_enabled=True, steering_concepts="custom", steering_custom="nude",
                         steering_self_validating=svf)


@pytest.mark.parametrize("variant", VARIANTS)
def test_steered_rows_reach_the_sampler_for_the_window_only(start, variant):
    webui = start(variant, kind="sd1-text")
    engine = webui.shared.sd_model.engine
    original, res = reference(engine, ["nude"], PROMPT, svf=None)
    assert res.changed and res.triggers, "the toy engine must flag the concept word"
    nude = engine.tokenize_line(PROMPT)[0][0].tokens.index(engine.ids["nude"])
    assert nude in res.triggers

    seen = capture(webui)
    p, processed = webui.txt2img(PROMPT, steps=STEPS, args=args_for(webui, svf=False))
    job = p._safet2i_job
    assert not job.failed, job.failed
    assert "blocked" not in processed.infotexts[0]
    assert "nude" in p.extra_generation_params["SafeT2I steering report"]
    assert seen and len({s for s, _, _ in seen}) >= STEPS - 1   # the last Euler step may skip the model
    for _, _, rows in seen:                    # svf off: every step, every image row
        torch.testing.assert_close(rows[0, :77].double(), res.rows.double(), rtol=0, atol=1e-6)  # P_C is float32 in the extension
    assert not torch.equal(res.rows, original)

    # Self-validating window: the core's fraction of the steps steered, the original rows after.
    webui2 = start(variant, kind="sd1-text")
    engine2 = webui2.shared.sd_model.engine
    from safet2i.steering import SVF_PRESETS
    original2, res2 = reference(engine2, ["nude"], PROMPT, svf=SVF_PRESETS["nudity"])
    seen2 = capture(webui2)
    p2, _ = webui2.txt2img(PROMPT, steps=STEPS, args=args_for(webui2, svf=True))
    assert not p2._safet2i_job.failed, p2._safet2i_job.failed
    assert 0.0 < res2.fraction < 1.0
    for step, total, rows in seen2:
        expected = res2.rows if step < res2.fraction * total else original2
        torch.testing.assert_close(rows[0, :77].double(), expected.double(), rtol=0, atol=1e-6)  # P_C is float32 in the extension
    assert any(step < res2.fraction * total for step, total, _ in seen2)
    assert any(step >= res2.fraction * total for step, total, _ in seen2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_rows_without_a_trigger_reach_the_sampler_bit_identical(start, variant):
    """With random toy vectors SAFREE's relative rule flags some token of almost any prompt at
    α = 0.01, so a margin no token reaches (α = 10, checked against the core) makes the
    no-trigger case: the sampler must see the webui's own rows, bit for bit."""
    webui = start(variant, kind="sd1-text")
    seen = capture(webui)
    text = "a red bicycle leaning on a wall"
    _, res = reference(webui.shared.sd_model.engine, ["nude"], text, svf=None, alpha=10.0)
    assert not res.changed
    args = webui.ui_args(steering_enabled=True, steering_concepts="custom", steering_custom="nude",
                         steering_alpha=10.0, steering_self_validating=False)
    p, processed = webui.txt2img(text, steps=3, args=args)
    assert not p._safet2i_job.failed, p._safet2i_job.failed
    plain = webui.shared.sd_model.engine.encode([text])[0]
    assert seen
    for _, _, rows in seen:
        assert torch.equal(rows[0], plain)


def test_steering_that_never_ran_blocks_the_images(start):
    """Another extension removed our conditioning callback: the prompt would go unsteered."""
    webui = start("a1111-1.10", kind="sd1-text")
    import safet2i_a1111.script as script
    webui.callbacks.remove_callbacks_for_function(script._on_cfg_denoiser_steering)
    p, processed = webui.txt2img(PROMPT, steps=2, args=args_for(webui, svf=False))
    assert "concept steering did not run" in p._safet2i_job.failed
    assert "blocked" in processed.infotexts[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_rows_are_told_apart_by_the_webuis_bookkeeping(start, variant):
    """A batch of two prompts, one with an ``AND`` part: every row gets its own text's steering.
    Where the webui hands the callback its denoiser (all but A1111 <= 1.7), each row's text comes
    from the webui's own conditioning structure and is checked once per webui tensor; without it,
    rows are recognised by content."""
    webui = start(variant, kind="sd1-text")
    engine = webui.shared.sd_model.engine
    other = "an oil painting of a nude man in a dark forest"
    texts = [PROMPT, other, "a red bicycle"]
    refs = {t: reference(engine, ["nude"], t, svf=None) for t in texts}
    assert refs[PROMPT][1].changed and refs[other][1].changed
    seen = capture(webui)
    p, _ = webui.txt2img([PROMPT, f"{other} AND a red bicycle"], batch_size=2, steps=3,
                         args=args_for(webui, svf=False))
    hook = p._safet2i_job.steering
    assert not p._safet2i_job.failed, p._safet2i_job.failed
    assert seen
    for _, _, rows in seen:
        assert rows.shape[0] == 3                       # image 1; image 2 and its AND part
        for row, text in zip(rows, (PROMPT, other, "a red bicycle")):
            torch.testing.assert_close(row[:77].double(), refs[text][1].rows.double(), rtol=0, atol=1e-6)
    if variant == "a1111-1.7":
        assert len(hook._rows) == 3 and not hook._bound
    else:
        assert len(hook._bound) == 3 and not hook._rows


@pytest.mark.parametrize("variant", ["a1111-1.10", "forge"])
@pytest.mark.parametrize("negative", ["", "blurry, lowres"], ids=["no-negative", "user-negative"])
def test_paper_configuration_steers_with_the_paper_settings_and_concepts_as_negative(start, variant, negative):
    """SAFREE (paper configuration): the 17 nudity concepts, α 0.01, code order, self-validating on
    (SD1), and the concept list joined with ", " after the user's negative prompt in every negative
    prompt of the job (the infotext shows it); the UI's own steering settings are overridden."""
    from safet2i.steering import load_concepts

    webui = start(variant, kind="sd1-text")
    concepts, _ = load_concepts("nudity")
    joined = ", ".join(concepts)
    uncond = []
    webui.callbacks.on_cfg_denoiser(lambda params: uncond.append(params.text_uncond))
    args = webui.ui_args(steering_enabled=True, steering_concepts="custom", steering_custom="cat", steering_alpha=5.0,
                         steering_self_validating=False, steering_configuration="SAFREE (paper configuration)")
    p, processed = webui.txt2img(PROMPT, negative_prompt=negative, batch_size=2, steps=STEPS, args=args)
    job = p._safet2i_job
    assert not job.failed, job.failed
    want = f"{negative}, {joined}" if negative else joined
    assert p.all_negative_prompts == [want, want]
    assert f"Negative prompt: {want}\n" in processed.infotexts[0]
    assert "SafeT2I steering configuration: SAFREE (paper configuration)" in processed.infotexts[0]
    s = job.steering_settings
    assert (s.concepts, s.alpha, s.order, s.self_validating, s.concepts_as_negative) == ("nudity", 0.01, "code", True,
                                                                                          True)
    assert job.steering.concepts == concepts and job.steering.kw["alpha"] == 0.01
    engine = webui.shared.sd_model.engine
    want_rows = engine.encode_with_transformers(torch.tensor([c.tokens for c in engine.tokenize_line(want)[0]]))
    assert uncond and all(torch.equal(u[0], want_rows.reshape(-1, want_rows.shape[-1]).to(u)) for u in uncond)


@pytest.mark.parametrize("variant", ["a1111-1.10", "reforge"])
def test_concepts_as_negative_alone_and_pasting_the_infotext_back_adds_nothing_twice(start, variant):
    from safet2i.steering import load_concepts

    webui = start(variant, kind="sd1-text")
    args = webui.ui_args(steering_enabled=True, steering_concepts="custom", steering_custom="nude, naked",
                         steering_concepts_as_negative=True)
    p, processed = webui.txt2img(PROMPT, negative_prompt="blurry", steps=STEPS, args=args)
    assert not p._safet2i_job.failed and p.all_negative_prompts == ["blurry, nude, naked"]
    assert "negative=concepts" in processed.infotexts[0]
    assert "SafeT2I steering configuration" not in processed.infotexts[0]
    assert p._safet2i_job.steering.concepts == load_concepts("custom", "nude, naked")[0]
    # A negative prompt that already ends with the list (pasted from these parameters) keeps it once.
    p, _ = webui.txt2img(PROMPT, negative_prompt="blurry, nude, naked", steps=STEPS, args=args)
    assert p.all_negative_prompts == ["blurry, nude, naked"]


@pytest.mark.parametrize("kind", ["flux", "sd35"])
def test_paper_configuration_on_forge_transformers_steers_every_step(start, kind):
    """SAFREE (paper configuration) on Forge's Flux and SD3.5: the self-validating window is off,
    as in the paper's SDXL/SD3 runs and in ComfyUI and diffusers (``settings.EVERY_STEP``)."""
    webui = start("forge", kind=kind)
    if kind == "sd35":
        webui.shared.opts.sd3_enable_t5 = True
    args = webui.ui_args(steering_enabled=True, steering_concepts="custom", steering_custom="cat", steering_alpha=5.0,
                         steering_self_validating=True, steering_configuration="SAFREE (paper configuration)")
    p, processed = webui.txt2img(PROMPT, steps=STEPS, args=args)
    job = p._safet2i_job
    assert not job.failed, job.failed
    s = job.steering_settings
    assert (s.concepts, s.self_validating, s.concepts_as_negative) == ("nudity", False, True)
    assert "SafeT2I steering configuration: SAFREE (paper configuration)" in processed.infotexts[0]
