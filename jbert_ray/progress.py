"""Progress lines for long driver loops: one line to stderr every few seconds, readable in `ray job logs`."""

from __future__ import annotations

import sys
import time


class Progress:
    """Prints `label: key=value …, N/s` at most every `every_s` seconds."""

    def __init__(self, label: str, rate_key: str, every_s: float = 5.0, enabled: bool = True):
        self.label = label
        self.rate_key = rate_key
        self.every_s = every_s
        self.enabled = enabled
        self.start = self._last = time.perf_counter()

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    def update(self, **counts: int) -> None:
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.every_s:
            self._last = now
            rate = counts.get(self.rate_key, 0) / max(now - self.start, 1e-9)
            fields = ", ".join(f"{key}={value:,}" for key, value in counts.items())
            print(f"{self.label}: {fields} ({rate:,.0f} {self.rate_key}/s)", file=sys.stderr, flush=True)
