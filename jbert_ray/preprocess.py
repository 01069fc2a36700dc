"""Corpus → packed, tokenized parquet shards for BERT pretraining, streamed through Ray Data.

Ray Data reads the corpus (jbert_ray.corpus); an actor pool cleans, splits sentences, tokenizes (one MeCab tagger
per actor) and packs `[CLS] s1 [SEP] s2 [SEP] …` rows (jbert_ray.packing); each actor writes its batch's shards
into the staging area and records the batch as done (jbert_ray.shards). The driver only sees one small summary row
per batch, so memory stays flat however large the corpus. Output layout and manifest: see `run_preprocess`.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from jbert_ray.corpus import CorpusFiles, read_corpus, reject_line, resolve_paths
from jbert_ray.errors import UserError
from jbert_ray.outputs import check_resume_or_overwrite, prepared
from jbert_ray.packing import MIN_SEQ_LEN, Packed, Packer, in_valid_split
from jbert_ray.progress import Progress
from jbert_ray.resources import ACTOR_CPUS, actor_pool, cluster_cpus
from jbert_ray.shard_manifest import SPLITS, batch_key, build_manifest, line_ranges, new_counts
from jbert_ray.shards import ShardsDir, file_sha256
from jbert_ray.storage import Store, endpoint_uri, is_uri, local_copy
from jbert_ray.text import REJECT_EMPTY, TextConfig, clean_text, split_sentences
from jbert_ray.tokenizer import JapaneseTokenizer, installed_dictionary

TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
# One reader parses JSON ~100× faster than an actor tokenizes; more concurrent reads only add memory
# (measured on 2 CPUs, 4 files: peak 1.65 GB with a reader per file, 1.37 GB with one).
_CPUS_PER_READER = 16
# Settings that shape the shards: a resumed run must match them (the rest, e.g. num_actors, may change).
_OUTPUT_SHAPING = (
    "input", "text_field", "id_field", "text", "max_seq_len", "pack_across_docs", "valid_fraction",
)  # fmt: skip


@dataclass(frozen=True)
class PreprocessConfig:
    input: str  # corpus: file, folder or glob of .jsonl/.txt/.parquet (.gz), local or s3://, gs://, hdfs://
    tokenizer_dir: str  # a tokenizer dir, local or a URI (`jbert vocab` output or a Tohoku-style HF one)
    output_dir: str  # shards: train/, valid/, tokenizer/, rejects/, manifest.json; local or a URI
    max_seq_len: int = 128  # tokens per row including [CLS] and the [SEP]s (BERT phase 1 uses 128)
    text_field: str = "text"  # JSON field or parquet column holding the text
    id_field: str | None = None  # JSON field or parquet column with document ids; None = file:line
    text: TextConfig = field(default_factory=TextConfig)
    pack_across_docs: bool = True  # fill rows with the next documents ([SEP] between); off: a row per document
    valid_fraction: float = 0.0  # share of documents (by a hash of their id) written to valid/
    num_actors: int = 0  # tokenizer actors; 0 = one per CPU of the cluster
    batch_size: int = 2048  # records per actor call (one shard file per split per batch)
    overwrite: bool = False  # replace a non-empty output directory
    resume: bool = False  # finish an interrupted run into the same output directory (same settings)
    show_progress: bool = True  # progress bars and lines

    def __post_init__(self):
        validate(self)

    @classmethod
    def from_dict(cls, values: dict) -> PreprocessConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown preprocess settings {unknown}; valid ones: {sorted(known)}")
        text = values.get("text", {})
        return cls(**{**values, "text": text if isinstance(text, TextConfig) else TextConfig(**text)})


class ShardWriter:
    """Ray Data callable: a batch of corpus records → shard files in staging + one summary row."""

    def __init__(self, config: dict, doc_root: str, run_token: str, dictionary: dict):
        self.config = PreprocessConfig.from_dict(config)
        # One tagger per actor; a remote tokenizer dir is fetched once per node (the actor may be on another one).
        self.tokenizer = JapaneseTokenizer.from_pretrained(local_copy(self.config.tokenizer_dir))
        here = installed_dictionary(self.tokenizer.mecab_dic)
        if (here["name"], here["version"]) != (dictionary["name"], dictionary["version"]):  # splits would differ
            raise UserError(f"{socket.gethostname()} has MeCab dictionary {here['name']} {here['version']} "
                            f"({here['package']}) but the driver {dictionary['name']} {dictionary['version']} "
                            f"({dictionary['package']}): install one version on every node")  # fmt: skip
        # clean_text has applied NFKC already; it is idempotent, so the tokenizer's own pass can be skipped.
        if self.config.text.normalization.upper() == "NFKC":
            self.tokenizer.normalize_text = False
        self.shards = ShardsDir(self.config.output_dir)
        self.doc_root = doc_root
        self.run_token = run_token

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        if not len(batch["record_id"]):
            return {name: np.zeros(1, np.int64) for name in ("records_read", "records_rejected", "tokens")}
        ranges = line_ranges(batch["path"], batch["line"])
        key = batch_key(ranges)
        doc_ids = [doc_id(r, self.doc_root) for r in batch["record_id"]]
        rows, rejects, counts = pack_records(
            doc_ids, batch["text"], batch["reject"], self.tokenizer, self.config
        )
        files = []
        for split in SPLITS:
            if rows[split]:
                files.append(self.shards.write_table(f"{split}/part-{key}.parquet", rows_table(rows[split])))
        if rejects:
            files.append(self.shards.write_lines(f"rejects/part-{key}.jsonl", rejects))
        counts["actor_seconds"] = time.perf_counter() - start  # busy time; ÷ wall time = pool utilization
        if self.shards.current_run() != self.run_token:  # a worker outliving a killed run: leave no record
            raise RuntimeError(f"{self.config.output_dir} is now owned by another run; not committing {key}")
        self.shards.commit(key, {"ranges": ranges, "files": files, "counts": counts})
        return {name: np.array([counts[name]]) for name in ("records_read", "records_rejected", "tokens")}


def pack_records(
    doc_ids: list[str], texts, reasons, tokenizer: JapaneseTokenizer, config: PreprocessConfig
) -> tuple[dict[str, list[Packed]], list[str], dict]:
    """Clean, split, tokenize and pack one batch of records (pure: no Ray, no I/O).

    Returns (rows per split, rejects as JSON lines, counts). Each kept record is one document; with
    `config.pack_across_docs` off, each starts a fresh row.
    """
    packers = {s: Packer(config.max_seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id) for s in SPLITS}
    counts = new_counts()
    rejects = []
    for document, raw, reason in zip(doc_ids, texts, reasons):
        raw, reason = str(raw), str(reason)
        encodings = []
        if not reason:
            text, reason = clean_text(raw, config.text)
            encodings = (
                [] if reason else tokenizer.encode_batch(split_sentences(text), add_special_tokens=False)
            )
            if not reason and not any(e.ids for e in encodings):
                reason = REJECT_EMPTY
        if reason:
            rejects.append(reject_line(document, reason, raw))
            counts["rejects_by_reason"][reason] = counts["rejects_by_reason"].get(reason, 0) + 1
            continue
        split = "valid" if in_valid_split(document, config.valid_fraction) else "train"
        counts["splits"][split]["documents"] += 1
        counts["sentence_tokens"] += sum(len(e.ids) for e in encodings)
        for encoding in encodings:
            packers[split].add(encoding.ids, encoding.word_start, document)
        if not config.pack_across_docs:
            packers[split].flush()
    rows = {}
    for split, packer in packers.items():
        packer.flush()  # with --pack-across-docs a row never spans two batches
        rows[split] = packer.take()
        tally = counts["splits"][split]
        tally["sequences"] = len(rows[split])
        tally["tokens"] = sum(len(row.ids) for row in rows[split])
        counts["sentences"] += packer.sentences
        counts["sentences_split"] += packer.split_sentences
    counts["records_read"] = len(doc_ids)
    counts["records_rejected"] = len(rejects)
    counts["tokens"] = sum(tally["tokens"] for tally in counts["splits"].values())
    return rows, rejects, counts


def rows_table(rows: list[Packed]) -> pa.Table:
    """Rows → the shard schema: input_ids list<int32>, word_start list<bool>, doc_id, seq_index, n_tokens."""
    return pa.table(
        {
            "input_ids": pa.array([r.ids for r in rows], pa.list_(pa.int32())),
            "word_start": pa.array([r.word_start for r in rows], pa.list_(pa.bool_())),
            "doc_id": pa.array([r.doc_id for r in rows], pa.string()),
            "seq_index": pa.array([r.seq_index for r in rows], pa.int32()),
            "n_tokens": pa.array([len(r.ids) for r in rows], pa.int32()),
        }
    )


def run_preprocess(job: PreprocessConfig | PreparedPreprocess) -> dict:
    """Tokenize and pack the corpus into SHARDS; return the manifest (also written as SHARDS/manifest.json).

    SHARDS/train/*.parquet (and valid/ when valid_fraction > 0): input_ids list<int32>, word_start list<bool>,
    doc_id, seq_index, n_tokens int32; tokenizer/ (a copy); rejects/*.jsonl ({record_id, reason, record});
    manifest.json, written last. Masks are not stored: pretraining draws fresh ones every epoch (RoBERTa).
    """
    config, tokenizer_sha, files = prepared(job, PreparedPreprocess, prepare_preprocess)
    shards = ShardsDir.open(config.output_dir, overwrite=config.overwrite, resume=config.resume)
    try:
        return _run(shards, config, tokenizer_sha, files)
    finally:
        shards.close()


def _run(shards: ShardsDir, config: PreprocessConfig, tokenizer_sha: str, files: CorpusFiles) -> dict:
    run_config = {k: v for k, v in asdict(config).items() if k in _OUTPUT_SHAPING}
    run_config.update(tokenizer_sha256=tokenizer_sha, corpus_files=corpus_fingerprint(files))
    if shards.complete:  # --resume on a finished run: nothing is missing
        shards.check_run_config(run_config, shards.manifest().get("run_config", {}))
        shards.discard_staging()
        return {**shards.manifest(), "already_complete": True}
    shards.check_run_config(run_config)
    done = shards.recover()  # done records of an interrupted run (empty on a fresh one)
    run_token = shards.start_run()
    dictionary = installed_dictionary(JapaneseTokenizer.from_pretrained(local_copy(config.tokenizer_dir)).mecab_dic)
    _copy_tokenizer(local_copy(config.tokenizer_dir), shards)
    shards.make_folders(("train", "rejects") + (("valid",) if config.valid_fraction else ()))
    _check_pool_fits(config.num_actors)

    progress = Progress("preprocess", rate_key="tokens", enabled=config.show_progress)
    dataset = read_corpus(
        files, text_field=config.text_field, id_field=config.id_field,
        positions=True, skip=done, read_tasks=max(1, cluster_cpus() // _CPUS_PER_READER),
    ).map_batches(
        ShardWriter,
        fn_constructor_kwargs={
            "config": asdict(config), "doc_root": _common_root(files.paths), "run_token": run_token,
            "dictionary": dictionary,
        },
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=actor_pool(config.num_actors),  # one tokenizer (MeCab tagger) per actor
        num_cpus=ACTOR_CPUS,
    )  # fmt: skip
    totals = {"records_read": 0, "records_rejected": 0, "tokens": 0}
    for row in dataset.iter_rows():  # one small summary row per batch: the shards are already written
        for name in totals:
            totals[name] += int(row[name])
        progress.update(**totals)

    shards.prune()  # files of a retried or cut-short batch that no done record names are not published
    manifest = build_manifest(
        shards.done_records(), asdict(config), tokenizer_sha,
        run_config=run_config, resumed=bool(done), seconds=progress.elapsed_s, mecab_dictionary=dictionary,
    )  # fmt: skip
    if manifest["records_read"] == 0:
        raise UserError(f"corpus {config.input} is empty: no records")
    if manifest["documents"] == 0:
        reasons = ", ".join(f"{k}={v:,}" for k, v in sorted(manifest["rejects_by_reason"].items()))
        raise UserError(
            f"corpus {config.input} has no usable text: all {manifest['records_read']:,} records were rejected "
            f"({reasons}); see {shards.staged.child('rejects')}"
        )
    shards.publish(manifest)
    return manifest


def doc_id(record_id: str, root: str) -> str:
    """`path:line` ids relative to the corpus root, so the valid split does not depend on where it lives."""
    record_id = str(record_id)
    return record_id[len(root) + 1 :] if root and record_id.startswith(root + "/") else record_id


class PreparedPreprocess(NamedTuple):
    """A preprocess job checked before Ray starts."""

    config: PreprocessConfig  # with absolute paths and endpoint URIs (actors run elsewhere)
    tokenizer_sha: str  # sha256 of the tokenizer's vocab.txt
    files: CorpusFiles  # the corpus, listed once


def prepare_preprocess(config: PreprocessConfig) -> PreparedPreprocess:
    """Every check that needs no cluster (tokenizer, corpus files, output folder), so a mistake fails in a
    second with one line: call it before starting Ray."""
    config = _absolute_paths(config)
    tokenizer_sha = check_tokenizer(config.tokenizer_dir)
    files = resolve_paths(config.input)
    inputs = {"corpus": config.input, "tokenizer": config.tokenizer_dir}
    ShardsDir.check(config.output_dir, overwrite=config.overwrite, resume=config.resume, inputs=inputs)
    return PreparedPreprocess(config, tokenizer_sha, files)


def corpus_fingerprint(files: CorpusFiles) -> str:
    """sha256 over the corpus files' paths, sizes and modification times: resuming on a changed corpus fails."""
    paths, filesystem = files
    digest = hashlib.sha256()
    for info in filesystem.get_file_info(paths):
        digest.update(f"{info.path}\t{info.size}\t{info.mtime_ns}\n".encode())
    return f"{len(paths)} files, sha256 {digest.hexdigest()[:16]}"


def validate(config: PreprocessConfig) -> None:
    """The checks on the settings alone (PreprocessConfig runs them when it is made)."""
    if config.max_seq_len < MIN_SEQ_LEN:
        raise UserError(f"--max-seq-len {config.max_seq_len} is too small (at least {MIN_SEQ_LEN})")
    if not 0.0 <= config.valid_fraction < 1.0:
        raise UserError(f"--valid-fraction must be in [0, 1), got {config.valid_fraction}")
    if config.batch_size < 1 or config.num_actors < 0:
        raise UserError("--batch-size must be ≥ 1 and --num-actors ≥ 0")
    check_resume_or_overwrite(config.resume, config.overwrite)


def check_tokenizer(path: str) -> str:
    """Load the tokenizer once on the driver (one clear error if it is not one); return its vocab's sha256."""
    directory = local_copy(path)  # a remote dir: fetched into this node's cache
    try:
        tokenizer = JapaneseTokenizer.from_pretrained(directory)
    except (UnicodeDecodeError, ValueError, OSError) as error:
        raise UserError(f"{path} is not a usable tokenizer directory: {error}") from None
    if tokenizer.vocab_size < 6:
        raise UserError(f"{path} is not a usable tokenizer directory: its vocabulary has only special tokens")
    return file_sha256(directory / "vocab.txt")


def _absolute_paths(config: PreprocessConfig) -> PreprocessConfig:
    # Actors may run in another working directory or on another node: give them absolute paths, and URIs that
    # name their endpoint (workers do not see the driver's AWS_ENDPOINT_URL).
    values = asdict(config)
    values["tokenizer_dir"] = _location(config.tokenizer_dir)
    values["output_dir"] = _location(config.output_dir)
    if "://" not in config.input:
        values["input"] = str(Path(config.input).absolute())
    return PreprocessConfig.from_dict(values)


def _location(path: str) -> str:
    return endpoint_uri(path) if is_uri(path) else Store(path).location


def _check_pool_fits(num_actors: int) -> None:
    # Actors that cannot all be placed leave the pool waiting forever (and reads need a share too).
    cpus = cluster_cpus()
    if num_actors and num_actors * ACTOR_CPUS + 0.1 > cpus:
        raise UserError(
            f"--num-actors {num_actors} does not fit on {cpus} CPUs (each actor takes {ACTOR_CPUS})"
        )


def _copy_tokenizer(source: Path, shards: ShardsDir) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shards.staged.write_bytes(f"tokenizer/{name}", (source / name).read_bytes())


def _common_root(paths: list[str]) -> str:
    return os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
