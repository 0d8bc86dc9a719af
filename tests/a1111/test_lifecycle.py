"""The extension inside the webui stand-in: loading, hook order, batching, arguments, reloads."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import VARIANTS

HOOKS = ["setup", "before_process", "process", "before_process_batch", "after_extra_networks_activate",
         "process_batch", "process_before_every_sampling", "before_hr", "postprocess_batch", "postprocess_batch_list",
         "postprocess_image", "postprocess_maskoverlay", "postprocess_image_after_composite", "postprocess"]


def spy_hooks(webui, monkeypatch):
    """Record every hook call the runner makes on our script (name, kwargs, args seen)."""
    calls = []
    cls = type(webui.ours())
    for name in HOOKS:
        if not hasattr(webui.scripts.Script, name):
            continue                                  # this webui has no such hook
        original = getattr(cls, name)

        def hook(self, p, *args, _name=name, _orig=original, **kwargs):
            calls.append((_name, args, kwargs))
            return _orig(self, p, *args, **kwargs)

        monkeypatch.setattr(cls, name, hook)
    return calls


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_shim_loads_the_script_and_the_extras_script(start, variant):
    webui = start(variant)
    assert [type(s).__name__ for s in webui.runner().alwayson_scripts] == ["SafeT2IScript"]
    assert [type(s).__name__ for s in webui.runner(True).alwayson_scripts] == ["SafeT2IScript"]
    assert [s.name for s in webui.scripts.scripts_postproc.scripts] == ["SafeT2I output filter"]
    script = webui.ours()
    assert script.args_from == 1 and script.args_to - script.args_from == len(webui.arg_names())
    assert "/safet2i/filter" not in webui.app.routes        # served only with --api (test_filter_route.py)


@pytest.mark.parametrize("variant", VARIANTS)
def test_hook_order_and_batching(start, monkeypatch, variant):
    webui = start(variant)
    calls = spy_hooks(webui, monkeypatch)
    args = webui.ui_args(guidance_enabled=True, filter_enabled=True)
    p, processed = webui.txt2img(["one", "two", "three", "four"], n_iter=2, batch_size=2, steps=2, args=args)
    names = [c[0] for c in calls]
    per_batch = ["before_process_batch", "after_extra_networks_activate", "process_batch"]
    if variant != "a1111-1.7":
        per_batch.append("process_before_every_sampling")
    per_batch += ["postprocess_batch", "postprocess_batch_list"]
    per_image = ["postprocess_image"]
    if variant != "a1111-1.7":
        per_image += ["postprocess_maskoverlay", "postprocess_image_after_composite"]
    expected = ["setup", "before_process", "process"] + (per_batch + per_image * 2) * 2 + ["postprocess"]
    assert names == expected
    batches = [c[2] for c in calls if c[0] == "process_batch"]
    assert [b["batch_number"] for b in batches] == [0, 1]
    assert [b["prompts"] for b in batches] == [["one", "two"], ["three", "four"]]
    assert [b["seeds"] for b in batches] == [[1, 2], [3, 4]]
    images = [c[2]["images"] for c in calls if c[0] == "postprocess_batch"]
    assert all(isinstance(t, torch.Tensor) and t.shape == (2, 3, 64, 64) for t in images)
    our_args = [c[1] for c in calls if c[0] == "process"][0]
    assert list(our_args) == args[1:]                          # positional, in JobConfig order
    if variant == "forge":
        pps = [c[1][0] for c in calls if c[0] == "postprocess_image_after_composite"]
        assert [pp.index for pp in pps] == [0, 1, 2, 3]
    assert p._safet2i_job.error is None
    assert len(processed.images) == 5 and all("SafeT2I verdict: safe" in t for t in processed.infotexts[1:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_cfg_callback_batch_layout(start, variant):
    """What ``on_cfg_denoiser`` sees: A1111 the batched rows (cond rows of every image, then the
    negative rows), Forge/reForge one row per image; ``on_cfg_denoised`` is A1111-only."""
    webui = start(variant)
    seen = {"denoiser": [], "denoised": []}
    webui.callbacks.on_cfg_denoiser(lambda params: seen["denoiser"].append(
        (params.x.shape[0], (params.text_cond["crossattn"] if isinstance(params.text_cond, dict)
                             else params.text_cond).shape[0], params.sampling_step)))
    if hasattr(webui.callbacks, "on_cfg_denoised"):
        webui.callbacks.on_cfg_denoised(lambda params: seen["denoised"].append(params.x.shape[0]))
    webui.txt2img(["a", "b", "c"], batch_size=3, steps=3, args=webui.ui_args(filter_enabled=False))
    rows = 6 if variant.startswith("a1111") else 3
    # state.sampling_step is set by the sampler's callback after each step: 0, 0, 1, ...
    assert seen["denoiser"] == [(rows, 3, 0), (rows, 3, 0), (rows, 3, 1)]
    assert seen["denoised"] == ([6, 6, 6] if variant.startswith("a1111") else [])


def test_guidance_adds_one_row_per_image_before_the_negative_rows(start):
    webui = start("a1111-1.10")
    rows = []
    webui.callbacks.on_cfg_denoised(lambda params: rows.append(params.x.shape[0]))
    p, _ = webui.txt2img(["a", "b"], batch_size=2, steps=2, args=webui.ui_args(guidance_enabled=True))
    assert rows == [6, 6]                                   # cond ×2, concept ×2, negative ×2
    assert webui.shared.sd_model.rows == 12                 # one UNet batch per step


@pytest.mark.parametrize("variant", VARIANTS)
def test_reload_ui_registers_the_callbacks_again(start, variant):
    """"Reload UI": the webui clears every callback and re-runs scripts/*.py; our package stays
    imported, so the shim must register again (else guidance and save checks silently vanish)."""
    webui = start(variant)
    import safet2i_a1111.script as script
    webui.scripts.load_scripts()
    cmap = webui.callbacks.callback_map
    assert any(c.callback is script._on_before_image_saved for c in cmap["callbacks_before_image_saved"])
    assert any(c.callback is script._on_cfg_denoiser for c in cmap["callbacks_cfg_denoiser"])
    n = len(cmap["callbacks_cfg_denoiser"])
    webui.scripts.load_scripts()
    assert len(cmap["callbacks_cfg_denoiser"]) == n          # not twice
    with webui.gr.Blocks():
        webui.scripts.scripts_txt2img.initialize_scripts(False)
        webui.scripts.scripts_txt2img.setup_ui()
    p, processed = webui.txt2img("a cat", steps=2, args=webui.ui_args(guidance_enabled=True))
    assert p._safet2i_job.failed is None and p._safet2i_job.guided_steps() == 2


@pytest.mark.parametrize("variant", ["a1111-1.10", "forge"])
def test_copies_of_p_share_the_job_and_are_each_guided(start, variant):
    """X/Y/Z plot and similar scripts run ``process_images`` on copies of ``p``."""
    webui = start(variant)
    p = webui.processing.StableDiffusionProcessingTxt2Img(prompt="a cat", steps=2, width=64, height=64,
                                                         sampler_name="Euler", seed=3)
    p.outpath_samples = p.outpath_grids = str(webui.tmp)
    p.scripts = webui.runner()
    p.script_args = webui.ui_args(guidance_enabled=True)
    job = p._safet2i_job
    for cell in range(3):
        pc = copy.copy(p)
        processed = webui.processing.process_images(pc)
        assert job.failed is None and job.guided_steps() == 2 * (cell + 1)
        assert "SafeT2I verdict: safe" in processed.infotexts[0]
    p.close()
    import safet2i_a1111.script as script
    assert script._ACTIVE == []
    assert "assign_current_image" not in vars(webui.shared.state)     # preview wrapper removed


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_job_that_raised_does_not_leave_its_preview_wrapper_behind(start, variant):
    webui = start(variant)
    p = webui.processing.StableDiffusionProcessingTxt2Img(prompt="x", steps=2, width=64, height=64,
                                                         sampler_name="Euler")
    p.scripts = webui.runner()
    p.script_args = webui.ui_args()              # setup ran; the job then died without close()
    assert "assign_current_image" in vars(webui.shared.state)
    p2, processed = webui.txt2img("a cat", steps=2)
    import safet2i_a1111.script as script
    assert script._ACTIVE == [] and "assign_current_image" not in vars(webui.shared.state)
    assert p2._safet2i_job.failed is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_api_requests_get_ui_defaults_and_alwayson_overrides(start, variant):
    webui = start(variant)
    defaults = webui.api_args()
    script = webui.ours()
    ours = defaults[script.args_from:script.args_to]
    from safet2i_a1111.config import JobConfig
    assert ours == [getattr(JobConfig(), n) for n in webui.arg_names()]
    args = webui.api_args(alwayson={"safet2i": {"args": [True, "SLD", "STRONG"]}})     # a prefix, by title
    p, processed = webui.txt2img("a cat", steps=2, args=args, api=True)
    assert p.is_api and p._safet2i_job.cfg.guidance_preset == "STRONG" and p._safet2i_job.cfg.filter_enabled
    assert "SafeT2I guidance: SLD STRONG" in processed.infotexts[0]


@pytest.mark.parametrize("value,expected", [("false", False), ("true", True), (0, False), ("0", False)])
def test_api_booleans_sent_as_strings_are_read_as_booleans(start, value, expected):
    webui = start("a1111-1.10")
    args = webui.api_args(alwayson={"SafeT2I": {"args": [value, "SLD", "MEDIUM", "x", value]}})
    p, _ = webui.txt2img("a cat", steps=2, args=args, api=True)
    cfg = p._safet2i_job.cfg
    assert cfg.guidance_enabled is expected and cfg.filter_enabled is expected


def test_the_extension_does_not_put_the_repository_on_sys_path(tmp_path):
    """Only ``safet2i`` (the core) and ``safet2i_a1111`` become importable: the repository's
    ``nodes/``, ``install.py``, ``preload.py``, ``tests/`` must not shadow other modules."""
    import subprocess
    import sys as _sys
    from pathlib import Path as _Path

    root = _Path(__file__).resolve().parents[2]
    code = (
        "import sys\n"
        f"sys.path[:] = [p for p in sys.path if p not in ('', {str(root)!r})]\n"
        f"sys.path.insert(0, {str(root / 'extension')!r})\n"
        "import safet2i_a1111, safet2i, importlib.util\n"
        f"assert {str(root)!r} not in sys.path, sys.path\n"
        f"assert safet2i.__file__.startswith({str(root / 'safet2i')!r}), safet2i.__file__\n"
        "import safet2i.filter.policy\n"
        "for name in ('nodes', 'install', 'preload', 'tools'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        f"    assert spec is None or not str(spec.origin or '').startswith({str(root)!r}), (name, spec)\n"
        "print('ok')\n"
    )
    out = subprocess.run([_sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_another_safet2i_copy_is_replaced_with_all_its_submodules(tmp_path):
    """An older install (another ``safet2i`` on ``sys.path``, already imported with some
    submodules) must not leave its submodules mixed with this checkout's core."""
    import subprocess
    import sys as _sys
    from pathlib import Path as _Path

    root = _Path(__file__).resolve().parents[2]
    other = tmp_path / "old" / "safet2i"
    (other / "filter").mkdir(parents=True)
    (other / "__init__.py").write_text("OLD = True\n")
    (other / "errors.py").write_text("OLD_ERRORS = True\n")
    (other / "filter" / "__init__.py").write_text("OLD_FILTER = True\n")
    code = (
        "import sys\n"
        f"sys.path[:] = [p for p in sys.path if p not in ('', {str(root)!r})]\n"
        f"sys.path.insert(0, {str(tmp_path / 'old')!r})\n"
        "import safet2i, safet2i.errors, safet2i.filter\n"
        "assert safet2i.OLD and safet2i.errors.OLD_ERRORS\n"
        f"sys.path.insert(0, {str(root / 'extension')!r})\n"
        "import safet2i_a1111\n"
        "import safet2i, safet2i.errors, safet2i.filter\n"
        f"for name, mod in list(sys.modules.items()):\n"
        "    if name == 'safet2i' or name.startswith('safet2i.'):\n"
        f"        assert str(getattr(mod, '__file__', '') or '').startswith({str(root / 'safet2i')!r}), (name, mod)\n"
        "assert not hasattr(safet2i, 'OLD') and hasattr(safet2i.errors, 'SafeT2IError')\n"
        "print('ok')\n"
    )
    out = subprocess.run([_sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
