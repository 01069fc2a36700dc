"""Offline scoring benchmark (issue 7): `run_scoring` with 2 actors vs 1 actor, and the job vs a single-process
loop calling `MaskedLM.score` directly (one torch thread, like one actor), all in this one run. Two such loops
run at once in two processes show what a second core gives on this machine before any Ray overhead.

    python bench/score.py                 # ja_valid.jsonl.gz (1,550 records), a 2-layer 128-wide BERT, pll-strided
    python bench/score.py --method pll    # exact PLL (one forward pass per token)
    python bench/score.py --quick         # 400 records
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

from results import machine, publish  # bench/ is the script's folder, first on sys.path

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
SAMPLE = Path(__file__).resolve().parents[1] / "jbert_ray" / "sample" / "ja_sample.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-dir", type=Path, default=CORPUS)
    parser.add_argument("--quick", action="store_true", help="400 records instead of all 1,550")
    parser.add_argument("--method", default="pll-strided", help="the scoring method (jbert score --method)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    at_start = machine()
    with gzip.open(args.corpus_dir / "ja_valid.jsonl.gz", "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    records = records[:400] if args.quick else records
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        corpus = work / "valid.jsonl"
        corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        model_dir = make_model(work / "model")
        texts = [r["text"] for r in records]
        direct = direct_loop(model_dir, texts, args.method)
        # What two processes get on this machine at all (shared caches, memory bandwidth, the hypervisor):
        # the ceiling for 2 actors ÷ 1, before any Ray overhead.
        with multiprocessing.get_context("spawn").Pool(2) as pool:
            pair = sum(pool.starmap(direct_loop, [(model_dir, texts, args.method)] * 2))
        jobs = {actors: job(model_dir, corpus, work / f"scores_{actors}", actors, args.method) for actors in (1, 2)}
    rows = [["single process, `MaskedLM.score`, 1 thread", f"{direct:.2f}", "1.00"],
            *[[f"`jbert score` job, {a} actor(s)", f"{rate:.2f}", f"{rate / direct:.2f}"] for a, rate in jobs.items()],
            ["two single-process loops at once (the machine's ceiling)", f"{pair:.2f}", f"{pair / direct:.2f}"]]
    notes = [(f"2 actors ÷ 1 actor: **{jobs[2] / jobs[1]:.3g}×** (target ≥ 1.7; the machine allows "
              f"{pair / direct:.3g}×); job with 1 actor ÷ the single-process loop: {jobs[1] / direct:.3g} "
              f"(target ≥ 0.8); 2 actors ÷ two loops at once: **{jobs[2] / pair:.3g}** (target ≥ 0.9)."),
             f"Load average at the end: {os.getloadavg()[0]:.2f}."]
    publish("score" if args.method == "pll" else f"score-{args.method}",
            f"Offline scoring ({args.method}): {len(records):,} ja_valid records, BERT L2 H128, CPU",
            ["scorer", "sentences/s", "÷ single process"], rows, notes, at_start)  # fmt: skip


def make_model(path: Path) -> Path:
    """A randomly initialized 2-layer BERT with a vocab trained on the bundled sample (throughput only)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from jbert_ray.checkpoint import save_model_dir
    from jbert_ray.tokenizer import TokenizerConfig, train_vocab_on_texts

    texts = [json.loads(line)["text"] for line in SAMPLE.open(encoding="utf-8")]
    tokenizer = train_vocab_on_texts(texts, TokenizerConfig(vocab_size=8000))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=512)
    save_model_dir(path, BertForMaskedLM(config), tokenizer)
    return path


def direct_loop(model_dir: Path, texts: list[str], method: str, batch_size: int = 64) -> float:
    import torch

    from jbert_ray.inference import MaskedLM

    torch.set_num_threads(1)
    lm = MaskedLM.from_pretrained(model_dir, device="cpu")
    start = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        lm.score(texts[i:i + batch_size], method)
    return len(texts) / (time.perf_counter() - start)


def job(model_dir: Path, corpus: Path, out: Path, actors: int, method: str) -> float:
    """Sentences/s of run_scoring on a fresh 2-CPU local Ray (start-up excluded, actor start-up included)."""
    import ray
    import ray.data

    from jbert_ray.score import ScoreConfig, run_scoring

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        summary = run_scoring(ScoreConfig(input=str(corpus), model_dir=str(model_dir), output_dir=str(out),
                                          num_actors=actors, method=method, show_progress=False))
    finally:
        ray.shutdown()
    return summary["sentences_per_s"]


if __name__ == "__main__":
    main()
