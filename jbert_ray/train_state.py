"""Training state on disk: optimizer + step + RNG in a checkpoint (safetensors + JSON, no pickles), the run's
metrics (metrics.csv, TensorBoard, a loss/accuracy PNG), and the data position: the Ray Data input streams
(shards → mask_batch, a fresh draw per epoch) and where they restart after a resume or a failure.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from jbert_ray.errors import UserError
from jbert_ray.masking import mask_batch
from jbert_ray.shards import file_sha256

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "train_state.json"
PROGRESS_FILE = "progress.json"  # run dir: step of the latest persisted checkpoint (read by the data stream)
STREAM_FILE = "stream.json"  # run dir: where the current input stream starts (written by the data stream)
METRICS_FILE = "metrics.csv"
# Under a time budget the stream is planned for an upper bound of the training rate (sequences/s per worker;
# we measured 23/s for the mini preset on 2 CPU threads), and at most BUDGET_STREAM_EPOCHS epochs: each epoch is
# one read_parquet in a union, and Ray Data's executor cost grows with them (20 epochs: 110 s to the first batch,
# 0.67 CPU-s per second of training). A run that outruns the plan re-reads it (the same masks again).
BUDGET_SEQUENCES_PER_S_CPU = 256
BUDGET_SEQUENCES_PER_S_GPU = 65_536
BUDGET_STREAM_EPOCHS = 3
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


def read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # atomic: a reader never sees half a file


class MetricsLog:
    """Append metric rows to metrics.csv and TensorBoard; on resume, drop rows past the restored step."""

    def __init__(self, run_dir: str | os.PathLike, resume_step: int = 0):
        self.path = Path(run_dir) / METRICS_FILE
        rows = read_metrics(self.path) if self.path.exists() else []
        kept = [row for row in rows if row["step"] <= resume_step]
        with open(self.path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows({k: _csv_value(row.get(k)) for k in METRIC_COLUMNS} for row in kept)
        self._tensorboard = _tensorboard_writer(Path(run_dir) / "tensorboard", resume_step)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, METRIC_COLUMNS).writerow({k: _csv_value(row.get(k)) for k in METRIC_COLUMNS})
        if self._tensorboard is not None:
            for key, value in row.items():
                if key != "step" and value is not None and math.isfinite(value):
                    self._tensorboard.add_scalar(key, value, row["step"])
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Rows of a metrics.csv as dicts of floats (None where blank), `step` as int."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [
        {
            k: (int(float(v)) if k == "step" else float(v)) if v not in ("", None) else None
            for k, v in row.items()
        }
        for row in rows
    ]


def plot_curves(run_dir: str | os.PathLike) -> Path | None:
    """Write curves.png (train/valid loss and masked-token accuracy against step); None if nothing logged."""
    path = Path(run_dir) / METRICS_FILE
    rows = read_metrics(path) if path.exists() else []
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
    out = Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


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


@dataclass(frozen=True)
class ShardInfo:
    root: Path
    manifest: dict
    tokenizer_dir: Path
    tokenizer_sha256: str
    vocab_size: int
    max_seq_len: int
    train_files: list[Path]
    train_file_rows: list[int]
    valid_files: list[Path]
    valid_rows: int

    @property
    def train_rows(self) -> int:
        return sum(self.train_file_rows)


def inspect_shards(data_dir: str | os.PathLike) -> ShardInfo:
    """Read manifest.json and the parquet footers; raise a UserError on incomplete, empty or mismatched shards."""
    import pyarrow.parquet as pq

    root = Path(data_dir)
    manifest = read_json(root / "manifest.json")
    if not root.is_dir():
        raise UserError(f"--data {root} does not exist")
    if not isinstance(manifest, dict):
        raise UserError(f"{root} has no manifest.json: it is not a finished `jbert preprocess` output")
    tokenizer_dir = root / "tokenizer"
    if not (tokenizer_dir / "vocab.txt").is_file():
        raise UserError(f"{root} has no tokenizer/vocab.txt: rerun `jbert preprocess`")
    sha = file_sha256(tokenizer_dir / "vocab.txt")  # the manifest names the tokenizer by its vocab's hash
    if manifest.get("tokenizer_sha256") != sha:
        raise UserError(
            f"{root}: manifest tokenizer_sha256 {str(manifest.get('tokenizer_sha256'))[:12]}… does not match "
            f"tokenizer/vocab.txt ({sha[:12]}…): the shards were made with another tokenizer"
        )
    max_seq_len = int((manifest.get("config") or {}).get("max_seq_len") or 0)
    train_files = sorted((root / "train").glob("**/*.parquet"))
    valid_files = sorted((root / "valid").glob("**/*.parquet"))
    file_rows = [pq.read_metadata(f).num_rows for f in train_files]
    nonempty = [(f, n) for f, n in zip(train_files, file_rows) if n > 0]
    if not nonempty:
        raise UserError(f"{root}/train has no training sequences (no non-empty parquet files)")
    schema = pq.read_schema(nonempty[0][0])
    missing = [c for c in ("input_ids", "word_start") if c not in schema.names]
    if missing:
        raise UserError(f"{nonempty[0][0]} lacks columns {missing}: not a `jbert preprocess` shard")
    valid_rows = sum(pq.read_metadata(f).num_rows for f in valid_files)
    return ShardInfo(
        root=root,
        manifest=manifest,
        tokenizer_dir=tokenizer_dir,
        tokenizer_sha256=sha,
        vocab_size=len(_read_lines(tokenizer_dir / "vocab.txt")),
        max_seq_len=max_seq_len or 512,
        train_files=[f for f, _ in nonempty],
        train_file_rows=[n for _, n in nonempty],
        valid_files=[f for f in valid_files if pq.read_metadata(f).num_rows > 0],
        valid_rows=valid_rows,
    )


def epoch_order(num_files: int, seed: int, epoch: int) -> list[int]:
    """Shard file order of one epoch: a fresh permutation per epoch, the same one on every re-run."""
    return np.random.default_rng([seed, epoch]).permutation(num_files).tolist()


def plan_stream(
    file_rows: list[int], consumed: int, needed: int, seed: int
) -> tuple[int, list[tuple[int, list[int]]]]:
    """Which files an input stream reads to continue after `consumed` sequences and reach `needed` in total.

    Returns (start, [(epoch, file indices), ...]): `start` (≤ consumed) is the sequence the stream begins at,
    the start of the file holding sequence `consumed`, so readers skip consumed - start rows to be exact.
    """
    per_epoch = sum(file_rows)
    epoch = consumed // per_epoch
    order = epoch_order(len(file_rows), seed, epoch)
    first, start = 0, epoch * per_epoch
    while first < len(order) and start + file_rows[order[first]] <= consumed:
        start += file_rows[order[first]]
        first += 1
    plan = [(epoch, order[first:])]  # never empty: consumed lies inside this epoch and files hold rows
    covered = (epoch + 1) * per_epoch
    while covered < needed:
        epoch += 1
        plan.append((epoch, epoch_order(len(file_rows), seed, epoch)))
        covered += per_epoch
    return start, plan


def build_train_stream(spec: dict):
    """The training input: epochs of shards (file order reshuffled per epoch) → mask_batch, from the saved position.

    Called by Ray Train at every worker-group start, so after a failure the stream restarts where the latest
    checkpoint left off (to the file; workers skip the rest of the way) instead of at the corpus start.
    Reproducible: file order depends on (seed, epoch), masks on (seed, epoch, batch content); which rank gets
    which block is Ray's dynamic split, so a re-run sees the same sequences and masks, not the same per-rank order.
    """
    import ray.data

    # Runs in the controller. Progress comes from the metrics rows (progress.MetricsWatcher): Ray Data's bars for
    # this long stream would only redraw over those lines.
    ray.data.DataContext.get_current().enable_progress_bars = False
    run_dir = Path(spec["run_dir"])
    consumed = int((read_json(run_dir / PROGRESS_FILE) or {}).get("sequences", 0))
    start, epochs = plan_stream(spec["file_rows"], consumed, spec["sequences_needed"], spec["seed"])
    write_json(run_dir / STREAM_FILE, {"start_sequence": start, "consumed": consumed})
    parts = [
        ray.data.read_parquet(
            [spec["files"][i] for i in order], columns=["input_ids", "word_start"]
        ).map_batches(
            mask_batch, fn_kwargs={**spec["mask_kwargs"], "epoch": epoch}, num_cpus=spec["data_cpus"]
        )
        for epoch, order in epochs
    ]
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def build_valid_stream(spec: dict):
    """The valid set with one fixed mask draw (its own seed), so evaluations compare like with like."""
    import ray.data

    kwargs = {**spec["mask_kwargs"], "seed": spec["seed"] + 1, "epoch": 0}
    return ray.data.read_parquet(spec["valid_files"], columns=["input_ids", "word_start"]).map_batches(
        mask_batch, fn_kwargs=kwargs, num_cpus=spec["data_cpus"]
    )


def stream_spec(cfg, shards: ShardInfo, run_dir: Path) -> dict:
    """Plain data for the stream builders (they run in the Ray Train controller): files, counts, masking."""
    from jbert_ray.tokenizer import JapaneseTokenizer

    tokenizer = JapaneseTokenizer.from_pretrained(shards.tokenizer_dir)
    return {
        "run_dir": str(run_dir),
        "files": [str(p) for p in shards.train_files],
        "file_rows": shards.train_file_rows,
        "valid_files": [str(p) for p in shards.valid_files],
        "sequences_needed": _sequences_needed(cfg, shards),
        "seed": cfg.seed,
        "data_cpus": cfg.data_cpus,
        "mask_kwargs": {
            "vocab_size": tokenizer.vocab_size,
            "special_ids": sorted(tokenizer.special_ids),
            "mask_id": tokenizer.mask_token_id,
            "pad_id": tokenizer.pad_token_id,
            "max_seq_len": shards.max_seq_len,
            "config": cfg.masking,
            "seed": cfg.seed,
        },
    }


def _sequences_needed(cfg, shards: ShardInfo) -> int:
    """How long the stream must be: max_steps (+ one spare global batch: the equal split may drop up to
    num_workers - 1 rows at the end), or under a time budget, what the fastest plausible rate could use."""
    by_steps = (cfg.max_steps + 1) * cfg.global_batch_size
    if cfg.time_budget_min <= 0:
        return by_steps
    per_second = cfg.num_workers * (BUDGET_SEQUENCES_PER_S_GPU if cfg.use_gpu else BUDGET_SEQUENCES_PER_S_CPU)
    by_budget = min(math.ceil(60 * cfg.time_budget_min * per_second), BUDGET_STREAM_EPOCHS * shards.train_rows)
    return min(by_steps, by_budget) if cfg.max_steps else by_budget


def _read_lines(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines
