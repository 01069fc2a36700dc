"""Store: the same reads and writes on a local path and on the local S3 server; clear errors; the node cache."""

import json

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
    (first / "marker").write_text("kept")  # a second call uses the copy, it does not fetch again
    assert local_copy(remote.location) == first and (first / "marker").exists()
    remote.write_text("config.json", '{"hidden_size": 128}')
    changed = local_copy(remote.location)
    assert changed != first and (changed / "config.json").read_text() == '{"hidden_size": 128}'
    assert local_copy(tmp_path) == tmp_path  # a local dir is used in place
