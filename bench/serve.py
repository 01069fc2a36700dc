"""Benchmark the fill-mask service and PLL scoring against what a user would otherwise write.

    python bench/serve.py                      # ~5 min on 2 CPUs: a random "small" BERT with a 32k vocabulary
    python bench/serve.py --quick              # ~1-2 min smoke run
    python bench/serve.py --model MODEL_DIR    # any model dir (ours, or a Tohoku-style HF Japanese BERT)

0. `jbert serve` with its default flags, as a user starts it (autoscaling from 1 to 2 replicas, 1 torch thread
   each), under 8, 32 and 64 clients in turn: requests/s, p50, p99 and the replicas that answered, after a
   warm-up long enough for autoscaling to act. The honest row: what a user gets without tuning.
1. fill-mask over HTTP, N concurrent clients: Ray Serve (`jbert_ray.serve`, @serve.batch) vs a plain FastAPI app
   calling transformers `pipeline("fill-mask")` per request under `uvicorn --workers R`: as many worker processes
   as we get replicas, the same torch threads each (R × threads = the CPUs); requests/s, p50 and p99 of both. A
   third row serves a model that does nothing the same way: Serve's own cost, the ceiling of the ratio on these
   CPUs. bfloat16 weights are a row apart (the baseline runs fp32: not the same arithmetic).
2. PLL scoring: `MaskedLM.score` vs naive PLL (one forward per masked position, batch 1) and vs batched masked
   copies with the full output layer at every position (the mlm-scoring way), same buckets and batch budget.
Everything runs on 127.0.0.1, one phase after the other, with the same model and the same torch thread count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jbert_ray.serve import free_port  # after the path set-up that lets the bench run in place

sys.path.insert(0, str(REPO / "bench"))
from results import machine, publish

SAMPLE = REPO / "jbert_ray" / "sample" / "ja_sample.jsonl"
TRAIN_CORPUS = REPO.parent / "shared" / "corpus" / "ja_train.jsonl.gz"
QUIET_LOGS = {"enable_access_log": False, "log_level": "WARNING"}
SIZES = {
    "small": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 1024,
    },
    "base": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model dir (default: build a random one of --size in a temp dir)")
    parser.add_argument("--size", default="small", choices=sorted(SIZES), help="random model to build")
    parser.add_argument("--quick", action="store_true", help="fewer requests and sentences (smoke run)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent HTTP clients")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process, both sides (OpenMP threads spin: >1 on a busy machine can be 10x slower)",
    )
    parser.add_argument("--replicas", type=int, default=0, help="Serve replicas (0 = CPUs / threads)")
    parser.add_argument(
        "--phases",
        default="auto",
        help="comma-separated subset of defaults,baseline,serve,serve-haproxy,serve-noop,serve-bf16,score; auto = all "
        "(defaults: "
        "`jbert serve` with its default flags at 8, 32 and 64 clients; serve-noop: Serve "
        "around a model that does nothing, the ceiling on these CPUs; serve-bf16: Serve with bfloat16 weights, a "
        "separate row, only where the CPU has bf16 instructions)",
    )
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline_server:
        return run_baseline_server(args.model, args.port, args.threads, args.replicas)
    at_start = machine()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_model(Path(tmp) / "model", args.size)
        requests_per_client = 10 if args.quick else 40
        print(
            f"model {model_dir} ({describe(model_dir)}); torch threads {args.threads}; "
            f"{os.cpu_count()} CPUs; load average before {load_before[0]:.1f}",
            flush=True,
        )
        phases = set(args.phases.split(","))
        if "auto" in phases:
            phases = {"defaults", "baseline", "serve", "serve-haproxy", "serve-noop", "score"} | (
                {"serve-bf16"} if has_fast_bf16() else set()
            )
        if "defaults" in phases:
            rows = bench_defaults(model_dir, warm_s=10 if args.quick else 25, measure_s=10 if args.quick else 20)
            publish("serve-defaults", f"`jbert serve` with default flags (autoscaling 1→2 replicas), "
                    f"{describe(model_dir)}", ["clients", "requests/s", "p50 ms", "p99 ms", "replicas answering"],
                    rows, at_start=at_start)  # fmt: skip
        if phases & {"baseline", "serve", "serve-haproxy", "serve-noop", "serve-bf16"}:
            replicas = args.replicas or max(1, (os.cpu_count() or 1) // args.threads)
            rows = bench_http(model_dir, args.clients, requests_per_client, args.threads, replicas, phases)
            publish("serve", f"Serving fill-mask over HTTP: {args.clients} clients, {replicas} replicas or uvicorn "
                    f"workers × {args.threads} torch thread(s), {describe(model_dir)}",
                    ["server", "requests/s", "p50 ms", "p99 ms", "÷ baseline"], rows, at_start=at_start)  # fmt: skip
        if "score" in phases:
            rows = bench_score(
                model_dir, args.threads, n_texts=32 if args.quick else 128, n_naive=6 if args.quick else 16
            )
            publish("serve-pll", f"PLL scoring, one process × {args.threads} torch thread(s), {describe(model_dir)}",
                    ["method", "sentences/s", "÷ naive", "÷ full output"], rows, at_start=at_start)  # fmt: skip
    print(
        f"load average after {os.getloadavg()[0]:.1f} (other processes share these CPUs: "
        "timings are noisy when it exceeds the CPU count)"
    )


# ---- the model ----


def build_model(path: Path, size: str) -> str:
    """A randomly initialised BertForMaskedLM with a WordPiece vocabulary trained on the shared corpus."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from jbert_ray.checkpoint import save_model_dir
    from jbert_ray.tokenizer import TokenizerConfig, train_vocab_on_texts

    texts = read_texts(TRAIN_CORPUS if TRAIN_CORPUS.is_file() else SAMPLE)
    tokenizer = train_vocab_on_texts(texts, TokenizerConfig(vocab_size=32768, min_frequency=1))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=512, **SIZES[size])
    save_model_dir(path, BertForMaskedLM(config), tokenizer)
    return str(path)


def describe(model_dir: str) -> str:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return (
        f"hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, vocab {config['vocab_size']}"
    )


def read_texts(path: Path) -> list[str]:
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def bench_sentences(model_dir: str, n: int, masked: bool) -> list[str]:
    """n sample sentences of 20-80 characters; with masked=True the middle MeCab word becomes [MASK]."""
    from jbert_ray.tokenizer import JapaneseTokenizer

    tokenizer = JapaneseTokenizer.from_pretrained(model_dir)
    texts = [t for t in read_texts(SAMPLE) if 20 <= len(t) <= 80][:n]
    if not masked:
        return texts
    out = []
    for text in texts:
        words = tokenizer.words(text)
        words[len(words) // 2] = "[MASK]"
        out.append("".join(words))
    return out


# ---- 1. fill-mask over HTTP ----


def bench_http(
    model_dir: str, clients: int, per_client: int, threads: int, replicas: int, phases: set[str]
) -> list[list]:
    bodies = [{"text": t, "top_k": 5} for t in bench_sentences(model_dir, 256, masked=True)]
    total = clients * per_client
    print(
        f"\nfill-mask over HTTP: {clients} concurrent clients, {total} requests each side (after warm-up), "
        f"torch threads {threads} per process",
        flush=True,
    )
    baseline = ours = None
    rows: list[list] = []
    if "baseline" in phases:
        port = free_port()
        command = [sys.executable, __file__, "--baseline-server", "--model", model_dir, "--replicas", str(replicas)]
        server = subprocess.Popen([*command, "--port", str(port), "--threads", str(threads)])
        try:
            wait_until_up(f"http://127.0.0.1:{port}/healthz", server)
            baseline = load_test(f"http://127.0.0.1:{port}/fill-mask", bodies, clients, per_client)
        finally:
            server.terminate()
            server.wait(30)
        rows.append(report(f"baseline: FastAPI + pipeline, uvicorn --workers {replicas}", baseline))
    if "serve" in phases:
        ours = run_serve_load(model_dir, bodies, clients, per_client, threads, replicas)
        rows.append(report(f"ours: `jbert serve`, {replicas} replica(s)", ours, baseline))
        print(f"  (ingress: {ours['ingress']})", flush=True)
    if "serve-haproxy" in phases:
        fast = run_serve_load(model_dir, bodies, clients, per_client, threads, replicas, haproxy=True)
        rows.append(report(f"ours with `--haproxy`, {replicas} replica(s)", fast, baseline))
    if "serve-noop" in phases:  # what Serve itself allows on these CPUs: the ceiling of the ratio above
        noop = run_noop_serve_load(bodies, clients, per_client, replicas)
        rows.append(report("Ray Serve around a no-op model (Serve's own ceiling)", noop, baseline))
    if "serve-bf16" in phases:  # a serving option, not the same arithmetic: a row apart
        half = run_serve_load(model_dir, bodies, clients, per_client, threads, replicas, dtype="bfloat16")
        rows.append(report("ours with bfloat16 weights (not the same arithmetic)", half, baseline))
    return rows


def bench_defaults(model_dir: str, warm_s: float, measure_s: float) -> list[list]:
    """`jbert serve --model M` (nothing else) under 8, 32 and 64 clients, each after `warm_s` of the same load."""

    bodies = [{"text": t, "top_k": 5} for t in bench_sentences(model_dir, 256, masked=True)]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "jbert_ray.cli", "serve", "--model", model_dir,
                               "--port", str(port)], cwd=REPO, stdout=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        wait_until_up(f"{url}/healthz", server, timeout_s=180)
        print("\n`jbert serve` with default flags:", flush=True)
        for clients in (8, 32, 64):
            timed_load(f"{url}/fill-mask", bodies, clients, warm_s)  # autoscaling sees the load meanwhile
            replicas: set[str] = set()
            sampler = threading.Thread(target=sample_replicas, args=(url, replicas, measure_s))
            sampler.start()
            result = timed_load(f"{url}/fill-mask", bodies, clients, measure_s)
            sampler.join()
            row = report(f"{clients} clients", result)
            rows.append([*row[:4], str(len(replicas))])
            print(f"    replicas answering: {len(replicas)}", flush=True)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(90)
    return rows


def sample_replicas(url: str, found: set[str], seconds: float) -> None:
    """Add the replica ids that answer /info, asked twice a second for `seconds`."""
    import requests

    for _ in range(int(seconds * 2)):
        found.add(requests.get(f"{url}/info", timeout=30).json()["replica"])
        time.sleep(0.5)


def timed_load(url: str, bodies: list[dict], clients: int, seconds: float) -> dict:
    """`clients` threads sending requests back to back for `seconds`."""
    import requests

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(index: int, count: int, record: bool) -> None:
        session, i = requests.Session(), 0
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            response = session.post(url, json=bodies[(index * 997 + i) % len(bodies)], timeout=300)
            i += 1
            with lock:
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors.append(f"{response.status_code} {response.text[:100]}")

    start = time.perf_counter()
    run_clients(client, clients, 0, record=True)
    wall = time.perf_counter() - start
    latencies.sort()
    return {"rps": len(latencies) / wall, "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
            "errors": len(errors), "first_error": errors[0] if errors else ""}  # fmt: skip


def run_serve_load(
    model_dir: str,
    bodies: list[dict],
    clients: int,
    per_client: int,
    threads: int,
    replicas: int,
    dtype: str = "float32",
    haproxy: bool = False,
) -> dict:
    from ray import serve

    from jbert_ray.serve import ServeArgs, build_app

    with local_serve(haproxy) as port:
        cpus = min(threads, (os.cpu_count() or 1) / replicas)  # Ray resources only; threads set the real use
        args = ServeArgs(
            model_dir=model_dir,
            dtype=dtype,
            num_cpus=cpus,
            num_threads=threads,
            min_replicas=replicas,
            max_replicas=replicas,
            max_batch_size=32,
            max_ongoing_requests=64,
        )
        serve.run(build_app(args), name="bench", route_prefix="/", logging_config=QUIET_LOGS)
        result = load_test(f"http://127.0.0.1:{port}/fill-mask", bodies, clients, per_client)
        import requests

        info = requests.get(f"http://127.0.0.1:{port}/info", timeout=30).json()
        stats = info["stats"]["fill_mask"]
        result["ingress"] = info["ingress"]
        result["max_batch"] = stats["max_batch_size"]
        result["mean_batch"] = stats["texts"] / max(stats["batches"], 1)
        return result


def run_noop_serve_load(bodies: list[dict], clients: int, per_client: int, replicas: int) -> dict:
    """Serve's own cost per request: the same shape (FastAPI ingress, @serve.batch) around a model doing nothing."""
    from fastapi import FastAPI
    from ray import serve

    app = FastAPI()

    @serve.deployment(
        num_replicas=replicas, max_ongoing_requests=64,
        ray_actor_options={"num_cpus": (os.cpu_count() or 1) / replicas},
    )  # fmt: skip
    @serve.ingress(app)
    class NoOpFillMask:
        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.03)
        async def predict(self, texts: list[str]) -> list[list]:
            return [[[{"token": "[UNK]", "token_id": 1, "score": 0.0}]] for _ in texts]

        @app.post("/fill-mask")
        async def fill_mask(self, body: dict) -> dict:
            return {"predictions": [await self.predict(body["text"])]}

    with local_serve() as port:
        serve.run(NoOpFillMask.bind(), name="noop", route_prefix="/", logging_config=QUIET_LOGS)
        return load_test(f"http://127.0.0.1:{port}/fill-mask", bodies, clients, per_client)


@contextlib.contextmanager
def local_serve(haproxy: bool = False):
    """A local Ray with Serve's ingress on a free loopback port; both stopped on exit."""
    import ray
    from ray import serve

    from jbert_ray.serve import high_throughput_env

    # Ray's documented high-throughput mode, as `jbert serve` (--haproxy) sets it; Ray reads it when it starts.
    for name in ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_HA_PROXY"):
        os.environ.pop(name, None)
    os.environ.update(high_throughput_env(haproxy))
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


def load_test(url: str, bodies: list[dict], clients: int, per_client: int) -> dict:
    """`clients` threads each send `per_client` requests back to back (after one warm-up round)."""
    import requests

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(index: int, count: int, record: bool) -> None:
        session = requests.Session()
        for i in range(count):
            body = bodies[(index * count + i) % len(bodies)]
            start = time.perf_counter()
            response = session.post(url, json=body, timeout=300)
            elapsed = time.perf_counter() - start
            with lock:
                if response.status_code != 200:
                    errors.append(f"{response.status_code} {response.text[:100]}")
                elif record:
                    latencies.append(elapsed)

    run_clients(client, clients, 2, record=False)  # warm-up: connections, first batches, lazy init
    start = time.perf_counter()
    run_clients(client, clients, per_client, record=True)
    wall = time.perf_counter() - start
    latencies.sort()
    return {
        "rps": len(latencies) / wall,
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
    }


def run_clients(client, clients: int, count: int, record: bool) -> None:
    workers = [threading.Thread(target=client, args=(i, count, record)) for i in range(clients)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def report(name: str, result: dict, baseline: dict | None = None) -> list:
    extra = ""
    if "max_batch" in result:
        extra = f"   batch mean {result['mean_batch']:.1f}, max {result['max_batch']}"
    errors = f"   {result['errors']} errors (first: {result['first_error']})" if result["errors"] else ""
    print(
        f"  {name:<36} {result['rps']:7.1f} req/s   p50 {result['p50'] * 1000:7.1f} ms   "
        f"p99 {result['p99'] * 1000:7.1f} ms{extra}{errors}",
        flush=True,
    )
    ratio = f"{result['rps'] / baseline['rps']:.2f}×" if baseline else "1.00×"
    return [name + (f" ({result['errors']} errors)" if result["errors"] else ""), f"{result['rps']:.1f}",
            f"{result['p50'] * 1000:.0f}", f"{result['p99'] * 1000:.0f}", ratio]  # fmt: skip


def run_baseline_server(model_dir: str, port: int, threads: int, workers: int) -> None:
    """What a user would otherwise write: FastAPI + transformers' pipeline per request, under `uvicorn --workers`
    (as many worker processes as we get replicas, the same torch threads in each)."""
    import uvicorn

    os.environ.update(JBERT_BENCH_MODEL=model_dir, JBERT_BENCH_THREADS=str(threads))
    uvicorn.run(f"{Path(__file__).stem}:baseline_app", factory=True, app_dir=str(Path(__file__).parent),
                host="127.0.0.1", port=port, workers=workers, log_level="warning")  # fmt: skip


def baseline_app():
    """The baseline's app, built in each uvicorn worker process."""
    import torch
    from fastapi import FastAPI
    from transformers import pipeline

    torch.set_num_threads(int(os.environ["JBERT_BENCH_THREADS"]))
    fill_mask = pipeline("fill-mask", model=os.environ["JBERT_BENCH_MODEL"], device="cpu")
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/fill-mask")
    def predict(body: dict) -> list:
        return fill_mask(body["text"], top_k=body.get("top_k", 5))

    return app


# ---- 2. PLL scoring ----


def bench_score(model_dir: str, threads: int, n_texts: int, n_naive: int) -> list[list]:
    import torch

    from jbert_ray.inference import MaskedLM

    torch.set_num_threads(threads)
    lm = MaskedLM.from_pretrained(model_dir, device="cpu")
    texts = bench_sentences(model_dir, n_texts, masked=False)
    n_tokens = sum(len(e.ids) - 2 for e in lm.encode(texts))
    print(
        f"\nPLL scoring: {len(texts)} sentences, {n_tokens / len(texts):.1f} tokens on average "
        f"(naive reference on the first {n_naive})",
        flush=True,
    )
    lm.score(texts[:4])  # warm-up
    ours, ours_s = timed(lambda: lm.score(texts))
    full, full_s = timed(lambda: full_output_pll(lm, texts))
    naive, naive_s = timed(lambda: naive_pll(lm, texts[:n_naive]))
    rate = {"ours": len(texts) / ours_s, "full": len(texts) / full_s, "naive": n_naive / naive_s}
    names = {"ours": "`MaskedLM.score` (ours)", "naive": "naive PLL: batch 1, full output layer",
             "full": "batched masked copies, full output layer"}  # fmt: skip
    rows = [[names[k], f"{rate[k]:.2f}", f"{rate[k] / rate['naive']:.2f}×", f"{rate[k] / rate['full']:.2f}×"]
            for k in ("ours", "naive", "full")]  # fmt: skip
    print(f"  {'MaskedLM.score':<36} {rate['ours']:8.2f} sentences/s", flush=True)
    print(
        f"  {'naive PLL (batch 1, full output)':<36} {rate['naive']:8.2f} sentences/s   "
        f"ratio {rate['ours'] / rate['naive']:.2f}x (target >= 5)"
    )
    print(
        f"  {'batched copies, full output layer':<36} {rate['full']:8.2f} sentences/s   "
        f"ratio {rate['ours'] / rate['full']:.2f}x (target >= 1.5)"
    )
    diff_naive = max_diff([r["token_pll"] for r in ours[:n_naive]], naive)
    diff_full = max_diff([r["token_pll"] for r in ours], full)
    print(
        f"  max |token PLL difference|: vs naive {diff_naive:.1e}, vs full output {diff_full:.1e}", flush=True
    )
    return rows


def naive_pll(lm, texts: list[str]) -> list[list[float]]:
    """One forward of the whole model per masked position, batch 1 (the textbook loop)."""
    import torch

    out = []
    with torch.inference_mode():
        for encoding in lm.encode(texts):
            ids = torch.tensor([encoding.ids])
            values = []
            for j in range(1, len(encoding.ids) - 1):
                masked = ids.clone()
                masked[0, j] = lm.tokenizer.mask_token_id
                log_probs = torch.log_softmax(lm.model(input_ids=masked).logits[0, j].float(), -1)
                values.append(log_probs[encoding.ids[j]].item())
            out.append(values)
    return out


def full_output_pll(lm, texts: list[str]) -> list[list[float]]:
    """Batched masked copies (same length buckets and token budget as MaskedLM) with logits at every position."""
    import torch

    copies = [(t, j, e.ids) for t, e in enumerate(lm.encode(texts)) for j in range(1, len(e.ids) - 1)]
    copies.sort(key=lambda c: len(c[2]))
    out = [[0.0] * (len(e.ids) - 2) for e in lm.encode(texts)]
    with torch.inference_mode():
        for batch in lm._buckets(list(range(len(copies))), [len(c[2]) for c in copies]):
            width = len(copies[batch[-1]][2])
            input_ids = torch.full((len(batch), width), lm.tokenizer.pad_token_id)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, c in enumerate(batch):
                _, j, ids = copies[c]
                input_ids[b, : len(ids)] = torch.tensor(ids)
                attention_mask[b, : len(ids)] = 1
                input_ids[b, j] = lm.tokenizer.mask_token_id
            logits = lm.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            for b, c in enumerate(batch):
                t, j, ids = copies[c]
                out[t][j - 1] = log_probs[b, j, ids[j]].item()
    return out


# ---- helpers ----


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max((abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys)), default=0.0)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1)))]


def has_fast_bf16() -> bool:
    """CPU bf16 instructions (AVX512-BF16 or AMX) on Linux."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def wait_until_up(url: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"baseline server exited with {process.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            time.sleep(0.5)
    raise SystemExit(f"{url} did not come up in {timeout_s:.0f} s")


if __name__ == "__main__":
    main()
