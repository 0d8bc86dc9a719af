"""Operator enforcement core (issue 19): configuration, audit log, and the Enforcer with the real
NudeNet model from the installed wheel under ``face-only`` (a benign face stands for unsafe)."""

from __future__ import annotations

import json
import re
import shutil
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

from safet2i.enforce import (  # noqa: E402
    AuditLog, EnforceConfig, EnforcementBlocked, EnforcementError, Enforcer, config_from_env, config_from_toml,
    pixel_key,
)
from safet2i.filter import SafetyFilter, get_policy, load_model  # noqa: E402
from safet2i.filter.detectors import BUILTIN_DIR  # noqa: E402


# --------------------------------------------------------------------------- configuration

def test_env_unset_or_empty_is_off():
    assert config_from_env({}) is None
    assert config_from_env({"SAFET2I_ENFORCE": ""}) is None
    assert config_from_env({"SAFET2I_ENFORCE": "   ", "SAFET2I_ENFORCE_ACTION": "block"}) is None


def test_env_preset_defaults_to_blur():
    cfg = config_from_env({"SAFET2I_ENFORCE": "strict-5"})
    assert cfg == EnforceConfig(policy="strict-5", action="blur", source="preset strict-5 from SAFET2I_ENFORCE")
    assert cfg.models == ("nudenet",) and cfg.previews == "off" and cfg.audit_log is None


def test_env_preset_with_action():
    cfg = config_from_env({"SAFET2I_ENFORCE": "face-only", "SAFET2I_ENFORCE_ACTION": "pixelate"})
    assert (cfg.policy, cfg.action) == ("face-only", "pixelate")
    assert "SAFET2I_ENFORCE_ACTION" in cfg.source


def test_env_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("SAFET2I_ENFORCE", "broad-9")
    monkeypatch.setenv("SAFET2I_ENFORCE_ACTION", "fill")
    assert (config_from_env().policy, config_from_env().action) == ("broad-9", "fill")
    monkeypatch.delenv("SAFET2I_ENFORCE")
    assert config_from_env() is None


@pytest.mark.parametrize("env, needle", [
    ({"SAFET2I_ENFORCE": "strict5"}, "'strict5'"),
    ({"SAFET2I_ENFORCE": "1"}, "'1'"),
    ({"SAFET2I_ENFORCE": "strict-5", "SAFET2I_ENFORCE_ACTION": "pass"}, "'pass'"),
    ({"SAFET2I_ENFORCE": "strict-5", "SAFET2I_ENFORCE_ACTION": "blurr"}, "'blurr'"),
    ({"SAFET2I_ENFORCE": "/nowhere/enforce.toml"}, "/nowhere/enforce.toml"),
])
def test_env_errors_name_the_value(env, needle):
    with pytest.raises(EnforcementError) as e:
        config_from_env(env)
    assert needle in str(e.value)


FULL_TOML = """
policy = "broad-9"
action = "pixelate"
thresholds = "FEET_EXPOSED=0.4, BELLY_EXPOSED=0.5"
models = ["nudenet", "models/cost.json"]
providers = "cpu"
previews = "blur"
audit_log = "logs/audit.jsonl"
audit_max_bytes = 65536
audit_backups = 5
deny_nodes = ["SaveLatentAsImageInternally", "OtherWriter"]
"""


def test_toml_with_every_key(tmp_path):
    f = tmp_path / "enforce.toml"
    f.write_text(FULL_TOML)
    cfg = config_from_env({"SAFET2I_ENFORCE": str(f)})
    assert cfg == EnforceConfig(
        policy="broad-9", action="pixelate", thresholds="FEET_EXPOSED=0.4, BELLY_EXPOSED=0.5",
        models=("nudenet", str(tmp_path / "models/cost.json")), providers="cpu", previews="blur",
        audit_log=str(tmp_path / "logs/audit.jsonl"), audit_max_bytes=65536, audit_backups=5,
        deny_nodes=("SaveLatentAsImageInternally", "OtherWriter"), source=f"file {f}")


def test_toml_defaults_and_threshold_table(tmp_path):
    f = tmp_path / "e.toml"
    f.write_text('policy = "face-only"\n[thresholds]\nFACE_MALE = 0.3\n')
    cfg = config_from_toml(f)
    assert (cfg.action, cfg.models, cfg.previews, cfg.audit_log, cfg.deny_nodes) == ("blur", ("nudenet",), "off",
                                                                                      None, ())
    assert get_policy(cfg.policy, cfg.thresholds).thresholds == {"FACE_FEMALE": 0.5, "FACE_MALE": 0.3}


def test_toml_with_env_action_is_ambiguous(tmp_path):
    f = tmp_path / "e.toml"
    f.write_text('policy = "strict-5"\n')
    with pytest.raises(EnforcementError, match="ambiguous"):
        config_from_env({"SAFET2I_ENFORCE": str(f), "SAFET2I_ENFORCE_ACTION": "blur"})


@pytest.mark.parametrize("body, needle", [
    ('policy = "strict-5"\nacton = "blur"\n', "'acton'"),
    ('action = "blur"\n', "'policy' is required"),
    ('policy = "strict5"\n', "'strict5'"),
    ('policy = "custom"\n', "custom"),
    ('policy = "strict-5"\naction = "pass"\n', "'pass'"),
    ('policy = "strict-5"\naction = "smudge"\n', "'smudge'"),
    ('policy = "strict-5"\naction = 3\n', "action must be a string"),
    ('policy = "strict-5"\nthresholds = "FEET_EXPOSED"\n', "FEET_EXPOSED"),
    ('policy = "strict-5"\nthresholds = "FEET_EXPOSED=1.5"\n', "FEET_EXPOSED"),
    ('policy = "strict-5"\nthresholds = {FEET_EXPOSED = true}\n', "FEET_EXPOSED"),
    ('policy = "strict-5"\nthresholds = 0.5\n', "thresholds must be"),
    ('policy = "strict-5"\nmodels = []\n', "models must be"),
    ('policy = "strict-5"\nmodels = [1]\n', "models must be"),
    ('policy = "strict-5"\nmodels = ["nudenett"]\n', "'nudenett'"),
    ('policy = "strict-5"\nproviders = ""\n', "providers"),
    ('policy = "strict-5"\npreviews = "on"\n', "'on'"),
    ('policy = "strict-5"\naudit_log = ""\n', "audit_log"),
    ('policy = "strict-5"\naudit_max_bytes = 10\n', "audit_max_bytes"),
    ('policy = "strict-5"\naudit_max_bytes = true\n', "audit_max_bytes"),
    ('policy = "strict-5"\naudit_max_bytes = "10MB"\n', "audit_max_bytes"),
    ('policy = "strict-5"\naudit_backups = 0\n', "audit_backups"),
    ('policy = "strict-5"\ndeny_nodes = [""]\n', "deny_nodes"),
    ('policy = "strict-5"\ndeny_nodes = 5\n', "deny_nodes"),
    ('policy = "strict-5\n', "not valid TOML"),
])
def test_toml_errors_name_the_key_or_value(tmp_path, body, needle):
    f = tmp_path / "bad.toml"
    f.write_text(body)
    with pytest.raises(EnforcementError) as e:
        config_from_env({"SAFET2I_ENFORCE": str(f)})
    assert needle in str(e.value) and str(f) in str(e.value)


def test_unreadable_toml_names_the_file(tmp_path):
    d = tmp_path / "dir.toml"
    d.mkdir()
    with pytest.raises(EnforcementError, match=re.escape(str(d))):
        config_from_env({"SAFET2I_ENFORCE": str(d)})
    with pytest.raises(EnforcementError, match="cannot read"):
        config_from_toml(tmp_path / "missing.toml")
    (tmp_path / "bin.toml").write_bytes(b"policy = \"\xff\"\n")
    with pytest.raises(EnforcementError, match="bin.toml"):
        config_from_toml(tmp_path / "bin.toml")


def test_config_validated_when_built_directly():
    with pytest.raises(EnforcementError, match="'pass'"):
        Enforcer(EnforceConfig(policy="strict-5", action="pass"))
    with pytest.raises(EnforcementError, match="'nope'"):
        Enforcer(EnforceConfig(policy="nope"))


# --------------------------------------------------------------------------- audit log

def _lines(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_audit_record_fields_and_no_image_data(tmp_path):
    log = AuditLog(tmp_path / "a.jsonl", 1 << 20, 2)
    log.write({"prompt_id": "p1", "node": "SaveImage", "node_id": "9", "verdict": "safe", "cost": 0.1,
               "labels": [], "action": "blur", "images": [{"index": 0, "verdict": "safe"}]})
    (rec,) = _lines(tmp_path / "a.jsonl")
    assert rec["prompt_id"] == "p1" and rec["node"] == "SaveImage" and rec["images"][0]["verdict"] == "safe"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", rec["time"])
    for bad in (np.zeros((2, 2, 3)), torch.zeros(2, 2), b"\x89PNG"):
        with pytest.raises(EnforcementError, match="no image data"):
            log.write({"node": "x", "images": [{"pixels": bad}]})
    assert len(_lines(tmp_path / "a.jsonl")) == 1          # refused records write nothing
    log.write({"reason": "x" * 100_000})
    assert len(_lines(tmp_path / "a.jsonl")[-1]["reason"]) <= 1001


def test_audit_rotation_keeps_n_backups(tmp_path):
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, 300, 2)
    for i in range(40):
        log.write({"seq": i, "pad": "y" * 40})
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["a.jsonl", "a.jsonl.1", "a.jsonl.2"]
    seqs = [r["seq"] for name in ("a.jsonl.2", "a.jsonl.1", "a.jsonl") for r in _lines(tmp_path / name)]
    assert seqs == list(range(seqs[0], 40)) and seqs[0] > 0        # newest kept, in order, none torn
    assert all((tmp_path / f).stat().st_size <= 300 for f in files)


def test_audit_concurrent_writes_are_whole_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, 1 << 24, 1)

    def worker(t):
        for i in range(200):
            log.write({"thread": t, "i": i, "labels": ["FACE_FEMALE"] * (i % 7)})

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    recs = _lines(path)
    assert sorted((r["thread"], r["i"]) for r in recs) == [(t, i) for t in range(8) for i in range(200)]


def test_audit_concurrent_writes_with_rotation(tmp_path):
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, 2000, 3)
    threads = [threading.Thread(target=lambda t=t: [log.write({"t": t, "i": i}) for i in range(100)])
               for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "a.jsonl.1", "a.jsonl.2", "a.jsonl.3"]
    last = [r for name in ("a.jsonl.3", "a.jsonl.2", "a.jsonl.1", "a.jsonl") for r in _lines(tmp_path / name)]
    assert last and all(set(r) == {"t", "i", "time"} for r in last)
    for t in range(6):           # only the oldest are dropped: what is kept of a thread is its newest, in order
        mine = [r["i"] for r in last if r["t"] == t]
        assert mine == list(range(100 - len(mine), 100))
    assert len(last) >= 4 * 2000 // 80
    assert all((tmp_path / n).stat().st_size <= 2000 for n in ("a.jsonl", "a.jsonl.1", "a.jsonl.2", "a.jsonl.3"))


def test_audit_log_folder_missing_fails_at_load(tmp_path):
    cfg = EnforceConfig(policy="face-only", audit_log=str(tmp_path / "no" / "a.jsonl"))
    enf = Enforcer(cfg, filter_factory=lambda c: pytest.fail("not reached"))
    with pytest.raises(EnforcementError, match="does not exist"):
        enf.load()


# --------------------------------------------------------------------------- the Enforcer, real models

def _face(size=128) -> np.ndarray:
    import skimage.data

    return cv2.resize(skimage.data.astronaut(), (size, size), interpolation=cv2.INTER_AREA)


def _noface(size=128) -> np.ndarray:
    import skimage.data

    return cv2.resize(skimage.data.coffee(), (size, size), interpolation=cv2.INTER_AREA)


def _batch(*imgs) -> torch.Tensor:
    return torch.from_numpy(np.stack(imgs).astype(np.float32) / 255.0)


class Spy:
    """The real filter, counting the images each ``run`` gets."""

    def __init__(self):
        self.calls: list[int] = []
        self.built = 0

    def factory(self, cfg):
        self.built += 1
        real = SafetyFilter(list(cfg.models), get_policy(cfg.policy, cfg.thresholds), cfg.action, providers="cpu")
        spy = self

        class Wrapped:
            def run(self, images):
                spy.calls.append(len(images))
                return real.run(images)

        return Wrapped()


def _enforcer(tmp_path, action="blur", **kw):
    spy = Spy()
    cfg = EnforceConfig(policy="face-only", action=action, providers="cpu", audit_log=str(tmp_path / "audit.jsonl"))
    enf = Enforcer(cfg, filter_factory=spy.factory, **kw)
    enf.load()
    return enf, spy


def _face_found(t: torch.Tensor) -> bool:
    u8 = np.clip(np.rint(t.numpy() * 255), 0, 255).astype(np.uint8)
    return any(d.label.startswith("FACE") and d.score >= 0.5 for d in load_model("nudenet").detect([u8])[0])


def test_face_censored_noface_unchanged_input_untouched(tmp_path):
    enf, spy = _enforcer(tmp_path)
    images = _batch(_face(), _noface())
    before = images.clone()
    out = enf.enforce(images, node="SaveImage", node_id="9", prompt_id="p-1")
    assert out is not images and out.shape == images.shape and out.dtype == images.dtype
    assert torch.equal(images, before)                              # input never written
    assert _face_found(images[0]) and not _face_found(out[0])       # the face is censored
    assert not torch.equal(out[0], images[0])
    assert torch.equal(out[1], images[1])                           # the safe image is bit-identical
    (rec,) = _lines(tmp_path / "audit.jsonl")
    assert (rec["prompt_id"], rec["node"], rec["node_id"], rec["verdict"], rec["action"]) == \
        ("p-1", "SaveImage", "9", "censored", "blur")
    assert "FACE_FEMALE" in rec["labels"] and rec["cost"] >= 0.5
    assert [i["verdict"] for i in rec["images"]] == ["censored", "safe"]
    assert len((tmp_path / "audit.jsonl").read_bytes()) < 2000      # verdicts only, no pixels

    safe = _batch(_noface())
    assert enf.enforce(safe, node="PreviewImage", node_id="3") is safe   # same object, nothing censored
    assert _lines(tmp_path / "audit.jsonl")[-1]["verdict"] == "safe"
    assert spy.built == 1                                           # loaded once


def test_block_raises_without_image_data(tmp_path):
    enf, _ = _enforcer(tmp_path, action="block")
    images = _batch(_noface(), _face())
    with pytest.raises(EnforcementBlocked) as e:
        enf.enforce(images, node="SaveImage", node_id="12", prompt_id="p-2")
    msg = str(e.value)
    assert "SaveImage" in msg and "12" in msg and "FACE_FEMALE" in msg and "[1]" in msg
    assert len(msg) < 400 and not re.search(r"[A-Za-z0-9+/=]{64,}", msg)
    assert e.value.indices == [1] and e.value.labels == ["FACE_FEMALE"]
    rec = _lines(tmp_path / "audit.jsonl")[-1]
    assert rec["verdict"] == "blocked" and rec["labels"] == ["FACE_FEMALE"] and rec["prompt_id"] == "p-2"
    # A safe batch still passes under block.
    ok = _batch(_noface())
    assert enf.enforce(ok, node="SaveImage", node_id="12") is ok


def test_missing_model_fails_at_load_and_refuses(tmp_path):
    side = json.loads((BUILTIN_DIR / "nudenet-320n.json").read_text())
    side["model"] = {"file": "320n.onnx"}        # next to the sidecar, where it is not
    (tmp_path / "nn.json").write_text(json.dumps(side))
    cfg = EnforceConfig(policy="face-only", models=(str(tmp_path / "nn.json"),), providers="cpu")
    enf = Enforcer(cfg)
    with pytest.raises(EnforcementError, match="320n.onnx") as e:
        enf.load()
    assert "cannot load" in str(e.value)
    with pytest.raises(EnforcementError, match="320n.onnx"):
        enf.enforce(_batch(_noface()), node="SaveImage", node_id="1")


def test_policy_label_not_in_models_fails_at_load(tmp_path):
    enf = Enforcer(EnforceConfig(policy="face-only", thresholds="FACE_FEMAL=0.5", providers="cpu"))
    with pytest.raises(EnforcementError, match="FACE_FEMAL"):
        enf.load()


def test_error_inside_fails_closed_and_is_audited(tmp_path):
    class Broken:
        def run(self, images):
            raise RuntimeError("onnx session died")

    cfg = EnforceConfig(policy="face-only", audit_log=str(tmp_path / "a.jsonl"))
    enf = Enforcer(cfg, filter_factory=lambda c: Broken())
    with pytest.raises(EnforcementError, match="onnx session died") as e:
        enf.enforce(_batch(_noface()), node="SaveImage", node_id="4")
    assert "SaveImage" in str(e.value)
    assert _lines(tmp_path / "a.jsonl")[-1]["verdict"] == "error"


def test_bad_inputs_refused(tmp_path):
    enf, _ = _enforcer(tmp_path)
    face = _batch(_face())
    with pytest.raises(EnforcementError, match="uint8"):
        enf.enforce((face * 255).to(torch.uint8), node="SaveImage", node_id="1")
    with pytest.raises(EnforcementError, match="channels"):
        enf.enforce(face[..., :2], node="SaveImage", node_id="1")
    with pytest.raises(EnforcementError, match=r"\[B, H, W, C\]"):
        enf.enforce(face[0], node="SaveImage", node_id="1")
    nan = face.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(EnforcementError, match="NaN"):
        enf.enforce(nan, node="SaveImage", node_id="1")
    empty = face[:0]
    assert enf.enforce(empty, node="SaveImage", node_id="1") is empty


def test_one_and_four_channels_and_half_precision(tmp_path):
    enf, _ = _enforcer(tmp_path)
    face = _batch(_face())
    alpha = torch.linspace(0, 1, 128 * 128).reshape(1, 128, 128, 1)
    rgba = torch.cat([face, alpha], dim=3)
    out = enf.enforce(rgba, node="SaveImage", node_id="1")
    assert out.shape == rgba.shape and torch.equal(out[..., 3:], alpha)
    assert not _face_found(out[0, ..., :3])
    gray = face.mean(dim=3, keepdim=True)
    out = enf.enforce(gray, node="SaveImage", node_id="1")
    assert out.shape == gray.shape and not torch.equal(out, gray)
    assert not _face_found(out[0].expand(-1, -1, 3))
    half = face.half()
    out = enf.enforce(half, node="SaveImage", node_id="1")
    assert out.dtype == torch.float16 and not _face_found(out[0].float())


def test_was_checked_reuse_skips_the_models(tmp_path):
    enf, spy = _enforcer(tmp_path)
    censored = enf.enforce(_batch(_face(), _noface()), node="SafeT2IImageFilter", node_id="5")
    assert spy.calls == [2] and not enf.was_checked(censored)
    enf.mark_checked(censored)
    assert enf.was_checked(censored) and enf.was_checked(censored[1:])
    assert enf.enforce(censored, node="SaveImage", node_id="6", prompt_id="p") is censored
    assert spy.calls == [2]                                        # models not run again
    rec = _lines(tmp_path / "audit.jsonl")[-1]
    assert rec["verdict"] == "reused" and [i["verdict"] for i in rec["images"]] == ["reused", "reused"]

    # Different pixels (one value moved by one step, and the raw face) are checked again.
    other = censored.clone()
    other[0, 5, 5, 0] += 1 / 255
    assert not enf.was_checked(other)
    raw = _batch(_face(), _noface())
    mixed = torch.stack([raw[0], censored[1]])
    out = enf.enforce(mixed, node="SaveImage", node_id="6")
    assert spy.calls == [2, 1]                                     # only the unchecked image ran
    assert not _face_found(out[0]) and torch.equal(out[1], censored[1])
    assert [i["verdict"] for i in _lines(tmp_path / "audit.jsonl")[-1]["images"]] == ["censored", "reused"]


def test_reuse_key_needs_same_dtype_and_shape(tmp_path):
    enf, _ = _enforcer(tmp_path)
    img = _batch(_noface(64))
    enf.mark_checked(img)
    same_bytes_other_shape = img.reshape(1, 32, 128, 3)
    assert torch.equal(same_bytes_other_shape.reshape(-1), img.reshape(-1))
    assert not enf.was_checked(same_bytes_other_shape)
    assert pixel_key(img[0])[:3] != pixel_key(img[0].view(torch.int32))[:3]
    assert not enf.was_checked(img.view(torch.int32))


def test_checked_cache_is_bounded_lru(tmp_path):
    enf, _ = _enforcer(tmp_path, checked_capacity=2)
    a, b, c = (_batch(_noface(32)) * s for s in (0.5, 0.6, 0.7))
    enf.mark_checked(a)
    enf.mark_checked(b)
    assert enf.was_checked(a)          # a is now the most recent
    enf.mark_checked(c)
    assert enf.was_checked(a) and enf.was_checked(c) and not enf.was_checked(b)
    assert len(enf._checked) == 2


def test_mark_checked_under_weaker_policy_is_not_remembered(tmp_path):
    enf, _ = _enforcer(tmp_path)
    img = _batch(_noface(32))
    enf.mark_checked(img, policy="strict-5")           # does not flag faces: weaker than face-only
    assert not enf.was_checked(img)
    enf.mark_checked(img, policy="face-only", action="pass")
    assert not enf.was_checked(img)
    enf.mark_checked(img, policy="face-only", action="pixelate")
    assert enf.was_checked(img)


def test_huge_batch_in_chunks(tmp_path):
    enf, spy = _enforcer(tmp_path, chunk_images=4)
    frames = [_noface(64)] * 9 + [_face(64)]
    images = _batch(*frames)
    out = enf.enforce(images, node="SaveAnimatedWEBP", node_id="2")
    assert spy.calls == [4, 4, 2]
    assert torch.equal(out[:9], images[:9]) and not torch.equal(out[9], images[9])
    assert [i["index"] for i in _lines(tmp_path / "audit.jsonl")[-1]["images"]] == list(range(10))
    enf.chunk_pixels = 64 * 64 * 3                     # the pixel budget limits chunks too
    enf.enforce(images, node="SaveAnimatedWEBP", node_id="2")
    assert spy.calls[3:] == [3, 3, 3, 1]


def test_override_keeps_only_stricter_requests(tmp_path):
    enf, _ = _enforcer(tmp_path)                             # face-only, blur
    assert enf.override("face-only", "block") == ("face-only", "block", False)
    assert enf.override("face-only", "pixelate") == ("face-only", "pixelate", False)
    assert enf.override("strict-5", "blur") == ("face-only", "blur", True)
    assert enf.override("face-only", "pass") == ("face-only", "blur", True)
    assert enf.override("face-only", "blur", "FACE_FEMALE=0.9") == ("face-only", "blur", True)
    assert enf.override("face-only", "blur", "FACE_FEMALE=0.3") == ("face-only", "blur", False)
    assert enf.override("custom", "blur") == ("face-only", "blur", True)          # unreadable: operator's
    assert enf.override(get_policy("face-only", expand=0.0), "blur")[2] is True
    strict = Enforcer(EnforceConfig(policy="strict-5", action="placeholder"))
    assert strict.override("broad-9", "black") == ("broad-9", "black", False)
    assert strict.override("broad-9", "fill") == ("broad-9", "placeholder", True)


def test_describe_line(tmp_path):
    enf, _ = _enforcer(tmp_path)
    line = enf.describe()
    assert "\n" not in line and "enforcement ON" in line
    for part in ("face-only", "blur", "nudenet", "previews off", str(tmp_path / "audit.jsonl")):
        assert part in line
    assert "no audit log" in Enforcer(EnforceConfig(policy="strict-5")).describe()


def test_copied_sidecar_with_model_loads(tmp_path):
    """The missing-model test's sidecar does load once its file is there (the failure above is
    the missing file, not the copy)."""
    import nudenet

    side = json.loads((BUILTIN_DIR / "nudenet-320n.json").read_text())
    side["model"] = {"file": "320n.onnx"}
    (tmp_path / "nn.json").write_text(json.dumps(side))
    shutil.copy(next(iter(nudenet.__path__)) + "/320n.onnx", tmp_path / "320n.onnx")
    enf = Enforcer(EnforceConfig(policy="face-only", models=(str(tmp_path / "nn.json"),), providers="cpu"))
    enf.load()
    assert not torch.equal(enf.enforce(_batch(_face()), node="SaveImage", node_id="1"), _batch(_face()))


def test_censor_preview_hides_the_face():
    from PIL import Image

    from safet2i.enforce import censor_preview

    face = _face(512)
    pil = censor_preview(Image.fromarray(face))
    assert pil.size == (512, 512)
    arr = censor_preview(face)
    assert arr.shape == (512, 512, 3) and np.array_equal(arr, np.asarray(pil))
    assert any(d.label == "FACE_FEMALE" and d.score >= 0.5 for d in load_model("nudenet").detect([face])[0])
    assert not [d for d in load_model("nudenet").detect([arr])[0] if d.label.startswith("FACE") and d.score >= 0.3]
    # At most 8 x 8 distinct cells of information (a mosaic): a down-and-up resize reproduces it.
    again = np.asarray(Image.fromarray(arr).resize((8, 8), Image.Resampling.BOX).resize((512, 512),
                                                                                        Image.Resampling.NEAREST))
    assert np.abs(again.astype(int) - arr.astype(int)).mean() < 8


def test_out_of_range_pixels_leave_as_judged(tmp_path):
    """Values outside [0, 1] (x1000, negated) are judged clipped by the filter; the pixels that
    leave are those clipped pixels, never the unclipped values a rescaling saver would show."""
    seen = []

    class Recording:
        def __init__(self, cfg):
            self.real = SafetyFilter(list(cfg.models), get_policy(cfg.policy), cfg.action, providers="cpu")

        def run(self, images):
            seen.append(np.array(images, copy=True))
            return self.real.run(images)

    cfg = EnforceConfig(policy="face-only", action="blur", providers="cpu", audit_log=str(tmp_path / "a.jsonl"))
    enf = Enforcer(cfg, filter_factory=Recording)
    enf.load()
    base = _batch(_face(), _noface())
    wild = torch.cat([base[:1] * 1000.0, -base[1:]])
    before = wild.clone()
    out = enf.enforce(wild, node="SaveImage", node_id="1")
    assert torch.equal(wild, before) and out is not wild
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    np.testing.assert_array_equal(seen[-1], wild.clamp(0, 1).numpy())     # what was judged
    assert torch.equal(out, wild.clamp(0, 1))                              # is what leaves (nothing flagged)
    inside = _batch(_noface())
    assert enf.enforce(inside, node="SaveImage", node_id="2") is inside    # in range: the same object


def test_the_filter_node_mark_needs_the_same_models_by_content(tmp_path):
    """A sidecar can call itself ``nudenet``: the enforcer trusts another node's verdict only for
    models identical to its own in content (file sha256, labels, layout, thresholds, mode)."""
    enf = Enforcer(EnforceConfig(policy="face-only", providers="cpu"))
    enf.load()
    own = load_model("nudenet", providers="cpu")
    assert enf.uses_models([own])
    side = json.loads((BUILTIN_DIR / "nudenet-320n.json").read_text())
    import nudenet

    shutil.copy(next(iter(nudenet.__path__)) + "/320n.onnx", tmp_path / "320n.onnx")
    side["model"] = {"file": "320n.onnx"}
    side["name"] = "nudenet"
    (tmp_path / "same.json").write_text(json.dumps(side))
    assert enf.uses_models([load_model(str(tmp_path / "same.json"), providers="cpu")])   # same content: trusted
    side["thresholds"] = {k: 0.99 for k in side.get("labels", [])} or {"FACE_FEMALE": 0.99}
    (tmp_path / "weak.json").write_text(json.dumps(side))
    weak = load_model(str(tmp_path / "weak.json"), providers="cpu")
    assert weak.name == own.name == "nudenet" and not enf.uses_models([weak])
    assert not Enforcer(EnforceConfig(policy="face-only", providers="cpu")).uses_models([own])   # not loaded


def test_non_finite_pixels_are_refused_not_clipped(tmp_path):
    enf, _ = _enforcer(tmp_path)
    for bad in (float("inf"), float("nan")):
        img = _batch(_noface())
        img[0, 0, 0, 0] = bad
        with pytest.raises(EnforcementError):
            enf.enforce(img, node="SaveImage", node_id="1")
