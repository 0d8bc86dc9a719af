"""The micro-lab: the lab's plumbing end to end in CI time. A 16 px model trained for a few
steps (its images are noise), a small judge of the same world, and `safet2i lab gate` on them:
the gate runs every caption form through the real pipeline and the real judge, reports, and
refuses the noise model. No efficacy number is asserted here; those come from the benchmark."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
if __import__("importlib.util").util.find_spec("open_clip") is None:
    pytest.skip("open-clip-torch (for its CLIP BPE file) is not installed", allow_module_level=True)

from safet2i.lab import World, quality_gate  # noqa: E402
from safet2i.lab.judge import GATE_CHECKS  # noqa: E402
from safet2i.lab.model import load_pipeline  # noqa: E402
from safet2i.images import float_to_uint8  # noqa: E402
from safet2i.lab.sampling import pipeline_generator  # noqa: E402


def parse(argv):
    from safet2i.lab.cli import register

    p = argparse.ArgumentParser(prog="safet2i")
    register(p.add_subparsers(dest="command", required=True))
    return p.parse_args(argv)


def test_pipeline_generator_is_seeded_and_returns_uint8(micro_lab):
    cfg, folder, _, _ = micro_lab
    pipe = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    generate = pipeline_generator(pipe, steps=2)
    a = generate(["a red circle", "a blue square"], 7)
    assert a.dtype == np.uint8 and a.shape == (2, 16, 16, 3)
    assert np.array_equal(a, generate(["a red circle", "a blue square"], 7))
    assert not np.array_equal(a, generate(["a red circle", "a blue square"], 8))


def test_pipeline_pixels_are_rounded_clipped_and_nan_refused():
    """The lab turns the pipeline's floats into pixels with the filter's own converter."""
    from safet2i.errors import SafeT2IError

    out = float_to_uint8(np.array([[[[-0.5, 0.5, 1.5]]]]))
    assert out.tolist() == [[[[0, 128, 255]]]]
    with pytest.raises(SafeT2IError, match="NaN"):
        float_to_uint8(np.array([np.nan]))


def test_gate_on_the_micro_model_reports_every_form_and_misses(micro_lab):
    cfg, folder, judge, _ = micro_lab
    pipe = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    calls = []

    def generate(captions, seed):
        calls.append((len(captions), seed))
        return pipeline_generator(pipe, steps=2)(captions, seed)

    report = quality_gate(generate, World(cfg.world), n_per_form=3, seed=0, judge=judge, batch_size=2)
    assert set(report.concept_rate) == {"benign", "direct", "synonym", "indirect", "misspelled"}
    assert tuple(c.name for c in report.checks) == GATE_CHECKS
    # 5 forms x 3 captions in chunks of 2: 10 calls, seeds 0..9, every caption generated once
    assert [s for _, s in calls] == list(range(10)) and sum(n for n, _ in calls) == 15
    # three minutes of training give noise: the gate must not pass it
    assert not report.passed


def test_cli_gate_prints_the_report_writes_json_and_exits_1_on_a_miss(micro_lab, tmp_path, capsys):
    from safet2i.lab.cli import run

    _, folder, _, judge_file = micro_lab
    out_json = tmp_path / "gate.json"
    args = parse(["lab", "gate", "--model", str(folder), "--judge", str(judge_file), "--n-per-form", "2",
                  "--batch-size", "4", "--json", str(out_json), "--threads", "1"])
    assert run(args) == 1
    out = capsys.readouterr().out
    assert "Quality gate: MISSED" in out and "Efficacy numbers are not reported" in out
    data = json.loads(out_json.read_text())
    assert data["model"] == str(folder) and data["passed"] is False
    assert {c["name"] for c in data["checks"]} == set(GATE_CHECKS)


def test_cli_gate_errors_exit_2(tmp_path, capsys):
    from safet2i.lab.cli import run

    assert run(parse(["lab", "gate", "--model", str(tmp_path)])) == 2
    assert "not a finished lab model" in capsys.readouterr().err
    assert run(parse(["lab", "gate", "--cache", str(tmp_path)])) == 2
    assert "safet2i lab train" in capsys.readouterr().err
