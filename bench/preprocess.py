"""Benchmark `jbert preprocess`: scaling 1 → 2 CPUs, memory ×1 vs ×4 corpus, and Ray's overhead over bare encoding.

    python bench/preprocess.py            # ×4 = ../shared/corpus/ja_train.jsonl.gz (88,802 records), ×1 = a quarter
    python bench/preprocess.py --quick    # its first 20,000 records as ×4 (about a minute)

Each Ray run gets a fresh local cluster. A "1 CPU" run pins the whole cluster (driver, raylet, workers) to one
core with sched_setaffinity, a "2 CPU" run to two, so the ratio measures real cores and not just Ray's logical
CPUs. Memory is the peak proportional set size (PSS: shared pages split fairly, so the object store is counted
once) summed over this process and every process it started, sampled every 0.5 s by a thread. Reading PSS makes
the kernel walk every page table (~0.2 CPU-s per second on 2 CPUs, measured with py-spy), so it runs only in the
memory runs; the throughput runs sample just CPU time (/proc/PID/stat), which other tenants of a shared machine
cannot inflate. Throughput counts tokens taken from the text (no [CLS]/[SEP]) per wall-clock second of
run_preprocess.
Targets (issue 4): scaling ≥ 1.7, memory ≤ 1.3, Ray per-CPU ÷ bare ≥ 0.8. Wall-clock figures are only
meaningful on an otherwise idle machine; the CPU-second rows hold up under load.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from results import machine, publish

SHARED_TRAIN = REPO.parent / "shared" / "corpus" / "ja_train.jsonl.gz"
QUICK_RECORDS = 20_000
ALL_CORES = os.sched_getaffinity(0)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help=f"first {QUICK_RECORDS:,} records only")
    parser.add_argument(
        "--corpus", default=str(SHARED_TRAIN), help="a .jsonl or .jsonl.gz corpus (field text)"
    )
    parser.add_argument(
        "--tokenizer", help="tokenizer dir (default: train an 8,000-entry vocab on the sample)"
    )
    parser.add_argument("--max-seq-len", type=int, default=128)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        sys.exit("needs at least 2 cores")

    at_start = machine()
    with tempfile.TemporaryDirectory(prefix="jbert_bench_") as tmp:
        tmp = Path(tmp)
        x1, x4 = make_corpora(Path(args.corpus), tmp, QUICK_RECORDS if args.quick else None)
        tokenizer_dir = Path(args.tokenizer) if args.tokenizer else train_tokenizer(tmp / "tokenizer")
        texts = [json.loads(line)["text"] for line in x1.open(encoding="utf-8")]
        print(f"corpus ×1: {len(texts):,} records, {sum(map(len, texts)):,} chars (a quarter of ×4)")
        print(
            f"load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (an idle machine reads ~0)"
        )

        with pinned(cores[:1]):
            bare = bare_encode(texts, tokenizer_dir)
        print(f"bare encode_batch, 1 core: {bare['tokens']:,} tokens in {bare['seconds']:.1f} s")
        runs = {}
        plan = (
            ("1cpu_x4", x4, 1, False), ("2cpu_x4", x4, 2, False),  # throughput
            ("2cpu_x1_mem", x1, 2, True), ("2cpu_x4_mem", x4, 2, True),  # peak memory
        )  # fmt: skip
        for name, corpus, cpus, memory in plan:
            with pinned(cores[:cpus]):
                runs[name] = ray_run(corpus, tokenizer_dir, tmp / name, cpus, args.max_seq_len, memory)
            r = runs[name]
            print(
                f"ray {cpus} CPU {name[5:]}: {r['tokens']:,} tokens in {r['seconds']:.1f} s "
                f"({r['tokens'] / r['seconds']:,.0f}/s; actors busy {r['actor_seconds']:.1f} s), "
                + (f"peak PSS {r['peak_mb']:,.0f} MB" if memory else f"{r['cpu_seconds']:.1f} CPU-s in all")
            )
        with pinned(cores[:1]):  # again: keep the less disturbed of two measurements
            bare = min(bare, bare_encode(texts, tokenizer_dir), key=lambda b: b["seconds"])
        print(f"bare encode_batch, best of 2: {bare['seconds']:.1f} s ({bare['cpu_seconds']:.1f} CPU-s)")
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")

    rate = {name: r["tokens"] / r["seconds"] for name, r in runs.items()}
    bare_rate = bare["tokens"] / bare["seconds"]
    rows = [
        ("throughput 2 CPUs ÷ 1 CPU (×4 corpus)", rate["2cpu_x4"] / rate["1cpu_x4"], "≥ 1.7"),
        (
            "peak memory ×4 ÷ ×1 corpus (2 CPUs)",
            runs["2cpu_x4_mem"]["peak_mb"] / runs["2cpu_x1_mem"]["peak_mb"],
            "≤ 1.3",
        ),
        ("Ray tokens/s per CPU ÷ bare encode_batch", rate["2cpu_x4"] / 2 / bare_rate, "≥ 0.8"),
        ("  same, from the 1-CPU run", rate["1cpu_x4"] / bare_rate, "(info)"),
        # Other tenants slow wall clocks; CPU-seconds are what this job itself spent, however loaded the machine.
        ("Ray tokens per CPU-s ÷ bare (all Ray processes)", cpu_ratio(runs["2cpu_x4"], bare), "(info)"),
        ("  same, from the 1-CPU run", cpu_ratio(runs["1cpu_x4"], bare), "(info)"),
    ]
    publish("preprocess", f"`jbert preprocess`: scaling, memory and Ray's overhead (×1 = {len(texts):,} records, "
            "a quarter of ×4)",
            ["ratio", "measured", "target"], [[label, f"{value:.2f}", target] for label, value, target in rows],
            at_start=at_start)  # fmt: skip


def cpu_ratio(run: dict, bare: dict) -> float:
    return (run["tokens"] / run["cpu_seconds"]) / (bare["tokens"] / bare["cpu_seconds"])


def make_corpora(source: Path, tmp: Path, limit: int | None) -> tuple[Path, Path]:
    """×4 = the corpus (or its first `limit` records) as four quarter files; ×1 = the first quarter alone.

    Four different texts, not four links to one file: caches cannot flatter the scaling or the memory figure."""
    opener = gzip.open if source.suffix == ".gz" else open
    with opener(source, "rt", encoding="utf-8") as f:
        lines = [line for n, line in zip(range(limit or 10**12), f)]
    (tmp / "x4").mkdir()
    quarter = -(-len(lines) // 4)
    for part in range(4):
        with (tmp / "x4" / f"corpus{part}.jsonl").open("w", encoding="utf-8") as out:
            out.writelines(lines[part * quarter : (part + 1) * quarter])
    x1 = tmp / "x1" / "corpus.jsonl"
    x1.parent.mkdir()
    os.link(tmp / "x4" / "corpus0.jsonl", x1)
    return x1, tmp / "x4"


def train_tokenizer(path: Path) -> Path:
    from jbert_ray.tokenizer import TokenizerConfig, train_vocab_on_texts

    sample = REPO / "jbert_ray" / "sample" / "ja_sample.jsonl"
    texts = (json.loads(line)["text"] for line in sample.open(encoding="utf-8"))
    train_vocab_on_texts(texts, TokenizerConfig(vocab_size=8000)).save_pretrained(path)
    return path


def bare_encode(texts: list[str], tokenizer_dir: Path) -> dict:
    """encode_batch alone (text cleaned and split beforehand, untimed), fresh tokenizer, this process."""
    from jbert_ray.text import clean_text, split_sentences
    from jbert_ray.tokenizer import JapaneseTokenizer

    sentences = [s for t in texts for s in split_sentences(clean_text(t)[0])]
    tokenizer = JapaneseTokenizer.from_pretrained(tokenizer_dir)
    start, cpu_start = time.perf_counter(), time.process_time()
    encodings = tokenizer.encode_batch(sentences, add_special_tokens=False)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"tokens": sum(len(e.ids) for e in encodings), "seconds": seconds, "cpu_seconds": cpu_seconds}


def ray_run(corpus: Path, tokenizer_dir: Path, out: Path, cpus: int, max_seq_len: int, memory: bool) -> dict:
    import ray
    import ray.data

    from jbert_ray.preprocess import PreprocessConfig, run_preprocess

    ray.init(
        address="local", num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        config = PreprocessConfig(
            input=str(corpus), tokenizer_dir=str(tokenizer_dir), output_dir=str(out), max_seq_len=max_seq_len,
            show_progress=False,
        )  # fmt: skip
        with Sampler(memory) as sampler:
            start = time.perf_counter()
            manifest = run_preprocess(config)
            seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    return {
        "tokens": manifest["sentence_tokens"], "seconds": seconds, "peak_mb": sampler.peak / 2**20,
        "actor_seconds": manifest["actor_seconds"], "cpu_seconds": sampler.cpu_seconds,
    }  # fmt: skip


class pinned:
    """Run a block (and every process it starts) on the given cores only."""

    def __init__(self, cores: list[int]):
        self.cores = set(cores)

    def __enter__(self):
        self.saved = os.sched_getaffinity(0)
        os.sched_setaffinity(0, self.cores)

    def __exit__(self, *exc):
        os.sched_setaffinity(0, self.saved)


class Sampler:
    """CPU time (and with `memory`, peak summed PSS) of this process and all its descendants, sampled in a thread.

    CPU is each process's own user+system time at its last sample, summed over every process seen, less what
    the processes alive at the start had already used; a process loses at most its last `every_s` of CPU."""

    def __init__(self, memory: bool, every_s: float = 0.5):
        self.memory = memory
        self.every_s = every_s
        self.peak = 0
        self._cpu_start: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._stop = threading.Event()

    @property
    def cpu_seconds(self) -> float:
        return sum(v - self._cpu_start.get(pid, 0.0) for pid, v in self._cpu_last.items())

    def __enter__(self):
        self._cpu_start = {pid: _cpu_seconds(pid) for pid in _tree(os.getpid())}
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        os.sched_setaffinity(0, ALL_CORES)  # this thread only: measuring must not eat the pinned cores
        while True:
            pids = _tree(os.getpid())
            if self.memory:
                self.peak = max(self.peak, sum(_pss_bytes(pid) for pid in pids))
            for pid in pids:
                self._cpu_last[pid] = max(self._cpu_last.get(pid, 0.0), _cpu_seconds(pid))
            if self._stop.wait(self.every_s):
                return


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def _pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    main()
