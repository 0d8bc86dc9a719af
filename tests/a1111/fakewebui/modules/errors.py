"""Stand-in for ``modules/errors.py``: the webui logs exceptions from extension hooks and goes on."""

import sys
import traceback


def report(message: str, *, exc_info: bool = False) -> None:
    print(message, file=sys.stderr)
    if exc_info:
        traceback.print_exc()


def display(e: Exception, task, *, full_traceback=False):
    print(f"{task}: {type(e).__name__}: {e}", file=sys.stderr)


def record_exception():
    """Upstream keeps the exception for the sysinfo page; the stand-in does not."""
