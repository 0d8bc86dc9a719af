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
  a ``Response`` returned is sent as is; other exceptions propagate to the caller
  (``TestClient``'s default);
* ``Request.stream()`` yields the body in the chunks the server received, then ``b""``;
  ``Request.headers`` has the names in lower case.

Only ``Request`` and ``Depends`` parameters are modelled (no query or body parameters).
"""

from __future__ import annotations

import asyncio
import inspect
import typing

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


class Request:
    def __init__(self, method: str, path: str, headers=(), chunks=()):
        self.method = method.upper()
        self.path = path
        self.headers = {str(k).lower(): str(v) for k, v in headers}
        self._chunks = iter(chunks)
        self.received = 0          # stand-in internal: body bytes the app pulled from the server

    async def stream(self):
        for chunk in self._chunks:
            self.received += len(chunk)
            yield bytes(chunk)
        yield b""


# ---------------------------------------------------------------------------- routing

def _callable_target(call):
    return call if inspect.isfunction(call) or inspect.ismethod(call) else call.__call__


def _analyse(call) -> list[tuple[str, object]]:
    """``[(parameter name, Request | _Depends)]``: what to pass ``call``; checked when the
    route is added, as FastAPI does."""
    target = _callable_target(call)
    typing.get_type_hints(target)          # NameError for an unresolvable annotation
    plan = []
    for name, param in inspect.signature(target).parameters.items():
        if isinstance(param.default, _Depends):
            _analyse(param.default.dependency)
            plan.append((name, param.default))
        else:            # annotated ``Request``
            plan.append((name, Request))
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
        _analyse(endpoint)
        for dep in self.dependencies:
            _analyse(dep.dependency)


class FastAPI:
    def __init__(self, **kwargs):
        self.routes: list[APIRoute] = []

    def add_api_route(self, path: str, endpoint, **kwargs) -> None:
        self.routes.append(APIRoute(path, endpoint, **kwargs))

    async def _handle(self, request: Request):
        from .responses import JSONResponse

        route = next((r for r in self.routes if r.path == request.path and request.method in r.methods), None)
        if route is None:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        try:
            for dep in route.dependencies:
                await _call(dep.dependency, request)
            return await _call(route.endpoint, request)      # the route's own Response
        except HTTPException as exc:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    def _serve(self, request: Request):
        return asyncio.run(self._handle(request))
