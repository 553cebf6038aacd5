"""Errors that describe bad input (a file, field or value the user gave), not a bug.

The CLI prints these as one line naming the culprit and exits 2; everything else is a bug and
keeps its traceback.
"""


class InputError(ValueError):
    """Bad input; the message names the file, field or value."""
