"""Serve import path for the jbert fill-mask / PLL scoring endpoint (the code is in `jbert_ray.serve`).

    serve run serve.app:app model_dir=/path/to/model_dir        # or: JBERT_MODEL_DIR=/path/to/model_dir serve run serve.app:app
    serve run serve.app:app model_dir=DIR max_replicas=4 device=cuda num_gpus=1
    serve deploy serve/config.yaml                                 # after editing args.model_dir there
    curl -s localhost:8000/fill-mask -d '{"text": "東京は日本の[MASK]です。", "top_k": 5}'

`app` is an application builder: Serve calls it with the `key=value` arguments (fields of ServeArgs).
Set JBERT_API_TOKEN in the replicas' environment to require `Authorization: Bearer <token>` on every route but
/healthz.
"""

from jbert_ray.serve import FillMaskDeployment, ServeArgs, build_app

app = build_app  # Serve calls app(args) with the `key=value` arguments

__all__ = ["FillMaskDeployment", "ServeArgs", "app", "build_app"]
