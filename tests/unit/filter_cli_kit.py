"""Helpers shared by the ``safet2i filter`` hardening tests (issue 14)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from safet2i.cli import main


def run(*args) -> int:
    """The CLI's exit status (argparse errors exit through SystemExit)."""
    try:
        return main([str(a) for a in args])
    except SystemExit as exc:
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
    """An input folder with the astronaut (a face: unsafe under face-only) and the cat."""
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(benign_set["astronaut"]).save(src / "astronaut.png")
    Image.fromarray(benign_set["chelsea"]).save(src / "chelsea.png")
    return src
