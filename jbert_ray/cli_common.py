"""What every `jbert` command shares: its subparser, the Ray flags, the local Ray, summary counts."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable


def add_command(
    commands, selected: str | None, name: str, help: str, add_flags: Callable, handler: Callable
) -> None:
    """A subcommand whose --help shows its defaults; `handler(args)` runs it. Its flags are added only when it is
    the command being run (`selected`): they come from config classes whose modules import torch or Ray, which
    `jbert --help` should not wait for."""
    sub = commands.add_parser(
        name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    sub.set_defaults(handler=handler)
    if selected == name:
        add_flags(sub)


def add_ray_flags(sub: argparse.ArgumentParser, progress: bool = True) -> None:
    """--num-cpus for the local Ray a standalone run starts, --verbose, and --no-progress for long work."""
    sub.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="CPUs of the local Ray a standalone run starts (not under `ray job submit`); None = all",
    )
    if progress:
        sub.add_argument("--no-progress", action="store_true", help="hide progress bars and progress lines")
    sub.add_argument(
        "--verbose",
        action="store_true",
        help="also show the logs of Ray's workers and system actors (otherwise only in Ray's log directory)",
    )


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


def by_reason(counts: dict[str, int]) -> str:
    """`empty=3, invalid_json=1` (or `none`) for summary lines."""
    return ", ".join(f"{reason}={count:,}" for reason, count in sorted(counts.items())) or "none"
