"""Scoring at scale (issue 25.6): `jbert score` on many rows, killed mid-run and resumed, as a user runs it.

The corpus is ja_train repeated (every line its own `path:line` id; repeated text flatters the tokenizer's word
cache, and the per-part statistics see the same values again), split into files of 100k rows. A randomly
initialised BERT L2 H128 scores it: this run is about state, not quality. The bench reads, every second, the peak
RSS (VmHWM) of the driver and of each scoring actor, kills the whole process group at half the rows, resumes, and
checks every id exactly once.

    python bench/score_scale.py --rows 1000000       # pll-strided k=4, bf16 weights: the fastest with Spearman ≥ 0.95
    python bench/score_scale.py --rows 200000        # a shorter run
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from results import machine, publish  # bench/ is the script's folder, first on sys.path
from score import make_model

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus" / "ja_train.jsonl.gz"
ROWS_PER_FILE = 100_000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--method", default="pll-strided")
    parser.add_argument(
        "--mask-stride", type=int, default=4, help="k of pll-strided (bench/score_methods.py)"
    )
    parser.add_argument("--dtype", default="bfloat16", help="scoring weights: float32, bfloat16 or auto")
    parser.add_argument("--work", type=Path, default=None, help="keep the corpus, model and output here")
    args = parser.parse_args()
    at_start = machine()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpus = write_corpus(work / "corpus", args.rows)
        model = make_model(work / "model") if not (work / "model").is_dir() else work / "model"
        out = work / "scores"
        command = [sys.executable, "-m", "jbert_ray.cli", "score", "--input", str(corpus), "--model", str(model),
                   "--out", str(out), "--method", args.method, "--mask-stride", str(args.mask_stride), "--dtype", args.dtype,
                   "--num-cpus", "2", "--overwrite"]  # fmt: skip
        first = run(command, kill_at=args.rows // 2, out=out)
        second = run([*command[:-1], "--resume"], kill_at=None, out=out)
        ids = scored_ids(out)
    expected = args.rows
    rows = [
        ["rows scored, every id exactly once", f"{len(ids):,} ids, {len(set(ids)):,} distinct of {expected:,}",
         "yes" if len(ids) == len(set(ids)) == expected else "**no**"],
        ["rows kept by the killed run", f"{first['kept']:,}", ""],
        ["driver peak RSS at 100k rows / at the end (MB)", f"{first['driver_at_100k']:.0f} / {second['driver']:.0f}",
         f"{second['driver'] / first['driver_at_100k']:.3g}"],
        ["largest actor peak RSS at 100k rows / at the end (MB)",
         f"{first['actor_at_100k']:.0f} / {second['actor']:.0f}", f"{second['actor'] / first['actor_at_100k']:.3g}"],
        ["sentences/s, killed run / resumed run (start-up included)", f"{first['rate']:.1f} / {second['rate']:.1f}", ""],
    ]  # fmt: skip
    notes = [
        f"{args.rows:,} rows of ja_train repeated (repeats flatter the tokenizer's cache), method {args.method} "
        f"(k={args.mask_stride}, {args.dtype}), BERT L2 H128 random init, 2 CPUs; the killed run was SIGKILLed "
        "(with every process of its session) at half the rows. Targets: peak RSS at the end ÷ at 100k ≤ 1.2 for "
        "the driver and the actors; 0 lost or duplicated ids."
    ]
    publish("score_scale", f"Scoring at scale: {args.rows:,} rows, kill and resume", ["what", "measured", "ratio"],
            rows, notes, at_start)  # fmt: skip


def write_corpus(folder: Path, rows: int) -> Path:
    if folder.is_dir() and sum(1 for _ in folder.glob("*.jsonl")) == -(-rows // ROWS_PER_FILE):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        lines = [json.dumps({"text": json.loads(line)["text"]}, ensure_ascii=False) + "\n" for line in f]
    written = 0
    for part in range(-(-rows // ROWS_PER_FILE)):
        n = min(ROWS_PER_FILE, rows - written)
        with open(folder / f"part-{part:03d}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(lines[(written + i) % len(lines)] for i in range(n))
        written += n
    return folder


def run(command: list[str], kill_at: int | None, out: Path) -> dict:
    """Run `jbert score`, sampling peak RSS; SIGKILL it and its whole session once `kill_at` rows are written."""
    kept_before = kept_rows(out)
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    peaks = {"driver": 0.0, "actor": 0.0, "driver_at_100k": 0.0, "actor_at_100k": 0.0}
    started = time.perf_counter()
    stderr_tail: list[str] = []
    reader = threading.Thread(target=lambda: stderr_tail.extend(process.stderr), daemon=True)
    reader.start()
    while process.poll() is None:
        kept = kept_rows(out)
        peaks["driver"] = max(peaks["driver"], peak_rss_mb(process.pid))
        peaks["actor"] = max(
            [peaks["actor"], *(peak_rss_mb(p) for p in session_pids(process.pid, b"CorpusScorer"))]
        )
        if kept < 100_000:
            peaks["driver_at_100k"], peaks["actor_at_100k"] = peaks["driver"], peaks["actor"]
        if kill_at is not None and kept >= kill_at:
            for pid in [
                process.pid,
                *session_pids(process.pid),
            ]:  # Ray's workers have process groups of their own
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            break
        time.sleep(1.0)
    process.wait()
    seconds = time.perf_counter() - started
    if kill_at is None and process.returncode != 0:
        raise SystemExit("".join(stderr_tail[-20:]))
    kept = kept_rows(out)
    print(f"{'killed' if kill_at else 'resumed'} run: {kept:,} rows kept after {seconds:.0f} s", flush=True)
    return {**peaks, "kept": kept, "rate": (kept - kept_before) / seconds}  # the rows this run scored


def kept_rows(out: Path) -> int:
    total = 0
    for record in (out / "done").glob("*/*.json"):
        try:
            total += json.loads(record.read_text())["stats"]["rows"]
        except (OSError, ValueError):
            continue
    return total


def session_pids(root: int, marker: bytes = b"") -> list[int]:
    """Processes of the session `root` leads (the Ray it started, workers included) whose cmdline has `marker`."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            pid = int(cmdline.parent.name)
            if pid != root and os.getsid(pid) == root and marker in cmdline.read_bytes():
                pids.append(pid)
        except (OSError, ValueError):
            continue
    return pids


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def scored_ids(out: Path) -> list[str]:
    import pyarrow.parquet as pq

    return [i for part in sorted((out / "parts").glob("*.parquet"))
            for i in pq.read_table(part, columns=["id"]).column("id").to_pylist()]  # fmt: skip


if __name__ == "__main__":
    main()
