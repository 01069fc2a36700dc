"""`ray job submit --working-dir .` runs every job on a real (local, loopback-only) Ray head."""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from jbert_ray.serve import free_port
from tests.conftest import REPO, SAMPLE_PATH, can_make_namespaces

# Where namespaces can be made (root, as in CI) tests/ray/test_two_nodes.py submits every job to a two-node cluster;
# this single-head run keeps `ray job submit` covered elsewhere (and keeps CI under its 20 minutes).
pytestmark = [pytest.mark.ray, pytest.mark.skipif(can_make_namespaces(), reason="test_two_nodes.py covers it")]


@pytest.fixture(scope="module")
def head():
    """A `ray start --head` cluster with its own temp dir, so stopping it touches no other Ray on the machine."""
    temp_dir = tempfile.mkdtemp(prefix="jbh", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    dashboard_port = free_port()
    subprocess.run(
        ["ray", "start", "--head", "--num-cpus=2", f"--port={free_port()}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}",
         "--disable-usage-stats"],
        env=env, check=True, capture_output=True, timeout=120,
    )
    yield f"http://127.0.0.1:{dashboard_port}", env
    _stop_cluster(temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_cluster(temp_dir: str) -> None:
    # `ray stop` would stop every Ray on the machine; the head's own processes name its temp dir.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _pids_mentioning(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 5
        while _pids_mentioning(temp_dir) and time.time() < deadline:
            time.sleep(0.2)


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def submit(head, *job_args: str) -> str:
    address, env = head
    command = ["ray", "job", "submit", "--address", address, "--working-dir", str(REPO), "--", "python", "-m",
               *job_args]
    deadline = time.time() + 240
    while True:  # the head's job agent comes up seconds after `ray start` returns (minutes beside another Ray)
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in result.stderr or time.time() > deadline:
            break
        time.sleep(2)
    assert result.returncode == 0 and "succeeded" in result.stdout, (result.stdout + result.stderr)[-3000:]
    return result.stdout


def test_every_job_runs_under_ray_job_submit(head, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(SAMPLE_PATH.read_text(encoding="utf-8").splitlines(True)[:1500]), encoding="utf-8")
    tokenizer, shards, run, scores = (tmp_path / name for name in ("tokenizer", "shards", "run", "scores"))

    submit(head, "jobs.vocab", "--input", str(corpus), "--out", str(tokenizer), "--vocab-size", "2000",
           "--no-progress")
    assert (tokenizer / "vocab.txt").is_file()

    submit(head, "jobs.preprocess", "--input", str(corpus), "--tokenizer", str(tokenizer), "--out", str(shards),
           "--max-seq-len", "64", "--valid-fraction", "0.1", "--no-progress")
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["records_read"] == 1500 and manifest["sequences"] > 0

    submit(head, "jobs.pretrain", "--data", str(shards), "--out", str(run), "--model-config", "tiny",
           "--num-workers", "1", "--max-steps", "4", "--global-batch-size", "8", "--micro-batch-size", "8",
           "--eval-every", "4", "--checkpoint-every", "4", "--log-every", "2", "--no-progress")
    assert (run / "model" / "model.safetensors").is_file()

    submit(head, "jobs.score", "--input", str(corpus), "--model", str(run / "model"), "--out", str(scores),
           "--no-progress")
    assert json.loads((scores / "summary.json").read_text())["rows_in"] == 1500
