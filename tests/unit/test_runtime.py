"""Provider choice, fallback, caching and the fail-closed paths of model loading/running."""

from __future__ import annotations

import json
import logging
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from safet2i import runtime
from safet2i.errors import MissingDependencyError, ModelLoadError, ModelRunError
from safet2i.filter import SafetyFilter, load_model
from safet2i.filter import detectors as det

NUDENET_SIDECAR = det.BUILTIN_DIR / "nudenet-320n.json"


@pytest.fixture
def fresh_cache():
    runtime.clear_cache()
    det._MODELS.clear()
    yield
    runtime.clear_cache()
    det._MODELS.clear()


def test_auto_on_this_cpu_build_is_cpu():
    assert runtime.resolve_providers("auto")[-1] == "CPUExecutionProvider"
    assert set(runtime.resolve_providers("auto")) <= set(ort.get_available_providers())


def test_unavailable_provider_is_skipped_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with caplog.at_level(logging.WARNING, logger="safet2i"):
        assert runtime.resolve_providers("cuda,tensorrt") == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider" in caplog.text


def test_unknown_provider_name_is_an_error():
    with pytest.raises(ValueError, match="Unknown onnxruntime provider"):
        runtime.resolve_providers("warp-drive")


def test_environment_override(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setenv(runtime.ENV_PROVIDERS, "cpu")
    assert runtime.resolve_providers(None) == ["CPUExecutionProvider"]
    monkeypatch.delenv(runtime.ENV_PROVIDERS)
    assert runtime.resolve_providers(None) == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_gpu_provider_failure_falls_back_to_cpu(monkeypatch, caplog, fresh_cache):
    """A CUDA/TensorRT session that cannot be created must not stop the filter: CPU."""
    real = ort.InferenceSession
    tried = []

    def fake_session(path, sess_options=None, providers=None):
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        tried.append(names[0])
        if names[0] != "CPUExecutionProvider":
            raise RuntimeError(f"{names[0]} is broken on this machine")
        return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", fake_session)
    with caplog.at_level(logging.WARNING, logger="safet2i"):
        model = load_model("nudenet")
    assert tried == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert model.providers == ("CPUExecutionProvider",)
    assert "fell back" in caplog.text and "CUDAExecutionProvider is broken" in caplog.text
    assert len(model.detect([np.zeros((64, 64, 3), np.uint8)])) == 1


def test_missing_file_and_garbage_file_fail_closed(tmp_path, fresh_cache):
    with pytest.raises(ModelLoadError, match="not found"):
        runtime.get_session(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(ModelLoadError, match="bad.onnx"):
        runtime.get_session(bad)


def test_checksum_mismatch_is_refused_before_parsing(tmp_path, fresh_cache):
    spec = json.loads(NUDENET_SIDECAR.read_text())
    onnx = Path(det.ModelSpec.from_file(NUDENET_SIDECAR).path)
    truncated = tmp_path / "320n.onnx"
    truncated.write_bytes(onnx.read_bytes()[: 1 << 20])
    spec["model"] = {"file": "320n.onnx"}
    (tmp_path / "nn.json").write_text(json.dumps(spec))
    with pytest.raises(ModelLoadError, match="sha256"):
        load_model(str(tmp_path / "nn.json"))


def test_sidecar_path_tricks_are_refused(tmp_path):
    spec = json.loads(NUDENET_SIDECAR.read_text())
    for file in ("../../etc/passwd", "/etc/passwd"):
        spec["model"] = {"file": file}
        (tmp_path / "t.json").write_text(json.dumps(spec))
        with pytest.raises(ModelLoadError, match="plain relative"):
            det.ModelSpec.from_file(tmp_path / "t.json")


def test_malformed_sidecars(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        det.ModelSpec.from_file(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"kind": "detector"}))
    with pytest.raises(ModelLoadError, match="lacks required field"):
        det.ModelSpec.from_file(tmp_path / "b.json")
    with pytest.raises(ModelLoadError, match="Unknown filter model"):
        load_model("no-such-model")


def test_model_missing_package_names_what_to_install(tmp_path):
    spec = json.loads(NUDENET_SIDECAR.read_text())
    spec["model"] = {"package": "definitely_not_installed_pkg", "file": "m.onnx"}
    (tmp_path / "m.json").write_text(json.dumps(spec))
    with pytest.raises(MissingDependencyError, match="pip install"):
        det.ModelSpec.from_file(tmp_path / "m.json")


def test_missing_onnxruntime_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match="onnxruntime"):
        runtime.resolve_providers("auto")


def test_error_while_running_raises_and_returns_nothing(monkeypatch, astronaut, fresh_cache):
    model = load_model("nudenet")
    real = model.loaded.session

    class Broken:
        def run(self, *a, **k):
            raise RuntimeError("CUDA error: an illegal memory access")

        def get_inputs(self):
            return real.get_inputs()

    monkeypatch.setattr(model, "loaded", runtime.LoadedSession(Broken(), "x", "0", ("CPUExecutionProvider",)))
    flt = SafetyFilter([model], "face-only", "blur")
    with pytest.raises(ModelRunError, match="illegal memory access"):
        flt.run(astronaut[None])


def test_nan_output_is_an_error(monkeypatch, astronaut, fresh_cache):
    model = load_model("nudenet")
    real = model.loaded.session

    class NaNs:
        def run(self, names, feeds):
            out = real.run(names, feeds)
            out[0][:] = np.nan
            return out

        def get_inputs(self):
            return real.get_inputs()

    monkeypatch.setattr(model, "loaded", runtime.LoadedSession(NaNs(), "x", "0", ("CPUExecutionProvider",)))
    with pytest.raises(ModelRunError, match="invalid output"):
        model.detect([astronaut])


def test_concurrent_first_use_loads_one_session(monkeypatch, fresh_cache):
    made = []
    real = ort.InferenceSession

    def counting(*a, **k):
        made.append(1)
        return real(*a, **k)

    monkeypatch.setattr(ort, "InferenceSession", counting)
    got = []
    threads = [threading.Thread(target=lambda: got.append(load_model("nudenet"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and len({id(m) for m in got}) == 1


def test_host_widget_auto_defers_to_the_operator_variable(monkeypatch):
    monkeypatch.delenv(runtime.ENV_PROVIDERS, raising=False)
    assert runtime.host_providers("auto") == "auto"
    assert runtime.host_providers("auto", cpu_only=True) == "cpu"
    assert runtime.host_providers("cuda", cpu_only=True) == "cuda"
    monkeypatch.setenv(runtime.ENV_PROVIDERS, "cpu")
    assert runtime.host_providers("auto", cpu_only=True) is None
    assert runtime.resolve_providers(runtime.host_providers("auto")) == ["CPUExecutionProvider"]
    assert runtime.host_providers("tensorrt") == "tensorrt"
