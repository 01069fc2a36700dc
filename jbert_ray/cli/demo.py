"""`jbert demo`: the whole path on the bundled Japanese sample with a local Ray — vocab, preprocess, pretrain a
mini ModernBERT for a few minutes, score the held-out split, serve fill-mask on 127.0.0.1 — reusing whatever an
earlier run built."""

from __future__ import annotations

import argparse
import hashlib
import json
import time
import urllib.request
from pathlib import Path

from jbert_ray.cli.common import add_ray_flags
from jbert_ray.cli.ray_runtime import init_ray

SAMPLE_PATH = Path(__file__).parents[1] / "sample" / "ja_sample.jsonl"
VALID_SHARE = 0.025  # of the sample's source files, held out for scoring (PLL costs a forward pass per token)
DEMO_VOCAB_SIZE = 8000  # the sample has ~6k distinct MeCab words; 8000 leaves room for pieces
# Pretraining budget. On 2 CPUs three minutes is the edge of the particle plateau (valid accuracy 35%, 30%, 16% in
# three runs of the same flags); five left it every time (44%, 42%, 43%).
DEMO_MINUTES = 5.0
FILL_MASK_TEXTS = [  # fixed before any tuning
    "セルに[MASK]を入力します。",
    "[MASK]メニューから印刷を選択します。",
    "このダイアログでフォントの[MASK]を変更できます。",
]


def add_demo_flags(sub: argparse.ArgumentParser) -> None:
    """--work-dir, --minutes and the Ray flags."""
    sub.add_argument("--work-dir", default="runs/demo", help="where artifacts go; a re-run reuses them")
    sub.add_argument(
        "--minutes", type=float, default=DEMO_MINUTES, help="pretraining budget of the mini model"
    )
    add_ray_flags(sub)


def run_demo_command(args: argparse.Namespace) -> None:
    """Start a local Ray, run the demo, list its artifacts."""
    import ray

    started = time.perf_counter()
    init_ray(args.ray_num_cpus, show_progress=not args.no_progress, verbose=args.verbose)
    try:
        artifacts = run_demo(args.work_dir, minutes=args.minutes, show_progress=not args.no_progress)
    finally:
        ray.shutdown()
    print(f"[demo] done in {time.perf_counter() - started:.0f} s; artifacts:")
    for name, path in artifacts.items():
        print(f"[demo]   {name:<16} {path}")


def run_demo(work_dir: str | Path, minutes: float = DEMO_MINUTES, show_progress: bool = True) -> dict[str, Path]:
    """Run each stage whose output is missing; return where every artifact is."""
    work_dir = Path(work_dir)
    paths = {
        "corpus": work_dir / "corpus",
        "tokenizer": work_dir / "tokenizer",
        "shards": work_dir / "shards",
        "run": work_dir / "run",
        "model": work_dir / "run" / "model",
        "scores": work_dir / "scores",
    }
    _split_sample(paths["corpus"])
    _vocab(paths, show_progress)
    _preprocess(paths, show_progress)
    _pretrain(paths, minutes, show_progress)
    _score(paths, show_progress)
    _serve_and_ask(paths["model"])
    paths["training curves"] = paths["run"] / "curves.png"
    paths["PLL histogram"] = paths["scores"] / "pll_per_token.png"
    return paths


def _split_sample(corpus_dir: Path) -> None:
    """train.jsonl / valid.jsonl from the sample, split by source file so no page is in both."""
    if (corpus_dir / "valid.jsonl").exists():
        return
    corpus_dir.mkdir(parents=True, exist_ok=True)
    train, valid = [], []
    for line in SAMPLE_PATH.read_text(encoding="utf-8").splitlines(keepends=True):
        source = json.loads(line).get("source", "")
        digest = int(hashlib.sha256(source.encode()).hexdigest()[:8], 16)
        (valid if digest / 0xFFFFFFFF < VALID_SHARE else train).append(line)
    (corpus_dir / "train.jsonl").write_text("".join(train), encoding="utf-8")
    (corpus_dir / "valid.jsonl").write_text("".join(valid), encoding="utf-8")
    print(f"[demo] split the bundled sample: {len(train):,} train / {len(valid):,} held-out records")


def _vocab(paths: dict[str, Path], show_progress: bool) -> None:
    from jbert_ray.tokenizer import TokenizerConfig
    from jbert_ray.vocab import VocabConfig, run_vocab

    if _reuse(paths["tokenizer"] / "vocab_summary.json", "vocab"):
        return
    s = run_vocab(VocabConfig(input=str(paths["corpus"] / "train.jsonl"), output_dir=str(paths["tokenizer"]),
                              tokenizer=TokenizerConfig(vocab_size=DEMO_VOCAB_SIZE), overwrite=True,
                              show_progress=show_progress))
    print(f"[demo] vocab: {s['records_read']:,} records, {s['words']:,} words → {s['vocab_size']:,} entries "
          f"({s['seconds']:.1f} s)")


def _preprocess(paths: dict[str, Path], show_progress: bool) -> None:
    from jbert_ray.preprocess import PreprocessConfig, run_preprocess

    if _reuse(paths["shards"] / "manifest.json", "preprocess"):
        return
    m = run_preprocess(PreprocessConfig(input=str(paths["corpus"] / "train.jsonl"),
                                        tokenizer_dir=str(paths["tokenizer"]), output_dir=str(paths["shards"]),
                                        max_seq_len=128, valid_fraction=0.05, pack_across_docs=True, overwrite=True,
                                        show_progress=show_progress))
    print(f"[demo] preprocess: {m['documents']:,} documents, {m['sentences']:,} sentences → "
          f"{m['sequences']:,} sequences of ≤128 tokens ({m['tokens']:,} tokens)")


def _pretrain(paths: dict[str, Path], minutes: float, show_progress: bool) -> None:
    from jbert_ray.pretrain.config import PretrainConfig
    from jbert_ray.pretrain.driver import run_pretraining

    if _reuse(paths["run"] / "results.json", "pretrain"):
        return
    r = run_pretraining(PretrainConfig(data_dir=str(paths["shards"]), output_dir=str(paths["run"]),
                                       model_config="mini", time_budget_min=minutes, eval_every=100,
                                       checkpoint_every=100, show_progress=show_progress))
    print(f"[demo] pretrain: {r['step']} steps, loss {r['first_loss']:.2f} → {r['final_loss']:.2f}, "
          f"valid accuracy {r['eval_accuracy']:.3f} ({r['seconds']:.0f} s)")


def _score(paths: dict[str, Path], show_progress: bool) -> None:
    from jbert_ray.score import ScoreConfig, run_scoring

    if _reuse(paths["scores"] / "summary.json", "score"):
        return
    s = run_scoring(ScoreConfig(input=str(paths["corpus"] / "valid.jsonl"), model_dir=str(paths["model"]),
                                output_dir=str(paths["scores"]), filter_percentile=10, overwrite=True,
                                show_progress=show_progress))
    print(f"[demo] score: {s['rows_scored']:,} held-out rows, median PLL/token "
          f"{s['pll_per_token'].get('p50', float('nan')):.2f}, {s['sentences_per_s']:.1f} sentences/s")


def _serve_and_ask(model_dir: Path) -> None:
    from ray import serve

    from jbert_ray.serve import ServeArgs, build_app, free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(ServeArgs(model_dir=str(model_dir), min_replicas=1, max_replicas=1, num_cpus=0.5)),
                  name="jbert", route_prefix="/")
        body = json.dumps({"texts": FILL_MASK_TEXTS, "top_k": 3}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/fill-mask", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answers = json.loads(response.read())
        print(f"[demo] serve: POST http://127.0.0.1:{port}/fill-mask")
        for text, masks in zip(FILL_MASK_TEXTS, answers["predictions"]):  # per text, per [MASK]: candidates
            shown = " / ".join(f"{c['token']} ({c['score']:.2f})" for c in masks[0])
            print(f"[demo]   {text}  →  {shown}")
    finally:
        serve.shutdown()


def _reuse(marker: Path, name: str) -> bool:
    if marker.exists():
        print(f"[demo] {name}: reusing {marker.parent}")
        return True
    return False
