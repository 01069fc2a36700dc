"""Training state on disk: optimizer + step + RNG in a checkpoint (safetensors + JSON, no pickles), and the
run's metrics (metrics.csv, TensorBoard, a loss/accuracy PNG)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path

import torch

from jbert_ray.storage import Store

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "train_state.json"
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


def save_train_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer, step: int, **extra) -> None:
    """Write the optimizer state (tensors → safetensors, the rest → JSON), step, torch RNG and `extra`."""
    from safetensors.torch import save_file

    path = Path(path)
    state = optimizer.state_dict()
    tensors = {
        f"state.{index}.{name}": value.detach().cpu().contiguous()
        for index, param_state in state["state"].items()
        for name, value in param_state.items()
        if torch.is_tensor(value)
    }
    scalars = {
        str(index): {name: value for name, value in param_state.items() if not torch.is_tensor(value)}
        for index, param_state in state["state"].items()
    }
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(path / OPTIMIZER_FILE))
    record = {"step": step, "param_groups": state["param_groups"], "scalar_state": scalars, **extra}
    (path / STATE_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def load_train_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore what `save_train_state` wrote into `optimizer` and the torch RNG; return the JSON record."""
    from safetensors.torch import load_file

    path = Path(path)
    record = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    tensors = load_file(str(path / OPTIMIZER_FILE))
    torch.set_rng_state(tensors.pop("rng.torch"))
    if optimizer is not None:
        param_state: dict[int, dict] = {int(i): dict(v) for i, v in record["scalar_state"].items()}
        for key, value in tensors.items():
            _, index, name = key.split(".", 2)
            param_state.setdefault(int(index), {})[name] = value
        groups = [
            {**group, "betas": tuple(group["betas"])} if "betas" in group else group
            for group in record["param_groups"]
        ]
        optimizer.load_state_dict({"state": param_state, "param_groups": groups})
    return record


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


# ---------------------------------------------------------------- shards and data position
