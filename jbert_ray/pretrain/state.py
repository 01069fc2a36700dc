"""Training state in a checkpoint: optimizer + step + torch RNG (safetensors + JSON, no pickles), beside the HF
model dir, so a restarted worker group resumes exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "train_state.json"


class CheckpointWriter:
    """Rank 0's checkpoint files: the HF model dir (model/) and the training state to resume from."""

    def __init__(self, model: torch.nn.Module, tokenizer, optimizer: torch.optim.Optimizer):
        self.model, self.tokenizer, self.optimizer = model, tokenizer, optimizer

    def write(self, path: str | os.PathLike, step: int, **extra) -> None:
        from jbert_ray.checkpoint import save_model_dir

        save_model_dir(Path(path) / "model", self.model, self.tokenizer)
        save_train_state(path, self.optimizer, step, **extra)


def save_train_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer, step: int, **extra) -> None:
    """Write the optimizer state (tensors → safetensors, the rest → JSON), step, torch RNG and `extra`."""
    from safetensors.torch import save_file

    path = Path(path)
    state = optimizer.state_dict()
    tensors = {
        f"state.{index}.{name}": value.detach().cpu().contiguous()
        for index, param_state in state["state"].items()
        for name, value in param_state.items()
        if torch.is_tensor(value)
    }
    scalars = {
        str(index): {name: value for name, value in param_state.items() if not torch.is_tensor(value)}
        for index, param_state in state["state"].items()
    }
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(path / OPTIMIZER_FILE))
    record = {"step": step, "param_groups": state["param_groups"], "scalar_state": scalars, **extra}
    (path / STATE_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def load_train_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore what `save_train_state` wrote into `optimizer` and the torch RNG; return the JSON record."""
    from safetensors.torch import load_file

    path = Path(path)
    record = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    tensors = load_file(str(path / OPTIMIZER_FILE))
    torch.set_rng_state(tensors.pop("rng.torch"))
    if optimizer is not None:
        param_state: dict[int, dict] = {int(i): dict(v) for i, v in record["scalar_state"].items()}
        for key, value in tensors.items():
            _, index, name = key.split(".", 2)
            param_state.setdefault(int(index), {})[name] = value
        groups = [
            {**group, "betas": tuple(group["betas"])} if "betas" in group else group
            for group in record["param_groups"]
        ]
        optimizer.load_state_dict({"state": param_state, "param_groups": groups})
    return record
