"""Masking properties over many draws: selection rate, whole words, 80/10/10, special tokens, determinism."""

import numpy as np
import pytest

from jbert_ray.errors import UserError
from jbert_ray.masking import IGNORE_INDEX, MaskingConfig, mask_batch, mask_tokens, pad_batch

PAD, UNK, CLS, SEP, MASK = range(5)
SPECIAL = (PAD, UNK, CLS, SEP, MASK)
VOCAB = 1000


def random_batch(rng, batch=256, seq=64):
    """Rows [CLS] words… [SEP] words… [SEP] [PAD]…; words of 1–4 pieces."""
    ids = rng.integers(5, VOCAB, size=(batch, seq))
    starts = np.zeros((batch, seq), dtype=bool)
    for row in range(batch):
        length = int(rng.integers(10, seq + 1))
        position = 0
        while position < length:
            starts[row, position] = True
            position += int(rng.integers(1, 5))
        ids[row, 0], ids[row, length - 1], ids[row, length // 2] = CLS, SEP, SEP
        starts[row, [0, length // 2, length - 1]] = True
        ids[row, length:], starts[row, length:] = PAD, False
    return ids, starts


def draw(ids, starts, seed=0, **config):
    """Whole-word masking unless the test says otherwise (token masking is the pretraining default)."""
    config = {"whole_word": True, **config}
    return mask_tokens(
        ids,
        starts,
        vocab_size=VOCAB,
        special_ids=SPECIAL,
        mask_id=MASK,
        config=MaskingConfig(**config),
        rng=np.random.default_rng(seed),
    )


def word_spans(ids, starts):
    """(row, first, end) of every non-special word, as the masking defines words."""
    special = np.isin(ids, SPECIAL)
    spans = []
    for row in range(ids.shape[0]):
        first = None
        for t in range(ids.shape[1] + 1):
            boundary = t == ids.shape[1] or starts[row, t] or special[row, t] or special[row, t - 1]
            if boundary and first is not None:
                spans.append((row, first, t))
                first = None
            if t < ids.shape[1] and not special[row, t] and (boundary or first is None):
                first = t
    return spans


def test_about_fifteen_percent_of_words_are_selected():
    ids, starts = random_batch(np.random.default_rng(1))
    spans = word_spans(ids, starts)
    rates = []
    for seed in range(5):
        _, labels = draw(ids, starts, seed)
        rates.append(np.mean([labels[r, a] != IGNORE_INDEX for r, a, _ in spans]))
    assert abs(np.mean(rates) - 0.15) < 0.01


def test_every_piece_of_a_selected_word_is_masked_together():
    ids, starts = random_batch(np.random.default_rng(2))
    masked, labels = draw(ids, starts, seed=3)
    for row, first, end in word_spans(ids, starts):
        chosen = labels[row, first:end] != IGNORE_INDEX
        assert chosen.all() or not chosen.any()
        if chosen.all() and masked[row, first] == MASK:
            assert (masked[row, first:end] == MASK).all()


def test_replacements_split_80_10_10():
    ids, starts = random_batch(np.random.default_rng(4), batch=1024)
    masked, labels = draw(ids, starts, seed=5, whole_word=False)
    selected = labels != IGNORE_INDEX
    to_mask = (masked == MASK) & selected
    unchanged = (masked == ids) & selected
    to_random = selected & ~to_mask & ~unchanged
    total = selected.sum()
    assert abs(to_mask.sum() / total - 0.8) < 0.02
    # a random draw can hit the original id (1 in ~1000): counted as unchanged
    assert abs(to_random.sum() / total - 0.1) < 0.015
    assert abs(unchanged.sum() / total - 0.1) < 0.015
    assert not np.isin(masked[to_random], SPECIAL).any()


def test_special_tokens_are_never_masked_or_predicted():
    ids, starts = random_batch(np.random.default_rng(6))
    masked, labels = draw(ids, starts, seed=7, mask_prob=1.0)
    special = np.isin(ids, SPECIAL)
    assert (masked[special] == ids[special]).all()
    assert (labels[special] == IGNORE_INDEX).all()
    assert (labels[~special] == ids[~special]).all()  # mask_prob=1 selects every other token


def test_labels_hold_the_original_ids_exactly_where_selected():
    ids, starts = random_batch(np.random.default_rng(8))
    masked, labels = draw(ids, starts, seed=9)
    selected = labels != IGNORE_INDEX
    assert labels.dtype == np.int64 and masked.dtype == ids.dtype
    assert (labels[selected] == ids[selected]).all()
    assert (masked[~selected] == ids[~selected]).all()


def test_same_seed_same_masks_other_seed_other_masks():
    ids, starts = random_batch(np.random.default_rng(10))
    first, second, other = draw(ids, starts, 11), draw(ids, starts, 11), draw(ids, starts, 12)
    assert all((a == b).all() for a, b in zip(first, second))
    assert not (first[1] == other[1]).all()


def test_token_level_masking_selects_pieces_independently():
    ids, starts = random_batch(np.random.default_rng(13))
    _, labels = draw(ids, starts, seed=14, whole_word=False)
    split_words = 0
    for row, first, end in word_spans(ids, starts):
        chosen = labels[row, first:end] != IGNORE_INDEX
        split_words += bool(chosen.any() and not chosen.all())
    assert split_words > 0
    eligible = ~np.isin(ids, SPECIAL)
    assert abs((labels != IGNORE_INDEX)[eligible].mean() - 0.15) < 0.01


def test_mask_batch_pads_ragged_rows_and_redraws_per_epoch():
    rows = [np.array([CLS, 7, 8, SEP], np.int32), np.array([CLS, 9, SEP], np.int32)]
    batch = {
        "input_ids": np.array(rows, dtype=object),
        "word_start": np.array([np.array([1, 1, 0, 1], bool), np.array([1, 1, 1], bool)], dtype=object),
    }
    kwargs = {
        "vocab_size": VOCAB,
        "special_ids": SPECIAL,
        "mask_id": MASK,
        "pad_id": PAD,
        "max_seq_len": 6,
        "config": MaskingConfig(mask_prob=0.5),
    }
    out = mask_batch(batch, **kwargs, epoch=0)
    assert out["input_ids"].shape == (2, 6) and out["input_ids"].dtype == np.int32
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]]
    assert (mask_batch(batch, **kwargs, epoch=0)["labels"] == out["labels"]).all()
    epochs = {mask_batch(batch, **kwargs, epoch=e)["labels"].tobytes() for e in range(8)}
    assert len(epochs) > 1


def test_pad_batch_rejects_rows_longer_than_the_length():
    with pytest.raises(ValueError, match="more than the padded length"):
        pad_batch([[1, 2, 3]], 0, length=2)


def test_config_rejects_impossible_fractions():
    with pytest.raises(UserError, match="must be ≤ 1"):
        MaskingConfig(replace_with_mask=0.9, replace_with_random=0.2)
