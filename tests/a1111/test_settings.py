"""Operator settings (``--safet2i-enforce``), the settings section, infotext and paste."""

from __future__ import annotations

import base64
import io
import sys

import pytest
from PIL import Image

from conftest import VARIANTS

ENFORCE = ["--safet2i-enforce", "--safet2i-enforce-policy", "broad-9", "--safet2i-enforce-action", "black"]


def our_cfg(p):
    return p._safet2i_job.cfg


@pytest.mark.parametrize("variant", VARIANTS)
def test_enforcement_cannot_be_switched_off_from_the_ui(start, variant):
    webui = start(variant, argv=ENFORCE)
    assert webui.shared.cmd_opts.safet2i_enforce is True
    p, processed = webui.txt2img("a", steps=2, args=webui.ui_args(filter_enabled=False, filter_policy="face-only",
                                                                  filter_action="pass"))
    cfg = our_cfg(p)
    assert (cfg.filter_enabled, cfg.filter_policy, cfg.filter_action, cfg.enforced) == (True, "broad-9", "black", True)
    assert "SafeT2I filter: broad-9 black enforced" in processed.infotexts[0]
    from safet2i_a1111.filtering import was_checked
    assert all(was_checked(im) for im in processed.images)


@pytest.mark.parametrize("variant", ["a1111-1.10", "forge"])
def test_enforcement_cannot_be_switched_off_by_the_api_or_override_settings(start, variant):
    webui = start(variant, argv=ENFORCE)
    args = webui.api_args(alwayson={"SafeT2I": {"args": [False, "SLD", "MEDIUM", "", False, "strict-5", "pass"]}})
    overrides = {"safet2i_filter_default": False, "safet2i_filter_action": "pass", "safet2i_previews": "show"}
    p, processed = webui.txt2img("a", steps=2, args=args, api=True, override_settings=overrides)
    cfg = our_cfg(p)
    assert (cfg.filter_enabled, cfg.filter_policy, cfg.filter_action) == (True, "broad-9", "black")
    opts = webui.shared.opts
    assert (opts.safet2i_filter_default, opts.safet2i_filter_action, opts.safet2i_previews) == (True, "blur", "filter")
    assert opts.set("safet2i_filter_default", False, is_api=True) is False          # /sdapi/v1/options too
    # a stronger policy the user asks for is kept
    args = webui.api_args(alwayson={"SafeT2I": {"args": [False, "SLD", "MEDIUM", "", True, "broad-9", "fill"]}})
    p, _ = webui.txt2img("a", steps=2, args=args, api=True)
    assert (our_cfg(p).filter_policy, our_cfg(p).filter_action) == ("broad-9", "fill")


@pytest.mark.parametrize("variant", VARIANTS)
def test_options_api_cannot_change_the_filter_settings(start, variant):
    """Forge's POST /sdapi/v1/options does not honour ``restrict_api`` (it calls
    ``sysinfo.set_config`` without ``is_api``): the extension drops its restricted keys there;
    the other options of the request still change, and the Settings tab still can."""
    webui = start(variant)
    from modules.api.api import Api
    opts = webui.shared.opts
    Api(None, None).set_config({"safet2i_filter_default": False, "safet2i_filter_policy": "face-only",
                                "safet2i_filter_action": "pass", "safet2i_previews": "hide",
                                "safet2i_guidance_preset": "STRONG"})
    assert (opts.safet2i_filter_default, opts.safet2i_filter_policy, opts.safet2i_filter_action,
            opts.safet2i_previews) == (True, "strict-5", "blur", "filter")
    assert opts.safet2i_guidance_preset == "STRONG"            # not restricted: the request ran
    if variant in ("forge", "reforge"):
        assert webui.shared.opts.saved["safet2i_filter_default"] is True
        from modules import sysinfo
        sysinfo.set_config({"safet2i_filter_policy": "x"})      # the guard is installed once
        assert sysinfo.set_config._safet2i_guard and opts.safet2i_filter_policy == "strict-5"
    assert opts.set("safet2i_filter_policy", "broad-9") is True   # the Settings tab (is_api=False)


def test_enforcement_flags_are_validated_by_the_parser(start):
    with pytest.raises(SystemExit):
        start("a1111-1.10", argv=["--safet2i-enforce", "--safet2i-enforce-action", "pass"])


@pytest.mark.parametrize("variant", ["a1111-1.10", "reforge"])
def test_enforced_api_route_refuses_weaker_requests(start, astronaut, variant):
    webui = start(variant, argv=[*ENFORCE, "--api"])
    buf = io.BytesIO()
    Image.fromarray(astronaut).save(buf, "PNG")
    r = webui.app.post("/safet2i/filter", {"image": base64.b64encode(buf.getvalue()).decode(), "policy": "face-only",
                                          "action": "pass"})
    assert (r["policy"], r["action"]) == ("broad-9", "black")


@pytest.mark.parametrize("variant", VARIANTS)
def test_enforced_extras_are_checked_even_with_our_extras_script_off(start, monkeypatch, variant):
    webui = start(variant, argv=ENFORCE)
    webui.shared.opts.postprocessing_disable_in_extras = ["SafeT2I output filter"]
    seen = []
    callbacks = sys.modules["safet2i_a1111.callbacks"]        # the Extras safety net
    original = callbacks.filter_image
    monkeypatch.setattr(callbacks, "filter_image", lambda im, pol, act: seen.append((pol, act)) or original(im, pol, act))
    image = Image.new("RGB", (64, 64), "white")
    outputs, _, _ = webui.extras(image, save_output=False)
    from safet2i_a1111.filtering import was_checked
    assert seen == [("broad-9", "black")] and was_checked(outputs[0])


def test_unenforced_jobs_can_switch_the_filter_off(start):
    webui = start("a1111-1.10")
    p, processed = webui.txt2img("a", steps=2, args=webui.ui_args(filter_enabled=False))
    assert not our_cfg(p).filter_enabled and "SafeT2I filter: off" in processed.infotexts[0]
    assert "SafeT2I verdict" not in processed.infotexts[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_infotext_round_trip_through_paste(start, variant):
    webui = start(variant)
    concept = "violence, blood: gore"         # commas and a colon: quoted in the infotext
    args = webui.ui_args(guidance_enabled=True, guidance_preset="STRONG", guidance_concept=concept,
                         filter_policy="broad-9", filter_action="pixelate")
    p, processed = webui.txt2img("a", steps=2, args=args)
    text = processed.infotexts[0]
    assert "SafeT2I guidance: SLD STRONG" in text and "SafeT2I filter: broad-9 pixelate" in text
    assert 'SafeT2I concept: "violence, blood: gore"' in text
    pasted = webui.paste(text)
    assert pasted["guidance_enabled"] is True and pasted["guidance_method"] == "SLD"
    assert pasted["guidance_preset"] == "STRONG" and pasted["guidance_concept"] == concept
    assert pasted["filter_enabled"] is True and pasted["filter_policy"] == "broad-9"
    assert pasted["filter_action"] == "pixelate"
    # the same parameters read from the saved PNG
    saved = [f for f in webui.saved() if "grid" not in f.name][0]
    assert webui.paste(Image.open(saved).info["parameters"]) == pasted


@pytest.mark.parametrize("variant", ["a1111-1.10", "a1111-1.7"])
def test_pasting_foreign_parameters_leaves_the_safety_settings_alone(start, variant):
    webui = start(variant)
    pasted = webui.paste("a landscape\nNegative prompt: ugly\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1")
    ours = webui.arg_names()[:7]                                    # guidance and filter fields
    assert all(pasted[k] is None for k in ours), pasted             # nothing switched off
    pasted = webui.paste("a landscape\nSteps: 20, Sampler: Euler, CFG scale: 7, SafeT2I filter: off")
    assert pasted["filter_enabled"] is False


@pytest.mark.parametrize("variant", VARIANTS)
def test_settings_section_and_ui_defaults(start, variant):
    webui = start(variant)
    opts = webui.shared.opts
    ours = {k: v for k, v in opts.data_labels.items() if k.startswith("safet2i_")}
    assert set(ours) >= {"safet2i_filter_default", "safet2i_filter_policy", "safet2i_filter_action",
                         "safet2i_previews", "safet2i_guidance_method", "safet2i_guidance_preset"}
    assert all(v.section == ("safet2i", "SafeT2I") for v in ours.values())
    assert all(ours[k].restrict_api for k in ("safet2i_filter_default", "safet2i_filter_policy",
                                              "safet2i_filter_action", "safet2i_previews"))
    assert (opts.safet2i_filter_default, opts.safet2i_filter_policy, opts.safet2i_filter_action) == \
        (True, "strict-5", "blur")
    opts.safet2i_filter_policy = "broad-9"
    opts.safet2i_filter_action = "fill"
    opts.safet2i_guidance_preset = "STRONG"
    with webui.gr.Blocks():
        components = webui.ours().ui(False)
    values = dict(zip(webui.arg_names(), [c.value for c in components]))
    assert (values["filter_policy"], values["filter_action"], values["guidance_preset"]) == \
        ("broad-9", "fill", "STRONG")


def test_settings_survive_a_reload_of_the_scripts(start):
    webui = start("a1111-1.10")
    opts = webui.shared.opts
    opts.set("safet2i_filter_action", "fill")
    webui.scripts.load_scripts()
    webui.callbacks.ui_settings_callback()
    assert "safet2i_filter_default" in opts.data_labels
    assert opts.data_labels["safet2i_filter_default"].section == ("safet2i", "SafeT2I")
    assert opts.safet2i_filter_action == "fill"      # the user's value survives the reload
