"""jbert_ray: pretrain, score and serve Japanese BERT models on Ray."""

from jbert_ray.errors import UserError

__all__ = ["UserError"]
__version__ = "0.1.0"
