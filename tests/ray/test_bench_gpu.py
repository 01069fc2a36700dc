"""`bench/gpu.py --dry-run`, as CI runs it: every phase on CPU with tiny settings, so the GPU script cannot rot."""

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.ray


def test_gpu_bench_dry_run_runs_every_phase(tmp_path):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "bench/gpu.py", "--dry-run", "--out", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    rows = {(row["phase"], row["what"].split(",")[0]): row for row in report["rows"]}
    assert {phase for phase, _ in rows} == {"step", "learn", "score", "stream", "product"}
    for arch in ("bert-tiny", "modernbert-tiny"):
        assert rows[("step", arch)]["tokens_per_s"] > 0 and rows[("step", arch)]["mfu"] is None  # no peak on CPU
    learn = rows[("learn", "modernbert-tiny")]
    assert learn["steps"] > 0 and 0 < learn["valid_acc"] < 1 and (tmp_path / "learn.csv").is_file()
    assert rows[("score", "PLL")]["sentences_per_s"] > 0 and rows[("score", "fill-mask")]["p50_ms"] > 0
    stream = next(row for (phase, _), row in rows.items() if phase == "stream")
    assert stream["tokens_per_s_per_cpu"] > 1000
    pretrain = rows[("product", "run_pretraining")]
    assert pretrain["steps"] == 20 and 0.1 < pretrain["ray_vs_plain"] < 10  # Ray Train ÷ the plain step
    assert rows[("product", "jbert score")]["sentences_per_s"] > 0
    serve = rows[("product", "Serve fill-mask")]
    assert serve["req_per_s"] > 0 and serve["p99_ms"] >= serve["p50_ms"] and serve["mean_batch"] >= 1
    assert "| phase |" in result.stdout  # the table
    assert time.perf_counter() - started < 240, "the dry run should take a minute or two"
