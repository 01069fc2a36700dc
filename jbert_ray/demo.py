"""`jbert demo`: the whole path on the bundled sample with a local Ray, reusing what an earlier run built."""

from __future__ import annotations

from pathlib import Path

SAMPLE_PATH = Path(__file__).parent / "sample" / "ja_sample.jsonl"
EXAMPLE_SENTENCES = [
    "LibreOfficeでは表計算のセルに数式を入力できます。",
    "セルの書式設定ダイアログでフォントを変更します。",
    "ｶﾀｶﾅやＡＢＣ１２３もNFKCで正規化されます。",
]
DEMO_VOCAB_SIZE = 8000  # the sample has ~6k distinct MeCab words; 8000 leaves room for pieces


def run_demo(work_dir: str | Path, show_progress: bool = True) -> dict[str, Path]:
    """Run each stage whose output is missing; return where every artifact is."""
    from jbert_ray.tokenizer import JapaneseTokenizer, TokenizerConfig
    from jbert_ray.vocab import VocabConfig, run_vocab

    work_dir = Path(work_dir)
    artifacts = {"tokenizer": work_dir / "tokenizer"}
    if not _step_done(artifacts["tokenizer"] / "vocab_summary.json", "vocab"):
        summary = run_vocab(
            VocabConfig(
                input=str(SAMPLE_PATH),
                output_dir=str(artifacts["tokenizer"]),
                tokenizer=TokenizerConfig(vocab_size=DEMO_VOCAB_SIZE),
                overwrite=True,
                show_progress=show_progress,
            )
        )
        print(f"[demo] vocab: {summary['records_read']:,} records → {summary['vocab_size']:,} entries "
              f"in {summary['seconds']:.1f} s")
    tokenizer = JapaneseTokenizer.from_pretrained(artifacts["tokenizer"])
    for text, encoding in zip(EXAMPLE_SENTENCES, tokenizer.encode_batch(EXAMPLE_SENTENCES)):
        print(f"[demo] {text}\n       → {' '.join(tokenizer.convert_ids_to_tokens(encoding.ids))}")
    return artifacts


def _step_done(marker: Path, name: str) -> bool:
    if marker.exists():
        print(f"[demo] {name}: reusing {marker.parent}")
        return True
    return False
