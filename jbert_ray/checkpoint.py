"""Model directories: save and load a masked LM (BERT or ModernBERT) with its Japanese tokenizer, safetensors only.

A model directory is an ordinary HF directory (config.json, model.safetensors, Tohoku-style tokenizer files), so
`transformers.pipeline("fill-mask", model=dir)` works on it, and a published Tohoku Japanese BERT directory can be
used in its place. Weights are never read with `torch.load` (pickles can run code).

A ModernBERT directory holds the same tokenizer files, but transformers 5 maps `model_type: modernbert` to its
`tokenizers` backend whatever `tokenizer_class` says, so plain `AutoTokenizer.from_pretrained(dir)` fails there;
`AutoTokenizer.from_pretrained(dir, tokenizer_type="bert-japanese")` is the supported way (ids are identical).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from jbert_ray.errors import UserError
from jbert_ray.tokenizer import JapaneseTokenizer

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
MODEL_TYPES = ("bert", "modernbert")  # masked LMs jbert_ray trains, scores and serves


def save_model_dir(path: str | os.PathLike, model, tokenizer: JapaneseTokenizer) -> None:
    """Write config.json + model.safetensors (HF save_pretrained) and the tokenizer files into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"tokenizer has {tokenizer.vocab_size} entries but the model only {model.config.vocab_size} embeddings"
        )
    model.save_pretrained(path)  # transformers 5 writes safetensors only
    tokenizer.save_pretrained(path)


def load_model_dir(
    path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | str | None = None
) -> tuple[PreTrainedModel, JapaneseTokenizer]:
    """Load a model directory (ours, BERT or ModernBERT, or a Tohoku-style HF Japanese BERT) in eval mode.

    Args:
        path: a local directory with config.json, model.safetensors and vocab.txt (+ tokenizer_config.json).
        device: "cpu", "cuda", "cuda:N" or "auto" (CUDA when available).
        dtype: weights dtype (torch.bfloat16 or "bfloat16" on GPUs and bf16-capable CPUs); None = float32.
    """
    from transformers import AutoModelForMaskedLM

    path = check_model_dir(path)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype)
    tokenizer = JapaneseTokenizer.from_pretrained(path)
    model = AutoModelForMaskedLM.from_pretrained(
        path,
        use_safetensors=True,  # never fall back to pytorch_model.bin
        local_files_only=True,  # a path, never a hub name
        attn_implementation="sdpa",
        dtype=dtype,
    )
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"{path}: vocab.txt has {tokenizer.vocab_size} entries but the model {model.config.vocab_size}"
        )
    model.to(device).eval()
    return model, tokenizer


def check_model_dir(path: str | os.PathLike) -> Path:
    """Return `path` as a Path if it looks like a model directory we load; otherwise raise a UserError saying why."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model directory {path} does not exist (give a local directory, not a hub name)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path} is not a model directory: it has no config.json")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise UserError(f"{config_file} is not a valid JSON object: {error}") from None
    if model_type not in MODEL_TYPES:
        raise UserError(f"{path}: model_type is {model_type!r}; jbert_ray loads {' and '.join(MODEL_TYPES)} models")
    if not any((path / name).is_file() for name in SAFE_WEIGHTS):
        pickled = [name for name in PICKLE_WEIGHTS if (path / name).is_file()]
        hint = (
            f"; it has {pickled[0]}, which jbert_ray does not unpickle: convert it once with "
            "`AutoModelForMaskedLM.from_pretrained(dir).save_pretrained(dir)` in a trusted environment"
            if pickled
            else ""
        )
        raise UserError(f"{path} is not a model directory: it has no model.safetensors{hint}")
    if not (path / "vocab.txt").is_file():
        raise UserError(f"{path} is not a model directory: it has no vocab.txt (tokenizer files)")
    return path


def resolve_dtype(dtype: torch.dtype | str | None):
    """None/"float32" → torch.float32; "bfloat16"/"bf16", "float16"/"fp16" → the torch dtype."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise UserError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def resolve_device(device: str = "auto") -> str:
    """Turn "auto" into "cuda" or "cpu"; reject a CUDA device on a machine without one."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
    if device != "cpu" and not device.startswith(("cuda", "mps", "xpu")):
        raise UserError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    return device
