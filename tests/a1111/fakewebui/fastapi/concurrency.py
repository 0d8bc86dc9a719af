"""Stand-in for ``fastapi.concurrency`` (see the package docstring)."""

from __future__ import annotations

import asyncio
import functools


async def run_in_threadpool(func, *args, **kwargs):
    return await asyncio.to_thread(functools.partial(func, *args, **kwargs))
