"""Errors the user can fix, reported as sentences rather than stack traces."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the input or the configuration; its message says what to change.

    run.py prints the message alone and exits with status 2.
    """
