"""The cleaned corpus of `jbert score --filter-below X | --filter-percentile P`: the rows scored at or above the
threshold, in the input's format, streamed part by part (never the whole corpus in memory)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jbert_ray.score_stats import Totals
from jbert_ray.storage import Store

if TYPE_CHECKING:
    from jbert_ray.score import ScoreConfig


def write_filtered(out: Store, config: ScoreConfig, records: list[dict], rows_in: int, fmt: str) -> dict:
    """Stream rows with pll_per_token ≥ threshold into the input's format (jsonl, txt or parquet), staged locally,
    then put in place of the output's filtered/."""
    threshold = config.filter_below
    if threshold is None:  # a bin's lower edge: exact to score_stats.BIN_NATS
        threshold = Totals.of(r["stats"] for r in records).percentile(config.filter_percentile)
    name = f"corpus.{fmt}"
    kept = 0
    staging_parent = None if out.is_remote else out.location  # a local output: no copy across disks
    with tempfile.TemporaryDirectory(prefix=".filtered-", dir=staging_parent) as staging:
        with _CorpusWriter(Path(staging) / name, fmt, config) as writer:
            for part in sorted(r["part"] for r in records):
                table = pq.read_table(out.full(part), columns=["id", "text", "pll_per_token", "error"],
                                      filesystem=out.filesystem)  # fmt: skip
                keep = pc.and_(
                    pc.equal(table.column("error"), ""),
                    pc.greater_equal(pc.fill_null(table.column("pll_per_token"), -np.inf), threshold),
                )
                table = table.filter(keep)
                writer.write(table)
                kept += table.num_rows
        out.replace_dir(staging, "filtered")
    return {
        "path": str(out.child(f"filtered/{name}")),
        "threshold": threshold,
        "rows_kept": kept,
        "rows_dropped": rows_in - kept,
    }


class _CorpusWriter:
    """Writes (id, text) tables as jsonl (text field + id column if given), txt lines or parquet."""

    def __init__(self, path: Path, fmt: str, config: ScoreConfig):
        self.path, self.fmt, self.config = path, fmt, config
        self._parquet = None
        self._file = None if fmt == "parquet" else open(path, "w", encoding="utf-8")

    def write(self, table: pa.Table) -> None:
        if self.fmt == "parquet":
            table = table.select(["id", "text"]).rename_columns(
                [self.config.id_field or "id", self.config.text_field]
            )
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self.path, table.schema)
            self._parquet.write_table(table)
            return
        for record_id, text in zip(table.column("id").to_pylist(), table.column("text").to_pylist()):
            if self.fmt == "txt":
                self._file.write(text.replace("\n", " ") + "\n")
            else:
                record = {self.config.text_field: text}
                if self.config.id_field:
                    record[self.config.id_field] = record_id
                self._file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def __enter__(self) -> _CorpusWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self._parquet is not None:
            self._parquet.close()
        if self._file is not None:
            self._file.close()
