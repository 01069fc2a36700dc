"""One rank's step math, free of Ray: the optimizer step over accumulated micro-batches, the learning-rate
schedule, AdamW, evaluation over batches, and the device helpers (bf16 autocast, all-reduce) they share.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from contextlib import nullcontext

import torch

from jbert_ray.pretrain.config import PretrainConfig

WARMUP_SHARE = 0.06  # of the run (steps or budget) spent warming up when --warmup-steps is -1 (RoBERTa)


def train_step(
    module, optimizer, micro_batches, *, lr: float, max_grad_norm: float, autocast=nullcontext
) -> dict:
    """One optimizer step over `micro_batches` (gradient accumulation; DDP syncs only on the last one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    totals, tokens = [], 0  # per micro-batch: loss × predicted, correct, predicted (on the device: no sync)
    for i, batch in enumerate(micro_batches):
        batch = trim_padding(batch)
        is_last = i == len(micro_batches) - 1
        sync = nullcontext() if is_last or not hasattr(module, "no_sync") else module.no_sync()
        with sync:
            with autocast():
                loss, correct, predicted = module(
                    batch["input_ids"], batch["attention_mask"], batch["labels"]
                )
            (loss / len(micro_batches)).backward()
        tokens += batch["tokens"]
        predicted = predicted.double()
        totals.append(torch.stack([loss.detach().double() * predicted, correct.double(), predicted]))
    grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sums = torch.stack(totals).sum(0).cpu()  # the step's one device → host copy (with grad_norm's)
    return {
        "totals": torch.cat([sums, torch.tensor([float(tokens)], dtype=torch.float64)]),
        "grad_norm": float(grad_norm),
    }


def trim_padding(batch: dict) -> dict:
    """Cut the micro-batch to its longest row (no compute on all-pad columns); drop an all-ones attention mask."""
    mask = batch["attention_mask"]
    lengths = mask.sum(dim=1)  # (B,)
    width = int(lengths.max())
    tokens = int(lengths.sum())
    full = tokens == mask.shape[0] * width  # packed rows: SDPA's fast path without a mask
    return {
        "input_ids": batch["input_ids"][:, :width].long(),
        "attention_mask": None if full else mask[:, :width].long(),
        "labels": batch["labels"][:, :width].long(),
        "tokens": tokens,
    }


def lr_at(step: int, elapsed_s: float, cfg: PretrainConfig) -> float:
    """Linear warmup to learning_rate, then linear decay to 0 at the end of the time budget (if set) or max_steps."""
    share = WARMUP_SHARE if cfg.warmup_steps < 0 else 0.0
    if cfg.budget_s > 0:
        done = elapsed_s / cfg.budget_s
        warm = done / share if share else (step + 1) / max(cfg.warmup_steps, 1)
        decay = (1 - done) / (1 - share)
    else:
        warmup = math.ceil(share * cfg.max_steps) if share else cfg.warmup_steps
        warm = (step + 1) / max(warmup, 1)
        decay = (cfg.max_steps - step) / max(1, cfg.max_steps - warmup)
    return cfg.learning_rate * max(0.0, min(1.0, warm, decay))


def make_optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and LayerNorm; fused kernel where the device has one."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "LayerNorm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.98), eps=1e-6, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused AdamW for this device/dtype
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.98), eps=1e-6)


def evaluate(module, batches: Iterable[dict], autocast=nullcontext) -> dict:
    """MLM loss and masked-token accuracy over `batches` (this rank's share), summed over all ranks."""
    device = next(module.parameters()).device
    module.eval()
    totals = torch.zeros(3, dtype=torch.float64)
    core = getattr(module, "module", module)  # eval without DDP: no gradient sync needed
    with torch.no_grad():
        for batch in batches:
            batch = trim_padding(batch)
            with autocast():
                loss, correct, predicted = core(batch["input_ids"], batch["attention_mask"], batch["labels"])
            totals += torch.tensor(
                [loss.item() * predicted.item(), correct.item(), predicted.item()], dtype=torch.float64
            )
    module.train()
    totals = all_reduce(totals, device)
    return {
        "eval_loss": totals[0].item() / max(totals[2].item(), 1),
        "eval_accuracy": totals[1].item() / max(totals[2].item(), 1),
    }


def autocast_for(device: torch.device, precision: str = "auto"):
    """bf16 autocast (fp32 weights and optimizer) where the chip computes bf16 natively, else plain fp32."""
    if precision == "fp32" or (precision == "auto" and not has_native_bf16(device)):
        return nullcontext
    return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)


def has_native_bf16(device: torch.device) -> bool:
    """GPUs from Ampere on; CPUs with AVX512-BF16 or AMX (elsewhere CPU bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # torch's own checks, private in 2.x: a torch without them is treated as having neither
    names = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    checks = (getattr(torch.cpu, name, lambda: False) for name in names)
    return device.type == "cpu" and any(check() for check in checks)


def all_reduce(values: torch.Tensor, device: torch.device, op: str = "sum") -> torch.Tensor:
    """Sum (or max) `values` over the DDP ranks; unchanged outside a process group (one process, the benches)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    reduced = values.to(device=device, dtype=torch.float64 if device.type == "cpu" else torch.float32)
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return reduced.to("cpu", torch.float64)
