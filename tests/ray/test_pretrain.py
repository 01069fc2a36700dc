"""`jbert pretrain` on a local 2-CPU Ray: tiny model, 2 workers — loss falls, the model dir loads in the fill-mask
pipeline, a re-run resumes, a killed worker restarts from its checkpoint, bad input fails before training."""

import hashlib
import json
import os
import shutil
import signal
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jbert_ray.cli import main
from jbert_ray.tokenizer import JapaneseTokenizer
from jbert_ray.train_state import read_metrics

pytestmark = pytest.mark.ray

MAX_SEQ_LEN = 64
FAST = [  # tiny model, global batch 16 = 2 workers × 8, report every 5 steps
    "--model-config",
    "tiny",
    "--num-workers",
    "2",
    "--global-batch-size",
    "16",
    "--micro-batch-size",
    "8",
    "--learning-rate",
    "2e-3",
    "--warmup-steps",
    "3",
    "--log-every",
    "5",
    "--eval-every",
    "1000",
    "--no-progress",
]


def write_shards(path, tokenizer_dir, texts, files=3):
    """Shards in the `jbert preprocess` format, one text per row (truncated), without Ray."""
    tokenizer = JapaneseTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(path / "tokenizer")
    rows = []
    for encoding in tokenizer.encode_batch(texts):
        ids, starts = encoding.ids[:MAX_SEQ_LEN], encoding.word_start[:MAX_SEQ_LEN]
        ids[-1], starts[-1] = tokenizer.sep_token_id, True
        rows.append((ids, starts))
    cut = len(rows) * 9 // 10
    for split, part, count in (("train", rows[:cut], files), ("valid", rows[cut:], 1)):
        (path / split).mkdir(parents=True)
        for k in range(count):
            chunk = part[k::count]
            table = pa.table(
                {
                    "input_ids": pa.array([r[0] for r in chunk], pa.list_(pa.int32())),
                    "word_start": pa.array([r[1] for r in chunk], pa.list_(pa.bool_())),
                    "doc_id": [f"{split}-{k}-{i}" for i in range(len(chunk))],
                    "n_tokens": pa.array([len(r[0]) for r in chunk], pa.int32()),
                }
            )
            pq.write_table(table, path / split / f"part-{k:03d}.parquet")
    vocab_hash = hashlib.sha256((path / "tokenizer" / "vocab.txt").read_bytes()).hexdigest()
    manifest = {
        "tokenizer_sha256": vocab_hash,
        "sequences": len(rows),
        "tokens": sum(len(r[0]) for r in rows),
        "max_seq_len": MAX_SEQ_LEN,
        "config": {"max_seq_len": MAX_SEQ_LEN},
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer_dir, sample_texts):
    return write_shards(tmp_path_factory.mktemp("shards"), tokenizer_dir, sample_texts[:2000])


@pytest.fixture(scope="module")
def first_run(ray_cluster, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(shards),
                "--out",
                str(out),
                "--max-steps",
                "30",
                "--checkpoint-every",
                "10",
                *FAST,
            ]
        )
        == 0
    )
    return out


def test_loss_falls_and_the_run_dir_holds_metrics_curves_and_a_fill_mask_model(first_run):
    from transformers import pipeline

    rows = read_metrics(first_run / "metrics.csv")
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and r["lr"] > 0 for r in rows)
    assert rows[-1]["eval_loss"] is not None and 0 <= rows[-1]["eval_accuracy"] <= 1
    assert (first_run / "curves.png").stat().st_size > 0
    assert any((first_run / "tensorboard").iterdir())
    results = json.loads((first_run / "results.json").read_text())
    assert results["step"] == 30
    predictions = pipeline("fill-mask", model=str(first_run / "model"))("東京は日本の[MASK]です。")
    assert len(predictions) == 5


def test_rerun_resumes_the_step_count_and_the_loss(first_run, shards, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(first_run, out)  # leave the first run intact for the other tests
    before = read_metrics(out / "metrics.csv")
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(shards),
                "--out",
                str(out),
                "--max-steps",
                "40",
                "--checkpoint-every",
                "10",
                *FAST,
            ]
        )
        == 0
    )
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert rows[6]["loss"] < before[0]["loss"] - 1.0  # continues from the checkpoint, not from scratch
    assert json.loads((out / "stream.json").read_text())["consumed"] == 30 * 16


def test_a_killed_worker_restarts_from_its_checkpoint_and_the_run_finishes(ray_cluster, shards, tmp_path):
    out = tmp_path / "killed"
    argv = [
        "pretrain",
        "--data",
        str(shards),
        "--out",
        str(out),
        "--max-steps",
        "40",
        "--checkpoint-every",
        "10",
        "--max-failures",
        "2",
        *FAST,
    ]
    status = {}
    runner = threading.Thread(target=lambda: status.setdefault("code", main(argv)))
    runner.start()
    deadline = time.monotonic() + 240
    while not (out / "progress.json").exists() and time.monotonic() < deadline and runner.is_alive():
        time.sleep(0.2)
    assert (out / "progress.json").exists(), "no checkpoint was written"
    victim = json.loads((out / "workers" / "rank_1.json").read_text())["pid"]
    os.kill(victim, signal.SIGKILL)  # the Ray Train worker process of rank 1 of this run, nothing else
    runner.join(timeout=300)
    assert status.get("code") == 0
    assert json.loads((out / "workers" / "rank_1.json").read_text())["pid"] != victim  # restarted
    steps = [r["step"] for r in read_metrics(out / "metrics.csv")]
    assert steps == sorted(set(steps)) and steps[-1] == 40
    assert json.loads((out / "results.json").read_text())["step"] == 40


def expect_user_error(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_shards_from_another_tokenizer_are_refused(shards, tmp_path, capsys):
    other = shutil.copytree(shards, tmp_path / "other")
    with open(other / "tokenizer" / "vocab.txt", "a", encoding="utf-8") as f:
        f.write("余分\n")
    expect_user_error(
        capsys,
        ["pretrain", "--data", str(other), "--out", str(tmp_path / "o"), *FAST],
        "made with another tokenizer",
    )


def test_empty_shards_are_refused(shards, tmp_path, capsys):
    empty = shutil.copytree(shards, tmp_path / "empty", ignore=shutil.ignore_patterns("*.parquet"))
    expect_user_error(
        capsys,
        ["pretrain", "--data", str(empty), "--out", str(tmp_path / "o"), *FAST],
        "no training sequences",
    )


def test_more_workers_than_the_cluster_has_are_refused(ray_cluster, shards, tmp_path, capsys):
    argv = [
        "pretrain",
        "--data",
        str(shards),
        "--out",
        str(tmp_path / "o"),
        *FAST,
        "--num-workers",
        "4",
        "--micro-batch-size",
        "4",
    ]
    expect_user_error(capsys, argv, "exceeds the cluster's 2 CPUs")
    expect_user_error(capsys, [*argv[:-4], "--use-gpu"], "needs 2 GPUs")


def test_init_from_a_model_with_another_vocab_is_refused(shards, tiny_model_dir, tmp_path, capsys):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    vocab = (model_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    vocab[10], vocab[11] = vocab[11], vocab[10]
    (model_dir / "vocab.txt").write_text("\n".join(vocab), encoding="utf-8")
    argv = [
        "pretrain",
        "--data",
        str(shards),
        "--out",
        str(tmp_path / "o"),
        "--init-from",
        str(model_dir),
        *FAST,
    ]
    expect_user_error(capsys, argv, "differs from the tokenizer the shards were made with")
