"""Benchmark our pretraining step against transformers' `run_mlm` recipe, same model config, data and threads.

    python bench/train.py            # small preset (L4 H512), vocab 32768, seq 128, batch 32, ~3 minutes on 2 CPUs
    python bench/train.py --quick    # fewer steps (about a minute)

Systems, timed step by step in turn (median step time per system, so a load spike hits all of them alike):
  ours      packed rows (no padding; our Packer), whole-word masks (mask_tokens), sparse prediction (vocab
            projection only at masked positions), SDPA, fused AdamW: `jbert_ray.train.train_step`
  run_mlm   transformers' run_mlm recipe: group_texts into 128-token blocks, DataCollatorForLanguageModeling
            (15% tokens), BertForMaskedLM with the library's default attention, torch AdamW, one process
  line      the same loop on padded, unpacked line-by-line batches (a line per row, padded to the batch's longest)
Masking/collation runs inside each timed step (one process, same threads). Tokens/s counts non-pad tokens; it is
also given per CPU-second of this process (less sensitive to other processes on a shared machine).
FLOP/s counts the matmul FLOPs our step really performs (encoder + the head at masked positions only, ×3 for
forward + backward) against this machine's fp32 GEMM FLOP/s (a 4096² torch.mm timed in the same run).
Targets (issue 5): ours ÷ run_mlm ≥ 1.5, ours FLOP/s ÷ GEMM FLOP/s ≥ 0.35. Meaningful on an idle machine only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jbert_ray.masking import MaskingConfig, mask_tokens, pad_batch
from jbert_ray.model import PRESETS, SparseMaskedLM, build_model, hf_config_dict
from jbert_ray.train import PretrainConfig
from jbert_ray.train_step import make_optimizer, train_step

SEQ_LEN = 128
VOCAB_SIZE = 32768
SAMPLE = REPO / "jbert_ray" / "sample" / "ja_sample.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    parser.add_argument("--corpus", default=str(SAMPLE), help=".jsonl corpus with a `text` field")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds, steps = (2, 3) if args.quick else (3, 6)
    print(
        f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs (an idle machine reads ~0); preset {args.preset}, vocab {VOCAB_SIZE}, "
        f"seq {SEQ_LEN}, batch {args.batch_size}, {rounds} rounds × {steps} steps"
    )
    with tempfile.TemporaryDirectory(prefix="jbert_bench_train_") as tmp:
        with open(args.corpus, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        tokenizer, hf_tokenizer = make_tokenizers(texts, Path(tmp))
        data = make_data(texts, tokenizer, hf_tokenizer)
        print(
            f"data: {len(texts):,} texts → {len(data['packed'])} packed rows ({data['packed_fill']:.1%} full); "
            f"{len(data['blocks'])} run_mlm blocks; {len(data['lines'])} lines (mean {data['line_mean']:.0f} tokens)"
        )
        systems = {
            "ours": OurStep(args.preset, tokenizer, data["packed"], args.batch_size),
            "run_mlm": RunMlmStep(args.preset, hf_tokenizer, data["blocks"], args.batch_size),
            "line": RunMlmStep(args.preset, hf_tokenizer, data["lines"], args.batch_size),
        }
        peak = gemm_flops(repeats=2 if args.quick else 4)
        times: dict[str, list[float]] = {name: [] for name in systems}
        gemm_rates: list[float] = []
        cpu_times: dict[str, list[float]] = {name: [] for name in systems}
        tokens: dict[str, list[int]] = {name: [] for name in systems}
        for system in systems.values():  # warm-up: allocator, kernels, first optimizer state
            system.step()
        for _ in range(rounds * steps):  # interleaved step by step: a load spike hits every system alike
            for name, system in systems.items():
                wall, cpu = time.perf_counter(), time.process_time()
                tokens[name].append(system.step())
                times[name].append(time.perf_counter() - wall)
                cpu_times[name].append(time.process_time() - cpu)
            gemm_rates.append(gemm_flops(repeats=1))  # the GEMM under the same load as the steps
        peak = max(peak, gemm_flops(repeats=2 if args.quick else 4))  # best of all: what the cores can give
    report(systems, times, cpu_times, tokens, peak, gemm_rates, args)


def make_tokenizers(texts: list[str], tmp: Path):
    """A WordPiece vocab trained on the corpus (ours) and the same directory loaded by transformers."""
    from transformers import AutoTokenizer

    from jbert_ray.text import normalize
    from jbert_ray.tokenizer import TokenizerConfig, build_tagger, train_vocab

    tagger = build_tagger()
    counts = Counter(word for text in texts for word in tagger.parse(normalize(text)).split())
    tokenizer = train_vocab(counts, TokenizerConfig(vocab_size=VOCAB_SIZE))
    tokenizer.save_pretrained(tmp / "tokenizer")
    return tokenizer, AutoTokenizer.from_pretrained(tmp / "tokenizer")


def make_data(texts, tokenizer, hf_tokenizer) -> dict:
    """Our packed rows, run_mlm's grouped blocks and line-by-line examples, from the same token ids."""
    from jbert_ray.packing import Packer
    from jbert_ray.text import split_sentences

    packer = Packer(SEQ_LEN, tokenizer.cls_token_id, tokenizer.sep_token_id)
    for i, text in enumerate(texts):  # packed across documents: rows are full
        for encoding in tokenizer.encode_batch(split_sentences(text), add_special_tokens=False):
            packer.add(encoding.ids, encoding.word_start, str(i))
    packer.flush()
    packed = packer.take()
    lines = [enc.ids for enc in tokenizer.encode_batch(texts)]  # [CLS] … [SEP] per text, as run_mlm tokenizes
    stream = [i for ids in lines for i in ids]
    blocks = [stream[i : i + SEQ_LEN] for i in range(0, len(stream) - SEQ_LEN + 1, SEQ_LEN)]  # group_texts
    return {
        "packed": packed,
        "packed_fill": sum(len(r.ids) for r in packed) / (len(packed) * SEQ_LEN),
        "blocks": [{"input_ids": b} for b in blocks],
        "lines": [
            {"input_ids": ids[: SEQ_LEN - 1] + ids[-1:] if len(ids) > SEQ_LEN else ids} for ids in lines
        ],
        "line_mean": float(np.mean([min(len(ids), SEQ_LEN) for ids in lines])),
    }


class OurStep:
    """jbert_ray's step: whole-word masks on packed rows → SparseMaskedLM → fused AdamW (train.train_step)."""

    def __init__(self, preset, tokenizer, rows, batch_size):
        torch.manual_seed(0)
        # BERT on both sides: this benchmark isolates the step; bench/quality.py compares architectures
        self.model = build_model(hf_config_dict(PRESETS[preset], "bert", VOCAB_SIZE, {"pad": tokenizer.pad_token_id}))
        self.module = SparseMaskedLM(self.model)
        self.optimizer = make_optimizer(self.model, PretrainConfig(data_dir="", output_dir=""))
        self.tokenizer, self.rows, self.batch_size = tokenizer, rows, batch_size
        self.rng = np.random.default_rng(0)
        self.position = 0
        self.masked_tokens = 0  # per step, for the FLOP count
        self.width = SEQ_LEN

    def step(self) -> int:
        rows = [self.rows[(self.position + i) % len(self.rows)] for i in range(self.batch_size)]
        self.position += self.batch_size
        ids = pad_batch([r.ids for r in rows], self.tokenizer.pad_token_id, SEQ_LEN, dtype=np.int64)
        starts = pad_batch([r.word_start for r in rows], False, SEQ_LEN, dtype=bool)
        masked, labels = mask_tokens(
            ids,
            starts,
            vocab_size=self.tokenizer.vocab_size,
            special_ids=sorted(self.tokenizer.special_ids),
            mask_id=self.tokenizer.mask_token_id,
            config=MaskingConfig(),
            rng=self.rng,
        )
        batch = {
            "input_ids": torch.from_numpy(masked),
            "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy((ids != self.tokenizer.pad_token_id).astype(np.int64)),
        }
        stats = train_step(self.module, self.optimizer, [batch], lr=1e-4, max_grad_norm=1.0)
        self.masked_tokens = int(stats["totals"][2])
        self.width = int(batch["attention_mask"].sum(1).max())
        return int(stats["totals"][3])


class RunMlmStep:
    """transformers' run_mlm loop: DataCollatorForLanguageModeling → BertForMaskedLM(**batch).loss → AdamW."""

    def __init__(self, preset, hf_tokenizer, examples, batch_size):
        from transformers import BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling

        config = PRESETS[preset]
        torch.manual_seed(0)
        bert_config = BertConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            intermediate_size=config.intermediate_size,
        )
        self.model = BertForMaskedLM(
            bert_config
        )  # run_mlm: AutoModelForMaskedLM.from_config, default attention
        self.attention = self.model.config._attn_implementation
        no_decay = ["bias", "LayerNorm.weight"]
        groups = [
            {
                "params": [
                    p for n, p in self.model.named_parameters() if not any(nd in n for nd in no_decay)
                ],
                "weight_decay": 0.01,
            },
            {
                "params": [p for n, p in self.model.named_parameters() if any(nd in n for nd in no_decay)],
                "weight_decay": 0.0,
            },
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=1e-4)  # run_mlm_no_trainer's optimizer
        self.collator = DataCollatorForLanguageModeling(hf_tokenizer, mlm_probability=0.15)
        self.examples, self.batch_size, self.position = examples, batch_size, 0

    def step(self) -> int:
        examples = [self.examples[(self.position + i) % len(self.examples)] for i in range(self.batch_size)]
        self.position += self.batch_size
        batch = self.collator(examples)
        self.model.train()
        loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return int(batch["attention_mask"].sum())


def gemm_flops(repeats: int, size: int = 4096) -> float:
    """fp32 FLOP/s of a large torch.mm on this process's threads (best of `repeats`)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def step_flops(config, batch: int, width: int, masked: int) -> float:
    """Matmul FLOPs of one training step of our model: encoder on all tokens, head at masked positions, ×3."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_layers
    tokens = batch * width
    encoder = layers * (2 * tokens * (4 * h * h + 2 * h * inter) + 2 * 2 * batch * width * width * h)
    head = 2 * masked * (h * h + h * VOCAB_SIZE)
    return 3 * (encoder + head)


def report(systems, times, cpu_times, tokens, peak, gemm_rates, args) -> None:
    rate = {n: statistics.median(np.array(tokens[n]) / np.array(times[n])) for n in systems}
    cpu_rate = {n: statistics.median(np.array(tokens[n]) / np.array(cpu_times[n])) for n in systems}
    ours = systems["ours"]
    flops = step_flops(PRESETS[args.preset], args.batch_size, ours.width, ours.masked_tokens)
    flop_rate = flops / statistics.median(times["ours"])
    gemm_loaded = statistics.median(gemm_rates)
    print(f"\n{'system':<10}{'tokens/s':>12}{'step s (median)':>18}{'tokens/CPU-s':>15}")
    for name in systems:
        print(
            f"{name:<10}{rate[name]:>12,.0f}{statistics.median(times[name]):>18.3f}{cpu_rate[name]:>15,.0f}"
        )
    print(
        f"(run_mlm/line attention: {systems['run_mlm'].attention}; ours: sdpa, sparse prediction, fused AdamW)"
    )
    print(
        f"\nours ÷ run_mlm (packed 128-token blocks):  {rate['ours'] / rate['run_mlm']:.2f} wall-clock, "
        f"{cpu_rate['ours'] / cpu_rate['run_mlm']:.2f} per CPU-second   target ≥ 1.5"
    )
    print(
        f"ours ÷ line-by-line padded batches:       {rate['ours'] / rate['line']:.2f} wall-clock, "
        f"{cpu_rate['ours'] / cpu_rate['line']:.2f} per CPU-second   (reported)"
    )
    print(
        f"ours FLOP/s ÷ fp32 GEMM FLOP/s:           {flop_rate / peak:.2f} vs the best GEMM, "
        f"{flop_rate / gemm_loaded:.2f} vs GEMMs timed between the steps   target ≥ 0.35"
    )
    print(
        f"  ({flops / 1e9:.0f} GFLOP per step of ours → {flop_rate / 1e9:.1f} GFLOP/s; "
        f"GEMM best {peak / 1e9:.1f}, between steps {gemm_loaded / 1e9:.1f} GFLOP/s)"
    )
    if torch.cuda.is_available():
        print("CUDA is available, but the BERT-base bf16 MFU measurement is not implemented in this script")


if __name__ == "__main__":
    main()
