"""The shards output directory without Ray: refusals, the run lock, done records, recovery and publishing, in a
local folder and in an S3 bucket (a local S3 server) alike."""

import tempfile

import pyarrow as pa
import pytest

from jbert_ray.errors import UserError
from jbert_ray.shard_manifest import batch_key, line_ranges, merge_ranges
from jbert_ray.shards import MANIFEST, ShardsDir
from jbert_ray.storage import Store


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path, monkeypatch):
    """Where outputs go: a function of a relative name giving a local path or an s3:// URI."""
    if request.param == "s3":
        import jbert_ray.outputs

        # The lease's write-wait-read settles in 1 s against a remote store; the local server answers in ms.
        monkeypatch.setattr(jbert_ray.outputs, "_LEASE_SETTLE_S", 0.05)
        return request.getfixturevalue("s3_bucket")
    return lambda name: str(tmp_path / name)


def test_line_ranges_are_runs_of_consecutive_lines_per_file():
    ranges = line_ranges(["a", "a", "b", "a", "a"], [1, 2, 7, 5, 4])
    assert ranges == {"a": [[1, 2], [4, 5]], "b": [[7, 7]]}
    assert batch_key(ranges) == batch_key(line_ranges(["b", "a", "a", "a", "a"], [7, 5, 4, 2, 1]))


def test_merge_ranges_joins_neighbours_and_refuses_overlaps():
    records = [{"ranges": {"a": [[1, 5]]}}, {"ranges": {"a": [[6, 9], [20, 20]]}}]
    assert merge_ranges(records) == {"a": [(1, 9), (20, 20)]}
    with pytest.raises(RuntimeError, match="twice"):
        merge_ranges([*records, {"ranges": {"a": [[9, 10]]}}])


def test_a_non_empty_folder_is_refused_and_never_deleted_unless_ours(location):
    Store(location("out")).write_text("notes.txt", "mine")
    with pytest.raises(UserError, match="not empty"):
        ShardsDir.open(location("out"))
    with pytest.raises(UserError, match="files jbert did not write"):
        ShardsDir.open(location("out"), overwrite=True)
    assert Store(location("out")).files() == ["notes.txt"]
    with pytest.raises(UserError, match="exclude"):
        ShardsDir.open(location("new"), overwrite=True, resume=True)


def test_overwrite_clears_only_a_folder_we_made(location):
    shards = ShardsDir.open(location("out"))
    shards.write_lines("rejects/part-a.jsonl", ["{}"])
    shards.publish({"documents": 0})
    shards.close()
    ShardsDir.open(location("out"), overwrite=True).close()
    # The staging area is a folder without files; the marker stays (and, locally, the lock file).
    assert set(Store(location("out")).files()) - {".jbert_lock"} == {".jbert_output"}


def test_a_missing_bucket_is_one_line_before_anything_is_written(s3_endpoint):
    uri = f"s3://no-such-bucket-x/shards?endpoint_override={s3_endpoint}&scheme=http"
    with pytest.raises(UserError, match=r"^cannot write to output s3://no-such-bucket-x/shards.*not found") as error:
        ShardsDir.check(uri)
    assert "\n" not in str(error.value)


def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_it(tmp_path):
    first = ShardsDir.open(tmp_path / "out")
    with pytest.raises(UserError, match="another `jbert preprocess` run"):
        ShardsDir.open(tmp_path / "out", resume=True)
    first.close()
    ShardsDir.open(tmp_path / "out", resume=True).close()


def test_recover_drops_unfinished_files_and_undoes_a_half_publish(location):
    shards = ShardsDir.open(location("out"))
    table = pa.table({"n_tokens": pa.array([3], pa.int32())})
    done = shards.write_table("train/part-a.parquet", table)
    shards.commit("a", {"ranges": {"f": [[1, 10]]}, "files": [done], "counts": _counts(1)})
    shards.write_table("train/part-b.parquet", table)  # killed before its done record
    shards.staged.write_bytes("train/part-c.parquet.tmp", b"half")
    shards.store.move(".staging/train", "train")  # killed mid-publish
    shards.close()

    shards = ShardsDir.open(location("out"), resume=True)
    assert shards.recover() == {"f": [(1, 10)]}
    assert shards.staged.files("train") == ["train/part-a.parquet"]
    assert not shards.complete
    shards.publish({"documents": 1})
    assert shards.complete and shards.store.read_json(MANIFEST) == {"documents": 1}
    assert shards.store.files("train") == ["train/part-a.parquet"] and not shards.staged.exists()
    shards.close()


def test_resume_with_other_settings_is_refused(location):
    shards = ShardsDir.open(location("out"))
    shards.check_run_config({"max_seq_len": 128})
    shards.check_run_config({"max_seq_len": 128})
    with pytest.raises(UserError, match="max_seq_len: 128 → 256"):
        shards.check_run_config({"max_seq_len": 256})
    shards.close()


def test_a_worker_of_an_earlier_run_commits_nothing(location, tmp_path, tokenizer_dir):
    from dataclasses import asdict

    import numpy as np

    from jbert_ray.preprocess import PreprocessConfig, ShardWriter
    from jbert_ray.tokenizer import JapaneseTokenizer, installed_dictionary

    shards = ShardsDir.open(location("out"))
    tokenizer = location("tokenizer")
    Store(tokenizer).upload(tokenizer_dir)  # a remote one is fetched by the worker itself
    config = PreprocessConfig(input="c.jsonl", tokenizer_dir=tokenizer, output_dir=str(shards.root))
    dictionary = installed_dictionary(JapaneseTokenizer.from_pretrained(tokenizer_dir).mecab_dic)
    other = {**dictionary, "version": "0.9", "package": "unidic-lite==0.0.1"}  # what another node could have
    with pytest.raises(UserError, match=r"has MeCab dictionary unidic_lite \S+ .* but the driver unidic_lite 0.9"):
        ShardWriter(asdict(config), str(tmp_path), shards.start_run(), other)
    writer = ShardWriter(asdict(config), str(tmp_path), shards.start_run(), dictionary)
    texts = ["東京は日本の首都です。大阪は大きな都市です。", "   "]
    batch = {
        "record_id": np.array([f"{tmp_path}/c.jsonl:{i}" for i in (1, 2)], dtype=object),
        "text": np.array(texts, dtype=object),
        "reject": np.array(["", ""], dtype=object),
        "path": np.array(["c.jsonl"] * 2, dtype=object),
        "line": np.array([1, 2]),
    }
    assert writer(batch)["records_rejected"][0] == 1
    (record,) = shards.done_records()
    assert record["ranges"] == {"c.jsonl": [[1, 2]]} and record["counts"]["splits"]["train"]["documents"] == 1
    shards.start_run()  # a resumed run took over the output
    batch["line"] = np.array([3, 4])
    with pytest.raises(RuntimeError, match="another run"):
        writer(batch)
    assert len(list(shards.done_records())) == 1
    assert shards.prune() == {"c.jsonl": [(1, 2)]}  # and its files are dropped
    assert shards.staged.files("rejects") == [f"rejects/part-{record['key']}.jsonl"]
    shards.close()


def _counts(sequences: int, rejected: int = 0) -> dict:
    return {"records_rejected": rejected, "splits": {"train": {"sequences": sequences}}}


def _batch(shards: ShardsDir, key: str, lines: list[int], rows: int = 2) -> None:
    table = pa.table({"n_tokens": pa.array([5] * rows, pa.int32())})
    done = shards.write_table(f"train/part-{key}.parquet", table)
    shards.commit(key, {"ranges": {"f": [lines]}, "files": [done], "counts": _counts(rows)})


def test_a_publish_cut_while_deleting_the_staged_copy_loses_nothing(location):
    """Object stores publish by copy, then delete: a crash part-way through the delete left a partial staged copy,
    which the next run published over the complete one."""
    shards = ShardsDir.open(location("out"))
    for i, key in enumerate("abcd"):
        _batch(shards, key, [10 * i + 1, 10 * i + 10])
    for name in shards.staged.files("train"):  # the copy of publish's move
        shards.store.write_bytes(name, shards.staged.read_bytes(name))
    for name in shards.staged.files("train")[:2]:  # the delete, cut short
        shards.staged.delete(name)
    shards.close()

    shards = ShardsDir.open(location("out"), resume=True)
    assert shards.recover() == {"f": [(1, 40)]}
    shards.publish({"documents": 4})
    assert shards.store.files("train") == [f"train/part-{key}.parquet" for key in "abcd"]
    shards.close()


def test_a_batch_whose_file_was_lost_is_redone_and_never_published(location):
    shards = ShardsDir.open(location("out"))
    _batch(shards, "a", [1, 10])
    _batch(shards, "b", [11, 20])
    shards.staged.write_parquet("train/part-b.parquet", pa.table({"n_tokens": pa.array([5], pa.int32())}))
    with pytest.raises(UserError, match="1 finished batches .* lost files.*--resume"):
        shards.publish({"documents": 2})
    assert not shards.complete
    shards.close()

    shards = ShardsDir.open(location("out"), resume=True)
    assert shards.recover() == {"f": [(1, 10)]}  # lines 11-20 are read again
    assert shards.staged.files("train") == ["train/part-a.parquet"]
    shards.close()


@pytest.mark.parametrize("op", ["open_output", "move", "copy", "delete_dir", "delete_file"])
def test_a_crash_at_any_step_of_publishing_loses_no_batch(location, op):
    from tests.faulty_fs import Fault, faulty_filesystem

    for nth in range(1, 60):
        root = location(f"out-{op}-{nth}")
        shards = ShardsDir.open(root)
        for i, key in enumerate("abc"):
            _batch(shards, key, [10 * i + 1, 10 * i + 10])
        crashing, counts = ShardsDir(root), tempfile.mkdtemp()
        for store in (crashing.store, crashing.staged):  # the same dir through a filesystem whose nth call fails
            faulty = faulty_filesystem(Fault(op, "*", nth=nth), base=store.filesystem, state_dir=counts)
            store.__dict__["_opened"] = (faulty, store.path)
        try:
            crashing.publish({"documents": 3})
            crashed = False
        except OSError:
            crashed = True
            shards.close()
            shards = ShardsDir.open(root, resume=True)  # the next run
            assert shards.recover() == {"f": [(1, 30)]}, f"{op} #{nth}"
            shards.publish({"documents": 3})
        assert shards.complete and shards.store.files("train") == [f"train/part-{k}.parquet" for k in "abc"]
        shards.close()
        if not crashed:  # every step of publish has been cut once
            break
