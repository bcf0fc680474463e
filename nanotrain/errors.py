"""The one exception type for mistakes a user can fix (bad options, missing data, ...).

Command-line entry points catch `UserError`, print its message as a single line and exit with
status 2, so bad input never shows a traceback. The message must name the fix.
"""


class UserError(Exception):
    """A problem caused by the user's input, with a message that says how to fix it."""
