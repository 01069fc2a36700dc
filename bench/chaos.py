"""The fill-mask service under faults and load (issue 28.6), on 127.0.0.1 with 2 CPUs, as `jbert serve` runs it
(Ray's high-throughput mode, Serve's proxy):

0. one client sending the largest requests the limits allow (32 texts, max_request_tokens in all, /score with
   exact PLL) among 31 clients sending short fill-mask requests: p99 of the short ones with and without it;
1. a replica killed (SIGKILL of its process) while 32 clients send requests to two: the requests that failed,
   and the seconds until Serve reports two running replicas again;
2. autoscaling for real (min 1, max 2 replicas, the default target): idle → 64 clients → idle; the replicas
   Serve reports each second, req/s and p99 before and after the scale-up, and the scale-down once idle
   (downscale_delay_s is 20 s here instead of 120 s, so that the run ends);
3. a rolling update (`serve.run` of the app with another model_dir, what `serve deploy` does) under 32 clients:
   failed requests, and when the answers switch to the new model.

    python bench/chaos.py            # ~5 min: a random BERT L2 H128 (the faults, not the model, are measured)
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from results import machine, publish  # bench/ is the script's folder
from score import make_model

from jbert_ray.serve import ServeArgs, build_app
from serve import QUIET_LOGS, SAMPLE, bench_sentences, local_serve, percentile, read_texts


class Load:
    """`clients` threads posting fill-mask requests back to back; every answer is logged with its time."""

    def __init__(self, url: str, bodies: list[dict], clients: int):
        self.url, self.bodies, self.clients = url, bodies, clients
        self.route = "/score" if "texts" in bodies[0] else "/fill-mask"
        self.log: list[tuple[float, float, int, str]] = []  # (end time, latency, status, first token id)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _client(self, index: int) -> None:
        import requests

        session, i = requests.Session(), index
        while not self._stop.is_set():
            body = self.bodies[i % len(self.bodies)]
            i += self.clients
            start = time.perf_counter()
            try:
                response = session.post(self.url + self.route, json=body, timeout=120)
                status = response.status_code
                first = ""
                if status == 200 and self.route == "/fill-mask":
                    first = str(response.json()["predictions"][0][0][0]["token_id"])
            except (requests.RequestException, ValueError, KeyError) as error:  # a reset connection fails too
                status, first = 0, type(error).__name__
            with self._lock:
                self.log.append((time.perf_counter(), time.perf_counter() - start, status, first))

    def window(self, start: float, end: float) -> dict:
        rows = [r for r in self.log if start <= r[0] < end]
        ok = sorted(r[1] for r in rows if r[2] == 200)
        return {"rps": len(ok) / max(end - start, 1e-9), "p99_ms": percentile(ok, 99) * 1000 if ok else 0.0,
                "failed": sum(1 for r in rows if r[2] != 200)}  # fmt: skip


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get("chaos")
    if app is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())


def deploy(model_dir: Path, **overrides) -> None:
    from ray import serve

    args = ServeArgs(model_dir=str(model_dir), num_cpus=1, num_threads=1, **overrides)
    serve.run(build_app(args), name="chaos", route_prefix="/", logging_config=QUIET_LOGS)


def largest_requests(url: str, model_dir: Path, bodies: list[dict]) -> list[list]:
    """p99 of short requests from 31 clients, alone and beside one client sending the largest allowed /score."""
    from jbert_ray.tokenizer import JapaneseTokenizer

    deploy(model_dir, min_replicas=2, max_replicas=2)
    limit = ServeArgs().max_request_tokens
    tokenizer = JapaneseTokenizer.from_pretrained(model_dir)
    texts, tokens = [], 0
    for text in sorted(read_texts(SAMPLE), key=len, reverse=True):  # the longest the limits allow first
        n = len(tokenizer.encode(text).ids)
        if len(text) <= ServeArgs().max_text_chars and n <= 512 and len(texts) < ServeArgs().max_texts \
                and tokens + n <= limit:  # fmt: skip
            texts.append(text)
            tokens += n
    rows = []
    for heavy in (False, True):
        start = time.perf_counter()
        with Load(url, bodies, 31) as short:
            if heavy:
                with Load(url, [{"texts": texts, "method": "pll"}], 1) as big:
                    time.sleep(30)
            else:
                time.sleep(30)
        window = short.window(start + 5, time.perf_counter())  # after the first requests
        rows.append([f"31 short clients{', + 1 sending the largest /score' if heavy else ''}: req/s, p99 ms",
                     f"{window['rps']:.1f}, {window['p99_ms']:.0f}"])  # fmt: skip
    ok = sorted(r[1] for r in big.log if r[2] == 200)
    rows.append([f"the largest /score ({len(texts)} texts, {tokens:,} tokens, exact PLL): answered, median s",
                 f"{len(ok)} of {len(big.log)}, {percentile(ok, 50):.1f}" if ok else f"0 of {len(big.log)}"])  # fmt: skip
    return rows


def kill_a_replica(url: str, model_dir: Path, bodies: list[dict]) -> list[list]:
    import requests

    deploy(model_dir, min_replicas=2, max_replicas=2)
    start = time.perf_counter()
    with Load(url, bodies, 32) as load:
        time.sleep(10)
        victim = requests.get(f"{url}/info", timeout=30).json()
        killed_at = time.perf_counter()
        os.kill(victim["pid"], signal.SIGKILL)
        answering: set[str] = set()
        while time.perf_counter() - killed_at < 120:  # until a new replica answers beside the survivor
            answering.add(requests.get(f"{url}/info", timeout=30).json()["replica"])
            if len(answering - {victim["replica"]}) >= 2:
                break
            time.sleep(0.2)
        back_at = time.perf_counter()
        time.sleep(10)
    before, during = load.window(start, killed_at), load.window(killed_at, back_at)
    after = load.window(back_at, time.perf_counter())
    return [["kill 1 of 2 replicas, 32 clients: failed requests (before / until replaced / after)",
             f"{before['failed']} / {during['failed']} / {after['failed']}"],
            ["seconds until a new replica answers", f"{back_at - killed_at:.1f}"],
            ["req/s before / while 1 replica / after",
             f"{before['rps']:.1f} / {during['rps']:.1f} / {after['rps']:.1f}"]]  # fmt: skip


def autoscale(url: str, model_dir: Path, bodies: list[dict]) -> list[list]:
    deploy(model_dir, min_replicas=1, max_replicas=2, downscale_delay_s=20)
    settle = time.perf_counter() + 90
    while running_replicas() != 1 and time.perf_counter() < settle:  # the previous scenario ran 2
        time.sleep(1)
    timeline: list[tuple[float, int]] = []
    start = time.perf_counter()

    def sample(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            timeline.append((time.perf_counter() - start, running_replicas()))
            time.sleep(1)

    sample(5)
    load_start = time.perf_counter()
    with Load(url, bodies, 64) as load:
        sample(50)
    idle_start = time.perf_counter()
    sample(60)
    up = next((t for t, n in timeline if t >= load_start - start and n >= 2), None)
    down = next((t for t, n in timeline if t >= idle_start - start and n == 1), None)
    up_at = start + up if up is not None else idle_start
    first, last = load.window(load_start, up_at), load.window(max(up_at, idle_start - 20), idle_start)
    changes = [f"{t:.0f}s:{n}" for i, (t, n) in enumerate(timeline) if i == 0 or n != timeline[i - 1][1]]
    return [["autoscaling 1→2 under 64 clients: seconds from load to 2 replicas",
             f"{up - (load_start - start):.1f}" if up is not None else "never"],
            ["req/s (p99 ms) on 1 replica / on 2",
             f"{first['rps']:.1f} ({first['p99_ms']:.0f}) / {last['rps']:.1f} ({last['p99_ms']:.0f})"],
            ["seconds from idle to 1 replica (downscale_delay_s 20)",
             f"{down - (idle_start - start):.1f}" if down is not None else "not within 60 s"],
            ["failed requests during the ramp", str(load.window(load_start, idle_start)["failed"])],
            ["replicas over time (s:count, at each change)", " ".join(changes)]]  # fmt: skip


def rolling_update(url: str, old: Path, new: Path, bodies: list[dict]) -> list[list]:
    deploy(old, min_replicas=2, max_replicas=2)
    with Load(url, bodies[:1], 32) as load:  # one body: its first token tells the models apart
        time.sleep(8)
        old_token = load.log[-1][3]
        update_at = time.perf_counter()
        deploy(new, min_replicas=2, max_replicas=2)  # returns once the new version is running
        done_at = time.perf_counter()
        time.sleep(8)
    after = [r for r in load.log if r[0] > done_at + 2]
    switched = next((r[0] - update_at for r in load.log if r[0] > update_at and r[2] == 200 and r[3] != old_token),
                    None)  # fmt: skip
    return [["rolling update to another model_dir, 32 clients: failed requests",
             str(load.window(update_at - 8, time.perf_counter())["failed"])],
            ["seconds until the first answer of the new model / until the update finished",
             f"{switched:.1f} / {done_at - update_at:.1f}" if switched is not None else "never"],
            ["answers of the old model after the update finished (+2 s)",
             str(sum(1 for r in after if r[3] == old_token))]]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    at_start = machine()
    with tempfile.TemporaryDirectory() as tmp:
        old = make_model(Path(tmp) / "old")
        new = Path(tmp) / "new"
        shutil.copytree(old, new)
        reseed(new)
        bodies = [{"text": t, "top_k": 5} for t in bench_sentences(str(old), 256, masked=True)]
        rows = []
        with local_serve() as port:
            url = f"http://127.0.0.1:{port}"
            for name, scenario in (("largest requests", lambda: largest_requests(url, old, bodies)),
                                   ("kill", lambda: kill_a_replica(url, old, bodies)),
                                   ("autoscale", lambda: autoscale(url, old, bodies)),
                                   ("update", lambda: rolling_update(url, old, new, bodies))):  # fmt: skip
                print(f"{name} …", flush=True)
                rows += scenario()
    publish("chaos", "The fill-mask service under faults and load (2 CPUs, Serve's proxy, BERT L2 H128)",
            ["what", "measured"], rows, at_start=at_start)  # fmt: skip


def reseed(model_dir: Path) -> None:
    """Give the copy other weights (same vocab): its answers tell the two models apart."""
    import torch
    from transformers import BertForMaskedLM

    torch.manual_seed(1)
    model = BertForMaskedLM(BertForMaskedLM.from_pretrained(model_dir).config)
    model.save_pretrained(model_dir)


if __name__ == "__main__":
    main()
