"""Stand-in for ``modules/errors.py``: the webui logs exceptions from extension hooks and goes on."""

import sys
import traceback

_reported: list[tuple[str, BaseException | None]] = []   # stand-in: what upstream would print


def report(message: str, *, exc_info: bool = False) -> None:
    exc = sys.exc_info()[1] if exc_info else None
    _reported.append((message, exc))
    print(message, file=sys.stderr)
    if exc is not None:
        traceback.print_exception(exc, file=sys.stderr)


def display(e: Exception, task, *, full_traceback=False):
    _reported.append((f"{task}: {e}", e))


def record_exception():
    _reported.append(("recorded", sys.exc_info()[1]))
