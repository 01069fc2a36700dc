"""The output directory of `jbert preprocess`: staged writes, per-batch done records for resume, and publishing.

One code path for a local path and a URI (s3://, gs://, …) through jbert_ray.storage.Store. Everything is written
under SHARDS/.staging (files appear whole, never half-written). Each finished batch leaves a done record listing
the input lines it covered, its files and its counts; a resumed run skips those lines and deletes files no done
record names. Publishing moves the staged folders into place and writes manifest.json last, so a directory without
manifest.json is always an incomplete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from jbert_ray.errors import UserError
from jbert_ray.outputs import OWN_FILES, OutputLock, check_output, check_resume_or_overwrite, child_names
from jbert_ray.shard_manifest import merge_ranges
from jbert_ray.storage import Store, endpoint_uri, first_line, is_uri, local_copy

MANIFEST = "manifest.json"
STAGING = ".staging"
STAGE = "preprocess"
PUBLISHED = ("train", "valid", "rejects", "tokenizer")  # folders moved from staging on publish
_DONE = "done"
_RUN_CONFIG = "run_config.json"
_RUN_TOKEN = "run_token.json"
_READERS = 16  # concurrent small reads (done records, parquet footers): each is a request to an object store


class ShardsDir:
    """SHARDS/ and its staging area, local or at a URI; safe to use from the driver and from Ray actors on any node
    (only the location travels; each process opens its own filesystem).

    The run lock (jbert_ray.outputs.OutputLock: a flock locally, a lease on an object store) refuses a second run
    on the same output; the run token keeps the workers of an earlier, killed run from committing once a newer run
    has started.
    """

    def __init__(self, root: str | os.PathLike):
        self.store = Store(root)
        self.staged = self.store.child(STAGING)

    @property
    def root(self) -> Path | str:
        """The location: an absolute Path for a local dir, else the URI."""
        return self.store.location if self.store.is_remote else Path(self.store.location)

    @property
    def staging(self) -> Path | str:
        return self.staged.location if self.staged.is_remote else Path(self.staged.location)

    # ---- driver side: open, resume, publish ----

    @classmethod
    def open(cls, root: str | os.PathLike, *, overwrite: bool = False, resume: bool = False) -> ShardsDir:
        """Prepare for a run: take the output's run lock; refuse a non-empty folder unless `overwrite` (cleared,
        if it is a preprocess output) or `resume` (kept)."""
        shards = cls(root)
        non_empty = cls.check(root, overwrite=overwrite, resume=resume)
        shards._lock = OutputLock(shards.store, STAGE).acquire()
        if non_empty and overwrite:
            shards._clear()
        shards.staged.filesystem.create_dir(shards.staged.path, recursive=True)
        return shards

    def close(self) -> None:
        """Release the run lock (a local one is also released when the process ends, however it ends)."""
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()
            self._lock = None

    @staticmethod
    def check(root: str | os.PathLike, *, overwrite: bool = False, resume: bool = False, inputs=None) -> bool:
        """Can a run write here (apart from `inputs`, see outputs.check_output)? Raise a UserError if not; return
        whether the folder is non-empty."""
        check_resume_or_overwrite(resume, overwrite)
        out = check_output(root, STAGE, inputs=inputs or {}, overwrite=overwrite, keep=resume)
        return any(name not in OWN_FILES for name in child_names(out))

    @property
    def complete(self) -> bool:
        return self.store.is_file(MANIFEST)

    def manifest(self) -> dict:
        return json.loads(self.store.read_bytes(MANIFEST))

    def check_run_config(self, run_config: dict, previous: dict | None = None) -> None:
        """Record the settings that shape the output; a resumed run must use the same ones."""
        if previous is None and self.staged.is_file(_RUN_CONFIG):
            previous = json.loads(self.staged.read_bytes(_RUN_CONFIG))
        if previous is not None:
            changed = sorted(
                k for k in set(previous) | set(run_config) if previous.get(k) != run_config.get(k)
            )
            if changed:
                detail = ", ".join(f"{k}: {previous.get(k)!r} → {run_config.get(k)!r}" for k in changed)
                raise UserError(f"cannot resume {self.root}: settings differ ({detail}); use --overwrite")
        else:
            self.staged.write_json(_RUN_CONFIG, run_config)

    def recover(self) -> dict[str, list[tuple[int, int]]]:
        """Undo a half-done publish, forget batches whose files are not all there, drop files of unfinished
        batches; return the input lines already done (per path, merged inclusive ranges: empty on a fresh run)."""
        for name in PUBLISHED:
            # On an object store a move is copy, then delete: either side may be partial, never both.
            for path in self.store.files(name):
                if self.staged.is_file(path):
                    self.store.delete(path)
                else:
                    self.store.move(path, f"{STAGING}/{path}")
            self.store.delete(name)
        for key in self.check_staged():
            self.staged.delete(f"{_DONE}/{key}.json")  # its lines are read again
        return self.prune()

    def check_staged(self) -> list[str]:
        """The keys of done records whose files are missing or hold other row counts than the record says."""
        expected = {}
        for record in self.done_records():
            for name in record["files"]:
                split = name.split("/", 1)[0]
                counts = record["counts"]
                rows = counts["records_rejected"] if split == "rejects" else counts["splits"][split]["sequences"]
                expected[name] = (record["key"], rows)
        with ThreadPoolExecutor(_READERS) as pool:
            found = dict(zip(expected, pool.map(self._staged_rows, expected)))
        return sorted({key for name, (key, rows) in expected.items() if found[name] != rows})

    def _staged_rows(self, name: str) -> int | None:
        import pyarrow.parquet as pq

        try:
            if name.endswith(".parquet"):
                return pq.read_metadata(self.staged.full(name), filesystem=self.staged.filesystem).num_rows
            return self.staged.read_bytes(name).count(b"\n")
        except (FileNotFoundError, OSError, ValueError):  # missing, or not a whole parquet file
            return None

    def prune(self) -> dict[str, list[tuple[int, int]]]:
        """Delete staged files that no done record names (a batch cut short); return the done input lines."""
        keep: set[str] = set()
        ranges = []
        for record in self.done_records():
            keep.update(record["files"])
            ranges.append({"ranges": record["ranges"]})
        for folder in ("train", "valid", "rejects"):
            for name in self.staged.files(folder):
                if name not in keep:
                    self.staged.delete(name)
        return merge_ranges(ranges)

    def start_run(self) -> str:
        """A new token for this run: workers of an earlier, killed run see it and stop committing."""
        token = uuid.uuid4().hex
        self.staged.write_json(_RUN_TOKEN, {"run": token})
        return token

    def current_run(self) -> str | None:
        record = self.staged.read_json(_RUN_TOKEN)
        return record.get("run") if isinstance(record, dict) else None

    def done_records(self) -> Iterator[dict]:
        """The done records in name order (read a few at a time: on an object store each read is a request)."""
        names = [n for n in self.staged.files(_DONE) if n.endswith(".json")]
        with ThreadPoolExecutor(_READERS) as pool:
            yield from pool.map(lambda name: json.loads(self.staged.read_bytes(name)), names)

    def make_folders(self, names: Iterable[str]) -> None:
        """Staged folders present even when empty: readers can rely on them."""
        for name in names:
            self.staged.filesystem.create_dir(self.staged.full(name), recursive=True)

    def discard_staging(self) -> None:
        self.store.delete(STAGING)

    def publish(self, manifest: dict) -> None:
        """Check every staged file against its done record, move the staged folders into place, then write
        manifest.json: the run is complete."""
        damaged = self.check_staged()
        if damaged:
            raise UserError(f"{len(damaged)} finished batches of {self.root} lost files before publishing "
                            f"(e.g. {damaged[0]}); rerun with --resume to redo them")  # fmt: skip
        for name in PUBLISHED:
            if self.staged.exists(name):
                self.store.delete(name)
                self.store.move(f"{STAGING}/{name}", name)
                # On an object store an empty folder moves as nothing: make it again.
                self.store.filesystem.create_dir(self.store.full(name), recursive=True)
        self.store.write_json(MANIFEST, manifest)
        self.discard_staging()

    def _clear(self) -> None:
        self.store.delete(MANIFEST)  # first: from here on the folder reads as incomplete
        for name in child_names(self.store):
            if name not in OWN_FILES:
                self.store.delete(name)

    # ---- worker side: staged files and done records ----

    def write_table(self, relative: str, table) -> str:
        """Write a parquet file under staging (whole or not at all); return its staging-relative path."""
        self.staged.write_parquet(relative, table)
        return relative

    def write_lines(self, relative: str, lines: Iterable[str]) -> str:
        self.staged.write_text(relative, "".join(line + "\n" for line in lines))
        return relative

    def commit(self, key: str, record: dict) -> None:
        """The batch is done: written last, after all its files."""
        self.staged.write_json(f"{_DONE}/{key}.json", {"key": key, **record})


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    """A finished `jbert preprocess` output, local or at a URI.

    Read the parquet files with their filesystem: `ray.data.read_parquet(info.train_files, filesystem=
    info.filesystem)` or `pq.read_table(path, filesystem=info.filesystem)`; load the tokenizer with
    `local_copy(info.tokenizer_dir)` on each node (a URI is fetched once per node, a local Path is itself).
    """

    root: Path | str  # an absolute Path, or the URI with its endpoint (AWS_ENDPOINT_URL passed on)
    store: Store  # the shards dir; picklable (the location travels, each process opens its own)
    manifest: dict
    tokenizer_dir: Path | str  # root/tokenizer: a Path, or a URI for local_copy on the node that loads it
    tokenizer_sha256: str
    vocab_size: int
    max_seq_len: int
    train_files: list[str]  # as `filesystem` names them: absolute local paths, or bucket/key for s3
    train_file_rows: list[int]
    valid_files: list[str]
    valid_rows: int

    @property
    def filesystem(self) -> pafs.FileSystem:
        return self.store.filesystem

    @property
    def train_rows(self) -> int:
        return sum(self.train_file_rows)


def inspect_shards(data_dir: str | os.PathLike) -> ShardInfo:
    """Read manifest.json and the parquet footers; raise a UserError on incomplete, empty or mismatched shards."""
    import pyarrow.parquet as pq

    store = Store(endpoint_uri(str(data_dir)) if is_uri(data_dir) else data_dir)
    root = store.location if store.is_remote else Path(store.location)
    try:
        kind = store.kind()
        manifest = store.read_json(MANIFEST)
        tokenizer = store.child("tokenizer")
        has_vocab = tokenizer.is_file("vocab.txt")
    except OSError as error:
        raise UserError(f"cannot read --data {data_dir}: {first_line(error)}") from None
    if kind != pafs.FileType.Directory:
        raise UserError(f"--data {data_dir} does not exist")
    if not isinstance(manifest, dict):
        raise UserError(f"{root} has no manifest.json: it is not a finished `jbert preprocess` output")
    if not has_vocab:
        raise UserError(f"{root} has no tokenizer/vocab.txt: rerun `jbert preprocess`")
    vocab = local_copy(tokenizer.location) / "vocab.txt"
    sha = file_sha256(vocab)  # the manifest names the tokenizer by its vocab's hash
    if manifest.get("tokenizer_sha256") != sha:
        raise UserError(
            f"{root}: manifest tokenizer_sha256 {str(manifest.get('tokenizer_sha256'))[:12]}… does not match "
            f"tokenizer/vocab.txt ({sha[:12]}…): the shards were made with another tokenizer"
        )
    max_seq_len = int((manifest.get("config") or {}).get("max_seq_len") or 0)
    train_files, file_rows = _parquet_rows(store, "train")
    valid_files, valid_file_rows = _parquet_rows(store, "valid")
    for split, rows in (("train", file_rows), ("valid", valid_file_rows)):
        _check_split(root, split, manifest, rows)
    nonempty = [(f, n) for f, n in zip(train_files, file_rows) if n > 0]
    if not nonempty:
        raise UserError(f"{root}/train has no training sequences (no non-empty parquet files)")
    schema = pq.read_schema(nonempty[0][0], filesystem=store.filesystem)
    missing = [c for c in ("input_ids", "word_start") if c not in schema.names]
    if missing:
        raise UserError(f"{nonempty[0][0]} lacks columns {missing}: not a `jbert preprocess` shard")
    return ShardInfo(
        root=root,
        store=store,
        manifest=manifest,
        tokenizer_dir=tokenizer.location if tokenizer.is_remote else Path(tokenizer.location),
        tokenizer_sha256=sha,
        vocab_size=len(_read_lines(vocab)),
        max_seq_len=max_seq_len or 512,
        train_files=[f for f, _ in nonempty],
        train_file_rows=[n for _, n in nonempty],
        valid_files=[f for f, n in zip(valid_files, valid_file_rows) if n > 0],
        valid_rows=sum(valid_file_rows),
    )


def _check_split(root, split: str, manifest: dict, file_rows: list[int]) -> None:
    """The files on disk hold what the manifest says (a lost or truncated file would silently shrink the data)."""
    expected = (manifest.get("splits") or {}).get(split)
    if not expected or "files" not in expected:  # a split the run did not write
        return
    if (len(file_rows), sum(file_rows)) != (expected["files"], expected["sequences"]):
        raise UserError(
            f"{root}/{split} holds {len(file_rows):,} files with {sum(file_rows):,} sequences but the manifest "
            f"says {expected['files']:,} with {expected['sequences']:,}: files were lost; rerun `jbert preprocess`"
        )


def _parquet_rows(store: Store, folder: str) -> tuple[list[str], list[int]]:
    """The folder's parquet files (as the filesystem names them) and their row counts, from the footers."""
    import pyarrow.parquet as pq

    try:
        paths = [store.full(name) for name in store.files(folder) if name.endswith(".parquet")]
        with ThreadPoolExecutor(_READERS) as pool:
            rows = list(pool.map(lambda p: pq.read_metadata(p, filesystem=store.filesystem).num_rows, paths))
    except OSError as error:
        raise UserError(f"cannot read {store.child(folder)}: {first_line(error)}") from None
    return paths, rows


def _read_lines(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines
