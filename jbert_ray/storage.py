"""Where inputs and outputs live: a local path or any pyarrow filesystem URI (s3://, gs://, hdfs://), one code path
for all (pyarrow.fs). Credentials come from each backend's own environment (AWS_ACCESS_KEY_ID, …); an S3-compatible
endpoint from the URI (`?endpoint_override=HOST:PORT&scheme=http`) or from AWS_ENDPOINT_URL, which pyarrow does not
read by itself."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from functools import cached_property
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from jbert_ray.errors import UserError

CACHE_ENV = "JBERT_CACHE_DIR"  # where a node keeps its copies of remote model and tokenizer dirs
CACHE_MAX_ENV, DEFAULT_CACHE_MAX_GB = "JBERT_CACHE_MAX_GB", 20.0  # evicted least recently used first
_NEW, _OLD, _COMPLETE = ".new", ".old", ".jbert_complete"  # replace_dir's siblings and its completion mark
_WHOLE_PUT_STORES = ("s3", "gcs", "abfs")  # pyarrow filesystems whose put makes an object appear whole or not


def is_uri(location: str | os.PathLike) -> bool:
    """True for `scheme://…` (object stores, HDFS); False for a local path (file:// counts as local)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def endpoint_uri(uri: str) -> str:
    """`uri` with AWS_ENDPOINT_URL passed on as pyarrow's endpoint_override (unless the URI names one)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    parts = urlsplit(uri)
    query = dict(parse_qsl(parts.query))
    if parts.scheme != "s3" or not endpoint or "endpoint_override" in query:
        return uri
    target = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    query.update(endpoint_override=target.netloc, scheme=target.scheme)
    return parts._replace(query=urlencode(query)).geturl()


def glob_prefix(path: str) -> str:
    """The part of a path or URI before its first glob character (`*`, `?`, `[`); all of it if it has none."""
    return path.split("*")[0].split("?")[0].split("[")[0]


def resolve_location(location: str | os.PathLike) -> str:
    """What the driver hands to workers on other nodes: an absolute local path, or the URI with its endpoint."""
    return endpoint_uri(str(location)) if is_uri(location) else str(Path(location).resolve())


class Store:
    """A directory on some filesystem; picklable (only the location travels, each process opens its own)."""

    def __init__(self, location: str | os.PathLike):
        text = str(location)
        self.location = text if is_uri(text) else str(Path(text.removeprefix("file://")).absolute())

    def __repr__(self) -> str:
        return f"Store({self.location!r})"

    def __str__(self) -> str:
        return self.location

    def __getstate__(self) -> dict:
        return {"location": self.location}

    @property
    def is_remote(self) -> bool:
        return is_uri(self.location)

    @cached_property
    def _opened(self) -> tuple[pafs.FileSystem, str]:
        if not self.is_remote:
            return pafs.LocalFileSystem(), self.location
        try:
            filesystem, path = pafs.FileSystem.from_uri(endpoint_uri(self.location))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as error:
            raise UserError(f"cannot open {self.location}: {error}") from None
        return filesystem, path.rstrip("/")

    @property
    def filesystem(self) -> pafs.FileSystem:
        return self._opened[0]

    @property
    def path(self) -> str:
        """The location as the filesystem names it (no scheme, no query)."""
        return self._opened[1]

    def full(self, relative: str = "") -> str:
        return f"{self.path}/{relative}" if relative else self.path

    def child(self, relative: str) -> Store:
        """The store of a subdirectory."""
        if not self.is_remote:
            return Store(Path(self.location) / relative)
        parts = urlsplit(self.location)
        return Store(parts._replace(path=parts.path.rstrip("/") + "/" + relative).geturl())

    # ---- reading ----

    def kind(self, relative: str = "") -> pafs.FileType:
        return self.filesystem.get_file_info(self.full(relative)).type

    def exists(self, relative: str = "") -> bool:
        return self.kind(relative) != pafs.FileType.NotFound

    def is_file(self, relative: str) -> bool:
        return self.kind(relative) == pafs.FileType.File

    def files(self, relative: str = "") -> list[str]:
        """Every file below `relative`, as sorted paths relative to this store (none if it does not exist)."""
        selector = pafs.FileSelector(self.full(relative), recursive=True, allow_not_found=True)
        infos = self.filesystem.get_file_info(selector)
        return sorted(i.path[len(self.path) + 1 :] for i in infos if i.type == pafs.FileType.File)

    def read_bytes(self, relative: str) -> bytes:
        """The file's bytes as stored (pyarrow would otherwise decompress a `.gz` by its name)."""
        with self.filesystem.open_input_stream(self.full(relative), compression=None) as stream:
            return stream.read()

    def read_text(self, relative: str) -> str:
        return self.read_bytes(relative).decode("utf-8")

    def read_json(self, relative: str, default=None):
        """The parsed file, or `default` if it is missing. Our writes are whole, so a file that is not valid JSON
        was damaged: a UserError, never silently `default` (a resume would then start over)."""
        try:
            return json.loads(self.read_bytes(relative))
        except FileNotFoundError:
            return default
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"{self.child(relative)} is damaged (not valid JSON: {error}); remove it or use a new "
                            "output") from None  # fmt: skip

    # ---- writing: a reader never sees half a file ----

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write whole: an object store's put is already whole; elsewhere a temporary file, renamed (and locally
        fsynced first, so a node crash cannot leave a short file under the final name)."""
        target = self.full(relative)
        self.filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
        if self.filesystem.type_name in _WHOLE_PUT_STORES:
            with self.filesystem.open_output_stream(target, compression=None) as stream:
                stream.write(data)
            return
        tmp = f"{target}.{uuid.uuid4().hex[:8]}.tmp"
        if self.is_remote:  # HDFS and the like: no atomic put, but an atomic rename
            with self.filesystem.open_output_stream(tmp, compression=None) as stream:
                stream.write(data)
            self.filesystem.move(tmp, target)
            return
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(os.path.dirname(target))

    def write_text(self, relative: str, text: str) -> None:
        self.write_bytes(relative, text.encode("utf-8"))

    def write_json(self, relative: str, obj) -> None:
        self.write_text(relative, json.dumps(obj, ensure_ascii=False, indent=1) + "\n")

    def write_parquet(self, relative: str, table: pa.Table) -> None:
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self.write_bytes(relative, sink.getvalue().to_pybytes())

    def delete(self, relative: str) -> None:
        """Delete a file or a directory tree; nothing if it is not there."""
        kind = self.kind(relative)
        if kind == pafs.FileType.Directory:
            self.filesystem.delete_dir(self.full(relative))
        elif kind == pafs.FileType.File:
            self.filesystem.delete_file(self.full(relative))

    def move(self, source: str, target: str) -> None:
        """Move a file or a directory tree within the store (object stores: copy, then delete)."""
        if not self.is_remote or self.kind(source) == pafs.FileType.File:
            self.filesystem.create_dir(self.full(target).rsplit("/", 1)[0], recursive=True)
            self.filesystem.move(self.full(source), self.full(target))
            return
        for name in self.files(source):
            self.filesystem.copy_file(self.full(name), self.full(target + name[len(source) :]))
        self.delete(source)

    def replace_dir(self, local_dir: str | os.PathLike, relative: str) -> None:
        """Put a local directory tree in place of `relative`, which is never missing or half-written: the new copy
        is uploaded beside it (`relative.new`), marked complete, then swapped in."""
        self.recover_dir(relative)
        new = relative + _NEW
        self.upload(local_dir, new)
        self.write_bytes(f"{new}/{_COMPLETE}", b"")
        self._swap_in(relative)

    def recover_dir(self, relative: str) -> None:
        """Finish a `replace_dir` that a crash cut short: a complete new copy goes in, an incomplete one goes."""
        new, old = relative + _NEW, relative + _OLD
        if self.is_file(f"{new}/{_COMPLETE}"):
            self._swap_in(relative)
        self.delete(new)
        if self.exists(old) and not self.exists(relative):  # cut between the two renames of a local swap
            self.move(old, relative)
        self.delete(old)
        self.delete(f"{relative}/{_COMPLETE}")

    def _swap_in(self, relative: str) -> None:
        new, old = relative + _NEW, relative + _OLD
        if not self.is_remote:  # two renames; in between, `old` and the complete `new` are both there
            self.delete(old)
            if self.exists(relative):
                self.filesystem.move(self.full(relative), self.full(old))
            self.filesystem.move(self.full(new), self.full(relative))
            self.delete(f"{relative}/{_COMPLETE}")
            self.delete(old)
            return
        # An object store has no rename: copy file by file while the marked-complete `new` stays whole.
        self.delete(relative)
        for name in self.files(new):
            if name != f"{new}/{_COMPLETE}":
                self.filesystem.copy_file(self.full(name), self.full(relative + name[len(new) :]))
        self.delete(f"{new}/{_COMPLETE}")  # from here `relative` is the complete copy
        self.delete(new)

    def upload(self, local_dir: str | os.PathLike, relative: str = "") -> None:
        """Copy a local directory tree into this store."""
        self.filesystem.create_dir(self.full(relative), recursive=True)  # copy_files makes only the subdirs
        # One file at a time: on the first failed file a threaded copy_files returns while other copies are still
        # in flight, and they land after the caller has cleaned up (measured on S3: a `model.new/` file reappeared).
        pafs.copy_files(str(Path(local_dir).absolute()), self.full(relative), use_threads=False,
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.filesystem)  # fmt: skip

    def download(self, relative: str, local_dir: str | os.PathLike) -> None:
        """Copy a directory tree of this store to a local directory."""
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.full(relative), str(local_dir),
                        source_filesystem=self.filesystem, destination_filesystem=pafs.LocalFileSystem())  # fmt: skip

    # ---- checks before any work starts ----

    def check_writable(self) -> None:
        """Write and delete a probe file; a missing bucket, no credentials, a read-only bucket or an unreachable
        endpoint becomes one UserError line."""
        probe = f".jbert_write_probe_{uuid.uuid4().hex[:8]}"
        try:
            self.write_bytes(probe, b"ok")
            self.delete(probe)
        except OSError as error:
            raise UserError(f"cannot write to output {self.location}: {first_line(error)}") from None

    def check_readable(self, what: str) -> None:
        """The location exists and can be listed; else one UserError line naming `what` it was meant to be."""
        try:
            found = self.exists()
        except OSError as error:
            raise UserError(f"cannot read {what} {self.location}: {first_line(error)}") from None
        if not found:
            raise UserError(f"{what} not found: {self.location}")


def _fsync_dir(path: str) -> None:
    """Make a rename in `path` durable (the new name is an entry of the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def first_line(error: BaseException) -> str:
    """An OSError from pyarrow's S3 client spans lines and repeats the request; its first sentence says it."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split(" (Request ID")[0]


def local_copy(location: str | os.PathLike) -> Path:
    """A local directory holding `location`: itself when it is local, else this node's cached copy, fetched once
    per node and keyed by the remote listing (names, sizes, modification times), so a changed dir is fetched anew.

    The bucket is not trusted: a key with `..` or an empty segment is refused (it would land outside the cache),
    a cached copy whose sizes differ is fetched again, and the least recently used copies are evicted to keep
    the cache under JBERT_CACHE_MAX_GB."""
    store = Store(location)
    if not store.is_remote:
        return Path(store.location)
    try:
        infos = store.filesystem.get_file_info(pafs.FileSelector(store.path, recursive=True))
    except OSError as error:
        raise UserError(f"cannot read {store.location}: {first_line(error)}") from None
    files = [i for i in infos if i.type == pafs.FileType.File]
    listing = sorted((i.path[len(store.path) + 1 :], i.size, str(i.mtime)) for i in files)
    if not listing:
        raise UserError(f"not found or empty: {store.location}")
    for name, _, _ in listing:
        if name.startswith("/") or any(part in ("", ".", "..") for part in name.split("/")):
            raise UserError(f"{store.location} holds an unsafe file name {name!r}: refusing to copy it")
    key = hashlib.sha256(json.dumps([store.location, listing]).encode()).hexdigest()[:20]
    root = _cache_root()
    cache = root / key
    if cache.is_dir():
        if _holds(cache, listing):
            os.utime(cache)  # recently used: evicted last
            return cache
        shutil.rmtree(cache, ignore_errors=True)  # damaged (a file cut short or removed): fetch it again
    _evict(root, keep_free=sum(size for _, size, _ in listing))
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    store.download("", staging)
    if not _holds(staging, listing):
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"copying {store.location} to {root} gave files of other sizes; try again")
    try:
        staging.rename(cache)  # whole or not at all; another process of this node may have won the race
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return cache


def _cache_root() -> Path:
    """This node's cache dir, private to the user (model files may be confidential)."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jbert_ray")
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return root


def _holds(directory: Path, listing: list[tuple[str, int, str]]) -> bool:
    """Does `directory` hold exactly the listed files, at their sizes?"""
    found = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    if found != [name for name, _, _ in listing]:
        return False
    return all((directory / name).stat().st_size == size for name, size, _ in listing)


def _evict(root: Path, keep_free: int) -> None:
    """Delete the least recently used copies until `keep_free` more bytes fit under JBERT_CACHE_MAX_GB."""
    limit = float(os.environ.get(CACHE_MAX_ENV) or DEFAULT_CACHE_MAX_GB) * 1e9
    entries = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    sizes = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in entries}
    total = sum(sizes.values())
    for entry in sorted(entries, key=lambda p: p.stat().st_mtime):
        if total + keep_free <= limit:
            break
        shutil.rmtree(entry, ignore_errors=True)
        total -= sizes[entry]
