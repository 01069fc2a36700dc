"""Offline corpus scoring with Ray Data: an actor pool of `CorpusScorer`s (one `MaskedLM` each) scores every row;
the driver writes parquet parts atomically, so a killed run resumes with no duplicated and no missing ids.

Every input row comes out exactly once: scored, or with its `error` (rejected by the reader, empty, too long
under the "error" policy). The summary, histogram and optional filtered corpus are computed from the parts.
Model and output may be local or on object storage (s3://…): the output through `storage.Store` either way, the
model fetched once per node by each actor (`storage.local_copy`).
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jbert_ray.corpus import CorpusFiles, corpus_format, read_corpus, resolve_paths
from jbert_ray.errors import UserError
from jbert_ray.inference import LONG_TEXT_POLICIES, PLL_METHODS
from jbert_ray.outputs import OutputLock, check_output, clear_output
from jbert_ray.progress import Progress
from jbert_ray.resources import ACTOR_CPUS, cluster_cpus
from jbert_ray.storage import Store

STAGE = "score"
ERROR_TOO_LONG = "too_long"
PARTS = "parts"  # the output's parquet parts: parts/part-00000.parquet, …
_CANDIDATE = pa.struct([("token", pa.string()), ("score", pa.float32())])
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("pll", pa.float64()),  # sum of log p(token | rest), natural log
        ("pll_per_token", pa.float64()),  # pll / n_tokens: comparable across lengths, used for filtering
        ("token_pll", pa.list_(pa.float32())),
        ("n_tokens", pa.int32()),
        ("unk_rate", pa.float32()),  # share of [UNK] tokens: high means the vocab does not fit the text
        ("fill_mask", pa.list_(pa.list_(_CANDIDATE))),  # per [MASK] in the text: top-k candidates
        ("error", pa.string()),  # "" when scored
    ]
)


@dataclass(frozen=True)
class ScoreConfig:
    input: str  # corpus: file, folder or glob of .jsonl/.txt/.parquet (.gz), local or s3://, gs://, hdfs://
    model_dir: str  # our model dir or a Tohoku-style HF Japanese BERT dir, local or s3://, gs://, hdfs://
    output_dir: str  # parts/*.parquet, summary.json, a histogram, filtered/; local or s3://, gs://, hdfs://
    text_field: str = "text"  # JSON field or parquet column holding the text
    id_field: str | None = None  # JSON field or parquet column with row ids; None = file:line
    num_actors: int = 0  # scoring actors; 0 = one per CPU (or per GPU share with --gpus-per-actor)
    batch_size: int = 64  # rows per actor call (their masked copies are packed into big forwards)
    gpus_per_actor: float = 0.0  # GPUs per scoring actor (0 = CPU)
    method: Literal["pll", "pll-word-l2r"] = "pll"  # PLL, or PLL masking the rest of each word to the right
    long_text: Literal["window", "error"] = (
        "window"  # longer than the model: sliding windows, or a too_long row
    )
    top_k: int = 5  # fill-mask candidates for texts containing [MASK]
    filter_below: float | None = None  # also write rows with PLL per token ≥ this as a cleaned corpus
    filter_percentile: float | None = None  # or: the corpus without its lowest P% of rows by PLL per token
    rows_per_part: int = 4096  # rows per output parquet file (the unit of --resume)
    resume: bool = False  # keep finished parts, score only the rows not yet written
    overwrite: bool = False  # replace a non-empty output directory
    show_progress: bool = True  # progress bars and lines

    def __post_init__(self):
        if self.batch_size < 1 or self.rows_per_part < 1 or self.num_actors < 0 or self.gpus_per_actor < 0:
            raise UserError(
                "--batch-size and --rows-per-part must be ≥ 1, --num-actors and --gpus-per-actor ≥ 0"
            )
        if not 1 <= self.top_k <= 50:
            raise UserError(f"--top-k must be between 1 and 50, not {self.top_k}")
        if self.filter_below is not None and self.filter_percentile is not None:
            raise UserError("give --filter-below or --filter-percentile, not both")
        if self.filter_percentile is not None and not 0 <= self.filter_percentile < 100:
            raise UserError("--filter-percentile must be in [0, 100)")
        if self.method not in PLL_METHODS or self.long_text not in LONG_TEXT_POLICIES:
            raise UserError(f"--method is one of {PLL_METHODS}, --long-text one of {LONG_TEXT_POLICIES}")
        if self.resume and self.overwrite:
            raise UserError("give --resume or --overwrite, not both")


class CorpusScorer:
    """Ray Data callable: adds score columns to a batch of corpus rows, skipping ids already written."""

    def __init__(self, model_dir: str, config: dict, done_ids: frozenset[str] = frozenset()):
        from jbert_ray.inference import InferenceConfig, MaskedLM

        self.config = ScoreConfig(**config)
        self.lm = MaskedLM.from_pretrained(model_dir, config=InferenceConfig(long_text=self.config.long_text))
        self.done_ids = done_ids

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows = [
            (record_id, text, reason)
            for record_id, text, reason in zip(batch["record_id"], batch["text"], batch["reject"])
            if record_id not in self.done_ids
        ]
        cleaned = [self.lm.clean(text) if not reason else ("", reason) for _, text, reason in rows]
        scores = self._score([text for text, reason in cleaned if not reason])
        columns: dict[str, list] = {name: [] for name in SCHEMA.names}
        for (record_id, text, _), (_, reason) in zip(rows, cleaned):
            score = None if reason else scores.pop(0)
            if isinstance(score, str):
                score, reason = None, score
            columns["id"].append(record_id)
            columns["text"].append(text)
            columns["error"].append(reason)
            columns["fill_mask"].append(score["fill_mask"] if score else None)
            for name in ("pll", "pll_per_token", "token_pll", "n_tokens", "unk_rate"):
                columns[name].append(score[name] if score else None)
        return pa.table(columns, schema=SCHEMA)

    def _score(self, texts: list[str]) -> list[dict | str]:
        """Score dicts, or ERROR_TOO_LONG for a text the "error" policy refuses."""
        from jbert_ray.inference import TextTooLongError

        try:
            scores = self.lm.score(texts, method=self.config.method)
        except TextTooLongError:  # rare: find the offenders one by one
            return [ERROR_TOO_LONG] if len(texts) == 1 else [r for t in texts for r in self._score([t])]
        masked = [i for i, text in enumerate(texts) if "[MASK]" in text]
        fills = self.lm.fill_mask([texts[i] for i in masked], top_k=self.config.top_k) if masked else []
        results = [{**score, "fill_mask": None} for score in scores]
        for i, fill in zip(masked, fills):
            results[i]["fill_mask"] = fill
        return results


class PreparedScoring(NamedTuple):
    """A scoring job checked before Ray starts."""

    # Model and output as any node reads them: absolute paths, or URIs with AWS_ENDPOINT_URL passed on.
    config: ScoreConfig
    files: CorpusFiles  # the corpus, listed once
    out: Store
    lock: OutputLock  # held from the checks to the end of the run: a second run on this output is refused


def prepare_scoring(config: ScoreConfig) -> PreparedScoring:
    """The checks that need no cluster (corpus, model directory, output): call before starting Ray."""
    from jbert_ray.inference import check_model_location

    files = resolve_paths(config.input)
    model_dir = check_model_location(config.model_dir)
    inputs = {"corpus": config.input, "model": model_dir}
    out = check_output(config.output_dir, STAGE, inputs=inputs, overwrite=config.overwrite, keep=config.resume)
    lock = OutputLock(out, STAGE).acquire()
    if config.overwrite:
        clear_output(out, STAGE)
    return PreparedScoring(replace(config, model_dir=model_dir, output_dir=out.location), files, out, lock)


def run_scoring(job: ScoreConfig | PreparedScoring) -> dict:
    """Score the corpus on the cluster; write parts, summary.json, a histogram and the optional filtered corpus."""
    config, files, out, lock = job if isinstance(job, PreparedScoring) else prepare_scoring(job)
    try:
        return _score(config, files, out, lock)
    finally:
        lock.release()


def _score(config: ScoreConfig, files: CorpusFiles, out: Store, lock: OutputLock) -> dict:
    done_ids = _written_ids(out) if config.resume else frozenset()
    # Blocks of one actor batch: a block goes to one actor whole, and a scored row costs milliseconds.
    dataset = read_corpus(
        files,
        text_field=config.text_field,
        id_field=config.id_field,
        rows_per_block=config.batch_size,
    ).map_batches(
        CorpusScorer,
        fn_constructor_kwargs={"model_dir": config.model_dir, "config": asdict(config), "done_ids": done_ids},
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=_scorer_pool(config),
        num_cpus=ACTOR_CPUS,
        num_gpus=config.gpus_per_actor or None,
    )
    progress = Progress("score", rate_key="rows", enabled=config.show_progress)
    next_part = max((int(Path(p).stem.split("-")[1]) + 1 for p in _parts(out)), default=0)
    rows = 0
    for batch in dataset.iter_batches(batch_size=config.rows_per_part, batch_format="pyarrow"):
        if lock.lost:
            raise UserError(f"another run took over {out} (this one stalled); the parts written so far are kept")
        # Whole or not at all: a killed run leaves no half-written part that resume would trust.
        out.write_parquet(f"{PARTS}/part-{next_part:05d}.parquet", batch)
        next_part += 1
        rows += batch.num_rows
        progress.update(rows=rows)
    seconds = progress.elapsed_s
    summary = _summarize(out, config)
    summary.update(
        rows_this_run=rows,
        rows_resumed=len(done_ids),
        seconds=round(seconds, 2),
        sentences_per_s=round(rows / max(seconds, 1e-9), 2),
    )
    summary["filtered"] = _write_filtered(out, config, summary, files) if _filtering(config) else None
    out.write_json("summary.json", summary)
    return summary


def _scorer_pool(config: ScoreConfig):
    import ray
    import ray.data

    size = config.num_actors
    if not size and config.gpus_per_actor:
        size = max(1, int(ray.cluster_resources().get("GPU", 0) / config.gpus_per_actor))
    if config.gpus_per_actor and ray.cluster_resources().get("GPU", 0) < config.gpus_per_actor:
        raise UserError(f"--gpus-per-actor {config.gpus_per_actor} but the cluster has no such GPUs")
    # One block in flight per actor: a block of long texts takes seconds, and blocks queued behind a busy actor
    # would leave the others idle at the end of the corpus.
    return ray.data.ActorPoolStrategy(size=size or cluster_cpus(), max_tasks_in_flight_per_actor=1)


def _parts(out: Store) -> list[str]:
    """The finished parts, relative to the output (a killed local write leaves only a *.tmp, not listed)."""
    return [p for p in out.files(PARTS) if Path(p).name.startswith("part-") and p.endswith(".parquet")]


def _read_parts(out: Store, columns: list[str], parts: list[str] | None = None) -> pa.Table:
    paths = [out.full(p) for p in (_parts(out) if parts is None else parts)]
    return pq.read_table(paths, columns=columns, filesystem=out.filesystem)


def _written_ids(out: Store) -> frozenset[str]:
    parts = _parts(out)
    return frozenset(_read_parts(out, ["id"], parts).column("id").to_pylist()) if parts else frozenset()


def _summarize(out: Store, config: ScoreConfig) -> dict:
    if not _parts(out):
        raise UserError(f"corpus {config.input} is empty: no rows to score")
    table = _read_parts(out, ["pll_per_token", "error"])
    by_error: dict[str, int] = {}
    for error in table.column("error").to_pylist():
        if error:
            by_error[error] = by_error.get(error, 0) + 1
    values = _scored_values(table)
    summary = {
        "rows_in": table.num_rows,
        "rows_scored": table.num_rows - sum(by_error.values()),
        "rows_with_error": sum(by_error.values()),
        "errors_by_reason": by_error,
        "pll_per_token": _describe(values),
        "config": asdict(config),
    }
    if len(values):
        out.write_bytes("pll_per_token.png", _histogram_png(values))
        summary["histogram"] = str(out.child("pll_per_token.png"))
    return summary


def _describe(values: np.ndarray) -> dict:
    if not len(values):
        return {}
    percentiles = dict(zip(("p1", "p5", "p50", "p95", "p99"), np.percentile(values, [1, 5, 50, 95, 99])))
    return {"mean": float(values.mean()), **{k: float(v) for k, v in percentiles.items()}}


def _histogram_png(values: np.ndarray) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(values, bins=60, color="#3b6ea8")
    ax.set_xlabel("PLL per token (natural log; higher = more natural to the model)")
    ax.set_ylabel("rows")
    ax.set_title(f"Pseudo-log-likelihood per token, {len(values):,} rows")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return png.getvalue()


def _filtering(config: ScoreConfig) -> bool:
    return config.filter_below is not None or config.filter_percentile is not None


def _write_filtered(out: Store, config: ScoreConfig, summary: dict, files: CorpusFiles) -> dict:
    """Stream rows with pll_per_token ≥ threshold into the input's format (jsonl, txt or parquet), staged locally,
    then copied into the output's filtered/."""
    parts = _parts(out)
    threshold = config.filter_below
    if threshold is None:
        values = _scored_values(_read_parts(out, ["pll_per_token", "error"], parts))
        threshold = float(np.percentile(values, config.filter_percentile)) if len(values) else float("inf")
    fmt = corpus_format(files.paths[0])
    name = f"corpus.{fmt}"
    kept = 0
    staging_parent = None if out.is_remote else out.location  # a local output: no copy across disks
    with tempfile.TemporaryDirectory(prefix=".filtered-", dir=staging_parent) as staging:
        with _CorpusWriter(Path(staging) / name, fmt, config) as writer:
            for part in parts:
                table = _read_parts(out, ["id", "text", "pll_per_token", "error"], [part])
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
        "rows_dropped": summary["rows_in"] - kept,
    }


def _scored_values(table: pa.Table) -> np.ndarray:
    values = table.column("pll_per_token").to_numpy(zero_copy_only=False)
    ok = np.array([not e for e in table.column("error").to_pylist()], dtype=bool)
    return values[ok & ~np.isnan(values.astype(np.float64))].astype(np.float64)


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
