"""Progress lines for long driver loops: one line to stderr every few seconds, readable in `ray job logs`."""

from __future__ import annotations

import sys
import threading
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


class ScoredCounter:
    """Rows and tokens the scorers have finished, reported per chunk (long before their batch ends); a Ray actor."""

    def __init__(self):
        self.rows = self.tokens = 0

    def add(self, rows: int, tokens: int) -> None:
        self.rows, self.tokens = self.rows + rows, self.tokens + tokens

    def totals(self) -> tuple[int, int]:
        return self.rows, self.tokens


class BackgroundLoop:
    """A daemon thread that calls `tick()` every `period_s` seconds while its `with` block runs."""

    def __init__(self, name: str, period_s: float):
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.tick()

    def tick(self) -> None:
        raise NotImplementedError


class ScoreProgress(BackgroundLoop):
    """While scoring runs, a line on stderr every `every_s`: rows, rows/s, tokens/s and an ETA from the estimated
    rows left, read from the scorers' ScoredCounter actor."""

    def __init__(self, counter, rows_expected: int, every_s: float = 10.0):
        super().__init__("score-progress", every_s)
        self.counter, self.rows_expected = counter, rows_expected
        self.start = time.perf_counter()

    def tick(self) -> None:
        import ray

        try:
            rows, tokens = ray.get(self.counter.totals.remote(), timeout=5)
        except Exception:  # noqa: BLE001 — a busy or gone counter: the next line tells
            return
        print(self.line(rows, tokens, time.perf_counter() - self.start), file=sys.stderr, flush=True)

    def line(self, rows: int, tokens: int, seconds: float) -> str:
        """`score: 1,234 rows (≈12% of about 10,000), 23.1 rows/s, 812 tokens/s, ETA 3:10`."""
        rate = rows / max(seconds, 1e-9)
        left = max(self.rows_expected - rows, 0)
        share = f" (≈{rows / self.rows_expected:.0%} of about {self.rows_expected:,})" if self.rows_expected else ""
        eta = f", ETA {_clock(left / rate)}" if rate > 0 and left else ""
        return f"score: {rows:,} rows{share}, {rate:,.1f} rows/s, {tokens / max(seconds, 1e-9):,.0f} tokens/s{eta}"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
