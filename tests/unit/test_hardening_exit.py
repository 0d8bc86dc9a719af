"""Issue 14, class 5: exit status and outputs tell the truth; outputs are written atomically.

"Unsafe" is the ``face-only`` policy on scikit-image's astronaut; the cat has no detection.
"""

from __future__ import annotations

import errno
import os

from PIL import Image

from filter_cli_kit import by_name, folder, report, run, sha, tree  # noqa: F401  (folder: fixture)


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
    assert "caf\ufffd.png" in (tmp_path / "r.json").read_text(encoding="utf-8")   # JSON too, no lone \\udcXX
    assert report(tmp_path / "r.json")["files"][0]["verdict"] == "safe"
    assert os.path.exists(os.fsencode(str(tmp_path / "out")) + b"/caf\xe9.png")
