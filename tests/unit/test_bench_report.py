"""The README's benchmark section is generated from bench/results/*.json and kept in step with them."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import report


def test_readme_benchmark_section_matches_the_result_files():
    text = report.README.read_text(encoding="utf-8")
    assert report.updated_readme(text, report.render()) == text, "run python bench/report.py"


def test_a_result_file_becomes_a_titled_table_with_its_machine(tmp_path):
    record = {"name": "tokenizer", "title": "Tokenizer: cold", "command": "python bench/tokenizer.py",
              "machine": {"cpu": "AMD EPYC", "cpus": 2, "gpu": None, "date": "2026-11-30",
                          "load_average_at_start": 0.1},
              "columns": ["tokenizer", "M chars/s"], "rows": [["ours, cold", "1.62"], ["floor", "2.31"]],
              "notes": ["Ids identical: 17,054 of 17,054."]}  # fmt: skip
    (tmp_path / "tokenizer.json").write_text(json.dumps(record), encoding="utf-8")
    section = report.render(tmp_path)
    assert section.startswith(report.BEGIN) and section.endswith(report.END)
    assert "#### Tokenizer: cold" in section and "2 × AMD EPYC, 2026-11-30" in section
    assert "| ours, cold | 1.62 |" in section and "Ids identical: 17,054 of 17,054." in section
    readme = f"intro\n{report.BEGIN}\nold figures\n{report.END}\ntail\n"
    assert report.updated_readme(readme, section) == f"intro\n{section}\ntail\n"
    with pytest.raises(SystemExit, match="markers"):
        report.updated_readme("no markers here", section)
