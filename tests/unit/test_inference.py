"""MaskedLM (fill-mask, PLL scoring) and model directories, on the tiny random model; no Ray."""

import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from jbert_ray import inference
from jbert_ray.checkpoint import load_model_dir, save_model_dir
from jbert_ray.errors import UserError
from jbert_ray.inference import InferenceConfig, MaskedLM, TextTooLongError

FILL_MASK_TEXTS = [
    "東京は日本の[MASK]です。",
    "今日は[MASK]が降っているので、[MASK]を持って出かけた。",
    "[MASK]",
    "吾輩は猫である。名前はまだ[MASK]。",
]


@pytest.fixture(scope="module")
def lm(tiny_model_dir) -> MaskedLM:
    return MaskedLM.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def short_texts(sample_texts, lm) -> list[str]:
    """Six sample sentences of 8–60 tokens, so the naive reference stays quick."""
    return [t for t in sample_texts[:400] if 8 <= len(lm.encode([t])[0].ids) <= 60][:6]


@contextmanager
def one_torch_thread():
    """Hundreds of tiny forwards: OpenMP threads only spin on them (10x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fidelity_texts(sample_texts, lm) -> list[str]:
    """Sixty sample sentences of 12–40 tokens: longer than the stride tested, short enough to stay quick."""
    return [t for t in sample_texts[:1000] if 12 <= len(lm.encode([t])[0].ids) <= 40][:60]


def naive_pll(lm: MaskedLM, text: str, word_l2r: bool = False) -> list[float]:
    """The reference: one full forward per masked position, batch 1, full output layer."""
    with one_torch_thread():
        return _naive_pll(lm, text, word_l2r)


def _naive_pll(lm: MaskedLM, text: str, word_l2r: bool) -> list[float]:
    encoding = lm.encode([text])[0]
    ids, starts, out = encoding.ids, encoding.word_start, []
    for j in range(1, len(ids) - 1):
        masked = list(ids)
        k = j
        while k == j or (word_l2r and k < len(ids) - 1 and not starts[k]):
            masked[k] = lm.tokenizer.mask_token_id
            k += 1
        with torch.no_grad():
            logits = lm.model(torch.tensor([masked])).logits[0, j]
        out.append(torch.log_softmax(logits, -1)[ids[j]].item())
    return out


def spearman(a, b) -> float:
    """Pearson's r of the ranks (stable: a repeated text ranks the same way in both)."""
    ranks = [np.argsort(np.argsort(values, kind="stable"), kind="stable") for values in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


# ---- model directories ----


def test_saved_model_dir_reloads_with_identical_logits(tmp_path, tiny_model_dir):
    model, tokenizer = load_model_dir(tiny_model_dir)
    save_model_dir(tmp_path, model, tokenizer)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "pytorch_model.bin").exists()
    again, _ = load_model_dir(tmp_path)
    ids = torch.tensor([tokenizer.encode("東京は日本の首都です。").ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert again.config._attn_implementation == "sdpa" and not again.training


@pytest.mark.parametrize(
    "files, message",
    [
        ({}, "no config.json"),
        ({"config.json": "{"}, "not a valid JSON"),
        ({"config.json": json.dumps({"model_type": "gpt2"})}, "loads bert and modernbert models"),
        ({"config.json": json.dumps({"model_type": "bert"})}, "no model.safetensors"),
        ({"config.json": json.dumps({"model_type": "bert"}), "pytorch_model.bin": "x"}, "does not unpickle"),
    ],
)
def test_load_rejects_what_is_not_a_model_dir(tmp_path, files, message):
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=message):
        load_model_dir(tmp_path)


def test_load_rejects_a_hub_name():
    with pytest.raises(UserError, match="does not exist"):
        MaskedLM.from_pretrained("tohoku-nlp/bert-base-japanese-v3")


# ---- fill-mask ----


def test_fill_mask_matches_the_transformers_pipeline(lm, tiny_model_dir):
    from transformers import pipeline

    fill_mask = pipeline("fill-mask", model=str(tiny_model_dir), device="cpu")
    ours = lm.fill_mask(FILL_MASK_TEXTS, top_k=5)
    for text, per_mask in zip(FILL_MASK_TEXTS, ours):
        theirs = fill_mask(text, top_k=5)
        theirs = [theirs] if isinstance(theirs[0], dict) else theirs  # one [MASK] → a flat list
        assert len(per_mask) == len(theirs) == text.count("[MASK]")
        for candidates, reference in zip(per_mask, theirs):
            assert candidates[0]["token_id"] == reference[0]["token"]
            assert [c["score"] for c in candidates] == pytest.approx(
                [r["score"] for r in reference], abs=1e-5
            )


def test_fill_mask_targets_rank_only_those_tokens_as_the_pipeline_does(lm, tiny_model_dir):
    from transformers import pipeline

    text = "東京は日本の[MASK]です。"
    everything = lm.fill_mask([text], top_k=lm.vocab_size)[0][0]
    words = [c for c in everything if lm.tokenizer.vocab[c["token_id"]] == c["token"]][::50][:6]  # no "##"
    targets = [c["token"] for c in words]
    ours = lm.fill_mask([text], top_k=4, targets=targets)[0][0]
    assert [c["token"] for c in ours] == targets[:4]  # the same order as over the whole vocabulary
    assert [c["score"] for c in ours] == pytest.approx([c["score"] for c in words[:4]], abs=1e-6)
    theirs = pipeline("fill-mask", model=str(tiny_model_dir), device="cpu")(text, targets=targets, top_k=4)
    assert [r["token"] for r in theirs] == [c["token_id"] for c in ours]
    assert [r["score"] for r in theirs] == pytest.approx([c["score"] for c in ours], abs=1e-5)
    assert len(lm.fill_mask([text], top_k=50, targets=targets[:2])[0][0]) == 2


@pytest.mark.parametrize("targets", [[], "東京", ["[PAD]"], ["\u2603\u2603"]])
def test_fill_mask_rejects_targets_outside_the_vocabulary(lm, targets):
    with pytest.raises(UserError, match="targets must be|not in the vocabulary"):
        lm.fill_mask(["東京は日本の[MASK]です。"], targets=targets)


def test_fill_mask_returns_top_k_per_mask_without_continuation_prefix(lm):
    results = lm.fill_mask(["[MASK]は[MASK]。", "マスクなし"], top_k=50)
    assert [len(r) for r in results] == [2, 0]
    for candidates in results[0]:
        assert len(candidates) == 50
        scores = [c["score"] for c in candidates]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
        assert not any(c["token"].startswith("##") for c in candidates)


def test_fill_mask_is_independent_of_batch_packing(tiny_model_dir, lm):
    small = MaskedLM.from_pretrained(
        tiny_model_dir, config=InferenceConfig(max_batch_tokens=1, max_batch_size=1)
    )
    for ours, theirs in zip(lm.fill_mask(FILL_MASK_TEXTS, 3), small.fill_mask(FILL_MASK_TEXTS, 3)):
        for a, b in zip(ours, theirs):
            assert [c["token_id"] for c in a] == [c["token_id"] for c in b]
            assert [c["score"] for c in a] == pytest.approx([c["score"] for c in b], abs=1e-6)


@pytest.mark.parametrize("top_k", [0, 100_000])
def test_fill_mask_rejects_top_k_out_of_range(lm, top_k):
    with pytest.raises(UserError, match="top_k"):
        lm.fill_mask(["[MASK]"], top_k=top_k)


def test_a_single_string_is_rejected(lm):
    with pytest.raises(UserError, match="list of texts"):
        lm.score("東京")


# ---- PLL scoring ----


@pytest.mark.parametrize("method", ["pll", "pll-word-l2r"])
def test_score_equals_the_naive_one_forward_per_position_reference(lm, short_texts, method):
    scores = lm.score(short_texts, method=method)
    for text, result in zip(short_texts, scores):
        reference = naive_pll(lm, text, word_l2r=method == "pll-word-l2r")
        assert result["token_pll"] == pytest.approx(reference, abs=1e-4)
        assert result["pll"] == pytest.approx(sum(reference), abs=1e-3)
        assert result["n_tokens"] == len(result["tokens"]) == len(reference)


def test_word_l2r_differs_only_on_words_of_several_pieces(lm, short_texts):
    plain, word = lm.score(short_texts), lm.score(short_texts, method="pll-word-l2r")
    for text, a, b in zip(short_texts, plain, word):
        starts = lm.encode([text])[0].word_start[1:-1]
        last_piece = [i + 1 == len(starts) or starts[i + 1] for i in range(len(starts))]
        for i, is_last in enumerate(last_piece):
            if is_last:  # nothing of its word to the right: the same masked copy
                assert a["token_pll"][i] == pytest.approx(b["token_pll"][i], abs=1e-5)


def test_strided_with_a_stride_beyond_the_length_is_exact_pll(lm, short_texts, sample_texts):
    # one token per pass: the same copies as "pll", so the same batches and the very same numbers
    wide = MaskedLM(lm.model, lm.tokenizer, InferenceConfig(mask_stride=512))
    assert wide.score(short_texts, method="pll-strided") == lm.score(short_texts)
    windowed = MaskedLM(lm.model, lm.tokenizer, InferenceConfig(max_length=32, mask_stride=30))
    long_text = ["".join(sample_texts[:10])]
    assert windowed.score(long_text, method="pll-strided") == windowed.score(long_text)


def test_strided_with_stride_one_masks_every_token_at_once(lm, short_texts):
    one = MaskedLM(lm.model, lm.tokenizer, InferenceConfig(mask_stride=1))
    for text, result in zip(short_texts, one.score(short_texts, method="pll-strided")):
        ids = lm.encode([text])[0].ids
        masked = [ids[0], *[lm.tokenizer.mask_token_id] * (len(ids) - 2), ids[-1]]
        with torch.no_grad():
            log_probs = torch.log_softmax(lm.model(torch.tensor([masked])).logits[0], -1)  # (T, V)
        expected = [log_probs[j, ids[j]].item() for j in range(1, len(ids) - 1)]
        assert result["token_pll"] == pytest.approx(expected, abs=1e-4)


def test_strided_costs_k_copies_per_text(lm, short_texts, monkeypatch):
    counts, logits_at = [], MaskedLM._logits_at

    def counted(self, sequences, copies):
        counts.append(len(copies))  # copies = forward rows: one per pass, whatever the batching
        return logits_at(self, sequences, copies)

    monkeypatch.setattr(MaskedLM, "_logits_at", counted)
    strided = MaskedLM(lm.model, lm.tokenizer, InferenceConfig(mask_stride=4))
    strided.score(short_texts, method="pll-strided")
    assert counts == [sum(min(4, len(lm.encode([t])[0].ids) - 2) for t in short_texts)]


FIDELITY_BOUND = 0.88  # token-level Spearman at k=8 on the random tiny model: 0.92-0.93 seen; broken reads ≤ 0.84


def test_strided_ranks_tokens_like_exact_pll_and_a_broken_variant_does_not(lm, fidelity_texts, monkeypatch):
    exact = lm.score(fidelity_texts)
    strided = MaskedLM(lm.model, lm.tokenizer, InferenceConfig(mask_stride=8))

    def fidelity() -> tuple[float, float]:
        """Spearman vs exact PLL over every token, and over texts' pll_per_token."""
        fast = strided.score(fidelity_texts, method="pll-strided")
        per_token = [np.concatenate([r["token_pll"] for r in results]) for results in (fast, exact)]
        per_text = [[r["pll_per_token"] for r in results] for results in (fast, exact)]
        return spearman(*per_token), spearman(*per_text)

    # A random model's log-probabilities follow the token more than its context, so the text averages of even a
    # broken variant correlate well; per token, reads of the wrong positions fall well below the bound.
    per_token, per_text = fidelity()
    assert per_token >= FIDELITY_BOUND and per_text >= 0.85
    real = inference._masked_copies
    for broken in (
        lambda *args: [(masked, [min(p + 1, args[1][-1]) for p in read]) for masked, read in real(*args)],
        lambda *args: [([min(p + 1, args[1][-1]) for p in masked], read) for masked, read in real(*args)],
    ):  # read the unmasked neighbour; mask the neighbour and read the token itself
        monkeypatch.setattr(inference, "_masked_copies", broken)
        assert fidelity()[0] < FIDELITY_BOUND


def test_mask_stride_below_one_is_rejected():
    with pytest.raises(UserError, match="mask_stride must be ≥ 1"):
        InferenceConfig(mask_stride=0)


def test_empty_text_scores_zero(lm):
    assert lm.score(["", "東京"])[0] == {
        "pll": 0.0, "pll_per_token": None, "n_tokens": 0, "unk_rate": 0.0, "token_pll": [], "tokens": []
    }


# ---- long texts: an explicit policy, never silent truncation ----


def test_long_text_is_scored_in_windows_covering_every_token(tiny_model_dir, sample_texts):
    windowed = MaskedLM.from_pretrained(tiny_model_dir, config=InferenceConfig(max_length=32))
    ids = windowed.encode(["".join(sample_texts[:10])])[0].ids
    assert len(ids) > 100
    result = windowed.score(["".join(sample_texts[:10])])[0]
    assert result["n_tokens"] == len(ids) - 2 and all(v < 0 for v in result["token_pll"])
    # The first and last tokens are read in the first and last windows (30 content tokens + [CLS]/[SEP]).
    tokenizer = windowed.tokenizer
    for window, position, index in [
        (ids[:31] + [tokenizer.sep_token_id], 1, 0),
        ([tokenizer.cls_token_id] + ids[-31:], 30, -1),
    ]:
        masked = list(window)
        masked[position] = tokenizer.mask_token_id
        with torch.no_grad():
            logits = windowed.model(torch.tensor([masked])).logits[0, position]
        expected = torch.log_softmax(logits, -1)[window[position]].item()
        assert result["token_pll"][index] == pytest.approx(expected, abs=1e-4)


def test_long_text_policy_error_names_the_text(tiny_model_dir, sample_texts):
    strict = MaskedLM.from_pretrained(
        tiny_model_dir, config=InferenceConfig(max_length=32, long_text="error")
    )
    with pytest.raises(TextTooLongError, match="text 1 has .* tokens; the model takes at most 32"):
        strict.score(["短い。", "".join(sample_texts[:5])])


def test_fill_mask_on_a_long_text_reads_each_mask_in_its_own_window(tiny_model_dir, sample_texts):
    windowed = MaskedLM.from_pretrained(tiny_model_dir, config=InferenceConfig(max_length=32))
    long_text = "".join(sample_texts[:5])
    text = "[MASK]" + long_text + "[MASK]" + long_text + "[MASK]"
    results = windowed.fill_mask([text], top_k=2)[0]
    assert len(results) == 3 and all(len(candidates) == 2 for candidates in results)


def test_bfloat16_weights_score_close_to_float32(tiny_model_dir, lm, short_texts):
    half = MaskedLM.from_pretrained(tiny_model_dir, device="cpu", dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    # bf16 keeps 8 significant bits: a log-probability near -12 moves by ~2% through two layers and the softmax
    # (0.18-0.22 seen), while the average token stays within ~0.03.
    differences = []
    for a, b in zip(lm.score(short_texts[:3]), half.score(short_texts[:3])):
        assert b["token_pll"] == pytest.approx(a["token_pll"], rel=0.04, abs=0.2)
        differences += [abs(x - y) for x, y in zip(a["token_pll"], b["token_pll"])]
    assert sum(differences) / len(differences) < 0.1
    with pytest.raises(UserError, match="unknown dtype"):
        MaskedLM.from_pretrained(tiny_model_dir, dtype="int3")


@pytest.mark.parametrize("native", [True, False])
def test_dtype_auto_is_bfloat16_only_where_the_chip_has_native_bf16(tiny_model_dir, monkeypatch, native):
    from jbert_ray.pretrain import step as train_step

    monkeypatch.setattr(train_step, "has_native_bf16", lambda device: native and device.type == "cpu")
    lm = MaskedLM.from_pretrained(tiny_model_dir, device="cpu", dtype="auto")
    assert next(lm.model.parameters()).dtype == (torch.bfloat16 if native else torch.float32)


# ---- ModernBERT model directories ----


def test_modernbert_dir_fills_masks_like_the_pipeline_and_scores_like_the_naive_reference(
    tiny_modernbert_dir, short_texts
):
    from transformers import AutoTokenizer, pipeline

    modern = MaskedLM.from_pretrained(tiny_modernbert_dir, device="cpu")
    assert modern.model.config.model_type == "modernbert"
    tokenizer = AutoTokenizer.from_pretrained(tiny_modernbert_dir, tokenizer_type="bert-japanese")
    fill_mask = pipeline("fill-mask", model=str(tiny_modernbert_dir), tokenizer=tokenizer, device="cpu")
    text = FILL_MASK_TEXTS[0]
    (candidates,) = modern.fill_mask([text], top_k=5)[0]
    reference = fill_mask(text, top_k=5)
    assert [c["token_id"] for c in candidates] == [r["token"] for r in reference]
    assert [c["score"] for c in candidates] == pytest.approx([r["score"] for r in reference], abs=1e-5)
    for text, result in zip(short_texts[:3], modern.score(short_texts[:3])):
        assert result["token_pll"] == pytest.approx(naive_pll(modern, text), abs=1e-4)
