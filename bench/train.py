"""Training speed as users run it: `jbert pretrain` against transformers' `Trainer` flow of run_mlm.py, same dims,
vocab, token stream and precision, all of this machine's CPUs on both sides.

    python bench/train.py              # 3 minutes of training per row, `small` size (L4 H512): ~15 minutes in all
    python bench/train.py --quick      # 1 minute per row

Every row is its own process started by this script, so start-up (imports, Ray or Trainer set-up, the first
batch) is counted alike; each trains for --minutes and stops.
  ours              `jbert pretrain --model-config small --time-budget M`, default flags otherwise (Ray Train, the
                    Ray Data masking stream, ModernBERT, sparse prediction, micro-batch 16, --precision auto)
  hf-trainer bert   run_mlm.py's flow: the same shards grouped into 128-token blocks (group_texts),
                    DataCollatorForLanguageModeling (15%), BertForMaskedLM (run_mlm's model type), Trainer with
                    batch 32, bf16 exactly when ours uses it (Trainer's --bf16 on a CPU), torch on all CPUs
  hf-trainer modernbert   the fair peer: the same flow with ModernBertForMaskedLM set up as ModernBERT's paper
                    recommends for MLM (sparse prediction, 30% masking, dropout 0, AdamW 8e-4 betas 0.9/0.98)
  ours, no Ray      our train step (SparseMaskedLM, the masking function the Ray Data stage maps) in one plain
                    loop over the same rows: what Ray Train and Ray Data cost
Training tokens/s = non-padding tokens ÷ training time (from the first batch on); wall tokens/s divides the same
tokens by the whole process's time. The headline is ours ÷ the fair peer (hf-trainer modernbert) on training and
on wall tokens/s (target ≥ 1.5 on training tokens/s); ÷ hf-trainer bert follows.
Meaningful on an idle machine only: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from quality import grouped_blocks, prepare_data  # the same tokenizer and shards as bench/quality.py
from results import machine, publish
from transformers import TrainerCallback

SEQ_LEN = 128
SIDES = ("ours", "hf-trainer-modernbert", "hf-trainer-bert", "plain")
LABELS = {"ours": "ours: `jbert pretrain` (Ray Train + Ray Data)",
          "hf-trainer-modernbert": "HF Trainer, ModernBertForMaskedLM, sparse prediction (the fair peer)",
          "hf-trainer-bert": "HF Trainer, BertForMaskedLM (run_mlm defaults)", "plain": "ours, plain loop (no Ray)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="training time per row")
    parser.add_argument("--quick", action="store_true", help="1 minute per row")
    parser.add_argument("--size", default="small", help="model preset of every row")
    parser.add_argument("--work", default="/tmp/jbert_quality", help="tokenizer and shards (shared with quality.py)")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # one row, in a child process
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    minutes = 1.0 if args.quick else args.minutes
    shards_dir = Path(args.work) / "shards"
    if args.side:
        run_side(args.side, shards_dir, args.size, minutes, Path(args.result))
        return
    at_start = machine()
    prepare_data(Path(args.work))
    rows = {}
    with tempfile.TemporaryDirectory(prefix="jbert_bench_train_") as tmp:
        for side in SIDES:
            result = Path(tmp) / f"{side}.json"
            started = time.perf_counter()
            command = [sys.executable, __file__, "--side", side, "--result", str(result), "--minutes", str(minutes),
                       "--size", args.size, "--work", args.work]  # fmt: skip
            subprocess.run(command, check=True, cwd=tmp, stdout=subprocess.DEVNULL)
            rows[side] = {**json.loads(result.read_text()), "wall_s": time.perf_counter() - started}
            print(f"{side}: {rows[side]['tokens'] / rows[side]['train_s']:,.0f} tokens/s", flush=True)
    rate = {side: r["tokens"] / r["train_s"] for side, r in rows.items()}
    wall = {side: r["tokens"] / r["wall_s"] for side, r in rows.items()}
    fair = rate["ours"] / rate["hf-trainer-modernbert"]
    table = [[LABELS[side], f"{r['steps']:,}", f"{r['tokens']:,}", f"{rate[side]:,.0f}",
              f"{r['tokens'] / r['wall_s']:,.0f}", f"{r['wall_s']:.0f} s", r["precision"]]
             for side, r in rows.items()]  # fmt: skip
    notes = [(
        f"Ours ÷ the fair peer (Trainer + ModernBertForMaskedLM, sparse prediction): **{fair:.3g}×** training "
        f"tokens/s (target ≥ 1.5: {'met' if fair >= 1.5 else 'NOT met'}), "
        f"{wall['ours'] / wall['hf-trainer-modernbert']:.3g}× wall tokens/s (start-up counted); ÷ Trainer with "
        f"BertForMaskedLM: {rate['ours'] / rate['hf-trainer-bert']:.3g}× training, "
        f"{wall['ours'] / wall['hf-trainer-bert']:.3g}× wall; Ray's cost: ours ÷ our plain loop = "
        f"{rate['ours'] / rate['plain']:.3g}. {args.size} size, vocab {rows['ours']['vocab']:,}, {minutes:g} min "
        "of training per row."
    )]
    publish("train", "Training speed: `jbert pretrain` vs transformers' Trainer (run_mlm.py's flow)",
            ["row", "steps", "tokens", "training tokens/s", "wall tokens/s", "process wall", "precision"],
            table, notes, at_start)  # fmt: skip


def run_side(side: str, shards_dir: Path, size: str, minutes: float, result: Path) -> None:
    """One row, in this (child) process; writes steps, tokens and training seconds to `result`."""
    import torch

    from jbert_ray.pretrain.step import has_native_bf16
    from jbert_ray.shards import inspect_shards

    info = inspect_shards(shards_dir)
    precision = "bf16" if has_native_bf16(torch.device("cpu")) else "fp32"
    if side == "ours":
        row = run_ours(shards_dir, size, minutes)
    elif side == "plain":
        row = run_plain_loop(info, size, minutes, precision)
    else:
        row = run_hf_trainer(info, side.rsplit("-", 1)[1], size, minutes, precision)
    result.write_text(json.dumps({**row, "precision": precision, "vocab": info.vocab_size}))


def run_ours(shards_dir: Path, size: str, minutes: float) -> dict:
    from jbert_ray.cli import main as jbert
    from jbert_ray.pretrain.metrics import read_metrics

    out = Path("ours")
    assert jbert(["pretrain", "--data", str(shards_dir), "--out", str(out), "--model-config", size,
                  "--time-budget", f"{minutes:g}", "--no-progress"]) == 0  # fmt: skip
    last = read_metrics(out / "metrics.csv")[-1]
    return {"steps": int(last["step"]), "tokens": int(last["tokens"]), "train_s": last["elapsed_s"]}


def run_hf_trainer(info, arch: str, size: str, minutes: float, precision: str) -> dict:
    """Trainer + DataCollatorForLanguageModeling, the way run_mlm.py wires them; a callback ends it on time."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForMaskedLM,
        BertJapaneseTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    from jbert_ray.model import PRESETS, hf_config_dict

    tokenizer = BertJapaneseTokenizer.from_pretrained(info.tokenizer_dir)
    specials = {"pad": tokenizer.pad_token_id, "cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id}
    config = hf_config_dict(PRESETS[size], arch, info.vocab_size, specials)
    if arch == "bert":  # run_mlm's BERT keeps its library defaults (dropout 0.1), as its users get it
        config.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
        recipe = {"learning_rate": 5e-4, "warmup_steps": 200}
        mlm_probability = 0.15
    else:  # ModernBERT's MLM recipe (its paper and model docs); dropout is already 0 in our config
        config.update(sparse_prediction=True)
        recipe = {"learning_rate": 8e-4, "adam_beta1": 0.9, "adam_beta2": 0.98, "adam_epsilon": 1e-6,
                  "weight_decay": 1e-5, "warmup_steps": 200}
        mlm_probability = 0.3
    model = AutoModelForMaskedLM.from_config(AutoConfig.for_model(**config))
    blocks = [{"input_ids": block} for block in grouped_blocks(info.train_files).tolist()]
    clock = TrainingClock(60 * minutes)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir="hf", per_device_train_batch_size=32, **recipe, max_steps=10**6, use_cpu=True,
            bf16=precision == "bf16", logging_steps=10**6, save_strategy="no",
            report_to=[], dataloader_num_workers=0, disable_tqdm=True, seed=0,
        ),
        train_dataset=blocks,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability),
        callbacks=[clock],
    )
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    trainer.train()
    steps = trainer.state.global_step
    return {"steps": steps, "tokens": steps * 32 * SEQ_LEN, "train_s": clock.elapsed()}


class TrainingClock(TrainerCallback):
    """Starts at the first step and stops the Trainer after `budget_s` of training."""

    def __init__(self, budget_s: float):
        self.budget_s, self.started = budget_s, None

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = self.started or time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = self.elapsed() >= self.budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def run_plain_loop(info, size: str, minutes: float, precision: str) -> dict:
    """Our step, our masking function and our defaults (micro-batch 16) in one process, no Ray."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from jbert_ray.masking import MaskingConfig, mask_batch
    from jbert_ray.model import PRESETS, SparseMaskedLM, build_model, hf_config_dict
    from jbert_ray.pretrain.config import DEFAULT_MICRO_BATCH_CPU, PretrainConfig
    from jbert_ray.pretrain.step import autocast_for, make_optimizer, train_step
    from jbert_ray.tokenizer import JapaneseTokenizer

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    tokenizer = JapaneseTokenizer.from_pretrained(info.tokenizer_dir)
    specials = {"pad": tokenizer.pad_token_id, "cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id}
    model = build_model(hf_config_dict(PRESETS[size], "modernbert", info.vocab_size, specials))
    module, optimizer = SparseMaskedLM(model), make_optimizer(model, PretrainConfig(data_dir="", output_dir=""))
    table = pq.read_table(info.train_files, columns=["input_ids", "word_start"])
    order = np.random.default_rng(0).permutation(table.num_rows)
    mask_kwargs = {"vocab_size": info.vocab_size, "special_ids": sorted(tokenizer.special_ids),
                   "mask_id": tokenizer.mask_token_id, "pad_id": tokenizer.pad_token_id, "max_seq_len": SEQ_LEN,
                   "config": MaskingConfig()}  # fmt: skip
    autocast, batch_size = autocast_for(torch.device("cpu"), precision), DEFAULT_MICRO_BATCH_CPU
    steps = tokens = 0
    started = time.perf_counter()
    while time.perf_counter() - started < 60 * minutes:
        first = (steps * batch_size) % (table.num_rows - batch_size)
        rows = table.take(order[first : first + batch_size]).to_pydict()
        batch = {k: torch.from_numpy(v) for k, v in mask_batch(rows, **mask_kwargs, epoch=steps).items()}
        stats = train_step(module, optimizer, [batch], lr=1e-3, max_grad_norm=1.0, autocast=autocast)
        steps, tokens = steps + 1, tokens + int(stats["totals"][3])
    return {"steps": steps, "tokens": tokens, "train_s": time.perf_counter() - started}


if __name__ == "__main__":
    main()
