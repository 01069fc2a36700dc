"""`jbert preprocess` on a real local Ray (2 CPUs) and the bundled Japanese sample: shards decode back to the
normalized text, tokens add up exactly, planted bad records are all accounted for, a killed run resumes
without duplicated or missing documents, and a tokenizer and an output in an S3 bucket (a local S3 server) give
the same shards as local ones."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from jbert_ray.cli import main
from jbert_ray.cli.data import PADDING_WARNING
from jbert_ray.errors import UserError
from jbert_ray.preprocess import PreprocessConfig, run_preprocess
from jbert_ray.shards import inspect_shards
from jbert_ray.storage import Store
from jbert_ray.text import clean_text, split_sentences
from jbert_ray.tokenizer import JapaneseTokenizer
from tests.conftest import wait_for_group_exit

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, texts) -> Path:
    path.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8"
    )
    return path


def read_split(shards: Path | str, split: str = "train") -> list[dict]:
    """The rows of a split, from a local folder or a URI."""
    store = Store(shards).child(split)
    return pads.dataset(store.path, filesystem=store.filesystem, format="parquet").to_table().to_pylist()


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    """Where outputs go: a function of a relative name giving a local path or an s3:// URI."""
    if request.param == "s3":
        return request.getfixturevalue("s3_bucket")
    return lambda name: str(tmp_path / name)


def config(corpus, tokenizer_dir, out, **overrides) -> PreprocessConfig:
    """One document per row unless overridden: these tests find each document by its rows' doc_id."""
    values = {"input": str(corpus), "tokenizer_dir": str(tokenizer_dir), "output_dir": str(out)}
    values["show_progress"], values["pack_across_docs"] = False, False
    return PreprocessConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return JapaneseTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def sample_run(ray_cluster, tmp_path_factory, tokenizer_dir, sample_texts):
    """1,500 real records, 20% valid, short rows so that sentences get split: run once, shared by tests."""
    root = tmp_path_factory.mktemp("sample_run")
    texts = sample_texts[:1500]
    corpus = write_jsonl(root / "ja.jsonl", texts)
    out = root / "shards"
    manifest = run_preprocess(
        config(corpus, tokenizer_dir, out, max_seq_len=32, valid_fraction=0.2, batch_size=256)
    )
    return texts, out, manifest


def test_shards_have_the_contract_schema_and_manifest(sample_run, tokenizer_dir):
    _, out, manifest = sample_run
    table = pads.dataset(out / "train", format="parquet").to_table()
    assert str(table.schema.field("input_ids").type) == "list<element: int32>"
    assert str(table.schema.field("word_start").type) == "list<element: bool>"
    assert str(table.schema.field("n_tokens").type) == "int32"
    assert json.loads((out / "manifest.json").read_text()) == manifest
    for key in ("records_read", "records_kept", "records_rejected", "rejects_by_reason", "documents", "sentences",
                "sequences", "tokens", "tokenizer_sha256", "config", "padding_waste", "splits"):  # fmt: skip
        assert key in manifest
    assert manifest["config"]["max_seq_len"] == 32
    assert manifest["mecab_dictionary"]["name"] == "unidic_lite"  # every node's actors checked theirs against it
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == sorted(
        ["vocab.txt", "tokenizer_config.json", "special_tokens_map.json"]
    )
    assert (out / "tokenizer" / "vocab.txt").read_bytes() == (tokenizer_dir / "vocab.txt").read_bytes()
    assert not (out / ".staging").exists()


def test_token_accounting_is_exact(sample_run):
    texts, out, manifest = sample_run
    total_tokens = total_rows = 0
    for split in ("train", "valid"):
        rows = read_split(out, split)
        tokens = sum(r["n_tokens"] for r in rows)
        assert tokens == sum(len(r["input_ids"]) for r in rows) == manifest["splits"][split]["tokens"]
        assert len(rows) == manifest["splits"][split]["sequences"]
        assert all(
            2 < len(r["input_ids"]) <= 32 and len(r["word_start"]) == len(r["input_ids"]) for r in rows
        )
        total_tokens, total_rows = total_tokens + tokens, total_rows + len(rows)
    assert (total_tokens, total_rows) == (manifest["tokens"], manifest["sequences"])
    assert manifest["records_read"] == len(texts) == manifest["records_kept"] + manifest["records_rejected"]
    assert manifest["sentences_split"] > 0  # 30-token rows force long sentences into pieces
    assert manifest["padding_waste"] == pytest.approx(1 - total_tokens / (total_rows * 32), abs=1e-4)


def test_shards_decode_back_to_the_normalized_text(sample_run, tok):
    texts, out, _ = sample_run
    by_doc: dict[str, list] = {}
    for split in ("train", "valid"):
        for row in read_split(out, split):
            by_doc.setdefault(row["doc_id"], []).append((row["seq_index"], row["input_ids"], split))
    assert len({s for rows in by_doc.values() for _, _, s in rows}) == 2
    assert all(len({s for _, _, s in rows}) == 1 for rows in by_doc.values())  # split by document
    compared = 0
    for line, raw in enumerate(texts, start=1):
        rows = sorted(by_doc.pop(f"ja.jsonl:{line}"))
        assert [i for i, _, _ in rows] == list(range(len(rows)))  # no row missing or duplicated
        ids = [i for _, row, _ in rows for i in row if i not in (tok.cls_token_id, tok.sep_token_id)]
        normalized, _ = clean_text(raw)
        sentences = split_sentences(normalized)
        assert ids == [i for e in tok.encode_batch(sentences, add_special_tokens=False) for i in e.ids]
        if tok.unk_token_id not in ids:  # [UNK] cannot give its character back
            decoded = "".join(tok.decode(row) for _, row, _ in rows)
            assert decoded == "".join(normalized.split())  # MeCab drops spaces: compare without them
            compared += 1
    assert not by_doc and compared > 1000


def test_a_bucket_gives_the_same_shards_as_a_local_dir(sample_run, tokenizer_dir, s3_bucket, capsys):
    _, local_out, local = sample_run
    tokenizer, out = s3_bucket("tokenizer"), s3_bucket("runs/shards")
    Store(tokenizer).upload(tokenizer_dir)
    corpus = local_out.parent / "ja.jsonl"
    assert main(["preprocess", "--input", str(corpus), "--tokenizer", tokenizer, "--out", out, "--no-progress",
                 "--max-seq-len", "32", "--valid-fraction", "0.2", "--batch-size", "256",
                 "--no-pack-across-docs"]) == 0  # fmt: skip
    manifest = Store(out).read_json("manifest.json")
    counted = ("records_read", "records_kept", "documents", "sentences", "sequences", "tokens", "splits")
    assert {k: manifest[k] for k in counted} == {k: local[k] for k in counted}
    assert manifest["tokenizer_sha256"] == local["tokenizer_sha256"]
    assert not Store(out).child(".staging").files()
    for split in ("train", "valid"):
        rows = read_split(out, split)
        assert len(rows) == manifest["splits"][split]["sequences"] > 0
        assert sorted(r["doc_id"] for r in rows) == sorted(r["doc_id"] for r in read_split(local_out, split))
    info, local_info = inspect_shards(out), inspect_shards(local_out)
    assert (info.train_rows, info.valid_rows) == (local_info.train_rows, local_info.valid_rows)
    assert (info.train_rows, info.valid_rows) == (local["splits"]["train"]["sequences"],
                                                  local["splits"]["valid"]["sequences"])  # fmt: skip
    assert [Path(f).name for f in info.train_files] == [Path(f).name for f in local_info.train_files]
    assert info.tokenizer_sha256 == local["tokenizer_sha256"] and str(info.tokenizer_dir).startswith("s3://")
    dataset = ray_data_read(info.train_files, info.filesystem)  # as pretraining reads them
    assert dataset.count() == info.train_rows
    assert "→ s3://" in capsys.readouterr().out


def ray_data_read(paths: list[str], filesystem):
    import ray.data

    return ray.data.read_parquet(paths, filesystem=filesystem, columns=["input_ids", "word_start"])


def test_a_missing_bucket_or_unreadable_tokenizer_is_one_line_before_ray_work(
    ray_cluster, tokenizer_dir, s3_endpoint, s3_bucket, tmp_path, capsys
):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["日本語の文です。"])
    missing = f"s3://no-such-bucket-y/shards?endpoint_override={s3_endpoint}&scheme=http"
    args = ["preprocess", "--input", str(corpus), "--no-progress"]
    assert main([*args, "--tokenizer", str(tokenizer_dir), "--out", missing]) == 2
    assert main([*args, "--tokenizer", s3_bucket("no-tokenizer"), "--out", s3_bucket("out")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "Traceback" not in errors[0]
    assert "cannot write to output s3://no-such-bucket-y/shards" in errors[0], errors
    assert "Bucket 'no-such-bucket-y' not found" in errors[0], errors
    assert "cannot read s3://" in errors[1] and "no-tokenizer" in errors[1], errors
    assert not Store(s3_bucket("out")).files()


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory, sample_texts) -> tuple[Path, Counter, dict]:
    """Good records with planted bad ones; returns (folder, expected rejects by reason, true record counts)."""
    root = tmp_path_factory.mktemp("bad_corpus")
    good = sample_texts[:200]
    lines = [json.dumps({"text": t}, ensure_ascii=False).encode() for t in good]
    planted = {
        "invalid_utf8": b'{"text": "\xff\xfe\xe6\x97"}',
        "invalid_json": '{"text": "閉じていない'.encode(),
        "missing_field": json.dumps({"body": "本文です。"}, ensure_ascii=False).encode(),
        "not_text": b'{"text": 42}',
        "invalid_unicode": b'{"text": "\\ud800\xe5\xa3\x8a\xe3\x82\x8c\xe3\x81\x9f"}',  # a lone surrogate escape
        "empty": b'{"text": "   "}',
        "no_japanese": b'{"text": "This record is only English text."}',
        # a 5 MB single line (1.75M characters, over the 1M-character limit)
        "too_long": json.dumps({"text": "長い文章です。" * 250_000}, ensure_ascii=False).encode(),
    }
    nul_kept = json.dumps({"text": "NUL\u0000を含むが日本語の文です。"}, ensure_ascii=False).encode()
    nul_only = json.dumps({"text": "\u0000" * 5}).encode()
    body = lines[:100] + list(planted.values()) + [nul_kept, nul_only] + lines[100:]
    (root / "a.jsonl").write_bytes(b"\n".join(body) + b"\n")
    (root / "b.txt").write_text("テキストの一行目です。\n\nEnglish only\n二行目です。\n", encoding="utf-8")
    (root / "c.txt").write_bytes(np.random.default_rng(0).bytes(20_000))  # a binary file given as corpus
    truncated = gzip.compress("\n".join(json.dumps({"text": t}) for t in good[:50]).encode())
    (root / "d.jsonl.gz").write_bytes(truncated[: len(truncated) // 2])  # a corrupt .gz
    expected = Counter({reason: 1 for reason in planted})
    # binary: the NUL-only record and c.txt; empty and no_japanese: also in b.txt; unreadable: d.jsonl.gz
    expected.update({"binary": 2, "empty": 1, "no_japanese": 1, "unreadable": 1})
    # Counted from what was written: every line of a.jsonl and b.txt, c.txt as one record, and one record for
    # the .gz, which breaks before its first 1 MiB chunk is decoded; kept: the good lines, the NUL record, 2 of b.
    counts = {"records_read": len(body) + 4 + 1 + 1, "records_kept": len(good) + 1 + 2}
    return root, expected, counts


def test_planted_bad_records_are_counted_and_kept_in_rejects(
    ray_cluster, bad_corpus, tokenizer_dir, tmp_path
):
    corpus, expected, counts = bad_corpus
    out = tmp_path / "shards"
    assert main(["preprocess", "--input", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(out),
                 "--no-progress", "--batch-size", "64", "--no-pack-across-docs"]) == 0  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rejects_by_reason"] == dict(expected)
    assert {key: manifest[key] for key in counts} == counts
    assert manifest["records_read"] == manifest["records_kept"] + manifest["records_rejected"]
    assert manifest["records_kept"] == manifest["documents"]
    rejects = [json.loads(line) for f in sorted((out / "rejects").glob("*.jsonl")) for line in f.open()]
    assert Counter(r["reason"] for r in rejects) == expected
    assert all(set(r) == {"record_id", "reason", "record"} and len(r["record"]) <= 2000 for r in rejects)
    assert {r["record_id"] for r in rejects if r["reason"] == "binary"} >= {"c.txt:1"}
    docs = {row["doc_id"]: row for row in read_split(out)}
    assert "a.jsonl:109" in docs  # the record with an escaped NUL is kept, the NUL turned into a space
    assert docs["b.txt:1"] and "b.txt:2" not in docs
    assert {r["record_id"] for r in rejects if r["reason"] == "unreadable"} == {"d.jsonl.gz:1"}


def test_refusals_are_one_clear_line(ray_cluster, tokenizer_dir, tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["日本語の文です。"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("not ours")
    args = ["preprocess", "--input", str(corpus), "--out", str(tmp_path / "out"), "--no-progress"]
    assert main([*args, "--tokenizer", str(tmp_path)]) == 2
    assert main([*args, "--tokenizer", str(tokenizer_dir)]) == 2
    assert main([*args, "--tokenizer", str(tokenizer_dir), "--overwrite"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and "not a tokenizer directory" in errors[0]
    assert "not empty" in errors[1] and "jbert did not write" in errors[2]
    assert (tmp_path / "out" / "keep.txt").exists()


def test_rows_are_filled_across_documents_by_default(ray_cluster, tokenizer_dir, sample_texts, tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "ja.jsonl", sample_texts[:400])  # one paragraph per record, like ja_train
    args = ["preprocess", "--input", str(corpus), "--tokenizer", str(tokenizer_dir), "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "default")]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "per_doc"), "--no-pack-across-docs"]) == 0
    warning = capsys.readouterr().err.strip()
    assert "of every training batch will be padding; use --pack-across-docs" in warning
    across, per_doc = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("default", "per_doc"))
    assert across["sentence_tokens"] == per_doc["sentence_tokens"]
    assert across["sequences"] < per_doc["sequences"] / 3
    assert across["padding_waste"] <= 0.15 < PADDING_WARNING < per_doc["padding_waste"]


def test_removed_static_masking_flag_is_one_clear_line(tokenizer_dir, tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "ja.jsonl", ["東京は日本の首都です。"])
    argv = ["preprocess", "--input", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "o"),
            "--static-masking", "2"]  # fmt: skip
    assert main(argv) == 2
    assert "--static-masking was removed" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_killed_run_resumes_without_duplicated_or_missing_documents(
    ray_cluster, tokenizer_dir, sample_texts, tmp_path, location
):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for part in range(3):
        write_jsonl(corpus / f"part{part}.jsonl", sample_texts[part * 2000 : (part + 1) * 2000])
    out = location("shards")
    args = [
        "--input",
        str(corpus),
        "--tokenizer",
        str(tokenizer_dir),
        "--out",
        out,
        "--batch-size",
        "100",
        "--no-pack-across-docs",
    ]
    # Our own child (and the local Ray it starts) in a fresh process group, so only it is killed.
    log = (tmp_path / "child.log").open("w")
    child = subprocess.Popen(
        [sys.executable, "-m", "jobs.preprocess", *args, "--no-progress", "--num-cpus", "2"],
        cwd=REPO, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    store = Store(out)

    def done_records() -> int:
        return sum(name.endswith(".json") for name in store.files(".staging/done"))

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None and done_records() < 5:
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    wait_for_group_exit(child.pid)
    log.close()
    assert not store.exists("manifest.json")  # killed mid-way: the output does not look complete
    before = done_records()
    assert 5 <= before < 60, (tmp_path / "child.log").read_text()[-3000:]

    assert main(["preprocess", *args, "--no-progress"]) == 2  # not empty: refuses without --resume
    with pytest.raises(UserError, match="settings differ"):
        run_preprocess(config(corpus, tokenizer_dir, out, batch_size=100, resume=True, max_seq_len=64))
    manifest = run_preprocess(config(corpus, tokenizer_dir, out, batch_size=100, resume=True))
    assert manifest["resumed"] and manifest["records_read"] == 6000
    rows = read_split(out)
    keys = [(r["doc_id"], r["seq_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == manifest["sequences"]  # nothing written twice
    expected = {f"part{p}.jsonl:{n}" for p in range(3) for n in range(1, 2001)}
    assert {r["doc_id"] for r in rows} == expected  # nothing missing (no sample record is rejected)
    assert sum(r["n_tokens"] for r in rows) == manifest["tokens"]

    again = run_preprocess(config(corpus, tokenizer_dir, out, batch_size=100, resume=True))
    assert again["already_complete"] and again["tokens"] == manifest["tokens"]

    fresh = run_preprocess(config(corpus, tokenizer_dir, tmp_path / "fresh", batch_size=100))
    assert {k: fresh[k] for k in ("documents", "sentences", "sequences", "tokens")} == {
        k: manifest[k] for k in ("documents", "sentences", "sequences", "tokens")
    }


def test_output_to_a_file_is_plain_lines_without_ray_logs(tokenizer_dir, sample_texts, tmp_path):
    """`jbert preprocess > log` as a user runs it (its own local Ray, progress on): no escape codes, no Ray logs."""
    corpus = write_jsonl(tmp_path / "ja.jsonl", sample_texts[:2000])
    with open(tmp_path / "log", "w") as log:
        result = subprocess.run(
            [sys.executable, "-m", "jbert_ray.cli", "preprocess", "--input", str(corpus), "--tokenizer",
             str(tokenizer_dir), "--out", str(tmp_path / "shards"), "--num-cpus", "2"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, timeout=300, check=False,
        )  # fmt: skip
    output = (tmp_path / "log").read_text()
    assert result.returncode == 0, output[-2000:]
    assert "\x1b[" not in output and "(raylet)" not in output and " INFO " not in output, output[-2000:]
    assert output.splitlines()[-1].startswith("preprocess: read 2,000 records")
