"""Ask a headless Chromium what a page saw, waiting on the page's own promise rather than on a clock.

`--dump-dom` with `--virtual-time-budget` dumps when the page's virtual time runs out, but media
plays on the wall clock: on a loaded machine the dump can come before a frame was decoded, and no
budget fixes that. The DevTools protocol over `--remote-debugging-pipe` (NUL-terminated JSON on the
browser's fds 3 and 4; the standard library suffices) lets the test await a promise the page resolves
when the thing it watches has happened, however long the machine takes.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import subprocess
import time
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
)


class _Pipe:
    """One DevTools connection: numbered commands out, their answers back, events kept by name."""

    def __init__(self, send: int, receive: int, deadline: float) -> None:
        self.send, self.receive, self.deadline, self.buffer, self.next_id = send, receive, deadline, b"", 0
        self.events: set[str] = set()

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.send, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._message()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def until(self, event: str) -> None:
        """Read until the browser has sent `event` (at any time since the connection opened)."""
        while event not in self.events:
            self._message()

    def _message(self) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.receive], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer before the deadline")
            chunk = os.read(self.receive, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed its DevTools pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        decoded = json.loads(message)
        if "method" in decoded:
            self.events.add(decoded["method"])
        return decoded


def _pipe_above(fd: int) -> tuple[int, int]:
    """os.pipe(), its ends moved above `fd`: a fresh process's pipe can be fds 3 and 4 themselves,
    which the redirections onto 3 and 4 would overwrite or close."""
    ends = []
    for end in os.pipe():
        ends.append(fcntl.fcntl(end, fcntl.F_DUPFD_CLOEXEC, fd + 1))
        os.close(end)
    return ends[0], ends[1]


def await_in_chromium(url: str, expression: str, profile: Path, timeout: float = 300) -> Any:
    """Open `url` and return the value of `expression`, a promise awaited until the page settles it.

    The timeout only bounds a hung browser; a busy machine just takes longer within it.
    """
    to_browser, from_test = _pipe_above(4)  # the browser reads fd 3, writes fd 4
    from_browser, to_test = _pipe_above(4)
    # bash moves its ends onto fds 3 and 4 and execs the browser (no preexec_fn, which is unsafe in a
    # process with threads, as pytest's workers are).
    on_3_and_4 = f'exec "$0" "$@" 3<&{to_browser} 4>&{to_test} {to_browser}<&- {to_test}>&-'
    command = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
    browser = subprocess.Popen(
        ["bash", "-c", on_3_and_4, *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=(to_browser, to_test),
    )
    os.close(to_browser)
    os.close(to_test)
    pipe = _Pipe(from_test, from_browser, time.monotonic() + timeout)
    try:
        target = pipe.call("Target.createTarget", url="about:blank")["targetId"]
        session = pipe.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        pipe.call("Page.enable", session)
        pipe.call("Page.navigate", session, url=url)
        while True:  # the blank page's own load may be the first one seen: wait for the page's
            pipe.events.discard("Page.loadEventFired")
            pipe.until("Page.loadEventFired")  # its scripts have run, so its promise exists
            if pipe.call("Runtime.evaluate", session, expression="location.href")["result"]["value"] == url:
                break
        result = pipe.call("Runtime.evaluate", session, expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"the page rejected: {result['exceptionDetails']}")
        return result["result"].get("value")
    finally:
        _close(browser, pipe)
        os.close(from_test)
        os.close(from_browser)


def _close(browser: subprocess.Popen, pipe: _Pipe) -> None:
    """Ask the browser to close (its renderers go with it), and kill it where it does not."""
    try:
        os.write(pipe.send, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
        browser.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        browser.kill()
        browser.wait()
