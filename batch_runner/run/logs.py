"""Where a process's log lines go: the terminal for the main process, a file per process for the rest.

Its own module, below both the command line (which sets it up) and the runner (which adds the file
once the run has an output folder), so that neither imports the other.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from pathlib import Path

# diffusers and transformers set their loggers' level once, when first imported, from these variables.
LIBRARY_VERBOSITY = {"diffusers": "DIFFUSERS_VERBOSITY", "transformers": "TRANSFORMERS_VERBOSITY"}


def setup_logging(level: str, rank: int, world: int) -> None:
    """Log to the terminal; the main process owns it, so the others write only warnings and errors.

    Lines from other processes would break the main process's progress bar (tqdm redraws its line
    in place, and only knows of its own process's log lines); what they log below warnings goes to
    their own file in output_dir (log_to_file) once the run has one.
    """
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    if rank != 0:
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.WARNING)
    for noisy in ("diffusers", "transformers", "accelerate", "torch._dynamo", "torch._inductor"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # Errors only from diffusers and transformers: set where each reads it when imported, not by
    # importing them here (2 s of every process, a run that refuses a row before any model included);
    # the one already imported is told directly.
    for library, variable in LIBRARY_VERBOSITY.items():
        os.environ[variable] = "error"
        if library in sys.modules:
            importlib.import_module(f"{library}.utils.logging").set_verbosity_error()


class _NoFollowFileHandler(logging.FileHandler):
    """A FileHandler that appends to `path` only if it is not a link (a planted link in output_dir
    would have this process append its log to the file it points to)."""

    broken = False  # a write failed (a full disk): the file takes no more lines

    def _open(self):  # logging.FileHandler._open, which has no annotations
        from batch_runner.outputs.storage import append_nofollow

        return append_nofollow(Path(self.baseFilename), encoding=self.encoding or "utf-8")

    def emit(self, record: logging.LogRecord) -> None:
        if not self.broken:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        """A line the file cannot take (its disk is full, say) ends the file with one line on the
        terminal, where logging would print a traceback for every later line."""
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
            return
        self.broken = True
        with contextlib.suppress(OSError, ValueError):
            print(f"batch_runner: no longer logging to {self.baseFilename}: {error.strerror or error}", file=sys.stderr)


def log_to_file(path: Path) -> None:
    """Also log everything this process logs (at the run's level) to `path`: a non-main rank's full log."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handler = _NoFollowFileHandler(path, encoding="utf-8")
    handler.setFormatter(root.handlers[0].formatter if root.handlers else None)
    root.addHandler(handler)
