"""Benchmark tables: printed as Markdown and kept as bench/results/NAME.json, from which bench/report.py builds the
benchmark tables of docs/benchmarks.md (no figure is typed by hand)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """What the figures were measured on: CPU model and the CPUs this process may use, GPU if any, date."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {
        "cpu": cpu,
        "cpus": len(os.sched_getaffinity(0)),
        "gpu": gpu,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "load_average_at_start": round(os.getloadavg()[0], 2),
    }


def publish(name: str, title: str, columns: list[str], rows: list[list], notes: list[str] = (),
            at_start: dict | None = None) -> Path:  # fmt: skip
    """Print the table and write it with the machine's description to bench/results/NAME.json."""
    print(f"\n### {title}\n")
    print(markdown(columns, rows))
    for note in notes:
        print(f"\n{note}")
    record = {
        "name": name,
        "title": title,
        "command": shlex.join(["python", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        "machine": at_start or machine(),
        "columns": columns,
        "rows": [[str(cell) for cell in row] for row in rows],
        "notes": list(notes),
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"\n(written to {path})", flush=True)
    return path


def markdown(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
