"""BERT masked-LM from a size preset (transformers' `BertForMaskedLM`, SDPA attention), and its training loss.

`SparseMaskedLM` computes the loss with the vocabulary projection only at the masked positions (Cramming,
Geiping & Goldstein 2022, "sparse prediction"): in a small BERT with a 32k vocab that projection costs more than
the encoder. It reuses the wrapped model's own `bert` and `cls` modules, so the exported model is unchanged.
Nothing here knows about devices, DDP or Ray.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from jbert_ray.errors import UserError
from jbert_ray.masking import IGNORE_INDEX


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int = 768  # BERT-base width
    num_layers: int = 12  # transformer blocks
    num_heads: int = 12  # attention heads; hidden_size must divide evenly
    intermediate_size: int = 3072  # feed-forward width (4 × hidden in BERT)
    max_position_embeddings: int = 512  # longest sequence the position table covers
    dropout: float = 0.1  # hidden and attention dropout (BERT)
    initializer_range: float = 0.02  # std of the normal weight init (BERT)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise UserError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")


PRESETS = {
    "tiny": ModelConfig(  # tests and the CPU demo: seconds per hundred steps
        hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256, max_position_embeddings=128
    ),
    "small": ModelConfig(  # BERT-Small (Turc et al. 2019): L4 H512 A8
        hidden_size=512, num_layers=4, num_heads=8, intermediate_size=2048
    ),
    "base": ModelConfig(),  # BERT-base: L12 H768 A12, 110M parameters with a 32k vocab
}


def resolve_model_config(spec: str) -> ModelConfig | dict:
    """A preset name, or a JSON file: our ModelConfig fields, or an HF BertConfig (returned as a dict)."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--model-config {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} must hold a JSON object")
    if values.get("model_type") == "bert":
        return values
    fields = {field.name for field in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise UserError(f"{path}: unknown model config keys {unknown}; valid keys: {sorted(fields)}")
    return ModelConfig(**values)


def bert_config_dict(config: ModelConfig | dict, vocab_size: int, pad_token_id: int = 0) -> dict:
    """The HF `BertConfig` (as a plain dict, to cross Ray boundaries) for a ModelConfig or an HF config dict."""
    from transformers import BertConfig

    if isinstance(config, dict):  # an HF BertConfig JSON
        return BertConfig.from_dict(
            {**config, "vocab_size": vocab_size, "pad_token_id": pad_token_id}
        ).to_dict()
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.dropout,
        initializer_range=config.initializer_range,
        pad_token_id=pad_token_id,
    ).to_dict()


def build_model(config: ModelConfig | dict, vocab_size: int, pad_token_id: int = 0):
    """A freshly initialized `BertForMaskedLM` (SDPA attention) with `vocab_size` embeddings.

    `config` is a ModelConfig or an HF BertConfig dict (whose vocab_size and pad_token_id are overridden).
    """
    from transformers import BertConfig, BertForMaskedLM

    bert_config = BertConfig.from_dict(bert_config_dict(config, vocab_size, pad_token_id))
    return BertForMaskedLM._from_config(bert_config, attn_implementation="sdpa")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class SparseMaskedLM(nn.Module):
    """Training view of a `BertForMaskedLM`: encoder on all tokens, decoder only where labels are set.

    forward(input_ids (B, T), attention_mask (B, T) or None, labels (B, T)) returns
    (loss: mean cross-entropy over predicted tokens, num_correct, num_predicted) — the last two detached.
    Wrap *this* in DDP so gradient sync sees the forward; save `self.mlm`.
    """

    def __init__(self, mlm: nn.Module):
        super().__init__()
        self.mlm = mlm

    def forward(self, input_ids, attention_mask, labels):
        hidden = self.mlm.bert(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state  # (B, T, H)
        predict = labels != IGNORE_INDEX  # (B, T)
        targets = labels[predict]  # (M,)
        logits = self.mlm.cls(hidden[predict])  # (M, V): the vocab projection only at masked positions
        # Sum / max(M, 1): a micro-batch without masks still touches every parameter (DDP needs that), loss 0.
        loss = nn.functional.cross_entropy(logits.float(), targets, reduction="sum") / max(targets.numel(), 1)
        with torch.no_grad():
            num_correct = (logits.argmax(-1) == targets).sum()
        return loss, num_correct, torch.tensor(targets.numel(), device=targets.device)
