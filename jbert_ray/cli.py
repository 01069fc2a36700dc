"""`jbert` command line: turns flags into the config dataclasses and calls one `run_*` function per command.

The jobs/ entrypoints (`ray job submit -- python -m jobs.<name>`) call this same `main`, so a cluster run and a
laptop run take the same flags. A user mistake prints one line and exits 2; a bug keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from jbert_ray.errors import UserError

EXIT_USER_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, run the command, return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except Exception as error:  # noqa: BLE001 — only user errors are turned into one line
        user_error = _find_user_error(error)
        if user_error is None:
            raise
        print(f"jbert {args.command}: error: {user_error}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jbert",
        description="Pretrain, score and serve Japanese BERT models on Ray.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_vocab(commands)
    _add_preprocess(commands)
    _add_pretrain(commands)
    _add_tokenize(commands)
    _add_score(commands)
    _add_serve(commands)
    _add_demo(commands)
    return parser


def _command(commands, name: str, help: str, handler: Callable) -> argparse.ArgumentParser:
    sub = commands.add_parser(
        name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    sub.set_defaults(handler=handler)
    return sub


def _add_ray_flags(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--num-cpus", type=int, default=None,
        help="CPUs of the local Ray started when not under `ray job submit` (default: all)",
    )
    sub.add_argument("--no-progress", action="store_true", help="hide progress bars and progress lines")


def _add_corpus_flags(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--input", required=True, metavar="CORPUS",
        help="file, folder or glob of .jsonl/.txt/.parquet (optionally .gz); local path or s3://, gs://, hdfs://",
    )
    sub.add_argument("--text-field", default="text", help="JSON field or parquet column holding the text")
    sub.add_argument(
        "--normalization", default="NFKC", choices=["NFKC", "NFC", "none"], help="Unicode normalization"
    )
    sub.add_argument(
        "--keep-non-japanese", action="store_true",
        help="keep records without kana or kanji (rejected as no_japanese by default)",
    )


def _add_vocab(commands) -> None:
    sub = _command(commands, "vocab", "Train a WordPiece vocabulary over MeCab words of a corpus.", _run_vocab)
    _add_corpus_flags(sub)
    sub.add_argument("--out", required=True, metavar="TOKENIZER_DIR", help="tokenizer directory to write")
    sub.add_argument("--vocab-size", type=int, default=32768, help="vocabulary entries incl. special tokens")
    sub.add_argument("--min-frequency", type=int, default=2, help="minimum count of a merged piece")
    sub.add_argument("--lowercase", action="store_true", help="lowercase Latin letters (do_lower_case)")
    sub.add_argument(
        "--mecab-dic", default="unidic_lite", choices=["unidic_lite", "unidic", "ipadic"],
        help="MeCab dictionary package",
    )
    sub.add_argument("--num-actors", type=int, default=0, help="MeCab actors (0 = one per cluster CPU)")
    sub.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    _add_ray_flags(sub)


def _run_vocab(args: argparse.Namespace) -> None:
    from jbert_ray.corpus import resolve_paths
    from jbert_ray.text import TextConfig
    from jbert_ray.tokenizer import TokenizerConfig
    from jbert_ray.vocab import VocabConfig, run_vocab

    if args.vocab_size < 16:
        raise UserError(f"--vocab-size {args.vocab_size} is too small (at least 16)")
    config = VocabConfig(
        input=args.input,
        output_dir=args.out,
        text_field=args.text_field,
        tokenizer=TokenizerConfig(
            vocab_size=args.vocab_size,
            min_frequency=args.min_frequency,
            do_lower_case=args.lowercase,
            mecab_dic=args.mecab_dic,
        ),
        text=TextConfig(normalization=args.normalization, require_japanese=not args.keep_non_japanese),
        num_actors=args.num_actors,
        overwrite=args.overwrite,
        show_progress=not args.no_progress,
    )
    resolve_paths(config.input)  # a missing corpus fails here, before Ray spends seconds starting
    init_ray(args.num_cpus, show_progress=not args.no_progress)
    summary = run_vocab(config)
    rejected = _by_reason(summary["rejects_by_reason"])
    print(
        f"vocab: read {summary['records_read']:,} records, kept {summary['records_kept']:,}, "
        f"rejected {summary['records_rejected']:,} ({rejected}); {summary['words']:,} words "
        f"({summary['unique_words']:,} distinct); vocab size {summary['vocab_size']:,}; "
        f"{summary['seconds']:.1f} s → {args.out}"
    )


def _add_preprocess(commands) -> None:
    sub = _command(
        commands, "preprocess",
        "Tokenize and pack a corpus into parquet shards (train/, valid/, manifest.json) for pretraining.",
        _run_preprocess,
    )  # fmt: skip
    _add_corpus_flags(sub)
    sub.add_argument("--tokenizer", required=True, metavar="TOKENIZER_DIR", help="tokenizer directory")
    sub.add_argument("--out", required=True, metavar="SHARDS_DIR", help="output directory for the shards")
    sub.add_argument("--max-seq-len", type=int, default=128, help="tokens per row incl. [CLS] and [SEP]s")
    sub.add_argument("--id-field", default=None, help="JSON field / column with document ids (None: file:line)")
    sub.add_argument(
        "--pack-across-docs", action="store_true",
        help="let a row continue with the next document (otherwise every row holds one document)",
    )
    sub.add_argument(
        "--valid-fraction", type=float, default=0.0,
        help="share of documents (chosen by a hash of their id) written to valid/",
    )
    sub.add_argument(
        "--static-masking", type=int, default=0, metavar="K",
        help="also write K masked copies of every row to static/ (fixed masks; otherwise masks are drawn at training time)",
    )
    sub.add_argument("--seed", type=int, default=0, help="seed of the static masking draws")
    sub.add_argument("--num-actors", type=int, default=0, help="tokenizer actors (0 = one per cluster CPU)")
    sub.add_argument("--batch-size", type=int, default=2048, help="records per actor call (= per shard file)")
    sub.add_argument("--max-record-chars", type=int, default=1_000_000, help="longer records are rejected")
    runs = sub.add_mutually_exclusive_group()
    runs.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    runs.add_argument("--resume", action="store_true", help="finish an interrupted run (same settings)")
    _add_ray_flags(sub)


def _run_preprocess(args: argparse.Namespace) -> None:
    from jbert_ray.preprocess import PreprocessConfig, preflight, run_preprocess
    from jbert_ray.text import TextConfig

    config = PreprocessConfig(
        input=args.input,
        tokenizer_dir=args.tokenizer,
        output_dir=args.out,
        max_seq_len=args.max_seq_len,
        text_field=args.text_field,
        id_field=args.id_field,
        text=TextConfig(
            normalization=args.normalization,
            require_japanese=not args.keep_non_japanese,
            max_chars=args.max_record_chars,
        ),
        pack_across_docs=args.pack_across_docs,
        valid_fraction=args.valid_fraction,
        static_masking=args.static_masking,
        seed=args.seed,
        num_actors=args.num_actors,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        resume=args.resume,
        show_progress=not args.no_progress,
    )
    preflight(config)  # settings, tokenizer, corpus and output checks fail before Ray starts
    init_ray(args.num_cpus, show_progress=not args.no_progress)
    m = run_preprocess(config)
    rejected = _by_reason(m["rejects_by_reason"])
    splits = "; ".join(f"{name}: {s['sequences']:,} rows, {s['tokens']:,} tokens" for name, s in m["splits"].items())
    print(
        f"preprocess: read {m['records_read']:,} records, kept {m['records_kept']:,}, rejected "
        f"{m['records_rejected']:,} ({rejected}); {m['documents']:,} documents, {m['sentences']:,} sentences → "
        f"{m['sequences']:,} rows of ≤{m['max_seq_len']} tokens ({splits}); padding waste "
        f"{m['padding_waste']:.1%}; {m.get('seconds', 0):.1f} s → {args.out}"
        + (" (already complete: nothing to resume)" if m.get("already_complete") else "")
    )


def _add_pretrain(commands) -> None:
    sub = _command(
        commands, "pretrain",
        "Pretrain a BERT masked LM on preprocessed shards with Ray Train (re-run the same --out to resume).",
        _run_pretrain,
    )
    sub.add_argument("--data", required=True, metavar="SHARDS_DIR", help="output of `jbert preprocess`")
    sub.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (checkpoints, model/, metrics)")
    sub.add_argument(
        "--model-config", default="tiny", metavar="tiny|small|base|CONFIG.json",
        help="size preset, or a JSON file of ModelConfig fields or an HF BertConfig",
    )
    sub.add_argument("--init-from", metavar="MODEL_DIR", help="continue pretraining an HF BERT model directory")
    sub.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (DDP ranks)")
    sub.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL, bf16 autocast)")
    sub.add_argument("--cpus-per-worker", type=float, default=0.0, help="CPUs per worker; 0 = auto")
    sub.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    sub.add_argument("--global-batch-size", type=int, default=256, help="sequences per optimizer step")
    sub.add_argument("--micro-batch-size", type=int, default=32, help="sequences per forward per worker")
    sub.add_argument("--learning-rate", type=float, default=5e-4, help="peak AdamW learning rate")
    sub.add_argument("--warmup-steps", type=int, default=-1, help="linear warmup steps; -1 = 6%% of max steps")
    sub.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    sub.add_argument("--mask-prob", type=float, default=0.15, help="fraction of words selected for prediction")
    sub.add_argument("--token-masking", action="store_true", help="select tokens instead of whole MeCab words")
    sub.add_argument("--seed", type=int, default=0, help="initialization, dropout, masks and data order")
    sub.add_argument("--log-every", type=int, default=10, help="steps between metric rows")
    sub.add_argument("--eval-every", type=int, default=200, help="steps between evaluations on valid/")
    sub.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    sub.add_argument("--keep-checkpoints", type=int, default=3, help="checkpoints kept")
    sub.add_argument("--max-failures", type=int, default=3, help="worker-group restarts before giving up")
    _add_ray_flags(sub)


def _run_pretrain(args: argparse.Namespace) -> None:
    from jbert_ray.masking import MaskingConfig
    from jbert_ray.train import PretrainConfig, run_pretraining

    try:
        masking = MaskingConfig(mask_prob=args.mask_prob, whole_word=not args.token_masking)
    except ValueError as error:
        raise UserError(str(error)) from None
    config = PretrainConfig(
        data_dir=args.data, output_dir=args.out, model_config=args.model_config, init_from=args.init_from,
        num_workers=args.num_workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
        max_steps=args.max_steps, global_batch_size=args.global_batch_size, micro_batch_size=args.micro_batch_size,
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


def _add_tokenize(commands) -> None:
    sub = _command(
        commands, "tokenize", "Show how a tokenizer directory splits texts (arguments, or stdin lines).",
        _run_tokenize,
    )
    sub.add_argument("--tokenizer", required=True, metavar="TOKENIZER_DIR", help="tokenizer directory")
    sub.add_argument("texts", nargs="*", help="texts to tokenize (default: one per line from stdin)")
    sub.add_argument("--json", action="store_true", help="print one JSON object per text")


def _run_tokenize(args: argparse.Namespace) -> None:
    from jbert_ray.tokenizer import JapaneseTokenizer

    tokenizer = JapaneseTokenizer.from_pretrained(args.tokenizer)
    texts = args.texts or [line.rstrip("\n") for line in sys.stdin]
    for text, encoding in zip(texts, tokenizer.encode_batch(texts)):
        tokens = tokenizer.convert_ids_to_tokens(encoding.ids)
        if args.json:
            record = {"text": text, "tokens": tokens, "ids": encoding.ids, "word_start": encoding.word_start}
            print(json.dumps(record, ensure_ascii=False))
        else:
            words = _group_words(tokens, encoding.word_start)
            print(f"{text}\n  words:  {' | '.join(words)}\n  ids:    {encoding.ids}")


def _by_reason(counts: dict[str, int]) -> str:
    """`empty=3, invalid_json=1` (or `none`) for summary lines."""
    return ", ".join(f"{reason}={count:,}" for reason, count in sorted(counts.items())) or "none"


def _group_words(tokens: list[str], word_start: list[bool]) -> list[str]:
    words: list[str] = []
    for token, start in zip(tokens, word_start):
        if start or not words:
            words.append(token)
        else:
            words[-1] += " " + token
    return words


def _add_score(commands) -> None:
    sub = _command(
        commands, "score",
        "Score every row of a corpus with a model's pseudo-log-likelihood (PLL); optionally filter the corpus.",
        _run_score,
    )
    sub.add_argument(
        "--input", required=True, metavar="CORPUS",
        help="file, folder or glob of .jsonl/.txt/.parquet (optionally .gz); local path or s3://, gs://, hdfs://",
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
    _add_ray_flags(sub)


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
    errors = _by_reason(summary["errors_by_reason"])
    print(
        f"score: {summary['rows_in']:,} rows in, {summary['rows_scored']:,} scored, "
        f"{summary['rows_with_error']:,} with errors ({errors}); {summary['rows_this_run']:,} this run at "
        f"{summary['sentences_per_s']:,.1f} sentences/s → {args.out}"
    )
    if summary["filtered"]:
        f = summary["filtered"]
        print(f"score: kept {f['rows_kept']:,} rows with PLL/token ≥ {f['threshold']:.3f} → {f['path']}")


def _add_demo(commands) -> None:
    sub = _command(
        commands, "demo", "Run the whole path on the bundled Japanese sample with a local Ray.", _run_demo
    )
    sub.add_argument("--work-dir", default="runs/demo", help="where artifacts go; a re-run reuses them")
    sub.add_argument("--max-steps", type=int, default=600, help="pretraining steps of the tiny model")
    _add_ray_flags(sub)


def _run_demo(args: argparse.Namespace) -> None:
    import time

    import ray

    from jbert_ray.demo import run_demo

    started = time.perf_counter()
    init_ray(args.num_cpus, show_progress=not args.no_progress)
    try:
        artifacts = run_demo(args.work_dir, max_steps=args.max_steps, show_progress=not args.no_progress)
    finally:
        ray.shutdown()
    print(f"[demo] done in {time.perf_counter() - started:.0f} s; artifacts:")
    for name, path in artifacts.items():
        print(f"[demo]   {name:<16} {path}")


def _add_serve(commands) -> None:
    sub = _command(
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
    sub.add_argument(
        "--num-cpus", type=int, default=None,
        help="CPUs of the local Ray started when not under `ray job submit` (None = all)",
    )


def _run_serve(args: argparse.Namespace) -> None:
    from jbert_ray.checkpoint import check_model_dir
    from jbert_ray.serving import ServeArgs, run_server

    check_model_dir(args.model)  # fail before starting Ray
    if args.max_replicas < 1 or args.max_batch_size < 1 or not 0 < args.port < 65536:
        raise UserError("--max-replicas and --max-batch-size must be ≥ 1 and --port within 1..65535")
    serve_args = ServeArgs(
        model_dir=args.model, device=args.device, dtype=args.dtype, max_replicas=args.max_replicas,
        num_cpus=args.replica_cpus, num_gpus=args.replica_gpus, num_threads=args.threads,
        max_batch_size=args.max_batch_size,
    )  # JBERT_API_TOKEN, when set, turns on bearer auth
    # Ray's documented high-throughput mode (gRPC proxy → replica, fewer threads): +20-30% req/s measured here.
    # It only applies to a Ray started by this command; set it in a cluster's environment yourself.
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    init_ray(args.num_cpus, show_progress=False)
    run_server(serve_args, host=args.host, port=args.port)


def init_ray(num_cpus: int | None = None, show_progress: bool = True) -> None:
    """Connect to the cluster under `ray job submit` (RAY_ADDRESS is set), else start a local Ray."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import ray.data

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            # address="local": never attach by accident to a cluster some `ray start` left on this machine.
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = show_progress


def _find_user_error(error: BaseException) -> UserError | None:
    # Ray wraps exceptions raised in tasks and actors; the user's mistake is in the chain.
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, UserError):
            return error
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
