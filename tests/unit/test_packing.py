"""Packing boundaries and exact token accounting, on hand-built ids and on real Japanese sentences."""

import pytest

from jbert_ray.packing import (
    Packer,
    in_valid_split,
    pack_sequences,
    padding_waste,
    split_point,
)

CLS, SEP = 2, 3


def sentence(n: int, start: int = 100, word_len: int = 1) -> tuple[list[int], list[bool]]:
    """n tokens with ids start, start+1, …; a word starts every `word_len` tokens."""
    return list(range(start, start + n)), [i % word_len == 0 for i in range(n)]


def content(rows) -> list[int]:
    return [i for row in rows for i in row.ids if i not in (CLS, SEP)]


def test_sentences_fill_a_row_then_start_the_next():
    rows = pack_sequences([sentence(3), sentence(3, 200), sentence(3, 300)], 10, CLS, SEP)
    # [CLS] a a a [SEP] b b b [SEP] = 9 tokens; the third sentence needs 4 more: a new row
    assert [r.ids for r in rows] == [
        [CLS, 100, 101, 102, SEP, 200, 201, 202, SEP],
        [CLS, 300, 301, 302, SEP],
    ]
    assert [r.seq_index for r in rows] == [0, 1]


def test_a_sentence_that_exactly_fills_the_row_stays_whole():
    rows = pack_sequences([sentence(8)], 10, CLS, SEP)
    assert len(rows) == 1 and len(rows[0].ids) == 10


def test_a_long_sentence_is_split_at_word_starts_and_nothing_is_dropped():
    ids, starts = sentence(25, word_len=3)  # words of 3 tokens: starts at 0, 3, 6, …
    rows = pack_sequences([(ids, starts)], 10, CLS, SEP)
    assert content(rows) == ids
    assert all(len(r.ids) <= 10 for r in rows)
    for row in rows:  # every piece begins at a word start: no word is cut across rows
        assert row.word_start[1] is True


def test_a_single_word_longer_than_a_row_is_cut_hard():
    ids, starts = sentence(20, word_len=100)  # one word of 20 pieces
    rows = pack_sequences([(ids, starts)], 10, CLS, SEP)
    assert [len(r.ids) for r in rows] == [10, 10, 6]
    assert content(rows) == ids


def test_remainder_of_a_split_sentence_shares_its_row_with_the_next_sentence():
    rows = pack_sequences([sentence(12), sentence(2, 500)], 10, CLS, SEP)
    assert rows[-1].ids == [CLS, 108, 109, 110, 111, SEP, 500, 501, SEP]


def test_documents_are_not_mixed_unless_the_caller_skips_flush():
    packer = Packer(16, CLS, SEP)
    for doc in ("a", "b"):
        packer.add(*sentence(2), doc)
        packer.flush()
    assert [(r.doc_id, len(r.ids)) for r in packer.take()] == [("a", 4), ("b", 4)]
    packer.add(*sentence(2), "c")
    packer.add(*sentence(2), "d")  # no flush between documents: packed together, row named after its first
    packer.flush()
    assert [(r.doc_id, len(r.ids)) for r in packer.take()] == [("c", 7)]


@pytest.mark.parametrize("max_seq_len", [8, 9, 16, 128])
def test_token_accounting_is_exact(max_seq_len):
    sents = [sentence(n, 10 * n, word_len=2) for n in (1, 5, 7, 30, 2, 200, 6, 0, 3)]
    packer = Packer(max_seq_len, CLS, SEP)
    for ids, starts in sents:
        packer.add(ids, starts, "d")
    packer.flush()
    rows = packer.take()
    sentence_tokens = sum(len(ids) for ids, _ in sents)
    # every row has one [CLS]; every sentence piece is followed by one [SEP]
    assert sum(len(r.ids) for r in rows) == sentence_tokens + len(rows) + packer.pieces
    assert content(rows) == [i for ids, _ in sents for i in ids]
    assert packer.sentences == 8  # the empty sentence is not one
    assert all(len(r.ids) <= max_seq_len and r.ids[0] == CLS and r.ids[-1] == SEP for r in rows)
    assert all(len(r.ids) == len(r.word_start) for r in rows)


def test_split_point_prefers_the_last_word_start():
    assert split_point([True, False, True, False, False, True], 4) == 2
    assert split_point([True, False, False, False, False], 4) == 4


def test_too_short_rows_are_refused():
    with pytest.raises(ValueError, match="at least"):
        Packer(4, CLS, SEP)


def test_padding_waste():
    assert padding_waste(tokens=96, sequences=1, max_seq_len=128) == pytest.approx(0.25)
    assert padding_waste(0, 0, 128) == 0.0


def test_valid_split_is_deterministic_and_near_the_fraction():
    ids = [f"corpus.jsonl:{i}" for i in range(4000)]
    chosen = [in_valid_split(i, 0.1) for i in ids]
    assert chosen == [in_valid_split(i, 0.1) for i in ids]
    assert 0.08 < sum(chosen) / len(ids) < 0.12
    assert not any(in_valid_split(i, 0.0) for i in ids)


def test_real_japanese_sentences_round_trip(tokenizer_dir, sample_texts):
    from jbert_ray.text import clean_text, split_sentences
    from jbert_ray.tokenizer import JapaneseTokenizer

    tok = JapaneseTokenizer.from_pretrained(tokenizer_dir)
    text = "".join(t for t in sample_texts[:40] if "。" in t)
    normalized, _ = clean_text(text)
    encs = tok.encode_batch(split_sentences(normalized), add_special_tokens=False)
    rows = pack_sequences([(e.ids, e.word_start) for e in encs], 32, tok.cls_token_id, tok.sep_token_id)
    assert len(rows) > 3 and all(len(r.ids) <= 32 for r in rows)
    assert [i for r in rows for i in r.ids[1:] if i != tok.sep_token_id] == [i for e in encs for i in e.ids]
    decoded = "".join(tok.decode(r.ids) for r in rows)
    expected = tok.decode([i for e in encs for i in e.ids])
    assert decoded == expected and decoded.replace(" ", "")[:50] == normalized.replace(" ", "")[:50]
