"""Masked-LM input corruption as pure numpy functions: token or whole-word masking with BERT's 80/10/10 recipe.

A word is a MeCab word: a token with `word_start` True plus the continuation pieces after it (cl-tohoku's
whole-word masking; BERT paper §3.1 for 80/10/10). Special tokens are never selected. Everything takes an explicit
`np.random.Generator`, so the Ray Data stage and the valid set draw reproducibly (fresh masks every epoch).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jbert_ray.errors import UserError

IGNORE_INDEX = -100  # label of positions the loss skips (torch.nn.CrossEntropyLoss's default ignore_index)


@dataclass(frozen=True)
class MaskingConfig:
    mask_prob: float = 0.15  # share of tokens (of MeCab words with whole-word masking) to predict
    replace_with_mask: float = 0.8  # share of those replaced by [MASK]
    replace_with_random: float = 0.1  # share replaced by a random token; the rest stay unchanged
    whole_word: bool = False  # mask whole MeCab words (Tohoku's recipe); tokens learn faster in short budgets

    def __post_init__(self):
        if not 0.0 <= self.mask_prob <= 1.0:
            raise UserError(f"--mask-prob must be in [0, 1], got {self.mask_prob}")
        if self.replace_with_mask < 0 or self.replace_with_random < 0:
            raise UserError("--replace-with-mask and --replace-with-random must be ≥ 0")
        if self.replace_with_mask + self.replace_with_random > 1.0 + 1e-9:
            raise UserError("--replace-with-mask + --replace-with-random must be ≤ 1")


def mask_tokens(
    input_ids: np.ndarray,
    word_start: np.ndarray,
    *,
    vocab_size: int,
    special_ids: Sequence[int],
    mask_id: int,
    config: MaskingConfig = MaskingConfig(),
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Select words to predict and corrupt them.

    Args:
        input_ids: int (B, T), padded with a special id (pad).
        word_start: bool (B, T), True where a token begins a word; ignored when `config.whole_word` is False.
        vocab_size: random replacements are drawn from the non-special ids below this.
        special_ids: ids never selected (pad, cls, sep, mask, unk).
        mask_id: the [MASK] id.

    Returns:
        (masked input_ids, same dtype and shape; labels int64 (B, T): the original id where selected, else
        IGNORE_INDEX). Each row selects round(mask_prob × its eligible words) words, rounded stochastically so
        the expected fraction is exactly mask_prob; each selected word is replaced as a whole.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be 2-D (batch, seq), got shape {ids.shape}")
    batch, seq = ids.shape
    if ids.size == 0:
        return ids.copy(), np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    special = np.isin(ids, np.fromiter(special_ids, dtype=np.int64))
    starts = _word_starts(np.asarray(word_start, dtype=bool), special, config.whole_word)

    flat_starts = starts.ravel()
    word_of_token = np.cumsum(flat_starts) - 1  # (B*T,) word index of every token
    word_row = np.flatnonzero(flat_starts) // seq  # (W,) row of every word
    # A special token is a word of its own and ends the word before it, so a word is eligible iff its start is.
    word_eligible = ~special.ravel()[flat_starts]  # (W,)
    selected = _select_words(word_row, word_eligible, batch, config.mask_prob, rng)  # (W,)

    action = rng.random(selected.shape[0])  # (W,) one 80/10/10 draw per word: its pieces move together
    word_to_mask = selected & (action < config.replace_with_mask)
    word_to_random = (
        selected
        & (action >= config.replace_with_mask)
        & (action < config.replace_with_mask + config.replace_with_random)
    )
    token_selected = selected[word_of_token].reshape(batch, seq)
    labels = np.where(token_selected, ids, IGNORE_INDEX).astype(np.int64)

    masked = ids.copy()
    masked[word_to_mask[word_of_token].reshape(batch, seq)] = mask_id
    to_random = word_to_random[word_of_token].reshape(batch, seq)
    num_random = int(to_random.sum())
    if num_random:
        candidates = np.setdiff1d(np.arange(vocab_size), np.fromiter(special_ids, dtype=np.int64))
        masked[to_random] = candidates[rng.integers(0, len(candidates), size=num_random)]
    return masked, labels


def pad_batch(
    sequences: Sequence[Sequence[int]] | np.ndarray, pad_value, length: int | None = None, dtype=None
):
    """Right-pad variable-length rows (a 2-D array passes through) into an array (B, length)."""
    if isinstance(sequences, np.ndarray) and sequences.ndim == 2 and sequences.dtype != object:
        rows = sequences
        if length is not None and rows.shape[1] != length:
            out = np.full((rows.shape[0], length), pad_value, dtype=dtype or rows.dtype)
            width = min(length, rows.shape[1])
            out[:, :width] = rows[:, :width]
            return out
        return rows.astype(dtype) if dtype is not None else rows
    lengths = np.fromiter((len(row) for row in sequences), dtype=np.int64, count=len(sequences))
    width = int(lengths.max(initial=0)) if length is None else length
    if (lengths > width).any():
        raise ValueError(f"a row has {int(lengths.max())} tokens, more than the padded length {width}")
    out = np.full((len(lengths), width), pad_value, dtype=dtype or np.int64)
    if len(lengths):
        flat = np.concatenate([np.asarray(row) for row in sequences]) if lengths.sum() else np.zeros(0)
        keep = np.arange(width)[None, :] < lengths[:, None]  # (B, width) row-major order matches `flat`
        out[keep] = flat
    return out


def mask_batch(
    batch: dict[str, np.ndarray],
    *,
    vocab_size: int,
    special_ids: Sequence[int],
    mask_id: int,
    pad_id: int,
    max_seq_len: int | None = None,
    config: MaskingConfig = MaskingConfig(),
    seed: int = 0,
    epoch: int = 0,
) -> dict[str, np.ndarray]:
    """Ray Data `map_batches` stage: pad shard rows and draw a fresh mask for this (seed, epoch, batch).

    Input columns `input_ids` and `word_start` (variable-length lists); output `input_ids` (B, T) int32,
    `attention_mask` (B, T) int8 and `labels` (B, T) int64. The generator is seeded from (seed, epoch, a hash of
    the batch's ids), so the same data and seed give the same masks run after run, and each epoch a new draw.
    """
    ids = pad_batch(batch["input_ids"], pad_id, max_seq_len, dtype=np.int32)
    starts = pad_batch(batch["word_start"], False, ids.shape[1], dtype=bool)
    rng = batch_rng(seed, epoch, ids)
    masked, labels = mask_tokens(
        ids, starts, vocab_size=vocab_size, special_ids=special_ids, mask_id=mask_id, config=config, rng=rng
    )
    return {"input_ids": masked, "attention_mask": (ids != pad_id).astype(np.int8), "labels": labels}


def batch_rng(seed: int, epoch: int, input_ids: np.ndarray) -> np.random.Generator:
    """A generator that depends only on (seed, epoch, batch content): order-independent reproducibility."""
    digest = zlib.crc32(np.ascontiguousarray(input_ids).tobytes())
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, digest, input_ids.shape[0]]))


def _word_starts(word_start: np.ndarray, special: np.ndarray, whole_word: bool) -> np.ndarray:
    """Word boundaries: given starts, plus every special token and the token after one, plus each row start."""
    if word_start.shape != special.shape:
        raise ValueError(f"word_start shape {word_start.shape} != input_ids shape {special.shape}")
    if not whole_word:
        return np.ones_like(special)
    starts = word_start | special
    starts[:, 1:] |= special[:, :-1]
    starts[:, 0] = True
    return starts


def _select_words(
    word_row: np.ndarray, eligible: np.ndarray, batch: int, prob: float, rng: np.random.Generator
) -> np.ndarray:
    """Choose round(prob × eligible words) words per row uniformly at random (stochastic rounding)."""
    num_words = word_row.shape[0]
    eligible_per_row = np.bincount(word_row[eligible], minlength=batch)  # (B,)
    num_select = np.floor(eligible_per_row * prob + rng.random(batch)).astype(np.int64)  # (B,)
    score = np.where(eligible, rng.random(num_words), np.inf)  # ineligible words sort last in their row
    order = np.lexsort((score, word_row))  # by row, then score
    words_per_row = np.bincount(word_row, minlength=batch)
    row_first = np.concatenate(([0], np.cumsum(words_per_row)[:-1]))  # (B,) first sorted slot of each row
    rank = np.arange(num_words) - row_first[word_row[order]]
    selected = np.zeros(num_words, dtype=bool)
    selected[order] = rank < num_select[word_row[order]]
    return selected
