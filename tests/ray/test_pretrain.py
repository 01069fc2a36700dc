"""`jbert pretrain` on a local 2-CPU Ray: tiny model, 2 workers — loss falls, the model dir loads in the fill-mask
pipeline, a re-run resumes, a killed worker restarts from its checkpoint, a time budget stops on time and keeps its
schedule on resume, both architectures continue with --init-from, bad input fails before training."""

import itertools
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from jbert_ray.cli import main
from jbert_ray.pretrain.metrics import read_metrics
from tests.conftest import SAMPLE_PATH, can_make_namespaces

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


def pretrain_argv(data, out, *extra: str) -> list[str]:
    """`jbert pretrain` arguments: the FAST settings, then `extra` (later flags win)."""
    return ["pretrain", "--data", str(data), "--out", str(out), *FAST, *extra]


@pytest.fixture(scope="module")
def shards(ray_cluster, tmp_path_factory, tokenizer_dir):
    """`jbert preprocess` output for the first 2,000 sample documents (rows of ≤ 64 tokens, 10% valid)."""
    from jbert_ray.preprocess import PreprocessConfig, run_preprocess

    root = tmp_path_factory.mktemp("shards")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(SAMPLE_PATH.read_text(encoding="utf-8").splitlines(keepends=True)[:2000]))
    config = PreprocessConfig(
        input=str(corpus),
        tokenizer_dir=str(tokenizer_dir),
        output_dir=str(root / "shards"),
        max_seq_len=MAX_SEQ_LEN,
        valid_fraction=0.1,
        show_progress=False,
    )
    run_preprocess(config)
    return root / "shards"


@pytest.fixture(scope="module")
def first_run(ray_cluster, shards, tmp_path_factory):
    """A 30-step run, started from its own folder with relative --data and --out: Ray Train's workers run
    elsewhere, so the paths must reach them made absolute."""
    root = tmp_path_factory.mktemp("run")
    shutil.copytree(shards, root / "shards")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(pretrain_argv("shards", "run", "--max-steps", "30", "--checkpoint-every", "10")) == 0
    finally:
        os.chdir(cwd)
    return root / "run"


def test_loss_falls_and_the_run_dir_holds_metrics_curves_and_a_fill_mask_model(first_run):
    from transformers import AutoTokenizer, pipeline

    rows = read_metrics(first_run / "metrics.csv")
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and r["lr"] > 0 for r in rows)
    assert rows[-1]["eval_loss"] is not None and 0 <= rows[-1]["eval_accuracy"] <= 1
    assert (first_run / "curves.png").stat().st_size > 0
    assert any((first_run / "tensorboard").iterdir())
    results = json.loads((first_run / "results.json").read_text())
    assert results["step"] == 30
    model_dir = str(first_run / "model")
    assert json.loads((first_run / "model" / "config.json").read_text())["model_type"] == "modernbert"
    tokenizer = AutoTokenizer.from_pretrained(model_dir, tokenizer_type="bert-japanese")
    predictions = pipeline("fill-mask", model=model_dir, tokenizer=tokenizer)("東京は日本の[MASK]です。")
    assert len(predictions) == 5
    assert rows[-1]["tokens"] > rows[0]["tokens"] > 0 and rows[-1]["elapsed_s"] > rows[0]["elapsed_s"] > 0
    # Long texts are scored in windows of the length the model was trained on, not of its 512 positions.
    from jbert_ray.inference import MaskedLM

    assert MaskedLM.from_pretrained(model_dir).max_length == MAX_SEQ_LEN
    assert not list((first_run).glob("model.*"))  # the export's .new/.old copies are gone


def test_rerun_resumes_the_step_count_and_the_loss(first_run, shards, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(first_run, out)  # leave the first run intact for the other tests
    before = read_metrics(out / "metrics.csv")
    assert main(pretrain_argv(shards, out, "--max-steps", "40", "--checkpoint-every", "10")) == 0
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert rows[6]["loss"] < before[0]["loss"] - 1.0  # continues from the checkpoint, not from scratch
    assert json.loads((out / "stream.json").read_text())["consumed"] == 30 * 16


def _registered_checkpoint(run_dir: Path) -> bool:
    """Ray Train's controller has taken in a checkpoint (workers persist one a moment before the controller
    registers it; a restart in between starts from scratch)."""
    snapshot = run_dir / "checkpoints" / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snapshot.read_text())["latest_checkpoint_result"] is not None
    except (OSError, ValueError):
        return False


# Where namespaces can be made (CI), tests/ray/test_two_nodes.py kills a whole node mid-run and checks the same:
# restarted ranks start at the checkpoint, each step is logged once. This one covers machines without them.
@pytest.mark.skipif(can_make_namespaces(), reason="test_two_nodes.py kills a node mid-run instead")
def test_a_killed_worker_restarts_from_its_checkpoint_and_the_run_finishes(ray_cluster, shards, tmp_path):
    out = tmp_path / "killed"
    argv = pretrain_argv(shards, out, "--max-steps", "40", "--checkpoint-every", "10", "--max-failures", "2")
    status = {}
    runner = threading.Thread(target=lambda: status.setdefault("code", main(argv)))
    runner.start()
    deadline = time.monotonic() + 240
    def checkpointed_yet() -> bool:
        return _registered_checkpoint(out) and (out / "progress.json").exists()

    while not checkpointed_yet() and time.monotonic() < deadline and runner.is_alive():
        time.sleep(0.2)
    assert checkpointed_yet(), "no checkpoint was written"
    checkpointed = json.loads((out / "progress.json").read_text())["step"]
    rows_before = read_metrics(out / "metrics.csv")
    victim = json.loads((out / "workers" / "rank_1.json").read_text())["pid"]
    os.kill(victim, signal.SIGKILL)  # the Ray Train worker process of rank 1 of this run, nothing else
    runner.join(timeout=300)
    assert status.get("code") == 0
    restarted = json.loads((out / "workers" / "rank_1.json").read_text())
    assert restarted["pid"] != victim
    assert 40 > restarted["start_step"] >= checkpointed >= 10  # resumed from the checkpoint, not from step 0
    rows = read_metrics(out / "metrics.csv")
    steps = [r["step"] for r in rows]
    assert steps == list(range(5, 45, 5))  # each logged step once: rows past the checkpoint were replaced
    kept = [r for r in rows_before if r["step"] <= restarted["start_step"]]
    assert kept and rows[: len(kept)] == kept  # the rows written before the kill are still there, unchanged
    assert json.loads((out / "results.json").read_text())["step"] == 40
    stream = json.loads((out / "stream.json").read_text())  # the restarted stream began at the checkpoint
    assert stream["consumed"] == restarted["start_step"] * 16 >= stream["start_sequence"]


def test_a_time_budget_stops_on_time_and_a_resumed_run_keeps_its_schedule(ray_cluster, shards, tmp_path):
    out = tmp_path / "budget"
    budget_s = 15
    started = time.perf_counter()
    assert main(pretrain_argv(shards, out, "--time-budget", str(budget_s / 60), "--warmup-steps", "-1")) == 0
    rows = read_metrics(out / "metrics.csv")
    # Stopped at the first step past the budget; that step may include a restart of the stream (~5-10 s on 2 idle
    # CPUs, twice that on a loaded machine) when this tiny model outruns its 3-epoch plan.
    assert budget_s <= rows[-1]["elapsed_s"] < budget_s + 25
    assert time.perf_counter() - started < budget_s + 60  # start-up and export are outside the budget
    peak = 2e-3
    # The lr of a row's last step was set from the clock after the previous row: it follows the budget's decay
    # (a re-read of the stream may stall the last step, so the final lr need not be ~0). metrics.csv keeps 6
    # significant digits: a step right after a row reads that row's clock, so allow 1 ms of rounding.
    for previous, row in itertools.pairwise(rows):
        assert row["lr"] <= peak * max(0.0, 1 - (previous["elapsed_s"] - 1e-3) / budget_s) / 0.94
    # Warmed up to the peak, and the bound above was checked well into the decay (where a constant lr breaks it);
    # the last row's lr alone may be high: it was set before a stalled stream restart.
    assert max(r["lr"] for r in rows) > 0.5 * peak and any(r["elapsed_s"] > 0.3 * budget_s for r in rows[1:-1])
    assert (out / "model" / "model.safetensors").is_file()
    assert json.loads((out / "results.json").read_text())["step"] == rows[-1]["step"]  # a final checkpoint

    longer = tmp_path / "longer"
    shutil.copytree(out, longer)
    assert main(pretrain_argv(shards, longer, "--time-budget", str(2 * budget_s / 60), "--warmup-steps", "-1")) == 0
    resumed = read_metrics(longer / "metrics.csv")
    first_new = resumed[len(rows)]
    assert first_new["step"] > rows[-1]["step"] and first_new["elapsed_s"] > rows[-1]["elapsed_s"]
    # The clock went on from the checkpoint: the lr is halfway down the decay, not back in warmup.
    expected = peak * (1 - first_new["elapsed_s"] / (2 * budget_s)) / 0.94
    assert first_new["lr"] == pytest.approx(expected, rel=0.25)
    assert 2 * budget_s <= resumed[-1]["elapsed_s"] < 2 * budget_s + 25


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
def test_each_architecture_continues_from_its_own_export_with_init_from(first_run, shards, tmp_path, arch):
    from jbert_ray.inference import MaskedLM

    first = first_run  # the default architecture is ModernBERT: its first run is already there
    if arch != "modernbert":
        first = tmp_path / "first"
        assert main(pretrain_argv(shards, first, "--arch", arch, "--max-steps", "10")) == 0
    config = json.loads((first / "model" / "config.json").read_text())
    assert config["model_type"] == arch
    before = read_metrics(first / "metrics.csv")
    second = tmp_path / "second"
    assert main(pretrain_argv(shards, second, "--init-from", str(first / "model"), "--max-steps", "10")) == 0
    assert json.loads((second / "model" / "config.json").read_text())["model_type"] == arch
    after = read_metrics(second / "metrics.csv")
    assert after[0]["loss"] < before[0]["loss"] - 0.5  # starts from the trained weights, not from scratch
    (scores,) = MaskedLM.from_pretrained(second / "model").score(["東京は日本の首都です。"])
    assert scores["n_tokens"] > 0 and scores["pll"] < 0


def expect_user_error(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_shards_from_another_tokenizer_are_refused(shards, tmp_path, capsys):
    other = shutil.copytree(shards, tmp_path / "other")
    with open(other / "tokenizer" / "vocab.txt", "a", encoding="utf-8") as f:
        f.write("余分\n")
    expect_user_error(
        capsys,
        pretrain_argv(other, tmp_path / "o"),
        "made with another tokenizer",
    )


def test_shards_whose_files_are_gone_are_refused(shards, tmp_path, capsys):
    empty = shutil.copytree(shards, tmp_path / "empty", ignore=shutil.ignore_patterns("*.parquet"))
    expect_user_error(
        capsys,
        pretrain_argv(empty, tmp_path / "o"),
        "holds 0 files with 0 sequences but the manifest says",  # checked against the manifest: files were lost
    )


def test_more_workers_than_the_cluster_has_are_refused(ray_cluster, shards, tmp_path, capsys):
    argv = pretrain_argv(shards, tmp_path / "o", "--num-workers", "4", "--micro-batch-size", "4")
    expect_user_error(capsys, argv, "exceeds the cluster's 2 CPUs")
    expect_user_error(capsys, [*argv[:-4], "--use-gpu"], "needs 2 GPUs")


def test_init_from_a_model_with_another_vocab_is_refused(shards, tiny_model_dir, tmp_path, capsys):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    vocab = (model_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    vocab[10], vocab[11] = vocab[11], vocab[10]
    (model_dir / "vocab.txt").write_text("\n".join(vocab), encoding="utf-8")
    argv = pretrain_argv(shards, tmp_path / "o", "--init-from", str(model_dir))
    expect_user_error(capsys, argv, "differs from the tokenizer the shards were made with")


def test_a_run_on_object_storage_alone_trains_and_continues_with_init_from(ray_cluster, shards, s3_bucket):
    """Shards, run dir and --init-from all on the local S3 server: nothing but the store connects the stages."""
    from jbert_ray.inference import MaskedLM
    from jbert_ray.pretrain.metrics import metrics_rows
    from jbert_ray.storage import Store, local_copy

    data, run = Store(s3_bucket("shards")), Store(s3_bucket("run"))
    data.upload(shards)
    assert main(pretrain_argv(data.location, run.location, "--max-steps", "20", "--checkpoint-every", "10")) == 0
    files = set(run.files())
    assert {"model/model.safetensors", "model/vocab.txt", "metrics.csv", "curves.png", "results.json"} <= files
    assert any(name.startswith("checkpoints/checkpoint_") for name in files)
    assert any(name.startswith("tensorboard/") for name in files)
    rows = metrics_rows(run)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]  # resuming from the store: tests/ray/test_two_nodes.py
    second = Store(s3_bucket("second"))
    argv = pretrain_argv(data.location, second.location, "--init-from", run.child("model").location, "--max-steps", "5")
    assert main(argv) == 0
    assert metrics_rows(second)[0]["loss"] < rows[0]["loss"] - 0.5  # it started from the stored export
    (scores,) = MaskedLM.from_pretrained(local_copy(second.child("model").location)).score(["東京は日本の首都です。"])
    assert scores["n_tokens"] > 0 and scores["pll"] < 0


def test_a_missing_bucket_for_the_run_dir_is_one_line_before_training(shards, s3_endpoint, capsys):
    out = f"s3://no-such-bucket/run?endpoint_override={s3_endpoint}&scheme=http"
    assert main(pretrain_argv(shards, out, "--max-steps", "5")) == 2
    err = capsys.readouterr().err
    assert "cannot write to output s3://no-such-bucket/run" in err and "Traceback" not in err
