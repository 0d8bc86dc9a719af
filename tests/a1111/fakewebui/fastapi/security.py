"""Stand-in for ``fastapi.security``'s HTTP basic scheme (see the package docstring): the
``Authorization: Basic base64(user:password)`` header becomes ``HTTPBasicCredentials``; a
missing header or another scheme is 401 "Not authenticated", an undecodable one 401 "Invalid
authentication credentials", both with ``WWW-Authenticate: Basic``."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from . import HTTPException, Request


@dataclass
class HTTPBasicCredentials:
    username: str
    password: str


class HTTPBasic:
    def __init__(self, *, realm: str | None = None, auto_error: bool = True):
        self.realm = realm
        self.auto_error = auto_error

    async def __call__(self, request: Request) -> HTTPBasicCredentials | None:
        challenge = {"WWW-Authenticate": f'Basic realm="{self.realm}"' if self.realm else "Basic"}
        scheme, _, param = (request.headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "basic":
            if not self.auto_error:
                return None
            raise HTTPException(status_code=401, detail="Not authenticated", headers=challenge)
        try:
            decoded = base64.b64decode(param).decode("ascii")
        except (ValueError, UnicodeDecodeError, binascii.Error):
            decoded = ""
        username, sep, password = decoded.partition(":")
        if not sep:
            raise HTTPException(status_code=401, detail="Invalid authentication credentials", headers=challenge)
        return HTTPBasicCredentials(username=username, password=password)
