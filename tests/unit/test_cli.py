"""``safet2i filter`` end to end on real files: outputs, reports, odd and broken inputs.

"Unsafe" here is the ``face-only`` policy on benign pictures of people (scikit-image's
astronaut has FACE_FEMALE ~0.81 at x,y,w,h = 173,82,100,97); the cat ``chelsea`` has no
detection at all. No NSFW material is created or used.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from safet2i.cli import main
from safet2i.filter.report import thumbnail_data_uri

from filter_cli_kit import folder  # noqa: F401  (fixture: astronaut + cat)

FACE = (173, 82, 100, 97)  # x, y, w, h of the astronaut's face
SIDECAR = Path(__file__).resolve().parents[2] / "safet2i" / "data" / "filters" / "nudenet-320n.json"


# --------------------------------------------------------------------------- helpers


def sha(p) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def run(*args) -> int:
    return main([str(a) for a in args])


def report(path) -> dict:
    return json.loads(Path(path).read_text())


def by_name(rep) -> dict:
    return {Path(f["path"]).name: f for f in rep["files"]}


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def face_changed(out_path, original: np.ndarray, margin: int = 15) -> None:
    """The censored output differs from ``original`` substantially inside the face box and
    not at all further than ``margin`` pixels from it."""
    diff = np.abs(pixels(out_path) - original.astype(np.int16)).max(axis=2)
    x, y, w, h = FACE
    assert diff[y + 10:y + h - 10, x + 10:x + w - 10].mean() > 10, "face not censored"
    far = np.ones_like(diff, bool)
    far[max(0, y - margin):y + h + margin, max(0, x - margin):x + w + margin] = False
    assert diff[far].max() == 0, "pixels far from the face were changed"


def html_rows(text: str) -> dict[str, str | None]:
    """HTML report -> {file name: thumbnail data URI or None}."""
    rows = re.findall(r"<tr><td>(.*?)</td><td><code>(.*?)</code>", text)
    out = {}
    for cell, path in rows:
        m = re.search(r'src="(data:image/jpeg;base64,[A-Za-z0-9+/=]+)"', cell)
        out[Path(path).name] = m.group(1) if m else None
    return out


def decode_uri(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        assert im.format == "JPEG"
        return np.asarray(im.convert("RGB")).astype(np.int16)


@pytest.fixture
def ast(benign_set) -> np.ndarray:
    return benign_set["astronaut"]




# --------------------------------------------------------------------------- main paths


def test_face_only_blur_censors_face_copies_safe_and_reports(tmp_path, folder, ast):
    before = hashes(folder)
    out = tmp_path / "out"
    code = run("filter", folder, "--out", out, "--policy", "face-only", "--action", "blur",
               "--report", tmp_path / "r.json", "--quiet")
    assert code == 1
    assert hashes(folder) == before                                        # originals untouched
    assert sorted(p.name for p in out.iterdir()) == ["astronaut.png", "chelsea.png"]  # no .partial left
    assert sha(out / "chelsea.png") == before["chelsea.png"]               # safe: byte copy
    assert sha(out / "astronaut.png") != before["astronaut.png"]
    face_changed(out / "astronaut.png", ast)

    rep = report(tmp_path / "r.json")
    assert rep["summary"] == {"files": 2, "images": 2, "safe": 1, "unsafe": 1, "errors": 0, "skipped": 0}
    assert rep["filter"]["action"] == "blur" and rep["filter"]["policy"]["name"] == "face-only"
    assert rep["filter"]["models"][0]["name"] == "nudenet"
    files = by_name(rep)
    a, c = files["astronaut.png"], files["chelsea.png"]
    assert a["verdict"] == "unsafe" and a["cost"] > 0.5 and a["error"] is None
    assert Path(a["output"]) == (out / "astronaut.png").resolve()
    assert c["verdict"] == "safe" and c["cost"] < 0.5 and c["images"][0]["detections"] == []
    assert Path(c["output"]) == (out / "chelsea.png").resolve()
    (face,) = [d for d in a["images"][0]["detections"] if d["flagged"]]
    assert face["label"] == "FACE_FEMALE" and face["threshold"] == 0.5 and face["score"] > 0.7
    assert all(abs(v - e) <= 4 for v, e in zip(face["box"], FACE)), face["box"]
    assert a["images"][0]["width"] == 512 and a["images"][0]["height"] == 512


@pytest.mark.parametrize("action", ["pixelate", "fill"])
def test_other_region_actions_only_touch_the_face(tmp_path, folder, ast, action):
    out = tmp_path / "out"
    assert run("filter", folder, "--out", out, "--policy", "face-only", "--action", action, "--quiet") == 1
    face_changed(out / "astronaut.png", ast)


def test_default_policy_leaves_benign_pictures_alone(tmp_path, folder):
    out = tmp_path / "out"
    assert run("filter", folder, "--out", out, "--report", tmp_path / "r.json", "--quiet") == 0
    for p in folder.iterdir():
        assert sha(out / p.name) == sha(p)
    rep = report(tmp_path / "r.json")
    assert rep["summary"]["safe"] == 2 and rep["summary"]["unsafe"] == 0
    assert rep["filter"]["policy"]["name"] == "strict-5"
    a = by_name(rep)["astronaut.png"]
    assert a["verdict"] == "safe" and a["cost"] < 0.5
    assert not any(d["flagged"] for d in a["images"][0]["detections"])


def test_threshold_override_and_custom_policy(tmp_path, folder):
    # 0.81 < 0.9: the override makes the face safe; a custom policy can flag it again.
    assert run("filter", folder, "--out", tmp_path / "a", "--policy", "face-only",
               "--threshold", "FACE_FEMALE=0.9", "--quiet") == 0
    assert sha(tmp_path / "a" / "astronaut.png") == sha(folder / "astronaut.png")
    assert run("filter", folder, "--out", tmp_path / "b", "--policy", "custom",
               "--threshold", "FACE_FEMALE=0.5", "--quiet") == 1
    assert sha(tmp_path / "b" / "astronaut.png") != sha(folder / "astronaut.png")


def test_block_writes_nothing_for_the_unsafe_file(tmp_path, folder):
    out = tmp_path / "out"
    code = run("filter", folder, "--out", out, "--policy", "face-only", "--action", "block",
               "--report", tmp_path / "r.json", "--quiet")
    assert code == 1
    assert not (out / "astronaut.png").exists()
    assert [p.name for p in out.iterdir()] == ["chelsea.png"]
    assert sha(out / "chelsea.png") == sha(folder / "chelsea.png")
    rep = report(tmp_path / "r.json")
    a = by_name(rep)["astronaut.png"]
    assert a["verdict"] == "blocked" and a["output"] is None and a["cost"] > 0.5
    assert rep["summary"] == {"files": 2, "images": 2, "safe": 1, "unsafe": 1, "errors": 0, "skipped": 0}


def test_summary_is_printed_unless_quiet(tmp_path, folder, capsys):
    assert run("filter", folder, "--out", tmp_path / "o1", "--policy", "face-only") == 1
    err = capsys.readouterr().err
    assert "2 files, 1 safe, 1 unsafe, 0 errors" in err and str(tmp_path / "o1") in err
    assert run("filter", folder, "--out", tmp_path / "o2", "--policy", "face-only", "--quiet") == 1
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- HTML report


def test_html_black_embeds_only_filtered_thumbnails(tmp_path, folder, benign_set):
    html = tmp_path / "r.html"
    assert run("filter", folder, "--out", tmp_path / "out", "--policy", "face-only", "--action", "black",
               "--html", html, "--quiet") == 1
    text = html.read_text()
    rows = html_rows(text)
    assert set(rows) == {"astronaut.png", "chelsea.png"}
    assert text.count("data:image/") == 2                      # one thumbnail per written file
    black = decode_uri(rows["astronaut.png"])
    assert max(black.shape[:2]) == 192
    assert black.mean() < 2 and np.percentile(black, 99) < 10  # the blacked-out output, not the photo
    cat = decode_uri(rows["chelsea.png"])
    assert cat.mean() > 50
    ref = decode_uri(thumbnail_data_uri(benign_set["chelsea"]))
    assert cat.shape == ref.shape and np.abs(cat - ref).mean() < 3
    assert "FACE_FEMALE" in text and "unsafe" in text and "face-only" in text


def test_html_blur_thumbnail_is_the_censored_image(tmp_path, folder, ast):
    html = tmp_path / "r.html"
    assert run("filter", folder, "--out", tmp_path / "out", "--policy", "face-only", "--html", html,
               "--quiet") == 1
    thumb = decode_uri(html_rows(html.read_text())["astronaut.png"])
    original = decode_uri(thumbnail_data_uri(ast))
    written = decode_uri(thumbnail_data_uri(pixels(tmp_path / "out" / "astronaut.png").astype(np.uint8)))
    s = 192 / 512
    x, y, w, h = (int(v * s) for v in FACE)
    face = (slice(y + 4, y + h - 4), slice(x + 4, x + w - 4))
    assert np.abs(thumb - written).mean() < 2                  # the thumbnail shows what was written
    assert np.abs(thumb[face] - original[face]).mean() > 5     # ... not the unsafe original's face


@pytest.mark.parametrize("action", ["block", "pass"])
def test_html_never_embeds_an_unsafe_original(tmp_path, folder, action):
    html = tmp_path / "r.html"
    assert run("filter", folder, "--out", tmp_path / "out", "--policy", "face-only", "--action", action,
               "--html", html, "--quiet") == 1
    rows = html_rows(html.read_text())
    assert rows["astronaut.png"] is None and rows["chelsea.png"] is not None
    assert html.read_text().count("data:image/") == 1


# --------------------------------------------------------------------------- odd and broken images


def _grey(d, ctx):
    p = d / "grey.png"
    Image.fromarray(ctx["ast"]).convert("L").save(p)
    assert Image.open(p).mode == "L"
    return p


def _rgba(d, ctx):
    # The face is fully transparent: compositing would hide it, dropping alpha must not.
    alpha = np.full(ctx["ast"].shape[:2], 255, np.uint8)
    x, y, w, h = FACE
    alpha[y - 20:y + h + 20, x - 20:x + w + 20] = 0
    p = d / "rgba.png"
    Image.fromarray(np.dstack([ctx["ast"], alpha]), "RGBA").save(p)
    return p


def _sixteen(d, ctx):
    grey = np.asarray(Image.fromarray(ctx["ast"]).convert("L")).astype(np.uint16) * 257
    p = d / "sixteen.png"
    Image.fromarray(grey).save(p)
    assert Image.open(p).mode == "I;16"
    return p


def _cmyk(d, ctx):
    p = d / "cmyk.jpg"
    Image.fromarray(ctx["ast"]).convert("CMYK").save(p, quality=95)
    assert Image.open(p).mode == "CMYK"
    return p


def _gif(d, ctx):
    cat = Image.fromarray(ctx["cat"]).resize((512, 512))
    frames = [cat, Image.fromarray(ctx["ast"]), cat]  # the face is only in the 2nd frame
    p = d / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=[80, 120, 80], loop=0)
    return p


def _truncated(d, ctx):
    buf = io.BytesIO()
    Image.fromarray(ctx["ast"]).save(buf, format="PNG")
    p = d / "truncated.png"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return p


def _bad_gif(d, ctx):
    # A GIF whose trailer was replaced by an extension introducer: Pillow raises
    # IndexError (not OSError) when counting its frames.
    buf = io.BytesIO()
    small = [Image.fromarray(ctx["cat"][:64, :64]), Image.fromarray(ctx["cat"][64:128, :64])]
    small[0].save(buf, format="GIF", save_all=True, append_images=small[1:])
    data = bytearray(buf.getvalue())
    assert data[-1] == 0x3B
    data[-1] = 0x21
    p = d / "badtrailer.gif"
    p.write_bytes(bytes(data))
    return p


def _tiny(d, ctx):
    p = d / "tiny.png"
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(p)
    return p


def _notimage(d, ctx):
    p = d / "x.png"
    p.write_text("this is a text file, not a picture\n" * 20)
    return p


def _empty(d, ctx):
    p = d / "empty.png"
    p.write_bytes(b"")
    return p


# name -> (maker, verdict, text the error must contain or None, exit status when alone)
ODD = {
    "grey": (_grey, "unsafe", None, 1),
    "rgba": (_rgba, "unsafe", None, 1),
    "sixteen": (_sixteen, "unsafe", None, 1),    # scaled to 8 bits, not clipped to white
    "cmyk": (_cmyk, "unsafe", None, 1),
    "gif": (_gif, "unsafe", None, 1),
    "truncated": (_truncated, "error", "truncated or corrupt", 2),
    "bad_gif": (_bad_gif, "error", "truncated or corrupt", 2),
    "tiny": (_tiny, "safe", None, 0),
    "notimage": (_notimage, "error", "not an image", 2),
    "empty": (_empty, "error", "not an image", 2),
}


@pytest.fixture
def ctx(benign_set):
    return {"ast": benign_set["astronaut"], "cat": benign_set["chelsea"]}


def _check_odd(kind, path: Path, entry: dict, out: Path, ctx) -> None:
    _, verdict, text, _ = ODD[kind]
    assert entry["verdict"] == verdict, entry
    written = out / path.name
    if verdict == "error":
        assert text in entry["error"] and path.name in entry["error"]
        assert entry["output"] is None and not written.exists()
        return
    assert entry["error"] is None and Path(entry["output"]) == written.resolve()
    if verdict == "safe":
        assert sha(written) == sha(path)
        return
    # unsafe: the face is censored in the written copy, which is a readable image
    assert entry["cost"] > 0.5
    if kind == "gif":
        assert [im["verdict"] for im in entry["images"]] == ["safe", "unsafe", "safe"]  # every frame checked
        with Image.open(written) as g, Image.open(path) as src:
            assert g.n_frames == 3 and g.info.get("loop") == 0
            for i in range(3):
                g.seek(i)
                src.seek(i)
                assert g.info["duration"] == (80, 120, 80)[i]
                diff = np.abs(np.asarray(g.convert("RGB")).astype(int) - np.asarray(src.convert("RGB")))
                x, y, w, h = FACE
                if i == 1:
                    assert diff[y + 10:y + h - 10, x + 10:x + w - 10].mean() > 10
                else:
                    assert diff.max() == 0
        return
    assert len(entry["images"]) == 1
    (flag,) = [d for d in entry["images"][0]["detections"] if d["flagged"]]
    assert flag["label"] == "FACE_FEMALE"
    assert all(abs(v - e) <= 6 for v, e in zip(flag["box"], FACE)), flag["box"]
    out_px = pixels(written)
    if kind == "sixteen":  # Pillow's own I;16 -> RGB conversion clips; the filter scales
        with Image.open(path) as im:
            in_px = np.repeat((np.asarray(im).astype(np.int32) // 257)[:, :, None], 3, 2)
    else:
        in_px = pixels(path)
    assert out_px.shape == in_px.shape == (512, 512, 3)
    x, y, w, h = FACE
    assert np.abs(out_px - in_px)[y + 10:y + h - 10, x + 10:x + w - 10].mean() > 10
    assert np.abs(out_px - in_px)[:40].mean() < (3 if kind == "cmyk" else 0.01)  # far rows as they were


@pytest.mark.parametrize("kind", list(ODD))
def test_odd_image_alone(tmp_path, ctx, kind, capsys):
    src = tmp_path / "in"
    src.mkdir()
    path = ODD[kind][0](src, ctx)
    before = sha(path)
    out = tmp_path / "out"
    code = run("filter", src, "--out", out, "--policy", "face-only", "--report", tmp_path / "r.json")
    assert code == ODD[kind][3]
    rep = report(tmp_path / "r.json")
    assert rep["summary"]["files"] == 1
    _check_odd(kind, path, rep["files"][0], out, ctx)
    assert sha(path) == before
    err = capsys.readouterr().err
    if ODD[kind][1] == "error":
        assert f"error: {rep['files'][0]['error']}" in err and "1 errors" in err
    else:
        assert "0 errors" in err


@pytest.mark.parametrize("kind", list(ODD))
def test_odd_image_next_to_a_good_one(tmp_path, ctx, kind):
    src = tmp_path / "in"
    src.mkdir()
    path = ODD[kind][0](src, ctx)
    Image.fromarray(ctx["ast"]).save(src / "astronaut.png")
    out = tmp_path / "out"
    code = run("filter", src, "--out", out, "--policy", "face-only", "--report", tmp_path / "r.json", "-q")
    assert code == ODD[kind][3] | 1
    files = by_name(report(tmp_path / "r.json"))
    assert files["astronaut.png"]["verdict"] == "unsafe"
    face_changed(out / "astronaut.png", ctx["ast"])
    _check_odd(kind, path, files[path.name], out, ctx)


@pytest.mark.parametrize("batch_size", ["1", "2", "16"])
def test_all_odd_images_in_one_batch(tmp_path, ctx, batch_size):
    src = tmp_path / "odd"
    src.mkdir()
    paths = {kind: ODD[kind][0](src, ctx) for kind in ODD}
    Image.fromarray(ctx["ast"]).save(src / "astronaut.png")
    Image.fromarray(ctx["cat"]).save(src / "chelsea.png")
    before = hashes(src)
    out = tmp_path / "out"
    code = run("filter", src, "--out", out, "--policy", "face-only", "--report", tmp_path / "r.json",
               "--batch-size", batch_size, "--quiet")
    assert code == 3  # something unsafe and something unreadable
    assert hashes(src) == before
    rep = report(tmp_path / "r.json")
    files = by_name(rep)
    for kind, path in paths.items():
        _check_odd(kind, path, files[path.name], out, ctx)
    assert files["chelsea.png"]["verdict"] == "safe" and files["astronaut.png"]["verdict"] == "unsafe"
    n_err = sum(v[1] == "error" for v in ODD.values())
    n_unsafe = sum(v[1] == "unsafe" for v in ODD.values()) + 1
    assert rep["summary"] == {"files": len(ODD) + 2, "images": len(ODD) - n_err + 2 + 2,  # gif: 3 frames
                              "safe": len(ODD) + 2 - n_err - n_unsafe, "unsafe": n_unsafe, "errors": n_err,
                              "skipped": 0}


@pytest.mark.slow
def test_huge_black_image_is_processed_next_to_a_good_one(tmp_path, ast):
    src = tmp_path / "big"
    src.mkdir()
    Image.new("RGB", (10000, 10000)).save(src / "huge.png", compress_level=1)
    Image.fromarray(ast).save(src / "astronaut.png")
    out = tmp_path / "out"
    code = run("filter", src, "--out", out, "--policy", "face-only", "--report", tmp_path / "r.json", "-q")
    assert code == 1
    files = by_name(report(tmp_path / "r.json"))
    huge = files["huge.png"]
    assert huge["verdict"] == "safe" and huge["error"] is None
    assert huge["images"][0]["width"] == 10000 and huge["images"][0]["height"] == 10000
    assert np.array_equal(np.asarray(Image.open(out / "huge.png").convert("RGB")),
                          np.asarray(Image.open(src / "huge.png").convert("RGB")))  # re-encoded, same pixels
    assert files["astronaut.png"]["verdict"] == "unsafe"
    face_changed(out / "astronaut.png", ast)


def test_over_the_pixel_limit_is_a_per_file_error(tmp_path, folder):
    # (a 300-Mpx file would take too long to write here) chelsea passes, astronaut does not
    code = run("filter", folder, "--out", tmp_path / "out", "--report", tmp_path / "r.json", "--quiet",
               "--max-file-pixels", str(300 * 451 + 1))
    assert code == 2
    files = by_name(report(tmp_path / "r.json"))
    assert files["astronaut.png"]["verdict"] == "error" and "budget" in files["astronaut.png"]["error"]
    assert files["chelsea.png"]["verdict"] == "safe"
    assert not (tmp_path / "out" / "astronaut.png").exists()


# --------------------------------------------------------------------------- never overwriting


def test_never_overwrites_without_flag(tmp_path, folder, capsys):
    out = tmp_path / "out"
    assert run("filter", folder, "--out", out, "--policy", "face-only", "--quiet") == 1
    before = hashes(out)
    code = run("filter", folder, "--out", out, "--policy", "face-only", "--action", "black",
               "--report", tmp_path / "r.json")
    assert code == 2
    files = report(tmp_path / "r.json")["files"]
    assert len(files) == 2
    assert all(f["verdict"] == "error" and "--overwrite" in f["error"] for f in files)
    assert capsys.readouterr().err.count("pass --overwrite") == 2
    assert hashes(out) == before
    assert run("filter", folder, "--out", out, "--policy", "face-only", "--action", "black",
               "--overwrite", "--quiet") == 1
    assert pixels(out / "astronaut.png").max() == 0
    assert sha(out / "chelsea.png") == sha(folder / "chelsea.png")


@pytest.mark.parametrize("overwrite", [False, True])
def test_out_is_the_input_folder(tmp_path, folder, overwrite, capsys):
    before = hashes(folder)
    args = ["filter", folder, "--out", folder, "--policy", "face-only", "--action", "black",
            "--report", tmp_path / "r.json"]
    code = run(*args, *(["--overwrite"] if overwrite else []))
    assert code & 2 and not code & 4
    assert hashes(folder) == before  # nothing replaced, nothing added
    files = report(tmp_path / "r.json")["files"]
    assert all(f["verdict"] == "error" and f["output"] is None for f in files)
    if overwrite:
        assert all("refusing to overwrite the original" in f["error"] for f in files)
    assert "error:" in capsys.readouterr().err


def test_converted_output_name_never_replaces_an_original(tmp_path, folder, benign_set):
    # other/astronaut.ppm is written as PNG, i.e. to in/astronaut.png: an original.
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(benign_set["chelsea"]).save(other / "astronaut.ppm")
    before = hashes(folder)
    code = run("filter", other / "astronaut.ppm", folder / "astronaut.png", "--out", folder, "--overwrite",
               "--report", tmp_path / "r.json", "--quiet")
    assert code & 2
    assert hashes(folder) == before
    files = report(tmp_path / "r.json")["files"]
    assert [f["verdict"] for f in files] == ["error", "error"]
    assert all("original" in f["error"] for f in files)


def test_ppm_input_is_written_as_png(tmp_path, benign_set):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(benign_set["astronaut"]).save(src / "a.ppm")
    out = tmp_path / "out"
    assert run("filter", src / "a.ppm", "--out", out, "--policy", "face-only", "--quiet") == 1
    assert [p.name for p in out.iterdir()] == ["a.png"]
    with Image.open(out / "a.png") as im:
        assert im.format == "PNG"
    face_changed(out / "a.png", benign_set["astronaut"])


def test_two_inputs_with_one_output_name(tmp_path, benign_set, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    Image.fromarray(benign_set["astronaut"]).save(a / "x.png")
    Image.fromarray(benign_set["chelsea"]).save(b / "x.png")
    out = tmp_path / "out"
    code = run("filter", a, b, "--out", out, "--policy", "face-only", "--report", tmp_path / "r.json", "-q")
    assert code == 3
    first, second = report(tmp_path / "r.json")["files"]
    assert first["verdict"] == "unsafe" and Path(first["output"]) == (out / "x.png").resolve()
    assert second["verdict"] == "error" and "another input" in second["error"] and second["output"] is None
    face_changed(out / "x.png", benign_set["astronaut"])  # the reported output is what was written


def test_out_is_an_input_file_is_fatal(tmp_path, folder, capsys):
    before = hashes(folder)
    assert run("filter", folder / "astronaut.png", "--out", folder / "astronaut.png", "--quiet") == 4
    assert "is one of the input files" in capsys.readouterr().err
    assert hashes(folder) == before


def test_unwritable_out_or_report_is_fatal_not_a_crash(tmp_path, folder, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert run("filter", folder, "--out", a_file, "--quiet") == 4
    assert "safet2i: error:" in capsys.readouterr().err
    assert a_file.read_text() == "x"
    assert run("filter", folder, "--out", tmp_path / "o", "--report", tmp_path / "no" / "r.json",
               "--quiet") == 4
    assert "r.json" in capsys.readouterr().err


# --------------------------------------------------------------------------- fatal errors


def test_missing_model_is_fatal_and_writes_nothing(tmp_path, folder, capsys):
    out = tmp_path / "out"
    assert run("filter", folder, "--out", out, "--model", "/nonexistent/x.json", "--report",
               tmp_path / "r.json", "--quiet") == 4
    err = capsys.readouterr().err
    assert "safet2i: error:" in err and "/nonexistent/x.json" in err
    assert not out.exists() or not any(out.iterdir())
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("case", ["garbage", "garbage-bad-sha", "missing-file"])
def test_corrupt_model_is_fatal_and_names_the_file(tmp_path, folder, capsys, case):
    sidecar = json.loads(SIDECAR.read_text())
    sidecar["model"] = {"file": "bad.onnx"}
    sidecar.pop("sha256")
    if case == "garbage-bad-sha":
        sidecar["sha256"] = "0" * 64
    models = tmp_path / "models"
    models.mkdir()
    (models / "bad.json").write_text(json.dumps(sidecar))
    if case != "missing-file":
        (models / "bad.onnx").write_bytes(b"\x00garbage\xff" * 100)
    out = tmp_path / "out"
    assert run("filter", folder, "--out", out, "--model", models / "bad.json", "--quiet") == 4
    err = capsys.readouterr().err
    assert "safet2i: error:" in err and "bad.onnx" in err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("argv", [
    ["filter", "x.png"],                                   # no --out
    ["filter", "--out", "o"],                              # no paths
    ["filter", "x.png", "--out", "o", "--action", "nope"],
    ["filter", "x.png", "--out", "o", "--colour", "zz"],
    [],
])
def test_usage_errors_exit_64(tmp_path, argv, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 64
    assert "usage: safet2i" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_out_names_the_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["filter", "x.png"])
    assert e.value.code == 64
    assert "--out" in capsys.readouterr().err


# --------------------------------------------------------------------------- samples, models, layout


def test_samples_writes_benign_pictures(tmp_path, capsys, benign_set):
    d = tmp_path / "s"
    assert main(["samples", str(d)]) == 0
    names = {p.name for p in d.iterdir()}
    assert {"astronaut.png", "camera.png", "coffee.png", "chelsea.png"} <= names
    assert np.array_equal(pixels(d / "astronaut.png"), benign_set["astronaut"])
    assert str(d) in capsys.readouterr().err


def test_models_lists_builtins(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("nudenet "))
    assert "installed" in line and "detector" in line
    assert "opennsfw" in out and "nudenet-reference" in out


def test_files_named_directly_and_nested_folders(tmp_path, folder, benign_set):
    nested = folder / "sub" / "deeper"
    nested.mkdir(parents=True)
    shutil.copy(folder / "chelsea.png", nested / "cat.png")
    shutil.copy(folder / "astronaut.png", nested / "face.png")
    (nested / "notes.txt").write_text("not collected from folders")
    single = tmp_path / "single"
    single.mkdir()
    Image.fromarray(benign_set["rocket"]).save(single / "solo.jpeg.bin", format="JPEG")
    out = tmp_path / "o"
    code = run("filter", single / "solo.jpeg.bin", folder, "--out", out, "--policy", "face-only",
               "--report", tmp_path / "r.json", "--quiet")
    assert code == 1
    # an explicitly named file (any extension) lands at the top; a folder's layout is mirrored
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "astronaut.png", "chelsea.png", "solo.jpeg.jpg", "sub/deeper/cat.png", "sub/deeper/face.png"]
    files = by_name(report(tmp_path / "r.json"))
    assert len(files) == 5 and "notes.txt" not in files
    assert [files[n]["verdict"] for n in ("solo.jpeg.bin", "cat.png", "face.png")] == ["safe", "safe", "unsafe"]
    # outputs are re-encoded from the checked pixels, named for the format written (JPEG, quality 95)
    solo = np.asarray(Image.open(out / "solo.jpeg.jpg").convert("RGB")).astype(int)
    assert np.abs(solo - np.asarray(Image.open(single / "solo.jpeg.bin").convert("RGB")).astype(int)).mean() < 2
    assert np.array_equal(np.asarray(Image.open(out / "sub" / "deeper" / "cat.png")),
                          np.asarray(Image.open(folder / "chelsea.png")))
    face_changed(out / "sub" / "deeper" / "face.png", benign_set["astronaut"])


def test_same_file_named_twice_is_written_once(tmp_path, folder):
    out = tmp_path / "o"
    code = run("filter", folder / "astronaut.png", folder, "--out", out, "--policy", "face-only",
               "--report", tmp_path / "r.json", "--quiet")
    assert code == 3
    files = report(tmp_path / "r.json")["files"]
    assert [f["verdict"] for f in files] == ["unsafe", "error", "safe"]
    assert "another input" in files[1]["error"]
    assert sorted(p.name for p in out.iterdir()) == ["astronaut.png", "chelsea.png"]


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "TIFF", "JPEG", "WEBP", "BMP"])
def test_fuzzed_files_load_or_fail_with_a_clear_error(tmp_path, benign_set, fmt):
    """Random byte flips and truncations: Pillow's decoders raise struct.error, IndexError, ...
    for some of them; every outcome must be a decoded image or an ImageInputError."""
    from safet2i.errors import ImageInputError
    from safet2i.images import load_image_file

    buf = io.BytesIO()
    Image.fromarray(benign_set["chelsea"][:64, :64]).save(buf, fmt)
    good = buf.getvalue()
    rng = np.random.default_rng(sum(map(ord, fmt)))
    errors = 0
    for i in range(60):
        data = bytearray(good)
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 12))):
            data[pos] = int(rng.integers(0, 256))
        if i % 3 == 0:
            data = data[: int(rng.integers(1, len(data)))]
        path = tmp_path / f"f{i}.{fmt.lower()}"
        path.write_bytes(bytes(data))
        try:
            loaded = load_image_file(path)
        except ImageInputError as exc:
            assert str(path) in str(exc)
            errors += 1
        else:
            assert loaded.frames and all(f.ndim == 3 for f in loaded.frames)
    assert errors > 0  # the fuzzing did hit broken files


@pytest.mark.parametrize("exc", [__import__("struct").error("unpack requires a buffer"), IndexError("tuple index")])
def test_decoder_crashes_become_image_input_errors(tmp_path, benign_set, monkeypatch, exc):
    """Pillow decoders raise struct.error / IndexError on some malformed files (found by fuzzing)."""
    from PIL import ImageFile

    from safet2i.errors import ImageInputError
    from safet2i.images import load_image_file

    path = tmp_path / "x.png"
    Image.fromarray(benign_set["chelsea"][:16, :16]).save(path)

    def boom(self, *a, **k):
        raise exc

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    with pytest.raises(ImageInputError, match="truncated or corrupt"):
        load_image_file(path)
