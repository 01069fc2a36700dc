"""Score a Japanese corpus with a BERT model's pseudo-log-likelihood on Ray (optionally filter it).

Local:  python -m jobs.score --input jbert_ray/sample/ja_sample.jsonl --model runs/demo/model --out runs/scores
Ray:    ray job submit --working-dir . -- python -m jobs.score --input s3://bucket/ja/ --model s3://bucket/model \\
            --out s3://bucket/scores --gpus-per-actor 1
"""

import sys

from jbert_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
