"""A fault-injecting pyarrow filesystem for tests: a real one (local by default) whose chosen calls fail.

    fs = faulty_filesystem(Fault("read", "*/a.jsonl", after_bytes=100_000))  # a read error 100 kB in
    read_corpus(CorpusFiles([str(path)], fs))

A Fault names an operation and a path pattern; the `nth` matching call (1-based) and the `times - 1` after it
fail with OSError(message) (a read fault with eof=True returns b"" instead: a connection ending early, no
error). Calls are counted in files under a state folder, so the copies pickled into Ray tasks, retried ones
too, share one count per machine: times=1 really is transient. `handler.calls(i)`: how often fault i matched.
"""

from __future__ import annotations

import fnmatch
import os
import tempfile
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

# open_input: open_input_stream/open_input_file; open_output: open_output_stream/open_append_stream;
# delete_dir: delete_dir/delete_dir_contents; info: get_file_info (a file list or a selector's base folder).
OPERATIONS = ("open_input", "read", "open_output", "write", "move", "copy", "delete_dir", "delete_file",
              "create_dir", "info")  # fmt: skip


@dataclass(frozen=True)
class Fault:
    op: str  # one of OPERATIONS
    path: str = "*"  # fnmatch pattern over the path (both paths of a move/copy are tried)
    nth: int = 1  # the first matching call that fails
    times: int = 1  # how many matching calls fail from the nth on; a large number makes the fault persistent
    after_bytes: int = 0  # read/write only: calls match from this byte on (reads stop short at it)
    message: str = "injected I/O error (as a GCS 503 or an HDFS timeout would say)"
    eof: bool = False  # read only: return b"" (a premature end of file) instead of raising

    def __post_init__(self):
        assert self.op in OPERATIONS, f"unknown op {self.op!r}; one of {OPERATIONS}"


def faulty_filesystem(
    *faults: Fault,
    base: pafs.FileSystem | None = None,
    max_read_bytes: int | None = None,
    state_dir: str | None = None,
) -> pafs.PyFileSystem:
    """A picklable filesystem over `base` (default: local) with `faults`; every read returns at most
    `max_read_bytes` (short reads, legal and rare) when set. `state_dir` (default: a new temp folder) holds
    the counts."""
    base = base or pafs.LocalFileSystem()
    return pafs.PyFileSystem(FaultyHandler(base, faults, max_read_bytes, state_dir or tempfile.mkdtemp()))


class FaultyHandler(pafs.FileSystemHandler):
    """Every call asks check() first, then goes to `base`; files are wrapped so reads and writes ask too."""

    def __init__(self, base: pafs.FileSystem, faults, max_read_bytes: int | None, state_dir: str):
        self.base, self.faults, self.state_dir = base, tuple(faults), state_dir
        self.max_read_bytes = max_read_bytes

    def __reduce__(self):
        return FaultyHandler, (self.base, self.faults, self.max_read_bytes, self.state_dir)

    def calls(self, index: int) -> int:
        """How many calls fault `index` has matched so far (failed or not), over all processes."""
        path = os.path.join(self.state_dir, str(index))
        return os.path.getsize(path) if os.path.exists(path) else 0

    def check(self, op: str, *paths: str, position: int = 0) -> Fault | None:
        """Count the call against each matching fault; raise (or return an eof fault) if one fires."""
        for index, fault in enumerate(self.faults):
            if fault.op != op or not any(fnmatch.fnmatch(p, fault.path) for p in paths):
                continue
            if position < fault.after_bytes:
                continue
            fd = os.open(os.path.join(self.state_dir, str(index)), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                os.write(fd, b".")  # one byte per call: the offset after our append is our unique number
                number = os.lseek(fd, 0, os.SEEK_CUR)
            finally:
                os.close(fd)
            if fault.nth <= number < fault.nth + fault.times:
                if fault.eof:
                    return fault
                raise OSError(f"{fault.message} [{op} {paths[0]}]")
        return None

    def get_type_name(self) -> str:
        return "faulty+" + self.base.type_name

    def normalize_path(self, path: str) -> str:
        return self.base.normalize_path(path)

    def __eq__(self, other) -> bool:  # pyarrow compares two PyFileSystems by their handlers
        return isinstance(other, FaultyHandler) and other.state_dir == self.state_dir

    def __hash__(self) -> int:
        return hash(self.state_dir)

    def get_file_info(self, paths):
        self.check("info", *paths)
        return self.base.get_file_info(paths)

    def get_file_info_selector(self, selector):
        self.check("info", selector.base_dir)
        return self.base.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.check("create_dir", path)
        self.base.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.check("delete_dir", path)
        self.base.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.check("delete_dir", path)
        self.base.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.check("delete_dir", "/")
        self.base.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self.check("delete_file", path)
        self.base.delete_file(path)

    def move(self, src, dest):
        self.check("move", src, dest)
        self.base.move(src, dest)

    def copy_file(self, src, dest):
        self.check("copy", src, dest)
        self.base.copy_file(src, dest)

    def open_input_stream(self, path):
        self.check("open_input", path)
        return pa.PythonFile(_FaultyFile(self.base.open_input_stream(path), self, path), mode="r")

    def open_input_file(self, path):
        self.check("open_input", path)
        return pa.PythonFile(_FaultyFile(self.base.open_input_file(path), self, path), mode="r")

    def open_output_stream(self, path, metadata):
        self.check("open_output", path)
        stream = self.base.open_output_stream(path, metadata=metadata)
        return pa.PythonFile(_FaultyFile(stream, self, path), mode="w")

    def open_append_stream(self, path, metadata):
        self.check("open_output", path)
        stream = self.base.open_append_stream(path, metadata=metadata)
        return pa.PythonFile(_FaultyFile(stream, self, path), mode="w")


class _FaultyFile:
    """A Python file object over a real pyarrow file, asking the handler before each read and write."""

    def __init__(self, inner: pa.NativeFile, handler: FaultyHandler, path: str):
        self.inner, self.handler, self.path = inner, handler, path
        self.position = 0  # kept here: a stream's tell() is not always supported

    def read(self, nbytes: int = -1) -> bytes:
        if self.handler.check("read", self.path, position=self.position):
            return b""
        # Stop short of the next fault's byte, so the bytes before it always arrive and the fault fires there.
        faults = self.handler.faults
        limits = [f.after_bytes - self.position for f in faults if f.op == "read" and f.after_bytes > self.position]
        limits += [nbytes] if nbytes >= 0 else []
        limits += [self.handler.max_read_bytes] if self.handler.max_read_bytes else []
        data = self.inner.read(min(limits) if limits else None)
        self.position += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = self.inner.seek(offset, whence)
        return self.position

    def tell(self) -> int:
        return self.position

    def write(self, data) -> int:
        self.handler.check("write", self.path, position=self.position)
        self.position += len(data)
        return self.inner.write(data)

    def __getattr__(self, name: str):  # size, flush, close, closed, readable...: the real file's
        return getattr(self.inner, name)
