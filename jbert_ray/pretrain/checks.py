"""Checks run by the pretraining driver before any Ray Train worker starts: shards, model config, --init-from,
cluster resources and the run directory (a re-run must resume the same run). Each failure is one UserError."""

from __future__ import annotations

import json
import math
from pathlib import Path

from jbert_ray.errors import UserError
from jbert_ray.model import hf_config_dict
from jbert_ray.outputs import OWN_FILES
from jbert_ray.pretrain.config import PretrainConfig
from jbert_ray.shards import ShardInfo, file_sha256, inspect_shards
from jbert_ray.storage import Store, local_copy

CONFIG_FILE = "jbert_config.json"
# Must match across re-runs of one run dir; other fields (max_steps, eval cadence, ...) may change on resume.
RESUME_KEYS = ("model_config", "init_from", "global_batch_size", "seed", "whole_word", "mask_prob")


def check_inputs(cfg: PretrainConfig) -> tuple[ShardInfo, dict]:
    """Validate shards, model config and --init-from (no cluster needed); return shards + HF config dict."""
    from jbert_ray.model import resolve_model_config

    shards = inspect_shards(cfg.data_dir)
    if cfg.init_from:
        from jbert_ray.checkpoint import check_model_dir

        model_dir = check_model_dir(local_copy(cfg.init_from))
        if file_sha256(model_dir / "vocab.txt") != shards.tokenizer_sha256:
            raise UserError(
                f"--init-from {cfg.init_from}: its vocab.txt differs from the tokenizer the shards were made with; "
                "preprocess the corpus with that model's tokenizer (jbert preprocess --tokenizer MODEL_DIR)"
            )
        hf_config = _read_hf_config(model_dir)
    else:
        from jbert_ray.tokenizer import JapaneseTokenizer

        tokenizer = JapaneseTokenizer.from_pretrained(local_copy(shards.tokenizer_dir))
        model_config = resolve_model_config(cfg.model_config)
        special_ids = {
            "pad": tokenizer.pad_token_id,
            "cls": tokenizer.cls_token_id,
            "sep": tokenizer.sep_token_id,
        }
        hf_config = hf_config_dict(model_config, cfg.arch, tokenizer.vocab_size, special_ids)
    if hf_config["max_position_embeddings"] < shards.max_seq_len:
        raise UserError(
            f"shards hold sequences of up to {shards.max_seq_len} tokens but the model has only "
            f"{hf_config['max_position_embeddings']} positions"
        )
    if hf_config["vocab_size"] < shards.vocab_size:
        raise UserError(f"model has {hf_config['vocab_size']} embeddings, shards' vocab {shards.vocab_size}")
    return shards, hf_config


def check_batch(cfg: PretrainConfig, shards: ShardInfo) -> None:
    """The global batch against the worker count (known once the cluster is) and the shards' size."""
    per_step = cfg.micro_batch_size * cfg.num_workers
    if cfg.global_batch_size % per_step:
        raise UserError(
            f"--global-batch-size {cfg.global_batch_size} is not a multiple of micro batch × workers "
            f"= {cfg.micro_batch_size} × {cfg.num_workers}"
        )
    if shards.train_rows < cfg.global_batch_size:
        raise UserError(f"{cfg.data_dir}: {shards.train_rows} training sequences, fewer than one global batch")


def check_resources(cfg: PretrainConfig, cluster: dict, node_cpus: float | None = None) -> float:
    """CPUs per worker (auto-sized when 0, at most one node's); raise if the cluster cannot hold the workers."""

    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    if cfg.use_gpu and gpus < cfg.num_workers:
        raise UserError(
            f"--use-gpu with {cfg.num_workers} workers needs {cfg.num_workers} GPUs; cluster has {gpus:g}"
        )
    if cfg.num_workers > cpus:
        raise UserError(f"--num-workers {cfg.num_workers} exceeds the cluster's {cpus:g} CPUs")
    per_worker = cfg.cpus_per_worker
    if per_worker <= 0:  # leave one CPU (half on tiny clusters) for the read + masking stage
        per_worker = max(0.25, (cpus - min(1.0, cpus / 2)) / cfg.num_workers)
        if cfg.use_gpu:  # a GPU worker needs a few CPUs to feed it; the rest go to the masking stage
            per_worker = min(per_worker, 4.0)
        per_worker = min(per_worker, node_cpus or per_worker)  # a worker must fit on one node
        per_worker = float(math.floor(per_worker)) if per_worker >= 1 else round(per_worker, 2)
    if per_worker * cfg.num_workers + cfg.data_cpus > cpus:
        raise UserError(
            f"{cfg.num_workers} workers × {per_worker:g} CPUs + {cfg.data_cpus:g} for the data stage exceed the "
            f"cluster's {cpus:g} CPUs"
        )
    return per_worker


def check_run_dir(run: Store, cfg: PretrainConfig, hf_config: dict) -> None:
    """The run dir (checked writable by storage.check_output) is empty or holds this same run (a re-run resumes it);
    record its settings."""
    identity = json.loads(
        json.dumps(
            {  # JSON round trip: compare what the file holds (int keys become str)
                "model_config": hf_config,
                "init_from": cfg.init_from,
                "global_batch_size": cfg.global_batch_size,
                "seed": cfg.seed,
                "whole_word": cfg.masking.whole_word,
                "mask_prob": cfg.masking.mask_prob,
            }
        )
    )
    saved = run.read_json(CONFIG_FILE)
    if saved is None:
        if any(name not in (CONFIG_FILE, *OWN_FILES) for name in run.files()):
            raise UserError(f"output {run} is not empty and holds no jbert pretraining run; use a new --out")
    else:
        changed = [k for k in RESUME_KEYS if saved.get("identity", {}).get(k) != identity[k]]
        if changed:
            raise UserError(
                f"{run} holds a run with different {', '.join(changed)}; resume it with the same settings "
                "or use a new --out"
            )
    run.write_json(CONFIG_FILE, {"identity": identity, "config": cfg.to_dict()})


def _read_hf_config(model_dir: Path) -> dict:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir, local_files_only=True).to_dict()
