"""The training input: Ray Data streams of shards → `mask_batch` (a fresh draw per epoch), planned so that a
resumed or restarted run continues where its latest checkpoint left off.
"""

from __future__ import annotations

import math

import numpy as np

from jbert_ray.masking import mask_batch
from jbert_ray.pretrain.config import PretrainConfig
from jbert_ray.shards import ShardInfo
from jbert_ray.storage import Store, local_copy

PROGRESS_FILE = "progress.json"  # run dir: step of the latest persisted checkpoint (read by the data stream)
STREAM_FILE = "stream.json"  # run dir: where the current input stream starts (written by the data stream)
# Under a time budget the stream is planned for an upper bound of the training rate (sequences/s per worker;
# we measured 23/s for the mini preset on 2 CPU threads), and at most BUDGET_STREAM_EPOCHS epochs: each epoch is
# one read_parquet in a union, and Ray Data's executor cost grows with them (20 epochs: 110 s to the first batch,
# 0.67 CPU-s per second of training). A run that outruns the plan re-reads it (the same masks again).
BUDGET_SEQUENCES_PER_S_CPU = 256
BUDGET_SEQUENCES_PER_S_GPU = 65_536
BUDGET_STREAM_EPOCHS = 3


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


def batches_to_skip(run: Store, cfg: PretrainConfig, step: int, world_size: int) -> int:
    """Micro-batches each rank skips to resume at `step`: the stream restarts at the start of a file."""
    stream = run.read_json(STREAM_FILE)  # written before every start of the stream: missing means lost
    if not isinstance(stream, dict) or "start_sequence" not in stream:
        raise RuntimeError(f"{run.child(STREAM_FILE)} is missing: cannot tell where the input stream starts")
    consumed = max(0, step * cfg.global_batch_size - int(stream["start_sequence"]))
    return consumed // world_size // cfg.micro_batch_size


def save_position(run: Store, step: int, sequences: int) -> None:
    """Record where the latest persisted checkpoint is: a restarted stream starts there, not at the corpus start."""
    run.write_json(PROGRESS_FILE, {"step": step, "sequences": sequences})


def build_train_stream(spec: dict):
    """The training input: epochs of shards (file order reshuffled per epoch) → mask_batch, from the saved position.

    Called by Ray Train at every worker-group start, so after a failure the stream restarts where the latest
    checkpoint left off (to the file; workers skip the rest of the way) instead of at the corpus start.
    Reproducible: file order depends on (seed, epoch), masks on (seed, epoch, batch content); which rank gets
    which block is Ray's dynamic split, so a re-run sees the same sequences and masks, not the same per-rank order.
    """
    import ray.data

    # Runs in the controller. Progress comes from the metrics rows (metrics.MetricsWatcher): Ray Data's bars for
    # this long stream would only redraw over those lines.
    ray.data.DataContext.get_current().enable_progress_bars = False
    run = Store(spec["run_dir"])
    consumed = int((run.read_json(PROGRESS_FILE) or {}).get("sequences", 0))
    start, epochs = plan_stream(spec["file_rows"], consumed, spec["sequences_needed"], spec["seed"])
    run.write_json(STREAM_FILE, {"start_sequence": start, "consumed": consumed})
    filesystem = Store(spec["data_dir"]).filesystem
    parts = [
        ray.data.read_parquet(
            [spec["files"][i] for i in order], columns=["input_ids", "word_start"], filesystem=filesystem
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
    filesystem = Store(spec["data_dir"]).filesystem
    valid = ray.data.read_parquet(spec["valid_files"], columns=["input_ids", "word_start"], filesystem=filesystem)
    return valid.map_batches(mask_batch, fn_kwargs=kwargs, num_cpus=spec["data_cpus"])


def stream_spec(cfg: PretrainConfig, shards: ShardInfo, run: Store) -> dict:
    """Plain data for the stream builders (they run in the Ray Train controller): files, counts, masking."""
    from jbert_ray.tokenizer import JapaneseTokenizer

    tokenizer = JapaneseTokenizer.from_pretrained(local_copy(shards.tokenizer_dir))
    return {
        "run_dir": run.location,
        "data_dir": str(shards.root),
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


def _sequences_needed(cfg: PretrainConfig, shards: ShardInfo) -> int:
    """How long the stream must be: max_steps (+ one spare global batch: the equal split may drop up to
    num_workers - 1 rows at the end), or under a time budget, what the fastest plausible rate could use."""
    by_steps = (cfg.max_steps + 1) * cfg.global_batch_size
    if cfg.budget_s <= 0:
        return by_steps
    per_second = cfg.num_workers * (BUDGET_SEQUENCES_PER_S_GPU if cfg.use_gpu else BUDGET_SEQUENCES_PER_S_CPU)
    by_budget = min(math.ceil(cfg.budget_s * per_second), BUDGET_STREAM_EPOCHS * shards.train_rows)
    return min(by_steps, by_budget) if cfg.max_steps else by_budget
