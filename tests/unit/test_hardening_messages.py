"""Issue 14, class 10: numeric options validated naming the option; no raw warnings on stderr.

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
