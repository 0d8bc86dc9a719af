"""A real AUTOMATIC1111 / Forge / reForge webui (CPU) with this extension, for end-to-end tests.

Runs only when ``WEBUI_PATH`` (a webui checkout: A1111 1.10.x, Forge or reForge) and
``WEBUI_PYTHON`` (an interpreter with the webui's and SafeT2I's dependencies) are set;
skipped otherwise. The fixture writes a random-weight full-size SD1.5 checkpoint, copies the
extension into a temporary ``--data-dir`` and starts the webui on a free loopback port with
``--api`` on CPU, offline; see ``server.py`` and docs/a1111.md ("Tests in a real webui").
"""

from __future__ import annotations

import os

import pytest

from .sd15_checkpoint import write_checkpoint
from .server import start_webui, webui_env


@pytest.fixture(scope="session")
def sd15_checkpoint(tmp_path_factory):
    webui_env()     # skip before writing 2 GB when no webui is configured
    path = tmp_path_factory.mktemp("ckpt") / "random_sd15.safetensors"
    write_checkpoint(path, seed=0)
    yield path
    path.unlink(missing_ok=True)      # 2 GB: not kept in pytest's last three temporary folders


@pytest.fixture(scope="module")
def webui(tmp_path_factory, sd15_checkpoint):
    with start_webui(tmp_path_factory.mktemp("webui"), sd15_checkpoint) as server:
        yield server


# Module-scoped: one webui (about 5 GB with the fp32 model on CPU) runs at a time.
@pytest.fixture(scope="module")
def webui_enforced(tmp_path_factory, sd15_checkpoint):
    args = ["--safet2i-enforce", "--safet2i-enforce-policy", "strict-5", "--safet2i-enforce-action", "pixelate"]
    with start_webui(tmp_path_factory.mktemp("webui-enforced"), sd15_checkpoint, args) as server:
        yield server


def pytest_report_header(config):
    return (f"real webui: WEBUI_PATH={os.environ.get('WEBUI_PATH')!r} "
            f"WEBUI_PYTHON={os.environ.get('WEBUI_PYTHON')!r}")
