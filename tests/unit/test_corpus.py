"""Corpus record parsing and path resolution (no Ray)."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jbert_ray import text as T
from jbert_ray.corpus import corpus_format, parse_line, resolve_paths
from jbert_ray.errors import UserError

LINE_CASES = [  # (line, format, expected (record id, text, reason))
    ('{"text": "東京は首都です。"}'.encode(), "jsonl", (None, "東京は首都です。", "")),
    ('{"text": "東京", "id": 7}'.encode(), "jsonl", ("7", "東京", "")),
    (b'{"text": "\xff\xfe broken"}', "jsonl", (None, '{"text": "\ufffd\ufffd broken"}', T.REJECT_INVALID_UTF8)),
    (b'{"text": "unterminated', "jsonl", (None, '{"text": "unterminated', T.REJECT_INVALID_JSON)),
    (b'{"body": "x"}', "jsonl", (None, '{"body": "x"}', T.REJECT_MISSING_FIELD)),
    (b'["text"]', "jsonl", (None, '["text"]', T.REJECT_MISSING_FIELD)),
    (b'{"text": 42}', "jsonl", (None, '{"text": 42}', T.REJECT_NOT_TEXT)),
    ("一行一文書".encode(), "txt", (None, "一行一文書", "")),
    # JSON allows a lone surrogate escape; the record is rejected whole, its line kept as written
    (b'{"text": "\\ud800\xe6\x97\xa5"}', "jsonl", (None, '{"text": "\\ud800日"}', T.REJECT_INVALID_UNICODE)),
    (b'{"text": "ok", "id": "\\udfff"}', "jsonl", (None, '{"text": "ok", "id": "\\udfff"}', T.REJECT_INVALID_UNICODE)),
]


@pytest.mark.parametrize("line, fmt, expected", LINE_CASES)
def test_parse_line(line, fmt, expected):
    assert parse_line(line, fmt, "text", "id") == expected


@pytest.mark.parametrize(
    "name, fmt",
    [("a.jsonl", "jsonl"), ("a.jsonl.gz", "jsonl"), ("a.json", "jsonl"), ("a.parquet", "parquet"),
     ("a.txt", "txt"), ("a.txt.bz2", "txt"), ("README", "txt")],
)
def test_corpus_format_from_file_name(name, fmt):
    assert corpus_format(name) == fmt


def test_resolve_folder_and_glob(tmp_path):
    for name in ["b.jsonl", "a.txt", "sub/c.jsonl.gz", ".hidden.jsonl", "_SUCCESS", "notes.md"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    files, _ = resolve_paths(str(tmp_path))
    assert [f.removeprefix(str(tmp_path)) for f in files] == ["/a.txt", "/b.jsonl", "/sub/c.jsonl.gz"]
    files, _ = resolve_paths(str(tmp_path / "*.jsonl"))
    assert [f.removeprefix(str(tmp_path)) for f in files] == ["/b.jsonl"]


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="corpus not found"):
        resolve_paths(str(tmp_path / "nope.jsonl"))


def test_folder_without_corpus_files_is_a_clear_error(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(UserError, match="no corpus files"):
        resolve_paths(str(tmp_path))


def test_estimate_rows_of_plain_gzip_and_parquet_corpora(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from jbert_ray.corpus import estimate_rows
    from tests.conftest import SAMPLE_PATH

    lines = SAMPLE_PATH.read_bytes().splitlines(keepends=True)[:3000]
    (tmp_path / "a.jsonl").write_bytes(b"".join(lines))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b"".join(lines)))
    pq.write_table(pa.table({"text": [line.decode() for line in lines]}), tmp_path / "c.parquet")
    for name in ("a.jsonl", "b.jsonl.gz", "c.parquet"):
        paths, filesystem = resolve_paths(str(tmp_path / name))
        assert 0.8 * 3000 <= estimate_rows(paths, filesystem) <= 1.2 * 3000, name


REASONS = {"", T.REJECT_INVALID_UTF8, T.REJECT_INVALID_JSON, T.REJECT_MISSING_FIELD, T.REJECT_NOT_TEXT,
           T.REJECT_INVALID_UNICODE}  # fmt: skip
ANY_TEXT = st.text(st.characters() | st.characters(categories=["Cs"]))  # lone surrogates included
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["text", "id", "x"]) | ANY_TEXT, inner),
    max_leaves=10,
)
JSON_LINES = st.builds(
    lambda value, ascii_only: json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"),
    JSON_VALUES, st.booleans(),
)


@given(line=st.binary(max_size=200).map(lambda b: b.replace(b"\n", b"")) | JSON_LINES,
       fmt=st.sampled_from(["jsonl", "txt"]))
@settings(deadline=None)
def test_any_line_parses_to_a_record_or_a_reason_and_never_raises(line, fmt):
    record_id, text, reason = parse_line(line, fmt, "text", "id")
    assert reason in REASONS
    if not reason:  # a kept record's text and id can be written as UTF-8 (Arrow, parquet, MeCab)
        text.encode("utf-8")
        assert record_id is None or record_id.encode("utf-8")


@given(text=st.text(), record_id=st.none() | st.integers() | st.text())
@settings(deadline=None)
def test_a_valid_jsonl_record_is_kept_exactly(text, record_id):
    line = json.dumps({"text": text, "id": record_id}, ensure_ascii=False).encode()
    assert parse_line(line, "jsonl", "text", "id") == (None if record_id is None else str(record_id), text, "")
