"""Benchmark `jbert vocab`'s driver memory: peak RSS of the driver process on ja_train ×1 and ×16, this tree against
an older checkout (the code before bounded counting), run as the product runs: `python -m jbert_ray.cli vocab`.

    git worktree add /tmp/old <commit before bounded counting>
    python bench/vocab_memory.py --old /tmp/old     # about 20 min on 2 busy CPUs
    python bench/vocab_memory.py --quick            # ×4 = the first 20,000 records of ja_train (about 10 min)

×1 is the first quarter of ../shared/corpus/ja_train.jsonl.gz (22,201 records), ×4 all of it, ×16 all of it four
times over (four files): past ×4 the text repeats, so distinct words stop growing (39,188 in all of ja_train), which
flatters an unbounded Counter. The "growing" corpora therefore end every record with a word of its own (a Latin
string, one MeCab word), so distinct words grow with the corpus as in a larger real one (here by one a record).
The driver is the subprocess started here (Ray's raylet and workers are other processes); its peak RSS is the
kernel's high-water mark (VmHWM) and its peak anonymous memory (RssAnon: the Counter, the WordPiece trainer),
both read from /proc/PID/status every 0.1 s. Target (issue 24.7): driver peak ×16 ÷ ×1 ≤ 1.5.

The default cap (2M distinct words) is far above what this corpus reaches, even growing (~394k at ×16), so the
new code also runs with a cap scaled to it (`--max-distinct-words`, default 100,000: above ×1's distinct words,
below ×16's): the position of any corpus with more distinct words than the default cap.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from results import machine, publish

SHARED = REPO.parent / "shared" / "corpus"
QUICK_RECORDS = 20_000
VOCAB_SIZE = 8000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, help="a checkout of the code before bounded counting")
    parser.add_argument("--quick", action="store_true", help=f"first {QUICK_RECORDS:,} records only")
    parser.add_argument("--scaled-cap", type=int, default=100_000, help="--max-distinct-words of the scaled runs")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    at_start = machine()
    scaled = f"new, cap {args.scaled_cap:,}"
    codes = {"new": (REPO, []), scaled: (REPO, ["--max-distinct-words", str(args.scaled_cap)])}
    if args.old:
        codes = {"old": (args.old.resolve(), []), **codes}
    # The repeated corpora stay under the scaled cap too (39,188 distinct words): that run would be "new" again.
    plan = {"repeated": [code for code in codes if code != scaled], "growing": list(codes)}
    with tempfile.TemporaryDirectory(prefix="jbert_bench_vocab_") as tmp:
        tmp = Path(tmp)
        lines = read_lines(SHARED / "ja_train.jsonl.gz", QUICK_RECORDS if args.quick else None)
        runs: dict[tuple[str, str, str], dict] = {}
        for variant, variant_codes in plan.items():
            corpora = make_corpora(lines, tmp / variant, growing=variant == "growing")
            for code in variant_codes:
                tree, flags = codes[code]
                for scale, corpus in corpora.items():
                    out = out_dir(tmp, variant, code, scale)
                    runs[variant, code, scale] = r = run_vocab(tree, corpus, out, flags)
                    print(f"{variant} {scale} {code}: peak RSS {r['peak_mb']:,.0f} MB (anon {r['anon_mb']:,.0f}), "
                          f"{r['unique_words']:,} distinct words trained, {r['pruned_words']:,} dropped, "
                          f"{r['seconds']:.0f} s", flush=True)  # fmt: skip
        quality = valid_quality({code: out_dir(tmp, "growing", code, "x16") for code in codes})
    publish("vocab_memory", f"`jbert vocab` driver memory, ×1 = {quarter(lines):,} records (a quarter of ja_train"
            f"{' head' if args.quick else ''}), ×16 = ×4 repeated 4 times; vocab size {VOCAB_SIZE:,}, 2 CPUs",
            ["corpus", "code", "peak RSS ×1 (MB)", "peak RSS ×16 (MB)", "×16 ÷ ×1", "anon ×1 / ×16 (MB)",
             "distinct words trained ×16", "dropped ×16 (below count)", "seconds ×16"],
            [row(runs, variant, code) for variant, variant_codes in plan.items() for code in variant_codes],
            notes=["Target: ×16 ÷ ×1 ≤ 1.5. The default cap (2M) is not reached here, so `new` runs as `old`.",
                   per_word(runs), "ja_valid with each ×16 growing vocab: " + quality],
            at_start=at_start)  # fmt: skip


def row(runs: dict, variant: str, code: str) -> list:
    x1, x16 = runs[variant, code, "x1"], runs[variant, code, "x16"]
    dropped = f"{x16['pruned_words']:,} (< {x16['pruned_below']})" if x16["pruned_words"] else "0"
    return [variant, code, f"{x1['peak_mb']:,.0f}", f"{x16['peak_mb']:,.0f}", f"{x16['peak_mb'] / x1['peak_mb']:#.3g}",
            f"{x1['anon_mb']:,.0f} / {x16['anon_mb']:,.0f}", f"{x16['unique_words']:,}", dropped,
            f"{x16['seconds']:.0f}"]  # fmt: skip


def per_word(runs: dict) -> str:
    """The driver's memory per distinct word: what ×16 growing adds to ×1 growing (both unpruned)."""
    x1, x16 = runs["growing", "new", "x1"], runs["growing", "new", "x16"]
    added = {key: (x16[key] - x1[key]) * 1024 / (x16["unique_words"] - x1["unique_words"])
             for key in ("peak_mb", "anon_mb")}  # fmt: skip
    return f"Driver memory per distinct word: {added['peak_mb']:.2f} KB of peak RSS ({added['anon_mb']:.2f} KB anon)."


def out_dir(tmp: Path, variant: str, code: str, scale: str) -> Path:
    return tmp / "out" / f"{variant}-{code}-{scale}".replace(" ", "").replace(",", "")


def quarter(lines: list[str]) -> int:
    return -(-len(lines) // 4)


def read_lines(path: Path, limit: int | None) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line for _, line in zip(range(limit or 10**12), f)]


def make_corpora(lines: list[str], root: Path, growing: bool) -> dict[str, Path]:
    """x1/: the first quarter of `lines`; x16/: four files of all of them. `growing`: each record of a corpus ends
    with a word no other record has."""
    x1 = lines[: quarter(lines)]
    corpora = {"x1": root / "x1", "x16": root / "x16"}
    for scale, parts in (("x1", [x1]), ("x16", [lines] * 4)):
        corpora[scale].mkdir(parents=True)
        number = 0
        for part, part_lines in enumerate(parts):
            with (corpora[scale] / f"part{part}.jsonl").open("w", encoding="utf-8") as out:
                for line in part_lines:
                    text = json.loads(line)["text"]
                    if growing:
                        text, number = f"{text} {latin_word(number)}", number + 1
                    out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return corpora


def latin_word(number: int) -> str:
    """A distinct lowercase Latin word per number ('xa', 'xb', …): MeCab keeps a run of Latin letters whole."""
    letters = ""
    while True:
        number, digit = divmod(number, 26)
        letters = string.ascii_lowercase[digit] + letters
        if not number:
            return "x" + letters


def run_vocab(tree: Path, corpus: Path, out: Path, flags: list[str]) -> dict:
    """`jbert vocab` from `tree` as a subprocess; its peak memory and vocab_summary.json."""
    command = [sys.executable, "-m", "jbert_ray.cli", "vocab", "--input", str(corpus), "--out", str(out),
               "--vocab-size", str(VOCAB_SIZE), "--num-cpus", "2", "--no-progress", *flags]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree)}  # workers inherit it: they import the same tree
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(process.pid)
    stdout, stderr = process.communicate()
    sampler.stop()
    if process.returncode:
        sys.exit(f"{' '.join(command)} failed ({process.returncode}):\n{stderr[-3000:]}")
    summary = json.loads((out / "vocab_summary.json").read_text())
    return {
        "peak_mb": sampler.peak_kb["VmHWM"] / 1024, "anon_mb": sampler.peak_kb["RssAnon"] / 1024,
        "seconds": time.perf_counter() - start, "unique_words": summary["unique_words"],
        "pruned_words": summary.get("pruned_words", 0), "pruned_below": summary.get("pruned_below", 0),
    }  # fmt: skip


class Sampler:
    """Peak VmHWM and RssAnon of one process, read every `every_s` in a thread until stopped."""

    def __init__(self, pid: int, every_s: float = 0.1):
        self.pid = pid
        self.every_s = every_s
        self.peak_kb = {"VmHWM": 0, "RssAnon": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:  # reaped
                return
            for line in status.splitlines():  # an exited process (a zombie) has no memory lines
                key, _, value = line.partition(":")
                if key in self.peak_kb:
                    self.peak_kb[key] = max(self.peak_kb[key], int(value.split()[0]))
            if self._stop.wait(self.every_s):
                return


def valid_quality(outputs: dict[str, Path]) -> str:
    """ja_valid's token and [UNK] counts under each vocab, and its entries missing from the first one's (two
    unpruned runs on the same counts differ too: the WordPiece trainer breaks ties in the order words arrive)."""
    from jbert_ray.tokenizer import JapaneseTokenizer

    texts = [json.loads(line)["text"] for line in read_lines(SHARED / "ja_valid.jsonl.gz", None)]
    vocabs = {code: set((path / "vocab.txt").read_text("utf-8").splitlines()) for code, path in outputs.items()}
    first = next(iter(outputs))
    parts = []
    for code, path in outputs.items():
        tokenizer = JapaneseTokenizer.from_pretrained(path)
        ids = [i for e in tokenizer.encode_batch(texts, add_special_tokens=False) for i in e.ids]
        differ = f", {len(vocabs[code] - vocabs[first]):,} entries not in {first}'s" if code != first else ""
        parts.append(f"{code}: {len(ids):,} tokens, {ids.count(tokenizer.unk_token_id):,} [UNK]{differ}")
    return "; ".join(parts) + "."


if __name__ == "__main__":
    main()
