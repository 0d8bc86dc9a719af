"""Stand-in for ``fastapi.testclient.TestClient`` (see the package docstring): the request
goes through the stand-in app as a server would deliver it. ``content`` bytes are sent with
a ``Content-Length`` header, in 64 KiB chunks; ``content`` as an iterable of bytes is sent
chunked (no ``Content-Length``) unless the caller gives that header; ``json`` is encoded
with ``Content-Type: application/json``; ``auth=(user, password)`` sets HTTP basic
credentials. Exceptions the app does not turn into a response are raised."""

from __future__ import annotations

import base64
import json as _json

from . import Request

CHUNK = 64 * 1024


class TestResponse:
    def __init__(self, response, request: Request):
        self.status_code = response.status_code
        self.headers = dict(response.headers)
        self.content = response.body
        self.request = request

    def json(self):
        return _json.loads(self.content)


class TestClient:
    __test__ = False   # not a pytest class

    def __init__(self, app):
        self.app = app

    def request(self, method: str, url: str, *, content=None, json=None, headers=None, auth=None) -> TestResponse:
        hdrs = {str(k).lower(): str(v) for k, v in (headers or {}).items()}
        if json is not None:
            content = _json.dumps(json).encode("utf-8")
            hdrs.setdefault("content-type", "application/json")
        if auth is not None:
            user, password = auth
            hdrs["authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        if isinstance(content, (bytes, bytearray)):
            hdrs.setdefault("content-length", str(len(content)))
            chunks = (bytes(content[i:i + CHUNK]) for i in range(0, len(content), CHUNK))
        else:
            if "content-length" not in hdrs:
                hdrs["transfer-encoding"] = "chunked"
            chunks = iter(content)
        request = Request(method, url, list(hdrs.items()), chunks)
        return TestResponse(self.app._serve(request), request)

    def post(self, url: str, **kwargs) -> TestResponse:
        return self.request("POST", url, **kwargs)
