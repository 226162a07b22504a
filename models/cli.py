"""How every ``python -m models.<tool>`` ends: user errors as one line, never a traceback.

A ``ValueError`` / ``TypeError`` / ``FileNotFoundError`` raised by a tool means the command was
wrong (a bad flag value, a missing file, a checkpoint that does not fit): the user gets
``error: <message>`` on stderr and exit status 2.  Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["USER_ERRORS", "exit_status"]

USER_ERRORS = (ValueError, TypeError, FileNotFoundError)


def exit_status(run: Callable[[], object], failures: tuple[type[BaseException], ...] = ()) -> int:
    """Run ``run()`` and return the process exit status: 0 when it returns; 2 after a user error;
    1 after one of ``failures`` (a run that started and then could not go on, e.g. a non-finite
    loss or a lost peer).  Both errors print ``error: <message>`` to stderr."""
    try:
        run()
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except failures as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
