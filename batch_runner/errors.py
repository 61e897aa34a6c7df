"""Errors the user can fix, reported as sentences rather than stack traces."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the input or the configuration; its message says what to change.

    run.py prints the message alone and exits with status 2. Most problems are the same on every
    process, so only the main process prints them; `every_rank` errors are known to some processes
    only (a full disk, a launch that disagrees with another host's), so each process that meets one
    prints it.
    """

    every_rank: bool = False
