"""The per-worker loop Ray Train runs on every DDP rank: build or restore the model, stream masked batches, step,
evaluate, report and checkpoint. Ray-specific lines are numbered `# [n]`, as in Ray Train's examples.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from jbert_ray.model import SparseMaskedLM, build_model
from jbert_ray.pretrain.config import PretrainConfig, WorkerConfig
from jbert_ray.pretrain.metrics import MetricsLog, StepMetrics, Window
from jbert_ray.pretrain.state import CheckpointWriter, load_train_state
from jbert_ray.pretrain.step import all_reduce, autocast_for, evaluate, lr_at, make_optimizer, train_step
from jbert_ray.pretrain.stream import batches_to_skip, save_position
from jbert_ray.storage import Store, local_copy


def train_loop_per_worker(config: dict) -> None:
    """One DDP rank: build or restore the model, stream masked batches, step, evaluate, report, checkpoint."""
    import ray.train
    import ray.train.torch

    worker = WorkerConfig.from_dict(config)
    cfg, run = worker.pretrain, Store(worker.run_dir)
    context = ray.train.get_context()  # [1] this worker's rank among all of them
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()  # [2] its device: cuda:N, or the CPU
    if device.type == "cpu" and worker.torch_threads:
        torch.set_num_threads(worker.torch_threads)
    tokenizer = _load_tokenizer(worker)
    checkpoint = ray.train.get_checkpoint()  # [3] the latest reported checkpoint (None on a fresh run): resume
    with checkpoint.as_directory() if checkpoint else nullcontext(None) as checkpoint_dir:
        model = _initial_model(cfg, worker.hf_config, checkpoint_dir)
        module = ray.train.torch.prepare_model(SparseMaskedLM(model))  # [4] device + DDP (gloo, or NCCL on GPU)
        if cfg.compile_model:  # dynamic: trimmed widths and masked counts change from batch to batch
            module = torch.compile(module, dynamic=True)
        optimizer = make_optimizer(model, cfg)
        state = load_train_state(checkpoint_dir, optimizer) if checkpoint_dir else {}
    step = int(state.get("step", 0))
    _record_process(run, rank, step)
    if rank or not checkpoint_dir:  # rank 0 resumes with its saved RNG state; others derive theirs
        torch.manual_seed(cfg.seed + 1_000_003 * rank + step)
    log = MetricsLog(run, resume_step=step) if rank == 0 else None  # drops rows past the restored step
    accumulate = cfg.global_batch_size // (cfg.micro_batch_size * world)
    train_shard = ray.train.get_dataset_shard("train")  # [5] this rank's split of the masked stream
    batches = _train_batches(train_shard, cfg, device, batches_to_skip(run, cfg, step, world))
    autocast = autocast_for(device, cfg.precision)
    clock = _RunClock(cfg.budget_s, device, float(state.get("elapsed_s", 0.0)))  # a resumed run keeps its schedule
    evaluate_valid = None
    if worker.has_valid:
        valid_shard = ray.train.get_dataset_shard("valid")  # [5] and of the valid set
        evaluate_valid = functools.partial(_evaluate_shard, module, valid_shard, cfg.micro_batch_size, autocast)
    metrics = StepMetrics(device, float(state.get("tokens", 0)), log)
    writer = CheckpointWriter(model, tokenizer, optimizer) if rank == 0 else None  # one copy of the replicated state
    report = _Reporter(cfg, metrics, evaluate_valid, _Checkpoints(run, writer, cfg.global_batch_size))
    window = Window()
    elapsed, stopped = clock.elapsed(), False
    while not stopped:
        micro = [b for _, b in zip(range(accumulate), batches)]
        if len(micro) < accumulate:  # stream exhausted; equal splits make every rank stop together
            break
        if not window.steps and not metrics.rows:  # the first batch is here: the stream's start-up (and the
            window.reset()  # skip after a resume) counts neither in tokens_per_s nor in the time budget
            clock.start()
            elapsed = clock.elapsed()
        lr = lr_at(step, elapsed, cfg)
        stats = train_step(module, optimizer, micro, lr=lr, max_grad_norm=cfg.max_grad_norm, autocast=autocast)
        window.add(stats)
        step += 1
        elapsed = clock.elapsed()
        stopped = bool(cfg.max_steps and step >= cfg.max_steps) or clock.is_over(elapsed)
        if stopped or step % cfg.log_every == 0:
            report(step, lr, window, elapsed, is_last=stopped)
    if not stopped:  # the stream ended first: every rank still reports (and checkpoints) once more
        report(step, lr_at(step, elapsed, cfg), window, elapsed, is_last=True)
    metrics.close()


class _Reporter:
    """At a log step, on every rank: a metric row (with an evaluation when due), then one report() (with a
    checkpoint when due)."""

    def __init__(
        self, cfg: PretrainConfig, metrics: StepMetrics, evaluate_valid: Callable[[], dict] | None,
        checkpoints: _Checkpoints,
    ):  # fmt: skip
        self.cfg, self.metrics, self.evaluate_valid, self.checkpoints = cfg, metrics, evaluate_valid, checkpoints

    def __call__(self, step: int, lr: float, window: Window, elapsed: float, is_last: bool = False) -> None:
        import ray.train

        row = self.metrics.row(step, lr, window, elapsed)
        if self.evaluate_valid is not None and (step % self.cfg.eval_every == 0 or is_last):
            row.update(self.evaluate_valid())
        self.metrics.write(row)
        if step % self.cfg.checkpoint_every == 0 or is_last:
            self.checkpoints.report(row, step, elapsed, self.metrics.tokens)
            self.metrics.sync()
        else:
            ray.train.report(row)  # [7] every worker must call report() the same number of times
        window.reset()  # the time spent evaluating and checkpointing is not counted in tokens_per_s


class _Checkpoints:
    """report() with a checkpoint: rank 0 (the one with a writer) writes it, every rank reports."""

    def __init__(self, run: Store, writer: CheckpointWriter | None, global_batch_size: int):
        self.run, self.writer, self.global_batch_size = run, writer, global_batch_size

    def report(self, row: dict, step: int, elapsed: float, tokens: float) -> None:
        import ray.train

        sequences = step * self.global_batch_size
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.writer is not None:
                self.writer.write(tmp, step, sequences=sequences, elapsed_s=elapsed, tokens=tokens)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)  # [8] copied to the run's storage by report()
            ray.train.report(row, checkpoint=checkpoint)  # [7]
        if self.writer is not None:  # after report() the checkpoint is persisted: a restarted stream may start here
            save_position(self.run, step, sequences)


class _RunClock:
    """Training time of the run, carried across resumes; under a time budget every rank reads the same value."""

    def __init__(self, budget_s: float, device: torch.device, elapsed_before: float):
        self.budget_s = budget_s
        self.device = device
        self.elapsed_before = elapsed_before
        self.started = time.perf_counter()

    def start(self) -> None:
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        elapsed = self.elapsed_before + time.perf_counter() - self.started
        if self.budget_s > 0:  # ranks must stop at the same step: take the slowest rank's clock
            elapsed = all_reduce(torch.tensor([elapsed], dtype=torch.float64), self.device, "max")[0].item()
        return elapsed

    def is_over(self, elapsed: float) -> bool:
        return self.budget_s > 0 and elapsed >= self.budget_s


def _load_tokenizer(worker: WorkerConfig):
    from jbert_ray.tokenizer import JapaneseTokenizer

    tokenizer = JapaneseTokenizer.from_pretrained(local_copy(worker.tokenizer_dir))
    # The export says how long its inputs were: scoring and serving then read long texts in windows of that
    # length, not of the position table's 512 (a 512-token window costs 4× a 128-token one per scored token).
    tokenizer.model_max_length = min(tokenizer.model_max_length, worker.max_seq_len)
    return tokenizer


def _initial_model(cfg: PretrainConfig, hf_config: dict, checkpoint_dir: str | None):
    from jbert_ray.checkpoint import load_model_dir

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    if checkpoint_dir:
        model, _ = load_model_dir(Path(checkpoint_dir) / "model", "cpu")
    elif cfg.init_from:
        model, _ = load_model_dir(local_copy(cfg.init_from), "cpu")
    else:
        model = build_model(hf_config)
    return model.train()


def _record_process(run: Store, rank: int, step: int) -> None:
    """Who runs each rank, and from which step: a restarted worker group shows where it resumed (for operators
    and tests)."""
    process = {"pid": os.getpid(), "host": os.uname().nodename, "rank": rank, "start_step": step}
    run.write_json(f"workers/rank_{rank}.json", process)


def _train_batches(shard, cfg: PretrainConfig, device: torch.device, skip_batches: int):
    """This rank's masked micro-batches, after skipping the ones consumed before the last checkpoint.

    Under a time budget a run that outruns the planned stream reads it again (every rank at once: equal splits).
    """
    index = 0
    while True:
        passed = index
        batches = shard.iter_torch_batches(  # [6] torch tensors on this worker's device
            batch_size=cfg.micro_batch_size, drop_last=True, device=device, **_prefetch(device)
        )
        for batch in batches:
            if index >= skip_batches:
                yield batch
            index += 1
        if cfg.budget_s <= 0 or index == passed:  # by steps the plan is exact; an empty pass ends it
            return


def _evaluate_shard(module, shard, batch_size: int, autocast) -> dict:
    """`evaluate` over this rank's whole valid shard, read again at every evaluation (one fixed mask draw)."""
    device = next(module.parameters()).device
    return evaluate(module, shard.iter_torch_batches(batch_size=batch_size, device=device), autocast)  # [6]


def _prefetch(device: torch.device) -> dict:
    """A GPU step is short: keep a few masked batches ready in pinned memory so the copy never waits on the CPU."""
    return {"prefetch_batches": 4, "pin_memory": True} if device.type == "cuda" else {}
