"""What pretraining bought, downstream: the 20-minute models of bench/quality.py (ours and the fair HF ModernBERT
peer) and the same architecture from random weights, fine-tuned on JGLUE with one `jbert evaluate` sweep each.

    python bench/downstream.py                    # ~2.5 h on 2 CPUs: 2 × 20 min pretraining, 3 sweeps, parallelism
    python bench/downstream.py --phases sweeps    # reuse the quality models kept under --work

Phases:
  sweeps    `jbert evaluate --from-scratch` on ours (the ≤ 30-minute target: mini dims, both tasks, 2 learning rates
            × 2 seeds, CPU defaults), then `jbert evaluate` on the peer's model: one table, seed spread shown
  parallel  the same 2 JSTS trials (1,000 examples) on a 2-CPU Ray (2 trials at once, 1 CPU each), on a 1-CPU Ray
            (one at a time), and one at a time with 2 CPUs each (2 torch threads): sweep wall time each
Every `jbert evaluate` is run as a user runs it (a fresh local Ray each, its start-up counted).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from quality import trained_runs
from results import machine, publish

JGLUE = REPO.parent / "shared" / "jglue"
TASK_METRICS = [("jsts", "pearson"), ("jsts", "spearman"), ("jcommonsenseqa", "accuracy")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="pretraining budget of the quality models")
    parser.add_argument("--work", default="/tmp/jbert_quality", help="bench/quality.py's work dir (models kept)")
    parser.add_argument("--data", default=str(JGLUE), help="JGLUE folder")
    parser.add_argument("--phases", default="sweeps,parallel")
    parser.add_argument("--reuse", action="store_true", help="print the tables again from the sweeps kept in --work")
    args = parser.parse_args()
    work, phases = Path(args.work), args.phases.split(",")
    at_start = machine()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (an idle machine reads ~0)", flush=True)
    if "sweeps" in phases:
        models = {r["label"]: r for r in trained_runs(work, ["ours", "hf-modernbert"], args.minutes)}
        sweeps(work, models, args.data, args.minutes, at_start, args.reuse)
    if "parallel" in phases:
        models = {r["label"]: r for r in trained_runs(work, ["ours"], args.minutes)}
        parallel(work, models["ours"]["model_dir"], args.data, at_start, args.reuse)


def sweeps(work: Path, models: dict, data: str, minutes: float, at_start: dict, reuse: bool) -> None:
    ours = evaluate(work / "eval" / "ours", models["ours"]["model_dir"], data, "--from-scratch", reuse=reuse)
    peer = evaluate(work / "eval" / "hf-modernbert", models["hf-modernbert"]["model_dir"], data, reuse=reuse)
    rows = [
        [f"ours: `jbert pretrain --time-budget {minutes:g}`", *cells(ours["results"], "pretrained")],
        [f"hf-modernbert: Trainer + ModernBERT's recipe, {minutes:g} min", *cells(peer["results"], "pretrained")],
        ["from scratch (same architecture and dims, random weights)", *cells(ours["results"], "from-scratch")],
        *[[name, *(f"{scores[t][m]:.3f}" for t, m in TASK_METRICS)]
          for name, scores in ours["results"]["published"].items()],
    ]  # fmt: skip
    r = ours["results"]
    margins = []
    for task, metric in TASK_METRICS:
        pre, scratch = r["tasks"][task]["pretrained"][metric], r["tasks"][task]["from-scratch"][metric]
        spread = max(pre["std"], scratch["std"])
        above = pre["mean"] - scratch["mean"] > spread
        verdict = "above by more than the seed spread" if above else "NOT above by more than the seed spread"
        margins.append(f"{task} {metric}: ours − from-scratch = {pre['mean'] - scratch['mean']:+.3f} (largest seed std "
                       f"{spread:.3f}): {verdict}")  # fmt: skip
    target = "met" if ours["wall_s"] <= 30 * 60 else "NOT met"
    notes = [
        (f"`jbert evaluate --from-scratch` on ours ({len(r['trials'])} trials: both tasks × pretrained/from-scratch "
         f"× learning rates {r['settings']['learning_rates']} × seeds {r['settings']['seeds']}): "
         f"{ours['wall_s'] / 60:.1f} min wall, Ray start-up included (target ≤ 30 min: {target}); the peer's sweep "
         f"{peer['wall_s'] / 60:.1f} min."),
        *margins,
        ("Cells: dev mean ± std over seeds at the learning rate with the best mean (in brackets). Training examples "
         "per task: " + ", ".join(f"{t} {n:,} of {r['train_rows'][t]:,}" for t, n in r["train_examples"].items())
         + " (the CPU default cap); dev sets whole: " + ", ".join(f"{t} {n:,}" for t, n in r["valid_examples"].items())
         + "."),
        (f"Pretraining (bench/quality.py, {minutes:g} min each): ours {models['ours']['accuracy']:.1%} valid "
         f"masked-token accuracy, hf-modernbert {models['hf-modernbert']['accuracy']:.1%}."),
    ]  # fmt: skip
    publish("downstream", f"Downstream: JGLUE dev scores of {minutes:g}-minute models (2 CPUs)",
            ["model", *(f"{t} {m}" for t, m in TASK_METRICS)], rows, notes, at_start=at_start)  # fmt: skip


def parallel(work: Path, model_dir: str, data: str, at_start: dict, reuse: bool) -> None:
    grid = ["--tasks", "jsts", "--learning-rates", "1e-4", "--seeds", "0,1", "--max-train-examples", "1000"]
    runs = [
        ("2 trials at once (2-CPU Ray, 1 CPU per trial)", ["--num-cpus", "2", "--cpus-per-trial", "1"]),
        ("one at a time (1-CPU Ray, 1 CPU per trial)", ["--num-cpus", "1", "--cpus-per-trial", "1"]),
        ("one at a time, 2 CPUs per trial (2-CPU Ray)", ["--num-cpus", "2", "--cpus-per-trial", "2"]),
    ]
    measured = [(label, evaluate(work / "eval" / f"parallel-{i}", model_dir, data, *grid, *flags, reuse=reuse))
                for i, (label, flags) in enumerate(runs)]  # fmt: skip
    together = measured[0][1]["wall_s"]
    rows = [[label, f"{m['wall_s']:.0f} s", f"{m['wall_s'] / together:.3g}×",
             f"{m['results']['tasks']['jsts']['pretrained']['pearson']['mean']:.3f}"]
            for label, m in measured]  # fmt: skip
    speedup = measured[1][1]["wall_s"] / together
    publish("evaluate-parallel", "Ray Tune trials in parallel: one JSTS sweep of 2 trials (2 CPUs)",
            ["how", "sweep wall time", "÷ 2 at once", "JSTS Pearson (mean)"], rows,
            [(f"2 trials at once ÷ one at a time: {speedup:.3g}× "
              f"(target ≥ 1.6: {'met' if speedup >= 1.6 else 'NOT met'}); "
              "each sweep is a fresh `jbert evaluate` (its Ray start-up counted).")], at_start=at_start)  # fmt: skip


def evaluate(out: Path, model_dir: str, data: str, *flags: str, reuse: bool = False) -> dict:
    """`jbert evaluate` as a user runs it, timed; its results.json (the kept one with `reuse`)."""
    command = [sys.executable, "-m", "jbert_ray.cli", "evaluate", "--model", model_dir, "--data", data,
               "--out", str(out), "--overwrite", *flags]  # fmt: skip
    kept = out / "results.json"
    if reuse and kept.exists():
        results = json.loads(kept.read_text())
        return {"wall_s": results["wall_s"], "results": results}
    print("$ jbert " + " ".join(command[3:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    results = {**json.loads(kept.read_text()), "wall_s": time.perf_counter() - started}
    kept.write_text(json.dumps(results, ensure_ascii=False, indent=1))  # the wall time, for --reuse
    return {"wall_s": results["wall_s"], "results": results}


def cells(results: dict, init: str) -> list[str]:
    found = results["tasks"]
    return [f"{found[t][init][m]['mean']:.3f} ± {found[t][init][m]['std']:.3f} "
            f"(lr {found[t][init]['best_learning_rate']:g})" for t, m in TASK_METRICS]


if __name__ == "__main__":
    main()
