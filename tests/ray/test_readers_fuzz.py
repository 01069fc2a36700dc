"""The corpus readers on a local Ray, fuzzed: any jsonl/txt bytes and any parquet text column give one row per
record (counted here from what was written, not from our counters), each kept or rejected with a known reason."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jbert_ray import text as T
from jbert_ray.corpus import read_corpus

pytestmark = pytest.mark.ray

REASONS = {"", T.REJECT_INVALID_UTF8, T.REJECT_INVALID_JSON, T.REJECT_MISSING_FIELD, T.REJECT_NOT_TEXT,
           T.REJECT_INVALID_UNICODE, T.REJECT_BINARY}  # fmt: skip
ANY_TEXT = st.text(st.characters() | st.characters(categories=["Cs"]))  # lone surrogates included
JAPANESE = st.text(st.sampled_from("東京は日本の首都です。猫が好き\u3000ｶﾀｶﾅ"), min_size=1, max_size=40)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT | JAPANESE,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["text", "id"]) | ANY_TEXT, inner),
    max_leaves=8,
)
LINES = (
    st.builds(lambda v, ascii_only: json.dumps(v, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"),
              JSON_VALUES, st.booleans())
    | JAPANESE.map(lambda t: json.dumps({"text": t}, ensure_ascii=False).encode())
    | st.binary(max_size=60)
).map(lambda line: line.replace(b"\n", b" "))  # fmt: skip
FUZZ = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))


def read_rows(path) -> list[dict]:
    return read_corpus(str(path)).take_all()


@given(lines=st.lists(LINES, max_size=25), fmt=st.sampled_from(["jsonl", "txt"]), crlf=st.booleans())
@FUZZ
def test_any_line_file_gives_one_row_per_line(ray_cluster, tmp_path_factory, lines, fmt, crlf):
    path = tmp_path_factory.mktemp("fuzz") / f"corpus.{fmt}"
    path.write_bytes(b"".join(line + (b"\r\n" if crlf else b"\n") for line in lines))
    rows = read_rows(path)
    assert {row["reject"] for row in rows} <= REASONS
    if rows and rows[0]["reject"] == T.REJECT_BINARY:  # mostly non-text bytes: the file is one rejected record
        assert len(rows) == 1
    else:
        assert len(rows) == len(lines)
    for row in rows:
        row["text"].encode("utf-8")  # kept or not, what we pass on is valid UTF-8 (Arrow, parquet, MeCab)


TEXT_CELLS = st.lists(st.none() | JAPANESE | st.text() | st.binary(max_size=30), min_size=1, max_size=30)


@given(cells=TEXT_CELLS, column_type=st.sampled_from(["string", "large_string", "binary"]))
@FUZZ
def test_any_parquet_text_column_gives_one_row_per_record(ray_cluster, tmp_path_factory, cells, column_type):
    raw = [cell.encode("utf-8", "surrogatepass") if isinstance(cell, str) else cell for cell in cells]
    # Parquet writers need not check UTF-8: invalid bytes in a string column are what other tools can produce.
    binary = pa.array(raw, pa.large_binary() if column_type == "large_string" else pa.binary())
    column = binary if column_type == "binary" else binary.view(getattr(pa, column_type)())
    path = tmp_path_factory.mktemp("fuzz") / "corpus.parquet"
    pq.write_table(pa.table({"text": column, "n": list(range(len(cells)))}), path, row_group_size=7)
    rows = read_rows(path)
    assert len(rows) == len(cells)
    for row, cell in zip(rows, raw):
        if cell is None:
            assert row["reject"] == T.REJECT_NOT_TEXT
        elif row["reject"] == "":
            assert row["text"].encode() == cell
        else:
            assert row["reject"] == T.REJECT_INVALID_UTF8
            with pytest.raises(UnicodeDecodeError):
                cell.decode("utf-8")


def test_an_integer_text_column_is_rejected_record_by_record(ray_cluster, tmp_path):
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "numbers.parquet")
    assert [row["reject"] for row in read_rows(tmp_path / "numbers.parquet")] == [T.REJECT_NOT_TEXT] * 3
