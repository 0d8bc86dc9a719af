"""Registry / ComfyUI-Manager packaging: pyproject [tool.comfy], .comfyignore, requirements."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_tool_comfy_is_complete():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    comfy = data["tool"]["comfy"]
    assert comfy["PublisherId"] == "safet2i" and comfy["DisplayName"] == "SafeT2I"
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy["requires-comfyui"])
    icon = comfy["Icon"]
    assert icon.startswith("https://raw.githubusercontent.com/safet2i/safet2i/main/")
    local = REPO / icon.split("/main/", 1)[1]
    assert local.is_file() and local.suffix in (".svg", ".png", ".jpg", ".gif")
    if local.suffix == ".svg":
        head = local.read_text()[:300]
        w, h = re.search(r'width="(\d+)"', head).group(1), re.search(r'height="(\d+)"', head).group(1)
        assert w == h and int(w) <= 400                      # square, at most 400x400
    assert data["project"]["name"] == "safet2i" and data["project"]["license"] == "GPL-3.0-or-later"
    assert data["project"]["scripts"]["safet2i"] == "safet2i.cli:main"


def test_comfyignore_keeps_contributor_files_out_of_the_archive():
    patterns = {ln.strip() for ln in (REPO / ".comfyignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")}
    assert {"tests/", "benchmarks/", ".ci/", "tools/"} <= patterns
    assert not {"web/", "example_workflows/", "docs/", "models/", "safet2i/", "nodes/"} & patterns


def test_requirements_never_touch_torch_or_onnxruntime():
    names = [re.split(r"[<>=;\[ ]", ln.strip())[0].lower() for ln in (REPO / "requirements.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert names and not {"torch", "torchvision", "torchaudio"} & set(names)
    assert not [n for n in names if n.startswith("onnxruntime")]       # install.py adds exactly one build
    assert all("==" not in ln for ln in (REPO / "requirements.txt").read_text().splitlines())  # no hard pins
