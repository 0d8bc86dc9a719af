"""Issue 14, classes 4, 5, 6 and 10: ``safet2i filter`` on hostile files and options.

* memory is bounded by documented budgets (per frame, per file over all frames, pending batch);
* exit status and outputs tell the truth; outputs are written atomically;
* nothing outside ``--out`` is written (reports, links, ``--out`` inside an input folder);
* numeric options are validated with messages naming the option; no raw warnings on stderr.

"Unsafe" is the ``face-only`` policy on scikit-image's astronaut; the cat has no detection.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from safet2i.cli import main


def run(*args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as exc:   # argparse errors exit through SystemExit
        return exc.code


def sha(p) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def report(path) -> dict:
    return json.loads(Path(path).read_text())


def by_name(rep) -> dict:
    return {Path(f["path"]).name: f for f in rep["files"]}


@pytest.fixture
def folder(tmp_path, benign_set):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(benign_set["astronaut"]).save(src / "astronaut.png")
    Image.fromarray(benign_set["chelsea"]).save(src / "chelsea.png")
    return src


# --------------------------------------------------------------------------- 4. memory budgets


def test_frame_budget_is_checked_before_each_frame_is_decoded(tmp_path, benign_set, monkeypatch):
    """A 40-frame GIF over the per-file budget: decoding stops at the first frame that would
    pass the budget (frames after it are never decoded), a per-file error names the budget,
    and the next file is still processed."""
    import safet2i.images as images

    src = tmp_path / "in"
    src.mkdir()
    frames = [Image.fromarray(np.roll(benign_set["chelsea"][:200, :200], 7 * i, axis=1)) for i in range(40)]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    Image.fromarray(benign_set["chelsea"]).save(src / "z_cat.png")
    loads = []
    real_load = Image.Image.load

    def counting_load(self):
        if getattr(self, "format", None) == "GIF":
            loads.append(self.tell())
        return real_load(self)

    monkeypatch.setattr(Image.Image, "load", counting_load)
    monkeypatch.setenv(images.ENV_MAX_FILE_PIXELS, str(200 * 200 * 10 + 5))
    code = run("filter", src, "--out", tmp_path / "out", "--report", tmp_path / "r.json", "-q")
    assert code == 2
    files = by_name(report(tmp_path / "r.json"))
    err = files["anim.gif"]["error"]
    assert "frame 10" in err and "budget" in err and "SAFET2I_MAX_FILE_PIXELS" in err
    assert files["z_cat.png"]["verdict"] == "safe"
    assert not (tmp_path / "out" / "anim.gif").exists()
    # only the 10 frames within budget (0..9) were ever decoded from the GIF
    assert loads and max(loads) == 9


def test_over_budget_file_never_reports_memoryerror_or_traceback(tmp_path, capsys, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (3000, 2000), (30, 60, 90)).save(src / "big.png")
    monkeypatch.setenv("SAFET2I_MAX_FILE_PIXELS", "1000000")
    code = run("filter", src, "--out", tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 2
    assert "big.png" in err and "budget" in err
    assert "MemoryError" not in err and "Traceback" not in err


def test_bytes_budget_is_checked_before_reading(tmp_path, monkeypatch, benign_set):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(benign_set["chelsea"]).save(src / "cat.png")
    monkeypatch.setenv("SAFET2I_MAX_FILE_BYTES", "1000")
    code = run("filter", src, "--out", tmp_path / "out", "--report", tmp_path / "r.json", "-q")
    assert code == 2
    assert "byte limit" in report(tmp_path / "r.json")["files"][0]["error"]


def test_extreme_aspect_ratio_is_checked_without_a_padded_square(tmp_path, monkeypatch):
    """100000 x 1 would pad to a 30 GB square; it is resized on its own instead."""
    from safet2i.filter import detectors

    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (100000, 1), (200, 100, 50)).save(src / "line.png")
    Image.new("RGB", (2, 60000), (20, 100, 50)).save(src / "column.png")
    biggest = []
    real_zeros = np.zeros

    def spy_zeros(shape, *a, **k):
        biggest.append(int(np.prod(shape)))
        return real_zeros(shape, *a, **k)

    monkeypatch.setattr(detectors.np, "zeros", spy_zeros)
    code = run("filter", src, "--out", tmp_path / "out", "--report", tmp_path / "r.json", "-q")
    monkeypatch.undo()
    assert code == 0
    files = by_name(report(tmp_path / "r.json"))
    assert files["line.png"]["verdict"] == "safe" and files["column.png"]["verdict"] == "safe"
    assert max(biggest) <= 320 * 320 * 3
    assert np.asarray(Image.open(tmp_path / "out" / "line.png")).shape == (1, 100000, 3)


def test_pad_square_resize_is_exact_for_ordinary_shapes():
    """The shortcut never applies to ordinary aspect ratios (parity with the nudenet package)."""
    import cv2

    from safet2i.filter.detectors import _pad_square_resize

    img = np.random.default_rng(1).integers(0, 255, (300, 1300, 3), dtype=np.uint8)
    sq = np.zeros((1300, 1300, 3), np.uint8)
    sq[:300] = img
    got, side = _pad_square_resize(img, 320)
    assert side == 1300 and np.array_equal(got, cv2.resize(sq, (320, 320), interpolation=cv2.INTER_LINEAR))


def test_pending_frames_stay_within_the_batch_budget(tmp_path, benign_set, monkeypatch):
    """Frames waiting for a network batch never exceed SAFET2I_MAX_BATCH_PIXELS (one file
    may be over it alone: it is then checked by itself)."""
    from safet2i.filter.pipeline import SafetyFilter

    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        Image.fromarray(np.roll(benign_set["chelsea"], 11 * i, axis=0)).save(src / f"c{i}.png")  # 300x451
    seen = []
    real = SafetyFilter.check_uint8

    def spy(self, frames):
        seen.append(sum(f.shape[0] * f.shape[1] for f in frames))
        return real(self, frames)

    monkeypatch.setattr(SafetyFilter, "check_uint8", spy)
    monkeypatch.setenv("SAFET2I_MAX_BATCH_PIXELS", str(300 * 451 * 2))
    code = run("filter", src, "--out", tmp_path / "out", "--batch-size", "16", "-q")
    assert code == 0
    assert seen and max(seen) <= 300 * 451 * 2 and sum(seen) == 6 * 300 * 451


# --------------------------------------------------------------------------- 5. exit status, atomic outputs


def test_unsafe_file_whose_output_cannot_be_written_is_still_unsafe(tmp_path, folder, monkeypatch, capsys):
    """A full disk while writing the censored output: the file is unsafe *and* an error
    (exit 3), no truncated file under the final name, no temporary file left."""
    import safet2i.images as images

    real = images.encode_frames

    def full_disk(frames, meta, fh):
        if len(frames) and frames[0].shape == (512, 512, 3):   # the astronaut
            fh.write(b"\x89PNG partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(frames, meta, fh)

    monkeypatch.setattr("safet2i.filter.files.encode_frames", full_disk)
    out = tmp_path / "out"
    code = run("filter", folder, "--out", out, "--policy", "face-only", "--report", tmp_path / "r.json", "-q")
    assert code == 3
    files = by_name(report(tmp_path / "r.json"))
    a = files["astronaut.png"]
    assert a["verdict"] == "unsafe" and a["output"] is None and "No space left" in a["error"]
    assert files["chelsea.png"]["verdict"] == "safe"
    assert sorted(p.name for p in out.iterdir()) == ["chelsea.png"]   # nothing partial, no temp file
    summary = report(tmp_path / "r.json")["summary"]
    assert summary["unsafe"] == 1 and summary["errors"] == 1


def test_a_crash_in_one_file_never_aborts_the_batch(tmp_path, folder, monkeypatch):
    """An unexpected exception while decoding one file is that file's error (exit 2 with the
    unsafe bit from the other file), never exit 1 and never a lost run."""
    from PIL import PngImagePlugin

    real = PngImagePlugin.PngImageFile.load

    def flaky(self):
        if self.size == (451, 300):   # chelsea
            raise RuntimeError("decoder exploded")
        return real(self)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", flaky)
    code = run("filter", folder, "--out", tmp_path / "out", "--policy", "face-only",
               "--report", tmp_path / "r.json", "-q")
    assert code == 3
    files = by_name(report(tmp_path / "r.json"))
    assert files["astronaut.png"]["verdict"] == "unsafe"
    assert files["chelsea.png"]["verdict"] == "error" and "decoder exploded" in files["chelsea.png"]["error"]


def test_filter_crash_on_one_file_is_isolated(tmp_path, folder, monkeypatch):
    """A batch that fails is retried file by file: only the file that fails is an error."""
    from safet2i.filter.pipeline import SafetyFilter

    real = SafetyFilter.check_uint8

    def picky(self, frames):
        if any(f.shape == (300, 451, 3) for f in frames):
            raise ValueError("cannot preprocess this one")
        return real(self, frames)

    monkeypatch.setattr(SafetyFilter, "check_uint8", picky)
    code = run("filter", folder, "--out", tmp_path / "out", "--policy", "face-only",
               "--report", tmp_path / "r.json", "-q")
    assert code == 3
    files = by_name(report(tmp_path / "r.json"))
    assert files["astronaut.png"]["verdict"] == "unsafe" and (tmp_path / "out" / "astronaut.png").exists()
    assert files["chelsea.png"]["verdict"] == "error" and "cannot preprocess" in files["chelsea.png"]["error"]
    assert not (tmp_path / "out" / "chelsea.png").exists()


def test_report_that_cannot_be_written_at_the_end_keeps_the_verdicts(tmp_path, folder, monkeypatch, capsys):
    """Outputs were written; the report then fails: exit 1 | 8, never 4."""
    import safet2i.filter.report as rep

    def broken(report, fh, *a):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(rep, "write_json", broken)
    code = run("filter", folder, "--out", tmp_path / "out", "--policy", "face-only",
               "--report", tmp_path / "r.json", "-q")
    err = capsys.readouterr().err
    assert code == 1 | 8
    assert "cannot write the report" in err and "r.json" in err
    assert not (tmp_path / "r.json").exists() and not list(tmp_path.glob(".r.json*"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["astronaut.png", "chelsea.png"]


def test_undecodable_file_name_in_reports(tmp_path, benign_set):
    """A file name that is not valid UTF-8 is shown with replacement characters in the
    HTML and JSON reports and on stderr; the run is correct."""
    src = tmp_path / "in"
    src.mkdir()
    bad = os.fsencode(str(src)) + b"/caf\xe9.png"
    Image.fromarray(benign_set["chelsea"]).save(bad.decode("utf-8", "surrogateescape"))
    code = run("filter", src, "--out", tmp_path / "out", "--report", tmp_path / "r.json",
               "--html", tmp_path / "r.html")
    assert code == 0
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "caf\ufffd.png" in text
    assert report(tmp_path / "r.json")["files"][0]["verdict"] == "safe"
    assert os.path.exists(os.fsencode(str(tmp_path / "out")) + b"/caf\xe9.png")


# --------------------------------------------------------------------------- 6. nothing outside --out


def test_report_never_replaces_an_input_even_with_overwrite(tmp_path, folder, capsys):
    before = tree(folder)
    for flag in ("--report", "--html"):
        for extra in ([], ["--overwrite"]):
            code = run("filter", folder, "--out", tmp_path / "out", flag, folder / "chelsea.png", "-q",
                       "--overwrite", *extra)
            assert code == 4
            assert "is one of the input files" in capsys.readouterr().err
    assert tree(folder) == before


def test_report_never_replaces_an_existing_file_without_overwrite(tmp_path, folder, capsys):
    keep = tmp_path / "notes.json"
    keep.write_text("mine")
    code = run("filter", folder, "--out", tmp_path / "out", "--report", keep, "-q")
    assert code == 4 and "--overwrite" in capsys.readouterr().err
    assert keep.read_text() == "mine"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # refused before any output
    assert run("filter", folder, "--out", tmp_path / "out", "--report", keep, "-q", "--overwrite") == 0
    assert json.loads(keep.read_text())["summary"]["files"] == 2


def test_overwrite_never_writes_through_a_symlink_or_hard_link(tmp_path, folder):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(victim)
    victim_hash = sha(victim)
    os.symlink(victim, out / "astronaut.png")           # a link planted where an output goes
    os.link(victim, out / "chelsea.png")                # a hard link to a file outside --out
    code = run("filter", folder, "--out", out, "--overwrite", "--policy", "face-only",
               "--report", tmp_path / "r.json", "-q")
    files = by_name(report(tmp_path / "r.json"))
    assert sha(victim) == victim_hash                    # never written through either link
    assert "symbolic link" in files["astronaut.png"]["error"]
    assert files["chelsea.png"]["verdict"] == "safe" and files["chelsea.png"]["error"] is None
    assert not os.path.samefile(out / "chelsea.png", victim)   # the entry was replaced, not the file
    assert code == 2   # the astronaut's output place is refused before it is read


def test_symlinks_inside_inputs_are_skipped_and_reported(tmp_path, folder, benign_set):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.fromarray(benign_set["astronaut"]).save(outside / "secret.png")
    os.symlink(outside / "secret.png", folder / "link.png")
    os.symlink(outside, folder / "linkdir")
    os.mkfifo(folder / "pipe.png")
    code = run("filter", folder, "--out", tmp_path / "out", "--report", tmp_path / "r.json", "-q")
    assert code == 0
    rep = report(tmp_path / "r.json")
    skipped = {Path(s["path"]).name: s["reason"] for s in rep["skipped"]}
    assert "symbolic link" in skipped["link.png"] and "not followed" in skipped["link.png"]
    assert "symbolic link" in skipped["linkdir"]
    assert "not a regular file" in skipped["pipe.png"]
    assert rep["summary"]["skipped"] == 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["astronaut.png", "chelsea.png"]


def test_out_inside_an_input_folder_is_excluded_and_reruns_work(tmp_path, folder):
    out = folder / "filtered"
    for i in range(2):
        code = run("filter", folder, "--out", out, "--report", tmp_path / f"r{i}.json", "-q",
                   *(["--overwrite"] if i else []))
        assert code == 0
        rep = report(tmp_path / f"r{i}.json")
        assert sorted(Path(f["path"]).name for f in rep["files"]) == ["astronaut.png", "chelsea.png"]
    assert sorted(p.name for p in out.iterdir()) == ["astronaut.png", "chelsea.png"]
    reasons = [s["reason"] for s in report(tmp_path / "r1.json")["skipped"]]
    assert any("output folder" in r for r in reasons)


def test_output_folder_link_leading_outside_is_refused(tmp_path, folder):
    """A folder inside --out that is a symlink elsewhere never receives outputs."""
    nested = folder / "sub"
    nested.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(nested / "x.png")
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, out / "sub")
    code = run("filter", folder, "--out", out, "--report", tmp_path / "r.json", "-q")
    assert code == 2
    assert not any(elsewhere.iterdir())
    assert "outside --out" in by_name(report(tmp_path / "r.json"))["x.png"]["error"]


# --------------------------------------------------------------------------- 10. options and messages


@pytest.mark.parametrize("option,value", [
    ("--feather", "-1"), ("--feather", "nan"), ("--feather", "1e9"),
    ("--strength", "0"), ("--strength", "-3"), ("--strength", "inf"),
    ("--expand", "5"), ("--expand", "-0.1"),
    ("--batch-size", "0"), ("--batch-size", "1.5"), ("--batch-size", "100000"),
    ("--max-file-pixels", "0"),
])
def test_unbounded_numeric_options_are_refused_naming_the_option(tmp_path, folder, capsys, option, value):
    code = run("filter", folder, "--out", tmp_path / "out", f"{option}={value}")
    err = capsys.readouterr().err
    assert code == 64
    assert option in err.split("error:", 1)[1]
    assert not (tmp_path / "out").exists()


def test_no_raw_warning_text_on_stderr(tmp_path, capsys):
    """A decompression-bomb-sized image and a malformed EXIF block give clean messages."""
    src = tmp_path / "in"
    src.mkdir()
    Image.new("L", (10000, 9000)).save(src / "big.png", compress_level=1)   # over Pillow's warning size
    code = run("filter", src, "--out", tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 0
    assert "Warning" not in err and "Traceback" not in err
