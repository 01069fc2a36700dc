"""`jbert evaluate` on a local Ray: Tune sweeps over both JGLUE tasks for our two architectures and a Tohoku-layout
BERT dir, from-scratch baselines, and a trial killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jbert_ray.cli.ray_runtime import process_tree
from jbert_ray.errors import UserError
from jbert_ray.evaluate import EvaluateConfig, prepare_evaluation, run_evaluation
from tests.conftest import REPO, wait_for_group_exit

pytestmark = pytest.mark.ray
SAMPLE = Path(__file__).resolve().parents[2] / "jbert_ray" / "sample" / "jglue"
QUICK = {"learning_rates": "2e-4", "seeds": "0", "epochs": 1, "max_train_examples": 48, "batch_size": 16,
         "max_length": 48, "show_progress": False}


def _evaluate(model_dir, out: Path, **settings) -> dict:
    config = EvaluateConfig(str(model_dir), str(SAMPLE), str(out), **{**QUICK, **settings})
    return run_evaluation(prepare_evaluation(config))


def _tohoku_layout(tiny_model_dir: Path, path: Path) -> Path:
    """A Tohoku-style BERT dir: transformers' own save of BertForMaskedLM, Tohoku's tokenizer_config.json (no
    dictionary record), no special_tokens_map.json."""
    from transformers import BertForMaskedLM

    BertForMaskedLM.from_pretrained(tiny_model_dir).save_pretrained(path)
    (path / "vocab.txt").write_text((tiny_model_dir / "vocab.txt").read_text(encoding="utf-8"), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertJapaneseTokenizer", "model_max_length": 512, "do_lower_case": False,
        "word_tokenizer_type": "mecab", "subword_tokenizer_type": "wordpiece",
        "mecab_kwargs": {"mecab_dic": "unidic_lite"},
    }))  # fmt: skip
    return path


def test_both_tasks_on_modernbert_with_a_from_scratch_baseline(ray_cluster, tiny_modernbert_dir, tmp_path):
    results = _evaluate(tiny_modernbert_dir, tmp_path / "out", from_scratch=True)
    trials = results["trials"]
    assert sorted((t["task"], t["init"]) for t in trials) == [
        ("jcommonsenseqa", "from-scratch"), ("jcommonsenseqa", "pretrained"),
        ("jsts", "from-scratch"), ("jsts", "pretrained"),
    ]  # fmt: skip
    for t in trials:
        assert t["train_examples"] == 48 and t["steps"] == 3 and t["retries"] == 0
        metric = t["accuracy"] if t["task"] == "jcommonsenseqa" else t["pearson"]
        assert -1 <= metric <= 1
    # From random weights really: loading the pretrained weights instead would give the very same first loss (same
    # seed, same batches; a one-thread CPU run repeats bit for bit).
    by = {(t["task"], t["init"]): t["first_loss"] for t in trials}
    for task in ("jsts", "jcommonsenseqa"):
        assert by[(task, "from-scratch")] != by[(task, "pretrained")]
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["tasks"]["jsts"]["pretrained"]["best_learning_rate"] == 2e-4
    assert written["valid_examples"] == {"jsts": 100, "jcommonsenseqa": 100}
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| from-scratch:" in table and "(published, not re-measured)" in table
    assert "jsts 48 of 300" in table  # the cap is said, with the rows it left out


@pytest.mark.parametrize("layout", ["ours", "tohoku"])
def test_bert_dirs_evaluate_on_both_tasks(ray_cluster, tiny_model_dir, tmp_path, layout):
    model_dir = tiny_model_dir if layout == "ours" else _tohoku_layout(tiny_model_dir, tmp_path / "tohoku")
    results = _evaluate(model_dir, tmp_path / "out", save_models=layout == "tohoku")
    assert results["model_type"] == "bert"
    assert {t["task"] for t in results["trials"]} == {"jsts", "jcommonsenseqa"}
    if layout == "tohoku":  # --save-models: ordinary HF dirs of the fine-tuned heads
        from transformers import AutoModelForMultipleChoice

        saved = tmp_path / "out" / "models" / "jcommonsenseqa-pretrained-lr0.0002-seed0"
        assert type(AutoModelForMultipleChoice.from_pretrained(saved)).__name__ == "BertForMultipleChoice"
        assert (saved / "vocab.txt").is_file()


def test_a_trial_killed_mid_run_is_retried_and_the_results_are_complete(ray_cluster, tiny_modernbert_dir, tmp_path):
    killed = []

    def kill_the_first_trial():  # the Tune trial's worker process, once it has trained for a moment
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            for pid in _trial_pids(os.getpid())[:1]:
                time.sleep(1.5)  # past its start-up (~1 s), well before its end (~8 s)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.2)

    killer = threading.Thread(target=kill_the_first_trial, daemon=True)
    killer.start()
    results = _evaluate(tiny_modernbert_dir, tmp_path / "out", tasks="jsts", max_train_examples=300, epochs=20,
                        seeds="0,1", max_retries=2)  # fmt: skip
    killer.join()
    assert killed, "no trial process was found to kill"
    assert len(results["trials"]) == 2 and sum(t["retries"] for t in results["trials"]) == 1
    assert all(t["steps"] == 20 * 19 for t in results["trials"])  # 300 examples / 16 per batch, 20 epochs


def test_a_trial_larger_than_every_node_is_refused_before_any_work(ray_cluster, tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="asks for 1 CPUs and 1 GPUs; the largest node has 2 and 0"):
        _evaluate(tiny_model_dir, tmp_path / "out", gpus_per_trial=1)
    assert not (tmp_path / "out" / "results.json").exists()
    assert _evaluate(tiny_model_dir, tmp_path / "out", tasks="jsts", overwrite=True)["trials"]  # the lock was let go


def test_ctrl_c_stops_the_command_with_one_line_and_leaves_nothing_running(tiny_modernbert_dir, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "jobs.evaluate", "--model", str(tiny_modernbert_dir), "--data", str(SAMPLE),
               "--out", str(out), "--tasks", "jsts", "--epochs", "2000", "--seeds", "0", "--num-cpus", "1"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not _trial_pids(process.pid):
        time.sleep(0.2)
    time.sleep(1)  # the trial is training
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("jbert evaluate: stopped;") and "Traceback" not in stderr
    assert not (out / "results.json").exists()
    wait_for_group_exit(process.pid)  # the local Ray it started is gone with it


def _trial_pids(root: int) -> list[int]:
    """The Tune function trials (their actor processes) under `root`."""
    found = []
    for pid in process_tree(root):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ImplicitFunc.train"):
                found.append(pid)
        except OSError:  # ended meanwhile
            pass
    return found
