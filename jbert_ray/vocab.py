"""Distributed vocabulary training: Ray Data reads the corpus, actors split it into MeCab words (one tagger per
actor), the driver merges the word counts (at most --max-distinct-words; past that the rarest are dropped),
and the `tokenizers` WordPiece trainer builds the vocab from them.
The output is a local path or a URI: a remote one is trained into a local temporary dir, then uploaded."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from jbert_ray.corpus import CorpusFiles, RejectsWriter, read_corpus, reject_line, resolve_paths
from jbert_ray.errors import UserError
from jbert_ray.outputs import OutputLock, check_output, clear_output, prepared
from jbert_ray.progress import Progress
from jbert_ray.resources import ACTOR_CPUS, actor_pool
from jbert_ray.storage import Store
from jbert_ray.text import TextConfig, clean_text, split_sentences
from jbert_ray.tokenizer import TokenizerConfig, build_tagger, train_vocab

STAGE = "vocab"
MIN_DISTINCT_WORDS = 1000  # fewer leaves too little for a vocabulary (and a prune keeps only half)


@dataclass(frozen=True)
class VocabConfig:
    input: str  # corpus: file, folder or glob of .jsonl/.txt/.parquet (.gz), local or s3://, gs://, hdfs://
    output_dir: str  # the tokenizer directory to write: a local path or a URI (s3://…)
    text_field: str = "text"  # JSON field or parquet column holding the text
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    text: TextConfig = field(default_factory=TextConfig)
    num_actors: int = 0  # MeCab actors; 0 = one per CPU of the cluster
    batch_size: int = 1024  # records per actor call
    # The driver's memory bound (2M ≈ 1.6 GB while counting and training); the words dropped past it are
    # counted in vocab_summary.json and on stderr.
    max_distinct_words: int = 2_000_000  # distinct words counted (~0.8 KB each); the rarest dropped past it
    overwrite: bool = False  # replace a non-empty output directory
    show_progress: bool = True  # progress bars and lines

    def __post_init__(self):
        if self.num_actors < 0 or self.batch_size < 1 or self.max_distinct_words < MIN_DISTINCT_WORDS:
            raise UserError(
                "--num-actors must be ≥ 0, --batch-size ≥ 1 and "
                f"--max-distinct-words ≥ {MIN_DISTINCT_WORDS:,}"
            )


class WordCounter:
    """Ray Data callable: a batch of records → one row of (words, counts, rejected records)."""

    def __init__(self, text_config: TextConfig, mecab_dic: str):
        self.text_config = text_config
        self.tagger = build_tagger(mecab_dic)  # once per actor: building one costs ~50 ms

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        counts: Counter[str] = Counter()
        rejects = []
        for record_id, raw, reason in zip(batch["record_id"], batch["text"], batch["reject"]):
            text = ""
            if not reason:
                text, reason = clean_text(raw, self.text_config)
            if reason:
                rejects.append(reject_line(record_id, reason, raw))
                continue
            for sentence in split_sentences(text):
                counts.update(self.tagger.parse(sentence).split())
        return pa.table(
            {
                "words": pa.array([list(counts)], pa.list_(pa.string())),
                "counts": pa.array([list(counts.values())], pa.list_(pa.int64())),
                "records": [len(batch["record_id"])],
                "rejects": pa.array([rejects], pa.list_(pa.string())),
            }
        )


class BoundedCounts:
    """Word counts holding at most `max_words` distinct words, so the driver's memory does not grow with the
    corpus: past that, the rarest are dropped until at most half remain (lossy counting, like word2vec's
    ReduceVocab). A word dropped and seen again counts from 0, so each prune can leave a kept count short by
    less than `pruned_below`."""

    def __init__(self, max_words: int):
        self.max_words = max_words
        self.counts: Counter[str] = Counter()
        self.pruned_words = 0  # words dropped (one dropped, seen again and dropped again counts twice)
        self.pruned_occurrences = 0  # their counts when dropped
        self.pruned_below = 0  # the highest count threshold of any prune (0: nothing dropped)

    def update(self, words: Iterable[str], counts: Iterable[int]) -> None:
        self.counts.update(dict(zip(words, counts)))
        if len(self.counts) > self.max_words:
            self._prune(keep=self.max_words // 2)  # half, so prunes (each a pass over all words) stay rare

    def _prune(self, keep: int) -> None:
        words_by_count = Counter(self.counts.values())
        kept, threshold = 0, max(words_by_count) + 1
        for count in sorted(words_by_count, reverse=True):  # all words of one count go, or stay, together
            if kept + words_by_count[count] > keep:
                break
            kept, threshold = kept + words_by_count[count], count
        dropped = [word for word, count in self.counts.items() if count < threshold]
        self.pruned_words += len(dropped)
        self.pruned_occurrences += sum(self.counts.pop(word) for word in dropped)
        self.pruned_below = max(self.pruned_below, threshold)


class PreparedVocab(NamedTuple):
    """A vocab job checked before Ray starts."""

    config: VocabConfig
    files: CorpusFiles  # the corpus, listed once
    output: Store  # checked; a local one is cleared now with --overwrite, a remote one on upload
    lock: OutputLock  # held from the checks to the end of the run: a second run on this output is refused


def prepare_vocab(config: VocabConfig) -> PreparedVocab:
    """The checks that need no cluster (the corpus exists, the output is writable and empty, or --overwrite): call
    before starting Ray."""
    files = resolve_paths(config.input)
    output = check_output(config.output_dir, STAGE, inputs={"corpus": config.input}, overwrite=config.overwrite)
    lock = OutputLock(output, STAGE).acquire()
    if config.overwrite and not output.is_remote:
        clear_output(output, STAGE)
    return PreparedVocab(config, files, output, lock)


def run_vocab(job: VocabConfig | PreparedVocab) -> dict:
    """Count MeCab words over the corpus on the cluster, train WordPiece, save the tokenizer directory."""
    config, files, output, lock = prepared(job, PreparedVocab, prepare_vocab)
    try:
        with _work_dir(output) as output_dir:
            return _count_and_train(config, files, output_dir)
    finally:
        lock.release()


@contextmanager
def _work_dir(output: Store) -> Iterator[Path]:
    """Where the tokenizer is written: the output itself when local; else a temporary dir, uploaded (replacing
    what was there) when training has succeeded."""
    if not output.is_remote:
        yield Path(output.location)
        return
    with tempfile.TemporaryDirectory(prefix="jbert_vocab_") as tmp:
        yield Path(tmp)
        clear_output(output, STAGE)  # --overwrite (check_output refused anything but an earlier vocab output)
        output.upload(tmp)


def _count_and_train(config: VocabConfig, files: CorpusFiles, output_dir: Path) -> dict:
    dataset = read_corpus(files, text_field=config.text_field).map_batches(
        WordCounter,
        fn_constructor_kwargs={"text_config": config.text, "mecab_dic": config.tokenizer.mecab_dic},
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=actor_pool(config.num_actors),
        num_cpus=ACTOR_CPUS,
    )
    counts = BoundedCounts(config.max_distinct_words)
    rejects = RejectsWriter(output_dir / "rejects" / "rejects.jsonl")
    records = words = 0
    progress = Progress("vocab", rate_key="records", enabled=config.show_progress)
    for row in dataset.iter_rows():
        counts.update(row["words"], row["counts"])
        words += sum(row["counts"])
        records += row["records"]
        for line in row["rejects"]:
            rejects.write(line)
        progress.update(records=records, words=words, unique_words=len(counts.counts))
    rejects.close()
    if records == 0:
        raise UserError(f"corpus {config.input} is empty: no records")
    if not counts.counts:
        raise UserError(f"corpus {config.input} has no usable text: all {records:,} records were rejected")
    if counts.pruned_words:
        print(
            f"vocab: over {config.max_distinct_words:,} distinct words: dropped {counts.pruned_words:,} "
            f"counted fewer than {counts.pruned_below:,} times ({counts.pruned_occurrences:,} of {words:,} "
            "words); --max-distinct-words keeps more, at ~0.8 KB of driver memory each",
            file=sys.stderr,
        )
    count_s = progress.elapsed_s
    train_start = time.perf_counter()
    tokenizer = train_vocab(counts.counts, config.tokenizer)
    tokenizer.save_pretrained(output_dir)
    summary = {
        "records_read": records,
        "records_kept": records - sum(rejects.by_reason.values()),
        "records_rejected": sum(rejects.by_reason.values()),
        "rejects_by_reason": rejects.by_reason,
        "words": words,
        "unique_words": len(counts.counts),  # the words WordPiece was trained on (all of them unless pruned)
        "pruned_words": counts.pruned_words,
        "pruned_occurrences": counts.pruned_occurrences,
        "pruned_below": counts.pruned_below,
        "vocab_size": tokenizer.vocab_size,
        "count_seconds": round(count_s, 2),
        "train_seconds": round(time.perf_counter() - train_start, 2),
        "seconds": round(progress.elapsed_s, 2),
        "config": asdict(config),
    }
    (output_dir / "vocab_summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    return summary
