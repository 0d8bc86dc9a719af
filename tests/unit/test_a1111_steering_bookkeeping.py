"""Which text a cond row of ``params.text_cond`` belongs to, from the webui's own bookkeeping
(extension/safet2i_a1111/steering.py ``webui_rows``), and that rows are recognised by content
only once per webui tensor, never per step.

The webui side is written here from its documented behaviour (not from our code): the
sampler's conditioning is a ``MulticondLearnedConditioning`` (``batch[image][AND part]`` with
``schedules`` of ``(end_at_step, cond)``), the denoiser stacks, at its ``step``, every part's
first schedule entry with ``step <= end_at_step`` in image and part order; a part's text is
the ``AND``-split, weight-stripped, de-duplicated prompt list of ``p.prompts``
(``get_multicond_prompt_list``, stubbed here).
"""

from __future__ import annotations

import re
import sys
import types
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "extension"))

from safet2i.steering import SteeringPlan  # noqa: E402
from safet2i_a1111.steering import SteeringError, SteeringHook, find_encoders, webui_rows  # noqa: E402
from test_a1111_steering import clips, core, sd1  # noqa: E402,F401  (clips: the module's fixture)

SPC = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])
A = "a photo of a nude woman on a sunny beach"
B = "an oil painting of a nude man in a forest"
C = "a red bicycle leaning on a wall"


@pytest.fixture
def parser(monkeypatch):
    """The webui's prompt_parser.get_multicond_prompt_list (AND split, ':w' weights, dedup; the
    webui keeps a part's leading space, which candidate_texts keeps too: stripped here)."""
    def get_multicond_prompt_list(prompts):
        flat, indexes, res = [], {}, []
        for prompt in prompts:
            parts = []
            for sub in re.split(r"\bAND\b", prompt):
                text, weight = re.match(r"^\s*(.*?)(?:\s*:\s*([-+]?\d*\.?\d+))?\s*$", sub, re.S).groups()
                parts.append((indexes.setdefault(text, len(flat)), float(weight or 1.0)))
                if len(flat) < len(indexes):
                    flat.append(text)
            res.append(parts)
        return res, flat, indexes
    mod = types.ModuleType("modules.prompt_parser")
    mod.get_multicond_prompt_list = get_multicond_prompt_list
    pkg = types.ModuleType("modules")
    pkg.prompt_parser = mod
    monkeypatch.setitem(sys.modules, "modules", pkg)
    monkeypatch.setitem(sys.modules, "modules.prompt_parser", mod)
    return get_multicond_prompt_list


def webui_call(prompts, schedules_of, step, total=10, hr=False):
    """params of one model call: the multicond structure, the denoiser, the stacked cond rows."""
    indexes, flat, _ = sys.modules["modules.prompt_parser"].get_multicond_prompt_list(prompts)
    batch = [[SimpleNamespace(schedules=schedules_of[flat[i]], weight=w) for i, w in parts] for parts in indexes]
    picked = [next((s for s in part.schedules if step <= s.end_at_step), part.schedules[0]).cond
              for parts in batch for part in parts]
    p = SimpleNamespace(prompts=["unused"] * len(prompts) if hr else prompts, hr_prompts=prompts, is_hr_pass=hr)
    den = SimpleNamespace(step=step, total_steps=total, p=p,
                          sampler=SimpleNamespace(sampler_extra_args={"cond": SimpleNamespace(batch=batch)}))
    return SimpleNamespace(text_cond=torch.stack(picked), text_uncond=None, sampling_step=0,
                           total_sampling_steps=total, denoiser=den)


@pytest.fixture
def rows(clips):
    tok, (model, _) = clips
    return {t: core(tok, model, t, ["nude"], svf=None) for t in (A, B, C)}


def test_webui_rows_names_each_rows_text_and_tensor(parser, rows):
    schedules = {A: [SPC(10, rows[A][0])], B: [SPC(10, rows[B][0])],
                 C: [SPC(4, rows[C][0]), SPC(10, rows[A][0])]}         # C is edited into A at step 5
    params = webui_call([f"{A} AND {B}:0.5", C, A], schedules, step=2)
    got = webui_rows(params, 4)
    assert [t for t, _ in got] == [A, B, None, A]                      # an edited part's entry has no text
    assert [t for _, t in got] == [rows[A][0], rows[B][0], rows[C][0], rows[A][0]]
    assert all(tensor is schedules[k][0].cond for (_, tensor), k in zip(got, (A, B, C, A)))
    late = webui_rows(webui_call([C], schedules, step=7), 1)
    assert late[0][1] is schedules[C][1].cond
    hires = webui_call([B], schedules, step=0, hr=True)
    assert webui_rows(hires, 1)[0][0] == B                              # the hires pass's prompts
    assert webui_rows(params, 3) is None                                # rows the structure does not explain
    params.denoiser = None
    assert webui_rows(params, 4) is None                                # A1111 <= 1.7: no denoiser


def test_rows_are_bound_once_per_webui_tensor_and_steered_like_the_core(parser, rows, clips, monkeypatch):
    tok, (model, _) = clips
    calls = []
    real = SteeringPlan.similarity
    monkeypatch.setattr(SteeringPlan, "similarity", lambda self, r: calls.append(self.text) or real(self, r))
    hook = SteeringHook(find_encoders(sd1(tok, model)), ["nude"], self_validating=False)
    hook.prepare([A, B, C])
    schedules = {A: [SPC(10, rows[A][0])], B: [SPC(10, rows[B][0])]}
    for step in range(6):
        params = webui_call([A, f"{B} AND {A}"], schedules, step)
        assert hook.apply(params)
        out = params.text_cond
        assert torch.equal(out[0], rows[A][1].rows) and torch.equal(out[2], rows[A][1].rows)
        assert torch.equal(out[1], rows[B][1].rows)
    assert sorted(calls) == [A, B]          # one check per webui tensor, against its own text only
    assert not hook._rows                   # nothing recognised by content among all texts


def test_an_edited_part_is_recognised_by_content_once_per_entry(parser, rows, clips, monkeypatch):
    tok, (model, _) = clips
    calls = []
    real = SteeringPlan.similarity
    monkeypatch.setattr(SteeringPlan, "similarity", lambda self, r: calls.append(self.text) or real(self, r))
    hook = SteeringHook(find_encoders(sd1(tok, model)), ["nude"], self_validating=False)
    hook.prepare([A, B, C])
    schedules = {"[x:y:5]": [SPC(4, rows[C][0]), SPC(10, rows[A][0])]}
    seen = []
    for step in range(10):
        params = webui_call(["[x:y:5]"], schedules, step)
        hook.apply(params)
        seen.append(params.text_cond[0])
    assert all(torch.equal(s, rows[C][1].rows) for s in seen[:5]) and all(torch.equal(s, rows[A][1].rows) for s in seen[5:])
    assert len(calls) == 2 * 3              # two entries, each compared with the three texts once


def test_rows_named_for_one_text_but_encoded_from_another_fail_closed(parser, rows, clips):
    tok, (model, _) = clips
    hook = SteeringHook(find_encoders(sd1(tok, model)), ["nude"], self_validating=False)
    hook.prepare([A, B])
    params = webui_call([A], {A: [SPC(10, rows[B][0])]}, step=0)      # the structure says A, the rows are B's
    with pytest.raises(SteeringError, match="does not match any prompt"):
        hook.apply(params)


def test_rows_changed_before_our_callback_are_recognised_by_content(parser, rows, clips):
    tok, (model, _) = clips
    hook = SteeringHook(find_encoders(sd1(tok, model)), ["nude"], self_validating=False)
    hook.prepare([A, B])
    params = webui_call([A, B], {A: [SPC(10, rows[A][0])], B: [SPC(10, rows[B][0])]}, step=0)
    params.text_cond = params.text_cond * torch.tensor([1.0, 1.25])[:, None, None]    # another callback scaled row 1
    from safet2i.steering import steer_chunk
    c = hook.plans[B].chunks[0][0]
    want = steer_chunk(params.text_cond[1], c.loo, hook.p_c[0], c.n, alpha=0.01, order="code", svf=None).rows
    assert hook.apply(params)
    assert torch.equal(params.text_cond[1], want) and set(hook._rows) == {1} and len(hook._bound) == 1


def test_a_later_job_never_gets_an_earlier_jobs_subspace(parser, rows, clips, monkeypatch):
    """The subspace cache key of a job used ``id(hook)``, which Python reuses once a hook is
    collected: a later job (another model, another width) could be handed the earlier one's P_C.
    Two hooks that share ids must still get their own subspaces."""
    import builtins

    from safet2i.steering import safree

    tok, (model, _) = clips
    encoders = find_encoders(sd1(tok, model))
    monkeypatch.setattr(builtins, "id", lambda obj: 7)        # every object "has" the same id
    first = SteeringHook(encoders, ["nude"], self_validating=False)
    third = SteeringHook(encoders, ["nude"], self_validating=False)   # same ids, same concepts
    monkeypatch.undo()
    assert third.p_c[0] is not first.p_c[0]                   # a new job computes its own P_C
    assert torch.allclose(third.p_c[0], first.p_c[0])         # (the same one, for the same model)
    assert len(safree._SUBSPACES) <= 33
