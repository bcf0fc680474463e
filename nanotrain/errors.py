"""The one exception type for mistakes a user can fix (bad options, missing data, ...).

Command-line entry points catch `UserError`, print its message as a single line and exit with
status 2, so bad input never shows a traceback (`exit_code_of` does this for the simple commands). The
message must name the fix.
"""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem caused by the user's input, with a message that says how to fix it."""


def exit_code_of(command: Callable[[], object]) -> int:
    """Run a command's work and return its exit status: 0, 2 after printing a UserError as one `error:` line,
    130 after Ctrl-C (nanotrain-data, nanotrain-eval, nanotrain-convert)."""
    try:
        command()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
