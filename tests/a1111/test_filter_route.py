"""``POST /safet2i/filter`` is bounded and served only where intended (issue 14, class 8).

The route runs on the webui stand-in's FastAPI app (``fakewebui/fastapi``: requests are
delivered as a server would, with or without ``Content-Length``). A benign face (scikit-image's
astronaut) stands for "unsafe" under the ``face-only`` policy.
"""

from __future__ import annotations

import base64
import io
import logging
import struct
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import VARIANTS

ROUTE = "/safet2i/filter"


def png_b64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def small(picture: np.ndarray, side: int = 256) -> np.ndarray:
    return np.asarray(Image.fromarray(picture).convert("RGB").resize((side, side), Image.LANCZOS))


def declared_png(width: int, height: int) -> bytes:
    """A few hundred bytes whose header declares ``width`` x ``height`` RGB pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (1 + 3 * min(width, 4096)) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture
def api(start):
    return start("a1111-1.10", argv=("--api",))


@pytest.fixture
def safe_b64(coffee):
    return png_b64(small(coffee, 64))


# ----------------------------------------------------------------------- where it is served

@pytest.mark.parametrize("variant", VARIANTS)
def test_not_served_without_the_webui_api(start, variant, safe_b64):
    webui = start(variant)
    assert ROUTE not in webui.app.routes
    r = webui.app.client.post(ROUTE, json={"image": safe_b64})
    assert r.status_code == 404


@pytest.mark.parametrize("flag", ["--api", "--nowebui"])
def test_served_with_api_or_nowebui(start, flag, safe_b64):
    webui = start("forge", argv=(flag,))
    r = webui.app.client.post(ROUTE, json={"image": safe_b64, "policy": "face-only"})
    assert r.status_code == 200 and r.json()["verdict"] == "safe"
    assert webui.app.route_kwargs[ROUTE] == {}          # no --api-auth: no credentials asked


def test_a_face_is_censored_under_face_only(api, astronaut):
    face = small(astronaut)
    r = api.app.client.post(ROUTE, json={"image": "data:image/png;base64," + png_b64(face),
                                         "policy": "face-only", "action": "blur"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["verdict"] == "censored" and body["labels"] == ["FACE_FEMALE"] and 0.5 < body["cost"] <= 1
    assert (body["policy"], body["action"]) == ("face-only", "blur")
    assert [f["verdict"] for f in body["frames"]] == ["censored"]
    out = Image.open(io.BytesIO(base64.b64decode(body["image"])))
    assert out.format == "PNG" and getattr(out, "n_frames", 1) == 1
    out = np.asarray(out.convert("RGB"))
    assert out.shape == face.shape and not np.array_equal(out, face)


def test_every_frame_is_filtered_and_returned(api, astronaut, coffee):
    """A face hidden in the second frame of an animation is found and censored; the answer is
    an animated PNG holding every checked frame with the input's timing."""
    safe, face = small(coffee), small(astronaut)
    buf = io.BytesIO()
    Image.fromarray(safe).save(buf, "PNG", save_all=True, append_images=[Image.fromarray(face)],
                               duration=[120, 80], loop=0)
    r = api.app.client.post(ROUTE, json={"image": base64.b64encode(buf.getvalue()).decode(),
                                         "policy": "face-only", "action": "black"})
    assert r.status_code == 200
    body = r.json()
    assert [f["verdict"] for f in body["frames"]] == ["safe", "censored"]
    assert body["verdict"] == "censored" and body["labels"] == ["FACE_FEMALE"]
    out = Image.open(io.BytesIO(base64.b64decode(body["image"])))
    assert out.n_frames == 2
    frames, durations = [], []
    for i in range(2):
        out.seek(i)
        frames.append(np.asarray(out.convert("RGB")))
        durations.append(out.info.get("duration"))
    assert np.array_equal(frames[0], safe)                    # checked and safe: the same pixels
    assert not np.array_equal(frames[1], face)                # the face frame is censored
    assert durations == [120, 80]


def test_pages_of_different_sizes_are_not_drawn_over_each_other(api, coffee):
    """A multi-page TIFF with pages of two sizes: each checked page alone on a black canvas."""
    big, little = small(coffee, 64), small(coffee, 32)[:, :24]
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "TIFF", save_all=True, append_images=[Image.fromarray(little)])
    r = api.app.client.post(ROUTE, json={"image": base64.b64encode(buf.getvalue()).decode(), "policy": "face-only"})
    assert r.status_code == 200
    body = r.json()
    assert [(f["width"], f["height"]) for f in body["frames"]] == [(64, 64), (24, 32)]
    out = Image.open(io.BytesIO(base64.b64decode(body["image"])))
    assert out.n_frames == 2 and out.size == (64, 64)
    out.seek(1)
    second = np.asarray(out.convert("RGB"))
    assert np.array_equal(second[:32, :24], little)
    assert not second[32:].any() and not second[:, 24:].any()     # black, not the first page


def test_an_internal_failure_is_500_without_an_image(api, monkeypatch, safe_b64):
    route = sys.modules["safet2i_a1111.route"]

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(route, "_encode_frames", broken)
    r = api.app.client.post(ROUTE, json={"image": safe_b64})
    assert r.status_code == 500 and "image" not in r.json() and "disk full" in r.json()["error"]


# ----------------------------------------------------------------------- bounded

def test_body_limit_by_content_length_refused_unread(start, monkeypatch, safe_b64):
    monkeypatch.setenv("SAFET2I_API_MAX_BODY", "16_384")
    webui = start("a1111-1.10", argv=("--api",))
    payload = b'{"image": "' + b"A" * 16_372 + b'"}'
    r = webui.app.client.post(ROUTE, content=payload, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "SAFET2I_API_MAX_BODY" in r.json()["error"]
    assert r.request.received == 0                            # refused by its Content-Length
    assert len(payload) == 16_385
    assert webui.app.client.post(ROUTE, json={"image": safe_b64}).status_code == 200   # under the limit
    exact = b'{"image": "' + b"A" * 16_371 + b'"}'                                      # at it: read, then 422
    assert webui.app.client.post(ROUTE, content=exact).status_code == 422


def test_chunked_body_is_cut_off_at_the_limit(start, monkeypatch):
    monkeypatch.setenv("SAFET2I_API_MAX_BODY", "4096")
    webui = start("a1111-1.10", argv=("--api",))
    sent = []

    def endless():
        while len(sent) < 10_000:                              # 10 MB if nobody stopped reading
            sent.append(1)
            yield b"A" * 1024

    r = webui.app.client.post(ROUTE, content=endless())
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert "content-length" not in r.request.headers
    assert len(sent) <= 5 and r.request.received <= 5 * 1024


def test_default_body_limit_is_64_mib(api):
    huge = 64 * 1024 * 1024 + 1
    r = api.app.client.post(ROUTE, content=iter(()), headers={"content-length": str(huge)})
    assert r.status_code == 413 and "67,108,864" in r.json()["error"]
    script = sys.modules["safet2i_a1111.script"]
    assert script.api_max_body() == 64 * 1024 * 1024


@pytest.mark.parametrize("value", ["lots", "0", "-5", "1.5e3"])
def test_a_malformed_body_limit_means_no_route(start, monkeypatch, caplog, value):
    monkeypatch.setenv("SAFET2I_API_MAX_BODY", value)
    with caplog.at_level(logging.ERROR, logger="safet2i"):
        webui = start("a1111-1.10", argv=("--api",))
    assert ROUTE not in webui.app.routes
    assert "SAFET2I_API_MAX_BODY" in caplog.text and "not served" in caplog.text


@pytest.mark.parametrize("size", [(20000, 20000), (12000, 13000)])
def test_an_image_declaring_huge_dimensions_is_413(api, size):
    data = declared_png(*size)                                # 400 / 156 Mpx declared in a tiny file
    assert len(data) < 2000
    r = api.app.client.post(ROUTE, json={"image": base64.b64encode(data).decode(), "policy": "face-only"})
    assert r.status_code == 413
    assert r.json()["field"] == "image" and r.json()["error"].startswith("request: ")
    assert "pixel" in r.json()["error"] and "Error" not in r.json()["error"]


def test_the_decoded_pixel_budget_counts_every_frame(start, monkeypatch, coffee):
    """The core's budget over all frames: two frames fit alone, three do not."""
    monkeypatch.setenv("SAFET2I_MAX_FILE_PIXELS", str(2 * 64 * 64))
    webui = start("a1111-1.10", argv=("--api",))
    frame = Image.fromarray(small(coffee, 64))
    frames = [frame, frame.rotate(90), frame.rotate(180)]
    for n, status in ((2, 200), (3, 413)):
        buf = io.BytesIO()
        frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:n])
        r = webui.app.client.post(ROUTE, json={"image": base64.b64encode(buf.getvalue()).decode(),
                                               "policy": "face-only"})
        assert r.status_code == status, r.json()
    assert "frame 2" in r.json()["error"] and "SAFET2I_MAX_FILE_PIXELS" in r.json()["error"]


# ----------------------------------------------------------------------- malformed requests: 422

@pytest.mark.parametrize("image", ["not base64 at all!", "QUJD=", "data:image/png,iVBORw0KGgo=",
                                   base64.b64encode(b"just some text, not a picture").decode(), "", "data:,"])
def test_unreadable_image_data_is_422(api, image):
    r = api.app.client.post(ROUTE, json={"image": image})
    assert r.status_code == 422 and r.json()["field"] == "image" and r.json()["error"]


def test_a_truncated_image_is_422(api, coffee):
    data = base64.b64decode(png_b64(small(coffee, 64)))
    r = api.app.client.post(ROUTE, json={"image": base64.b64encode(data[: len(data) // 2]).decode()})
    assert r.status_code == 422 and r.json()["field"] == "image"


BAD_FIELDS = [
    ({"image": 5}, "image"), ({"image": None}, "image"), ({"image": ["abc"]}, "image"),
    ({"image": {"b64": "abc"}}, "image"), ({}, "image"),
    ({"policy": None}, "policy"), ({"policy": 3}, "policy"), ({"policy": "lenient"}, "policy"),
    ({"policy": "FACE-ONLY"}, "policy"),
    ({"action": False}, "action"), ({"action": ["blur"]}, "action"), ({"action": "smudge"}, "action"),
    ({"polcy": "broad-9"}, "polcy"),
]


@pytest.mark.parametrize("fields,name", BAD_FIELDS)
def test_malformed_fields_are_422_naming_the_field(api, safe_b64, fields, name):
    payload = fields if name == "image" else {"image": safe_b64, **fields}
    r = api.app.client.post(ROUTE, json=payload)
    assert r.status_code == 422, r.json()
    assert r.json()["field"] == name and name in r.json()["error"]


@pytest.mark.parametrize("body", [b"[]", b'"image"', b"5", b"null", b"{not json", b"\xff\xfe", b"",
                                  b"[" * 100_000 + b"]" * 100_000])
def test_a_body_that_is_not_a_json_object_is_422(api, body):
    r = api.app.client.post(ROUTE, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] == "body"


def test_unknown_values_are_refused_also_when_enforced(start, safe_b64):
    """Enforcement raises a weaker *valid* choice (test_settings.py); an unknown one is an error."""
    webui = start("a1111-1.10", argv=("--api", "--safet2i-enforce"))
    r = webui.app.client.post(ROUTE, json={"image": safe_b64, "policy": "nothing"})
    assert r.status_code == 422 and r.json()["field"] == "policy"
    r = webui.app.client.post(ROUTE, json={"image": safe_b64, "action": "pass"})
    assert r.status_code == 200 and r.json()["action"] != "pass"


def test_a_filter_that_cannot_run_is_500_without_an_image(api, monkeypatch, safe_b64):
    filtering = sys.modules["safet2i_a1111.filtering"]

    def broken(policy, action):
        raise RuntimeError("model file missing")

    monkeypatch.setattr(filtering, "get_filter", broken)
    r = api.app.client.post(ROUTE, json={"image": safe_b64})
    assert r.status_code == 500 and "image" not in r.json() and "model file missing" in r.json()["error"]


# ----------------------------------------------------------------------- --api-auth

def test_api_auth_is_required(start, safe_b64):
    webui = start("a1111-1.10", argv=("--api", "--api-auth", "ann:s3cret,bob:p:w"))
    client = webui.app.client
    r = client.post(ROUTE, json={"image": safe_b64})
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    for wrong in (("ann", "pw"), ("eve", "s3cret"), ("ann", ""), ("bob", "p")):
        assert client.post(ROUTE, json={"image": safe_b64}, auth=wrong).status_code == 401
    for right in (("ann", "s3cret"), ("bob", "p:w")):
        r = client.post(ROUTE, json={"image": safe_b64}, auth=right)
        assert r.status_code == 200 and r.json()["verdict"] == "safe"


def test_credentials_are_checked_before_the_body_is_read(start):
    webui = start("a1111-1.10", argv=("--api", "--api-auth", "ann:s3cret"))
    r = webui.app.client.post(ROUTE, content=b"x" * 100_000, headers={"content-length": str(10**12)})
    assert r.status_code == 401 and r.request.received == 0
    r = webui.app.client.post(ROUTE, content=iter(()), headers={"content-length": str(10**12)},
                              auth=("ann", "s3cret"))
    assert r.status_code == 413


def test_no_fastapi_means_no_route(start, monkeypatch):
    """Neither unprotected nor unbounded: without FastAPI's pieces the route is not added."""
    webui = start("a1111-1.10", argv=("--api", "--api-auth", "ann:s3cret"))
    script = sys.modules["safet2i_a1111.script"]

    class Recorder:
        def __init__(self):
            self.routes = []

        def add_api_route(self, path, endpoint, **kwargs):
            self.routes.append(path)

    for missing in ("fastapi", "fastapi.security", "fastapi.responses"):
        monkeypatch.setitem(sys.modules, missing, None)
        app = Recorder()
        script._on_app_started(None, app)
        assert app.routes == []
        monkeypatch.undo()
    assert ROUTE in webui.app.routes
