"""Masked LMs from a size preset, and their training loss: transformers' `ModernBertForMaskedLM` (pre-LN, RoPE,
GeGLU; Warner et al. 2024) or `BertForMaskedLM`, both with SDPA attention and the same size fields.

In 20 minutes on 2 CPUs our ModernBERT reaches 35.7% valid masked-token accuracy and a run_mlm BERT 9.2% (the
unigram plateau); after 4 minutes ours is at 10.4% with ModernBERT and 4.9% with BERT (bench/quality.py). So
ModernBERT is the default; BERT stays for continuing a Tohoku model (`--init-from`).

`SparseMaskedLM` computes the loss with the vocabulary projection only at the masked positions (Cramming,
Geiping & Goldstein 2022, "sparse prediction"): in a small BERT with a 32k vocab that projection costs more than
the encoder. It reuses the wrapped model's own encoder and head modules, so the exported model is unchanged.
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

ARCHS = ("modernbert", "bert")  # HF model_type of each architecture we build


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int = 768  # BERT-base width
    num_layers: int = 12  # transformer blocks
    num_heads: int = 12  # attention heads; hidden_size must divide evenly
    intermediate_size: int = 3072  # feed-forward width (4 × hidden in BERT; ModernBERT's GeGLU has 2 inputs)
    max_position_embeddings: int = 512  # longest sequence the position table covers
    dropout: float = 0.0  # hidden and attention dropout; 0 for short budgets (Cramming, ModernBERT)
    initializer_range: float = 0.02  # std of the normal weight init (BERT)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise UserError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")


PRESETS = {
    "tiny": ModelConfig(  # tests and the CPU demo: seconds per hundred steps
        hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256, max_position_embeddings=128
    ),
    "mini": ModelConfig(  # the demo and bench/quality.py: learns Japanese in minutes on 2 CPUs
        hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024
    ),
    "small": ModelConfig(  # BERT-Small (Turc et al. 2019): L4 H512 A8
        hidden_size=512, num_layers=4, num_heads=8, intermediate_size=2048
    ),
    "base": ModelConfig(),  # BERT-base: L12 H768 A12, 110M parameters with a 32k vocab
}


def resolve_model_config(spec: str) -> ModelConfig | dict:
    """A preset name, or a JSON file: our ModelConfig fields, or an HF BertConfig/ModernBertConfig (as a dict)."""
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
    if values.get("model_type") in ARCHS:
        return values
    fields = {field.name for field in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise UserError(f"{path}: unknown model config keys {unknown}; valid keys: {sorted(fields)}")
    return ModelConfig(**values)


def hf_config_dict(config: ModelConfig | dict, arch: str, vocab_size: int, special_ids: dict[str, int]) -> dict:
    """The HF config (a plain dict, to cross Ray boundaries) of `arch` for a ModelConfig or an HF config dict.

    `special_ids` maps pad/cls/sep to the tokenizer's ids (ModernBERT's defaults are those of its own vocab).
    An HF dict keeps its own model_type; `arch` only applies to a ModelConfig.
    """
    ids = {f"{name}_token_id": value for name, value in special_ids.items()}
    if isinstance(config, dict):
        return _hf_config({**config, "vocab_size": vocab_size, **ids}).to_dict()
    if arch not in ARCHS:
        raise UserError(f"--arch {arch!r}: use one of {', '.join(ARCHS)}")
    shared = dict(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        **ids,
    )
    if arch == "bert":
        dropout = dict(hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.dropout)
    else:  # ModernBERT: bos/eos are its names for cls/sep
        dropout = dict(
            embedding_dropout=config.dropout, mlp_dropout=config.dropout, attention_dropout=config.dropout,
            bos_token_id=ids.get("cls_token_id"), eos_token_id=ids.get("sep_token_id"),
        )
    return _hf_config({"model_type": arch, **shared, **dropout}).to_dict()


def build_model(hf_config: dict):
    """A freshly initialized masked LM (`BertForMaskedLM` or `ModernBertForMaskedLM`, SDPA) from an HF config dict."""
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM.from_config(_hf_config(hf_config), attn_implementation="sdpa")


def _hf_config(values: dict):
    """The transformers config object of an HF config dict (its model_type picks the class)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(values["model_type"], **{k: v for k, v in values.items() if k != "model_type"})


def encoder_and_head(mlm: nn.Module):
    """(encoder, head) of a masked LM: encoder(input_ids=, attention_mask=) → last_hidden_state; head(h) → logits.

    Splitting them lets training and scoring run the vocabulary projection only where it is read.
    """
    if hasattr(mlm, "bert"):  # BertForMaskedLM
        return mlm.bert, mlm.cls
    return mlm.model, lambda hidden: mlm.decoder(mlm.head(hidden))  # ModernBertForMaskedLM


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class SparseMaskedLM(nn.Module):
    """Training view of a masked LM: encoder on all tokens, decoder only where labels are set.

    forward(input_ids (B, T), attention_mask (B, T) or None, labels (B, T)) returns
    (loss: mean cross-entropy over predicted tokens, num_correct, num_predicted) — the last two detached.
    Wrap *this* in DDP so gradient sync sees the forward; save `self.mlm`.
    """

    def __init__(self, mlm: nn.Module):
        super().__init__()
        self.mlm = mlm

    def forward(self, input_ids, attention_mask, labels):
        encoder, head = encoder_and_head(self.mlm)
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        predict = labels != IGNORE_INDEX  # (B, T)
        targets = labels[predict]  # (M,)
        logits = head(hidden[predict])  # (M, V): the vocab projection only at masked positions
        # Sum / max(M, 1): a micro-batch without masks still touches every parameter (DDP needs that), loss 0.
        loss = nn.functional.cross_entropy(logits.float(), targets, reduction="sum") / max(targets.numel(), 1)
        with torch.no_grad():
            num_correct = (logits.argmax(-1) == targets).sum()
        return loss, num_correct, torch.tensor(targets.numel(), device=targets.device)
