"""docs/benchmarks.md's tables are generated from bench/results/*.json and kept in step with them."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import report

RECORD = {"name": "tokenizer", "title": "Tokenizer: cold", "command": "python bench/tokenizer.py --work /work/qwork",
          "machine": {"cpu": "AMD EPYC", "cpus": 2, "gpu": None, "date": "2026-11-30", "load_average_at_start": 0.1},
          "columns": ["tokenizer", "M chars/s"], "rows": [["ours, cold", "1.62"], ["floor", "2.31"]],
          "notes": ["Ids identical: 17,054 of 17,054."]}  # fmt: skip


def test_benchmarks_page_matches_the_result_files():
    text = report.PAGE.read_text(encoding="utf-8")
    assert report.updated_page(text, report.render()) == text, "run python bench/report.py"


def test_a_result_file_becomes_an_anchored_titled_table_with_its_machine(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps(RECORD), encoding="utf-8")
    section = report.render(tmp_path)
    assert section.startswith(report.BEGIN) and section.endswith(report.END)
    assert '<a id="tokenizer"></a>' in section and "### Tokenizer: cold" in section
    assert "2 × AMD EPYC, 2026-11-30" in section and "| ours, cold | 1.62 |" in section
    assert "Ids identical: 17,054 of 17,054." in section
    page = f"intro\n{report.BEGIN}\nold figures\n{report.END}\ntail\n"
    assert report.updated_page(page, section) == f"intro\n{section}\ntail\n"
    with pytest.raises(SystemExit, match="markers"):
        report.updated_page("no markers here", section)


def test_the_machine_s_paths_are_cut_to_their_last_part(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps(RECORD), encoding="utf-8")
    section = report.render(tmp_path)
    assert "/work/" not in section and "--work …/qwork" in section
    assert report.strip_paths("--old /tmp/old, ~/x/y.json") == "--old …/old, …/y.json"
    assert report.strip_paths("tokens/s over s3://bucket/key, AUC / P@10%, </s>") == (
        "tokens/s over s3://bucket/key, AUC / P@10%, </s>")  # fmt: skip


def test_long_fill_mask_answers_keep_every_run_s_first_three_and_link_the_json():
    note = (report.ANSWERS + "`セルに[MASK]を入力します。`: ours 表示 / 色 / ボタン / カーソル / 出力; hf を / ます / 。 / し / の"
            " — `画像の[MASK]を変更します。`: ours 値 / 色 / 範囲 / 例 / 設定; hf を / ます / 。 / の / し")  # fmt: skip
    short = report.short_note(note, "quality")
    assert "- `セルに[MASK]を入力します。`: ours 表示 / 色 / ボタン; hf を / ます / 。" in short
    assert "カーソル" not in short and "](../bench/results/quality.json)" in short
    assert report.shorten("あ / い / う / え", 8) == "あ / い …"


def test_twin_titles_get_their_file_name(tmp_path):
    for name in ("quality-a", "quality-b"):
        record = {**RECORD, "name": name, "title": "Learning: levers"}
        (tmp_path / f"{name}.json").write_text(json.dumps(record), encoding="utf-8")
    section = report.render(tmp_path)
    assert "### Learning: levers (quality-a)" in section and "### Learning: levers (quality-b)" in section
