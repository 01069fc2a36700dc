"""JGLUE tasks: reading and checking task files, pair encoding, dev metrics, and `jbert evaluate`'s user errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

from jbert_ray.cli import main
from jbert_ray.errors import UserError
from jbert_ray.evaluate import EvaluateConfig
from jbert_ray.jglue import TASKS, encode_split, parse_tasks, pearson, read_split, score, spearman
from jbert_ray.storage import Store
from jbert_ray.tokenizer import JapaneseTokenizer

SAMPLE = Path(__file__).resolve().parents[2] / "jbert_ray" / "sample" / "jglue"


def test_bundled_sample_reads_with_its_real_fields():
    jsts = read_split(Store(SAMPLE), TASKS["jsts"], "train")
    qa = read_split(Store(SAMPLE), TASKS["jcommonsenseqa"], "valid")
    assert len(jsts) == 300 and len(qa) == 100
    assert any("男性" in row["sentence1"] for row in jsts)
    assert {row["label"] for row in qa} <= set(range(5)) and len({row["label"] for row in qa}) == 5


def test_metrics_match_scipy_and_sklearn_on_fixed_predictions():
    rng = np.random.default_rng(3)
    gold = np.round(rng.uniform(0, 5, 200), 1)  # JSTS-like labels, many ties
    predicted = gold + rng.normal(0, 1.5, 200)
    predicted[:20] = 2.5  # ties in the predictions too
    assert pearson(predicted, gold) == pytest.approx(scipy.stats.pearsonr(predicted, gold)[0], abs=1e-12)
    assert spearman(predicted, gold) == pytest.approx(scipy.stats.spearmanr(predicted, gold)[0], abs=1e-12)
    logits = rng.normal(size=(200, 5))
    labels = rng.integers(0, 5, 200)
    expected = sklearn.metrics.accuracy_score(labels, logits.argmax(-1))
    assert score(TASKS["jcommonsenseqa"], logits, labels) == {"accuracy": pytest.approx(expected)}
    assert pearson(np.full(10, 3.0), np.arange(10.0)) == 0.0  # a constant regressor: 0, not NaN


def _task_dir(tmp_path: Path, rows: list, name: str = "jsts") -> Store:
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    lines = [row if isinstance(row, str) else json.dumps(row, ensure_ascii=False) for row in rows]
    for split in ("train", "valid"):
        (tmp_path / name / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Store(tmp_path)


def test_unusable_rows_are_counted_and_named_by_line(tmp_path):
    good = {"sentence1": "猫が寝ています。", "sentence2": "猫が眠っています。", "label": 4.2}
    rows = [good, {**good, "label": 7.5}, {"sentence1": "犬", "label": 1.0}, good, {**good, "label": -1}, "{oops"]
    with pytest.raises(UserError) as error:
        read_split(_task_dir(tmp_path, rows), TASKS["jsts"], "train")
    message = str(error.value)
    assert "4 unusable rows" in message
    assert "2 × label not a number in 0–5 (line 2, 5)" in message
    assert "1 × missing sentence2 (line 3)" in message and "1 × not a JSON object (line 6)" in message


def test_multiple_choice_label_out_of_range_is_refused(tmp_path):
    row = {"question": "空の色は？", **{f"choice{i}": c for i, c in enumerate("青赤緑黒白")}, "label": 5}
    with pytest.raises(UserError, match=r"1 × label not an integer in 0–4 \(line 1\)"):
        read_split(_task_dir(tmp_path, [row], "jcommonsenseqa"), TASKS["jcommonsenseqa"], "train")


def test_a_task_file_that_is_not_utf8_is_one_error_line(tmp_path):
    (tmp_path / "jsts").mkdir()
    (tmp_path / "jsts" / "train.jsonl").write_bytes('{"sentence1": "猫が寝ています。"}\n'.encode("shift_jis"))
    with pytest.raises(UserError, match=r"jsts/train.jsonl is not UTF-8 text"):
        read_split(Store(tmp_path), TASKS["jsts"], "train")


def test_jglue_own_file_names_are_found(tmp_path):
    (tmp_path / "jsts-v1.3").mkdir()
    row = {"sentence1": "猫が寝ています。", "sentence2": "猫が眠っています。", "label": 4}
    (tmp_path / "jsts-v1.3" / "valid-v1.3.json").write_text(json.dumps(row, ensure_ascii=False) + "\n")
    assert read_split(Store(tmp_path), TASKS["jsts"], "valid") == [row]


def test_pairs_encode_as_bert_japanese_tokenizer_does(tokenizer_dir):
    from transformers import BertJapaneseTokenizer

    tokenizer = JapaneseTokenizer.from_pretrained(tokenizer_dir)
    reference = BertJapaneseTokenizer.from_pretrained(tokenizer_dir)
    rows = read_split(Store(SAMPLE), TASKS["jsts"], "valid")[:30]
    for max_length in (128, 16):  # 16 cuts the longer sentence of most pairs
        encoded = encode_split(rows, TASKS["jsts"], tokenizer, max_length)
        for row, [(first, ids)] in zip(rows, encoded.pairs):
            expected = reference(row["sentence1"], row["sentence2"], truncation=True, max_length=max_length,
                                 return_token_type_ids=True)
            assert ids == expected["input_ids"]
            assert [0] * first + [1] * (len(ids) - first) == expected["token_type_ids"]


def test_multiple_choice_examples_hold_one_pair_per_choice(tokenizer_dir):
    tokenizer = JapaneseTokenizer.from_pretrained(tokenizer_dir)
    rows = read_split(Store(SAMPLE), TASKS["jcommonsenseqa"], "valid")[:5]
    encoded = encode_split(rows, TASKS["jcommonsenseqa"], tokenizer, 64)
    assert [len(example) for example in encoded.pairs] == [5] * 5
    question = tokenizer.encode(rows[0]["question"]).ids
    choice = tokenizer.encode(rows[0]["choice3"]).ids
    assert encoded.pairs[0][3] == (len(question), question + choice[1:])
    assert encoded.labels.tolist() == [row["label"] for row in rows]


def test_config_grid_and_bad_settings():
    config = EvaluateConfig("m", "d", "o", learning_rates="1e-4,5e-5", seeds="0,1,2", from_scratch=True)
    assert len(config.grid()) == 2 * 2 * 2 * 3
    assert config.train_limit == 2000 and EvaluateConfig("m", "d", "o", gpus_per_trial=1).train_limit == 0
    with pytest.raises(UserError, match="unknown task 'jnli'"):
        parse_tasks("jsts,jnli")
    with pytest.raises(UserError, match="--learning-rates"):
        EvaluateConfig("m", "d", "o", learning_rates="fast")


def _one_error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_cli_user_errors_are_one_line_before_any_work(capsys, tmp_path, tiny_model_dir):
    base = ["evaluate", "--model", str(tiny_model_dir), "--data", str(SAMPLE), "--out", str(tmp_path / "out")]
    assert "unknown task 'marc'" in _one_error_line(capsys, [*base, "--tasks", "jsts,marc"])
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    err = _one_error_line(capsys, ["evaluate", "--model", str(gpt), "--data", str(SAMPLE),
                                   "--out", str(tmp_path / "o2")])
    assert "model_type is 'gpt2'" in err
    bad = _task_dir(tmp_path / "bad", [{"sentence1": "猫", "sentence2": "犬", "label": 9}])
    err = _one_error_line(capsys, [*base[:3], "--data", bad.location, "--out", str(tmp_path / "o3"), "--tasks", "jsts"])
    assert "1 unusable rows: 1 × label not a number in 0–5 (line 1)" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o3").exists()  # nothing was started
