"""Reading a corpus file through storage faults (tests/faulty_fs.py, no Ray): a transient error is retried
and every record arrives once; a persistent one fails naming the file; only a corrupt compressed stream is a
reject, and it says how many lines were read before it."""

import gzip
import itertools
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from jbert_ray import text as T
from jbert_ray.corpus import ResumableFile, read_rows
from jbert_ray.errors import UserError
from tests.conftest import SAMPLE_PATH, read_sample
from tests.faulty_fs import Fault, faulty_filesystem

NO_WAIT = (0.0, 0.0, 0.0)  # three retries, without the real delays


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """The bundled Japanese sample (9,064 records, 2 MB) as jsonl, jsonl.gz, txt.bz2 and parquet."""
    import bz2

    root = tmp_path_factory.mktemp("faults")
    data = SAMPLE_PATH.read_bytes()
    (root / "a.jsonl").write_bytes(data)
    (root / "b.jsonl.gz").write_bytes(gzip.compress(data))
    (root / "c.txt.bz2").write_bytes(bz2.compress("\n".join(read_sample()).encode()))
    pq.write_table(pa.table({"text": read_sample()}), root / "d.parquet", row_group_size=1000)
    return root


def read_all(filesystem: pafs.FileSystem, path: Path) -> list[tuple[str, str, str, int]]:
    with ResumableFile(filesystem, str(path), NO_WAIT) as f:
        return list(read_rows(f, str(path)))


FILES = ["a.jsonl", "b.jsonl.gz", "c.txt.bz2", "d.parquet"]
TRANSIENT = {  # a fault halfway into the file's bytes, given how many bytes the file has
    "error once": lambda size: Fault("read", after_bytes=size // 2),
    "error 3 times in a row": lambda size: Fault("read", after_bytes=size // 2, times=3),
    "connection ends early": lambda size: Fault("read", after_bytes=size // 2, eof=True),
    "open fails twice": lambda size: Fault("open_input", times=2),
}


@pytest.mark.parametrize("fault", TRANSIENT)
@pytest.mark.parametrize("name", FILES)
def test_a_transient_storage_error_is_retried_and_every_record_arrives_once(corpus_dir, name, fault):
    path = corpus_dir / name
    filesystem = faulty_filesystem(TRANSIENT[fault](path.stat().st_size), max_read_bytes=100_000)
    rows = read_all(filesystem, path)
    assert filesystem.handler.calls(0) >= 1  # the fault was hit
    assert rows == read_all(pafs.LocalFileSystem(), path)
    assert len(rows) == len(read_sample()) and not any(reject for _, _, reject, _ in rows)


@pytest.mark.parametrize("op", ["read", "open_input"])
@pytest.mark.parametrize("name", FILES)
def test_a_persistent_storage_error_fails_in_one_line_naming_the_file(corpus_dir, name, op):
    path = corpus_dir / name
    after_bytes = path.stat().st_size // 2 if op == "read" else 0
    filesystem = faulty_filesystem(Fault(op, after_bytes=after_bytes, times=99))
    rows = []
    with pytest.raises(UserError) as failure, ResumableFile(filesystem, str(path), NO_WAIT) as f:
        rows.extend(read_rows(f, str(path)))  # a read that ends without an error would claim these complete
    message = str(failure.value)
    assert message.startswith(f"cannot read corpus file {path} ") and "injected I/O error" in message
    assert "\n" not in message and "4 attempts" in message
    assert len(rows) < len(read_sample())


@pytest.mark.parametrize("damage", ["truncated", "garbage in the middle"])
def test_a_corrupt_gzip_keeps_the_lines_before_it_and_one_reject_counts_them(corpus_dir, tmp_path, damage):
    packed = bytearray((corpus_dir / "b.jsonl.gz").read_bytes())
    if damage == "truncated":
        packed = packed[: len(packed) * 2 // 3]
    else:
        packed[len(packed) // 2 : len(packed) // 2 + 64] = bytes(64)
    (tmp_path / "b.jsonl.gz").write_bytes(packed)
    *kept, last = read_all(pafs.LocalFileSystem(), tmp_path / "b.jsonl.gz")
    assert last[0] == f"{tmp_path / 'b.jsonl.gz'}:{len(kept) + 1}" and last[2] == T.REJECT_UNREADABLE
    assert last[1].startswith(f"corrupt gzip stream after {len(kept):,} lines of this file; the rest is lost")
    # Before it, the file's lines in order. Damaged deflate data can decode to garbage lines (rejected one by
    # one) until gzip's checksum at the end catches it; a truncated file ends where its data does.
    pairs = zip([text for _, text, _, _ in kept], read_sample())
    intact = len(list(itertools.takewhile(lambda pair: pair[0] == pair[1], pairs)))
    assert intact > 2000 and (intact == len(kept) if damage == "truncated" else intact < len(read_sample()))


def test_the_faulty_filesystem_fails_the_nth_matching_write_move_and_delete_once_across_copies(tmp_path):
    import pickle

    filesystem = faulty_filesystem(Fault("write", "*/out.txt", nth=2), Fault("move", "*/b*"), Fault("delete_dir"))
    copy = pickle.loads(pickle.dumps(filesystem))  # what a Ray task gets: the same counts
    assert copy == filesystem
    with copy.open_output_stream(str(tmp_path / "out.txt")) as f:
        f.write("一行目\n".encode())
        with pytest.raises(OSError, match=r"^injected I/O error .* \[write .*out.txt\]$"):
            f.write(b"lost")
        f.write("三行目\n".encode())
    assert (tmp_path / "out.txt").read_text() == "一行目\n三行目\n"
    filesystem.move(str(tmp_path / "out.txt"), str(tmp_path / "a.txt"))  # no path matches */b*
    with pytest.raises(OSError):
        copy.move(str(tmp_path / "a.txt"), str(tmp_path / "b.txt"))
    filesystem.move(str(tmp_path / "a.txt"), str(tmp_path / "b.txt"))  # the fault fired once, on the copy
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError):
        filesystem.delete_dir(str(tmp_path / "d"))
    copy.delete_dir(str(tmp_path / "d"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.txt"]


@pytest.mark.parametrize("name", ["a.jsonl", "b.jsonl.gz"])
def test_a_transient_error_on_the_s3_server_is_retried_too(corpus_dir, name, s3_bucket):
    from jbert_ray.storage import Store

    store = Store(s3_bucket("corpus"))
    store.write_bytes(name, (corpus_dir / name).read_bytes())
    size = (corpus_dir / name).stat().st_size
    filesystem = faulty_filesystem(Fault("read", after_bytes=size // 2, times=2), base=store.filesystem)
    rows = read_all(filesystem, store.full(name))
    assert filesystem.handler.calls(0) >= 2
    assert [r[1:] for r in rows] == [r[1:] for r in read_all(pafs.LocalFileSystem(), corpus_dir / name)]


def test_a_compressed_parquet_file_is_read_whole_through_a_local_spill(corpus_dir, tmp_path):
    path = tmp_path / "d.parquet.gz"
    path.write_bytes(gzip.compress((corpus_dir / "d.parquet").read_bytes()))
    rows = read_all(pafs.LocalFileSystem(), path)
    assert [r[1] for r in rows] == read_sample() and not any(reject for _, _, reject, _ in rows)
    (tmp_path / "e.parquet.gz").write_bytes(gzip.compress(b"not a parquet file" * 100))
    assert [r[2] for r in read_all(pafs.LocalFileSystem(), tmp_path / "e.parquet.gz")] == [T.REJECT_BINARY]
