"""Operator enforcement (issue 19) in a real ComfyUI server: with ``SAFET2I_ENFORCE`` set,
every IMAGE reaching any output node is filtered, whatever the workflow or the API ask for.

``face-only`` on a benign face picture (the astronaut) stands for an unsafe image; the main
server enforces it with action ``black``, so a censored output is all black.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import struct
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from . import conftest

pytestmark = pytest.mark.integration


start_server = conftest.start_server


FILTER, LOADER = "SafeT2IImageFilter", "SafeT2IFilterModelLoader"
DENIED = "SaveLatent"     # writes latents: no IMAGE to filter, so the operator refuses it


def _pictures(server) -> None:
    import skimage.data
    from PIL import Image

    Image.fromarray(skimage.data.astronaut()).save(server.input_dir / "astronaut.png")
    Image.fromarray(skimage.data.chelsea()).save(server.input_dir / "chelsea.png")


def _toml(path, **kv) -> str:
    lines = []
    for k, v in kv.items():
        lines.append(f"{k} = {json.dumps(v)}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


#: What the servers that test sampler previews add to ComfyUI's command line: without
#: enforcement the samplers then send a latent2rgb preview at every step.
LATENT2RGB = ["--preview-method", "latent2rgb"]


@pytest.fixture(scope="module")
def tiny_sd15(tmp_path_factory):
    """A tiny random SD1.x checkpoint (``make_tiny_sd15.py``, ~3 s), linked into each sampling server."""
    path, python = conftest._comfy_env()
    out = tmp_path_factory.mktemp("tiny_sd15") / "tiny_sd15.safetensors"
    subprocess.run([python, str(Path(conftest.__file__).with_name("make_tiny_sd15.py")), str(out)],
                   cwd=path, check=True, capture_output=True, timeout=300)
    return out


def _link_checkpoint(server, ckpt: Path) -> str:
    (server.base / "checkpoints" / ckpt.name).symlink_to(ckpt)
    return ckpt.name


@pytest.fixture(scope="module")
def enforced(tmp_path_factory, tiny_sd15):
    """Enforcement on (face-only, black, previews off) on a server started with latent2rgb previews."""
    base = tmp_path_factory.mktemp("enforced")
    cfg = _toml(base / "enforce.toml", policy="face-only", action="black", models=["nudenet"], providers="cpu",
                previews="off", audit_log=str(base / "audit.jsonl"), deny_nodes=[DENIED])
    with start_server(base / "srv", {"SAFET2I_ENFORCE": cfg}, extra_args=LATENT2RGB) as server:
        server.audit = base / "audit.jsonl"
        server.ckpt = _link_checkpoint(server, tiny_sd15)
        _pictures(server)
        yield server


def view(server, im: dict) -> np.ndarray:
    from PIL import Image

    q = urllib.parse.urlencode({"filename": im["filename"], "subfolder": im.get("subfolder", ""),
                                "type": im.get("type", "output")})
    with urllib.request.urlopen(f"{server.url}/view?{q}", timeout=30) as r:
        return np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))


def images_of(server, entry: dict, node: str) -> list[np.ndarray]:
    return [view(server, im) for im in entry["outputs"].get(node, {}).get("images", [])]


def audit(server) -> list[dict]:
    return [json.loads(ln) for ln in server.audit.read_text().splitlines() if ln.strip()]


def ok(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    return entry


def load(image="astronaut.png"):
    return {"class_type": "LoadImage", "inputs": {"image": image}}


def filter_node(src, policy="face-only", action="black", expand=0.5):
    return {"class_type": FILTER, "inputs": {
        "images": src, "filter_models": ["2", 0], "policy": policy, "action": action, "thresholds": "",
        "expand": expand, "mask_shape": "rect", "feather": 0.0, "strength": 0.0}}


LOADER_NODE = {"class_type": LOADER, "inputs": {"model": "nudenet", "providers": "cpu"}}


def test_startup_log_says_enforcement_is_on(enforced):
    log = enforced.log.read_text()
    assert "SafeT2I enforcement ON" in log and "policy face-only" in log and "action black" in log


def test_workflow_without_safet2i_node_saves_censored(enforced):
    entry = ok(enforced.run({"1": load(), "2": {"class_type": "SaveImage",
                                                 "inputs": {"images": ["1", 0], "filename_prefix": "plain"}}}))
    (img,) = images_of(enforced, entry, "2")
    assert img.shape == (512, 512, 3) and img.max() == 0
    # What the disk holds is what /view served: nothing unfiltered was written.
    for p in enforced.output_dir.glob("plain*.png"):
        from PIL import Image

        assert np.asarray(Image.open(p)).max() == 0
    rec = [r for r in audit(enforced) if r.get("node_id") == "2" and r.get("node") == "SaveImage"]
    assert rec and rec[-1]["verdict"] == "censored" and "FACE_FEMALE" in rec[-1]["labels"]
    assert rec[-1]["action"] == "black" and rec[-1]["policy"] == "face-only" and rec[-1]["prompt_id"]


def test_safe_picture_passes_unchanged(enforced):
    import skimage.data

    entry = ok(enforced.run({"1": load("chelsea.png"), "2": {
        "class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "cat"}}}))
    (img,) = images_of(enforced, entry, "2")
    assert np.array_equal(img, skimage.data.chelsea())


def test_preview_image_is_censored(enforced):
    entry = ok(enforced.run({"1": load(), "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}))
    ims = entry["outputs"]["2"]["images"]
    assert ims and ims[0]["type"] == "temp"
    assert view(enforced, ims[0]).max() == 0


def test_mask_preview_is_censored(enforced):
    """A MASK is a picture too: ImageToMask(red) -> MaskPreview (ComfyUI's own nodes) saves the
    censored grey image, not the face."""
    entry = ok(enforced.run({"1": load(), "2": {"class_type": "ImageToMask", "inputs": {"image": ["1", 0],
                                                                                     "channel": "red"}},
                             "3": {"class_type": "MaskPreview", "inputs": {"mask": ["2", 0]}}}))
    ims = entry["outputs"]["3"]["images"]
    assert ims and view(enforced, ims[0]).max() == 0
    rec = [r for r in audit(enforced) if r.get("node") == "MaskPreview"]
    assert rec and rec[-1]["verdict"] == "censored"


def test_batch_is_checked_image_by_image(enforced):
    entry = ok(enforced.run({"1": load("chelsea.png"), "3": load(), "4": {
        "class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["3", 0]}}, "5": {
        "class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "batch"}}}))
    cat, face = images_of(enforced, entry, "5")
    assert cat.max() > 100 and face.max() == 0


def test_parallel_branch_saving_before_the_filter_is_censored(enforced):
    entry = ok(enforced.run({
        "1": load(), "2": LOADER_NODE,
        "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "early"}},
        "4": filter_node(["1", 0]),
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "late"}},
    }))
    assert images_of(enforced, entry, "3")[0].max() == 0
    assert images_of(enforced, entry, "5")[0].max() == 0


@pytest.mark.parametrize("probe", ["SafeT2ITestEnforceProbe", "SafeT2ITestEnforceProbeV3"])
def test_third_party_output_node_gets_censored_pixels(enforced, probe):
    from PIL import Image

    name = f"probe_{probe}"
    ok(enforced.run({"1": load(), "2": {"class_type": probe, "inputs": {"images": ["1", 0], "name": name}}}))
    assert np.asarray(Image.open(enforced.output_dir / f"{name}.png")).max() == 0
    assert any(r.get("node") == probe and r["verdict"] == "censored" for r in audit(enforced))


def test_video_output_node_gets_censored_frames(enforced):
    from PIL import Image

    ok(enforced.run({"1": load(), "2": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 8.0}},
                     "3": {"class_type": "SafeT2ITestEnforceVideoProbe",
                           "inputs": {"video": ["2", 0], "name": "probe_video"}}}))
    assert np.asarray(Image.open(enforced.output_dir / "probe_video.png")).max() == 0


DECODE_MP4 = ("import av, numpy as np, sys\n"
              "with av.open(sys.argv[1]) as c:\n"
              "    np.save(sys.argv[2], np.stack([f.to_ndarray(format='rgb24') for f in c.decode(video=0)]))\n")


def test_video_filter_asking_for_weaker_settings_is_overridden(enforced, tmp_path):
    """A SafeT2IVideoFilter asking for strict-5 (ignores faces) and 'pass' runs with the operator's
    face-only and black; the attempt is logged and the VIDEO saved downstream is censored."""
    import skimage.data
    from PIL import Image

    cat = np.asarray(Image.fromarray(skimage.data.chelsea()).resize((512, 512)))
    Image.fromarray(cat).save(enforced.input_dir / "vf_cat.png")
    batch = lambda a, b: {"class_type": "ImageBatch", "inputs": {"image1": [a, 0], "image2": [b, 0]}}  # noqa: E731
    entry = ok(enforced.run({
        "1": load("vf_cat.png"), "2": LOADER_NODE, "3": load(),
        "4": batch("1", "1"), "5": batch("4", "3"), "6": batch("5", "4"),      # [cat, cat, face, cat, cat]
        "7": {"class_type": "SafeT2IVideoFilter", "inputs": {
            "filter_models": ["2", 0], "policy": "strict-5", "action": "pass", "window": 0, "thresholds": "",
            "expand": 0.1, "mask_shape": "rect", "feather": 0.0, "strength": 0.0, "fps": 8.0,
            "images": ["6", 0]}},
        "8": {"class_type": "SaveVideo", "inputs": {"video": ["7", 5], "filename_prefix": "vf_weak",
                                                    "format": "mp4", "codec": "h264"}}}))
    text = "\n".join(entry["outputs"]["7"]["text"])
    # It ran with face-only (strict-5 ignores faces) and black, not pass.
    assert "5 frame(s) from images" in text and "1 unsafe, 1 censored (window 0, action black)" in text, text
    assert "frame 2: UNSAFE" in text and "FACE_FEMALE" in text, text
    log = enforced.log.read_text()
    assert re.search(r"SafeT2IVideoFilter asked for policy 'strict-5' \(.*\), action 'pass': weaker", log), \
        [ln for ln in log.splitlines() if "asked for" in ln]
    # The operator's check at SaveVideo found the filter's frames already censored to its standard.
    rec = [r for r in audit(enforced) if r.get("node") == "SaveVideo" and r.get("node_id") == "8"]
    assert rec and rec[-1]["verdict"] == "reused", rec
    # What the file on disk holds, decoded with ComfyUI's own PyAV.
    (mp4,) = enforced.output_dir.glob("vf_weak*.mp4")
    subprocess.run([os.environ["COMFYUI_PYTHON"], "-c", DECODE_MP4, str(mp4), str(tmp_path / "f.npy")],
                   check=True, timeout=120, capture_output=True)
    frames = np.load(tmp_path / "f.npy")
    assert frames.shape == (5, 512, 512, 3)
    assert frames[2].max() <= 16, frames[2].max()                                # the face frame: black
    for t in (0, 1, 3, 4):
        assert np.abs(frames[t].astype(int) - cat.astype(int)).mean() < 6, t     # the cat, through h264


def test_filter_node_asking_for_weaker_settings_is_overridden(enforced):
    # strict-5 ignores faces and 'pass' censors nothing: both weaker than the operator's.
    entry = ok(enforced.run({"1": load(), "2": LOADER_NODE, "3": filter_node(["1", 0], "strict-5", "pass"),
                             "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "weak"}}}))
    text = "\n".join(entry["outputs"]["3"]["text"])
    assert "1 unsafe" in text and "FACE_FEMALE" in text     # ran with face-only, not strict-5
    assert images_of(enforced, entry, "4")[0].max() == 0
    assert "SafeT2IImageFilter asked for policy 'strict-5'" in enforced.log.read_text()


def test_filter_node_upstream_is_not_run_twice(enforced):
    entry = ok(enforced.run({"1": load(), "2": LOADER_NODE, "3": filter_node(["1", 0]),
                             "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "once"}}}))
    assert images_of(enforced, entry, "4")[0].max() == 0
    rec = [r for r in audit(enforced) if r.get("node_id") == "4"][-1]
    assert rec["verdict"] == "reused", rec


def test_denied_node_is_refused_at_queue_time(enforced):
    code, resp = enforced.post_prompt({
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": DENIED, "inputs": {"samples": ["1", 0], "filename_prefix": "denied_latent"}}})
    assert code == 400
    assert DENIED in json.dumps(resp) and "SafeT2I enforcement" in resp["error"]["message"]
    assert not list(enforced.output_dir.rglob("denied_latent*"))


def test_audit_log_has_no_image_data(enforced):
    recs = audit(enforced)
    assert recs
    for r in recs:
        assert {"time", "prompt_id", "node", "node_id", "verdict", "action"} <= set(r), r
        assert len(json.dumps(r)) < 20000


def test_block_writes_nothing_and_says_why(tmp_path):
    with start_server(tmp_path / "srv", {"SAFET2I_ENFORCE": "face-only", "SAFET2I_ENFORCE_ACTION": "block"}) as srv:
        _pictures(srv)
        assert "action block" in srv.log.read_text()
        entry = srv.run({"1": load(), "2": {"class_type": "SaveImage",
                                             "inputs": {"images": ["1", 0], "filename_prefix": "blocked"}}})
        assert entry["status"]["status_str"] == "error"
        msgs = json.dumps(entry["status"]["messages"])
        assert "EnforcementBlocked" in msgs and "blocked the output" in msgs and "FACE_FEMALE" in msgs
        assert not list(srv.output_dir.rglob("*.png"))
        # A safe picture still goes through.
        ok(srv.run({"1": load("chelsea.png"), "2": {"class_type": "SaveImage",
                                                     "inputs": {"images": ["1", 0], "filename_prefix": "cat"}}}))
        assert len(list(srv.output_dir.rglob("cat*.png"))) == 1


def test_filter_model_missing_refuses_every_prompt(tmp_path):
    cfg = _toml(tmp_path / "enforce.toml", policy="face-only", action="blur", models=["does-not-exist.json"])
    with start_server(tmp_path / "srv", {"SAFET2I_ENFORCE": cfg}) as srv:
        _pictures(srv)
        assert "SafeT2I enforcement FAILED to load" in srv.log.read_text()
        code, resp = srv.post_prompt({"1": load(), "2": {"class_type": "SaveImage",
                                                          "inputs": {"images": ["1", 0], "filename_prefix": "x"}}})
        assert code == 400, resp
        msg = resp["error"]["message"]
        assert "could not be loaded" in msg and "does-not-exist.json" in msg and "refused" in msg
        assert not list(srv.output_dir.rglob("*.png"))


def test_enforcement_off_is_bit_identical(comfy, astronaut_input):
    import skimage.data
    from PIL import Image

    assert "SafeT2I enforcement" not in comfy.log.read_text()
    entry = ok(comfy.run({"1": load(astronaut_input), "2": {
        "class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "off"}}}))
    (im,) = entry["outputs"]["2"]["images"]
    saved = np.asarray(Image.open(comfy.output_dir / im["subfolder"] / im["filename"]).convert("RGB"))
    assert np.array_equal(saved, skimage.data.astronaut())


# -- live previews --------------------------------------------------------------------------

def _ws_send_text(sock, text: str) -> None:
    """One masked text frame (a client must mask what it sends)."""
    payload, mask = text.encode(), os.urandom(4)
    n = len(payload)
    head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n))
    sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


def _ws_messages(server, prompt: dict, timeout: float = 120.0, features: dict | None = None) -> tuple[list, list]:
    """Run ``prompt`` as a websocket client (a minimal RFC 6455 client on loopback) and return
    the (json, binary) messages the server sent it until the prompt finished. ``features``:
    feature flags the client announces first (``{"supports_preview_metadata": True}`` gets
    previews as PREVIEW_IMAGE_WITH_METADATA, as ComfyUI's own frontend does)."""
    import base64

    cid = uuid.uuid4().hex
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws?clientId={cid} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(4096)
    head, buf = buf.split(b"\r\n\r\n", 1)
    assert b" 101 " in head.split(b"\r\n")[0], head

    def read(n):
        nonlocal buf
        while len(buf) < n:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("websocket closed")
            buf += chunk
        out, buf = buf[:n], buf[n:]
        return out

    def frame():
        b0, b1 = read(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack(">H", read(2))
        elif n == 127:
            (n,) = struct.unpack(">Q", read(8))
        return b0 & 0x0F, read(n)

    texts, binaries = [], []
    try:
        if features is not None:
            _ws_send_text(sock, json.dumps({"type": "feature_flags", "data": features}))
            deadline = time.time() + 30
            while time.time() < deadline:   # the server answers once it has stored the client's flags
                op, payload = frame()
                if op == 1:
                    texts.append(json.loads(payload))
                    if texts[-1].get("type") == "feature_flags":
                        break
            else:
                raise TimeoutError("no feature_flags answer")
        body = json.dumps({"prompt": prompt, "client_id": cid}).encode()
        req = urllib.request.Request(server.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            pid = json.loads(r.read())["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            op, payload = frame()
            if op == 1:
                msg = json.loads(payload)
                texts.append(msg)
                if msg.get("type") == "executing" and msg["data"].get("node") is None \
                        and msg["data"].get("prompt_id") == pid:
                    break
                if msg.get("type") in ("execution_error", "execution_success") and msg["data"].get("prompt_id") == pid:
                    break
            elif op == 2:
                binaries.append(payload)
            elif op == 8:
                break
    finally:
        sock.close()
    return texts, binaries


def _preview_prompt(image: str = "astronaut.png") -> dict:
    return {"1": load(image), "2": {"class_type": "SafeT2ITestPreviewProbe", "inputs": {"images": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "pv"}}}


def _previews(binaries: list) -> list[tuple[int, dict | None, np.ndarray]]:
    """Every preview image among the binary messages: (event type, metadata or None, RGB pixels)."""
    from PIL import Image

    out = []
    for b in binaries:
        (event,) = struct.unpack(">I", b[:4])
        if event == 1:
            out.append((event, None, np.asarray(Image.open(io.BytesIO(b[8:])).convert("RGB"))))
        elif event == 4:
            (n,) = struct.unpack(">I", b[4:8])
            meta = json.loads(b[8:8 + n])
            out.append((event, meta, np.asarray(Image.open(io.BytesIO(b[8 + n:])).convert("RGB"))))
        elif event == 2:       # UNENCODED_PREVIEW_IMAGE never goes out as such: count it as a preview
            out.append((event, None, np.zeros((1, 1, 3), np.uint8)))
    return out


def _preview_images(binaries: list) -> list[np.ndarray]:
    return [im for _, _, im in _previews(binaries)]


def _block_std(pv: np.ndarray, n: int = 8) -> float:
    """Largest per-channel standard deviation inside the n x n blocks of a square preview."""
    s = pv.shape[0] // n
    return float(pv[:n * s, :n * s].reshape(n, s, n, s, 3).astype(float).std(axis=(1, 3)).max())


@pytest.fixture(scope="module")
def blurred(tmp_path_factory, tiny_sd15):
    """Enforcement on with ``previews = "blur"`` (action blur) on a server started with latent2rgb previews."""
    base = tmp_path_factory.mktemp("blurred")
    cfg = _toml(base / "enforce.toml", policy="face-only", action="blur", previews="blur", providers="cpu")
    with start_server(base / "srv", {"SAFET2I_ENFORCE": cfg}, extra_args=LATENT2RGB) as server:
        server.ckpt = _link_checkpoint(server, tiny_sd15)
        _pictures(server)
        yield server


@pytest.fixture(scope="module")
def control(tmp_path_factory, tiny_sd15):
    """No enforcement, latent2rgb previews: what the samplers send when nothing intervenes."""
    with start_server(tmp_path_factory.mktemp("control") / "srv", extra_args=LATENT2RGB) as server:
        server.ckpt = _link_checkpoint(server, tiny_sd15)
        yield server


def test_previews_reach_the_client_without_enforcement(comfy, astronaut_input):
    texts, binaries = _ws_messages(comfy, _preview_prompt(astronaut_input))
    (pv,) = _preview_images(binaries)
    import skimage.data

    assert np.abs(pv.astype(int) - skimage.data.astronaut().astype(int)).mean() < 4   # the real picture


def test_previews_off_sends_no_preview(enforced):
    texts, binaries = _ws_messages(enforced, _preview_prompt())
    assert any(t.get("type") == "progress" for t in texts)       # the probe did report progress
    assert _preview_images(binaries) == []


def test_previews_blur_sends_only_a_coarse_mosaic(blurred):
    import skimage.data

    texts, binaries = _ws_messages(blurred, _preview_prompt())
    (pv,) = _preview_images(binaries)
    assert pv.shape == (512, 512, 3)
    assert _block_std(pv) < 8          # 8x8 flat blocks: no detail left
    orig = skimage.data.astronaut()
    # and the saved image (action blur) is censored in the face only.
    entry = ok(blurred.run({"1": load(), "2": {"class_type": "SaveImage",
                                               "inputs": {"images": ["1", 0], "filename_prefix": "blurred"}}}))
    (img,) = images_of(blurred, entry, "2")
    diff = np.abs(img.astype(int) - orig.astype(int)).max(axis=2) > 8
    ys, xs = np.nonzero(diff)
    assert diff.sum() > 2000 and 140 < xs.min() and xs.max() < 310 and 50 < ys.min() and ys.max() < 220


# -- sampler latent previews (KSampler on the tiny SD1.5 checkpoint, --preview-method latent2rgb) --

STEPS, SAMPLER = 4, "105"
#: How the client asks for previews: the old PREVIEW_IMAGE message, or (as ComfyUI's frontend
#: does) PREVIEW_IMAGE_WITH_METADATA. Each gets its own seed, so that every run samples anew.
CLIENTS = {"legacy": (None, 11), "metadata": ({"supports_preview_metadata": True}, 12)}


def _sampler_prompt(ckpt: str, seed: int) -> dict:
    return {
        "101": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "102": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["101", 1], "text": "a photo of a person"}},
        "103": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["101", 1], "text": ""}},
        "104": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
        SAMPLER: {"class_type": "KSampler", "inputs": {
            "model": ["101", 0], "positive": ["102", 0], "negative": ["103", 0], "latent_image": ["104", 0],
            "seed": seed, "steps": STEPS, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "106": {"class_type": "VAEDecode", "inputs": {"samples": [SAMPLER, 0], "vae": ["101", 2]}},
        "107": {"class_type": "SaveImage", "inputs": {"images": ["106", 0], "filename_prefix": f"ks{seed}"}},
    }


def _sample(server, client: str, seed_offset: int = 0) -> tuple[list, list]:
    """Run the KSampler workflow once per (server, client) and keep what the websocket got."""
    runs = server.__dict__.setdefault("sampler_runs", {})
    if client not in runs:
        features, seed = CLIENTS[client]
        texts, binaries = _ws_messages(server, _sampler_prompt(server.ckpt, seed + seed_offset), features=features)
        types = [t.get("type") for t in texts]
        assert "execution_error" not in types and "execution_success" in types, texts[-3:]
        steps = [t["data"]["value"] for t in texts if t.get("type") == "progress" and t["data"].get("node") == SAMPLER]
        assert steps == list(range(1, STEPS + 1)), steps       # the sampler reported every step
        runs[client] = (texts, _previews(binaries))
    return runs[client]


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_sampler_previews_reach_the_client_without_enforcement(control, client):
    _, previews = _sample(control, client)
    assert len(previews) == STEPS                              # one latent2rgb preview per step
    event = 4 if client == "metadata" else 1
    for ev, meta, pv in previews:
        assert ev == event and pv.shape == (512, 512, 3)      # a 32x32 latent scaled to --preview-size
        assert _block_std(pv) > 15                              # detail within each 64-pixel block
        if meta is not None:
            assert meta["node_id"] == SAMPLER and meta["image_type"] == "image/jpeg"
    assert np.abs(previews[0][2].astype(int) - previews[-1][2].astype(int)).mean() > 2   # the steps differ


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_sampler_previews_off_sends_none_but_progress(enforced, client):
    # --preview-method latent2rgb is on the command line (as on the control server, whose sampler
    # sends a preview every step); enforcement's previews = "off" wins.
    argv = enforced.get("/system_stats")["system"]["argv"]
    assert argv[argv.index("--preview-method") + 1] == "latent2rgb", argv
    _, previews = _sample(enforced, client, seed_offset=100)   # asserts the progress of every step
    assert previews == []


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_sampler_previews_blur_are_mosaics_of_the_latent2rgb_preview(blurred, control, client):
    _, ctrl = _sample(control, client)
    _, got = _sample(blurred, client)                          # same workflow, same seed
    assert len(got) == len(ctrl) == STEPS
    for (ev, meta, pv), (cev, cmeta, cpv) in zip(got, ctrl):
        assert ev == cev and pv.shape == cpv.shape == (512, 512, 3)
        if meta is not None:                                    # the metadata is kept (node, prompt)
            assert {k: v for k, v in meta.items() if k != "prompt_id"} == \
                   {k: v for k, v in cmeta.items() if k != "prompt_id"}
        assert _block_std(pv) < 8 < 15 < _block_std(cpv)       # flat 8x8 mosaic; the real one has detail
        assert np.abs(pv.astype(int) - cpv.astype(int)).mean() > 20         # not the sampler's preview
        # ... but its mosaic: each block is the mean colour of that block of the latent2rgb preview.
        want = cpv.reshape(8, 64, 8, 64, 3).astype(float).mean(axis=(1, 3))
        have = pv.reshape(8, 64, 8, 64, 3)[:, 8:56, :, 8:56].astype(float).mean(axis=(1, 3))
        assert np.abs(have - want).max() < 4, np.abs(have - want).max()
