"""`jbert vocab`, `jbert preprocess` and `jbert tokenize`: corpus → tokenizer → training shards."""

from __future__ import annotations

import argparse
import json
import sys

from jbert_ray.cli_common import add_command, add_corpus_flags, add_ray_flags, by_reason, init_ray
from jbert_ray.errors import UserError


def add_data_commands(commands) -> None:
    """Register vocab, preprocess and tokenize on the `jbert` subparsers."""
    _add_vocab(commands)
    _add_preprocess(commands)
    _add_tokenize(commands)


def _add_vocab(commands) -> None:
    sub = add_command(commands, "vocab", "Train a WordPiece vocabulary over MeCab words of a corpus.", _run_vocab)
    add_corpus_flags(sub)
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
    add_ray_flags(sub)


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
    rejected = by_reason(summary["rejects_by_reason"])
    print(
        f"vocab: read {summary['records_read']:,} records, kept {summary['records_kept']:,}, "
        f"rejected {summary['records_rejected']:,} ({rejected}); {summary['words']:,} words "
        f"({summary['unique_words']:,} distinct); vocab size {summary['vocab_size']:,}; "
        f"{summary['seconds']:.1f} s → {args.out}"
    )


def _add_preprocess(commands) -> None:
    sub = add_command(
        commands, "preprocess",
        "Tokenize and pack a corpus into parquet shards (train/, valid/, manifest.json) for pretraining.",
        _run_preprocess,
    )  # fmt: skip
    add_corpus_flags(sub)
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
    add_ray_flags(sub)


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
    rejected = by_reason(m["rejects_by_reason"])
    splits = "; ".join(f"{name}: {s['sequences']:,} rows, {s['tokens']:,} tokens" for name, s in m["splits"].items())
    print(
        f"preprocess: read {m['records_read']:,} records, kept {m['records_kept']:,}, rejected "
        f"{m['records_rejected']:,} ({rejected}); {m['documents']:,} documents, {m['sentences']:,} sentences → "
        f"{m['sequences']:,} rows of ≤{m['max_seq_len']} tokens ({splits}); padding waste "
        f"{m['padding_waste']:.1%}; {m.get('seconds', 0):.1f} s → {args.out}"
        + (" (already complete: nothing to resume)" if m.get("already_complete") else "")
    )


def _add_tokenize(commands) -> None:
    sub = add_command(
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
