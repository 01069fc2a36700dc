"""Pretrain a Japanese BERT masked LM on Ray Train from `jbert preprocess` shards (re-run the same --out to resume).

Local:  python -m jobs.pretrain --data runs/shards --out runs/pretrain --model-config tiny --num-workers 2
Ray:    ray job submit --working-dir . -- python -m jobs.pretrain --data /shared/shards --out /shared/run \
            --model-config base --num-workers 8 --use-gpu
"""

import sys

from jbert_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
