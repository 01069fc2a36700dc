"""`jbert vocab` end to end on a local Ray: real Japanese text, planted bad records, clear errors, an output in an
S3 bucket (a local S3 server)."""

import gzip
import json
import re
import subprocess
import sys
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from jbert_ray.cli import main
from jbert_ray.corpus import REJECT_PREVIEW_CHARS
from jbert_ray.storage import Store, local_copy
from jbert_ray.text import clean_text
from jbert_ray.tokenizer import JapaneseTokenizer, build_tagger
from jbert_ray.vocab import BoundedCounts
from tests.conftest import REPO, read_sample

pytestmark = pytest.mark.ray
RAY_LOG_LINE = re.compile(r"^(\x1b\[\d+m)?\((pid=|raylet)")  # a line Ray forwarded from one of its processes

BAD_LINES = [  # (raw jsonl line, reason it must be rejected with)
    (b'{"text": "\xff\xfe\xfd"}', "invalid_utf8"),
    (b'{"text": "unterminated', "invalid_json"),
    (b'{"body": "no text field"}', "missing_field"),
    (b'{"text": ["a", "list"]}', "not_text"),
    (b'{"text": "   "}', "empty"),
    (b'{"text": "English only, no kana or kanji"}', "no_japanese"),
    (b'{"text": "\\u0000\\u0001\\u0002\\u0003\\u0004"}', "binary"),
]


@pytest.fixture(scope="module")
def planted_corpus(tmp_path_factory):
    """jsonl.gz with bad lines planted between real records, a .txt file and a parquet file."""
    root = tmp_path_factory.mktemp("corpus")
    texts = read_sample(1500)
    lines = [json.dumps({"text": t}, ensure_ascii=False).encode() for t in texts[:1000]]
    for i, (line, _) in enumerate(BAD_LINES):
        lines.insert(100 * (i + 1), line)
    (root / "part1.jsonl.gz").write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    (root / "part2.txt").write_text("\n".join(texts[1000:1300]) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"text": texts[1300:1500]}), root / "part3.parquet")
    return root


def test_vocab_counts_every_record_and_keeps_rejects(ray_cluster, planted_corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    assert main(["vocab", "--input", str(planted_corpus), "--out", str(out), "--vocab-size", "3000",
                 "--no-progress"]) == 0
    summary = json.loads((out / "vocab_summary.json").read_text())
    assert summary["records_read"] == 1500 + len(BAD_LINES)
    assert summary["records_kept"] + summary["records_rejected"] == summary["records_read"]
    assert summary["rejects_by_reason"] == {reason: 1 for _, reason in BAD_LINES}
    rejects = [json.loads(line) for line in (out / "rejects" / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in rejects) == sorted(reason for _, reason in BAD_LINES)
    assert all(r["record_id"].startswith(str(planted_corpus)) for r in rejects)
    assert summary["vocab_size"] == 3000
    printed = capsys.readouterr().out
    assert "read 1,507 records, kept 1,500, rejected 7" in printed and "vocab size 3,000" in printed


def test_trained_vocab_loads_in_transformers_and_matches_our_ids(ray_cluster, planted_corpus, tmp_path):
    out = tmp_path / "tok"
    main(["vocab", "--input", str(planted_corpus / "part2.txt"), "--out", str(out), "--vocab-size", "2000",
          "--no-progress"])
    reference = AutoTokenizer.from_pretrained(out)
    ours = JapaneseTokenizer.from_pretrained(out)
    texts = read_sample(1300)[1000:]
    assert type(reference).__name__ == "BertJapaneseTokenizer"
    assert [e.ids for e in ours.encode_batch(texts)] == reference(texts)["input_ids"]
    assert ours.unk_token_id not in ours.encode(texts[0]).ids  # trained on these very texts


def test_overwrite_replaces_only_an_earlier_vocab_output(ray_cluster, planted_corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "vocab.txt").write_text("mine\n")  # a folder we did not write: never deleted
    args = ["vocab", "--input", str(planted_corpus / "part2.txt"), "--out", str(out), "--no-progress"]
    assert main(args) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 2 and "jbert did not write" in capsys.readouterr().err
    assert (out / "vocab.txt").read_text() == "mine\n"
    out = tmp_path / "tok2"
    args = ["vocab", "--input", str(planted_corpus / "part2.txt"), "--out", str(out), "--no-progress"]
    assert main(args + ["--vocab-size", "1000"]) == 0
    first = (out / "vocab.txt").read_text()
    assert main(args) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--vocab-size", "800"]) == 0
    assert (out / "vocab.txt").read_text() != first


def test_driver_counts_stay_under_the_cap_and_keep_the_frequent_words(
    ray_cluster, planted_corpus, tmp_path, monkeypatch, capsys
):
    sizes = []  # distinct words the driver holds after each batch (main runs the driver in this process)
    update = BoundedCounts.update

    def recording_update(self, words, counts):
        update(self, words, counts)
        sizes.append(len(self.counts))

    monkeypatch.setattr(BoundedCounts, "update", recording_update)
    out = tmp_path / "tok"
    assert main(["vocab", "--input", str(planted_corpus), "--out", str(out), "--vocab-size", "3000",
                 "--max-distinct-words", "1000", "--batch-size", "100", "--no-progress"]) == 0  # fmt: skip
    summary = json.loads((out / "vocab_summary.json").read_text())
    assert max(sizes) <= 1000 and summary["unique_words"] <= 1000
    assert summary["pruned_words"] > 1000 and summary["pruned_below"] >= 2
    assert f"dropped {summary['pruned_words']:,} counted fewer than" in capsys.readouterr().err
    tagger = build_tagger("unidic_lite")
    counts = Counter(w for t in read_sample(1500) for w in tagger.parse(clean_text(t)[0]).split())
    vocab = set((out / "vocab.txt").read_text(encoding="utf-8").splitlines())
    assert {word for word, _ in counts.most_common(100)} <= vocab


def test_pruning_drops_whole_counts_of_the_rarest_words():
    counts = BoundedCounts(max_words=4)
    counts.update(["a", "b", "c", "d"], [5, 3, 3, 1])
    counts.update(["e"], [1])  # 5 words > 4: keep at most 2, and the two words counted 3 go together
    assert counts.counts == {"a": 5} and counts.pruned_below == 5
    assert (counts.pruned_words, counts.pruned_occurrences) == (4, 8)


def test_a_huge_rejected_record_keeps_only_a_preview(ray_cluster, tmp_path):
    huge = "東京は日本の首都です。" * 10_000  # 110,000 characters
    corpus = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in [*read_sample(50), huge]]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "tok"
    assert main(["vocab", "--input", str(corpus), "--out", str(out), "--vocab-size", "500",
                 "--max-record-chars", "50000", "--no-progress"]) == 0  # fmt: skip
    [reject] = [json.loads(line) for line in (out / "rejects" / "rejects.jsonl").read_text().splitlines()]
    assert reject["reason"] == "too_long" and reject["record"] == huge[:REJECT_PREVIEW_CHARS]


@pytest.mark.parametrize(
    "content, message",
    [(None, "corpus not found"), (b"", "is empty"), (b"{oops\n" * 5, "all 5 records were rejected")],
)
def test_bad_corpus_is_one_clear_error_line(ray_cluster, tmp_path, capsys, content, message):
    corpus = tmp_path / "corpus.jsonl"
    if content is not None:
        corpus.write_bytes(content)
    assert main(["vocab", "--input", str(corpus), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    # Ray forwards its own processes' logs to stderr when it likes (e.g. the GCS failing to kill an actor pool that
    # was still starting when the error stopped the run); those lines are Ray's, prefixed "(pid=…)" or "(raylet)".
    lines = [line for line in capsys.readouterr().err.splitlines() if line and not RAY_LOG_LINE.match(line)]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in lines[0], lines


def test_vocab_is_written_to_a_bucket_and_refuses_to_replace_it_without_overwrite(
    ray_cluster, planted_corpus, s3_bucket, capsys
):
    out = s3_bucket("tokenizers/ja")
    args = ["vocab", "--input", str(planted_corpus), "--out", out, "--vocab-size", "3000",
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    store = Store(out)
    assert {"vocab.txt", "tokenizer_config.json", "vocab_summary.json"} <= set(store.files())
    assert store.read_json("vocab_summary.json")["vocab_size"] == 3000
    assert JapaneseTokenizer.from_pretrained(local_copy(out)).vocab_size == 3000
    capsys.readouterr()
    assert main(args) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    store.write_text("stale.txt", "from an older run")
    assert main([*args[:-2], "2000", "--no-progress", "--overwrite"]) == 0
    assert store.read_json("vocab_summary.json")["vocab_size"] == 2000 and "stale.txt" not in store.files()


def test_missing_bucket_is_one_line_before_any_work(ray_cluster, planted_corpus, s3_endpoint, capsys):
    out = f"s3://no-such-bucket-z/tok?endpoint_override={s3_endpoint}&scheme=http"
    assert main(["vocab", "--input", str(planted_corpus), "--out", out, "--no-progress"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line and not RAY_LOG_LINE.match(line)]
    assert len(lines) == 1 and "cannot write to output s3://no-such-bucket-z/tok" in lines[0], lines


def test_unwritable_output_is_a_clear_error(ray_cluster, planted_corpus, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["vocab", "--input", str(planted_corpus), "--out", str(blocker / "sub"), "--no-progress"]) == 2
    assert "cannot write to output" in capsys.readouterr().err


def test_cli_user_errors_exit_2_without_traceback_and_without_starting_ray(tmp_path):
    cases = [
        ["-m", "jobs.vocab", "--input", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")],
        ["-m", "jbert_ray.cli", "tokenize", "--tokenizer", str(tmp_path), "東京"],
    ]
    for args in cases:
        result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_help_documents_the_commands():
    result = subprocess.run([sys.executable, "-m", "jobs.vocab", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "--vocab-size" in result.stdout and "--input" in result.stdout


def test_tokenize_command_shows_words(tokenizer_dir, capsys):
    assert main(["tokenize", "--tokenizer", str(tokenizer_dir), "--json", "東京は日本の首都です。"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["tokens"][0] == "[CLS]" and len(record["ids"]) == len(record["word_start"])
