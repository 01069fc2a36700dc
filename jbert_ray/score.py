"""Offline corpus scoring with Ray Data: an actor pool of `CorpusScorer`s (one `MaskedLM` each) scores every row
and writes its own parquet parts, each followed by a done record naming the input lines it holds and its
statistics. The driver sees one small row per batch, so its memory does not grow with the corpus.

Every input row comes out exactly once: scored, or with its `error` (rejected by the reader, empty, too long).
A killed run resumes from the done records (input lines, as preprocess does: never a set of ids), on the same
input files only (inputs.json). Parts are flushed every `rows_per_part` rows or `flush_s` seconds, so a kill
loses at most that much work. The summary, histogram and filter threshold come from the records' statistics
(score_stats). Model and output may be local or on object storage (s3://…), through `storage.Store`.

    OUT/parts/part-KEY-NNNNN.parquet   scored rows (SCHEMA)
    OUT/done/KEY/NNNNN.json            {ranges, part, stats}: written after its part
    OUT/inputs.json                    the corpus files (path, size, mtime) a resume must find unchanged
    OUT/summary.json, pll_per_token.png, filtered/corpus.<fmt>
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jbert_ray.corpus import CorpusFiles, corpus_format, estimate_rows, read_corpus, resolve_paths
from jbert_ray.errors import UserError
from jbert_ray.inference import LONG_TEXT_POLICIES, PLL_METHODS
from jbert_ray.outputs import OutputLock, check_output, check_resume_or_overwrite, clear_output, prepared
from jbert_ray.progress import ScoredCounter, ScoreProgress
from jbert_ray.resources import ACTOR_CPUS, cluster_cpus
from jbert_ray.score_filter import write_filtered
from jbert_ray.score_stats import Totals, part_stats
from jbert_ray.shard_manifest import batch_key, line_ranges, merge_ranges
from jbert_ray.storage import Store

STAGE = "score"
ERROR_TOO_LONG = "too_long"
PARTS, DONE, INPUTS, RUN_TOKEN = "parts", "done", "inputs.json", ".run_token.json"
_CHUNK_ROWS = 16  # rows scored per MaskedLM call: the unit a flush can cut at
_READERS = 16  # concurrent small reads of done records (each is a request to an object store)
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
    batch_size: int = 256  # rows per actor call (a block of the corpus; its masked copies are packed into forwards)
    gpus_per_actor: float = 0.0  # GPUs per scoring actor (0 = CPU)
    # docs/scoring.md gives each method's speed and fidelity
    method: Literal["pll", "pll-word-l2r", "pll-strided"] = "pll"  # a pass per token; + the rest of its word; k passes
    mask_stride: int = 0  # pll-strided: passes per text (k); 0 = the inference default
    dtype: Literal["float32", "auto", "bfloat16"] = "float32"  # auto: bf16 on a GPU or a CPU with native bf16
    long_text: Literal["window", "error"] = (
        "window"  # longer than the model: sliding windows, or a too_long row
    )
    top_k: int = 5  # fill-mask candidates for texts containing [MASK]
    filter_below: float | None = None  # also write rows with PLL per token ≥ this as a cleaned corpus
    filter_percentile: float | None = None  # or: the corpus without its lowest P% of rows by PLL per token
    rows_per_part: int = 4096  # at most this many rows per output parquet file (never more than a batch)
    flush_s: float = 60.0  # an actor writes what it has scored at least this often: a kill loses at most this
    max_tokens_per_row: int = 0  # longer rows are too_long errors, not hours of work; 0 = 4 model windows
    resume: bool = False  # keep finished parts, score only the rows not yet written
    overwrite: bool = False  # replace a non-empty output directory
    show_progress: bool = True  # progress bars and lines

    def __post_init__(self):
        if self.batch_size < 1 or self.rows_per_part < 1 or self.num_actors < 0 or self.gpus_per_actor < 0:
            raise UserError(
                "--batch-size and --rows-per-part must be ≥ 1, --num-actors and --gpus-per-actor ≥ 0"
            )
        if self.flush_s <= 0 or self.max_tokens_per_row < 0 or self.mask_stride < 0:
            raise UserError("--flush-s must be > 0, --max-tokens-per-row and --mask-stride ≥ 0")
        if not 1 <= self.top_k <= 50:
            raise UserError(f"--top-k must be between 1 and 50, not {self.top_k}")
        if self.filter_below is not None and self.filter_percentile is not None:
            raise UserError("give --filter-below or --filter-percentile, not both")
        if self.filter_percentile is not None and not 0 <= self.filter_percentile < 100:
            raise UserError("--filter-percentile must be in [0, 100)")
        if self.method not in PLL_METHODS or self.long_text not in LONG_TEXT_POLICIES:
            raise UserError(f"--method is one of {PLL_METHODS}, --long-text one of {LONG_TEXT_POLICIES}")
        check_resume_or_overwrite(self.resume, self.overwrite)


class CorpusScorer:
    """Ray Data callable: scores a batch of corpus rows and writes them as parts + done records; returns one row of
    counts. A retried batch (its actor died) finds the chunks an earlier attempt finished and scores the rest."""

    def __init__(self, model_dir: str, config: dict, run_token: str, counter=None):
        from jbert_ray.inference import InferenceConfig, MaskedLM

        self.config = ScoreConfig(**config)
        inference = InferenceConfig(long_text=self.config.long_text)
        if self.config.mask_stride:
            inference = replace(inference, mask_stride=self.config.mask_stride)
        self.lm = MaskedLM.from_pretrained(model_dir, dtype=self.config.dtype, config=inference)
        self.max_tokens = self.config.max_tokens_per_row or 4 * self.lm.max_length
        self.out = Store(self.config.output_dir)
        self.run_token, self.counter = run_token, counter

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = batch_key(line_ranges(batch["path"], batch["line"]))
        chunk, done = self._finished_chunks(key)
        todo = [i for i, (path, line) in enumerate(zip(batch["path"], batch["line"])) if (path, line) not in done]
        tables: list[pa.Table] = []
        held: list[int] = []  # batch rows scored but not yet written
        last_flush, rows, tokens = time.monotonic(), 0, 0
        for start in range(0, len(todo), _CHUNK_ROWS):
            indices = todo[start : start + _CHUNK_ROWS]
            tables.append(self._score_rows(batch, indices))
            held.extend(indices)
            scored_tokens = int(pc.sum(tables[-1].column("n_tokens")).as_py() or 0)
            rows, tokens = rows + len(indices), tokens + scored_tokens
            if self.counter is not None:  # Ray: fire-and-forget progress to the driver's counter actor
                self.counter.add.remote(len(indices), scored_tokens)
            due = time.monotonic() - last_flush >= self.config.flush_s or len(held) >= self.config.rows_per_part
            if due or start + _CHUNK_ROWS >= len(todo):
                self._flush(key, chunk, pa.concat_tables(tables), batch, held)
                tables, held, chunk, last_flush = [], [], chunk + 1, time.monotonic()
        return {"rows": np.array([rows]), "tokens": np.array([tokens])}

    def _finished_chunks(self, key: str) -> tuple[int, set[tuple[str, int]]]:
        """(next chunk number, input lines already written) of this batch: empty unless it is a retry."""
        records = [self.out.read_json(name) for name in self.out.files(f"{DONE}/{key}")]
        done = {(path, line) for r in records for path, runs in r["ranges"].items()
                for first, last in runs for line in range(first, last + 1)}  # fmt: skip
        return len(records), done

    def _score_rows(self, batch: dict[str, np.ndarray], rows: list[int]) -> pa.Table:
        record_ids = [batch["record_id"][i] for i in rows]
        cleaned = [self.lm.clean(batch["text"][i]) if not batch["reject"][i] else ("", batch["reject"][i])
                   for i in rows]  # fmt: skip
        cleaned = [(text, reason or self._too_long(text)) for text, reason in cleaned]
        scores = self._score([text for text, reason in cleaned if not reason])
        columns: dict[str, list] = {name: [] for name in SCHEMA.names}
        for record_id, i, (_, reason) in zip(record_ids, rows, cleaned):
            score = None if reason else scores.pop(0)
            if isinstance(score, str):
                score, reason = None, score
            columns["id"].append(record_id)
            columns["text"].append(batch["text"][i])
            columns["error"].append(reason)
            columns["fill_mask"].append(score["fill_mask"] if score else None)
            for name in ("pll", "pll_per_token", "token_pll", "n_tokens", "unk_rate"):
                columns[name].append(score[name] if score else None)
        return pa.table(columns, schema=SCHEMA)

    def _too_long(self, text: str) -> str:
        # A token spans at least one character: only a text longer than the limit in characters can exceed it.
        if len(text) <= self.max_tokens or len(self.lm.encode([text])[0].ids) <= self.max_tokens:
            return ""
        return ERROR_TOO_LONG

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

    def _flush(self, key: str, chunk: int, table: pa.Table, batch: dict[str, np.ndarray], rows: list[int]) -> None:
        """Write a part, then its done record: a part without a record is dropped on resume."""
        part = f"{PARTS}/part-{key}-{chunk:05d}.parquet"
        self.out.write_parquet(part, table)
        ranges = line_ranges([batch["path"][i] for i in rows], [batch["line"][i] for i in rows])
        if self.out.read_json(RUN_TOKEN, {}).get("run") != self.run_token:  # outlived a killed run: no record
            raise RuntimeError(f"{self.out} is now written by another run; not recording {part}")
        self.out.write_json(f"{DONE}/{key}/{chunk:05d}.json", {"ranges": ranges, "part": part,
                                                               "stats": part_stats(table)})  # fmt: skip


class PreparedScoring(NamedTuple):
    """A scoring job checked before Ray starts."""

    # Model and output as any node reads them: absolute paths, or URIs with AWS_ENDPOINT_URL passed on.
    config: ScoreConfig
    files: CorpusFiles  # the corpus, listed once
    out: Store
    lock: OutputLock  # held from the checks to the end of the run: a second run on this output is refused


def prepare_scoring(config: ScoreConfig) -> PreparedScoring:
    """The checks that need no cluster (corpus, model directory, output, the inputs of a resumed run): call before
    starting Ray."""
    from jbert_ray.inference import check_model_location

    files = resolve_paths(config.input)
    model_dir = check_model_location(config.model_dir)
    inputs = {"corpus": config.input, "model": model_dir}
    out = check_output(config.output_dir, STAGE, inputs=inputs, overwrite=config.overwrite, keep=config.resume)
    lock = OutputLock(out, STAGE).acquire()
    if config.overwrite:
        clear_output(out, STAGE)
    _check_inputs(out, files)
    return PreparedScoring(replace(config, model_dir=model_dir, output_dir=out.location), files, out, lock)


def run_scoring(job: ScoreConfig | PreparedScoring) -> dict:
    """Score the corpus on the cluster; write parts, summary.json, a histogram and the optional filtered corpus."""
    config, files, out, lock = prepared(job, PreparedScoring, prepare_scoring)
    try:
        return _score(config, files, out, lock)
    finally:
        lock.release()


def done_records(out: Store) -> Iterator[dict]:
    """The output's done records (read a few at a time: on an object store each read is a request)."""
    names = [n for n in out.files(DONE) if n.endswith(".json")]
    with ThreadPoolExecutor(_READERS) as pool:
        yield from pool.map(out.read_json, names)


def _score(config: ScoreConfig, files: CorpusFiles, out: Store, lock: OutputLock) -> dict:
    import ray

    if config.id_field:
        _check_unique_ids(files, config)
    done = _prune(out)
    resumed = Totals.of(r["stats"] for r in done_records(out)).rows
    run_token = uuid.uuid4().hex
    out.write_json(RUN_TOKEN, {"run": run_token})  # earlier runs' surviving actors stop recording
    counter = ray.remote(num_cpus=0)(ScoredCounter).remote()  # Ray: the scorers report each chunk to it
    pool = _scorer_pool(config)
    rows_left = max(0, estimate_rows(files.paths, files.filesystem) - resumed)
    # A block goes to one actor whole: a small corpus is cut into at least 4 blocks per actor, so no actor is
    # left with the last long block while the others idle.
    batch = max(1, min(config.batch_size, -(-rows_left // (4 * pool.max_size))))
    dataset = read_corpus(
        files, text_field=config.text_field, id_field=config.id_field, positions=True, skip=done,
        rows_per_block=batch,
    ).map_batches(
        CorpusScorer,
        fn_constructor_kwargs={"model_dir": config.model_dir, "config": asdict(config), "run_token": run_token,
                               "counter": counter},
        batch_size=batch,
        batch_format="numpy",
        compute=pool,
        num_cpus=ACTOR_CPUS,
        num_gpus=config.gpus_per_actor or None,
    )  # fmt: skip
    progress = ScoreProgress(counter, rows_left)
    rows = tokens = 0
    try:
        with progress if config.show_progress else nullcontext():
            for row in dataset.iter_rows():  # one small row per batch: the parts are already written
                rows, tokens = rows + int(row["rows"]), tokens + int(row["tokens"])
                if lock.lost:
                    raise UserError(f"another run took over {out} (this one stalled); its parts are kept")
    finally:
        ray.kill(counter)
    seconds = time.perf_counter() - progress.start
    summary = _summarize(out, config)
    summary.update(
        rows_this_run=rows,
        rows_resumed=resumed,
        seconds=round(seconds, 2),
        sentences_per_s=round(rows / max(seconds, 1e-9), 2),
        tokens_per_s=round(tokens / max(seconds, 1e-9), 1),
    )
    if _filtering(config):
        fmt = corpus_format(files.paths[0])
        summary["filtered"] = write_filtered(out, config, list(done_records(out)), summary["rows_in"], fmt)
    else:
        summary["filtered"] = None
    out.write_json("summary.json", summary)
    return summary


def scored_rows(out: Store) -> int:
    """Rows the output holds so far (what a stopped run kept)."""
    return Totals.of(r["stats"] for r in done_records(out)).rows


def _check_inputs(out: Store, files: CorpusFiles) -> None:
    """Record the corpus files on a fresh run; a resumed run must find them unchanged and in place, or it would
    score moved lines again under new ids, or mix two versions of a file."""
    infos = files.filesystem.get_file_info(files.paths)
    now = [{"path": i.path, "size": i.size, "mtime_ns": i.mtime_ns} for i in infos]
    before = out.read_json(INPUTS)
    if before is None or not out.files(DONE):
        out.write_json(INPUTS, now)
        return
    if before == now:
        return
    gone = {f["path"] for f in before} - {f["path"] for f in now}
    new = {f["path"] for f in now} - {f["path"] for f in before}
    changed = [f["path"] for f in now if f not in before and f["path"] not in new]
    detail = (f"{len(changed)} changed (e.g. {changed[0]})" if changed else
              f"{len(gone)} files gone, {len(new)} new (moved? e.g. {sorted(gone or new)[0]})")  # fmt: skip
    raise UserError(f"cannot resume {out}: the corpus is not the one it scored: {detail}; use a new --out")


def _check_unique_ids(files: CorpusFiles, config: ScoreConfig) -> None:
    """With --id-field, every id must be unique (each is one output row): checked by a distributed count."""
    ids = read_corpus(files, text_field=config.text_field, id_field=config.id_field).select_columns(["record_id"])
    repeated = ids.groupby("record_id").count().filter(lambda row: row["count()"] > 1).take(3)
    if repeated:
        shown = ", ".join(f"{r['record_id']!r} ×{r['count()']}" for r in repeated)
        raise UserError(f"--id-field {config.id_field}: ids are not unique ({shown}); each id is one output row")


def _prune(out: Store) -> dict[str, list[tuple[int, int]]]:
    """Forget done records whose part is gone or holds other rows (its lines are scored again), delete parts no
    record names (a flush cut short); return the input lines already done."""
    names = [n for n in out.files(DONE) if n.endswith(".json")]
    with ThreadPoolExecutor(_READERS) as pool:
        records = list(pool.map(out.read_json, names))
        rows = list(pool.map(lambda r: _part_rows(out, r["part"]), records))
    kept = []
    for name, record, found in zip(names, records, rows):
        if found == record["stats"]["rows"]:
            kept.append(record)
        else:
            out.delete(name)
    named = {r["part"] for r in kept}
    for part in out.files(PARTS):
        if part not in named:
            out.delete(part)
    return merge_ranges(kept)


def _part_rows(out: Store, part: str) -> int | None:
    try:
        return pq.read_metadata(out.full(part), filesystem=out.filesystem).num_rows
    except (OSError, ValueError):  # missing, or not a whole parquet file
        return None


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


def _summarize(out: Store, config: ScoreConfig) -> dict:
    totals = Totals.of(r["stats"] for r in done_records(out))
    if not totals.rows:
        raise UserError(f"corpus {config.input} is empty: no rows to score")
    errors = sum(totals.errors.values())
    summary = {
        "rows_in": totals.rows,
        "rows_scored": totals.rows - errors,
        "rows_with_error": errors,
        "errors_by_reason": dict(sorted(totals.errors.items())),
        "tokens": totals.tokens,
        "pll_per_token": totals.describe(),
        "config": asdict(config),
    }
    if totals.scored:
        out.write_bytes("pll_per_token.png", totals.histogram_png())
        summary["histogram"] = str(out.child("pll_per_token.png"))
    return summary


def _filtering(config: ScoreConfig) -> bool:
    return config.filter_below is not None or config.filter_percentile is not None
