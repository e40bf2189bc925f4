"""Errors that are the user's to fix (bad files, bad arguments, bad requests).

The CLI prints these as one line, ``error: <message>``, and exits non-zero without a traceback; anything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """Base class: a message a user can act on, naming the file / tensor / field / parameter at fault."""

    exit_code = 2
