"""Named steering configurations (``safet2i.steering.settings``) and how the A1111 extension
carries them: SAFREE's paper configuration, concepts as negative prompt, the infotext."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from safet2i.errors import SafeT2IError
from safet2i.steering import load_concepts
from safet2i.steering.settings import CUSTOM, PAPER, SteeringSettings, concepts_negative, configure, describe

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "extension"))

from safet2i_a1111.config import JobConfig, parse_infotext  # noqa: E402


def test_paper_configuration_is_the_released_runs():
    own = SteeringSettings("custom", "cat", 5.0, "paper", False, False)
    assert configure(CUSTOM, own) is own
    sd = configure(PAPER, own, "sd1")
    assert sd == SteeringSettings("nudity", "", 0.01, "code", True, True)
    assert configure(PAPER, own, "sdxl") == SteeringSettings("nudity", "", 0.01, "code", False, True)  # no SVF there
    assert len(load_concepts(sd.concepts, sd.custom)[0]) == 17
    assert describe(PAPER, sd) == (f"{PAPER}: concepts nudity, alpha 0.01, order code, self-validating on, "
                                   "concepts as negative prompt on")
    with pytest.raises(SafeT2IError, match="unknown steering configuration 'SAFREE'"):
        configure("SAFREE", own)


@pytest.mark.parametrize(("negative", "want"), [
    ("", "nude, naked"), ("  ", "nude, naked"), ("blurry", "blurry, nude, naked"),
    ("blurry, nude, naked", "blurry, nude, naked"), ("nude, naked", "nude, naked"),
])
def test_concepts_negative(negative, want):
    assert concepts_negative(["nude", " naked "], negative) == want


def test_a1111_arguments_are_appended_validated_and_round_trip_through_the_infotext():
    names = JobConfig.arg_names()
    assert names[-2:] == ["steering_concepts_as_negative", "steering_configuration"]   # appended: old calls line up
    old = JobConfig.from_args([False, "SLD", "MEDIUM", "x", True, "strict-5", "blur", True, "custom", "nude"])
    assert not old.steering_concepts_as_negative and old.steering_configuration == CUSTOM
    values = dict(steering_enabled=True, steering_concepts="custom", steering_custom="cat", steering_alpha=2.0,
                  steering_concepts_as_negative="true", steering_configuration=PAPER)
    cfg = JobConfig(**values)
    cfg.validate()
    assert cfg.steering_concepts_as_negative is True
    assert cfg.steering(None) == SteeringSettings("nudity", "", 0.01, "code", True, True)
    assert cfg.steering("sdxl").self_validating is False
    info = cfg.infotext()
    assert info["SafeT2I steering configuration"] == PAPER and info["SafeT2I steering"].endswith(" negative=concepts")
    back = parse_infotext(info)
    assert back["steering_configuration"] == PAPER and back["steering_concepts_as_negative"] is True
    assert back["steering_custom"] == "cat" and back["steering_alpha"] == 2.0
    plain = JobConfig(steering_enabled=True)
    plain.validate()
    assert "SafeT2I steering configuration" not in plain.infotext()
    back = parse_infotext(plain.infotext())
    assert back["steering_configuration"] == CUSTOM and back["steering_concepts_as_negative"] is False
    with pytest.raises(ValueError, match="unknown steering configuration"):
        JobConfig(steering_configuration="paper").validate()
