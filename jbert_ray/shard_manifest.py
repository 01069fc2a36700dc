"""The shards manifest and done-range bookkeeping of `jbert preprocess`: which input lines a batch covered
(for resume), and the manifest summed from the batch records' counts. Pure functions, no I/O."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from jbert_ray.packing import padding_waste

SPLITS = ("train", "valid")


def build_manifest(records: Iterable[dict], config: dict, tokenizer_sha: str, **extra) -> dict:
    """Sum the done records' counts into the manifest (so a resumed run counts both of its parts).

    `config` is the run's PreprocessConfig as a dict; `extra` items are added as they are.
    """
    max_seq_len = config["max_seq_len"]
    total = new_counts()
    files: Counter[str] = Counter()
    ranges = []
    for record in records:  # streamed: one record per batch
        add_counts(total, record["counts"])
        files.update(f.rsplit("/", 1)[0] for f in record["files"])
        ranges.append({"ranges": record["ranges"]})
    merge_ranges(ranges)  # raises if any input line was processed twice
    total["records_kept"] = total["records_read"] - total["records_rejected"]
    total["documents"] = sum(s["documents"] for s in total["splits"].values())
    total["sequences"] = sum(s["sequences"] for s in total["splits"].values())
    for name, split in total["splits"].items():
        split["padding_waste"] = round(padding_waste(split["tokens"], split["sequences"], max_seq_len), 4)
        split["files"] = files[name]
    total["padding_waste"] = round(padding_waste(total["tokens"], total["sequences"], max_seq_len), 4)
    return {
        "format": "jbert-shards/1",
        **{k: total[k] for k in ("records_read", "records_kept", "records_rejected", "rejects_by_reason")},
        **{k: total[k] for k in ("documents", "sentences", "sentences_split", "sequences", "tokens")},
        "sentence_tokens": total["sentence_tokens"],  # tokens from text, without [CLS]/[SEP]
        "padding_waste": total["padding_waste"],  # share of a batch padded to max_seq_len that is padding
        "max_seq_len": max_seq_len,
        "splits": {
            name: s for name, s in total["splits"].items() if name == "train" or config["valid_fraction"]
        },
        "tokenizer": "tokenizer",
        "tokenizer_sha256": tokenizer_sha,  # sha256 of tokenizer/vocab.txt
        "config": config,
        "batches": len(ranges),
        "actor_seconds": round(total.get("actor_seconds", 0.0), 2),  # summed over actors
        **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in extra.items()},
    }


def new_counts() -> dict:
    splits = {s: {"documents": 0, "sequences": 0, "tokens": 0} for s in SPLITS}
    numbers = (
        "records_read",
        "records_rejected",
        "sentences",
        "sentences_split",
        "sentence_tokens",
        "tokens",
    )
    return {**dict.fromkeys(numbers, 0), "rejects_by_reason": {}, "splits": splits}


def add_counts(total: dict, counts: dict) -> None:
    for key, value in counts.items():
        if isinstance(value, (int, float)):
            total[key] = total.get(key, 0) + value
        elif key == "rejects_by_reason":
            for reason, n in value.items():
                total[key][reason] = total[key].get(reason, 0) + n
        elif key == "splits":
            for split, tally in value.items():
                for name, n in tally.items():
                    if isinstance(n, int):
                        total[key][split][name] += n


def line_ranges(paths: Sequence[str], lines: Sequence[int]) -> dict[str, list[list[int]]]:
    """Inclusive [first, last] runs of consecutive lines per input path (a batch is a few such runs)."""
    by_path: dict[str, list[int]] = {}
    for path, line in zip(paths, lines):
        by_path.setdefault(str(path), []).append(int(line))
    ranges: dict[str, list[list[int]]] = {}
    for path, numbers in sorted(by_path.items()):
        runs: list[list[int]] = []
        for n in sorted(numbers):
            if runs and n == runs[-1][1] + 1:
                runs[-1][1] = n
            else:
                runs.append([n, n])
        ranges[path] = runs
    return ranges


def batch_key(ranges: Mapping[str, list[list[int]]]) -> str:
    """A name that depends only on which records a batch holds: a retried batch rewrites the same files."""
    return hashlib.sha1(json.dumps(ranges, sort_keys=True).encode()).hexdigest()[:20]


def merge_ranges(records: Iterable[dict]) -> dict[str, list[tuple[int, int]]]:
    """Union of the done records' line ranges per path; overlapping records would mean duplicated documents."""
    by_path: dict[str, list[tuple[int, int]]] = {}
    for record in records:
        for path, runs in record["ranges"].items():
            by_path.setdefault(path, []).extend((a, b) for a, b in runs)
    merged: dict[str, list[tuple[int, int]]] = {}
    for path, runs in by_path.items():
        out: list[tuple[int, int]] = []
        for a, b in sorted(runs):
            if out and a <= out[-1][1]:
                raise RuntimeError(f"lines {a}-{b} of {path} were processed twice; rerun with --overwrite")
            if out and a == out[-1][1] + 1:
                out[-1] = (out[-1][0], b)
            else:
                out.append((a, b))
        merged[path] = out
    return merged
