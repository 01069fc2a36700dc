"""What every `jbert` command shares: its subparser, the Ray and corpus flags, the local Ray, summary counts."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

CORPUS_HELP = "file, folder or glob of .jsonl/.txt/.parquet (optionally .gz); local path or s3://, gs://, hdfs://"


def add_command(commands, name: str, help: str, handler: Callable) -> argparse.ArgumentParser:
    """A subcommand whose --help shows its defaults; `handler(args)` runs it."""
    sub = commands.add_parser(
        name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    sub.set_defaults(handler=handler)
    return sub


def add_ray_flags(sub: argparse.ArgumentParser) -> None:
    """--num-cpus for the local Ray a standalone run starts, and --no-progress."""
    sub.add_argument(
        "--num-cpus", type=int, default=None,
        help="CPUs of the local Ray started when not under `ray job submit` (default: all)",
    )
    sub.add_argument("--no-progress", action="store_true", help="hide progress bars and progress lines")


def add_corpus_flags(sub: argparse.ArgumentParser) -> None:
    """The corpus flags `jbert vocab` and `jbert preprocess` share (the same readers and cleaning)."""
    sub.add_argument(
        "--input", required=True, metavar="CORPUS",
        help=CORPUS_HELP,
    )
    sub.add_argument("--text-field", default="text", help="JSON field or parquet column holding the text")
    sub.add_argument(
        "--normalization", default="NFKC", choices=["NFKC", "NFC", "none"], help="Unicode normalization"
    )
    sub.add_argument(
        "--keep-non-japanese", action="store_true",
        help="keep records without kana or kanji (rejected as no_japanese by default)",
    )


def init_ray(num_cpus: int | None = None, show_progress: bool = True) -> None:
    """Connect to the cluster under `ray job submit` (RAY_ADDRESS is set), else start a local Ray."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import ray.data

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            # address="local": never attach by accident to a cluster some `ray start` left on this machine.
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = show_progress


def by_reason(counts: dict[str, int]) -> str:
    """`empty=3, invalid_json=1` (or `none`) for summary lines."""
    return ", ".join(f"{reason}={count:,}" for reason, count in sorted(counts.items())) or "none"
