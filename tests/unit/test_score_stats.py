"""The scoring summary from per-part statistics: the same counts, moments and percentiles (to one bin) as all
scores held at once, whatever the split into parts."""

import numpy as np
import pyarrow as pa
import pytest

from jbert_ray.score import SCHEMA
from jbert_ray.score_stats import BIN_NATS, Totals, part_stats


def scored_table(values: list[float | None], errors: list[str]) -> pa.Table:
    n = len(values)
    columns = {name: [None] * n for name in SCHEMA.names}
    columns.update(id=[f"c.jsonl:{i}" for i in range(n)], text=["東京は日本の首都です。"] * n, error=errors,
                   pll_per_token=values, n_tokens=[None if e else 7 for e in errors])  # fmt: skip
    return pa.table(columns, schema=SCHEMA)


def test_parts_summed_give_the_statistics_of_the_whole_corpus():
    rng = np.random.default_rng(0)
    values = rng.normal(-4.0, 1.5, 5000)
    errors = ["" if i % 50 else "empty" for i in range(5000)]
    whole = [v for v, e in zip(values, errors) if not e]
    tables = [scored_table([None if e else float(v) for v, e in zip(values[i : i + 700], errors[i : i + 700])],
                           errors[i : i + 700]) for i in range(0, 5000, 700)]  # fmt: skip
    totals = Totals.of(part_stats(t) for t in tables)
    assert totals.rows == 5000 and totals.scored == len(whole) and dict(totals.errors) == {"empty": 100}
    assert totals.tokens == 7 * len(whole)
    described = totals.describe()
    assert described["mean"] == pytest.approx(np.mean(whole)) and described["min"] == min(whole)
    for q in (1, 5, 25, 50, 95, 99):
        assert abs(totals.percentile(q) - np.percentile(whole, q, method="inverted_cdf")) <= BIN_NATS + 1e-9, q
    kept = sum(v >= totals.percentile(25) for v in whole)  # what --filter-percentile 25 keeps
    assert 0.75 * len(whole) <= kept <= 0.76 * len(whole)
    assert len(totals.histogram_png()) > 1000


def test_a_corpus_with_nothing_scored_has_no_percentiles():
    totals = Totals.of([part_stats(scored_table([None, None], ["empty", "too_long"]))])
    assert totals.scored == 0 and totals.describe() == {} and totals.percentile(10) == float("inf")
