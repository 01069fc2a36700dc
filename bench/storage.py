"""Object storage cost: the `jbert` commands with their outputs on a local S3 server (moto, 127.0.0.1) ÷ the same
commands with outputs on local disk, one run each, alternating, every command its own process (start-up alike).

    python bench/storage.py           # preprocess a quarter of ja_train, score ja_valid, pretrain 200 tiny steps
    python bench/storage.py --quick   # smaller inputs: checks the plumbing

Targets (issue 17): preprocess and score throughput ≥ 0.9 of local disk; pretraining steps/s with a checkpoint
every 50 steps ≥ 0.95 of local disk. The server runs in this process: its CPU time is shared with the jobs, as an
object store's is not (a pessimistic setting for the S3 rows).
"""

from __future__ import annotations

import argparse
import gzip
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import machine, publish  # bench/ is the script's folder, first on sys.path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-dir", type=Path, default=CORPUS)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    at_start = machine()
    endpoint = start_s3_server()
    with tempfile.TemporaryDirectory(prefix="jbert_bench_") as tmp:
        tmp = Path(tmp)
        train, valid = write_corpora(args.corpus_dir, tmp, 2_000 if args.quick else 22_201, 400 if args.quick else None)
        tokenizer = tmp / "tokenizer"
        jbert("vocab", "--input", str(train), "--out", str(tokenizer), "--vocab-size", "8000")
        places = {"local disk": lambda name: str(tmp / name),
                  "S3 (moto)": lambda name: f"s3://bench/{name}?endpoint_override={endpoint}&scheme=http"}  # fmt: skip
        rows, ratios = [], {}
        for stage in ("preprocess", "pretrain", "score"):
            figures = {}
            for place, where in places.items():
                figures[place] = run_stage(stage, where, train, valid, tokenizer, tmp)
                rows.append([stage, place, *figures[place]])
            ratios[stage] = figures["S3 (moto)"][1] / figures["local disk"][1]
    notes = [(f"S3 ÷ local disk: preprocess **{ratios['preprocess']:.2f}** (target ≥ 0.9), score "
             f"**{ratios['score']:.2f}** (≥ 0.9), pretraining steps/s with a checkpoint every 50 steps "
             f"**{ratios['pretrain']:.2f}** (≥ 0.95). One run each; the S3 server shares the 2 CPUs.")]  # fmt: skip
    publish("storage", "Outputs on object storage (a local S3 server) ÷ on local disk",
            ["stage", "outputs on", "what", "rate", "wall s"], [[r[0], r[1], r[2], f"{r[3]:.2f}", f"{r[4]:.1f}"]
                                                                for r in rows], notes, at_start)  # fmt: skip


def run_stage(stage: str, where, train: Path, valid: Path, tokenizer: Path, tmp: Path) -> tuple[str, float, float]:
    """(what the rate counts, the rate, wall seconds) of one `jbert` command writing to `where(name)`."""
    if stage == "preprocess":
        out = where("shards")
        wall = jbert("preprocess", "--input", str(train), "--tokenizer", str(tokenizer), "--out", out,
                     "--max-seq-len", "128", "--valid-fraction", "0.01")  # fmt: skip
        return "records/s (wall)", count_lines(train) / wall, wall
    if stage == "pretrain":
        shards = tmp / "shards"  # the local shards (the same input for both rows)
        out = where("run")
        wall = jbert("pretrain", "--data", str(shards), "--out", out, "--model-config", "tiny", "--max-steps", "200",
                     "--checkpoint-every", "50", "--log-every", "10", "--eval-every", "1000")  # fmt: skip
        from jbert_ray.pretrain.metrics import metrics_rows
        from jbert_ray.storage import Store

        last = metrics_rows(Store(out))[-1]
        return "steps/s (training clock, checkpoints included)", last["step"] / last["elapsed_s"], wall
    model = tmp / "run" / "model"
    wall = jbert("score", "--input", str(valid), "--model", str(model), "--out", where("scores"))
    return "sentences/s (wall)", count_lines(valid) / wall, wall


def jbert(*argv: str) -> float:
    """Run one `jbert` command in its own process; its wall seconds (raises if it fails)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jbert_ray.cli", *argv, "--no-progress"], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - started


def start_s3_server() -> str:
    """moto's S3 server on 127.0.0.1 with a `bench` bucket; HOST:PORT. Credentials go to the child processes."""
    import logging

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", allow_bucket_creation=True).create_dir("bench")
    return f"{host}:{port}"


def write_corpora(corpus_dir: Path, tmp: Path, train_records: int, valid_records: int | None) -> tuple[Path, Path]:
    """The first `train_records` of ja_train and `valid_records` (default all) of ja_valid as local jsonl files."""
    paths = []
    for name, limit in (("ja_train", train_records), ("ja_valid", valid_records)):
        with gzip.open(corpus_dir / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
            lines = [line for line, _ in zip(f, range(limit or 10**9))]
        path = tmp / f"{name}.jsonl"
        path.write_text("".join(lines), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def count_lines(path: Path) -> int:
    return sum(1 for line in path.open(encoding="utf-8") if line.strip())


if __name__ == "__main__":
    main()
