"""JGLUE tasks for `jbert evaluate`: read and check a task's JSON lines, encode them with a model's tokenizer, and
score predictions with the task's dev metric.

JSTS (sentence similarity, a float label 0–5) is fine-tuned as a one-output regression and scored by Pearson and
Spearman correlation; JCommonsenseQA (5-way multiple choice) by accuracy (Kurihara et al. 2022). A task folder holds
`train.jsonl` and `valid.jsonl`, or JGLUE's own `train-v1.3.json` / `valid-v1.3.json` (JSON lines too).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from jbert_ray.errors import UserError
from jbert_ray.storage import Store, first_line
from jbert_ray.tokenizer import JapaneseTokenizer

_SHOWN_LINES = 3  # line numbers named per kind of problem


@dataclass(frozen=True)
class Task:
    name: str
    head: str  # "regression" (AutoModelForSequenceClassification, 1 output) or "multiple-choice"
    metrics: tuple[str, ...]  # the first one picks the best learning rate
    num_choices: int = 1


TASKS = {
    "jsts": Task("jsts", "regression", ("pearson", "spearman")),
    "jcommonsenseqa": Task("jcommonsenseqa", "multiple-choice", ("accuracy",), num_choices=5),
}
_JSTS_LABELS = (0.0, 5.0)


@dataclass(frozen=True)
class Encoded:
    """A split encoded for a model: per example, its (first segment length, ids) pairs and the gold label."""

    pairs: list[list[tuple[int, list[int]]]]  # example → one (len of [CLS] a [SEP], ids) per choice
    labels: np.ndarray  # float32 (regression) or int64 (choice index)

    def __len__(self) -> int:
        return len(self.labels)

    def longest(self, example: int) -> int:
        """Tokens of the example's longest sequence (what its batch is padded to)."""
        return max(len(ids) for _, ids in self.pairs[example])


def parse_tasks(spec: str) -> list[Task]:
    """`jsts,jcommonsenseqa` → their Tasks, in that order; an unknown name is one error line."""
    names = [name.strip().lower() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise UserError(f"--tasks {spec!r}: unknown task {unknown[0]!r}; use one or more of {', '.join(TASKS)}"
                        if unknown else f"--tasks {spec!r} names no task; use {', '.join(TASKS)}")  # fmt: skip
    return [TASKS[name] for name in dict.fromkeys(names)]


def read_split(data: Store, task: Task, split: str) -> list[dict]:
    """The rows of `task`'s `split` ("train" or "valid") under `data`. Unusable rows are counted by kind and named
    by line in one UserError: a score on part of a file, silently, would be a score for other data."""
    name = _find_file(data, task, split)
    try:
        text = data.read_text(name)
    except UnicodeDecodeError as error:
        raise UserError(f"{data.child(name)} is not UTF-8 text: {error.reason} at byte {error.start:,}") from None
    problems: dict[str, list[int]] = {}
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        problem = _problem(task, row) if isinstance(row, dict) else "not a JSON object"
        if problem:
            problems.setdefault(problem, []).append(number)
        else:
            rows.append(row)
    if problems:
        kinds = "; ".join(
            f"{len(lines):,} × {problem} (line {', '.join(map(str, lines[:_SHOWN_LINES]))}"
            f"{', …' if len(lines) > _SHOWN_LINES else ''})"
            for problem, lines in sorted(problems.items(), key=lambda item: -len(item[1]))
        )
        unusable = sum(map(len, problems.values()))
        raise UserError(f"{data.child(name)}: {unusable:,} unusable rows: {kinds}")
    if not rows:
        raise UserError(f"{data.child(name)} has no rows")
    return rows


def _find_file(data: Store, task: Task, split: str) -> str:
    candidates = (f"{task.name}/{split}.jsonl", f"{task.name}/{split}-v1.3.json",
                  f"{task.name}-v1.3/{split}-v1.3.json")  # ours, then JGLUE's names  # fmt: skip
    for name in candidates:
        try:
            found = data.is_file(name)
        except OSError as error:  # an unreachable store or bucket
            raise UserError(f"cannot read --data {data}: {first_line(error)}") from None
        if found:
            return name
    raise UserError(f"{data} has no {task.name} {split} split: looked for {', '.join(candidates)}")


def _problem(task: Task, row: dict) -> str:
    """Why a row cannot be used ("" if it can)."""
    texts = ("sentence1", "sentence2") if task.name == "jsts" else ("question", *(f"choice{i}" for i in range(5)))
    for field in (*texts, "label"):
        if field not in row:
            return f"missing {field}"
    for field in texts:
        if not isinstance(row[field], str) or not row[field].strip():
            return f"{field} is not a non-empty string"
    label = row["label"]
    if isinstance(label, bool):
        return "label is not a number"
    if task.name == "jsts":
        low, high = _JSTS_LABELS
        if not isinstance(label, (int, float)) or not low <= label <= high:
            return f"label not a number in {low:g}–{high:g}"
    elif not isinstance(label, int) or not 0 <= label < task.num_choices:
        return f"label not an integer in 0–{task.num_choices - 1}"
    return ""


def encode_split(rows: list[dict], task: Task, tokenizer: JapaneseTokenizer, max_length: int) -> Encoded:
    """[CLS] a [SEP] b [SEP] per sentence pair (JSTS) or per (question, choice) (JCommonsenseQA), the longer
    segment cut first to fit `max_length`, as transformers' `truncation=True` does."""
    if task.name == "jsts":
        firsts = [row["sentence1"] for row in rows]
        seconds = [[row["sentence2"]] for row in rows]
        labels = np.array([row["label"] for row in rows], dtype=np.float32)
    else:
        firsts = [row["question"] for row in rows]
        seconds = [[row[f"choice{i}"] for i in range(task.num_choices)] for row in rows]
        labels = np.array([row["label"] for row in rows], dtype=np.int64)
    first_ids = tokenizer.encode_batch(firsts, add_special_tokens=False)
    second_ids = tokenizer.encode_batch([text for group in seconds for text in group], add_special_tokens=False)
    cls, sep, width = tokenizer.cls_token_id, tokenizer.sep_token_id, len(seconds[0])
    pairs = []
    for i, first in enumerate(first_ids):
        example = []
        for second in second_ids[i * width:(i + 1) * width]:
            a, b = _truncate(first.ids, second.ids, max_length - 3)
            example.append((len(a) + 2, [cls, *a, sep, *b, sep]))
        pairs.append(example)
    return Encoded(pairs, labels)


def _truncate(a: list[int], b: list[int], room: int) -> tuple[list[int], list[int]]:
    """Cut the longer of a and b, one token at a time, until both fit `room` (longest_first)."""
    keep_a, keep_b = len(a), len(b)
    while keep_a + keep_b > room:
        if keep_a > keep_b:
            keep_a -= 1
        else:
            keep_b -= 1
    return a[:keep_a], b[:keep_b]


def score(task: Task, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's dev metrics: JSTS `pearson`, `spearman` of the predicted scores; JCommonsenseQA `accuracy` of the
    argmax over choices (predictions: (N,) or (N, choices))."""
    if task.head == "regression":
        return {"pearson": pearson(predictions, labels), "spearman": spearman(predictions, labels)}
    return {"accuracy": float(np.mean(np.argmax(predictions, axis=-1) == labels))}


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r; 0.0 when either side is constant (an untrained regressor predicts one value)."""
    x, y = np.asarray(x, np.float64) - np.mean(x), np.asarray(y, np.float64) - np.mean(y)
    norm = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return float(np.sum(x * y) / norm) if norm > 0 else 0.0


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ: Pearson's r of the ranks, ties given their average rank (as scipy.stats.spearmanr)."""
    return pearson(_ranks(np.asarray(x)), _ranks(np.asarray(y)))


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    average = (starts + ends - 1) / 2.0  # the mean 0-based position of each run of equal values
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(average, ends - starts)
    return ranks
