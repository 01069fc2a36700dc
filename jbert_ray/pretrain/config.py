"""`jbert pretrain`'s settings: `PretrainConfig` (its fields and comments are the command's flags, through
cli/flags.py) and `WorkerConfig`, what the driver sends each Ray Train worker."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from jbert_ray.errors import UserError
from jbert_ray.masking import MaskingConfig
from jbert_ray.model import ARCHS

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

    @property
    def budget_s(self) -> float:
        """--time-budget in seconds; 0 when the run is measured in steps."""
        return 60 * self.time_budget_min

    def resolved(self) -> PretrainConfig:
        """The defaults that depend on other fields made explicit (what a re-run must match)."""
        micro = self.micro_batch_size or (DEFAULT_MICRO_BATCH_GPU if self.use_gpu else DEFAULT_MICRO_BATCH_CPU)
        return dataclasses.replace(
            self,
            max_steps=self.max_steps or (0 if self.time_budget_min > 0 else DEFAULT_MAX_STEPS),
            micro_batch_size=micro,
            global_batch_size=self.global_batch_size or micro * self.num_workers,
        )


@dataclass(frozen=True)
class WorkerConfig:
    """What every Ray Train worker is sent: plain data across the Ray boundary (`to_dict` on the driver,
    `from_dict` as the worker's first line)."""

    pretrain: PretrainConfig  # resolved: worker count and batch sizes explicit, paths absolute
    hf_config: dict  # the model's HF config: what a run without a checkpoint or --init-from builds
    run_dir: str  # the run directory's location (a path or an object-store URI)
    tokenizer_dir: str  # the shards' tokenizer/
    max_seq_len: int  # the shards' longest sequence: the exported tokenizer's model_max_length
    has_valid: bool  # a valid stream exists (only when every rank gets at least one row of it)
    torch_threads: int  # torch threads of a CPU worker; 0 = keep Ray's setting (GPU workers)

    @classmethod
    def from_dict(cls, values: dict) -> WorkerConfig:
        return cls(**{**values, "pretrain": PretrainConfig.from_dict(values["pretrain"])})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
