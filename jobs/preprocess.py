"""Tokenize and pack a Japanese corpus into parquet shards on Ray (see `jbert preprocess --help`).

Local:  python -m jobs.preprocess --input jbert_ray/sample/ja_sample.jsonl --tokenizer runs/tokenizer --out runs/shards
Ray:    ray job submit --working-dir . -- python -m jobs.preprocess --input s3://bucket/corpus/ \
            --tokenizer s3://bucket/tok --out s3://bucket/shards --max-seq-len 128 --valid-fraction 0.01
"""

import sys

from jbert_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
