"""Stand-in for ``fastapi.security``'s HTTP basic scheme (see the package docstring): the
``Authorization: Basic base64(user:password)`` header becomes ``HTTPBasicCredentials``; a
missing header or another scheme is 401 "Not authenticated" with ``WWW-Authenticate: Basic``."""

from __future__ import annotations

import base64
from dataclasses import dataclass

from . import HTTPException, Request


@dataclass
class HTTPBasicCredentials:
    username: str
    password: str


class HTTPBasic:
    async def __call__(self, request: Request) -> HTTPBasicCredentials | None:
        scheme, _, param = (request.headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "basic":
            raise HTTPException(status_code=401, detail="Not authenticated", headers={"WWW-Authenticate": "Basic"})
        username, _, password = base64.b64decode(param).decode("ascii").partition(":")
        return HTTPBasicCredentials(username=username, password=password)
