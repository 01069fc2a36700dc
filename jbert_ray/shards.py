"""The output directory of `jbert preprocess`: staged writes, per-batch done records for resume, and publishing.

Everything is written under SHARDS/.staging (files appear by atomic rename, never half-written). Each finished
batch leaves a done record listing the input lines it covered, its files and its counts; a resumed run skips
those lines and deletes files no done record names. Publishing moves the staged folders into place and writes
manifest.json last, so a directory without manifest.json is always an incomplete one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from jbert_ray.errors import UserError
from jbert_ray.output_dir import read_json, write_json
from jbert_ray.packing import padding_waste

MANIFEST = "manifest.json"
STAGING = ".staging"
MARKER = ".jbert_shards"  # says "preprocess made this folder": --overwrite deletes only such folders
PUBLISHED = ("train", "valid", "rejects", "tokenizer")  # folders moved from staging on publish
SPLITS = ("train", "valid")
_DONE = "done"
_RUN_CONFIG = "run_config.json"
_RUN_TOKEN = "run_token.json"


class ShardsDir:
    """SHARDS/ and its staging area; safe to use from the driver and from Ray actors (plain paths)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()
        self.staging = self.root / STAGING

    # ---- driver side: open, resume, publish ----

    @classmethod
    def open(cls, root: str | os.PathLike, *, overwrite: bool = False, resume: bool = False) -> ShardsDir:
        """Prepare for a run: refuse a non-empty folder unless `overwrite` (cleared) or `resume` (kept)."""
        shards = cls(root)
        non_empty = cls.check(root, overwrite=overwrite, resume=resume)
        try:
            shards.root.mkdir(parents=True, exist_ok=True)
            shards._lock = open(shards.root / MARKER, "a")  # noqa: SIM115 — held until the driver exits
        except OSError as error:
            raise UserError(f"cannot write to output {shards.root}: {error.strerror or error}") from None
        try:  # a second run on the same output (a resume while the first still runs) would interleave
            fcntl.flock(shards._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"another preprocess run is writing to {shards.root}") from None
        if non_empty and overwrite:
            shards._clear()
        shards.staging.mkdir(parents=True, exist_ok=True)
        return shards

    def close(self) -> None:
        """Release the run lock (it is also released when the process ends, however it ends)."""
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.close()
            self._lock = None

    @staticmethod
    def check(root: str | os.PathLike, *, overwrite: bool = False, resume: bool = False) -> bool:
        """Can a run write here? Raise a UserError if not; return whether the folder is non-empty."""
        if overwrite and resume:
            raise UserError("--overwrite and --resume exclude each other: replace the output, or finish it")
        path = Path(root)
        if path.exists() and not path.is_dir():
            raise UserError(f"output {path} exists and is not a directory")
        if not (path.is_dir() and any(path.iterdir())):
            return False
        if not (overwrite or resume):
            raise UserError(
                f"output {path} is not empty: pass --overwrite to replace it or --resume to finish it"
            )
        if not ((path / MARKER).exists() or (path / MANIFEST).exists()):
            raise UserError(f"output {path} holds other files (no {MANIFEST}): choose another --out")
        return True

    @property
    def complete(self) -> bool:
        return (self.root / MANIFEST).is_file()

    def manifest(self) -> dict:
        return json.loads((self.root / MANIFEST).read_text(encoding="utf-8"))

    def check_run_config(self, run_config: dict, previous: dict | None = None) -> None:
        """Record the settings that shape the output; a resumed run must use the same ones."""
        path = self.staging / _RUN_CONFIG
        if previous is None and path.is_file():
            previous = json.loads(path.read_text(encoding="utf-8"))
        if previous is not None:
            changed = sorted(
                k for k in set(previous) | set(run_config) if previous.get(k) != run_config.get(k)
            )
            if changed:
                detail = ", ".join(f"{k}: {previous.get(k)!r} → {run_config.get(k)!r}" for k in changed)
                raise UserError(f"cannot resume {self.root}: settings differ ({detail}); use --overwrite")
        else:
            write_json(path, run_config)

    def recover(self) -> dict[str, list[tuple[int, int]]]:
        """Undo a half-done publish and drop files of unfinished batches; return the input lines already done
        (per path, merged inclusive ranges: empty on a fresh run)."""
        for name in PUBLISHED:
            if (self.root / name).exists() and not (self.staging / name).exists():
                os.replace(self.root / name, self.staging / name)
        return self.prune()

    def prune(self) -> dict[str, list[tuple[int, int]]]:
        """Delete staged files that no done record names (a batch cut short); return the done input lines."""
        keep: set[str] = set()
        ranges = []
        for record in self.done_records():
            keep.update(record["files"])
            ranges.append({"ranges": record["ranges"]})
        for folder in ("train", "valid", "rejects"):
            for path in (self.staging / folder).rglob("*"):
                if path.is_file() and path.relative_to(self.staging).as_posix() not in keep:
                    path.unlink()
        return merge_ranges(ranges)

    def start_run(self) -> str:
        """A new token for this run: workers of an earlier, killed run see it and stop committing."""
        token = uuid.uuid4().hex
        write_json(self.staging / _RUN_TOKEN, {"run": token})
        return token

    def current_run(self) -> str | None:
        try:
            return json.loads((self.staging / _RUN_TOKEN).read_text(encoding="utf-8"))["run"]
        except (OSError, ValueError, KeyError):
            return None

    def done_records(self) -> Iterator[dict]:
        for path in sorted((self.staging / _DONE).glob("*.json")):
            yield json.loads(path.read_text(encoding="utf-8"))

    def publish(self, manifest: dict) -> None:
        """Move the staged folders into place, then write manifest.json: the run is complete."""
        for name in PUBLISHED:
            if (self.staging / name).exists():
                if (self.root / name).exists():
                    shutil.rmtree(self.root / name)
                os.replace(self.staging / name, self.root / name)
        write_json(self.root / MANIFEST, manifest)
        shutil.rmtree(self.staging, ignore_errors=True)

    def _clear(self) -> None:
        (self.root / MANIFEST).unlink(missing_ok=True)  # first: from here on the folder reads as incomplete
        for child in self.root.iterdir():
            if child.name != MARKER:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()

    # ---- worker side: staged files and done records ----

    def write_table(self, relative: str, table) -> str:
        """Write a parquet file under staging by atomic rename; return its staging-relative path."""
        import pyarrow.parquet as pq

        path = self.staging / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
        return relative

    def write_lines(self, relative: str, lines: Iterable[str]) -> str:
        path = self.staging / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, path)
        return relative

    def commit(self, key: str, record: dict) -> None:
        """The batch is done: written last, after all its files."""
        write_json(self.staging / _DONE / f"{key}.json", {"key": key, **record})


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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    root: Path
    manifest: dict
    tokenizer_dir: Path
    tokenizer_sha256: str
    vocab_size: int
    max_seq_len: int
    train_files: list[Path]
    train_file_rows: list[int]
    valid_files: list[Path]
    valid_rows: int

    @property
    def train_rows(self) -> int:
        return sum(self.train_file_rows)


def inspect_shards(data_dir: str | os.PathLike) -> ShardInfo:
    """Read manifest.json and the parquet footers; raise a UserError on incomplete, empty or mismatched shards."""
    import pyarrow.parquet as pq

    root = Path(data_dir)
    manifest = read_json(root / "manifest.json")
    if not root.is_dir():
        raise UserError(f"--data {root} does not exist")
    if not isinstance(manifest, dict):
        raise UserError(f"{root} has no manifest.json: it is not a finished `jbert preprocess` output")
    tokenizer_dir = root / "tokenizer"
    if not (tokenizer_dir / "vocab.txt").is_file():
        raise UserError(f"{root} has no tokenizer/vocab.txt: rerun `jbert preprocess`")
    sha = file_sha256(tokenizer_dir / "vocab.txt")  # the manifest names the tokenizer by its vocab's hash
    if manifest.get("tokenizer_sha256") != sha:
        raise UserError(
            f"{root}: manifest tokenizer_sha256 {str(manifest.get('tokenizer_sha256'))[:12]}… does not match "
            f"tokenizer/vocab.txt ({sha[:12]}…): the shards were made with another tokenizer"
        )
    max_seq_len = int((manifest.get("config") or {}).get("max_seq_len") or 0)
    train_files = sorted((root / "train").glob("**/*.parquet"))
    valid_files = sorted((root / "valid").glob("**/*.parquet"))
    file_rows = [pq.read_metadata(f).num_rows for f in train_files]
    nonempty = [(f, n) for f, n in zip(train_files, file_rows) if n > 0]
    if not nonempty:
        raise UserError(f"{root}/train has no training sequences (no non-empty parquet files)")
    schema = pq.read_schema(nonempty[0][0])
    missing = [c for c in ("input_ids", "word_start") if c not in schema.names]
    if missing:
        raise UserError(f"{nonempty[0][0]} lacks columns {missing}: not a `jbert preprocess` shard")
    valid_rows = sum(pq.read_metadata(f).num_rows for f in valid_files)
    return ShardInfo(
        root=root,
        manifest=manifest,
        tokenizer_dir=tokenizer_dir,
        tokenizer_sha256=sha,
        vocab_size=len(_read_lines(tokenizer_dir / "vocab.txt")),
        max_seq_len=max_seq_len or 512,
        train_files=[f for f, _ in nonempty],
        train_file_rows=[n for _, n in nonempty],
        valid_files=[f for f in valid_files if pq.read_metadata(f).num_rows > 0],
        valid_rows=valid_rows,
    )


def _read_lines(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines
