"""``safet2i filter`` end to end on real files: outputs, reports, odd and broken inputs.

"Unsafe" here is the face-only policy on benign pictures of people: no NSFW material.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from safet2i.cli import main

FACE = (173, 82, 100, 97)


def sha(p) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


@pytest.fixture
def folder(tmp_path, benign_set):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(benign_set["astronaut"]).save(src / "astronaut.png")
    Image.fromarray(benign_set["chelsea"]).save(src / "chelsea.png")
    return src


def run(*args) -> int:
    return main([str(a) for a in args])


def report(path) -> dict:
    return json.loads(Path(path).read_text())


def by_name(rep) -> dict:
    return {Path(f["path"]).name: f for f in rep["files"]}


def test_face_only_blur_writes_censored_and_copied_outputs(tmp_path, folder):
    hashes = {p.name: sha(p) for p in folder.iterdir()}
    code = run("filter", folder, "--out", tmp_path / "out", "--policy", "face-only", "--action", "blur",
               "--report", tmp_path / "r.json", "--quiet")
    assert code == 1
    assert {p.name: sha(p) for p in folder.iterdir()} == hashes           # originals untouched
    assert sha(tmp_path / "out" / "chelsea.png") == hashes["chelsea.png"]  # safe: byte copy
    out = np.asarray(Image.open(tmp_path / "out" / "astronaut.png")).astype(int)
    orig = np.asarray(Image.open(folder / "astronaut.png")).astype(int)
    diff = np.abs(out - orig).max(axis=2)
    x, y, w, h = FACE
    assert diff[y + 10:y + h - 10, x + 10:x + w - 10].mean() > 10           # face blurred
    far = np.ones_like(diff, bool)
    far[max(0, y - 60):y + h + 60, max(0, x - 60):x + w + 60] = False
    assert diff[far].max() == 0                                            # elsewhere identical
    rep = report(tmp_path / "r.json")
    assert rep["summary"] == {"files": 2, "images": 2, "safe": 1, "unsafe": 1, "errors": 0}
    files = by_name(rep)
    assert files["astronaut.png"]["verdict"] == "unsafe" and files["astronaut.png"]["cost"] > 0.5
    assert files["chelsea.png"]["verdict"] == "safe" and files["chelsea.png"]["cost"] < 0.5
    (face,) = [d for d in files["astronaut.png"]["images"][0]["detections"] if d["flagged"]]
    assert face["label"] == "FACE_FEMALE"
    assert all(abs(a - b) <= 4 for a, b in zip(face["box"], FACE))


def test_default_policy_leaves_benign_pictures_alone(tmp_path, folder):
    assert run("filter", folder, "--out", tmp_path / "out", "--quiet") == 0
    for p in folder.iterdir():
        assert sha(tmp_path / "out" / p.name) == sha(p)


def test_block_writes_nothing_for_the_unsafe_file(tmp_path, folder):
    code = run("filter", folder, "--out", tmp_path / "out", "--policy", "face-only", "--action", "block",
               "--report", tmp_path / "r.json", "--quiet")
    assert code == 1
    assert not (tmp_path / "out" / "astronaut.png").exists()
    assert (tmp_path / "out" / "chelsea.png").exists()
    assert by_name(report(tmp_path / "r.json"))["astronaut.png"]["verdict"] == "blocked"


def test_html_report_embeds_only_filtered_thumbnails(tmp_path, folder):
    html = tmp_path / "r.html"
    assert run("filter", folder, "--out", tmp_path / "out", "--policy", "face-only", "--action", "black",
               "--html", html, "--quiet") == 1
    text = html.read_text()
    uris = [u.split('"')[0] for u in text.split('src="data:image/jpeg;base64,')[1:]]
    assert len(uris) == 2
    thumbs = [np.asarray(Image.open(io.BytesIO(base64.b64decode(u)))) for u in uris]
    means = sorted(t.mean() for t in thumbs)
    assert means[0] < 3 < 50 < means[1]  # the astronaut thumbnail is the blacked-out output
    assert "FACE_FEMALE" in text and "unsafe" in text


def _save_odd(tmp_path, benign_set) -> dict[str, Path]:
    d = tmp_path / "odd"
    d.mkdir()
    ast, cat = benign_set["astronaut"], benign_set["chelsea"]
    files = {}
    files["grey"] = d / "grey.png"
    Image.fromarray(benign_set["camera"][:, :, 0]).save(files["grey"])
    rgba = np.dstack([ast, np.full(ast.shape[:2], 128, np.uint8)])
    files["rgba"] = d / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(files["rgba"])
    files["16bit"] = d / "sixteen.png"
    Image.fromarray(benign_set["camera"][:, :, 0].astype(np.uint16) * 257).save(files["16bit"])
    files["cmyk"] = d / "cmyk.jpg"
    Image.fromarray(ast).convert("CMYK").save(files["cmyk"])
    files["animated"] = d / "anim.gif"
    frames = [Image.fromarray(np.asarray(Image.fromarray(x).resize((512, 512)))) for x in (cat, ast, cat)]
    frames[0].save(files["animated"], save_all=True, append_images=frames[1:], duration=80, loop=0)
    files["truncated"] = d / "truncated.png"
    good = io.BytesIO()
    Image.fromarray(ast).save(good, format="PNG")
    files["truncated"].write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    files["tiny"] = d / "tiny.png"
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(files["tiny"])
    files["notimage"] = d / "notimage.png"
    files["notimage"].write_text("this is a text file, not a picture")
    return files


def test_odd_and_broken_images_do_not_stop_the_batch(tmp_path, benign_set):
    files = _save_odd(tmp_path, benign_set)
    code = run("filter", tmp_path / "odd", "--out", tmp_path / "out", "--policy", "face-only",
               "--action", "pixelate", "--report", tmp_path / "r.json", "--quiet")
    assert code == 3  # something unsafe (faces) and something unreadable
    files_rep = by_name(report(tmp_path / "r.json"))
    assert files_rep["truncated.png"]["verdict"] == "error"
    assert "truncated or corrupt" in files_rep["truncated.png"]["error"]
    assert files_rep["notimage.png"]["verdict"] == "error"
    assert "not an image" in files_rep["notimage.png"]["error"]
    assert files_rep["tiny.png"]["verdict"] == "safe"
    assert files_rep["rgba.png"]["verdict"] == "unsafe"        # colour under alpha is checked
    assert files_rep["cmyk.jpg"]["verdict"] == "unsafe"
    assert files_rep["grey.png"]["verdict"] == "unsafe"        # camera man's face, FACE_MALE
    assert files_rep["sixteen.png"]["verdict"] == "unsafe"     # 16-bit scaled, not clipped white
    anim = files_rep["anim.gif"]
    assert anim["verdict"] == "unsafe" and len(anim["images"]) == 3
    assert [im["verdict"] for im in anim["images"]] == ["safe", "unsafe", "safe"]  # every frame checked
    with Image.open(tmp_path / "out" / "anim.gif") as g:
        assert g.n_frames == 3
    for name in ("truncated.png", "notimage.png"):
        assert not (tmp_path / "out" / name).exists()


@pytest.mark.slow
def test_huge_image_is_processed(tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    Image.new("RGB", (10000, 10000)).save(big / "huge.png")
    assert run("filter", big, "--out", tmp_path / "out", "--report", tmp_path / "r.json", "--quiet") == 0
    assert by_name(report(tmp_path / "r.json"))["huge.png"]["verdict"] == "safe"


def test_never_overwrites(tmp_path, folder):
    out = tmp_path / "out"
    assert run("filter", folder, "--out", out, "--policy", "face-only", "--quiet") == 1
    before = {p.name: sha(p) for p in out.iterdir()}
    code = run("filter", folder, "--out", out, "--policy", "face-only", "--action", "black",
               "--report", tmp_path / "r.json", "--quiet")
    assert code & 2
    assert all("--overwrite" in f["error"] for f in report(tmp_path / "r.json")["files"])
    assert {p.name: sha(p) for p in out.iterdir()} == before
    assert run("filter", folder, "--out", out, "--policy", "face-only", "--action", "black",
               "--overwrite", "--quiet") == 1
    assert np.asarray(Image.open(out / "astronaut.png")).max() == 0


def test_out_inside_the_input_folder_never_replaces_originals(tmp_path, folder):
    hashes = {p.name: sha(p) for p in folder.iterdir()}
    run("filter", folder, "--out", folder, "--policy", "face-only", "--overwrite", "--quiet")
    assert {p.name: sha(p) for p in folder.iterdir() if p.is_file()} == hashes


def test_missing_or_corrupt_model_is_fatal_and_writes_nothing(tmp_path, folder, capsys):
    out = tmp_path / "out"
    assert run("filter", folder, "--out", out, "--model", "/nonexistent/x.json", "--quiet") == 4
    assert "Unknown filter model" in capsys.readouterr().err
    sidecar = json.loads((Path(__file__).resolve().parents[2] / "safet2i/data/filters/nudenet-320n.json").read_text())
    sidecar["model"] = {"file": "bad.onnx"}
    sidecar.pop("sha256")
    (tmp_path / "bad.json").write_text(json.dumps(sidecar))
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage" * 100)
    assert run("filter", folder, "--out", out, "--model", tmp_path / "bad.json", "--quiet") == 4
    assert "bad.onnx" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["filter", "x.png"])
    assert e.value.code == 64


def test_samples_and_models(tmp_path, capsys):
    assert main(["samples", str(tmp_path / "s")]) == 0
    assert {"astronaut.png", "camera.png", "coffee.png"} <= {p.name for p in (tmp_path / "s").iterdir()}
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "nudenet" in out and "installed" in out and "opennsfw" in out


def test_files_named_directly_and_nested_folders(tmp_path, folder):
    nested = folder / "sub"
    nested.mkdir()
    shutil.copy(folder / "chelsea.png", nested / "cat.png")
    assert run("filter", folder / "astronaut.png", nested, "--out", tmp_path / "o", "--quiet") == 0
    assert (tmp_path / "o" / "astronaut.png").exists() and (tmp_path / "o" / "cat.png").exists()
