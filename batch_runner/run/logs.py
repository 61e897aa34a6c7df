"""Where a process's log lines go: the terminal for the main process, a file per process for the rest.

Its own module, below both the command line (which sets it up) and the runner (which adds the file
once the run has an output folder), so that neither imports the other.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path


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
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
    except ImportError:
        pass


class _NoFollowFileHandler(logging.FileHandler):
    """A FileHandler that appends to `path` only if it is not a link (a planted link in output_dir
    would have this process append its log to the file it points to)."""

    def _open(self):  # logging.FileHandler._open, which has no annotations
        from batch_runner.outputs.storage import append_nofollow

        return append_nofollow(Path(self.baseFilename), encoding=self.encoding or "utf-8")


def log_to_file(path: Path) -> None:
    """Also log everything this process logs (at the run's level) to `path`: a non-main rank's full log."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handler = _NoFollowFileHandler(path, encoding="utf-8")
    handler.setFormatter(root.handlers[0].formatter if root.handlers else None)
    root.addHandler(handler)
