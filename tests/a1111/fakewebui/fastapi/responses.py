"""Stand-in for ``fastapi.responses`` (see the package docstring)."""

from __future__ import annotations

import json


class Response:
    media_type = None

    def __init__(self, content=None, status_code: int = 200, headers: dict | None = None, media_type=None):
        self.status_code = status_code
        self.media_type = media_type or self.media_type
        self.body = self.render(content)
        self.headers = {str(k).lower(): str(v) for k, v in (headers or {}).items()}
        if self.media_type:
            self.headers.setdefault("content-type", self.media_type)
        self.headers["content-length"] = str(len(self.body))

    def render(self, content) -> bytes:
        if content is None:
            return b""
        return content if isinstance(content, bytes) else str(content).encode("utf-8")


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content) -> bytes:
        # Starlette's settings: compact, UTF-8, and NaN / Infinity refused.
        return json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None,
                          separators=(",", ":")).encode("utf-8")
