"""GPU readiness in one command: our training step's speed and MFU, a short learning run, scoring speed, and how
fast the Ray Data masking stream feeds a worker. One table, also written as gpu.json.

    python bench/gpu.py --prepare .gpu_inputs --shards SHARDS_DIR   # here: copy shards, pre-encode texts (MeCab)
    python bench/gpu.py --inputs .gpu_inputs --out OUT               # on the GPU machine (no Ray, no MeCab there)
    python bench/gpu.py --dry-run                                    # every phase on CPU in seconds (CI runs it)

Level 1 (always runnable on a machine without Ray and MeCab) imports neither: shards are read with pyarrow and
masked by the very function the Ray Data stage maps (`mask_batch`); texts come pre-encoded from --prepare.
  step    the step a Ray Train worker runs (SparseMaskedLM, AdamW, bf16 autocast on CUDA) at base size, each
          architecture, a micro-batch of full 128-token rows: tokens/s, MFU, peak memory
  learn   the small size for --learn-minutes on the shards: valid masked-token accuracy, loss curve (learn.csv)
  score   MaskedLM PLL of pre-encoded valid sentences (sentences/s) and fill-mask latency of a 32-text batch
The stream phase needs Ray and runs where it is installed (here): the product masking stream
(`build_train_stream`) read through `iter_torch_batches` with no model, on --stream-cpus CPUs.
MFU = model FLOPs needed (6 × matmul parameters × tokens, attention, the vocab projection at masked positions
only) ÷ (seconds × the GPU's dense bf16 peak, from PEAK_TFLOPS by device name or --peak-tflops).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jbert_ray.masking import MaskingConfig, mask_batch
from jbert_ray.model import PRESETS, SparseMaskedLM, build_model, count_parameters, hf_config_dict
from jbert_ray.pretrain.config import PretrainConfig
from jbert_ray.pretrain.step import autocast_for, evaluate, lr_at, make_optimizer, train_step
from jbert_ray.shards import inspect_shards
from jbert_ray.tokenizer import Encoding, JapaneseTokenizer

PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "A10G": 70.0,
}  # dense bf16, spec sheets
SEQ_LEN = 128
SCORE_TEXTS = 2000
FILL_MASK_TEXTS = ["セルに[MASK]を入力します。", "[MASK]メニューから印刷を選択します。", "環境[MASK]を設定してください。",
                   "パッケージを[MASK]するには、次のコマンドを実行します。"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--prepare", metavar="DIR", help="write the inputs (shards, pre-encoded texts) to DIR"
    )
    parser.add_argument(
        "--shards", help="with --prepare: a `jbert preprocess` output (e.g. of ../shared/corpus)"
    )
    parser.add_argument("--inputs", metavar="DIR", help="inputs written by --prepare")
    parser.add_argument("--out", default=".", help="where gpu.json, learn.csv and learn.png go")
    parser.add_argument("--dry-run", action="store_true", help="tiny settings on CPU: checks the plumbing")
    parser.add_argument("--phases", default="step,learn,score,stream,product", help="comma-separated subset")
    parser.add_argument("--micro-batch", type=int, default=256, help="sequences per step in the step phase")
    parser.add_argument("--step-seconds", type=float, default=30, help="timed seconds per step-phase row")
    parser.add_argument("--learn-minutes", type=float, default=3, help="learn phase budget")
    parser.add_argument("--stream-cpus", type=int, default=2, help="CPUs the stream phase gives Ray")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows to the step phase")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of this GPU (default: by name)")
    args = parser.parse_args()
    if args.prepare:
        prepare(Path(args.prepare), Path(args.shards or ""), limit=SCORE_TEXTS)
        return
    with tempfile.TemporaryDirectory() as scratch:
        if args.dry_run:
            args.inputs = args.inputs or str(prepare_dry_run(Path(scratch)))
            args.micro_batch, args.step_seconds, args.learn_minutes = 4, 1.0, 0.1
        if not args.inputs:
            parser.error("give --inputs DIR (from --prepare), or --dry-run")
        run(args, Path(args.inputs), Path(args.out))


def run(args, inputs: Path, out: Path) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    phases = args.phases.split(",")
    print(f"{name}, torch {torch.__version__}, phases {phases}", flush=True)
    size = "tiny" if args.dry_run else "base"
    rows = []
    if "step" in phases:
        for arch in ("bert", "modernbert"):
            rows.append(
                step_row(arch, size, args.micro_batch, args.step_seconds, device, peak, compiled=False)
            )
            if args.compile:
                rows.append(
                    step_row(arch, size, args.micro_batch, args.step_seconds, device, peak, compiled=True)
                )
    if "learn" in phases:
        rows.append(learn_row(inputs / "shards", "tiny" if args.dry_run else "small", args.learn_minutes, device,
                              out))  # fmt: skip
    if "score" in phases:
        rows += score_rows(inputs, size, device)
    if "stream" in phases:
        rows.append(stream_row(inputs / "shards", args.stream_cpus, *((3, 1) if args.dry_run else (60, 3))))
    if "product" in phases:
        step = next((r for r in rows if r["phase"] == "step" and r["what"].startswith("modernbert")), None)
        rows += product_rows(inputs, size, args.micro_batch, device, step, dry_run=args.dry_run)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps({"device": name, "peak_tflops": peak, "rows": rows}, indent=1))
    print_table(rows)


# ---------------------------------------------------------------- inputs


def prepare(target: Path, shards: Path, limit: int) -> None:
    """Copy the shards and pre-encode valid sentences and fill-mask texts (MeCab runs here, not on the GPU box)."""
    info = inspect_shards(shards)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(shards, target / "shards", ignore=shutil.ignore_patterns("rejects"))
    tokenizer = JapaneseTokenizer.from_pretrained(info.tokenizer_dir)
    valid = REPO.parent / "shared" / "corpus" / "ja_valid.jsonl.gz"
    texts = _read_texts(valid if valid.exists() else REPO / "jbert_ray" / "sample" / "ja_sample.jsonl", limit)
    encoded = {kind: [{"text": t, **tokenizer.encode(t)._asdict()} for t in group]
               for kind, group in (("score", texts), ("fill_mask", FILL_MASK_TEXTS))}  # fmt: skip
    (target / "texts.json").write_text(json.dumps(encoded, ensure_ascii=False))
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(
        f"inputs in {target}: {info.train_rows:,} training sequences, {len(texts)} texts, {size / 2**20:.1f} MiB"
    )


def prepare_dry_run(scratch: Path) -> Path:
    """Tiny inputs from the bundled sample, made with our own CLI (vocab and preprocess on an embedded Ray)."""
    from jbert_ray.cli import main as jbert

    sample = str(REPO / "jbert_ray" / "sample" / "ja_sample.jsonl")
    quiet = ["--no-progress"]
    jbert(["vocab", "--input", sample, "--out", str(scratch / "tokenizer"), "--vocab-size", "2000", *quiet])
    jbert(["preprocess", "--input", sample, "--tokenizer", str(scratch / "tokenizer"), "--out", str(scratch / "shards"),
           "--max-seq-len", str(SEQ_LEN), "--pack-across-docs", *quiet])  # fmt: skip
    prepare(scratch / "inputs", scratch / "shards", limit=64)
    import ray

    ray.shutdown()  # the stream phase starts its own, with --stream-cpus
    return scratch / "inputs"


def _read_texts(path: Path, limit: int) -> list[str]:
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line, _ in zip(f, range(limit * 4))]
    return [t for t in texts if 10 <= len(t) <= 200][:limit]


class PreEncodedTokenizer(JapaneseTokenizer):
    """The tokenizer with MeCab's work done by --prepare: known texts map to their saved encodings."""

    def __init__(self, vocab: list[str], encodings: dict[str, Encoding]):
        super().__init__(vocab)
        self.encodings = encodings

    def encode_batch(self, texts, add_special_tokens: bool = True) -> list[Encoding]:
        return [self.encodings[text] for text in texts]


# ---------------------------------------------------------------- phases


def step_row(arch: str, size: str, micro: int, seconds: float, device, peak, compiled: bool) -> dict:
    """Tokens/s and MFU of our training step on full rows of random ids (speed does not depend on the text)."""
    vocab = 32768
    model = build_model(hf_config_dict(PRESETS[size], arch, vocab, {"pad": 0, "cls": 2, "sep": 3})).to(device)
    module = SparseMaskedLM(model)
    step_fn = torch.compile(module) if compiled else module
    optimizer = make_optimizer(model, PretrainConfig(data_dir="", output_dir=""))
    autocast = autocast_for(device)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (micro, SEQ_LEN), generator=generator)
    labels = torch.where(torch.rand(micro, SEQ_LEN, generator=generator) < 0.15, ids, -100)
    batch = {k: v.to(device) for k, v in (("input_ids", ids), ("labels", labels),
                                           ("attention_mask", torch.ones_like(ids)))}  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps, started, warm = 0, time.perf_counter(), 3
    while True:
        train_step(
            step_fn, optimizer, [batch], lr=1e-4, max_grad_norm=1.0, autocast=autocast
        )  # syncs: .cpu()
        steps += 1
        if steps == warm:
            started = time.perf_counter()
        if steps > warm and time.perf_counter() - started >= seconds:
            break
    elapsed = time.perf_counter() - started
    tokens_per_s = (steps - warm) * micro * SEQ_LEN / elapsed
    flops = train_flops_per_token(model, arch) * tokens_per_s
    return {
        "phase": "step", "what": f"{arch}-{size}{' compiled' if compiled else ''}, batch {micro}×{SEQ_LEN}",
        "params_m": round(count_parameters(model) / 1e6, 1), "tokens_per_s": round(tokens_per_s),
        "tflops": round(flops / 1e12, 1), "mfu": round(flops / (peak * 1e12), 3) if peak else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None,
    }  # fmt: skip


def train_flops_per_token(model, arch: str, mask_rate: float = 0.15) -> float:
    """Forward + backward FLOPs per token: 6 × encoder matmul parameters, attention scores, sparse vocab head."""
    config = model.config
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    encoder = model.bert.encoder if arch == "bert" else model.model.layers
    matmul = sum(p.numel() for p in encoder.parameters() if p.ndim == 2)
    attention = 2 * 2 * SEQ_LEN * hidden * layers  # QK^T and AV per token
    head = mask_rate * 2 * (hidden * hidden + hidden * vocab)  # transform + decoder at masked positions only
    return 3 * (2 * matmul + attention + head)


def learn_row(shards_dir: Path, size: str, minutes: float, device, out: Path) -> dict:
    """Train the given size for `minutes` on the shards (batch 128, lr 1e-3, warmup 6%, linear decay): valid acc."""
    import pyarrow.parquet as pq

    info = inspect_shards(shards_dir)
    vocab = info.vocab_size
    table = pq.read_table(info.train_files, columns=["input_ids", "word_start"])
    valid = (
        pq.read_table(info.valid_files, columns=["input_ids", "word_start"]) if info.valid_files else table
    )
    special = _special_ids(info.tokenizer_dir)
    mask_kwargs = {"vocab_size": vocab, "special_ids": sorted(special.values()), "mask_id": special["mask"],
                       "pad_id": special["pad"], "max_seq_len": SEQ_LEN, "config": MaskingConfig()}  # fmt: skip
    model = build_model(
        hf_config_dict(PRESETS[size], "modernbert", vocab, {k: special[k] for k in ("pad", "cls", "sep")})
    )
    model.to(device)
    module = SparseMaskedLM(model)
    cfg = PretrainConfig(data_dir="", output_dir="", time_budget_min=minutes)
    optimizer = make_optimizer(model, cfg)
    autocast = autocast_for(device)
    batch_size, step, tokens, curve = 128, 0, 0, []
    order = np.random.default_rng(0).permutation(table.num_rows)
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < 60 * minutes:
        first = (step * batch_size) % max(1, table.num_rows - batch_size)
        rows = table.take(order[first : first + batch_size]).to_pydict()
        batch = {k: torch.from_numpy(v).to(device, non_blocking=True)
                 for k, v in mask_batch(rows, **mask_kwargs, epoch=step).items()}  # fmt: skip
        stats = train_step(module, optimizer, [batch], lr=lr_at(step, elapsed, cfg), max_grad_norm=1.0,
                           autocast=autocast)  # fmt: skip
        step += 1
        tokens += int(stats["totals"][3])
        if step % 20 == 0:
            curve.append(
                (
                    step,
                    tokens,
                    round(time.perf_counter() - started, 1),
                    float(stats["totals"][0] / stats["totals"][2]),
                )
            )
    result = evaluate(module, _valid_batches(valid, mask_kwargs, device), autocast)
    accuracy, loss = result["eval_accuracy"], result["eval_loss"]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "learn.csv", "w") as f:
        f.write("step,tokens,seconds,loss\n" + "".join(",".join(map(str, row)) + "\n" for row in curve))
    _plot(curve, out / "learn.png")
    return {"phase": "learn", "what": f"modernbert-{size}, {minutes:g} min, batch {batch_size}", "steps": step,
            "tokens_per_s": round(tokens / (60 * minutes)), "valid_acc": round(accuracy, 4),
            "valid_loss": round(loss, 3)}  # fmt: skip


def _valid_batches(valid, mask_kwargs: dict, device):
    """The valid shards in batches of 64 with one fixed mask draw (seed 1), for training's own `evaluate`."""
    for first in range(0, valid.num_rows, 64):
        masked = mask_batch(valid.slice(first, 64).to_pydict(), **mask_kwargs, seed=1)
        yield {k: torch.from_numpy(v).to(device) for k, v in masked.items()}


def score_rows(inputs: Path, size: str, device) -> list[dict]:
    """MaskedLM PLL and fill-mask through the inference core, the texts pre-encoded (no MeCab needed here)."""
    from jbert_ray.inference import MaskedLM

    texts = json.loads((inputs / "texts.json").read_text())
    info = inspect_shards(inputs / "shards")
    vocab = (info.tokenizer_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    encodings = {e["text"]: Encoding(e["ids"], e["word_start"]) for group in texts.values() for e in group}
    tokenizer = PreEncodedTokenizer(vocab, encodings)
    special = _special_ids(info.tokenizer_dir)
    model = build_model(
        hf_config_dict(
            PRESETS[size], "modernbert", len(vocab), {k: special[k] for k in ("pad", "cls", "sep")}
        )
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lm = MaskedLM(model.to(device=device, dtype=dtype), tokenizer)
    sentences = [e["text"] for e in texts["score"]]
    lm.score(sentences[:8])  # warm-up
    _sync(device)
    started = time.perf_counter()
    lm.score(sentences)
    _sync(device)
    pll_s = time.perf_counter() - started
    fills = [e["text"] for e in texts["fill_mask"]] * 8
    lm.fill_mask(fills)
    latencies = []
    for _ in range(10):
        started = time.perf_counter()
        lm.fill_mask(fills)
        _sync(device)
        latencies.append(time.perf_counter() - started)
    tokens = sum(len(e["ids"]) - 2 for e in texts["score"])
    return [
        {"phase": "score", "what": f"PLL, modernbert-{size} {str(dtype)[6:]}, {len(sentences)} sentences",
         "sentences_per_s": round(len(sentences) / pll_s, 1), "tokens_per_s": round(tokens / pll_s)},
        {"phase": "score", "what": f"fill-mask, {len(fills)} texts per call", "p50_ms": round(1000 * float(np.median(latencies)), 1)},
    ]  # fmt: skip


def stream_row(shards_dir: Path, cpus: int, seconds: float, epochs: int) -> dict:
    """Tokens/s the product masking stream delivers through iter_torch_batches with no model (Ray only)."""
    what = f"build_train_stream → iter_torch_batches, {cpus} CPUs, no model"
    if importlib.util.find_spec("ray") is None:
        return {"phase": "stream", "what": f"skipped: no Ray on this machine ({what})"}
    import ray

    from jbert_ray.pretrain.stream import build_train_stream, stream_spec
    from jbert_ray.storage import Store

    info = inspect_shards(shards_dir)
    # Three epochs planned, as a time-budgeted run plans them (each epoch is one read in the stream's union).
    cfg = PretrainConfig(data_dir=str(shards_dir), output_dir="", num_workers=1, global_batch_size=256,
                         max_steps=max(1, epochs * info.train_rows // 256 - 1))  # fmt: skip
    ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        with tempfile.TemporaryDirectory() as run_dir:
            stream = build_train_stream(stream_spec(cfg, info, Store(run_dir)))
            tokens, started, first = 0, time.perf_counter(), None
            for batch in stream.iter_torch_batches(batch_size=256, prefetch_batches=4):
                first = first or time.perf_counter() - started
                tokens += int(batch["attention_mask"].sum())
                if time.perf_counter() - started - first >= seconds:
                    break
            total = time.perf_counter() - started
    finally:
        ray.shutdown()
    # Ray Data keeps producing while the first batch is on its way, so the rate after it is an upper bound on the
    # steady rate, and the rate with the start-up a lower bound.
    after_first = tokens / max(total - first, 1e-9)
    return {"phase": "stream", "what": what, "tokens_per_s": round(after_first),
            "tokens_per_s_per_cpu": round(after_first / cpus), "with_startup_tokens_per_s": round(tokens / total),
            "first_batch_s": round(first, 1)}  # fmt: skip


def product_rows(inputs: Path, size: str, micro: int, device, step: dict | None, dry_run: bool) -> list[dict]:
    """Level 2, where Ray and MeCab are installed: `run_pretraining` with one worker (÷ the plain step above),
    `jbert score` and a Serve replica under 64 concurrent loopback clients, all on this machine's device."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("fugashi") is None:
        return [{"phase": "product", "what": "skipped: Ray or MeCab (fugashi) is not installed here"}]
    import ray

    from jbert_ray.pretrain.driver import run_pretraining
    from jbert_ray.pretrain.metrics import read_metrics
    from jbert_ray.score import ScoreConfig, run_scoring

    gpu = device.type == "cuda"
    texts = json.loads((inputs / "texts.json").read_text())["score"]
    rows = []
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        with tempfile.TemporaryDirectory() as work:
            work = Path(work)
            run = run_pretraining(PretrainConfig(
                data_dir=str(inputs / "shards"), output_dir=str(work / "run"), model_config=size, num_workers=1,
                use_gpu=gpu, max_steps=20 if dry_run else 200, micro_batch_size=micro, log_every=10, eval_every=10**6,
                checkpoint_every=10**6, show_progress=False))  # fmt: skip
            metrics = [r for r in read_metrics(work / "run" / "metrics.csv") if r.get("elapsed_s")]
            first, last = metrics[0], metrics[-1]  # from the first row: the stream's start-up left out
            sequences_per_s = (last["step"] - first["step"]) * micro / (last["elapsed_s"] - first["elapsed_s"])
            plain = step["tokens_per_s"] / SEQ_LEN if step else None
            rows.append({"phase": "product", "what": f"run_pretraining, 1 worker, modernbert-{size}, batch {micro}",
                         "tokens_per_s": round(run["tokens_per_s"]), "steps": run["step"],
                         "ray_vs_plain": round(sequences_per_s / plain, 2) if plain else None})  # fmt: skip
            corpus = work / "texts.jsonl"
            corpus.write_text("".join(json.dumps({"text": t["text"]}, ensure_ascii=False) + "\n" for t in texts))
            summary = run_scoring(ScoreConfig(input=str(corpus), model_dir=str(work / "run" / "model"),
                                              output_dir=str(work / "scores"), num_actors=1,
                                              gpus_per_actor=1 if gpu else 0, show_progress=False))  # fmt: skip
            rows.append({"phase": "product", "what": f"jbert score, 1 actor, {len(texts)} sentences",
                         "sentences_per_s": summary["sentences_per_s"]})  # fmt: skip
            rows.append(_serve_row(work / "run" / "model", [t["text"] for t in texts], gpu, 3 if dry_run else 20))
    finally:
        ray.shutdown()
    return rows


def _serve_row(model_dir: Path, texts: list[str], gpu: bool, seconds: float, clients: int = 64) -> dict:
    """A Serve replica (bf16 on a GPU) under `clients` concurrent loopback clients: req/s, p50, p99, batch."""
    import concurrent.futures
    import urllib.request

    from ray import serve

    from jbert_ray.serve import ServeArgs, build_app, free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = ServeArgs(model_dir=str(model_dir), min_replicas=1, max_replicas=1, num_gpus=1 if gpu else 0,
                     num_cpus=1, dtype="bfloat16" if gpu else "float32", max_ongoing_requests=2 * clients)  # fmt: skip
    serve.run(build_app(args), name="gpu-bench", route_prefix="/")
    bodies = [json.dumps({"text": text[: len(text) // 2] + "[MASK]" + text[len(text) // 2 + 1:]}).encode()
              for text in texts]  # fmt: skip
    deadline = time.perf_counter() + seconds

    def client(index: int) -> list[tuple[float, int]]:
        done = []
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/fill-mask", data=bodies[index % len(bodies)])
            with urllib.request.urlopen(request, timeout=60) as response:
                batch = int(response.headers["X-Batch-Size"])
            done.append((time.perf_counter() - started, batch))
            index += clients
        return done

    try:
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            results = [r for rows in pool.map(client, range(clients)) for r in rows]
    finally:
        serve.shutdown()
    latencies = np.array([r[0] for r in results])
    return {"phase": "product", "what": f"Serve fill-mask, 1 replica{' bf16' if gpu else ''}, {clients} clients",
            "req_per_s": round(len(results) / seconds, 1), "p50_ms": round(1000 * float(np.median(latencies)), 1),
            "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1),
            "mean_batch": round(float(np.mean([r[1] for r in results])), 1)}  # fmt: skip


# ---------------------------------------------------------------- helpers


def _special_ids(tokenizer_dir: Path) -> dict[str, int]:
    vocab = (tokenizer_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    ids = {token: i for i, token in enumerate(vocab)}
    return {
        "pad": ids["[PAD]"],
        "unk": ids["[UNK]"],
        "cls": ids["[CLS]"],
        "sep": ids["[SEP]"],
        "mask": ids["[MASK]"],
    }


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _plot(curve: list, path: Path) -> None:
    if importlib.util.find_spec("matplotlib") is None or not curve:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([c[1] for c in curve], [c[3] for c in curve])
    ax.set(xlabel="tokens", ylabel="train loss (masked tokens)", title="bench/gpu.py learn phase")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def print_table(rows: list[dict]) -> None:
    columns = ["phase", "what", "tokens_per_s", "mfu", "tflops", "peak_mem_gib", "params_m", "steps", "valid_acc",
               "valid_loss", "sentences_per_s", "p50_ms", "p99_ms", "req_per_s", "mean_batch", "ray_vs_plain",
               "tokens_per_s_per_cpu", "with_startup_tokens_per_s", "first_batch_s"]  # fmt: skip
    used = [c for c in columns if any(row.get(c) is not None for row in rows)]
    print("| " + " | ".join(used) + " |")
    print("|" + "---|" * len(used))
    for row in rows:
        print("| " + " | ".join("" if row.get(c) is None else str(row[c]) for c in used) + " |")


if __name__ == "__main__":
    main()
