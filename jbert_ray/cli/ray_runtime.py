"""The Ray a `jbert` command runs on: connect to (or start) Ray; keep Ray's own output (its loggers, the
raylet's notices, the C++ core's lines on fd 2) out of the user's terminal; Ray Data's progress bars; SIGTERM
as Ctrl-C."""

from __future__ import annotations

import atexit
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# A line of Ray's C++ logging (`[2026-11-30 12:47:31,066 E 26963 26963] core_worker.cc:2465: ...`), below FATAL.
_RAY_NATIVE_LOG_LINE = re.compile(rb"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWE] \d+ \d+\] [\w./-]+:\d+: ")
# Notices the raylet sends every driver that are about Ray's own processes, not about the job: the worker pool's
# size (our stages start an actor pool, a trainer and Ray Data's coordinators: several processes per CPU by design;
# it stays in raylet.out) and Serve's controller ending itself during `serve.shutdown()`.
_RAY_NOTICES = ("worker processes have been started on node", "Task ServeController.graceful_shutdown failed")


def init_ray(num_cpus: int | None = None, show_progress: bool = True, verbose: bool = False) -> None:
    """Connect to the cluster under `ray job submit` (RAY_ADDRESS is set), else start a local Ray.

    Workers' and system actors' logs stay in Ray's log directory unless `verbose`: our own progress lines and
    summaries are what a user reads, and errors still reach the driver as exceptions. Ray Data's bars are drawn
    only on a terminal (redirected to a file they are pages of escape codes)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not verbose:  # Ray's forwarded lines without colour codes (redirected to a file they are noise)
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    import ray
    import ray.data

    if not verbose:  # ray.init's notice that a local cluster has token authentication on (its secure default)
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # Before ray.init: connecting already logs (e.g. "Failed to determine local IP via external connectivity"
        # on a host without a route outside). Registered before Ray's own exit hook, so it runs after Ray's shutdown.
        _keep_native_ray_lines_in_logs()
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=verbose)
        else:
            # address="local": never attach by accident to a cluster some `ray start` left on this machine.
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, configure_logging=False,
                     log_to_driver=verbose)  # fmt: skip
    bars = show_progress and sys.stderr.isatty()
    ray.data.DataContext.get_current().enable_progress_bars = bars
    if not verbose:
        # Ray Data's and Serve's INFO lines (execution plans, "finished in") stay in Ray's logs, and Ray Data's notice
        # that bars are off (we turned them off: a file full of escape codes helps nobody) is not printed.
        for handler in logging.getLogger("ray.data").handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setLevel(logging.WARNING)
        import ray.serve  # its import sets its logger to INFO: import it first, then quiet it

        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # "Started Serve", "Application is ready"
        if not bars:
            from ray.util.debug import log_once

            log_once("ray_data_progress_manager_disabled")
        _hide_ray_notices()


def _hide_ray_notices() -> None:
    """Drop `_RAY_NOTICES` from what the raylet sends the driver; the same channel carries real errors, which
    still print. Ray has no logging setting for these: the worker-pool warning is a raylet error report keyed
    only to the startup concurrency (a scheduling knob), and Serve's notice is a task failure."""
    from ray._private import worker

    print_to_stdstream = getattr(worker, "print_to_stdstream", None)  # what Ray's error listener calls
    if print_to_stdstream is None or getattr(print_to_stdstream, "jbert_filtered", False):
        return

    def without_notices(*args, **kwargs) -> None:  # any signature: a Ray upgrade must not break its errors
        data = args[0] if args else kwargs.get("data")
        if not _is_only_notices(data):
            print_to_stdstream(*args, **kwargs)

    without_notices.jbert_filtered = True
    worker.print_to_stdstream = without_notices


def _is_only_notices(data: object) -> bool:
    """Whether `data` is Ray's `{"lines": [...], ...}` holding only `_RAY_NOTICES`; any other shape prints."""
    lines = data.get("lines") if isinstance(data, dict) else None
    return (
        isinstance(lines, list)
        and len(lines) > 0
        and all(isinstance(line, str) and any(notice in line for notice in _RAY_NOTICES) for line in lines)
    )


def _keep_native_ray_lines_in_logs() -> None:
    """Ray's C++ core worker in this process writes its errors to stderr as well as to its log file
    (python-core-driver-*.log), e.g. that Ray Data's actor pools keep constructor arguments in the object
    store, and what it logs before that file is open to stderr alone (no route out to find the node's IP by:
    Ray's other processes log that to their files). Route the process's stderr through a filter that drops
    those lines; Python's own writes bypass it. Only where stderr is still the process's own (not under
    pytest's capture, which `jbert` commands run in-process meet).

    Ray has no setting for this: RAY_BACKEND_LOG_LEVEL is one threshold for the log files and stderr alike,
    and the raylet and GCS a local Ray starts inherit it (`fatal` left all their log files empty);
    ray.LoggingConfig configures Python's loggers only."""
    if sys.stderr is not sys.__stderr__ or sys.__stderr__ is None:
        return
    sys.stderr.flush()
    real_stderr = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = os.fdopen(os.dup(real_stderr), "w", buffering=1, encoding="utf-8", errors="backslashreplace")
    forwarder = threading.Thread(
        target=_forward_without_ray_lines,
        args=(read_end, real_stderr),
        name="jbert-stderr-filter",
        daemon=True,
    )
    forwarder.start()

    def restore() -> None:
        os.dup2(real_stderr, 2)  # closes the pipe's write end: the forwarder reads to the end and stops
        forwarder.join(timeout=1)

    atexit.register(restore)


def _forward_without_ray_lines(read_fd: int, write_fd: int) -> None:
    """Copy lines from `read_fd` to `write_fd` less Ray's native log lines, until all writers close `read_fd`.

    Reads to the end whatever `write_fd` does: a filter that stopped would block every native writer in the
    process once the pipe is full (64 KiB), or fail their writes once its end is closed. A line that cannot be
    written (EPIPE once the reader of our stderr has gone, EIO after a terminal hangup) is dropped, as a gone
    terminal would drop it; the next one is tried."""
    with os.fdopen(read_fd, "rb") as lines:
        for line in lines:
            if _RAY_NATIVE_LOG_LINE.match(line):
                continue
            try:
                while line:  # os.write may write part of a line
                    line = line[os.write(write_fd, line) :]
            except OSError:
                pass


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM (what Kubernetes, systemd and `timeout` send) raises KeyboardInterrupt like SIGINT does, so a long
    run unwinds through its `finally` blocks instead of dying mid-write."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def stop_ray_and_its_processes() -> Iterator[None]:
    """After the block, shut down the Ray this process started and kill what of its process tree survived it
    (a HAProxy a killed actor left behind), so that a stopped command leaves nothing running or listening."""
    import ray

    try:
        yield
    finally:
        started = process_tree(os.getpid())
        ray.shutdown()
        for pid in filter(is_alive, started):  # an orphan is no longer our descendant, but it is still alive
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def process_tree(root: int) -> set[int]:
    """Pids under `root` in the process tree (Linux /proc; an empty set elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # the name may hold spaces and ")"
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def is_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
