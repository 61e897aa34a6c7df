"""One progress bar for the whole run, however many processes share it.

Every process adds 1 to the shared "done" counter per finished row; the main process alone draws a
tqdm bar from that counter (rows done of all, videos per hour, ETA), refreshing between rows, after
each denoising step and while it waits for the others.
"""

from __future__ import annotations

import time

from tqdm import tqdm

from batch_runner.cluster.sharding import Counter

REFRESH_SECONDS = 0.5


class Progress:
    def __init__(self, counter: Counter, total: int) -> None:
        self.counter = counter
        self.bar = tqdm(total=total, unit="video", desc="videos", dynamic_ncols=True, smoothing=0.05)
        self.started = time.monotonic()
        self._last = 0.0

    def refresh(self) -> None:
        now = time.monotonic()
        if now - self._last < REFRESH_SECONDS:
            return
        self._last = now
        done = self.counter.add("done", 0)
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)
            per_hour = done / max(now - self.started, 1e-9) * 3600
            self.bar.set_postfix_str(f"{per_hour:.1f} videos/h")

    def close(self) -> None:
        self._last = 0.0
        self.refresh()
        self.bar.close()
