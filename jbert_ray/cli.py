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
    _add_tokenize(commands)
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
    rejected = ", ".join(f"{k}={v:,}" for k, v in sorted(summary["rejects_by_reason"].items())) or "none"
    print(
        f"vocab: read {summary['records_read']:,} records, kept {summary['records_kept']:,}, "
        f"rejected {summary['records_rejected']:,} ({rejected}); {summary['words']:,} words "
        f"({summary['unique_words']:,} distinct); vocab size {summary['vocab_size']:,}; "
        f"{summary['seconds']:.1f} s → {args.out}"
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


def _group_words(tokens: list[str], word_start: list[bool]) -> list[str]:
    words: list[str] = []
    for token, start in zip(tokens, word_start):
        if start or not words:
            words.append(token)
        else:
            words[-1] += " " + token
    return words


def _add_demo(commands) -> None:
    sub = _command(
        commands, "demo", "Run the whole path on the bundled Japanese sample with a local Ray.", _run_demo
    )
    sub.add_argument("--work-dir", default="runs/demo", help="where artifacts go; a re-run reuses them")
    _add_ray_flags(sub)


def _run_demo(args: argparse.Namespace) -> None:
    import ray

    from jbert_ray.demo import run_demo

    init_ray(args.num_cpus, show_progress=not args.no_progress)
    try:
        artifacts = run_demo(args.work_dir, show_progress=not args.no_progress)
    finally:
        ray.shutdown()
    for name, path in artifacts.items():
        print(f"[demo] {name:<10} {path}")


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
