"""Model smoke tests (tiny preset, CPU): shapes, sparse loss = HF loss, overfit, export, training state, schedule."""

import json

import numpy as np
import pytest
import torch

from jbert_ray.errors import UserError
from jbert_ray.masking import IGNORE_INDEX, MaskingConfig, mask_tokens
from jbert_ray.model import (
    ARCHS,
    PRESETS,
    ModelConfig,
    SparseMaskedLM,
    build_model,
    hf_config_dict,
    resolve_model_config,
)
from jbert_ray.pretrain.config import PretrainConfig
from jbert_ray.pretrain.state import load_train_state, save_train_state
from jbert_ray.pretrain.step import lr_at, make_optimizer, train_step
from jbert_ray.pretrain.stream import plan_stream
from jbert_ray.tokenizer import JapaneseTokenizer

VOCAB = 300


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(5, VOCAB, size=(4, 16))
    ids[:, 0], ids[:, -1] = 2, 3
    masked, labels = mask_tokens(
        ids,
        rng.random((4, 16)) < 0.7,
        vocab_size=VOCAB,
        special_ids=range(5),
        mask_id=4,
        config=MaskingConfig(mask_prob=0.3),
        rng=rng,
    )
    return {
        "input_ids": torch.tensor(masked),
        "attention_mask": torch.ones(4, 16, dtype=torch.long),
        "labels": torch.tensor(labels),
    }


SPECIAL_IDS = {"pad": 0, "cls": 2, "sep": 3}


def tiny_model(arch="modernbert", seed=0, vocab_size=VOCAB):
    torch.manual_seed(seed)
    return build_model(hf_config_dict(PRESETS["tiny"], arch, vocab_size, SPECIAL_IDS))


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes_sdpa_and_special_ids(arch):
    model = tiny_model(arch).eval()
    logits = model(input_ids=torch.randint(5, VOCAB, (2, 10))).logits
    assert logits.shape == (2, 10, VOCAB)
    assert model.config._attn_implementation == "sdpa"
    assert model.config.model_type == arch and model.config.pad_token_id == 0
    assert model.config.hidden_size == PRESETS["tiny"].hidden_size


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_loss_equals_the_dense_hf_loss_with_padding(arch, batch):
    model = tiny_model(arch).eval()
    batch = dict(batch)
    batch["attention_mask"] = batch["attention_mask"].clone()
    batch["attention_mask"][1, 10:] = 0  # a padded row: its masked positions past 10 must not be predicted
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 0)
    batch["labels"] = batch["labels"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    with torch.no_grad():
        dense = model(**batch).loss
        sparse, correct, predicted = SparseMaskedLM(model)(
            batch["input_ids"], batch["attention_mask"], batch["labels"]
        )
    assert torch.allclose(sparse, dense, atol=1e-5)
    assert predicted.item() == (batch["labels"] != IGNORE_INDEX).sum().item()
    assert 0 <= correct.item() <= predicted.item()


def test_a_batch_without_masks_gives_zero_loss_and_gradients_everywhere(batch):
    module = SparseMaskedLM(tiny_model())
    loss, _, predicted = module(batch["input_ids"], None, torch.full_like(batch["labels"], IGNORE_INDEX))
    loss.backward()
    assert predicted.item() == 0 and loss.item() == 0
    assert all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_drops_when_overfitting_one_batch(arch, batch):
    model = tiny_model(arch)
    module = SparseMaskedLM(model)
    cfg = PretrainConfig(data_dir="", output_dir="", learning_rate=3e-3)
    optimizer = make_optimizer(model, cfg)
    losses = []
    for _ in range(20):
        stats = train_step(module, optimizer, [batch], lr=3e-3, max_grad_norm=1.0)
        losses.append(stats["totals"][0].item() / stats["totals"][2].item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_export_reloads_with_identical_logits_and_runs_in_the_fill_mask_pipeline(arch, tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer, pipeline

    from jbert_ray.checkpoint import load_model_dir, save_model_dir

    tokenizer = JapaneseTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_model(arch, vocab_size=tokenizer.vocab_size).eval()
    save_model_dir(tmp_path, SparseMaskedLM(model).mlm, tokenizer)
    loaded, _ = load_model_dir(tmp_path)
    text = "東京は日本の首都です。"
    ids = torch.tensor([tokenizer.encode(text).ids])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-6)
    architecture = {"bert": "BertForMaskedLM", "modernbert": "ModernBertForMaskedLM"}[arch]
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [architecture]
    # transformers 5 gives model_type modernbert its `tokenizers` backend whatever tokenizer_class says:
    # tokenizer_type="bert-japanese" is the documented way to get BertJapaneseTokenizer (it works for BERT too).
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, tokenizer_type="bert-japanese")
    assert type(hf_tokenizer).__name__ == "BertJapaneseTokenizer"
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text).ids
    if arch == "bert":
        assert type(AutoTokenizer.from_pretrained(tmp_path)).__name__ == "BertJapaneseTokenizer"
    fill_mask = pipeline("fill-mask", model=str(tmp_path), tokenizer=hf_tokenizer)
    predictions = fill_mask("東京は日本の[MASK]です。")
    assert len(predictions) == 5 and all("token_str" in p for p in predictions)


def test_training_state_round_trips_optimizer_and_rng(tmp_path, batch):
    model = tiny_model()
    optimizer = make_optimizer(model, PretrainConfig(data_dir="", output_dir=""))
    train_step(SparseMaskedLM(model), optimizer, [batch], lr=1e-3, max_grad_norm=1.0)
    save_train_state(tmp_path, optimizer, 7, sequences=70)
    expected_draw = torch.rand(3)
    fresh = make_optimizer(model, PretrainConfig(data_dir="", output_dir=""))
    record = load_train_state(tmp_path, fresh)
    assert record["step"] == 7 and record["sequences"] == 70
    assert torch.equal(torch.rand(3), expected_draw)
    before, after = optimizer.state_dict(), fresh.state_dict()
    for index, state in before["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after["state"][index][name]))


def test_learning_rate_warms_up_then_decays_to_zero():
    cfg = PretrainConfig(data_dir="", output_dir="", max_steps=100, warmup_steps=10, learning_rate=1.0)
    assert lr_at(0, 0.0, cfg) == pytest.approx(0.1)
    assert lr_at(9, 0.0, cfg) == pytest.approx(1.0)
    assert lr_at(55, 999.0, cfg) == pytest.approx(0.5)  # by steps: the clock does not matter
    assert lr_at(100, 0.0, cfg) == 0.0


def test_learning_rate_under_a_time_budget_follows_the_clock_not_the_step():
    cfg = PretrainConfig(data_dir="", output_dir="", time_budget_min=10, learning_rate=1.0)  # 600 s
    assert lr_at(0, 18.0, cfg) == pytest.approx(0.5)  # half of the 6% (36 s) warmup
    assert lr_at(5, 36.0, cfg) == pytest.approx(1.0)
    assert lr_at(10_000, 318.0, cfg) == pytest.approx(0.5)  # halfway through the decay, whatever the step
    assert lr_at(10, 600.0, cfg) == 0.0
    assert cfg.resolved().max_steps == 0  # no step limit under a budget
    assert PretrainConfig(data_dir="", output_dir="").resolved().max_steps == 1000


def test_stream_plan_resumes_at_the_file_holding_the_position():
    rows = [10, 20, 30]
    start, plan = plan_stream(rows, consumed=0, needed=60, seed=0)
    assert start == 0 and len(plan) == 1 and sorted(plan[0][1]) == [0, 1, 2]
    start, plan = plan_stream(rows, consumed=75, needed=150, seed=0)
    order = plan[0][1]
    assert plan[0][0] == 1 and start <= 75 < start + rows[order[0]]
    assert [epoch for epoch, _ in plan] == [1, 2]


def test_model_config_json_accepts_our_fields_and_rejects_unknown_ones(tmp_path):
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({"hidden_size": 32, "num_layers": 1, "num_heads": 2}))
    assert resolve_model_config(str(ours)) == ModelConfig(hidden_size=32, num_layers=1, num_heads=2)
    hf = tmp_path / "hf.json"
    hf.write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    assert resolve_model_config(str(hf))["hidden_size"] == 32
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"n_embd": 32}))
    with pytest.raises(UserError, match="unknown model config keys"):
        resolve_model_config(str(bad))
    with pytest.raises(UserError, match="neither a preset"):
        resolve_model_config("huge")
