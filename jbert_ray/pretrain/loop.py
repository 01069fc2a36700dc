"""The per-worker loop Ray Train runs on every DDP rank: build or restore the model, stream masked batches, step,
evaluate, report and checkpoint. Ray-specific lines are numbered `# [n]`, as in Ray Train's examples.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from jbert_ray.model import SparseMaskedLM, build_model
from jbert_ray.pretrain.config import PretrainConfig, WorkerConfig
from jbert_ray.pretrain.metrics import MetricsLog
from jbert_ray.pretrain.state import load_train_state, save_train_state
from jbert_ray.pretrain.step import all_reduce, autocast_for, evaluate, lr_at, make_optimizer, train_step
from jbert_ray.pretrain.stream import PROGRESS_FILE, STREAM_FILE
from jbert_ray.storage import Store, local_copy


def train_loop_per_worker(config: dict) -> None:
    """One DDP rank: build or restore the model, stream masked batches, step, evaluate, report, checkpoint."""
    import ray.train
    import ray.train.torch

    from jbert_ray.tokenizer import JapaneseTokenizer

    worker = WorkerConfig.from_dict(config)
    cfg, run = worker.pretrain, Store(worker.run_dir)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu" and worker.torch_threads:
        torch.set_num_threads(worker.torch_threads)
    tokenizer = JapaneseTokenizer.from_pretrained(local_copy(worker.tokenizer_dir))
    # The export says how long its inputs were: scoring and serving then read long texts in windows of that
    # length, not of the position table's 512 (a 512-token window costs 4× a 128-token one per scored token).
    tokenizer.model_max_length = min(tokenizer.model_max_length, worker.max_seq_len)

    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else nullcontext(None) as checkpoint_dir:
        model = _initial_model(cfg, worker.hf_config, checkpoint_dir)
        module = ray.train.torch.prepare_model(
            SparseMaskedLM(model)
        )  # device + DDP (gloo on CPU, NCCL on GPU)
        if cfg.compile_model:  # dynamic: trimmed widths and masked counts change from batch to batch
            module = torch.compile(module, dynamic=True)
        optimizer = make_optimizer(model, cfg)
        state = load_train_state(checkpoint_dir, optimizer) if checkpoint_dir else {}
    step = int(state.get("step", 0))
    # Who runs each rank, and from which step: a restarted worker group shows where it resumed.
    process = {"pid": os.getpid(), "host": os.uname().nodename, "rank": rank, "start_step": step}
    run.write_json(f"workers/rank_{rank}.json", process)  # pid and host of each rank: for operators (and tests)
    if rank or not checkpoint_dir:  # rank 0 resumes with its saved RNG state; others derive theirs
        torch.manual_seed(cfg.seed + 1_000_003 * rank + step)
    log = MetricsLog(run, resume_step=step) if rank == 0 else None
    accumulate = cfg.global_batch_size // (cfg.micro_batch_size * world)
    stream = run.read_json(STREAM_FILE)  # written before every start of the stream: missing means lost
    if not isinstance(stream, dict) or "start_sequence" not in stream:
        raise RuntimeError(f"{run.child(STREAM_FILE)} is missing: cannot tell where the input stream starts")
    stream_start = int(stream["start_sequence"])
    skip = max(0, step * cfg.global_batch_size - stream_start) // world // cfg.micro_batch_size
    batches = _train_batches(cfg, device, skip)
    autocast = autocast_for(device, cfg.precision)
    clock = _RunClock(cfg.budget_s, device, float(state.get("elapsed_s", 0.0)))  # a resumed run keeps its schedule
    report = _Reporter(cfg, worker, module, model, tokenizer, optimizer, log, rank, state)
    window = _Window()
    elapsed, stopped = clock.elapsed(), False
    while not stopped:
        micro = [b for _, b in zip(range(accumulate), batches)]
        if len(micro) < accumulate:  # stream exhausted; equal splits make every rank stop together
            break
        if not window.steps and not report.rows:  # the first batch is here: the stream's start-up (and the
            window.reset()  # skip after a resume) counts neither in tokens_per_s nor in the time budget
            clock.start()
            elapsed = clock.elapsed()
        lr = lr_at(step, elapsed, cfg)
        window.add(
            train_step(module, optimizer, micro, lr=lr, max_grad_norm=cfg.max_grad_norm, autocast=autocast)
        )
        step += 1
        elapsed = clock.elapsed()
        stopped = bool(cfg.max_steps and step >= cfg.max_steps) or clock.is_over(elapsed)
        if stopped or step % cfg.log_every == 0:
            report(step, lr, window, elapsed, is_last=stopped)
    if not stopped:  # the stream ended first: every rank still reports (and checkpoints) once more
        report(step, lr_at(step, elapsed, cfg), window, elapsed, is_last=True)
    if log is not None:
        log.close()


class _Window:
    """Step statistics since the last metric row."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.steps, self.totals, self.grad_norm = 0, torch.zeros(4, dtype=torch.float64), 0.0
        self.started = time.perf_counter()

    def add(self, stats: dict):
        self.steps += 1
        self.totals += stats["totals"]
        self.grad_norm = stats["grad_norm"]


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


class _Reporter:
    """Metric rows, evaluations and checkpoints at log steps; every rank calls it at the same steps."""

    def __init__(self, cfg, worker, module, model, tokenizer, optimizer, log, rank, state: dict):
        self.cfg, self.worker, self.log, self.rank = cfg, worker, log, rank
        self.module, self.model, self.tokenizer, self.optimizer = module, model, tokenizer, optimizer
        self.device = next(module.parameters()).device
        self.tokens = float(state.get("tokens", 0))  # non-pad tokens trained on, all ranks, since step 0
        self.rows = 0

    def __call__(self, step: int, lr: float, window: _Window, elapsed: float, is_last: bool = False) -> None:
        import ray.train

        cfg = self.cfg
        totals = all_reduce(window.totals.clone(), self.device)  # every rank takes part: same collectives
        self.tokens += totals[3].item()
        predicted = max(totals[2].item(), 1)
        metrics = {
            "step": step,
            "loss": totals[0].item() / predicted if window.steps else None,
            "accuracy": totals[1].item() / predicted if window.steps else None,
            "lr": lr,
            "tokens_per_s": totals[3].item() / max(time.perf_counter() - window.started, 1e-9),
            "grad_norm": window.grad_norm,
            "tokens": self.tokens,
            "elapsed_s": elapsed,
        }
        if self.worker.has_valid and (step % cfg.eval_every == 0 or is_last):
            metrics.update(
                evaluate(self.module, self.device, autocast_for(self.device, cfg.precision), cfg.micro_batch_size)
            )
        if self.log is not None:
            self.log.write(metrics)
        self.rows += 1
        if step % cfg.checkpoint_every == 0 or is_last:
            self._checkpoint(step, metrics, elapsed)
        else:
            ray.train.report(metrics)  # every worker must call report() the same number of times
        window.reset()  # the time spent evaluating and checkpointing is not counted in tokens_per_s

    def _checkpoint(self, step: int, metrics: dict, elapsed: float) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:  # one copy of the replicated state
                from jbert_ray.checkpoint import save_model_dir

                save_model_dir(Path(tmp) / "model", self.model, self.tokenizer)
                sequences = step * self.cfg.global_batch_size
                save_train_state(
                    tmp, self.optimizer, step, sequences=sequences, elapsed_s=elapsed, tokens=self.tokens
                )
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
        if self.rank == 0:  # after report() the checkpoint is persisted: a restarted stream may start from here
            progress = {"step": step, "sequences": step * self.cfg.global_batch_size}
            Store(self.worker.run_dir).write_json(PROGRESS_FILE, progress)
            self.log.sync()


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


def _train_batches(cfg: PretrainConfig, device, skip_batches: int):
    """This rank's masked micro-batches, after skipping the ones consumed before the last checkpoint.

    Under a time budget a run that outruns the planned stream reads it again (every rank at once: equal splits).
    """
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    index = 0
    while True:
        passed = index
        batches = shard.iter_torch_batches(
            batch_size=cfg.micro_batch_size, drop_last=True, device=device, **_prefetch(device)
        )
        for batch in batches:
            if index >= skip_batches:
                yield batch
            index += 1
        if cfg.budget_s <= 0 or index == passed:  # by steps the plan is exact; an empty pass ends it
            return


def _prefetch(device: torch.device) -> dict:
    """A GPU step is short: keep a few masked batches ready in pinned memory so the copy never waits on the CPU."""
    return {"prefetch_batches": 4, "pin_memory": True} if device.type == "cuda" else {}
