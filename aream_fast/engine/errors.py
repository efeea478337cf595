"""User errors of the command-line scripts as one ``error:`` line; the one place that decides what a user error is.

``scripts/train.py``, ``make_cams.py``, ``analyze_layers.py`` and ``evaluate.py`` end with::

    if __name__ == "__main__":
        sys.exit(main_guard(main))

A user error (bad root, bad or missing file, bad flag value: :data:`USER_ERRORS`) prints ``error: <message>`` (and a hint
line about ``--debug``) on stderr and exits with status 1. ``--debug`` on the command line (removed before ``main`` sees it) or
``AREAM_FAST_DEBUG=1`` in the environment re-raises instead, so the traceback is shown. Anything else (a bug)
always propagates with its traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, List, Optional, Sequence

from aream_fast.data.image_io import CorruptImageError

DEBUG_FLAG = "--debug"
DEBUG_ENV = "AREAM_FAST_DEBUG"

#: the exception types whose message is shown as one ``error:`` line (FileNotFoundError and the dataset layout
#: error are OSErrors; a corrupt image is a CorruptImageError; a refused resume a ConfigMismatchError/ValueError)
USER_ERRORS = (ValueError, OSError, CorruptImageError)


class UserError(ValueError):
    """A refusal whose message is complete for the user (e.g. a resume whose config differs)."""


def debug_requested(argv: Optional[Sequence[str]] = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def main_guard(main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main(argv without --debug)``; a :data:`USER_ERRORS` exception becomes ``error: ...`` and exit status
    1 unless debugging was asked for. Returns ``main``'s result when it is an int (an exit status), else 0."""
    args: List[str] = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(args)
    args = [a for a in args if a != DEBUG_FLAG]
    try:
        result = main(args)
    except USER_ERRORS as exc:
        if debug:
            raise
        message = str(exc).strip() or type(exc).__name__
        print(f"error: {message}\n(run with {DEBUG_FLAG} or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 1
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
