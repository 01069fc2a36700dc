"""`jbert vocab`, `jbert preprocess` and `jbert tokenize`: corpus → tokenizer → training shards."""

from __future__ import annotations

import argparse
import json
import sys

from jbert_ray.cli.common import add_command, add_ray_flags, by_reason
from jbert_ray.cli.flags import Flag, add_config_flags, config_from_args
from jbert_ray.cli.ray_runtime import init_ray
from jbert_ray.errors import UserError

PADDING_WARNING = 0.25  # share of padding in a batch padded to --max-seq-len above which preprocess warns

CORPUS_FLAGS = {
    "input": Flag(metavar="CORPUS"),
    "text.max_chars": Flag("--max-record-chars"),
    "show_progress": Flag("--progress"),
}


def add_data_commands(commands, selected: str | None) -> None:
    """Register vocab, preprocess and tokenize; only the `selected` one gets its flags."""
    add_command(commands, selected, "vocab", "Train a WordPiece vocabulary over MeCab words of a corpus.",
                _add_vocab, _run_vocab)  # fmt: skip
    add_command(commands, selected, "preprocess",
                "Tokenize and pack a corpus into parquet shards (train/, valid/, manifest.json) for pretraining.",
                _add_preprocess, _run_preprocess)  # fmt: skip
    add_command(commands, selected, "tokenize", "Show how a tokenizer directory splits texts (arguments, or stdin).",
                _add_tokenize, _run_tokenize)  # fmt: skip


VOCAB_FLAGS = {
    **CORPUS_FLAGS,
    "output_dir": Flag("--out", metavar="TOKENIZER_DIR"),
    "tokenizer.do_lower_case": Flag("--lowercase"),
}


def _add_vocab(sub: argparse.ArgumentParser) -> None:
    from jbert_ray.vocab import VocabConfig

    add_config_flags(sub, VocabConfig, VOCAB_FLAGS)
    _add_old_corpus_flags(sub)
    add_ray_flags(sub, progress=False)


def _run_vocab(args: argparse.Namespace) -> None:
    from jbert_ray.vocab import VocabConfig, prepare_vocab, run_vocab

    config = config_from_args(VocabConfig, args, VOCAB_FLAGS)
    job = prepare_vocab(config)  # a missing corpus fails here, before Ray spends seconds starting
    init_ray(args.ray_num_cpus, show_progress=config.show_progress, verbose=args.verbose)
    summary = run_vocab(job)
    rejected = by_reason(summary["rejects_by_reason"])
    print(
        f"vocab: read {summary['records_read']:,} records, kept {summary['records_kept']:,}, "
        f"rejected {summary['records_rejected']:,} ({rejected}); {summary['words']:,} words "
        f"({summary['unique_words']:,} distinct trained on"
        + (f", {summary['pruned_words']:,} rare ones dropped" if summary.get("pruned_words") else "")
        + f"); vocab size {summary['vocab_size']:,}; "
        f"{summary['seconds']:.1f} s → {config.output_dir}"
    )


PREPROCESS_FLAGS = {
    **CORPUS_FLAGS,
    "tokenizer_dir": Flag("--tokenizer", metavar="TOKENIZER_DIR"),
    "output_dir": Flag("--out", metavar="SHARDS_DIR"),
}


def _add_preprocess(sub: argparse.ArgumentParser) -> None:
    from jbert_ray.preprocess import PreprocessConfig

    add_config_flags(sub, PreprocessConfig, PREPROCESS_FLAGS)
    _add_old_corpus_flags(sub)
    sub.add_argument("--static-masking", type=int, default=None, help=argparse.SUPPRESS)  # removed: see below
    add_ray_flags(sub, progress=False)


def _run_preprocess(args: argparse.Namespace) -> None:
    from jbert_ray.preprocess import PreprocessConfig, prepare_preprocess, run_preprocess

    if args.static_masking is not None:
        raise UserError(
            "--static-masking was removed: nothing trained on the copies; `jbert pretrain` draws fresh masks "
            "for every epoch (dynamic masking, as RoBERTa)"
        )
    config = config_from_args(PreprocessConfig, args, PREPROCESS_FLAGS)
    job = prepare_preprocess(config)  # tokenizer, corpus and output checks fail before Ray starts
    init_ray(args.ray_num_cpus, show_progress=config.show_progress, verbose=args.verbose)
    m = run_preprocess(job)
    rejected = by_reason(m["rejects_by_reason"])
    if m["padding_waste"] > PADDING_WARNING:
        remedy = "shorter --max-seq-len" if config.pack_across_docs else "--pack-across-docs to fill rows"
        print(f"preprocess: warning: {m['padding_waste']:.0%} of every training batch will be padding; "
              f"use {remedy}", file=sys.stderr)  # fmt: skip
    splits = "; ".join(
        f"{name}: {s['sequences']:,} rows, {s['tokens']:,} tokens" for name, s in m["splits"].items()
    )
    print(
        f"preprocess: read {m['records_read']:,} records, kept {m['records_kept']:,}, rejected "
        f"{m['records_rejected']:,} ({rejected}); {m['documents']:,} documents, {m['sentences']:,} sentences → "
        f"{m['sequences']:,} rows of ≤{m['max_seq_len']} tokens ({splits}); padding waste "
        f"{m['padding_waste']:.1%}; {m.get('seconds', 0):.1f} s → {config.output_dir}"
        + (" (already complete: nothing to resume)" if m.get("already_complete") else "")
    )


def _add_old_corpus_flags(sub: argparse.ArgumentParser) -> None:
    """The last release's spelling of --no-require-japanese."""
    sub.add_argument("--keep-non-japanese", dest="text.require_japanese", action="store_false",
                     default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # fmt: skip


def _add_tokenize(sub: argparse.ArgumentParser) -> None:
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
