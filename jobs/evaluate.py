"""Fine-tune a model on JGLUE (JSTS, JCommonsenseQA) in a Ray Tune sweep and report its dev scores.

Local:  python -m jobs.evaluate --model runs/demo/model --data JGLUE_DIR --out runs/eval --from-scratch
Ray:    ray job submit --working-dir . -- python -m jobs.evaluate --model s3://bucket/model \\
            --data s3://bucket/jglue --out s3://bucket/eval --gpus-per-trial 1
"""

import sys

from jbert_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
