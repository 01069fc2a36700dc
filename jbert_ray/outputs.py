"""What a stage may do to its output directory, checked before any work starts: never overlap an input, replace
(`--overwrite`) or continue (`--resume`) only an output it wrote itself, and only one run at a time.

Every output carries MARKER ({"stage": "score"}), written when a run first claims it, so `--overwrite` never
deletes a folder we did not write. LOCK keeps a second run out: an fcntl lock on a local dir (released however the
process ends); on an object store, which has no lock, a lease object with a run token and a heartbeat, taken over
only once its heartbeat is older than LEASE_STALE_S.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from jbert_ray.errors import UserError
from jbert_ray.storage import Store, first_line, glob_prefix, is_uri, resolve_location

MARKER = ".jbert_output"
LOCK = ".jbert_lock"
OWN_FILES = (MARKER, LOCK)  # kept when an output is cleared
# Outputs written before the marker existed, recognised by the file each stage always wrote.
_LEGACY_MARKERS = {"preprocess": (".jbert_shards", "manifest.json"), "pretrain": ("jbert_config.json",)}
_RESUMABLE = ("preprocess", "score")
LEASE_STALE_S = 60.0  # a lease whose heartbeat is this old belongs to a run that died
_HEARTBEAT_S = 10.0
_LEASE_SETTLE_S = 1.0  # an object store has no create-if-absent: write, wait, read back, and the last writer wins
_Prepared = TypeVar("_Prepared", bound=tuple)


def check_resume_or_overwrite(resume: bool, overwrite: bool) -> None:
    """A run finishes its output (`resume`) or replaces it (`overwrite`), never both."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other: give one, not both")


def prepared(job: Any, kind: type[_Prepared], prepare: Callable[[Any], _Prepared]) -> _Prepared:
    """A stage's `run_*` takes its config or the job its `prepare_*` checked before Ray started: `job` if it
    is already a `kind`, else `prepare(job)` now."""
    return job if isinstance(job, kind) else prepare(job)


def check_output(
    location: str | os.PathLike,
    stage: str,
    *,
    inputs: Mapping[str, str | os.PathLike | None] = {},
    overwrite: bool = False,
    keep: bool = False,
) -> Store:
    """An output directory checked before any work starts, then marked as `stage`'s: not a file, not a bucket's
    root, apart from every input (`{"corpus": path, …}`), empty unless `overwrite` or `keep` (a resume) and then
    an output of this same stage, writable. Each failure is one UserError line."""
    out = Store(resolve_location(location))
    if out.is_remote and "/" not in out.path.strip("/"):
        raise UserError(f"output {out} is a bucket's root: name a folder inside it (s3://bucket/folder)")
    for what, source in inputs.items():
        if source and overlaps(out.location, str(source)):
            raise UserError(f"output {out} and {what} {source} overlap: choose another --out")
    try:
        kind = out.kind()
        names = child_names(out) if kind == pafs.FileType.Directory else []
    except OSError:  # an unreachable store: check_writable says why, in one line
        kind, names = pafs.FileType.NotFound, []
    if kind == pafs.FileType.File:
        raise UserError(f"output {out} exists and is not a directory")
    content = [name for name in names if name not in OWN_FILES]  # a run that failed at once leaves only these
    if content and not (overwrite or keep):
        also = " or --resume to finish it" if stage in _RESUMABLE else ""
        raise UserError(f"output {out} is not empty: pass --overwrite to replace it{also}")
    if content and output_stage(out, names) != stage:
        found = output_stage(out, names)
        holds = f"a `jbert {found}` output" if found else "files jbert did not write"
        raise UserError(f"output {out} holds {holds}; --overwrite and --resume only act on a `jbert {stage}` "
                        "output: choose another --out")  # fmt: skip
    out.check_writable()
    if MARKER not in names:
        out.write_json(MARKER, {"stage": stage})
    return out


def output_stage(out: Store, names: list[str] | None = None) -> str | None:
    """The stage whose output this is, from its marker (or the file an older version left); None if not ours."""
    names = child_names(out) if names is None else names
    if MARKER in names:
        marker = out.read_json(MARKER)
        return marker.get("stage") if isinstance(marker, dict) else None
    return next((stage for stage, files in _LEGACY_MARKERS.items() if set(files) & set(names)), None)


def clear_output(out: Store, stage: str) -> None:
    """`--overwrite`: delete everything but the marker and the lock, and only in an output of `stage`."""
    if output_stage(out) != stage:
        raise UserError(f"refusing to clear {out}: it is not a `jbert {stage}` output")
    for name in child_names(out):
        if name not in OWN_FILES:
            out.delete(name)


def child_names(store: Store) -> list[str]:
    """Names of the entries right under the store's dir (none if it does not exist)."""
    selector = pafs.FileSelector(store.path, recursive=False, allow_not_found=True)
    return [info.base_name for info in store.filesystem.get_file_info(selector)]


def overlaps(output: str, source: str) -> bool:
    """Would the output hold the input (a file, a folder or a glob), or lie inside the folder it is listed from?"""
    if is_uri(output) != is_uri(source):
        return False
    if is_uri(output):  # one store: compare as the filesystem names them (bucket/key)
        parts = urlsplit(source)  # a URI's query (?endpoint_override=…) is not a glob
        base = glob_prefix(parts.path)
        is_glob = base != parts.path
        out, src = Store(output), Store(parts._replace(path=base.rsplit("/", 1)[0] if is_glob else base).geturl())
        if out.filesystem.type_name != src.filesystem.type_name:
            return False
        out_path, src_path = out.path.rstrip("/"), src.path.rstrip("/")
        src_is_file = not is_glob and src.kind() == pafs.FileType.File
    else:
        base = glob_prefix(source)
        src_file = Path(base).parent if base != source and not Path(base).is_dir() else Path(base)
        out_path, src_path, src_is_file = str(Path(output).resolve()), str(src_file.resolve()), src_file.is_file()
    inside = (src_path + "/").startswith(out_path + "/")  # the input is in the output (or is it)
    return inside or (not src_is_file and (out_path + "/").startswith(src_path + "/"))


class OutputLock:
    """One run at a time on an output: `with OutputLock(out, "score"):` or `acquire()`/`release()`.

    A second run is refused with one UserError line naming the holder. On an object store the holder renews its
    lease every few seconds; `lost` turns true if another run took it over (this one stalled past LEASE_STALE_S),
    and a writer should stop."""

    def __init__(self, out: Store, stage: str):
        self.out, self.stage = out, stage
        self.token = uuid.uuid4().hex
        self.lost = False
        self._file = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _holder(self) -> dict:
        return {"token": self.token, "stage": self.stage, "host": socket.gethostname(), "pid": os.getpid(),
                "heartbeat": time.time()}  # fmt: skip

    def _refuse(self, holder: dict | None) -> UserError:
        who = f" (pid {holder.get('pid')} on {holder.get('host')})" if isinstance(holder, dict) else ""
        stale = f", or for its lease to go stale ({LEASE_STALE_S:.0f} s without a heartbeat)"
        return UserError(f"another `jbert {self.stage}` run{who} is writing to {self.out}; wait for it to end"
                         + (stale if self.out.is_remote else ""))  # fmt: skip

    def acquire(self) -> OutputLock:
        if self.out.is_remote:
            self._take_lease()
        else:
            self._lock_file()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
            self._beat = None
            try:
                if _lease(self.out).get("token") == self.token:
                    self.out.delete(LOCK)
            except OSError:
                pass  # the lease goes stale on its own
        if self._file is not None:
            self._file.close()  # releases the flock
            self._file = None

    def _lock_file(self) -> None:
        path = Path(self.out.location) / LOCK
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a+", encoding="utf-8")  # noqa: SIM115 — held until release or exit
        except OSError as error:
            raise UserError(f"cannot write to output {self.out}: {error.strerror or error}") from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = _parse(self._file.read())
            self._file.close()
            self._file = None
            raise self._refuse(holder) from None
        self._file.truncate(0)
        self._file.write(json.dumps(self._holder()))
        self._file.flush()

    def _take_lease(self) -> None:
        try:
            holder = _lease(self.out)
            if holder and not _is_stale(holder):
                raise self._refuse(holder)
            self.out.write_json(LOCK, self._holder())
            time.sleep(_LEASE_SETTLE_S)
            holder = _lease(self.out)
        except OSError as error:
            raise UserError(f"cannot write to output {self.out}: {first_line(error)}") from None
        if holder.get("token") != self.token:
            raise self._refuse(holder)
        self._beat = threading.Thread(target=self._renew, name="jbert-lease", daemon=True)
        self._beat.start()

    def _renew(self) -> None:
        while not self._stop.wait(_HEARTBEAT_S):
            try:
                if _lease(self.out).get("token") != self.token:
                    self.lost = True
                    return
                self.out.write_json(LOCK, self._holder())
            except OSError:
                pass  # a transient error: the lease has LEASE_STALE_S of slack


def _is_stale(holder: dict) -> bool:
    """The holder's heartbeat stopped, or it ran on this host and its process is gone (a killed run, resumed)."""
    if time.time() - float(holder.get("heartbeat", 0)) >= LEASE_STALE_S:
        return True
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder.get("pid", 0)), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):  # alive but not ours to signal, or no pid recorded
        return False
    return False


def _lease(out: Store) -> dict:
    lease = out.read_json(LOCK, default={})
    return lease if isinstance(lease, dict) else {}


def _parse(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
