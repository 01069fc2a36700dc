"""What every `jbert` command shares: its subparser, the Ray flags, summary counts."""

from __future__ import annotations

import argparse
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
        dest="ray_num_cpus",  # not `num_cpus`: that is a setting of ServeArgs (--replica-cpus)
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


def by_reason(counts: dict[str, int]) -> str:
    """`empty=3, invalid_json=1` (or `none`) for summary lines."""
    return ", ".join(f"{reason}={count:,}" for reason, count in sorted(counts.items())) or "none"
