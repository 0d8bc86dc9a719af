"""Issue 14, class 6: nothing outside --out is written (reports, links, --out inside inputs).

"Unsafe" is the ``face-only`` policy on scikit-image's astronaut; the cat has no detection.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from filter_cli_kit import by_name, folder, report, run, sha, tree  # noqa: F401  (folder: fixture)


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
