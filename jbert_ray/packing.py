"""Sequence packing for BERT pretraining: consecutive sentences fill `[CLS] s1 [SEP] s2 [SEP] …` rows of at most
`max_seq_len` tokens (RoBERTa's FULL-SENTENCES / DOC-SENTENCES packing, with a [SEP] after every sentence).

Pure functions over token id lists, so they are unit-tested without Ray. A sentence longer than a row is split
into pieces (at a word start where one exists), never dropped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import NamedTuple

MIN_SEQ_LEN = 8  # [CLS] + at least a few tokens + [SEP]; shorter rows are almost all overhead


class Packed(NamedTuple):
    ids: list[int]  # [CLS] s1 [SEP] s2 [SEP] …, unpadded
    word_start: list[bool]  # True where a token begins a MeCab word; special tokens are True
    doc_id: str  # the document the row starts with
    seq_index: int  # 0, 1, … over the rows that start with this document, in order


class Packer:
    """Accumulates sentences into packed rows; call `add` per sentence, `flush` at a document boundary."""

    def __init__(self, max_seq_len: int, cls_id: int, sep_id: int):
        if max_seq_len < MIN_SEQ_LEN:
            raise ValueError(f"max_seq_len must be at least {MIN_SEQ_LEN}, got {max_seq_len}")
        self.max_seq_len = max_seq_len
        self.cls_id = cls_id
        self.sep_id = sep_id
        self.rows: list[Packed] = []  # finished rows; the caller takes them
        self.sentences = 0  # non-empty sentences added
        self.split_sentences = 0  # sentences longer than a row, cut into pieces
        self.pieces = 0  # sentence pieces written (each one followed by [SEP])
        self._ids: list[int] = []
        self._starts: list[bool] = []
        self._doc_id = ""
        self._next_index: dict[str, int] = {}

    def add(self, ids: Sequence[int], word_start: Sequence[bool], doc_id: str) -> None:
        """Append one sentence (without special tokens); start a new row when it does not fit."""
        n = len(ids)
        if not n:
            return
        if n != len(word_start):
            raise ValueError(f"{n} ids but {len(word_start)} word_start flags")
        self.sentences += 1
        if self._ids and len(self._ids) + n + 1 > self.max_seq_len:
            self.flush()
        if n > self.max_seq_len - 2:  # longer than a fresh row holds: [CLS] piece [SEP]
            self._add_long(ids, word_start, doc_id)
        else:
            self._append(ids, word_start, doc_id)

    def _add_long(self, ids: Sequence[int], word_start: Sequence[bool], doc_id: str) -> None:
        self.split_sentences += 1
        capacity = self.max_seq_len - 2
        start = 0
        while len(ids) - start > capacity:  # an offset, not re-slicing: linear in the sentence length
            cut = start + split_point(word_start[start : start + capacity + 1], capacity)
            self._append(ids[start:cut], word_start[start:cut], doc_id)
            self.flush()
            start = cut
        self._append(ids[start:], word_start[start:], doc_id)

    def flush(self) -> None:
        """Close the current row (a document ends, or the next sentence does not fit)."""
        if not self._ids:
            return
        index = self._next_index.get(self._doc_id, 0)
        self._next_index[self._doc_id] = index + 1
        self.rows.append(Packed(self._ids, self._starts, self._doc_id, index))
        self._ids, self._starts = [], []

    def take(self) -> list[Packed]:
        """The finished rows, handed over once (the packer forgets them)."""
        rows, self.rows = self.rows, []
        return rows

    def _append(self, ids: Sequence[int], word_start: Sequence[bool], doc_id: str) -> None:
        self.pieces += 1
        if not self._ids:  # a fresh row (the hot path: most documents are one row)
            self._ids, self._starts, self._doc_id = (
                [self.cls_id, *ids, self.sep_id],
                [True, *word_start, True],
                doc_id,
            )
            return
        self._ids += ids
        self._ids.append(self.sep_id)
        self._starts += word_start
        self._starts.append(True)


def split_point(word_start: Sequence[bool], limit: int) -> int:
    """Where to cut a too-long sentence: the last word start in (0, limit], else `limit` (one huge word)."""
    for cut in range(limit, 0, -1):
        if word_start[cut]:
            return cut
    return limit


def pack_sequences(
    sentences: Iterable[tuple[Sequence[int], Sequence[bool]]],
    max_seq_len: int,
    cls_id: int,
    sep_id: int,
    doc_id: str = "",
) -> list[Packed]:
    """Pack the sentences of one document into rows of at most `max_seq_len` tokens."""
    packer = Packer(max_seq_len, cls_id, sep_id)
    for ids, word_start in sentences:
        packer.add(ids, word_start, doc_id)
    packer.flush()
    return packer.take()


def padding_waste(tokens: int, sequences: int, max_seq_len: int) -> float:
    """Share of a [sequences × max_seq_len] padded batch that would be padding (0.0 with no sequences)."""
    return 1.0 - tokens / (sequences * max_seq_len) if sequences else 0.0


def in_valid_split(doc_id: str, valid_fraction: float) -> bool:
    """Deterministic document-level split: the same doc id lands in the same split on every run and machine."""
    if valid_fraction <= 0.0:
        return False
    digest = hashlib.sha1(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < valid_fraction
