"""Operator enforcement (issue 19) in a real ComfyUI server: with ``SAFET2I_ENFORCE`` set,
every IMAGE reaching any output node is filtered, whatever the workflow or the API ask for.

``face-only`` on a benign face picture (the astronaut) stands for an unsafe image; the main
server enforces it with action ``black``, so a censored output is all black.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import time
import urllib.parse
import uuid
import urllib.request

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


@pytest.fixture(scope="module")
def enforced(tmp_path_factory):
    base = tmp_path_factory.mktemp("enforced")
    cfg = _toml(base / "enforce.toml", policy="face-only", action="black", models=["nudenet"], providers="cpu",
                previews="off", audit_log=str(base / "audit.jsonl"), deny_nodes=[DENIED])
    with start_server(base / "srv", {"SAFET2I_ENFORCE": cfg}) as server:
        server.audit = base / "audit.jsonl"
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


def test_filter_node_asking_for_weaker_settings_is_overridden(enforced):
    # strict-5 ignores faces and 'pass' censors nothing: both weaker than the operator's.
    entry = ok(enforced.run({"1": load(), "2": LOADER_NODE, "3": filter_node(["1", 0], "strict-5", "pass"),
                             "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "weak"}}}))
    text = "\n".join(entry["outputs"]["3"]["text"])
    assert "1 unsafe" in text and "FACE_FEMALE" in text     # ran with face-only, not strict-5
    assert images_of(enforced, entry, "4")[0].max() == 0
    assert "asked for policy 'strict-5'" in enforced.log.read_text()


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

def _ws_messages(server, prompt: dict, timeout: float = 120.0) -> tuple[list, list]:
    """Run ``prompt`` as a websocket client (a minimal RFC 6455 client on loopback) and return
    the (json, binary) messages the server sent it until the prompt finished."""
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

    body = json.dumps({"prompt": prompt, "client_id": cid}).encode()
    req = urllib.request.Request(server.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        pid = json.loads(r.read())["prompt_id"]
    texts, binaries = [], []
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            b0, b1 = read(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack(">H", read(2))
            elif n == 127:
                (n,) = struct.unpack(">Q", read(8))
            payload, op = read(n), b0 & 0x0F
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


def _preview_images(binaries: list) -> list[np.ndarray]:
    from PIL import Image

    out = []
    for b in binaries:
        (event,) = struct.unpack(">I", b[:4])
        if event == 1:
            out.append(np.asarray(Image.open(io.BytesIO(b[8:])).convert("RGB")))
        elif event == 4:
            (n,) = struct.unpack(">I", b[4:8])
            out.append(np.asarray(Image.open(io.BytesIO(b[8 + n:])).convert("RGB")))
    return out


def test_previews_reach_the_client_without_enforcement(comfy, astronaut_input):
    texts, binaries = _ws_messages(comfy, _preview_prompt(astronaut_input))
    (pv,) = _preview_images(binaries)
    import skimage.data

    assert np.abs(pv.astype(int) - skimage.data.astronaut().astype(int)).mean() < 4   # the real picture


def test_previews_off_sends_no_preview(enforced):
    texts, binaries = _ws_messages(enforced, _preview_prompt())
    assert any(t.get("type") == "progress" for t in texts)       # the probe did report progress
    assert _preview_images(binaries) == []


def test_previews_blur_sends_only_a_coarse_mosaic(tmp_path):
    import skimage.data

    cfg = _toml(tmp_path / "enforce.toml", policy="face-only", action="blur", previews="blur", providers="cpu")
    with start_server(tmp_path / "srv", {"SAFET2I_ENFORCE": cfg}) as srv:
        _pictures(srv)
        texts, binaries = _ws_messages(srv, _preview_prompt())
        (pv,) = _preview_images(binaries)
        assert pv.shape == (512, 512, 3)
        blocks = pv.reshape(8, 64, 8, 64, 3).astype(float)
        assert blocks.std(axis=(1, 3)).max() < 8          # 8x8 flat blocks: no detail left
        orig = skimage.data.astronaut()
        # and the saved image (action blur) is censored in the face only.
        entry = ok(srv.run({"1": load(), "2": {"class_type": "SaveImage",
                                                "inputs": {"images": ["1", 0], "filename_prefix": "blurred"}}}))
        (img,) = images_of(srv, entry, "2")
        diff = np.abs(img.astype(int) - orig.astype(int)).max(axis=2) > 8
        ys, xs = np.nonzero(diff)
        assert diff.sum() > 2000 and 140 < xs.min() and xs.max() < 310 and 50 < ys.min() and ys.max() < 220
