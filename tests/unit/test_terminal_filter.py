"""The terminal filter (cli.ray_runtime) keeps Ray's own lines out of a user's terminal and nothing else: a
stderr that stalls, closes (EPIPE) or hangs up (EIO) never blocks or fails native writers, and a changed Ray
signature still prints."""

import os
import pty
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jbert_ray.cli import ray_runtime

REPO = Path(__file__).resolve().parents[2]
RAY_LINE = b"[2026-11-30 12:47:31,066 E 26963 26963] core_worker.cc:2465: Actor with class name: 'A' ...\n"
OTHER_LINE = b"a native library's own line, e.g. a CUDA warning\n"
NUM_LINES = 4 * 65536 // len(OTHER_LINE)  # four pipe buffers: a filter that stopped reading blocks these
NOTICE = {"lines": ["WARNING: 9 PYTHON worker processes have been started on node: 1f"], "pid": "raylet"}
ERROR = {"lines": ["A worker died or was killed while executing a task"], "pid": "raylet"}


@pytest.fixture(params=["closed pipe", "hung-up terminal"])
def gone_stderr(request):
    """An fd whose reader is gone: writes fail with EPIPE (pipe) or EIO (pty after its master closed)."""
    reader, writer = pty.openpty() if request.param == "hung-up terminal" else os.pipe()  # (master, slave)
    os.close(reader)
    yield writer
    os.close(writer)


@pytest.fixture
def recorded_print(monkeypatch) -> list:
    """Ray's print_to_stdstream replaced by a recorder of any signature, then filtered as `jbert` does."""
    from ray._private import worker

    calls = []
    monkeypatch.setattr(worker, "print_to_stdstream", lambda *args, **kwargs: calls.append((args, kwargs)))
    ray_runtime._hide_ray_notices()
    return calls


def start_filter(write_fd: int) -> tuple[int, threading.Thread]:
    """The filter reading a fresh pipe and forwarding to `write_fd`: the pipe's write end and the thread."""
    read_end, write_end = os.pipe()
    filter_thread = threading.Thread(
        target=ray_runtime._forward_without_ray_lines, args=(read_end, write_fd), daemon=True
    )
    filter_thread.start()
    return write_end, filter_thread


def write_and_close(fd: int, data: bytes) -> threading.Thread:
    """Write `data` to `fd`, then close it, in a daemon thread: a blocked writer is a thread still alive."""

    def write() -> None:
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    return writer


def read_all(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as f:
        return f.read()


def test_ray_lines_are_dropped_and_the_rest_passes_unchanged():
    out_read, out_write = os.pipe()
    write_end, filter_thread = start_filter(out_write)
    write_and_close(write_end, RAY_LINE + OTHER_LINE + RAY_LINE + b"a last line without newline").join(5)
    filter_thread.join(5)
    os.close(out_write)
    assert read_all(out_read) == OTHER_LINE + b"a last line without newline"


def test_a_gone_stderr_never_blocks_native_writers(gone_stderr):
    write_end, filter_thread = start_filter(gone_stderr)
    writer = write_and_close(write_end, OTHER_LINE * NUM_LINES)
    writer.join(10)
    filter_thread.join(5)
    assert not writer.is_alive(), "the filter stopped reading: the pipe filled and its writer blocks"
    assert not filter_thread.is_alive()


def test_a_stalled_reader_loses_no_line_once_it_reads_again():
    out_read, out_write = os.pipe()
    write_end, filter_thread = start_filter(out_write)
    lines = [b"line %d\n" % i for i in range(NUM_LINES)]
    writer = write_and_close(write_end, b"".join(line + RAY_LINE for line in lines))
    time.sleep(0.5)  # the reader stalls: both pipes fill, the filter waits in its write
    received = []
    reader = threading.Thread(target=lambda: received.append(read_all(out_read)), daemon=True)
    reader.start()
    writer.join(10)
    filter_thread.join(10)
    os.close(out_write)
    reader.join(10)
    assert received == [b"".join(lines)]


def test_a_command_whose_stderr_is_gone_still_finishes(gone_stderr):
    """The real filter on the process's fd 2, in a child: it writes several pipe buffers of native lines."""
    child = (
        "import os; from jbert_ray.cli import ray_runtime; ray_runtime._keep_native_ray_lines_in_logs()\n"
        f"for _ in range({NUM_LINES}): os.write(2, {OTHER_LINE!r})\n"
        "print('finished', flush=True)"
    )
    done = subprocess.run(
        [sys.executable, "-c", child], cwd=REPO, stderr=gone_stderr, stdout=subprocess.PIPE, timeout=20
    )
    assert (done.returncode, done.stdout) == (0, b"finished\n")


@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((NOTICE, False), {}),  # Ray 2.60's call
        ((NOTICE,), {"ignore_prefix": False}),
        ((), {"data": NOTICE, "ignore_prefix": False, "sink": None}),
    ],
)
def test_ray_notices_are_dropped_whatever_the_signature(recorded_print, args, kwargs):
    from ray._private import worker

    worker.print_to_stdstream(*args, **kwargs)
    assert recorded_print == []


@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((ERROR, False), {}),
        ((ERROR,), {"ignore_prefix": False, "sink": None}),
        (({**NOTICE, "lines": NOTICE["lines"] + ERROR["lines"]}, False), {}),  # a notice with an error
        (({"lines": []},), {}),
        (({"lines": "WARNING: 9 PYTHON worker processes have been started on node"},), {}),  # not a list
        ((["a record that is no longer a dict"],), {"ignore_prefix": True}),
        ((), {}),
    ],
)
def test_everything_but_notices_passes_through_unchanged(recorded_print, args, kwargs):
    from ray._private import worker

    worker.print_to_stdstream(*args, **kwargs)
    assert recorded_print == [(args, kwargs)]


def test_with_the_installed_ray_errors_print_and_notices_do_not(monkeypatch, capsys):
    from ray._private import worker

    monkeypatch.setattr(worker, "print_to_stdstream", worker.print_to_stdstream)  # undone after the test
    ray_runtime._hide_ray_notices()
    worker.print_to_stdstream({**NOTICE, "is_err": False}, ignore_prefix=False)
    worker.print_to_stdstream({**ERROR, "is_err": False}, ignore_prefix=False)
    printed = capsys.readouterr().out
    assert ERROR["lines"][0] in printed and "worker processes" not in printed


def test_the_metrics_watcher_prints_each_new_row_of_a_run_once(tmp_path, capsys):
    import time

    from jbert_ray.pretrain.metrics import MetricsWatcher
    from jbert_ray.storage import Store

    run = Store(tmp_path)
    header = "step,loss,accuracy,tokens_per_s,elapsed_s\n"
    run.write_bytes("metrics.csv", (header + "10,5.5,0.12,3000,60\n").encode())
    with MetricsWatcher(run, budget_min=20, max_steps=100, every_s=0):
        time.sleep(1.5)
        run.write_bytes("metrics.csv", (header + "10,5.5,0.12,3000,60\n20,4.25,0.2,3100,120\n").encode())
        time.sleep(1.5)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["pretrain: step 10/100, loss 5.500, accuracy 12.0%, 3,000 tokens/s, 1.0/20 min",
                     "pretrain: step 20/100, loss 4.250, accuracy 20.0%, 3,100 tokens/s, 2.0/20 min"]  # fmt: skip
