"""JobConfig of the A1111 extension: the steering and LoRA arguments are appended after the
existing ones (the API passes script arguments by position), validated, and round-trip
through the infotext."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "extension"))

from safet2i_a1111.config import JobConfig, parse_infotext  # noqa: E402


ARGS = [False, "SLD", "MEDIUM", "x", True, "strict-5", "blur",
        True, "custom", "nude, naked", 0.02, "paper", False, True, "safety_models/duo.safetensors", 0.8, True]


def test_new_arguments_come_after_the_old_ones():
    names = JobConfig.arg_names()
    assert names[:7] == ["guidance_enabled", "guidance_method", "guidance_preset", "guidance_concept",
                         "filter_enabled", "filter_policy", "filter_action"]           # older API calls still line up
    assert names[7:17] == ["steering_enabled", "steering_concepts", "steering_custom", "steering_alpha", "steering_order",
                         "steering_self_validating", "lora_enabled", "lora_file", "lora_strength", "lora_allow_partial"]
    old = JobConfig.from_args([False, "SLD", "MEDIUM", "x", True, "strict-5", "blur"])
    assert not old.steering_enabled and not old.lora_enabled


def test_job_config_arguments_and_infotext_round_trip():
    names = JobConfig.arg_names()
    cfg = JobConfig.from_args(ARGS)
    info = cfg.infotext()
    assert info["SafeT2I steering"] == "custom alpha=0.02 order=paper svf=off"
    assert info["SafeT2I LoRA"] == "safety_models/duo.safetensors" and info["SafeT2I LoRA partial"] == "allowed"
    parsed = parse_infotext(info)
    for k in names[7:17]:        # the weights (18-20): test_a1111_weights.py
        assert parsed[k] == getattr(cfg, k), k


def test_parameters_without_safet2i_keys_leave_every_layer_alone():
    # Pasting another image's parameters (no SafeT2I keys) leaves every layer as the UI has it.
    names = JobConfig.arg_names()
    foreign = parse_infotext({"Steps": "20", "Sampler": "Euler a"})
    assert not any(k in foreign for k in names), foreign


def test_json_strings_from_api_callers_are_booleans():
    # API callers send JSON strings: "false" is false, "true" is true.
    strings = list(ARGS)
    strings[7], strings[12], strings[13], strings[16] = "false", "true", "true", "false"
    from_api = JobConfig.from_args(strings)
    assert from_api.steering_enabled is False and from_api.lora_enabled is True
    assert from_api.steering_self_validating is True
    assert from_api.lora_allow_partial is False


@pytest.mark.parametrize("bad", [{13: True, 14: "None"}, {15: 0.0}, {15: 3.0}, {10: -1.0}, {8: "unknown"},
                                 {11: "sideways"}],
                         ids=["lora-on-without-file", "lora-strength-0", "lora-strength-3", "negative-alpha",
                              "unknown-concepts", "unknown-order"])
def test_invalid_arguments_are_refused(bad):
    a = list(ARGS)
    for i, v in bad.items():
        a[i] = v
    with pytest.raises(ValueError):
        JobConfig.from_args(a)
