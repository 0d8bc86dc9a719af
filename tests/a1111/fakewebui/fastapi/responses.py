"""Stand-in for ``fastapi.responses`` (see the package docstring)."""

from __future__ import annotations

import json


class JSONResponse:
    media_type = "application/json"

    def __init__(self, content=None, status_code: int = 200, headers: dict | None = None):
        self.status_code = status_code
        # Starlette's settings: compact, UTF-8, and NaN / Infinity refused.
        self.body = json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None,
                               separators=(",", ":")).encode("utf-8")
        self.headers = {str(k).lower(): str(v) for k, v in (headers or {}).items()}
        self.headers.setdefault("content-type", self.media_type)
        self.headers["content-length"] = str(len(self.body))
