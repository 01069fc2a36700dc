"""A run's metrics: rows made from step windows (summed over ranks), kept in RUN/metrics.csv and TensorBoard,
plotted to curves.png, and printed on the driver by `MetricsWatcher` while training runs."""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from jbert_ray.pretrain.step import all_reduce
from jbert_ray.progress import BackgroundLoop
from jbert_ray.storage import Store

METRICS_FILE = "metrics.csv"
METRIC_COLUMNS = (
    "step",
    "loss",
    "accuracy",
    "lr",
    "tokens_per_s",
    "grad_norm",
    "eval_loss",
    "eval_accuracy",
    "tokens",  # non-pad tokens trained on since step 0, all workers (the x axis of learning-efficiency plots)
    "elapsed_s",  # training time since step 0, carried across resumes
)


class Window:
    """Step statistics since the last metric row."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.steps, self.totals, self.grad_norm = 0, torch.zeros(4, dtype=torch.float64), 0.0
        self.started = time.perf_counter()

    def add(self, stats: dict) -> None:
        self.steps += 1
        self.totals += stats["totals"]
        self.grad_norm = stats["grad_norm"]


class StepMetrics:
    """Metric rows from windows of steps, summed over all ranks (every rank calls `row` at the same steps) and
    written by rank 0's `log`; counts the non-pad tokens trained on since step 0."""

    def __init__(self, device: torch.device, tokens: float, log: MetricsLog | None):
        self.device, self.tokens, self.log = device, tokens, log
        self.rows = 0  # rows written since this worker (re)started: none = the first batch is still to come

    def row(self, step: int, lr: float, window: Window, elapsed: float) -> dict:
        """The metric row of `window`'s steps on all ranks."""
        totals = all_reduce(window.totals.clone(), self.device)  # every rank takes part: same collectives
        self.tokens += totals[3].item()
        predicted = max(totals[2].item(), 1)
        return {
            "step": step,
            "loss": totals[0].item() / predicted if window.steps else None,
            "accuracy": totals[1].item() / predicted if window.steps else None,
            "lr": lr,
            "tokens_per_s": totals[3].item() / max(time.perf_counter() - window.started, 1e-9),
            "grad_norm": window.grad_norm,
            "tokens": self.tokens,
            "elapsed_s": elapsed,
        }

    def write(self, row: dict) -> None:
        if self.log is not None:
            self.log.write(row)
        self.rows += 1

    def sync(self) -> None:
        """At checkpoints: copy rank 0's TensorBoard files to a remote run dir."""
        if self.log is not None:
            self.log.sync()

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


class MetricsLog:
    """Metric rows to RUN/metrics.csv (rewritten whole each time: the run dir may be an object store, where
    nothing appends) and to TensorBoard; on resume, rows past the restored step are dropped."""

    def __init__(self, run: Store, resume_step: int = 0):
        self.run = run
        self.rows = [row for row in metrics_rows(run) if row["step"] <= resume_step]
        self._save()
        # TensorBoard writes local files; a remote run dir gets them at sync() (checkpoints) and close().
        self._tensorboard_dir = (Path(run.location) if not run.is_remote else Path(tempfile.mkdtemp())) / "tensorboard"
        self._tensorboard = _tensorboard_writer(self._tensorboard_dir, resume_step)

    def write(self, row: dict) -> None:
        self.rows.append(row)
        self._save()
        if self._tensorboard is not None:
            for key, value in row.items():
                if key != "step" and value is not None and math.isfinite(value):
                    self._tensorboard.add_scalar(key, value, row["step"])
            self._tensorboard.flush()

    def sync(self) -> None:
        """Copy the TensorBoard files to a remote run dir."""
        if self.run.is_remote and self._tensorboard is not None:
            self.run.upload(self._tensorboard_dir, "tensorboard")

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self.sync()

    def _save(self) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows({k: _csv_value(row.get(k)) for k in METRIC_COLUMNS} for row in self.rows)
        self.run.write_text(METRICS_FILE, text.getvalue())


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Rows of a metrics.csv file as dicts of floats (None where blank), `step` as int."""
    return _parse_metrics(Path(path).read_text(encoding="utf-8"))


def metrics_rows(run: Store) -> list[dict]:
    """The rows of a run dir's metrics.csv; none if it has none yet."""
    try:
        return _parse_metrics(run.read_text(METRICS_FILE))
    except FileNotFoundError:
        return []


def _parse_metrics(text: str) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    return [
        {
            k: (int(float(v)) if k == "step" else float(v)) if v not in ("", None) else None
            for k, v in row.items()
        }
        for row in rows
    ]


def plot_curves(run: Store) -> str | None:
    """Write RUN/curves.png (train/valid loss and masked-token accuracy against step); None if nothing logged."""
    rows = metrics_rows(run)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        for prefix, style in (("", "-"), ("eval_", "o-")):
            points = [(r["step"], r[prefix + key]) for r in rows if r.get(prefix + key) is not None]
            if points:
                ax.plot(*zip(*points), style, label=("valid " if prefix else "train ") + key)
        ax.set_xlabel("step")
        ax.set_title(f"masked-LM {key}")
        ax.legend()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    run.write_bytes("curves.png", image.getvalue())
    return run.child("curves.png").location


class MetricsWatcher(BackgroundLoop):
    """While training runs, print each new row of a run dir's metrics.csv (at most every `every_s`) on stderr."""

    def __init__(self, run, budget_min: float = 0.0, max_steps: int = 0, every_s: float = 10.0):
        super().__init__("metrics-watcher", 1.0)
        self.run, self.budget_min, self.max_steps, self.every_s = run, budget_min, max_steps, every_s
        self._shown_step, self._last = -1, 0.0

    def tick(self) -> None:
        try:
            rows = metrics_rows(self.run)
        except (ValueError, OSError):  # a row half written: read it next time
            return
        if rows and rows[-1]["step"] != self._shown_step and time.perf_counter() - self._last >= self.every_s:
            self._shown_step, self._last = rows[-1]["step"], time.perf_counter()
            print(self.line(rows[-1]), file=sys.stderr, flush=True)

    def line(self, row: dict) -> str:
        """`pretrain: step 120/1,000, loss 5.123, accuracy 21.3%, 3,010 tokens/s, 6.0/20 min` (+ valid)."""
        step = f"step {row['step']:,}" + (f"/{self.max_steps:,}" if self.max_steps else "")
        fields = [step]
        if row.get("loss") is not None:
            fields.append(f"loss {row['loss']:.3f}, accuracy {row['accuracy']:.1%}")
        fields.append(f"{row['tokens_per_s']:,.0f} tokens/s")
        if row.get("elapsed_s") is not None:
            budget = f"/{self.budget_min:g}" if self.budget_min else ""
            fields.append(f"{row['elapsed_s'] / 60:.1f}{budget} min")
        if row.get("eval_loss") is not None:
            fields.append(f"valid loss {row['eval_loss']:.3f}, accuracy {row['eval_accuracy']:.1%}")
        return "pretrain: " + ", ".join(fields)


def _csv_value(value):
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def _tensorboard_writer(log_dir: Path, resume_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; metrics.csv is always written
        return None
    return SummaryWriter(str(log_dir), purge_step=resume_step + 1 if resume_step else None)
