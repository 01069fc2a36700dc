"""`jbert demo > demo.log` as a new user runs it (its own local Ray): every stage, a readable log."""

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.ray


def test_demo_redirected_to_a_file_reads_like_a_short_report(tmp_path):
    with open(tmp_path / "demo.log", "w") as log:
        result = subprocess.run(
            [sys.executable, "-m", "jbert_ray.cli", "demo", "--work-dir", str(tmp_path / "demo"), "--minutes", "0.1"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, timeout=600, check=False,
        )  # fmt: skip
    output = (tmp_path / "demo.log").read_text()
    assert result.returncode == 0, output[-3000:]
    assert "\x1b[" not in output, output[-3000:]
    notices = ("Progress bars disabled", "Token authentication is enabled")
    noise = [line for line in output.splitlines()
             if re.search(r"(^|\s)INFO\s", line) or any(notice in line for notice in notices)
             or line.startswith("(raylet)") or re.search(r"\] [\w/]+\.cc:\d+:", line)]  # fmt: skip
    # Ray Data's plans, Serve's start-up lines, ray.init's notices, the raylet's worker-pool warnings and the core
    # worker's C++ log lines stay in Ray's logs
    assert noise == [], noise
    for stage in ("vocab:", "preprocess:", "pretrain:", "score:", "[demo] done in"):
        assert f"[demo] {stage}" in output or stage in output, stage
    assert output.count("[MASK]") >= 3  # the fill-mask sentences and their answers
