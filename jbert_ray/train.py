"""Masked-LM pretraining on Ray Train: a TorchTrainer (DDP: gloo on CPU, NCCL on GPU) fed by a Ray Data stream of
shards → whole-word masking (a new draw every epoch) → `get_dataset_shard` per worker.

Checkpoints (HF model dir + optimizer/step/RNG) go through `ray.train.report`; re-running with the same output dir
resumes from the latest one, and `FailureConfig(max_failures)` restarts killed workers from it. The only module
that imports ray.train. Refs: Ray Train "Saving and Loading Checkpoints", "Data Loading and Preprocessing".
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from jbert_ray.errors import UserError
from jbert_ray.masking import MaskingConfig
from jbert_ray.model import ARCHS, SparseMaskedLM, build_model
from jbert_ray.outputs import OutputLock, check_output
from jbert_ray.pretrain_checks import check_batch, check_inputs, check_resources, check_run_dir
from jbert_ray.progress import MetricsWatcher
from jbert_ray.shards import ShardInfo
from jbert_ray.storage import Store, local_copy, resolve_location
from jbert_ray.train_state import MetricsLog, load_train_state, metrics_rows, plot_curves, save_train_state
from jbert_ray.train_step import (
    all_reduce,
    autocast_for,
    evaluate,
    has_native_bf16,
    lr_at,
    make_optimizer,
    train_step,
)
from jbert_ray.train_stream import (
    PROGRESS_FILE,
    STREAM_FILE,
    build_train_stream,
    build_valid_stream,
    stream_spec,
)

STAGE = "pretrain"
RUN_NAME = "checkpoints"  # RunConfig name: checkpoints live in RUN_DIR/checkpoints/
DEFAULT_MAX_STEPS = 1000  # optimizer steps of a run given neither --max-steps nor --time-budget
# Micro-batch of a CPU worker: on 2 CPUs batch 16 beat batch 32 in the same 20 minutes (valid accuracy 32.2% vs
# 28.9%, perplexity 95 vs 124, bench/quality.py, one run each): twice the steps outweigh ~12% fewer tokens/s.
DEFAULT_MICRO_BATCH_CPU = 16
DEFAULT_MICRO_BATCH_GPU = 32  # not measured on a GPU yet
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class PretrainConfig:
    data_dir: str  # output of `jbert preprocess` (manifest.json, train/, valid/, tokenizer/)
    output_dir: str  # run directory (checkpoints, model/, metrics.csv); run again on it to resume
    model_config: str = "tiny"  # tiny, mini, small, base, or a JSON file (ModelConfig fields or an HF config)
    arch: Literal["modernbert", "bert"] = "modernbert"  # pre-LN ModernBERT learns far more in short budgets
    init_from: str | None = None  # continue pretraining this HF BERT/ModernBERT dir (the shards' vocab)
    num_workers: int = 0  # DDP workers; 0 = one per GPU with --use-gpu, else one per node (all its cores)
    use_gpu: bool = False  # one GPU per worker (NCCL)
    # bf16 on 2 AVX512-BF16 cores: 1.3x the tokens/s of fp32 through `jbert pretrain` (weights and AdamW stay fp32)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # bf16 autocast; auto = bf16 where the chip has native bf16
    compile_model: bool = False  # torch.compile the model: faster GPU steps after a one-off compile (~1 min)
    cpus_per_worker: float = 0.0  # CPUs per worker; 0 = auto (room is left for the masking stage)
    time_budget_min: float = 0.0  # minutes to train, warmup and decay laid over them (0: by --max-steps)
    max_steps: int = 0  # optimizer steps; 0 = no step limit with --time-budget, else 1000
    global_batch_size: int = 0  # sequences per optimizer step, all workers; 0 = micro batch × workers
    micro_batch_size: int = 0  # sequences per forward per worker; 0 = 16 on CPU, 32 on GPU
    learning_rate: float = 1e-3  # peak AdamW learning rate
    warmup_steps: int = -1  # linear warmup steps; -1 = 6% of the run; then linear decay to 0
    weight_decay: float = 0.01  # AdamW weight decay (not on biases and LayerNorm)
    max_grad_norm: float = 1.0  # gradient clipping norm
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    seed: int = 0  # initialization, dropout, masks and data order
    log_every: int = 10  # steps between metric rows
    eval_every: int = 200  # steps between evaluations on valid/ (and at the end)
    checkpoint_every: int = 200  # steps between checkpoints (and at the end)
    keep_checkpoints: int = 3  # checkpoints kept
    max_failures: int = 3  # worker-group restarts from the latest checkpoint before giving up
    data_cpus: float = 0.5  # CPUs per task of the Ray Data masking stage
    show_progress: bool = True  # progress lines on stderr

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise UserError(f"--arch {self.arch!r}: use one of {', '.join(ARCHS)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if min(self.max_steps, self.time_budget_min, self.num_workers, self.global_batch_size,
               self.cpus_per_worker, self.weight_decay) < 0:  # fmt: skip
            raise UserError("--max-steps, --time-budget, --num-workers, --global-batch-size, --cpus-per-worker "
                            "and --weight-decay must be ≥ 0 (0: not set or automatic)")  # fmt: skip
        if self.micro_batch_size < 0:
            raise UserError(f"--micro-batch-size must be ≥ 0 (0: automatic), got {self.micro_batch_size}")
        counts = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints")
        for name in counts:
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0 or self.data_cpus <= 0 or self.max_grad_norm <= 0:
            raise UserError("--learning-rate, --data-cpus and --max-grad-norm must be > 0")
        if self.warmup_steps < -1 or self.max_failures < -1:
            raise UserError(
                "--warmup-steps and --max-failures must be ≥ -1 (-1: automatic, or unlimited restarts)"
            )

    @classmethod
    def from_dict(cls, values: dict) -> PretrainConfig:
        values = dict(values)
        if isinstance(values.get("masking"), dict):
            values["masking"] = MaskingConfig(**values["masking"])
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolved(self) -> PretrainConfig:
        """The defaults that depend on other fields made explicit (what a re-run must match)."""
        micro = self.micro_batch_size or (DEFAULT_MICRO_BATCH_GPU if self.use_gpu else DEFAULT_MICRO_BATCH_CPU)
        return dataclasses.replace(
            self,
            max_steps=self.max_steps or (0 if self.time_budget_min > 0 else DEFAULT_MAX_STEPS),
            micro_batch_size=micro,
            global_batch_size=self.global_batch_size or micro * self.num_workers,
        )


# ---------------------------------------------------------------- driver


class PreparedPretraining(NamedTuple):
    """A pretraining run checked before Ray starts."""

    config: PretrainConfig  # with absolute paths: workers run in their own directories
    shards: ShardInfo
    hf_config: dict  # the model's HF config
    lock: OutputLock  # held from the checks to the end of the run: a second run on this run dir is refused


def prepare_pretraining(cfg: PretrainConfig) -> PreparedPretraining:
    """The checks that need no cluster (shards, model config, --init-from): call before starting Ray."""
    cfg = dataclasses.replace(
        cfg,
        data_dir=resolve_location(cfg.data_dir),
        output_dir=resolve_location(cfg.output_dir),
        init_from=resolve_location(cfg.init_from) if cfg.init_from else None,
    )
    shards, hf_config = check_inputs(cfg)
    # A re-run resumes: check_run_dir says whether it is the same run.
    inputs = {"--data": cfg.data_dir, "--init-from": cfg.init_from}
    run = check_output(cfg.output_dir, STAGE, inputs=inputs, keep=True)
    return PreparedPretraining(cfg, shards, hf_config, OutputLock(run, STAGE).acquire())


def run_pretraining(job: PretrainConfig | PreparedPretraining) -> dict:
    """Train on the connected Ray cluster (resuming if the run dir has checkpoints), export model/."""
    import ray.data

    job = job if isinstance(job, PreparedPretraining) else prepare_pretraining(job)
    data_context = ray.data.DataContext.get_current()
    bars = data_context.enable_progress_bars
    try:
        return _pretrain(job)
    finally:
        data_context.enable_progress_bars = bars  # _pretrain turns Ray Data's bars off, whatever its outcome
        job.lock.release()


def _pretrain(job: PreparedPretraining) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg, shards, hf_config, _ = job
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # report() costs ~1.2 s at the 2 s default
    run = Store(cfg.output_dir)
    cpu_nodes = [n["Resources"]["CPU"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]
    node_cpus = max(cpu_nodes, default=None)
    if not cfg.num_workers:
        cfg = dataclasses.replace(
            cfg, num_workers=auto_workers(cfg.use_gpu, ray.cluster_resources(), len(cpu_nodes))
        )
    cfg = cfg.resolved()  # the global batch follows the worker count
    check_batch(cfg, shards)
    cpus_per_worker = check_resources(cfg, ray.cluster_resources(), node_cpus)
    check_run_dir(run, cfg, hf_config)
    threads = torch_threads(cfg, node_cpus, len(cpu_nodes))
    import ray.data

    # Training progress comes from the metrics rows (MetricsWatcher): no Ray Data bars for the valid stream either.
    ray.data.DataContext.get_current().enable_progress_bars = False
    spec = stream_spec(cfg, shards, run)
    datasets = {"train": functools.partial(build_train_stream, spec)}  # rebuilt at every (re)start
    has_valid = shards.valid_rows >= cfg.num_workers  # the equal split gives every rank at least one row
    if has_valid:
        datasets["valid"] = build_valid_stream(spec)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "pretrain": cfg.to_dict(),
            "hf_config": hf_config,
            "run_dir": run.location,
            "tokenizer_dir": str(shards.tokenizer_dir),
            "has_valid": has_valid,
            "torch_threads": threads,
            "max_seq_len": shards.max_seq_len,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
            # CPU workers take their node's cores as threads (torch_threads): one per node, not packed on one.
            placement_strategy="PACK" if cfg.use_gpu else "SPREAD",
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            # The same name and storage on a re-run = resume from the latest checkpoint.
            storage_path=run.path,
            storage_filesystem=run.filesystem if run.is_remote else None,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets=datasets,
    )
    if cfg.show_progress:
        print(f"pretrain: {_plan(cfg, threads)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    watcher = MetricsWatcher(run, cfg.time_budget_min, cfg.max_steps)
    with watcher if cfg.show_progress else nullcontext():
        result = trainer.fit()
    return _finish(run, result, time.perf_counter() - started)


def _plan(cfg: PretrainConfig, threads: int) -> str:
    """What the automatic settings chose, said once at the start."""
    if cfg.use_gpu:
        where = f"{cfg.num_workers} GPU worker(s)"
    else:
        where = f"{cfg.num_workers} CPU worker(s) × {threads} torch thread(s)"
    precision = cfg.precision
    if precision == "auto" and not cfg.use_gpu:  # GPU workers decide on their own device
        precision = "bf16" if has_native_bf16(torch.device("cpu")) else "fp32"
    return (f"{where}, micro-batch {cfg.micro_batch_size}, global batch {cfg.global_batch_size}, "
            f"precision {precision}")  # fmt: skip


def auto_workers(use_gpu: bool, cluster: dict, cpu_nodes: int) -> int:
    """One worker per GPU; on CPU one worker per node, using the node's cores as torch threads.

    Measured on 2 CPUs (H256 L4, vocab 32k, batch 32): one 2-thread worker 2.6k tokens/s, two 1-thread DDP workers
    1.9k — gloo's all-reduce of 50 MB of gradients every step costs more than the second rank adds.
    """
    if use_gpu:
        return max(1, int(cluster.get("GPU", 0)))
    return max(1, cpu_nodes)


def torch_threads(cfg: PretrainConfig, node_cpus: float | None, cpu_nodes: int) -> int:
    """Threads per CPU worker: its node's cores shared among the workers there (Ray alone would give it one per
    reserved CPU, leaving the share kept for the light masking stage idle)."""
    if cfg.use_gpu or not node_cpus:
        return 0  # a GPU worker keeps Ray's setting
    workers_per_node = math.ceil(cfg.num_workers / max(cpu_nodes, 1))
    return max(1, int(node_cpus // workers_per_node))


def _finish(run: Store, result, elapsed_s: float) -> dict:
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as checkpoint_dir:
        run.replace_dir(Path(checkpoint_dir) / "model", "model")  # the previous export stays until this one is whole
    plot = plot_curves(run)
    every_row = metrics_rows(run)
    rows = [r for r in every_row if r.get("loss") is not None]  # a row after an empty window has no loss
    evals = [r for r in every_row if r.get("eval_loss") is not None]
    summary = {
        "step": every_row[-1]["step"] if every_row else 0,
        "first_loss": rows[0]["loss"] if rows else None,
        "final_loss": rows[-1]["loss"] if rows else None,
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "eval_accuracy": evals[-1]["eval_accuracy"] if evals else None,
        "tokens_per_s": rows[-1]["tokens_per_s"] if rows else None,
        "model_dir": run.child("model").location,
        "curves": plot,
        "seconds": round(elapsed_s, 1),
    }
    run.write_json("results.json", summary)
    return summary


# ---------------------------------------------------------------- worker


def train_loop_per_worker(config: dict) -> None:
    """One DDP rank: build or restore the model, stream masked batches, step, evaluate, report, checkpoint."""
    import ray.train
    import ray.train.torch

    from jbert_ray.tokenizer import JapaneseTokenizer

    cfg = PretrainConfig.from_dict(config["pretrain"])
    run = Store(config["run_dir"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu" and config["torch_threads"]:
        torch.set_num_threads(config["torch_threads"])
    tokenizer = JapaneseTokenizer.from_pretrained(local_copy(config["tokenizer_dir"]))
    # The export says how long its inputs were: scoring and serving then read long texts in windows of that
    # length, not of the position table's 512 (a 512-token window costs 4× a 128-token one per scored token).
    tokenizer.model_max_length = min(tokenizer.model_max_length, config["max_seq_len"])

    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else nullcontext(None) as checkpoint_dir:
        model = _initial_model(cfg, config, tokenizer, checkpoint_dir)
        module = ray.train.torch.prepare_model(
            SparseMaskedLM(model)
        )  # device + DDP (gloo on CPU, NCCL on GPU)
        if cfg.compile_model:  # dynamic: trimmed widths and masked counts change from batch to batch
            module = torch.compile(module, dynamic=True)
        optimizer = make_optimizer(model, cfg)
        state = load_train_state(checkpoint_dir, optimizer) if checkpoint_dir else {}
    step = int(state.get("step", 0))
    # Who runs each rank, and from which step: a restarted worker group shows where it resumed.
    worker = {"pid": os.getpid(), "host": os.uname().nodename, "rank": rank, "start_step": step}
    run.write_json(f"workers/rank_{rank}.json", worker)  # pid and host of each rank: for operators (and tests)
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
    clock = _RunClock(cfg, device, float(state.get("elapsed_s", 0.0)))  # a resumed run keeps its schedule
    report = _Reporter(cfg, config, module, model, tokenizer, optimizer, log, rank, state)
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

    def __init__(self, cfg: PretrainConfig, device: torch.device, elapsed_before: float):
        self.budget_s = 60 * cfg.time_budget_min
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

    def __init__(self, cfg, config, module, model, tokenizer, optimizer, log, rank, state: dict):
        self.cfg, self.config, self.log, self.rank = cfg, config, log, rank
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
        if self.config["has_valid"] and (step % cfg.eval_every == 0 or is_last):
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
            Store(self.config["run_dir"]).write_json(PROGRESS_FILE, progress)
            self.log.sync()


def _initial_model(cfg: PretrainConfig, config: dict, tokenizer, checkpoint_dir: str | None):
    from jbert_ray.checkpoint import load_model_dir

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    if checkpoint_dir:
        model, _ = load_model_dir(Path(checkpoint_dir) / "model", "cpu")
    elif cfg.init_from:
        model, _ = load_model_dir(local_copy(cfg.init_from), "cpu")
    else:
        model = build_model(config["hf_config"])
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
        if cfg.time_budget_min <= 0 or index == passed:  # by steps the plan is exact; an empty pass ends it
            return


def _prefetch(device: torch.device) -> dict:
    """A GPU step is short: keep a few masked batches ready in pinned memory so the copy never waits on the CPU."""
    return {"prefetch_batches": 4, "pin_memory": True} if device.type == "cuda" else {}
