"""`accelerate launch ... run.py` exits 2, with no traceback, when the run refused a setting or a row.

The run says what is wrong in one sentence and exits 2 (README, "When things go wrong"). Under
`accelerate launch` the status the shell sees is accelerate's own: its launcher turns any non-zero
status of the process it started (`--cpu`) or of a torchrun worker (`--multi_gpu`) into a traceback
and status 1, in its own process, where nothing the run does can reach. So batch_runner registers
this module with torch's plugin autoload (the `torch.backends` entry point group in pyproject.toml:
torch calls `install` when it is imported, and accelerate's launcher imports torch): in a process
that is `accelerate launch` of batch_runner's run.py, and only there, an uncaught "the process
exited with status 2" ends the launcher quietly with status 2. The run's sentence was already
printed by the run itself; every other error keeps accelerate's own report. This module imports
nothing but the standard library: it runs inside torch's import, in every process that imports it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

REFUSED = 2  # the run's status for a problem the user must fix (batch_runner.errors.UserError)
_LAUNCH_WORDS = ("launch", "accelerate.commands.launch")


def install() -> None:
    """Wrap sys.excepthook in accelerate's launcher of run.py; do nothing in any other process."""
    if not launches_run_py(list(getattr(sys, "orig_argv", sys.argv))):
        return
    previous = sys.excepthook

    def refused_quietly(kind: type[BaseException], error: BaseException, tb: Any) -> None:
        if child_refused(error):
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(REFUSED)  # the run printed why; accelerate's traceback would only repeat it
        previous(kind, error, tb)

    sys.excepthook = refused_quietly


def launches_run_py(argv: list[str]) -> bool:
    """Whether `argv` is `accelerate launch`, `accelerate-launch` or `python -m accelerate.commands.launch`
    of a run.py that sits next to the batch_runner package."""
    words = [Path(word).name for word in argv]
    is_launch = "accelerate-launch" in words or any(
        word in _LAUNCH_WORDS and (i == 0 or words[i - 1] in ("accelerate", "-m")) for i, word in enumerate(words)
    )
    if not is_launch:
        return False
    return any(word.endswith("run.py") and (Path(word).parent / "batch_runner").is_dir() for word in argv)


def child_refused(error: BaseException) -> bool:
    """Whether accelerate's launcher failed because the run's (first failed) process exited with status 2."""
    returncode = getattr(error, "returncode", None)  # subprocess.CalledProcessError: the --cpu launcher
    if type(error).__name__ == "CalledProcessError":
        return returncode == REFUSED
    if type(error).__name__ == "ChildFailedError":  # torchrun's: the --multi_gpu launcher
        try:
            return error.get_first_failure()[1].exitcode == REFUSED  # type: ignore[attr-defined]
        except Exception:
            return False
    return False
