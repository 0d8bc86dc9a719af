"""``POST /safet2i/filter``: the output filter as an HTTP route of the webui's API
(added in ``on_app_started`` when the webui serves its API, with its ``--api-auth`` check)."""

from __future__ import annotations

import base64
import io
import logging

from PIL import Image

from modules import shared

from .config import FILTER_ACTIONS, POLICIES, JobConfig
from .filtering import filter_image
from .settings import default_config, enforcement

log = logging.getLogger("safet2i")


API_MAX_BODY = 64 * 1024 * 1024
ENV_API_MAX_BODY = "SAFET2I_API_MAX_BODY"
API_FIELDS = ("image", "policy", "action")


class _ApiError(Exception):
    """A request the route refuses: HTTP ``status`` and a JSON ``{"error", "field"?}`` body."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field

    def content(self) -> dict:
        return {"error": self.message, **({"field": self.field} if self.field else {})}


def api_served() -> bool:
    """Whether the webui serves its HTTP API: ``--api`` (next to the UI) or ``--nowebui``
    (the API alone). ``webui.py`` adds the API routes only then, but calls ``on_app_started``
    either way, so the route checks it itself."""
    opts = getattr(shared, "cmd_opts", None)
    return bool(getattr(opts, "api", False) or getattr(opts, "nowebui", False))


def api_max_body() -> int:
    """The request body limit in bytes (``SAFET2I_API_MAX_BODY``; ValueError naming it when malformed)."""
    import os  # noqa: PLC0415

    raw = os.environ.get(ENV_API_MAX_BODY, "").strip().replace("_", "")
    if not raw:
        return API_MAX_BODY
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_API_MAX_BODY}={raw!r} is not a whole number of bytes") from None
    if value < 1:
        raise ValueError(f"{ENV_API_MAX_BODY} must be at least 1 byte, got {value}")
    return value


async def _read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 over ``limit`` bytes: by its ``Content-Length``
    before anything is read, and while streaming (chunked bodies declare no length)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise _ApiError(400, f"Content-Length {declared!r} is not a number") from None
        if size > limit:
            raise _ApiError(413, f"the request body is {size:,} bytes, more than the {limit:,}-byte limit "
                                 f"(set {ENV_API_MAX_BODY} to change it)")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _ApiError(413, f"the request body is more than the {limit:,}-byte limit "
                                 f"(set {ENV_API_MAX_BODY} to change it)")
        chunks.append(chunk)
    return b"".join(chunks)


def _kind(value) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _parse_request(body: bytes) -> tuple[bytes, str, str]:
    """(image bytes, policy, action) from the JSON body, or :class:`_ApiError` 422 naming the field."""
    import binascii  # noqa: PLC0415
    import json  # noqa: PLC0415

    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:        # also UnicodeDecodeError
        raise _ApiError(422, f"the request body is not valid JSON ({type(exc).__name__})", "body") from None
    if not isinstance(payload, dict):
        raise _ApiError(422, f"the request body must be a JSON object, got {_kind(payload)}", "body")
    unknown = sorted(set(payload) - set(API_FIELDS))
    if unknown:
        raise _ApiError(422, f"unknown field(s) {unknown}; the fields are {list(API_FIELDS)}", unknown[0])
    enforce = enforcement()
    cfg = default_config(enforce)
    values = {"policy": cfg.filter_policy, "action": cfg.filter_action}
    for name, choices in (("policy", POLICIES), ("action", FILTER_ACTIONS)):
        if name in payload:
            value = payload[name]
            if not isinstance(value, str):
                raise _ApiError(422, f"{name} must be a string, one of {list(choices)}; got {_kind(value)}", name)
            if value not in choices:
                raise _ApiError(422, f"unknown {name} {value!r}; use one of {list(choices)}", name)
            values[name] = value
    policy, action = values["policy"], values["action"]
    if enforce:   # a weaker policy or "pass" is raised to the operator's (as for jobs)
        forced = JobConfig(filter_policy=policy, filter_action=action)
        forced = JobConfig.from_args([getattr(forced, n) for n in JobConfig.arg_names()], enforce)
        policy, action = forced.filter_policy, forced.filter_action

    if "image" not in payload:
        raise _ApiError(422, "image is required (a base64 image, optionally a data: URL)", "image")
    raw = payload["image"]
    if not isinstance(raw, str):
        raise _ApiError(422, f"image must be a string (base64 image data), got {_kind(raw)}", "image")
    if raw[:5].lower() == "data:":
        header, sep, raw = raw.partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise _ApiError(422, "image: a data: URL must be base64 (data:image/png;base64,...)", "image")
    raw = "".join(raw.split())                          # line breaks of wrapped base64
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _ApiError(422, f"image is not valid base64 ({exc})", "image") from None
    if not data:
        raise _ApiError(422, "image is empty", "image")
    return data, policy, action


def _encode_frames(images: list, durations: list[int], loop) -> bytes:
    """PNG for one frame; an animated PNG (lossless, frame timing and loop kept) for several,
    written by the core's :func:`safet2i.images.encode_frames` (frames of different sizes
    each whole on a black canvas, never drawn over one another)."""
    from types import SimpleNamespace  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    from safet2i.images import encode_frames  # noqa: PLC0415

    buf = io.BytesIO()
    meta = SimpleNamespace(format="PNG", durations=list(durations), loop=loop if isinstance(loop, int) else 0)
    encode_frames([np.asarray(im.convert("RGB")) for im in images], meta, buf)
    return buf.getvalue()


def _filter_request(body: bytes) -> tuple[int, dict]:
    """The route's work (in a worker thread): parse, decode every frame within the core's
    budget, filter each frame, re-encode only the checked pixels. (status, JSON body)."""
    from safet2i.errors import ImageBudgetError, ImageInputError  # noqa: PLC0415
    from safet2i.images import ENV_MAX_FILE_PIXELS, MAX_FILE_PIXELS, FrameDecoder, env_budget  # noqa: PLC0415

    try:
        data, policy, action = _parse_request(body)
    except _ApiError as exc:
        return exc.status, exc.content()
    try:
        budget = env_budget(ENV_MAX_FILE_PIXELS, MAX_FILE_PIXELS)
    except ImageInputError as exc:              # the server's setting, not the request
        log.error("SafeT2I: /safet2i/filter: %s", exc)
        return 500, {"error": f"the server's decoding budget is misconfigured: {exc}"}
    outputs, frames, durations = [], [], []
    try:
        # Frame by frame: each decoded frame is filtered and dropped before the next one is
        # decoded; the budget (pixels per frame, and over all frames) is checked before decoding.
        with FrameDecoder(data, "request", max_file_pixels=budget) as dec:
            loop = dec.loop
            for i, (arr, duration) in enumerate(dec.frames()):
                o = filter_image(Image.fromarray(arr), policy, action)
                del arr
                if o.verdict.startswith("error"):
                    return 500, {"error": f"the filter could not run on frame {i}: {o.verdict}"}
                outputs.append(o.image)
                durations.append(duration)
                frames.append({"verdict": o.verdict, "cost": None if o.cost is None else float(o.cost),
                               "labels": list(o.labels), "width": o.image.width, "height": o.image.height,
                               **({"escalated": o.escalated} if o.escalated else {})})
    except ImageBudgetError as exc:
        return 413, {"error": str(exc), "field": "image"}
    except ImageInputError as exc:
        return 422, {"error": str(exc), "field": "image"}
    verdicts = [f["verdict"] for f in frames]
    verdict = next((v for v in ("blocked", "censored", "flagged") if v in verdicts), "safe")
    costs = [f["cost"] for f in frames if f["cost"] is not None]
    image = _encode_frames(outputs, durations, loop)
    return 200, {"image": base64.b64encode(image).decode(), "verdict": verdict,
                 "cost": max(costs) if costs else None,
                 "labels": sorted({label for f in frames for label in f["labels"]}),
                 "policy": policy, "action": action, "frames": frames}


def _on_app_started(demo, app):
    """Adds ``POST /safet2i/filter`` when the webui serves its API (:func:`api_served`), with
    the API's ``--api-auth`` check. Not served (and logged) when its limit or its check cannot
    be set up: an unbounded or unprotected route is never added."""
    if not api_served():
        log.info("SafeT2I: /safet2i/filter is not served: the webui runs without --api / --nowebui")
        return
    try:
        limit = api_max_body()
        extra = _api_auth()
        from fastapi import Request  # noqa: PLC0415  (the webui's own server)
        from fastapi.concurrency import run_in_threadpool  # noqa: PLC0415
        from fastapi.responses import JSONResponse  # noqa: PLC0415
    except (ValueError, ImportError) as exc:     # a bad SAFET2I_API_MAX_BODY; no FastAPI security module
        log.error("SafeT2I: /safet2i/filter is not served: %s", exc)
        return

    async def filter_route(request):
        """POST /safet2i/filter {"image": base64 image, "policy"?, "action"?} → the checked
        image (PNG; animated PNG for several frames) + verdict; errors as JSON 4xx/5xx."""
        try:
            body = await _read_body(request, limit)
        except _ApiError as exc:
            return JSONResponse(exc.content(), status_code=exc.status)
        try:
            status, content = await run_in_threadpool(_filter_request, body)
        except Exception as exc:  # noqa: BLE001 - a bug: no image, a JSON error
            log.error("SafeT2I: /safet2i/filter failed: %s", exc, exc_info=True)
            status, content = 500, {"error": f"the filter failed: {type(exc).__name__}: {exc}"}
        return JSONResponse(content, status_code=status)

    # Real classes, not the strings of ``from __future__ import annotations``: FastAPI resolves
    # string annotations in the module's globals, where these local imports are not.
    filter_route.__annotations__ = {"request": Request}
    app.add_api_route("/safet2i/filter", filter_route, methods=["POST"], **extra)


def api_credentials() -> dict[str, str]:
    """``--api-auth user:password,user2:password2`` as the webui's own API reads it."""
    from modules import shared  # noqa: PLC0415

    raw = getattr(shared.cmd_opts, "api_auth", None) or ""
    out = {}
    for item in raw.split(","):
        user, sep, password = item.partition(":")
        if sep:
            out[user] = password
    return out


def _api_auth() -> dict:
    """The same HTTP basic check the webui puts on its own API routes when ``--api-auth`` is
    set (``modules/api/api.py``: ``Api.add_api_route`` adds ``Depends(self.auth)``); routes
    added straight on the app in ``on_app_started`` do not get it by themselves."""
    credentials = api_credentials()
    if not credentials:
        return {}
    from secrets import compare_digest  # noqa: PLC0415

    from fastapi import Depends, HTTPException  # noqa: PLC0415  (the webui's own server)
    from fastapi.security import HTTPBasic, HTTPBasicCredentials  # noqa: PLC0415

    def auth(given=Depends(HTTPBasic())):  # noqa: B008 - FastAPI's idiom
        expected = credentials.get(given.username)
        if expected is not None and compare_digest(given.password.encode(), expected.encode()):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    auth.__annotations__ = {"given": HTTPBasicCredentials}   # a real class (see filter_route)
    return {"dependencies": [Depends(auth)]}
