"""`jbert pretrain`, `jbert score`, `jbert evaluate`, `jbert serve` (and `jbert demo`, from cli.demo): train a
model, use it."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os

from jbert_ray.cli.common import add_command, add_ray_flags, by_reason
from jbert_ray.cli.demo import add_demo_flags, run_demo_command
from jbert_ray.cli.flags import Flag, add_config_flags, config_from_args
from jbert_ray.cli.ray_runtime import init_ray, stop_on_signals, stop_ray_and_its_processes
from jbert_ray.errors import Stopped, UserError


def add_model_commands(commands, selected: str | None) -> None:
    """Register pretrain, score, evaluate, serve and demo; only the `selected` one gets its flags (they import its
    module)."""
    add_command(commands, selected, "pretrain",
                "Pretrain a masked LM (ModernBERT or BERT) on preprocessed shards with Ray Train "
                "(re-run the same --out to resume).", _add_pretrain, _run_pretrain)  # fmt: skip
    add_command(commands, selected, "score",
                "Score every row of a corpus with a model's pseudo-log-likelihood (PLL); optionally filter it.",
                _add_score, _run_score)  # fmt: skip
    add_command(commands, selected, "serve",
                "Serve POST /fill-mask and POST /score over HTTP with Ray Serve (until Ctrl-C).",
                _add_serve, _run_serve)  # fmt: skip
    add_command(commands, selected, "evaluate",
                "Fine-tune a model on JGLUE tasks (JSTS, JCommonsenseQA) in a Ray Tune sweep over learning rates "
                "and seeds; report each task's dev score.", _add_evaluate, _run_evaluate)  # fmt: skip
    add_command(commands, selected, "demo", "Run the whole path on the bundled Japanese sample with a local Ray.",
                add_demo_flags, run_demo_command)  # fmt: skip


PRETRAIN_FLAGS = {
    "data_dir": Flag("--data", metavar="SHARDS_DIR"),
    "output_dir": Flag("--out", metavar="RUN_DIR"),
    "model_config": Flag(metavar="tiny|mini|small|base|CONFIG.json"),
    "init_from": Flag(metavar="MODEL_DIR"),
    "compile_model": Flag("--compile"),
    "time_budget_min": Flag("--time-budget", metavar="MINUTES"),
    "masking.whole_word": Flag("--whole-word-masking"),
    "show_progress": Flag("--progress"),
}


def _add_pretrain(sub: argparse.ArgumentParser) -> None:
    from jbert_ray.pretrain.config import PretrainConfig

    add_config_flags(sub, PretrainConfig, PRETRAIN_FLAGS)
    # The last release's spellings of --[no-]whole-word-masking: --masking token|whole-word, --token-masking.
    sub.add_argument(
        "--masking", choices=["token", "whole-word"], action=_MaskingUnit, help=argparse.SUPPRESS
    )
    sub.add_argument("--token-masking", dest="masking.whole_word", action="store_false",
                     default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # fmt: skip
    add_ray_flags(sub, progress=False)


class _MaskingUnit(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, "masking.whole_word", values == "whole-word")


def _run_pretrain(args: argparse.Namespace) -> None:
    from jbert_ray.pretrain.config import PretrainConfig
    from jbert_ray.pretrain.driver import prepare_pretraining, run_pretraining

    config = config_from_args(PretrainConfig, args, PRETRAIN_FLAGS)
    job = prepare_pretraining(config)  # shards, model config and --init-from checks fail before Ray starts
    init_ray(args.ray_num_cpus, show_progress=config.show_progress, verbose=args.verbose)
    r = run_pretraining(job)
    evaluated = (
        f", valid loss {r['eval_loss']:.3f}, accuracy {r['eval_accuracy']:.1%}" if r["eval_loss"] else ""
    )
    print(
        f"pretrain: step {r['step']:,}, train loss {r['first_loss']:.3f} → {r['final_loss']:.3f}{evaluated}; "
        f"{r['tokens_per_s']:,.0f} tokens/s; {r['seconds']:.1f} s → {r['model_dir']}"
    )


SCORE_FLAGS = {
    "input": Flag(metavar="CORPUS"),
    "model_dir": Flag("--model", metavar="MODEL_DIR|URI"),
    "output_dir": Flag("--out", metavar="SCORES_DIR|URI"),
    "id_field": Flag(aliases=("--id-column",)),
    "num_actors": Flag(aliases=("--actors",)),
    "filter_below": Flag(metavar="X"),
    "filter_percentile": Flag(metavar="P"),
    "show_progress": Flag("--progress"),
}


def _add_score(sub: argparse.ArgumentParser) -> None:
    from jbert_ray.score import ScoreConfig

    add_config_flags(sub, ScoreConfig, SCORE_FLAGS)
    add_ray_flags(sub, progress=False)


def _run_score(args: argparse.Namespace) -> None:
    from jbert_ray.score import ScoreConfig, prepare_scoring, run_scoring, scored_rows

    config = config_from_args(ScoreConfig, args, SCORE_FLAGS)
    job = prepare_scoring(config)  # corpus, model and output checks fail before Ray starts
    init_ray(args.ray_num_cpus, show_progress=config.show_progress, verbose=args.verbose)
    try:
        with stop_on_signals():
            summary = run_scoring(job)
    except KeyboardInterrupt:
        import ray

        ray.shutdown()  # the scorers stop writing: what is counted now is what is kept
        raise Stopped(f"stopped; {scored_rows(job.out):,} scored rows are kept in {job.out}: run the same "
                      "command with --resume to finish") from None  # fmt: skip
    errors = by_reason(summary["errors_by_reason"])
    print(
        f"score: {summary['rows_in']:,} rows in, {summary['rows_scored']:,} scored, "
        f"{summary['rows_with_error']:,} with errors ({errors}); {summary['rows_this_run']:,} this run at "
        f"{summary['sentences_per_s']:,.1f} sentences/s, {summary['tokens_per_s']:,.0f} tokens/s "
        f"→ {config.output_dir}"
    )
    if summary["filtered"]:
        f = summary["filtered"]
        print(f"score: kept {f['rows_kept']:,} rows with PLL/token ≥ {f['threshold']:.3f} → {f['path']}")


EVALUATE_FLAGS = {
    "model_dir": Flag("--model", metavar="MODEL_DIR|URI"),
    "data_dir": Flag("--data", metavar="JGLUE_DIR|URI"),
    "output_dir": Flag("--out", metavar="EVAL_DIR|URI"),
    "show_progress": Flag("--progress"),
}


def _add_evaluate(sub: argparse.ArgumentParser) -> None:
    from jbert_ray.evaluate import EvaluateConfig

    add_config_flags(sub, EvaluateConfig, EVALUATE_FLAGS)
    add_ray_flags(sub, progress=False)


def _run_evaluate(args: argparse.Namespace) -> None:
    from jbert_ray.evaluate import EvaluateConfig, prepare_evaluation, results_table, run_evaluation

    config = config_from_args(EvaluateConfig, args, EVALUATE_FLAGS)
    job = prepare_evaluation(config)  # model, head classes, task files and output fail before Ray starts
    capped = {task: (len(train), job.train_rows[task]) for task, (train, _) in job.data.items()
              if len(train) < job.train_rows[task]}  # fmt: skip
    if capped:
        shown = ", ".join(f"{task} {n:,} of {rows:,}" for task, (n, rows) in capped.items())
        print(f"evaluate: training on a sample of each task ({shown}; --max-train-examples 0 for all)")
    init_ray(args.ray_num_cpus, show_progress=config.show_progress, verbose=args.verbose)
    if not args.verbose:
        logging.getLogger("ray.tune").setLevel(logging.WARNING)  # "Wrote the latest version of all result files"
    try:
        with stop_on_signals():
            results = run_evaluation(job)
    except KeyboardInterrupt:
        import ray

        ray.shutdown()
        raise Stopped(f"stopped; no results were written to {config.output_dir}: run the command again") from None
    print(f"evaluate: {len(results['trials'])} trials in {results['seconds'] / 60:.1f} min → {config.output_dir}")
    print(results_table(results), end="")


SERVE_FLAGS = {
    "model_dir": Flag("--model", metavar="MODEL_DIR|URI"),
    "num_cpus": Flag("--replica-cpus"),  # --num-cpus is the local Ray's
    "num_gpus": Flag("--replica-gpus"),
    "num_threads": Flag("--threads"),
}


def _add_serve(sub: argparse.ArgumentParser) -> None:
    from jbert_ray.serve import ServeArgs

    sub.add_argument(
        "--host", default="127.0.0.1", help="HTTP bind address (0.0.0.0: all interfaces, with JBERT_API_TOKEN set)"
    )
    sub.add_argument("--port", type=int, default=8000, help="HTTP port")
    sub.add_argument(
        "--haproxy",
        action="store_true",
        help="HAProxy in front of the replicas (Ray's high-throughput ingress); it also opens HAProxy's stats "
        "(8404) and metrics (9101) ports on every interface",
    )
    sub.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve a non-loopback --host without JBERT_API_TOKEN (anyone who can reach it may use it)",
    )
    add_config_flags(sub, ServeArgs, SERVE_FLAGS)
    add_ray_flags(sub, progress=False)


def _run_serve(args: argparse.Namespace) -> None:
    from jbert_ray.inference import check_model_location
    from jbert_ray.serve import API_TOKEN_ENV, ServeArgs, high_throughput_env, run_server

    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not within 1..65535")
    # The token is read only from the environment (a flag would show in `ps`), by each replica.
    if not _is_loopback(args.host) and not os.environ.get(API_TOKEN_ENV) and not args.allow_unauthenticated:
        raise UserError(f"--host {args.host} serves other machines: set {API_TOKEN_ENV} to require a bearer token, "
                        "or pass --allow-unauthenticated")  # fmt: skip
    serve_args = config_from_args(ServeArgs, args, SERVE_FLAGS)
    check_model_location(serve_args.model_dir)  # fail before starting Ray
    # Ray's documented high-throughput mode: it only applies to a Ray started by this command; a cluster needs it
    # in its own environment (serve/config.yaml says how).
    for name, value in high_throughput_env(args.haproxy).items():
        os.environ.setdefault(name, value)
    init_ray(args.ray_num_cpus, show_progress=False, verbose=args.verbose)
    with stop_ray_and_its_processes():  # HAProxy included, whichever signal stopped us
        run_server(serve_args, host=args.host, port=args.port)


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False
