"""Files that appear complete or not at all, in a folder that is the run's own.

Everything the runner publishes (videos, tables, shards, reports) is written to a hidden temporary
name in the same folder, flushed to disk, then renamed over the final name: a reader, a resumed run
or a crash never sees half a file. Leftover temporaries carry TEMP_SUFFIX and are swept at start.

The output folder itself: a marker says it is a run's own (a folder holding the manifest or other
files is refused), a lock lets one run at a time write in it, and a full, read-only or unusable
folder ends the run with one sentence saying what was kept.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from batch_runner.errors import UserError
from batch_runner.parquet import write_parquet

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".partial"


def temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.{os.getpid()}{TEMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed to `final`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    # Created here, anew and never through a link planted at its (guessable) name: the writers that
    # open it by name then find this process's own empty file.
    tmp.unlink(missing_ok=True)
    os.close(open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(data: bytes, final: Path) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(text: str, final: Path) -> None:
    atomic_write_bytes(text.encode("utf-8"), final)


def atomic_write_parquet(table: pd.DataFrame, final: Path) -> None:
    with atomic_path(final) as tmp:
        write_parquet(table, tmp)


def open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open that never follows a link at `path` (ELOOP instead): a link planted in output_dir must
    not make a run write to the file it points to, outside the folder."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def append_nofollow(path: Path, encoding: str = "utf-8") -> Any:
    """`open(path, "a")` through open_nofollow."""
    return os.fdopen(open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a", encoding=encoding)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sweep_temporaries(root: Path) -> int:
    """Delete temporaries left by killed processes under `root`; returns how many."""
    count = 0
    for leftover in root.rglob(f".*{TEMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)
        count += 1
    return count


# --- the output folder: whose it is, who runs in it, and what a write error means ------------------

MARKER_FILE = ".batch_runner"
LOCK_FILE = ".batch_runner.lock"
# What the runner writes at the top of an output folder (runner, results, dataset, report, provenance).
RUN_ENTRIES = frozenset(
    {
        MARKER_FILE,
        LOCK_FILE,
        "videos",
        "logs",
        "previews",
        "parts",
        "shards",
        "results.parquet",
        "metadata.parquet",
        "report.json",
        "report.html",
        "config.yaml",
    }
)
# Files a desktop leaves in any folder it shows: a folder holding only these counts as empty.
DESKTOP_CLUTTER = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
# What a run writes into (folders) or opens in place (files): none may be a link, or the run would
# write where it points, outside output_dir. Files it replaces atomically (tables, reports) may.
NO_LINKS = (MARKER_FILE, LOCK_FILE, "videos", "logs", "parts", "previews", "shards")
# The main process touches its lock this often; another host's lock untouched for STALE_AFTER_S
# belongs to a run that was killed (file locks do not reach across hosts on every file system).
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


class OutputError(UserError):
    """The output folder cannot be used or written (full, read-only, not a folder, busy).

    Every process that meets one reports it, not only the main process: any of them may run out of
    space first.
    """

    every_rank = True


def check_output_dir(out: Path, manifest: Path) -> None:
    """Refuse, before anything is written, a folder that is not a run's own to write in.

    A run writes fixed names (RUN_ENTRIES) into output_dir and marks it with MARKER_FILE. A folder
    holding the manifest, or anything else the runner did not write, is someone's own folder: a run
    there would overwrite their metadata.parquet or config.yaml or fill it with run files. An empty
    or missing folder is fine. A folder of an earlier version of the runner (no marker yet, only run
    entries and a results log under parts/) is adopted: it is what those versions left behind.
    """
    if out == manifest.parent or out in manifest.parents:
        raise OutputError(
            f"output_dir {str(out)!r} holds the manifest {str(manifest)!r}, and a run would write its files "
            "among yours; pick an output_dir of its own (e.g. the default outputs/<manifest name>)."
        )
    if out.exists() and not out.is_dir():
        raise OutputError(f"output_dir {str(out)!r} is a file, not a folder; pick an empty or new output_dir.")
    check_no_links(out)
    if not out.is_dir() or (out / MARKER_FILE).is_file():
        return
    # A lock alone is what a run that stopped before its marker (its disk was full, say) left.
    ignored = DESKTOP_CLUTTER | {LOCK_FILE}
    entries = [
        p
        for p in out.iterdir()
        if not (p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX)) and p.name not in ignored
    ]
    foreign = sorted(p.name for p in entries if p.name not in RUN_ENTRIES)
    if not entries or (not foreign and any((out / "parts").glob("*.jsonl"))):
        return
    shown = ", ".join(map(repr, foreign[:3])) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    raise OutputError(
        f"output_dir {str(out)!r} already holds files batch_runner did not write ({shown or 'no results log'}), "
        "so it is not a run's folder; pick an empty or new output_dir."
    )


def check_no_links(out: Path) -> None:
    """Refuse an output_dir whose own folders or files (NO_LINKS, and the files in logs/ and parts/)
    are symbolic links, naming them: the run would write through them to wherever they point."""
    if not out.is_dir():
        return
    links = [name for name in NO_LINKS if (out / name).is_symlink()]
    for folder in ("logs", "parts"):
        if (out / folder).is_dir() and not (out / folder).is_symlink():
            links += sorted(f"{folder}/{p.name}" for p in (out / folder).iterdir() if p.is_symlink())
    if links:
        shown = ", ".join(map(repr, links[:3])) + (f" and {len(links) - 3} more" if len(links) > 3 else "")
        raise OutputError(
            f"output_dir {str(out)!r} holds symbolic links where the run writes ({shown}), and a run would write "
            "through them outside the folder; remove them (or make them real folders) and rerun."
        )


def mark_output_dir(out: Path) -> None:
    """Say that `out` is a run's own folder (once; later runs resume in it)."""
    marker = out / MARKER_FILE
    if not marker.is_file() or marker.is_symlink():
        atomic_write_text(
            json.dumps({"written_by": "batch_runner", "note": "this folder holds a batch_runner run's outputs"}),
            marker,
        )


class OutputLock:
    """One run at a time per output folder: LOCK_FILE, flocked and naming its host and pid.

    The main process takes it before writing anything and releases it when the run ends, however it
    ends. On one host the kernel drops a flock when its process dies, so a killed run's lock is
    stale by itself and the next run takes it over. Where file systems do not share flocks between
    hosts, another host's lock counts as held while its holder touches it (every HEARTBEAT_S) and as
    stale once it is older than STALE_AFTER_S.
    """

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_FILE
        self._fd: int | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> OutputLock:
        while True:
            fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT)
            try:
                flock = _try_flock(fd)
                holder = _read_holder(fd)
                if flock == "busy" or _held_elsewhere(holder, self.path, flocks=flock == "held"):
                    for _ in range(20):  # a run that has just locked writes its name right after
                        if holder:
                            break
                        time.sleep(0.05)
                        holder = _read_holder(fd)
                    raise OutputError(_busy(self.path.parent, holder))
                if os.fstat(fd).st_ino != _inode(self.path):
                    os.close(fd)  # released and removed while we waited: lock the new file
                    continue
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            break
        if holder:
            log.warning("taking over the lock of a run that no longer runs (%s)", _describe(holder))
        me = {"host": socket.gethostname(), "host_id": _host_id(), "pid": os.getpid(), "started": _utc_now()}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
        except BaseException:  # a full disk, say: no lock is left that names nobody
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_ino == _inode(self.path):
                    self.path.unlink()
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        self._fd = fd
        self._heartbeat = threading.Thread(target=self._beat, name="output-lock", daemon=True)
        self._heartbeat.start()
        return self

    def refuse_if_held(self) -> None:
        """Raise OutputError where another run holds the lock now, as its record tells without taking
        the lock (a --cpu launch asks before it starts the processes that will take it)."""
        try:
            fd = open_nofollow(self.path, os.O_RDONLY)
        except OSError:
            return  # no lock file (or a link, which check_no_links names)
        try:
            holder = _read_holder(fd)
        finally:
            os.close(fd)
        if _held_elsewhere(holder, self.path, flocks=False):
            raise OutputError(_busy(self.path.parent, holder))

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        with contextlib.suppress(OSError):
            if os.fstat(self._fd).st_ino == _inode(self.path):
                self.path.unlink()
        os.close(self._fd)  # drops the flock
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)


def _try_flock(fd: int) -> str:
    """ "held" (by this process now), "busy" (by another) or "none" (the file system has no flocks)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "busy"
    except OSError:
        return "none"  # some network/FUSE file systems: the holder's record decides
    return "held"


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"null")
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _held_elsewhere(holder: dict[str, Any] | None, path: Path, flocks: bool) -> bool:
    """Whether the run that wrote `holder` may still run, given that its flock did not stop us."""
    if not holder:
        return False
    if holder.get("host_id") == _host_id():
        # On this host a live holder keeps its flock; without flocks, its pid tells.
        return not flocks and pid_alive(int(holder.get("pid", -1)))
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return False
    return age < STALE_AFTER_S


def pid_alive(pid: int) -> bool:
    """Whether a process of this host has that pid (one of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _busy(out: Path, holder: dict[str, Any] | None) -> str:
    return (
        f"output_dir {str(out)!r} is in use by another run ({_describe(holder)}); wait for it to finish, "
        "or pick another output_dir."
    )


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "its host and pid are not recorded yet"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _host_id() -> str:
    from batch_runner.cluster.cluster import this_host

    return this_host()


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# errno -> what to do about it. Only these are about the output folder; other OSErrors stay errors.
_FIXES = {
    errno.ENOSPC: "free space there or pick another output_dir",
    errno.EDQUOT: "free space there (disk quota) or pick another output_dir",
    errno.EFBIG: "pick an output_dir on a file system that takes larger files",
    errno.EROFS: "pick an output_dir on a writable file system",
    errno.EACCES: "make it writable for this user or pick another output_dir",
    errno.EPERM: "make it writable for this user or pick another output_dir",
    errno.ENOENT: "pass an output_dir that is a folder or can be created as one",
    errno.ENOTDIR: "pass an output_dir that is a folder or can be created as one",
    errno.EISDIR: "remove what is in the way or pick another output_dir",
    errno.EEXIST: "remove what is in the way or pick another output_dir",
    errno.ENAMETOOLONG: "pick a shorter output_dir",
    errno.ELOOP: "remove the symbolic link there (a run writes only real files in its folder)",
}


@contextlib.contextmanager
def output_errors(out: Path, doing: str, kept: str) -> Iterator[None]:
    """Turn a full, read-only or unusable output folder into one sentence: what failed, what is kept,
    what to do (a traceback of 40 lines said none of it)."""
    try:
        yield
    except OSError as e:
        fix = _FIXES.get(e.errno or -1)
        if fix is None:
            raise
        # A temporary file's name says nothing to the user (and it is gone): `doing` names the file.
        named = e.filename and str(e.filename) != str(out) and not str(e.filename).endswith(TEMP_SUFFIX)
        where = f" ({e.filename})" if named else ""
        reason = e.strerror or str(e)
        raise OutputError(
            f"Could not {doing} in output_dir {str(out)!r}: {reason}{where}; {kept}; "
            f"{fix}, then rerun the same command."
        ) from e
