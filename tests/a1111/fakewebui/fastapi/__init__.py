"""Tiny stand-in for FastAPI, the webui's server framework (stand-in internal, not checked
against upstream; written from FastAPI's documented behaviour, no FastAPI code).

The webui's ``app`` is a ``fastapi.FastAPI``; extensions add routes to it in
``on_app_started``. What is modelled, as FastAPI / Starlette / uvicorn behave:

* ``add_api_route`` analyses the endpoint and its dependencies when the route is added:
  string annotations (``from __future__ import annotations``) are resolved in the
  function's module globals, and a name that does not resolve there is an error (FastAPI
  0.94 with pydantic 1, A1111 1.10's pins) -- a class imported inside a function is not seen;
* parameters annotated ``Request`` receive the request; parameters whose default is
  ``Depends(fn)`` receive ``fn``'s result (solved the same way, recursively); route-level
  ``dependencies=[Depends(fn)]`` run before the endpoint, and an endpoint that takes only the
  request has its body read by nobody but itself;
* ``async def`` endpoints run on the event loop, plain ``def`` ones in the thread pool;
* ``HTTPException`` becomes a JSON ``{"detail": ...}`` response with its status and headers;
  a ``Response`` returned is sent as is; anything else is sent as JSON with status 200;
  other exceptions propagate to the caller (``TestClient``'s default);
* ``Request.stream()`` yields the body in the chunks the server received, then ``b""``;
  ``Request.headers`` is case-insensitive.

Body parameters (pydantic models / ``dict`` read from JSON) are not modelled: adding such a
route raises ``NotImplementedError`` rather than behaving differently from FastAPI.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import typing
from collections.abc import Mapping

__all__ = ["Depends", "FastAPI", "HTTPException", "Request"]


class HTTPException(Exception):
    def __init__(self, status_code: int, detail=None, headers: dict | None = None):
        super().__init__(status_code, detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers


class _Depends:
    def __init__(self, dependency=None):
        self.dependency = dependency


def Depends(dependency=None):  # noqa: N802 - FastAPI's name
    return _Depends(dependency)


class Headers(Mapping):
    """Case-insensitive, read-only request headers."""

    def __init__(self, items=()):
        self._items = [(str(k).lower(), str(v)) for k, v in (items.items() if isinstance(items, Mapping) else items)]

    def __getitem__(self, key):
        key = key.lower()
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self):
        return iter(dict(self._items))

    def __len__(self):
        return len(dict(self._items))


class Request:
    def __init__(self, method: str, path: str, headers=(), chunks=()):
        self.method = method.upper()
        self.path = path
        self.headers = Headers(headers)
        self._chunks = iter(chunks)
        self._consumed = False
        self._body: bytes | None = None
        self.received = 0          # stand-in internal: body bytes the app pulled from the server

    async def stream(self):
        if self._body is not None:
            yield self._body
            yield b""
            return
        if self._consumed:
            raise RuntimeError("Stream consumed")
        self._consumed = True
        for chunk in self._chunks:
            if chunk:
                self.received += len(chunk)
                yield bytes(chunk)
        yield b""

    async def body(self) -> bytes:
        if self._body is None:
            self._body = b"".join([c async for c in self.stream()])
        return self._body

    async def json(self):
        return json.loads(await self.body())


# ---------------------------------------------------------------------------- routing

def _callable_target(call):
    return call if inspect.isfunction(call) or inspect.ismethod(call) else call.__call__


def _analyse(call) -> list[tuple[str, object]]:
    """``[(parameter name, Request | _Depends)]``: what to pass ``call``; checked when the
    route is added, as FastAPI does."""
    target = _callable_target(call)
    hints = typing.get_type_hints(target)          # NameError for an unresolvable annotation
    plan = []
    for name, param in inspect.signature(target).parameters.items():
        hint = hints.get(name)
        if isinstance(param.default, _Depends):
            dep = param.default
            if dep.dependency is None:
                raise NotImplementedError(f"stand-in: Depends() without a callable for {name!r}")
            _analyse(dep.dependency)
            plan.append((name, dep))
        elif isinstance(hint, type) and issubclass(hint, Request):
            plan.append((name, Request))
        else:
            raise NotImplementedError(
                f"stand-in FastAPI: parameter {name!r} ({hint!r}) of {getattr(target, '__qualname__', call)} "
                "would be a query/body parameter; only Request and Depends parameters are modelled")
    return plan


async def _call(call, request: Request):
    kwargs = {}
    for name, how in _analyse(call):
        kwargs[name] = request if how is Request else await _call(how.dependency, request)
    target = _callable_target(call)
    if inspect.iscoroutinefunction(target):
        return await call(**kwargs)
    from .concurrency import run_in_threadpool
    return await run_in_threadpool(call, **kwargs)


class APIRoute:
    def __init__(self, path: str, endpoint, methods=None, dependencies=None, **kwargs):
        self.path = path
        self.endpoint = endpoint
        self.methods = {m.upper() for m in (methods or ["GET"])}
        self.dependencies = list(dependencies or [])
        self.kwargs = kwargs
        _analyse(endpoint)
        for dep in self.dependencies:
            if not isinstance(dep, _Depends):
                raise TypeError("dependencies must be Depends(...)")
            _analyse(dep.dependency)


class FastAPI:
    def __init__(self, **kwargs):
        self.routes: list[APIRoute] = []

    def add_api_route(self, path: str, endpoint, **kwargs) -> None:
        self.routes.append(APIRoute(path, endpoint, **kwargs))

    async def _handle(self, request: Request):
        from .responses import JSONResponse, Response

        routes = [r for r in self.routes if r.path == request.path]
        if not routes:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        route = next((r for r in routes if request.method in r.methods), None)
        if route is None:
            return JSONResponse({"detail": "Method Not Allowed"}, status_code=405)
        try:
            for dep in route.dependencies:
                await _call(dep.dependency, request)
            result = await _call(route.endpoint, request)
        except HTTPException as exc:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        if isinstance(result, Response):
            return result
        return JSONResponse(result)

    def _serve(self, request: Request):
        return asyncio.run(self._handle(request))
