"""Issue 14, class 9: model files are used as verified.

* The sha256 pin covers the bytes onnxruntime parses: the file is read once, hashed, and
  those very bytes go to ``onnxruntime.InferenceSession`` (never the path read again).
* The session cache never hands out a session as verified under a pin it does not match,
  even when the file was swapped with the same size and mtime.
* An unpinned user model runs, but is marked in ``describe()``, the JSON and HTML reports,
  the ComfyUI loader and filter node outputs, and in a load-time warning.
* ``SAFET2I_REQUIRE_PINNED`` refuses unpinned models with the digest to pin them with.

Every model is a tiny ONNX classifier built here; its scores are checked against numpy.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import sys
import types
from pathlib import Path
from unittest import mock

import numpy as np
import onnxruntime as ort
import pytest

from safet2i import runtime
from safet2i.errors import ModelLoadError
from safet2i.filter import SafetyFilter, get_policy, load_model
from safet2i.filter import detectors as det
from safet2i.filter.report import build_report, write_html, write_json

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# Mean RGB (0..1) -> logits [ok, bad]; A says "bad" for any bright image, B says "ok".
W_A = np.array([[-1.0, 1.0], [-1.0, 1.0], [-1.0, 1.0]], np.float32)
W_B = -W_A
BRIGHT = np.full((16, 16, 3), 200, np.uint8)


def _onnx_bytes(w: np.ndarray, external: Path | None = None) -> bytes:
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
         helper.make_node("MatMul", ["m", "w"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2])],
        initializer=[numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
                     numpy_helper.from_array(w, "w")],  # raw_data: same size for any w
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    if external is not None:
        onnx.save(model, external, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=external.stem + ".bin", size_threshold=0)
        return external.read_bytes()
    return model.SerializeToString()


def _bad_score(w: np.ndarray, img: np.ndarray) -> float:
    """Independent float64 reference of the sidecar below (stretch to 8x8, RGB, /255, softmax)."""
    m = (img.astype(np.float64) / 255).mean(axis=(0, 1))  # uniform image: resizing is exact
    logits = m @ w.astype(np.float64)
    e = np.exp(logits - logits.max())
    return float(e[1] / e.sum())


def _sidecar(folder: Path, name: str, sha256=None, file: str | None = None) -> Path:
    data = {
        "schema": 1, "name": name, "kind": "classifier",
        "model": {"file": file or f"{name}.onnx"},
        "input": {"size": 8, "geometry": "stretch", "layout": "NCHW", "colour": "RGB",
                  "scale": 1 / 255, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        "output": {"labels": ["ok", "bad"], "activation": "softmax"},
        "thresholds": {"bad": 0.7},
    }
    if sha256 is not None:
        data["sha256"] = sha256
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.delenv(runtime.ENV_REQUIRE_PINNED, raising=False)
    runtime.clear_cache()
    det._MODELS.clear()
    yield
    runtime.clear_cache()
    det._MODELS.clear()


@pytest.fixture
def models(tmp_path):
    """A pinned model (``pinned.json``) and an unpinned one (``loose.json``), both weights A."""
    data = _onnx_bytes(W_A)
    (tmp_path / "pinned.onnx").write_bytes(data)
    (tmp_path / "loose.onnx").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    return types.SimpleNamespace(
        dir=tmp_path, digest=digest,
        pinned=_sidecar(tmp_path, "pinned", digest), loose=_sidecar(tmp_path, "loose"),
    )


def _spy(monkeypatch, before=None):
    """Replace ``onnxruntime.InferenceSession`` by a recorder that builds the real session from
    exactly what it was given (after running ``before``, e.g. a file swap)."""
    real = ort.InferenceSession
    calls = []

    def spy(model, sess_options=None, providers=None):
        calls.append({"model": model, "providers": providers})
        if before is not None:
            before()
        return real(model, sess_options=sess_options,
                    providers=[p[0] if isinstance(p, tuple) else p for p in providers])

    monkeypatch.setattr(ort, "InferenceSession", spy)
    return calls


# --------------------------------------------------------------------------- the pin covers the parsed bytes


def test_onnxruntime_gets_the_hashed_bytes_never_the_path(monkeypatch, models):
    calls = _spy(monkeypatch)
    model = load_model(str(models.pinned))
    assert len(calls) == 1
    given = calls[0]["model"]
    assert isinstance(given, bytes), f"onnxruntime was given {type(given).__name__}, not the verified bytes"
    assert hashlib.sha256(given).hexdigest() == models.digest == model.loaded.sha256
    assert model.describe()["pinned"] is True
    assert model.detect([BRIGHT])[0][1].score == pytest.approx(_bad_score(W_A, BRIGHT), abs=1e-5)


def test_a_file_swapped_after_hashing_never_reaches_onnxruntime(monkeypatch, models):
    """The swap happens inside the session constructor, the last moment a second read of the
    path could happen: the session must still be model A, the bytes that matched the pin."""
    onnx_file = models.dir / "pinned.onnx"
    evil = _onnx_bytes(W_B)

    def swap():
        onnx_file.write_bytes(evil)

    calls = _spy(monkeypatch, before=swap)
    model = load_model(str(models.pinned))
    assert onnx_file.read_bytes() == evil                      # the swap did happen
    assert hashlib.sha256(calls[0]["model"]).hexdigest() == models.digest
    score = model.detect([BRIGHT])[0][1].score
    assert score == pytest.approx(_bad_score(W_A, BRIGHT), abs=1e-5)
    assert abs(_bad_score(W_A, BRIGHT) - _bad_score(W_B, BRIGHT)) > 0.9  # the test can tell A from B


def test_same_size_same_mtime_swap_is_never_verified_from_the_cache(tmp_path):
    path = tmp_path / "m.onnx"
    a, b = _onnx_bytes(W_A), _onnx_bytes(W_B)
    assert len(a) == len(b) and a != b
    sha_a, sha_b = hashlib.sha256(a).hexdigest(), hashlib.sha256(b).hexdigest()
    path.write_bytes(a)
    first = runtime.get_session(path)                          # cached, unpinned, made from A
    st = path.stat()
    path.write_bytes(b)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))        # same size, same mtime: same cache key
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)

    # Pinned to B: the cached A session must not be handed out as "verified B".
    got_b = runtime.get_session(path, expected_sha256=sha_b)
    assert got_b is not first and got_b.sha256 == sha_b
    x = np.full((1, 3, 8, 8), 200 / 255, np.float32)
    assert got_b.session.run(None, {"x": x})[0][0] == pytest.approx(x[0].mean(axis=(1, 2)) @ W_B, abs=1e-5)
    # Pinned to something else: the file is re-read and refused.
    with pytest.raises(ModelLoadError, match="sha256"):
        runtime.get_session(path, expected_sha256="0" * 64)
    # A session made from bytes that match the pin may be reused.
    runtime.clear_cache()
    path.write_bytes(a)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    made_a = runtime.get_session(path, expected_sha256=sha_a)
    path.write_bytes(b)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = runtime.get_session(path, expected_sha256=sha_a)
    assert again is made_a and again.sha256 == sha_a            # built from A's verified bytes
    runtime.clear_cache()
    with pytest.raises(ModelLoadError, match=f"has sha256 {sha_b}, expected {sha_a}"):
        runtime.get_session(path, expected_sha256=sha_a)        # fresh read of B under pin A


def test_edited_sidecar_is_read_again(models):
    loose = load_model(str(models.loose))
    assert loose.pinned is False
    _sidecar(models.dir, "loose", models.digest)               # the user adds the pin
    st = models.loose.stat()
    os.utime(models.loose, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert load_model(str(models.loose)).pinned is True


def test_external_data_is_refused_even_next_to_the_working_directory(tmp_path, monkeypatch):
    """Weights in a second file would be read from disk outside the pin."""
    onnx_file = tmp_path / "ext.onnx"
    data = _onnx_bytes(W_A, external=onnx_file)
    assert (tmp_path / "ext.bin").is_file()
    _sidecar(tmp_path, "ext", hashlib.sha256(data).hexdigest())
    monkeypatch.chdir(tmp_path)                                # where onnxruntime would look by default
    with pytest.raises(ModelLoadError, match="external data"):
        load_model(str(tmp_path / "ext.json"))


def test_tensorrt_engine_cache_is_per_verified_digest(monkeypatch, models, tmp_path):
    """TensorRT keys engines on the graph only when given bytes: each digest gets its folder."""
    monkeypatch.setenv("SAFET2I_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CPUExecutionProvider"])
    real = ort.InferenceSession
    seen = []

    def fake(model, sess_options=None, providers=None):
        seen.append(dict(providers))
        if providers[0][0] == "TensorrtExecutionProvider":
            raise RuntimeError("no TensorRT on this machine")
        return real(model, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", fake)
    model = load_model(str(models.pinned), providers="tensorrt")
    assert model.providers == ("CPUExecutionProvider",)       # fallback kept
    trt = seen[0]["TensorrtExecutionProvider"]
    assert trt["trt_engine_cache_enable"] is True
    assert Path(trt["trt_engine_cache_path"]) == tmp_path / "cache" / "trt" / models.digest


# --------------------------------------------------------------------------- unpinned models are marked


def test_unpinned_model_runs_and_is_marked_in_describe_and_log(models, caplog):
    with caplog.at_level(logging.WARNING, logger="safet2i"):
        loose = load_model(str(models.loose))
    d = loose.describe()
    assert d["pinned"] is False and d["sha256"] == models.digest and d["sidecar"] == str(models.loose)
    assert "UNPINNED" in caplog.text and str(models.loose) in caplog.text and models.digest in caplog.text
    assert loose.detect([BRIGHT])[0][1].score == pytest.approx(_bad_score(W_A, BRIGHT), abs=1e-5)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="safet2i"):
        pinned = load_model(str(models.pinned))
    assert pinned.describe()["pinned"] is True and "UNPINNED" not in caplog.text


@pytest.mark.parametrize("which", ["loose", "pinned"])
def test_json_and_html_reports_mark_unpinned_models(models, tmp_path, which):
    flt = SafetyFilter([str(getattr(models, which))], get_policy("custom", {"bad": 0.7}), "fill")
    rep = build_report(flt.describe(), [])
    write_json(rep, tmp_path / "r.json")
    write_html(rep, tmp_path / "r.html", {})
    back = json.loads((tmp_path / "r.json").read_text())
    page = (tmp_path / "r.html").read_text()
    if which == "loose":
        assert back["unpinned_models"] == ["loose"]
        assert back["filter"]["models"][0]["pinned"] is False
        warning = re.search(r"<p class=error>[^<]*UNPINNED[^<]*</p>", page)
        assert warning and "loose" in warning.group(0) and "loose.json" in warning.group(0)
    else:
        assert back["unpinned_models"] == []
        assert back["filter"]["models"][0]["pinned"] is True
        assert "UNPINNED" not in page


def _import_filter_nodes(monkeypatch, sidecar: Path):
    """``nodes/filter_nodes.py`` under stand-ins for ComfyUI's ``comfy_api`` and ``folder_paths``,
    sharing this process's ``safet2i`` modules (so the model cache and error classes are one)."""
    class Output:
        def __init__(self, *args, ui=None):
            self.args, self.ui = args, ui

    class Api(types.ModuleType):
        def __getattr__(self, name):  # schema helpers: only called by define_schema
            return mock.MagicMock(name=name)

    io_mod = Api("io")
    io_mod.ComfyNode = type("ComfyNode", (), {})
    io_mod.NodeOutput = Output
    ui_mod = Api("ui")
    ui_mod.PreviewText = lambda text: {"text": text}
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ui = io_mod, ui_mod
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.folder_names_and_paths = {}
    folder_paths.get_filename_list = lambda folder: [sidecar.name]
    folder_paths.get_full_path_or_raise = lambda folder, name: str(sidecar)
    pack = types.ModuleType("_pins_pack")
    pack.__path__ = [str(REPO)]
    stubs = {"comfy_api": types.ModuleType("comfy_api"), "comfy_api.latest": latest,
             "folder_paths": folder_paths, "_pins_pack": pack}
    for name, mod in list(sys.modules.items()):
        if name == "safet2i" or name.startswith("safet2i."):
            stubs["_pins_pack." + name] = mod
    for name, mod in stubs.items():
        monkeypatch.setitem(sys.modules, name, mod)
    for name in ("_pins_pack.nodes", "_pins_pack.nodes.paths", "_pins_pack.nodes.filter_nodes"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    mod = importlib.import_module("_pins_pack.nodes.filter_nodes")
    for name in [n for n in sys.modules if n.startswith("_pins_pack.nodes")]:
        monkeypatch.delitem(sys.modules, name)  # undone after the test
    return mod


@pytest.mark.parametrize("which", ["loose", "pinned"])
def test_comfyui_loader_and_filter_outputs_mark_unpinned_models(monkeypatch, models, which):
    torch = pytest.importorskip("torch")
    sidecar = getattr(models, which)
    fn = _import_filter_nodes(monkeypatch, sidecar)
    out = fn.SafeT2IFilterModelLoader.execute(sidecar.name, providers="cpu")
    (loaded,) = out.args[0]
    loader_text = out.ui["text"]
    images = torch.from_numpy(np.stack([BRIGHT, BRIGHT]).astype(np.float32) / 255)
    res = fn.SafeT2IImageFilter.execute(images, out.args[0], "custom", "fill", thresholds="bad=0.7")
    report = json.loads(res.args[4])
    summary = res.ui["text"]
    assert res.args[3] is False                                    # model A: both images unsafe
    if which == "loose":
        assert loaded.pinned is False
        assert "UNPINNED" in loader_text and "loose.json" in loader_text and models.digest in loader_text
        assert report["filter"]["models"][0]["pinned"] is False and report["unpinned_models"] == ["loose"]
        assert "UNPINNED" in summary and "loose.json" in summary
    else:
        assert "pinned" in loader_text and "UNPINNED" not in loader_text and models.digest in loader_text
        assert report["filter"]["models"][0]["pinned"] is True and report["unpinned_models"] == []
        assert "UNPINNED" not in summary


# --------------------------------------------------------------------------- SAFET2I_REQUIRE_PINNED


def test_require_pinned_refuses_unpinned_and_says_how_to_pin(monkeypatch, models):
    monkeypatch.setenv(runtime.ENV_REQUIRE_PINNED, "1")
    with pytest.raises(ModelLoadError) as err:
        load_model(str(models.loose))
    msg = str(err.value)
    assert str(models.loose) in msg and runtime.ENV_REQUIRE_PINNED in msg
    assert f'"sha256": "{models.digest}"' in msg                  # the digest, computed for the operator
    assert load_model(str(models.pinned)).pinned is True           # pinned user models still load
    assert load_model("nudenet").pinned is True                    # and the built-ins


def test_require_pinned_applies_to_an_already_cached_model(monkeypatch, models):
    assert load_model(str(models.loose)).pinned is False
    monkeypatch.setenv(runtime.ENV_REQUIRE_PINNED, "yes")
    with pytest.raises(ModelLoadError, match="not pinned"):
        load_model(str(models.loose))
    with pytest.raises(ModelLoadError, match="not pinned"):
        SafetyFilter([str(models.loose)], get_policy("custom", {"bad": 0.7}), "fill")


@pytest.mark.parametrize("value,on", [("", False), ("0", False), ("off", False), ("FALSE", False),
                                      ("1", True), ("true", True), ("ture", True)])
def test_require_pinned_values_fail_closed(monkeypatch, value, on):
    monkeypatch.setenv(runtime.ENV_REQUIRE_PINNED, value)
    assert runtime.require_pinned() is on


def test_builtin_sidecars_are_all_pinned():
    files = sorted(det.BUILTIN_DIR.glob("*.json"))
    assert {f for f, _ in det.BUILTIN.values()} <= {f.name for f in files}
    for f in files:
        assert re.fullmatch(r"[0-9a-f]{64}", json.loads(f.read_text())["sha256"]), f


@pytest.mark.parametrize("bad", ["", "abc", 123, "g" * 64, ["x"]])
def test_malformed_pin_is_an_error_not_unpinned(tmp_path, bad):
    (tmp_path / "m.onnx").write_bytes(_onnx_bytes(W_A))
    with pytest.raises(ModelLoadError, match="64 hexadecimal"):
        det.ModelSpec.from_file(_sidecar(tmp_path, "m", bad))


def test_pin_in_upper_case_is_accepted(models):
    _sidecar(models.dir, "upper", models.digest.upper(), file="pinned.onnx")
    assert load_model(str(models.dir / "upper.json")).pinned is True
