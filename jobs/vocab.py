"""Train a Japanese WordPiece vocabulary on Ray.

Local:  python -m jobs.vocab --input jbert_ray/sample/ja_sample.jsonl --out runs/tokenizer --vocab-size 8000
Ray:    ray job submit --working-dir . -- python -m jobs.vocab --input s3://bucket/corpus/ --out s3://bucket/tok
"""

import sys

from jbert_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["vocab", *sys.argv[1:]]))
