"""What `jbert score` says about a corpus without holding its scores: each written part carries counts and a
histogram of PLL per token, and the summary, the percentiles and a filter's threshold come from their sum.

The histogram's bins are BIN_NATS wide, so percentiles (and a `--filter-percentile` threshold, a bin's lower
edge) are exact to that width; min, max and mean are exact.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

BIN_NATS = 0.01


def part_stats(table: pa.Table) -> dict:
    """The statistics of one part: rows, errors by reason, tokens, and PLL-per-token moments and histogram."""
    errors = Counter(e for e in table.column("error").to_pylist() if e)
    values = scored_values(table)
    bins = Counter(np.floor(values / BIN_NATS).astype(np.int64).tolist())
    return {
        "rows": table.num_rows,
        "errors_by_reason": dict(errors),
        "tokens": int(pc.sum(table.column("n_tokens")).as_py() or 0),
        "scored": len(values),
        "sum": float(values.sum()),
        "min": float(values.min()) if len(values) else None,
        "max": float(values.max()) if len(values) else None,
        "bins": {str(b): n for b, n in bins.items()},
    }


def scored_values(table: pa.Table) -> np.ndarray:
    """PLL per token of the rows scored without error."""
    ok = pc.and_(pc.equal(table.column("error"), ""), pc.is_valid(table.column("pll_per_token")))
    values = table.column("pll_per_token").filter(ok).to_numpy(zero_copy_only=False).astype(np.float64)
    return values[~np.isnan(values)]


class Totals:
    """The sum of parts' statistics, one part at a time."""

    def __init__(self):
        self.rows = self.tokens = self.scored = 0
        self.sum = 0.0
        self.min, self.max = math.inf, -math.inf
        self.errors: Counter[str] = Counter()
        self.bins: Counter[int] = Counter()

    def add(self, stats: dict) -> None:
        self.rows += stats["rows"]
        self.tokens += stats["tokens"]
        self.scored += stats["scored"]
        self.sum += stats["sum"]
        self.errors.update(stats["errors_by_reason"])
        self.bins.update({int(b): n for b, n in stats["bins"].items()})
        if stats["scored"]:
            self.min, self.max = min(self.min, stats["min"]), max(self.max, stats["max"])

    @classmethod
    def of(cls, parts: Iterable[dict]) -> Totals:
        totals = cls()
        for stats in parts:
            totals.add(stats)
        return totals

    def percentile(self, q: float) -> float:
        """The lower edge of the bin holding the q-th percentile (0 ≤ q ≤ 100) of the scored rows."""
        if not self.scored:
            return math.inf
        edges = sorted(self.bins)
        counts = np.cumsum([self.bins[b] for b in edges])
        index = int(np.searchsorted(counts, q / 100 * self.scored, side="left"))
        return max(self.min, edges[min(index, len(edges) - 1)] * BIN_NATS)

    def describe(self) -> dict:
        if not self.scored:
            return {}
        percentiles = {f"p{q}": self.percentile(q) for q in (1, 5, 50, 95, 99)}
        return {"mean": self.sum / self.scored, "min": self.min, "max": self.max, **percentiles}

    def histogram_png(self) -> bytes:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        edges = np.array(sorted(self.bins), dtype=np.float64) * BIN_NATS
        counts = np.array([self.bins[b] for b in sorted(self.bins)], dtype=np.float64)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.hist(edges, bins=60, weights=counts, color="#3b6ea8")
        ax.set_xlabel("PLL per token (natural log; higher = more natural to the model)")
        ax.set_ylabel("rows")
        ax.set_title(f"Pseudo-log-likelihood per token, {self.scored:,} rows")
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110)
        plt.close(fig)
        return png.getvalue()
