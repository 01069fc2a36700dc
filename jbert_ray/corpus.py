"""Read a corpus into Ray Data, one row per record, good or bad, so every stage can count and keep its rejects.

A corpus is a file, a folder or a glob of .jsonl (a `text` field), .txt (one document per line) or .parquet files,
optionally .gz/.bz2 compressed, on local disk or any pyarrow filesystem (s3://, gs://, hdfs://). Rows have
`record_id` (`path:line`, or the value of an id field), `text` and `reject` ("" or a reason from jbert_ray.text);
with `positions=True` also `path` and `line` (1-based line or parquet row), which `skip` takes to resume a run.
A binary file, a corrupt compressed stream and an over-long line become rejected records, never a crash.
A storage error (any backend's, timeouts included) is retried from the byte reached; one that persists fails
the read with a UserError naming the file, so no file is ever cut short silently.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from jbert_ray import text as T
from jbert_ray.errors import UserError
from jbert_ray.storage import glob_prefix

_COMPRESSIONS = (".gz", ".bz2", ".zst", ".lz4")
_KNOWN_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
_ROWS_PER_TABLE = 4096  # records per table a read yields (Ray then merges them into blocks)
_MAX_BLOCKS = 100_000  # a cap on requested blocks: past it, per-block overhead outweighs finer balance
_CODECS = {"gz": "gzip", "bz2": "bz2", "zst": "zstd", "lz4": "lz4"}
REJECT_PREVIEW_CHARS = 2000  # a rejected record is kept in rejects/ up to this length
_READ_CHUNK_BYTES = 1 << 20
_COMPRESSED_CHUNK_BYTES = 64 << 10  # a corrupt stream loses the chunk being decoded: small keeps more lines
_REQUEST_BYTES = 8 << 20  # bytes asked of storage at once: an object store's GET costs ~10-50 ms up front
# Waits before each reopen of a file whose open or read failed: 15.5 s in all, past an object store's 503
# bursts and a namenode failover. A successful read starts the count again: only consecutive failures add up.
_RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)
_MAX_LINE_BYTES = 64 << 20  # a longer line is rejected while it streams past, never held in memory
_SNIFF_BYTES = 8192  # a file whose head is mostly undecodable or control bytes is binary, not a corpus
_BINARY_HEAD_FRACTION = 0.3
SCHEMA = pa.schema([("record_id", pa.string()), ("text", pa.string()), ("reject", pa.string())])
POSITION_FIELDS = [("path", pa.string()), ("line", pa.int64())]
_log = logging.getLogger(__name__)
_T = TypeVar("_T")


def corpus_format(path: str) -> str:
    """'jsonl', 'parquet' or 'txt', from the file name (a compression suffix is ignored)."""
    name = path.lower()
    for suffix in _COMPRESSIONS:
        name = name.removesuffix(suffix)
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    return "parquet" if name.endswith(".parquet") else "txt"


class CorpusFiles(NamedTuple):
    """A corpus listed once (listing is costly on object stores): its sorted files and their filesystem."""

    paths: list[str]
    filesystem: pa.fs.FileSystem


def resolve_paths(corpus: str) -> CorpusFiles:
    """Expand a file, folder or glob (local or URI) into a sorted file list; fail clearly if there is none."""
    import pyarrow.fs as pafs

    prefix = glob_prefix(corpus)
    has_glob = prefix != corpus
    base = prefix.rsplit("/", 1)[0] if has_glob else corpus
    try:
        if "://" in corpus:
            filesystem, base_path = pafs.FileSystem.from_uri(base or ".")
        else:
            filesystem, base_path = pafs.LocalFileSystem(), str(Path(base or ".").resolve())
        info = filesystem.get_file_info(base_path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as error:
        raise UserError(f"cannot open corpus {corpus!r}: {error}") from None
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"corpus not found: {corpus}")
    if info.type == pafs.FileType.File:
        return CorpusFiles([base_path], filesystem)
    selector = pafs.FileSelector(base_path, recursive=True)
    files = [f.path for f in filesystem.get_file_info(selector) if f.type == pafs.FileType.File]
    files = [f for f in files if not Path(f).name.startswith((".", "_"))]
    if has_glob:
        pattern = base_path + corpus[len(base) :] if "://" not in corpus else corpus.split("://", 1)[1]
        files = [f for f in files if fnmatch.fnmatch(f, pattern)]
    else:
        files = [f for f in files if any(s in f.lower() for s in _KNOWN_SUFFIXES)]
    if not files:
        raise UserError(f"no corpus files (.jsonl, .txt, .parquet) found at {corpus}")
    return CorpusFiles(sorted(files), filesystem)


def read_corpus(
    corpus: str | CorpusFiles,
    text_field: str = "text",
    id_field: str | None = None,
    *,
    positions: bool = False,
    skip: Mapping[str, Sequence[tuple[int, int]]] | None = None,
    read_tasks: int | None = None,
    rows_per_block: int | None = None,
):
    """A Ray Dataset of every record of the corpus (columns record_id, text, reject).

    `positions` adds the columns path and line; `skip` maps a path to sorted, disjoint inclusive (first, last)
    line ranges whose records are left out (already processed by an interrupted run). `read_tasks` caps the
    files read at once (default: no cap); each reading task holds its file's blocks, so a cap keeps memory
    independent of the number of files. A block goes to one actor whole, so `rows_per_block` (roughly: the
    row count is estimated) sets how finely costly work spreads over an actor pool; default: Ray's blocks.
    """
    import ray.data

    paths, filesystem = corpus if isinstance(corpus, CorpusFiles) else resolve_paths(corpus)
    source = CorpusDatasource(
        paths,
        filesystem=filesystem,
        text_field=text_field,
        id_field=id_field,
        positions=positions,
        skip=skip,
    )
    # A read task merges its output into blocks of up to 128 MiB (a small corpus becomes one block, which one
    # actor would then score alone); asking for a number of blocks makes Ray cut them evenly.
    blocks = None
    if rows_per_block:
        blocks = min(_MAX_BLOCKS, max(1, -(-estimate_rows(paths, filesystem) // rows_per_block)))
    # Reading is light (decode + JSON); a small CPU share keeps it schedulable next to full actor pools.
    compute = ray.data.TaskPoolStrategy(size=read_tasks) if read_tasks else None
    return ray.data.read_datasource(source, num_cpus=0.1, compute=compute, override_num_blocks=blocks)


def estimate_rows(paths: Sequence[str], filesystem: pa.fs.FileSystem) -> int:
    """About how many records the files hold: their total size × the records per byte of the first file."""
    import pyarrow.parquet as pq

    sizes = [info.size or 0 for info in filesystem.get_file_info(list(paths))]
    first = paths[0]
    try:
        if corpus_format(first) == "parquet":
            with filesystem.open_input_file(first) as f:
                rows, used = pq.ParquetFile(f).metadata.num_rows, sizes[0]
        else:
            with filesystem.open_input_file(first) as raw:
                codec = _codec(first)
                stream = pa.CompressedInputStream(raw, codec) if codec else raw
                rows = stream.read(_READ_CHUNK_BYTES).count(b"\n")
                used = raw.tell()  # the file bytes behind those records
    except (
        OSError,
        pa.ArrowException,
    ):  # the reader reports unreadable files; here one block per file will do
        return len(paths)
    return max(len(paths), round(sum(sizes) * max(rows, 1) / max(used, 1)))


def parse_line(line: bytes, fmt: str, text_field: str, id_field: str | None) -> tuple[str | None, str, str]:
    """Decode one jsonl/txt line into (record id or None, text, reject reason)."""
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, line.decode("utf-8", "replace"), T.REJECT_INVALID_UTF8
    if fmt == "txt":
        return None, decoded, ""
    try:
        record = json.loads(decoded)
    except (json.JSONDecodeError, RecursionError):
        return None, decoded, T.REJECT_INVALID_JSON
    if not isinstance(record, dict) or text_field not in record:
        return None, decoded, T.REJECT_MISSING_FIELD
    record_id = str(record[id_field]) if id_field and record.get(id_field) is not None else None
    value = record[text_field]
    if not isinstance(value, str):
        return record_id, decoded, T.REJECT_NOT_TEXT
    if T.has_invalid_unicode(value) or (record_id and T.has_invalid_unicode(record_id)):
        return (
            None,
            decoded,
            T.REJECT_INVALID_UNICODE,
        )  # the line itself is valid UTF-8: keep it as the record
    return record_id, value, ""


class CorpusDatasource(FileBasedDatasource):
    """Streams records of jsonl/txt/parquet files in blocks; never holds a whole file's records at once."""

    def __init__(
        self,
        paths: list[str],
        *,
        text_field: str = "text",
        id_field: str | None = None,
        positions: bool = False,
        skip: Mapping[str, Sequence[tuple[int, int]]] | None = None,
        **kwargs,
    ):
        super().__init__(paths, **kwargs)
        # ResumableFile retries every backend's errors and resumes mid-file; Ray's own retry (AWS messages
        # only) would re-read the whole file from its start and multiply a persistent error's attempts.
        self._data_context = copy.copy(self._data_context)
        self._data_context.retried_io_errors = []
        self.retry_delays_s = _RETRY_DELAYS_S
        self.text_field = text_field
        self.id_field = id_field
        self.positions = positions
        self.skip = {path: [tuple(r) for r in ranges] for path, ranges in (skip or {}).items()}

    def _read_stream(self, f: ResumableFile, path: str) -> Iterator[pa.Table]:
        skipped = _LineSkipper(self.skip.get(path, ()))
        block: list[tuple[str, str, str, int]] = []
        for row in read_rows(f, path, self.text_field, self.id_field):
            if skipped(row[3]):
                continue
            block.append(row)
            if len(block) == _ROWS_PER_TABLE:
                yield _to_table(block, path if self.positions else None)
                block = []
        if block:
            yield _to_table(block, path if self.positions else None)

    def _open_input_source(self, filesystem, path: str, **open_args) -> ResumableFile:
        # Opened lazily, inside the retries; Ray's wrapper of the filesystem retries AWS's errors on its own.
        return ResumableFile(getattr(filesystem, "unwrap", lambda: filesystem)(), path, self.retry_delays_s)


def read_rows(
    file: ResumableFile, path: str, text_field: str = "text", id_field: str | None = None
) -> Iterator[tuple[str, str, str, int]]:
    """Every record of one corpus file as (record_id, text, reject, line), in file order."""
    if corpus_format(path) == "parquet":
        return _parquet_rows(file, path, text_field, id_field)
    return _line_rows(file, path, corpus_format(path), text_field, id_field)


class ResumableFile:
    """A corpus file, read through storage errors: a failed open or read is retried after each of
    `delays_s`, reopening the file at the byte reached (every pyarrow filesystem opens files for random
    access). When the delays run out, UserError names the file. pa.PythonFile makes it a NativeFile."""

    def __init__(self, filesystem: pa.fs.FileSystem, path: str, delays_s: Sequence[float] = _RETRY_DELAYS_S):
        self.filesystem, self.path, self.delays_s = filesystem, path, tuple(delays_s)
        self.position = 0
        self.closed = False
        self._file: pa.NativeFile | None = None
        self._size = 0

    def read(self, nbytes: int = -1) -> bytes:
        """The next `nbytes` (all, if negative); fewer only at the end of the file, as parquet expects."""
        end = self.size() if nbytes < 0 else min(self.size(), self.position + nbytes)
        chunks = []
        while self.position < end:
            chunks.append(self._retry(lambda f: self._read_at(f, end - self.position)))
            self.position += len(chunks[-1])
        return b"".join(chunks)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = self.size() if whence == 2 else self.position if whence == 1 else 0
        self.position = base + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def size(self) -> int:
        return self._retry(lambda f: self._size)  # known once the file is open

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True
        self._discard()

    def __enter__(self) -> ResumableFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _retry(self, operation: Callable[[pa.NativeFile], _T]) -> _T:
        failures, started_s = 0, time.monotonic()
        while True:
            try:
                if self._file is None:
                    self._file = self.filesystem.open_input_file(self.path)
                    self._size = self._file.size()
                return operation(self._file)
            except (OSError, pa.ArrowException) as error:  # every backend's storage errors are one of these
                self._discard()
                if failures == len(self.delays_s):
                    raise UserError(
                        f"cannot read corpus file {self.path} at byte {self.position:,}: {_one_line(error)} "
                        f"({failures + 1} attempts in {time.monotonic() - started_s:.1f} s; check that the "
                        "storage is reachable, then run again)"
                    ) from error
                _log.warning("reading %s at byte %d failed (%s); retrying in %.1f s", self.path,
                             self.position, _one_line(error), self.delays_s[failures])  # fmt: skip
                time.sleep(self.delays_s[failures])
                failures += 1

    def _read_at(self, f: pa.NativeFile, count: int) -> bytes:
        data = f.read_at(count, self.position)
        if not data:  # a connection that ended early: the file would otherwise end here, silently
            raise OSError(f"storage returned no data at byte {self.position:,} of {self._size:,}")
        return data

    def _discard(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except (OSError, pa.ArrowException):  # a broken connection may fail to close too; it is dropped
                pass
            self._file = None


def _line_rows(
    file: ResumableFile, path: str, fmt: str, text_field: str, id_field: str | None
) -> Iterator[tuple[str, str, str, int]]:
    codec = _codec(path)
    f = pa.BufferedInputStream(pa.PythonFile(file, mode="r"), _REQUEST_BYTES)
    if codec:
        f = pa.CompressedInputStream(f, codec)
    number = 0
    try:
        head = f.read(_SNIFF_BYTES)
        if _looks_binary(head):
            preview = head[:REJECT_PREVIEW_CHARS].decode("utf-8", "replace")
            yield _row(f"{path}:1", preview, T.REJECT_BINARY, 1)
            return
        lines = _iter_lines(f, head, _COMPRESSED_CHUNK_BYTES if codec else _READ_CHUNK_BYTES)
        for number, (line, whole) in enumerate(lines, start=1):
            if not whole:
                yield _row(f"{path}:{number}", line.decode("utf-8", "replace"), T.REJECT_TOO_LONG, number)
                continue
            record_id, text, reason = parse_line(line, fmt, text_field, id_field)
            yield _row(record_id or f"{path}:{number}", text, reason, number)
    except (OSError, pa.ArrowException) as error:
        if codec is None:  # storage errors arrive as UserError: only a decompressor's error can be here
            raise
        # A truncated or corrupt compressed file: keep the lines before it, and say how many they were.
        text = f"corrupt {codec} stream after {number:,} lines of this file; the rest is lost: {error}"
        yield _row(f"{path}:{number + 1}", text, T.REJECT_UNREADABLE, number + 1)


def _parquet_rows(
    file: ResumableFile, path: str, text_field: str, id_field: str | None
) -> Iterator[tuple[str, str, str, int]]:
    import pyarrow.parquet as pq

    codec = _codec(path)
    with tempfile.TemporaryFile(prefix="jbert-parquet-") as spill:
        try:
            source = pa.PythonFile(file, mode="r")  # random access: row groups stream, never the whole file
            if codec:  # a compressed stream has no random access: decompress it to local disk, not to memory
                stream = pa.CompressedInputStream(pa.BufferedInputStream(source, _REQUEST_BYTES), codec)
                for chunk in iter(lambda: stream.read(_REQUEST_BYTES), b""):
                    spill.write(chunk)
                spill.seek(0)
                source = pa.PythonFile(spill, mode="r")
            parquet = pq.ParquetFile(source)
        except (pa.ArrowInvalid, OSError):
            yield _row(f"{path}:1", "", T.REJECT_BINARY, 1)
            return
        yield from _parquet_records(parquet, path, text_field, id_field)


def _parquet_records(
    parquet, path: str, text_field: str, id_field: str | None
) -> Iterator[tuple[str, str, str, int]]:
    if text_field not in parquet.schema_arrow.names:
        for number in range(1, parquet.metadata.num_rows + 1):
            yield _row(f"{path}:{number}", "", T.REJECT_MISSING_FIELD, number)
        return
    columns = [text_field] + ([id_field] if id_field else [])
    number = 0
    try:
        for batch in parquet.iter_batches(columns=columns):
            ids = _column_values(batch.column(id_field)) if id_field else [None] * batch.num_rows
            for value, record_id in zip(_column_values(batch.column(text_field)), ids):
                number += 1
                yield _parquet_row(value, record_id, path, number)
    except (OSError, pa.ArrowException) as error:  # a corrupt row group (storage errors come as UserError)
        raise UserError(f"corpus file {path} is corrupt after row {number:,}: {_one_line(error)}") from error


def _codec(path: str) -> str | None:
    """pyarrow's codec name for a compressed file's suffix, None for an uncompressed file."""
    return _CODECS.get(path.rsplit(".", 1)[-1].lower())


def _parquet_row(value: bytes | None, record_id, path: str, number: int) -> tuple[str, str, str, int]:
    """One parquet record as a row: its text as bytes (see _column_values), its id any value or None."""
    if isinstance(record_id, bytes):
        record_id = record_id.decode("utf-8", "replace")
    record_id = str(record_id) if record_id is not None else f"{path}:{number}"
    if not isinstance(value, bytes):
        return _row(record_id, "" if value is None else repr(value), T.REJECT_NOT_TEXT, number)
    try:
        return _row(record_id, value.decode("utf-8"), "", number)
    except UnicodeDecodeError:
        return _row(record_id, value.decode("utf-8", "replace"), T.REJECT_INVALID_UTF8, number)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())  # storage errors can span lines; the CLI prints one


def _column_values(column: pa.Array) -> list:
    """A parquet column as Python values, text as bytes: a file's invalid UTF-8 becomes a reject, not a crash."""
    if pa.types.is_string(column.type):  # parquet writers need not validate UTF-8; Arrow decodes it only here
        column = column.cast(pa.binary())
    elif pa.types.is_large_string(column.type):
        column = column.cast(pa.large_binary())
    return column.to_pylist()


class _LineSkipper:
    """Is a line inside the skip ranges? Lines arrive in increasing order, so one pointer walks the ranges."""

    def __init__(self, ranges: Sequence[tuple[int, int]]):
        self.ranges = sorted(ranges)
        self.next = 0

    def __call__(self, line: int) -> bool:
        while self.next < len(self.ranges) and self.ranges[self.next][1] < line:
            self.next += 1
        return self.next < len(self.ranges) and self.ranges[self.next][0] <= line


def _row(record_id: str, text: str, reason: str, line: int) -> tuple[str, str, str, int]:
    return record_id, text[:REJECT_PREVIEW_CHARS] if reason else text, reason, line


def _looks_binary(head: bytes) -> bool:
    """Mostly NUL/control bytes or invalid UTF-8 (a gzip, an image, an executable): not a text corpus."""
    if not head:
        return False
    text = head.decode("utf-8", "replace")
    bad = text.count("\ufffd") + sum(1 for ch in text if ch < "\x09" or "\x0e" <= ch < "\x20")
    # A multi-byte character cut at the end of the head is not evidence; 3 bytes of slack cover it.
    return bad - 3 > _BINARY_HEAD_FRACTION * len(text)


def _iter_lines(f: pa.NativeFile, head: bytes, chunk_bytes: int) -> Iterator[tuple[bytes, bool]]:
    """(line without its ending, whole?) of a binary stream read in chunks, after the bytes in `head`.

    A line over _MAX_LINE_BYTES comes back once, cut to the preview length, with whole=False; the rest of it
    streams past without being kept."""
    rest, skipping = b"", False
    chunk = head or f.read(chunk_bytes)
    while chunk:
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            if skipping:  # the tail of the over-long line, already reported
                skipping = False
                continue
            yield line.removesuffix(b"\r"), True
        if skipping:
            rest = b""
        elif len(rest) > _MAX_LINE_BYTES:
            yield rest[:REJECT_PREVIEW_CHARS], False
            rest, skipping = b"", True
        chunk = f.read(chunk_bytes)
    if rest and not skipping:
        yield rest.removesuffix(b"\r"), True


def _to_table(rows: list[tuple[str, str, str, int]], path: str | None) -> pa.Table:
    record_ids, texts, rejects, lines = zip(*rows)
    table = pa.table([list(record_ids), list(texts), list(rejects)], schema=SCHEMA)
    if path is not None:
        table = table.append_column(pa.field(*POSITION_FIELDS[0]), pa.array([path] * len(rows), pa.string()))
        table = table.append_column(pa.field(*POSITION_FIELDS[1]), pa.array(lines, pa.int64()))
    return table


def reject_line(record_id: str, reason: str, raw: str) -> str:
    """A rejected record as a line of rejects/*.jsonl: {record_id, reason, record} (its first
    REJECT_PREVIEW_CHARS characters: a record can be a 64 MiB line)."""
    record = {"record_id": str(record_id), "reason": str(reason), "record": str(raw)[:REJECT_PREVIEW_CHARS]}
    return json.dumps(record, ensure_ascii=False)


class RejectsWriter:
    """Appends `reject_line`s to a file and counts them by reason."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.by_reason: dict[str, int] = {}
        self._file = open(path, "w", encoding="utf-8")

    def write(self, line: str) -> None:
        reason = json.loads(line)["reason"]
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        self._file.write(line + "\n")

    def close(self) -> None:
        self._file.close()
