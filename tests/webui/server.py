"""Start a real AUTOMATIC1111 / Forge / reForge webui (CPU, loopback) with this extension.

Nothing here installs or downloads anything: the webui checkout (``WEBUI_PATH``) and an
interpreter with its dependencies and SafeT2I's (``WEBUI_PYTHON``) must already exist. Every
file the webui writes (settings, models, outputs, caches, the extension copy) goes to a
temporary data directory given with ``--data-dir``; the server listens on 127.0.0.1 only, on
a free port, and is stopped (its whole process group) when the fixture ends.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = float(os.environ.get("WEBUI_START_TIMEOUT", "420"))
REQUEST_TIMEOUT = float(os.environ.get("WEBUI_REQUEST_TIMEOUT", "600"))
CHECKPOINT = "random_sd15.safetensors"
#: What the tests write for the webui: nothing in the checkout, no network.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DIFFUSERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1", "DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
    "GRADIO_ANALYTICS_ENABLED": "False", "COMMANDLINE_ARGS": "", "SAFET2I_SKIP_INSTALL": "1",
    "PYTHONUNBUFFERED": "1", "TORCH_CUDA_ARCH_LIST": "", "CUDA_VISIBLE_DEVICES": "",
}
BASE_ARGS = [
    "--api", "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half",
    "--skip-prepare-environment", "--skip-install", "--skip-version-check", "--skip-python-version-check",
    "--no-download-sd-model", "--do-not-download-clip", "--no-hashing",
]
#: The copy of this repository the webui loads (what a user's ``extensions/`` clone holds).
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "tests",
                                     "benchmarks", "*.egg-info", "out", "safet2i-out", "safet2i-demo")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
CLIP_L_CONFIG = {
    "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768, "logit_scale_init_value": 2.6592,
    "text_config": {"model_type": "clip_text_model", "hidden_size": 768, "intermediate_size": 3072,
                    "num_attention_heads": 12, "num_hidden_layers": 12, "max_position_embeddings": 77,
                    "vocab_size": 49408, "hidden_act": "quick_gelu", "projection_dim": 768,
                    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                      "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "image_size": 224,
                      "hidden_act": "quick_gelu", "projection_dim": 768},
}


# --------------------------------------------------------------------------- environment


def webui_env() -> tuple[Path, str, str]:
    """``(checkout, interpreter, variant)`` or a skip that says what is missing."""
    path, python = os.environ.get("WEBUI_PATH"), os.environ.get("WEBUI_PYTHON")
    if not path or not python:
        pytest.skip("real-webui tests need WEBUI_PATH (an A1111 1.10.x, Forge or reForge checkout) and "
                    "WEBUI_PYTHON (its interpreter, with SafeT2I's dependencies); see docs/a1111.md")
    root = Path(path)
    if not (root / "launch.py").is_file() or not (root / "modules" / "processing.py").is_file():
        pytest.skip(f"WEBUI_PATH={path} is not a webui checkout (no launch.py / modules/processing.py)")
    if not Path(python).is_file():
        pytest.skip(f"WEBUI_PYTHON={python} does not exist")
    return root, python, variant_of(root)


def variant_of(root: Path) -> str:
    if (root / "backend").is_dir() and (root / "modules_forge").is_dir():
        return "forge"
    if (root / "ldm_patched").is_dir() and (root / "modules_forge").is_dir():
        return "reforge"
    return "a1111"


def variant_args(variant: str) -> list[str]:
    # A1111's --use-cpu covers everything; Forge's and reForge's own model management has its
    # own switch (without it they ask torch.cuda for a device).
    return ["--always-cpu"] if variant in ("forge", "reforge") else []


def _tokenizer_source(root: Path) -> Path | None:
    """A CLIP ViT-L/14 tokenizer folder available offline (the webui's own copy first)."""
    candidates = [os.environ.get("WEBUI_CLIP_TOKENIZER")]
    candidates += [root / "backend/huggingface/runwayml/stable-diffusion-v1-5/tokenizer",
                   root / "ldm_patched/modules/sd1_tokenizer", root / "modules/sd1_tokenizer"]
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]) / "comfy/sd1_tokenizer")
    candidates.append(Path("/opt/comfy/comfy/sd1_tokenizer"))
    for c in candidates:
        if c and all((Path(c) / f).is_file() for f in ("vocab.json", "merges.txt")):
            return Path(c)
    return None


def write_hf_cache(hf_home: Path, root: Path) -> Path | None:
    """An HF hub cache holding ``openai/clip-vit-large-patch14``'s tokenizer and config (no
    weights), which A1111's ``FrozenCLIPEmbedder`` asks for by name; with ``HF_HUB_OFFLINE=1``
    transformers reads it from here. Forge and reForge carry their own tokenizer files."""
    src = _tokenizer_source(root)
    if src is None:
        return None
    snap = hf_home / "hub" / "models--openai--clip-vit-large-patch14" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copyfile(src / f, snap / f)
    if not (snap / "tokenizer_config.json").is_file():
        (snap / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "do_lower_case": True}))
    (snap / "config.json").write_text(json.dumps(CLIP_L_CONFIG))
    return src


# --------------------------------------------------------------------------- test-only extension

#: A test-only webui extension (written by the fixture into the temporary data directory):
#: for a prompt containing FACE_MARKER it replaces the generated picture by a photograph with
#: a face in ``postprocess_image``, which the webui runs before SafeT2I's filter
#: (``postprocess_image_after_composite``), so that the filter has something to find in the
#: output of a random-weight model.
FACE_MARKER = "[safet2i-test-face]"
FACE_EXTENSION = '''
"""Test-only (SafeT2I tests/webui): swaps generated pictures for a photograph with a face."""
import os
from PIL import Image
from modules import scripts

PHOTO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "face.png")


class SafeT2ITestFace(scripts.Script):
    def title(self):
        return "SafeT2I test face"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def postprocess_image(self, p, pp, *args):
        if "FACE_MARKER" in str(p.prompt):
            pp.image = Image.open(PHOTO).convert("RGB")
'''.replace("FACE_MARKER", FACE_MARKER)


def write_face_extension(ext_dir: Path) -> Path:
    import skimage.data  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    d = ext_dir / "safet2i-test-face"
    (d / "scripts").mkdir(parents=True)
    (d / "scripts" / "safet2i_test_face.py").write_text(FACE_EXTENSION)
    photo = d / "face.png"
    Image.fromarray(skimage.data.astronaut()).save(photo)
    return photo


# --------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Webui:
    def __init__(self, base: Path, port: int, proc: subprocess.Popen, log: Path, variant: str):
        self.base, self.port, self.proc, self.log, self.variant = base, port, proc, log, variant
        self.url = f"http://127.0.0.1:{port}"
        self.data = base / "data"

    def request(self, method: str, path: str, body=None, timeout: float = REQUEST_TIMEOUT) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw or b"null")
            except ValueError:
                return e.code, raw.decode(errors="replace")

    def get(self, path: str):
        code, out = self.request("GET", path, timeout=60)
        assert code == 200, f"GET {path}: {code} {out}"
        return out

    def txt2img(self, safet2i_args: list | None, prompt: str = "a photo of a nude person", **kw) -> dict:
        """POST /sdapi/v1/txt2img (64 px, 2 steps, Euler); returns the response with ``info``
        parsed and ``pixels`` (one uint8 array per returned image) added."""
        body = {"prompt": prompt, "negative_prompt": "", "steps": 2, "width": 64, "height": 64,
                "sampler_name": "Euler", "cfg_scale": 7.0, "seed": 1234, "batch_size": 1, "n_iter": 1}
        body.update(kw)
        if safet2i_args is not None:
            body["alwayson_scripts"] = {"SafeT2I": {"args": safet2i_args}}
        code, out = self.request("POST", "/sdapi/v1/txt2img", body)
        assert code == 200, f"txt2img failed ({code}): {str(out)[:2000]}\n{self.log_tail()}"
        out["info"] = json.loads(out["info"])
        out["pixels"] = [decode(b64) for b64 in out["images"]]
        return out

    def ready(self) -> bool:
        """Started: the API answers *and* the start-up finished. The webui serves its API routes
        before it has computed the scripts' default arguments and before ``on_app_started``
        callbacks ran (a txt2img request in that window fails with 500 IndexError in
        ``init_script_args``); it prints "Startup time:" after both."""
        try:
            self.get("/sdapi/v1/scripts")
        except (urllib.error.URLError, ConnectionError, OSError, AssertionError):
            return False
        return "Startup time:" in self.log_text()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])


def decode(b64: str):
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def encode_png(array) -> str:
    from PIL import Image  # noqa: PLC0415

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def prepare_data_dir(base: Path, checkpoint: Path) -> Path:
    """The webui's ``--data-dir``: the checkpoint (hard link or copy), this extension (a copy of
    the working tree) and the test-only face extension."""
    data = base / "data"
    sd_dir = data / "models" / "Stable-diffusion"
    sd_dir.mkdir(parents=True)
    for d in ("Lora", "safety_models", "VAE", "embeddings"):
        (data / "models" / d).mkdir(parents=True, exist_ok=True)
    try:
        os.link(checkpoint, sd_dir / CHECKPOINT)
    except OSError:
        shutil.copyfile(checkpoint, sd_dir / CHECKPOINT)
    ext = data / "extensions"
    # SAFET2I_WEBUI_SOURCE: another tree of this repository to install (e.g. a `git archive` of
    # a commit) instead of this working tree.
    shutil.copytree(Path(os.environ.get("SAFET2I_WEBUI_SOURCE") or REPO), ext / "safet2i", ignore=COPY_IGNORE)
    write_face_extension(ext)
    return data


@contextlib.contextmanager
def start_webui(base: Path, checkpoint: Path, extra_args: list[str] | None = None):
    root, python, variant = webui_env()
    data = prepare_data_dir(base, checkpoint)
    hf_home = base / "hf"
    hf_home.mkdir()
    if write_hf_cache(hf_home, root) is None and variant == "a1111":
        pytest.skip("A1111 needs the CLIP ViT-L/14 tokenizer offline: set WEBUI_CLIP_TOKENIZER to a folder with "
                    "its vocab.json and merges.txt (e.g. ComfyUI's comfy/sd1_tokenizer)")
    port = free_port()
    log = base / "webui.log"
    env = dict(os.environ, **OFFLINE_ENV, HF_HOME=str(hf_home), SD_WEBUI_CACHE_FILE=str(data / "cache.json"))
    env.pop("WEBUI_LAUNCH_LIVE_OUTPUT", None)
    cmd = [python, "launch.py", *BASE_ARGS, *variant_args(variant),
           "--data-dir", str(data), "--ckpt", str(data / "models" / "Stable-diffusion" / CHECKPOINT),
           "--server-name", "127.0.0.1", "--port", str(port),
           *os.environ.get("WEBUI_EXTRA_ARGS", "").split(), *(extra_args or [])]
    fh = open(log, "w")  # noqa: SIM115 - closed when the server stops
    proc = subprocess.Popen(cmd, cwd=root, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    server = Webui(base, port, proc, log, variant)
    try:
        deadline = time.time() + START_TIMEOUT
        while not server.ready():
            if proc.poll() is not None:
                pytest.fail(f"the webui exited with {proc.returncode} while starting:\n{server.log_tail()}")
            if time.time() > deadline:
                pytest.fail(f"the webui did not finish starting within {START_TIMEOUT:.0f} s:\n{server.log_tail()}")
            time.sleep(1.0)
        scripts = server.get("/sdapi/v1/scripts")
        text = server.log_text()
        broken = [ln for ln in text.splitlines() if "Error loading script: safet2i" in ln
                  or ("SafeT2I" in ln and ("Traceback" in ln or "error" in ln.lower()))]
        if broken or "safet2i" not in scripts.get("txt2img", []):
            pytest.fail("SafeT2I did not load cleanly in the webui:\n" + "\n".join(broken) + "\n" + server.log_tail())
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        fh.close()
        (data / "models" / "Stable-diffusion" / CHECKPOINT).unlink(missing_ok=True)
