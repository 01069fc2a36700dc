"""Store: the same reads and writes on a local path and on the local S3 server; clear errors; the node cache."""

import json
import time

import pytest

from jbert_ray.errors import UserError
from jbert_ray.storage import Store, endpoint_uri, local_copy


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, s3_bucket) -> Store:
    return Store(tmp_path / "out" if request.param == "local" else s3_bucket("out"))


def test_write_read_list_move_and_delete(store):
    store.check_writable()
    store.write_json("a/meta.json", {"文": "東京は日本の首都です。"})
    store.write_text("a/b/lines.txt", "猫\n犬\n")
    assert store.read_json("a/meta.json") == {"文": "東京は日本の首都です。"}
    assert store.read_json("missing.json", default={}) == {}
    assert store.files() == ["a/b/lines.txt", "a/meta.json"]  # no temporary file left behind
    store.move("a", "c")
    assert store.files() == ["c/b/lines.txt", "c/meta.json"] and not store.exists("a")
    assert store.child("c").read_text("b/lines.txt") == "猫\n犬\n"
    store.delete("c/b")
    assert store.files() == ["c/meta.json"]


def test_upload_then_download_round_trips_a_directory(store, tmp_path):
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "vocab.txt").write_text("[PAD]\n[UNK]\n東京\n", encoding="utf-8")
    (source / "sub" / "config.json").write_text(json.dumps({"vocab_size": 3}))
    store.upload(source, "tokenizer")
    assert store.files("tokenizer") == ["tokenizer/sub/config.json", "tokenizer/vocab.txt"]
    store.download("tokenizer", tmp_path / "back")
    assert (tmp_path / "back" / "vocab.txt").read_text(encoding="utf-8") == "[PAD]\n[UNK]\n東京\n"


def test_a_missing_bucket_is_one_clear_line(s3_endpoint):
    with pytest.raises(UserError, match=r"^cannot write to output s3://no-such-bucket/x.*Bucket 'no-such-bucket' not found") as error:
        Store(f"s3://no-such-bucket/x?endpoint_override={s3_endpoint}&scheme=http").check_writable()
    assert "\n" not in str(error.value)


def test_an_unreachable_endpoint_is_one_clear_line():
    with pytest.raises(UserError, match="cannot read model s3://bucket/m.*connect") as error:
        Store("s3://bucket/m?endpoint_override=127.0.0.1:9&scheme=http").check_readable("model")
    assert "\n" not in str(error.value)


def test_aws_endpoint_url_is_passed_on_to_pyarrow(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert endpoint_uri("s3://b/k") == "s3://b/k?endpoint_override=127.0.0.1%3A9000&scheme=http"
    assert endpoint_uri("s3://b/k?endpoint_override=h:1") == "s3://b/k?endpoint_override=h:1"  # the URI wins
    assert endpoint_uri("gs://b/k") == "gs://b/k"


def test_a_remote_dir_is_fetched_once_per_node_and_again_when_it_changes(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("JBERT_CACHE_DIR", str(tmp_path / "cache"))
    remote = Store(s3_bucket("model"))
    remote.write_text("config.json", '{"hidden_size": 64}')
    first = local_copy(remote.location)
    assert (first / "config.json").read_text() == '{"hidden_size": 64}'
    (first / "config.json").write_text('{"hidden_size": 65}')  # same size: a second call uses the copy as it is
    assert local_copy(remote.location) == first and "65" in (first / "config.json").read_text()
    (first / "config.json").write_text("{}")  # cut short (a crash, a full disk): fetched again
    assert (local_copy(remote.location) / "config.json").read_text() == '{"hidden_size": 64}'
    remote.write_text("config.json", '{"hidden_size": 128}')
    changed = local_copy(remote.location)
    assert changed != first and (changed / "config.json").read_text() == '{"hidden_size": 128}'
    assert local_copy(tmp_path) == tmp_path  # a local dir is used in place


def _faulty(store: Store, fault) -> Store:
    """The same store through a filesystem whose chosen call fails (a crash at that step)."""
    from tests.faulty_fs import faulty_filesystem

    crashing = Store(store.location)
    crashing.__dict__["_opened"] = (faulty_filesystem(fault, base=store.filesystem), store.path)
    return crashing


def _tree(store: Store, relative: str) -> dict[str, bytes]:
    return {name[len(relative) + 1 :]: store.read_bytes(name) for name in store.files(relative)}


@pytest.mark.parametrize("op", ["open_output", "move", "copy", "delete_dir", "delete_file"])
def test_a_crash_at_any_step_of_replacing_a_dir_leaves_the_old_or_the_new_copy_whole(store, tmp_path, op):
    from tests.faulty_fs import Fault

    old, new = tmp_path / "old", tmp_path / "new"
    for folder, text in ((old, "古いモデル"), (new, "新しいモデル")):
        (folder / "sub").mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"name": text}, ensure_ascii=False))
        (folder / "sub" / "weights.bin").write_bytes(text.encode() * 1000)
    want_old = {p: (old / p).read_bytes() for p in ("config.json", "sub/weights.bin")}
    want_new = {p: (new / p).read_bytes() for p in ("config.json", "sub/weights.bin")}
    crashes = 0
    for nth in range(1, 40):
        run = store.child(f"run-{op}-{nth}")
        run.upload(old, "model")
        try:
            _faulty(run, Fault(op, "*", nth=nth)).replace_dir(new, "model")
        except OSError:
            crashes += 1
        else:
            assert _tree(run, "model") == want_new
            break
        run.recover_dir("model")  # the next run, or the next export, starts with this
        assert _tree(run, "model") in (want_old, want_new), f"{op} #{nth}"
        assert run.files() == sorted(f"model/{p}" for p in want_old)  # no .new/.old copy or marker left
        run.replace_dir(new, "model")
        assert _tree(run, "model") == want_new
    assert crashes or op == "copy"  # every op but a remote copy is on the local path too


def test_a_bucket_key_that_climbs_out_of_the_cache_is_refused(s3_bucket, s3_endpoint, tmp_path, monkeypatch):
    import boto3

    monkeypatch.setenv("JBERT_CACHE_DIR", str(tmp_path / "cache"))
    remote = Store(s3_bucket("model"))
    remote.write_text("config.json", '{"hidden_size": 64}')
    bucket = remote.path.split("/")[0]
    client = boto3.client("s3", endpoint_url=f"http://{s3_endpoint}", region_name="us-east-1")
    client.put_object(Bucket=bucket, Key="model/../../../escaped.txt", Body=b"not yours")  # a hostile bucket
    with pytest.raises(UserError, match=r"unsafe file name '\.\./\.\./\.\./escaped\.txt'"):
        local_copy(remote.location)
    assert not list(tmp_path.rglob("escaped.txt"))


def test_the_cache_is_private_and_evicts_the_least_recently_used_copy(s3_bucket, tmp_path, monkeypatch):
    import os
    import stat

    monkeypatch.setenv("JBERT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("JBERT_CACHE_MAX_GB", str(2.5e-6))  # 2,500 bytes: room for two 1,000-byte copies
    copies = []
    for name in ("a", "b", "c"):
        remote = Store(s3_bucket(f"models/{name}"))
        remote.write_bytes("model.safetensors", name.encode() * 1000)
        copies.append(local_copy(remote.location))
        time.sleep(0.05)  # distinct modification times: the order of use
    assert stat.S_IMODE(os.stat(tmp_path / "cache").st_mode) == 0o700
    assert [c.exists() for c in copies] == [False, True, True]  # a went first


def test_bytes_are_stored_as_given_whatever_the_file_name(store):
    import gzip

    data = gzip.compress("東京は日本の首都です。\n".encode())
    store.write_bytes("corpus/a.jsonl.gz", data)  # pyarrow compresses by extension unless told not to
    assert store.read_bytes("corpus/a.jsonl.gz") == data
    with store.filesystem.open_input_file(store.full("corpus/a.jsonl.gz")) as f:
        assert f.read() == data
