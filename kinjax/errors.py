"""Errors that kinjax raises for bad input.

Every message is one line that says what is wrong and what to do about it; the
command-line interface prints it without a traceback and exits non-zero.
"""

__all__ = ["KinjaxError"]


class KinjaxError(ValueError):
    """Bad input (data, templates, options) that kinjax cannot work with."""
