"""`jbert pretrain`, `jbert score`, `jbert serve` and `jbert demo`: train a model, then use it."""

from __future__ import annotations

import argparse
import os

from jbert_ray.cli_common import CORPUS_HELP, add_command, add_ray_flags, by_reason, init_ray
from jbert_ray.errors import UserError


def add_model_commands(commands) -> None:
    """Register pretrain, score, serve and demo on the `jbert` subparsers."""
    _add_pretrain(commands)
    _add_score(commands)
    _add_serve(commands)
    _add_demo(commands)


def _add_pretrain(commands) -> None:
    sub = add_command(
        commands, "pretrain",
        "Pretrain a masked LM (ModernBERT or BERT) on preprocessed shards with Ray Train "
        "(re-run the same --out to resume).",
        _run_pretrain,
    )
    sub.add_argument("--data", required=True, metavar="SHARDS_DIR", help="output of `jbert preprocess`")
    sub.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (checkpoints, model/, metrics)")
    sub.add_argument(
        "--model-config", default="tiny", metavar="tiny|mini|small|base|CONFIG.json",
        help="size preset, or a JSON file of ModelConfig fields or an HF BertConfig/ModernBertConfig",
    )
    sub.add_argument(
        "--arch", default="modernbert", choices=["modernbert", "bert"],
        help="architecture for a preset or ModelConfig JSON: modernbert (pre-LN, RoPE, GeGLU; learns far more in "
        "a short budget) or bert (post-LN, as Tohoku's)",
    )
    sub.add_argument(
        "--init-from", metavar="MODEL_DIR", help="continue pretraining an HF BERT or ModernBERT model directory"
    )
    sub.add_argument(
        "--num-workers", type=int, default=0,
        help="Ray Train workers (DDP ranks); 0 = one per GPU with --use-gpu, else one per node (all its cores)",
    )
    sub.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL, bf16 autocast)")
    sub.add_argument("--cpus-per-worker", type=float, default=0.0, help="CPUs per worker; 0 = auto")
    sub.add_argument(
        "--time-budget", type=float, default=0.0, metavar="MINUTES",
        help="train for this long: warmup and decay laid over it, a final checkpoint and export when it ends "
        "(0: train by --max-steps)",
    )
    sub.add_argument(
        "--max-steps", type=int, default=0,
        help="optimizer steps (0: no step limit with --time-budget, else 1000)",
    )
    sub.add_argument(
        "--global-batch-size", type=int, default=0,
        help="sequences per optimizer step (0: micro batch × workers, no accumulation)",
    )
    sub.add_argument("--micro-batch-size", type=int, default=32, help="sequences per forward per worker")
    sub.add_argument("--learning-rate", type=float, default=1e-3, help="peak AdamW learning rate")
    sub.add_argument(
        "--warmup-steps", type=int, default=-1, help="linear warmup steps; -1 = 6%% of the run (steps or budget)"
    )
    sub.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    sub.add_argument("--mask-prob", type=float, default=0.15, help="fraction of words selected for prediction")
    sub.add_argument(
        "--masking", default="token", choices=["token", "whole-word"],
        help="select tokens (BERT, RoBERTa, ModernBERT), or whole MeCab words with all their pieces (Tohoku's BERTs)",
    )
    sub.add_argument("--token-masking", action="store_true", help=argparse.SUPPRESS)  # the old spelling
    sub.add_argument("--seed", type=int, default=0, help="initialization, dropout, masks and data order")
    sub.add_argument("--log-every", type=int, default=10, help="steps between metric rows")
    sub.add_argument("--eval-every", type=int, default=200, help="steps between evaluations on valid/")
    sub.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    sub.add_argument("--keep-checkpoints", type=int, default=3, help="checkpoints kept")
    sub.add_argument("--max-failures", type=int, default=3, help="worker-group restarts before giving up")
    add_ray_flags(sub)


def _run_pretrain(args: argparse.Namespace) -> None:
    from jbert_ray.masking import MaskingConfig
    from jbert_ray.train import PretrainConfig, run_pretraining

    try:
        whole_word = args.masking == "whole-word" and not args.token_masking
        masking = MaskingConfig(mask_prob=args.mask_prob, whole_word=whole_word)
    except ValueError as error:
        raise UserError(str(error)) from None
    config = PretrainConfig(
        data_dir=args.data, output_dir=args.out, model_config=args.model_config, arch=args.arch,
        init_from=args.init_from, num_workers=args.num_workers, use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker, time_budget_min=args.time_budget, max_steps=args.max_steps,
        global_batch_size=args.global_batch_size, micro_batch_size=args.micro_batch_size,
        learning_rate=args.learning_rate, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        masking=masking, seed=args.seed, log_every=args.log_every, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        max_failures=args.max_failures, show_progress=not args.no_progress,
    )
    init_ray(args.num_cpus, show_progress=not args.no_progress)
    r = run_pretraining(config)
    evaluated = f", valid loss {r['eval_loss']:.3f}, accuracy {r['eval_accuracy']:.1%}" if r["eval_loss"] else ""
    print(
        f"pretrain: step {r['step']:,}, train loss {r['first_loss']:.3f} → {r['final_loss']:.3f}{evaluated}; "
        f"{r['tokens_per_s']:,.0f} tokens/s; {r['seconds']:.1f} s → {r['model_dir']}"
    )


def _add_score(commands) -> None:
    sub = add_command(
        commands, "score",
        "Score every row of a corpus with a model's pseudo-log-likelihood (PLL); optionally filter the corpus.",
        _run_score,
    )
    sub.add_argument(
        "--input", required=True, metavar="CORPUS",
        help=CORPUS_HELP,
    )
    sub.add_argument("--model", required=True, metavar="MODEL_DIR", help="our model dir or a Tohoku-style HF dir")
    sub.add_argument("--out", required=True, metavar="SCORES_DIR", help="output: parts/*.parquet, summary.json")
    sub.add_argument("--text-field", default="text", help="JSON field or parquet column holding the text")
    sub.add_argument("--id-column", default=None, help="field/column with row ids (default: file:line)")
    sub.add_argument("--actors", type=int, default=0, help="scoring actors (0 = one per CPU or GPU share)")
    sub.add_argument("--batch-size", type=int, default=64, help="rows per actor call")
    sub.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per scoring actor (0 = CPU)")
    sub.add_argument("--method", default="pll", choices=["pll", "pll-word-l2r"], help="PLL variant")
    sub.add_argument(
        "--long-text", default="window", choices=["window", "error"],
        help="texts longer than the model: score in sliding windows, or mark the row too_long",
    )
    sub.add_argument("--top-k", type=int, default=5, help="fill-mask candidates for texts containing [MASK]")
    group = sub.add_mutually_exclusive_group()
    group.add_argument("--filter-below", type=float, default=None, metavar="X",
                       help="also write rows with PLL per token ≥ X as a cleaned corpus (input's format)")
    group.add_argument("--filter-percentile", type=float, default=None, metavar="P",
                       help="also write the corpus without its lowest P%% of rows by PLL per token")
    sub.add_argument("--rows-per-part", type=int, default=4096, help="rows per output parquet file")
    sub.add_argument("--resume", action="store_true", help="keep finished parts; score only missing rows")
    sub.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    add_ray_flags(sub)


def _run_score(args: argparse.Namespace) -> None:
    from jbert_ray.checkpoint import check_model_dir
    from jbert_ray.corpus import resolve_paths
    from jbert_ray.scoring import ScoreConfig, run_scoring

    if args.batch_size < 1 or args.actors < 0 or not 1 <= args.top_k <= 50:
        raise UserError("--batch-size must be ≥ 1, --actors ≥ 0 and --top-k between 1 and 50")
    if args.filter_percentile is not None and not 0 <= args.filter_percentile < 100:
        raise UserError("--filter-percentile must be in [0, 100)")
    config = ScoreConfig(
        input=args.input, model_dir=args.model, output_dir=args.out, text_field=args.text_field,
        id_column=args.id_column, num_actors=args.actors, batch_size=args.batch_size,
        gpus_per_actor=args.gpus_per_actor, method=args.method, long_text=args.long_text, top_k=args.top_k,
        filter_below=args.filter_below, filter_percentile=args.filter_percentile,
        rows_per_part=max(args.rows_per_part, 1), resume=args.resume,
        overwrite=args.overwrite, show_progress=not args.no_progress,
    )
    resolve_paths(config.input)  # fail before Ray starts
    check_model_dir(config.model_dir)
    init_ray(args.num_cpus, show_progress=not args.no_progress)
    summary = run_scoring(config)
    errors = by_reason(summary["errors_by_reason"])
    print(
        f"score: {summary['rows_in']:,} rows in, {summary['rows_scored']:,} scored, "
        f"{summary['rows_with_error']:,} with errors ({errors}); {summary['rows_this_run']:,} this run at "
        f"{summary['sentences_per_s']:,.1f} sentences/s → {args.out}"
    )
    if summary["filtered"]:
        f = summary["filtered"]
        print(f"score: kept {f['rows_kept']:,} rows with PLL/token ≥ {f['threshold']:.3f} → {f['path']}")


def _add_demo(commands) -> None:
    from jbert_ray.demo import DEMO_MINUTES

    sub = add_command(
        commands, "demo", "Run the whole path on the bundled Japanese sample with a local Ray.", _run_demo
    )
    sub.add_argument("--work-dir", default="runs/demo", help="where artifacts go; a re-run reuses them")
    sub.add_argument("--minutes", type=float, default=DEMO_MINUTES, help="pretraining budget of the mini model")
    add_ray_flags(sub)


def _run_demo(args: argparse.Namespace) -> None:
    import time

    import ray

    from jbert_ray.demo import run_demo

    started = time.perf_counter()
    init_ray(args.num_cpus, show_progress=not args.no_progress)
    try:
        artifacts = run_demo(args.work_dir, minutes=args.minutes, show_progress=not args.no_progress)
    finally:
        ray.shutdown()
    print(f"[demo] done in {time.perf_counter() - started:.0f} s; artifacts:")
    for name, path in artifacts.items():
        print(f"[demo]   {name:<16} {path}")


def _add_serve(commands) -> None:
    sub = add_command(
        commands, "serve", "Serve POST /fill-mask and POST /score over HTTP with Ray Serve (until Ctrl-C).", _run_serve
    )
    sub.add_argument("--model", required=True, metavar="MODEL_DIR", help="our model dir or a Tohoku-style HF dir")
    sub.add_argument("--host", default="127.0.0.1", help="HTTP bind address (0.0.0.0 to listen on all interfaces)")
    sub.add_argument("--port", type=int, default=8000, help="HTTP port")
    sub.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="replica device")
    sub.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
        help="weights dtype (bfloat16: about 2x faster on GPUs and bf16-capable CPUs)",
    )
    sub.add_argument("--max-replicas", type=int, default=1, help="autoscaling upper bound (replicas)")
    sub.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved per replica")
    sub.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica")
    sub.add_argument("--threads", type=int, default=0, help="torch threads per replica (0 = its CPU count)")
    sub.add_argument("--max-batch-size", type=int, default=32, help="texts per batched forward")
    sub.add_argument("--max-ongoing-requests", type=int, default=64, help="requests a replica works on at once")
    sub.add_argument(
        "--max-queued-requests", type=int, default=256,
        help="waiting requests beyond this get HTTP 503 (-1: no bound)",
    )
    sub.add_argument(
        "--num-cpus", type=int, default=None,
        help="CPUs of the local Ray started when not under `ray job submit` (None = all)",
    )


def _run_serve(args: argparse.Namespace) -> None:
    from jbert_ray.checkpoint import check_model_dir
    from jbert_ray.serving import ServeArgs, high_throughput_env, run_server

    check_model_dir(args.model)  # fail before starting Ray
    if min(args.max_replicas, args.max_batch_size, args.max_ongoing_requests) < 1 or not 0 < args.port < 65536:
        raise UserError(
            "--max-replicas, --max-batch-size and --max-ongoing-requests must be ≥ 1, --port within 1..65535"
        )
    if args.max_queued_requests < -1:
        raise UserError("--max-queued-requests must be ≥ 0, or -1 for no bound")
    serve_args = ServeArgs(
        model_dir=args.model, device=args.device, dtype=args.dtype, max_replicas=args.max_replicas,
        num_cpus=args.replica_cpus, num_gpus=args.replica_gpus, num_threads=args.threads,
        max_batch_size=args.max_batch_size, max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests, target_ongoing_requests=args.max_ongoing_requests / 2,
    )  # JBERT_API_TOKEN, when set, turns on bearer auth
    # Ray's documented high-throughput mode (HAProxy in front of the replicas): it only applies to a Ray started
    # by this command; a cluster needs it in its own environment (serve/config.yaml says how).
    for name, value in high_throughput_env().items():
        os.environ.setdefault(name, value)
    init_ray(args.num_cpus, show_progress=False)
    run_server(serve_args, host=args.host, port=args.port)
