"""`jbert evaluate`: what pretraining bought, on JGLUE. A Ray Tune sweep fine-tunes the model once per (task,
learning rate, seed), in parallel across the cluster, and reports each task's dev metric at the learning rate whose
mean over seeds is best, with the spread across seeds.

Each trial is a Tune function trainable holding its own CPUs (or GPU) and a plain torch loop: AdamW, linear warmup
and decay, a few epochs, transformers' sequence-classification head as a one-output regression (JSTS) or its
multiple-choice head (JCommonsenseQA), for BERT, ModernBERT and Tohoku-style BERT dirs alike. `from_scratch` adds
the same architecture from random weights to the sweep: the baseline that says what pretraining bought.

    OUT/results.json   settings, every trial's metrics, the best learning rate per task and model
    OUT/results.md     the table (with the published Tohoku scores as a reference row)
    OUT/models/TRIAL/  fine-tuned model dirs, only with save_models
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from jbert_ray.checkpoint import check_model_dir
from jbert_ray.errors import UserError
from jbert_ray.jglue import TASKS, Encoded, Task, encode_split, parse_tasks, read_split, score
from jbert_ray.outputs import OutputLock, check_output, clear_output, prepared
from jbert_ray.storage import Store, is_uri, local_copy, resolve_location
from jbert_ray.tokenizer import JapaneseTokenizer

if TYPE_CHECKING:
    from ray.tune import ResultGrid
    from transformers import PreTrainedModel

STAGE = "evaluate"
CPU_TRAIN_EXAMPLES = 2000  # the CPU default cap per task: a mini-size sweep of both tasks fits in ~30 minutes
_SAMPLE_SEED = 0  # which training examples a cap keeps: the same for every trial and every run
PUBLISHED = {  # JGLUE dev scores as published (JGLUE README; the v3 model card), not re-measured here
    "Tohoku bert-base-japanese-v3 (published, not re-measured)": {
        "jsts": {"pearson": 0.914, "spearman": 0.876}, "jcommonsenseqa": {"accuracy": 0.849}},
    "Tohoku bert-base-japanese-v2 (published, not re-measured)": {
        "jsts": {"pearson": 0.909, "spearman": 0.868}, "jcommonsenseqa": {"accuracy": 0.808}},
}  # fmt: skip
PRETRAINED, FROM_SCRATCH = "pretrained", "from-scratch"


@dataclass(frozen=True)
class EvaluateConfig:
    model_dir: str  # our model dir or a Tohoku-style HF Japanese BERT dir, local or s3://, gs://, hdfs://
    data_dir: str  # JGLUE folder: TASK/train.jsonl and TASK/valid.jsonl (or JGLUE's TASK-v1.3/*-v1.3.json)
    output_dir: str  # results.json, results.md (and models/ with --save-models); local or a URI
    tasks: str = "jsts,jcommonsenseqa"  # comma-separated JGLUE tasks
    learning_rates: str = "5e-5,1e-4"  # comma-separated peak learning rates (the grid)
    seeds: str = "0,1"  # comma-separated seeds: each learning rate runs once per seed
    epochs: int = 3  # passes over the training examples
    batch_size: int = 32  # examples per step (a JCommonsenseQA example is its 5 choices)
    warmup_ratio: float = 0.1  # share of the steps with a linear warmup; then linear decay to 0
    weight_decay: float = 0.01  # AdamW weight decay (not on biases and norms)
    max_length: int = 128  # tokens per sentence pair, [CLS]/[SEP] included; the longer side is cut first
    max_train_examples: int = -1  # per task; -1 = 2,000 on CPU trials and all with GPUs, 0 = all
    from_scratch: bool = False  # also fine-tune the same architecture from random weights (the baseline)
    cpus_per_trial: float = 1.0  # CPUs each trial holds (its torch threads); trials run in parallel as they fit
    gpus_per_trial: float = 0.0  # GPUs each trial holds (0 = CPU)
    max_retries: int = 2  # times a failed trial (a killed worker, a lost node) is run again
    save_models: bool = False  # write each trial's fine-tuned model to OUT/models/
    overwrite: bool = False  # replace an earlier `jbert evaluate` output
    show_progress: bool = True  # a line per finished trial

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.max_length < 8:
            raise UserError("--epochs and --batch-size must be ≥ 1, --max-length ≥ 8")
        if not 0 <= self.warmup_ratio < 1 or self.weight_decay < 0:
            raise UserError("--warmup-ratio must be in [0, 1), --weight-decay ≥ 0")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0 or self.max_retries < 0:
            raise UserError("--cpus-per-trial must be > 0, --gpus-per-trial and --max-retries ≥ 0")
        if self.max_train_examples < -1:
            raise UserError("--max-train-examples must be -1 (auto), 0 (all) or a count")
        parse_tasks(self.tasks)
        _numbers(self.learning_rates, float, "--learning-rates")
        _numbers(self.seeds, int, "--seeds")

    @property
    def train_limit(self) -> int:
        """Training examples per task (0 = all)."""
        if self.max_train_examples >= 0:
            return self.max_train_examples
        return 0 if self.gpus_per_trial else CPU_TRAIN_EXAMPLES

    def grid(self) -> list[dict]:
        """One trial per (task, initialisation, learning rate, seed)."""
        inits = (PRETRAINED, FROM_SCRATCH) if self.from_scratch else (PRETRAINED,)
        return [
            {"task": task.name, "init": init, "learning_rate": lr, "seed": seed}
            for task in parse_tasks(self.tasks)
            for init in inits
            for lr in _numbers(self.learning_rates, float, "--learning-rates")
            for seed in _numbers(self.seeds, int, "--seeds")
        ]


def _numbers(spec: str, kind: type, flag: str) -> list:
    try:
        values = [kind(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{flag} {spec!r}: give comma-separated numbers") from None
    allowed = (lambda v: 0 < v < 1) if kind is float else (lambda v: v >= 0)
    if not values or not all(map(allowed, values)):
        raise UserError(f"{flag} {spec!r}: give comma-separated numbers " + ("in (0, 1)" if kind is float else "≥ 0"))
    return list(dict.fromkeys(values))


class EvaluationJob(NamedTuple):
    config: EvaluateConfig
    model_location: str  # as given (a URI stays one: each node fetches its own copy)
    model_type: str
    data: dict[str, tuple[Encoded, Encoded]]  # task → (train, valid)
    train_rows: dict[str, int]  # task → rows in its train file (before the cap)
    out: Store
    lock: OutputLock


def prepare_evaluation(config: EvaluateConfig) -> EvaluationJob:
    """Every check that needs no Ray: the model and its head classes, the task files (read, checked and encoded
    here, once), the output; one UserError line for each mistake."""
    from transformers import AutoConfig

    tasks = parse_tasks(config.tasks)
    model_dir = check_model_dir(local_copy(config.model_dir))
    model_config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    model_type = model_config.model_type
    for task in tasks:
        _head_class(task, model_type)
    tokenizer = JapaneseTokenizer.from_pretrained(model_dir)
    max_length = min(config.max_length, model_config.max_position_embeddings, tokenizer.model_max_length)
    data_store = Store(resolve_location(config.data_dir))
    data, train_rows = {}, {}
    for task in tasks:
        train = read_split(data_store, task, "train")
        valid = read_split(data_store, task, "valid")
        train_rows[task.name] = len(train)
        train = _sample(train, config.train_limit)
        data[task.name] = tuple(encode_split(rows, task, tokenizer, max_length) for rows in (train, valid))
    inputs = {"model": config.model_dir, "data": config.data_dir}
    out = check_output(config.output_dir, STAGE, inputs=inputs, overwrite=config.overwrite)
    lock = OutputLock(out, STAGE).acquire()
    if config.overwrite:
        clear_output(out, STAGE)
    location = config.model_dir if is_uri(config.model_dir) else str(model_dir.resolve())
    return EvaluationJob(config, location, model_type, data, train_rows, out, lock)


def _sample(rows: list[dict], limit: int) -> list[dict]:
    """`limit` rows drawn at a fixed seed (file order can follow the label), or all of them."""
    if not limit or limit >= len(rows):
        return rows
    keep = np.sort(np.random.default_rng(_SAMPLE_SEED).choice(len(rows), size=limit, replace=False))
    return [rows[i] for i in keep]


def _head_class(task: Task, model_type: str):
    """transformers' head class of `task` for this model type; a model without one is a user error."""
    import transformers
    from transformers.models.auto import modeling_auto

    regression = task.head == "regression"
    names = (modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES if regression
             else modeling_auto.MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES)  # fmt: skip
    auto = transformers.AutoModelForSequenceClassification if regression else transformers.AutoModelForMultipleChoice
    if model_type not in names:
        raise UserError(f"model_type {model_type!r} has no {auto.__name__.removeprefix('AutoModelFor')} head in this "
                        f"transformers, which {task.name} needs")  # fmt: skip
    return auto


def run_evaluation(job: EvaluateConfig | EvaluationJob) -> dict:
    """Run the sweep on the connected Ray cluster; write and return the results."""
    job = prepared(job, EvaluationJob, prepare_evaluation)
    try:
        _check_placeable(job.config)
        started = time.perf_counter()
        trials = _sweep(job)
        results = summarize(job, trials, time.perf_counter() - started)
        job.out.write_json("results.json", results)
        job.out.write_text("results.md", results_table(results))
        return results
    finally:
        job.lock.release()


def _sweep(job: EvaluationJob) -> list[dict]:
    """Every trial's final report; a trial that failed all its retries is a UserError naming Tune's logs."""
    # ---- Ray Tune: one function trial per grid point, each holding its resources ----
    from ray import tune

    config, grid = job.config, job.config.grid()
    settings = {**asdict(config), "model_location": job.model_location, "out": job.out.location}
    trainable = tune.with_resources(
        tune.with_parameters(fine_tune, data=job.data, settings=settings),
        {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial},
    )
    sweep = _sweep_callback(len(grid), config.show_progress)
    storage = tempfile.mkdtemp(prefix="jbert_evaluate_")  # Tune's own trial logs; the results go to OUT
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(grid)},
        run_config=tune.RunConfig(
            name="evaluate",
            storage_path=storage,
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=config.max_retries),
            callbacks=[sweep],
        ),
    )
    try:
        with _tune_settings():
            trials, failed = _collect(tuner.fit(), config.epochs, sweep.retries)
    except BaseException:  # Ctrl-C included: nothing is kept
        shutil.rmtree(storage, ignore_errors=True)
        raise
    if failed:  # the logs stay, for the user to read
        raise UserError(f"{len(failed)} of {len(grid)} trials failed (retried up to {config.max_retries} times; "
                        f"first: {failed[0]}); Tune's logs are in {storage}")  # fmt: skip
    shutil.rmtree(storage, ignore_errors=True)
    return trials


@contextmanager
def _tune_settings() -> Iterator[None]:
    """Tune as a command line tool wants it, for the sweep only: its legacy reporter (at verbose=0 it prints
    nothing; the newer one always prints a banner and result paths), and Ctrl-C raising KeyboardInterrupt (Tune's
    own handler would end the sweep quietly with trials unfinished, which would read as failed trials)."""
    settings = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_SIGINT_HANDLER": "1"}  # read when `fit` starts
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _check_placeable(config: EvaluateConfig) -> None:
    """A trial larger than every node would wait forever: say so before any work."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    if not any(n.get("CPU", 0) >= config.cpus_per_trial and n.get("GPU", 0) >= config.gpus_per_trial for n in nodes):
        largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)))
        raise UserError(f"a trial asks for {config.cpus_per_trial:g} CPUs and {config.gpus_per_trial:g} GPUs; "
                        f"the largest node has {largest.get('CPU', 0):g} and {largest.get('GPU', 0):g}: "
                        "lower --cpus-per-trial or --gpus-per-trial")  # fmt: skip


def _collect(result_grid: ResultGrid, epochs: int, retries: dict[str, int]) -> tuple[list[dict], list[str]]:
    """(each finished trial's point and final metrics, "name: last error line" of each unfinished one)."""
    trials, failed = [], []
    for result in result_grid:
        point, name = result.config["trial"], _trial_name(result.config["trial"])
        if result.error is not None or (result.metrics or {}).get("epoch") != epochs:
            failed.append(f"{name}: {(str(result.error or '').strip().splitlines() or ['no result'])[-1]}")
            continue
        keep = ("first_loss", "train_loss", "seconds", "train_examples", "steps", "node_ip",
                *TASKS[point["task"]].metrics)  # fmt: skip
        trials.append({**point, **{k: result.metrics[k] for k in keep}, "retries": retries.get(name, 0)})
    return trials, failed


def _trial_name(point: dict) -> str:
    return f"{point['task']}-{point['init']}-lr{point['learning_rate']:g}-seed{point['seed']}"


def _sweep_callback(total: int, show_progress: bool):
    """A Tune callback that counts each trial's retries and (with `show_progress`) prints a line per finished or
    retried trial; Tune's own tables are off."""
    from ray import tune

    class SweepCallback(tune.Callback):
        def __init__(self):
            self.done, self.retries = 0, {}

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            point, metrics = trial.config["trial"], trial.last_result
            if show_progress:
                shown = ", ".join(f"{k} {metrics.get(k, float('nan')):.3f}" for k in TASKS[point["task"]].metrics)
                print(f"evaluate: {self.done}/{total} {_trial_name(point)}: {shown} "
                      f"({metrics.get('seconds', 0):.0f} s)", flush=True)  # fmt: skip

        def on_trial_recover(self, iteration, trials, trial, **info):
            name = _trial_name(trial.config["trial"])
            self.retries[name] = self.retries.get(name, 0) + 1
            if show_progress:
                print(f"evaluate: {name} failed; running it again", flush=True)

    return SweepCallback()


# ---- one trial (runs in a Tune worker) ----


def fine_tune(params: dict, data: dict[str, tuple[Encoded, Encoded]], settings: dict) -> None:
    """Fine-tune one (task, init, learning rate, seed); report its losses after each epoch, its dev metrics after
    the last."""
    import torch
    from ray import tune

    from jbert_ray.pretrain.step import autocast_for

    started = time.perf_counter()
    point = params["trial"]
    task = TASKS[point["task"]]
    torch.set_num_threads(max(1, int(settings["cpus_per_trial"])))
    device = torch.device("cuda" if settings["gpus_per_trial"] and torch.cuda.is_available() else "cpu")
    model_dir = local_copy(settings["model_location"])
    model = build_head_model(model_dir, task, point["init"] == FROM_SCRATCH, point["seed"]).to(device)
    train, valid = data[task.name]
    tokenizer = JapaneseTokenizer.from_pretrained(model_dir)
    # BERT takes segment ids (Tohoku's and ours have 2 types); ModernBERT has none
    batches = _Batches(tokenizer.pad_token_id, getattr(model.config, "type_vocab_size", 0) > 1, device)
    steps_per_epoch = math.ceil(len(train) / settings["batch_size"])
    total = steps_per_epoch * settings["epochs"]
    optimizer, schedule = _optimizer(model, point["learning_rate"], settings, total)
    autocast = autocast_for(device)
    rng = np.random.default_rng(point["seed"])
    losses, step = [], 0
    for epoch in range(1, settings["epochs"] + 1):
        model.train()
        for rows in _length_bucketed(train, settings["batch_size"], rng):
            inputs = batches.make(train, rows, task)
            with autocast():
                loss = model(**inputs).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss.item())
        report = {"epoch": epoch, "steps": step, "first_loss": losses[0],
                  "train_loss": float(np.mean(losses[-steps_per_epoch:])), "train_examples": len(train)}  # fmt: skip
        if epoch == settings["epochs"]:  # the dev set is scored once, after the last epoch (the recipe's result)
            report.update(score(task, predict(model, valid, task, batches), valid.labels))
            if settings["save_models"]:
                _save(model, tokenizer, Store(settings["out"]).child(f"models/{_trial_name(point)}"))
        tune.report({**report, "seconds": time.perf_counter() - started})  # Tune adds node_ip, where it ran


def build_head_model(model_dir: str | os.PathLike, task: Task, from_scratch: bool, seed: int) -> PreTrainedModel:
    """The task's transformers head on the model dir's encoder (pretrained), or the same architecture and dims
    from random weights (from_scratch), drawn from `seed`."""
    import torch
    from transformers import AutoConfig
    from transformers.utils import logging

    logging.set_verbosity_error()  # "some weights were not used / newly initialized": expected for a new head
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if task.head == "regression":
        config.num_labels, config.problem_type = 1, "regression"
    auto = _head_class(task, config.model_type)
    torch.manual_seed(seed)
    if from_scratch:
        return auto.from_config(config, attn_implementation="sdpa")
    return auto.from_pretrained(
        model_dir, config=config, local_files_only=True, use_safetensors=True, attn_implementation="sdpa"
    )


class _Batches:
    """Padded tensors of some examples: (B, T) for pairs, (B, choices, T) for multiple choice; BERT also gets
    token_type_ids (0 up to the first [SEP], 1 after), which ModernBERT does not take."""

    def __init__(self, pad_id: int, token_types: bool, device):
        self.pad_id, self.token_types, self.device = pad_id, token_types, device

    def make(self, split: Encoded, rows: Sequence[int], task: Task, with_labels: bool = True) -> dict:
        import torch

        sequences = [pair for i in rows for pair in split.pairs[i]]
        width = max(len(ids) for _, ids in sequences)
        ids = np.full((len(sequences), width), self.pad_id, dtype=np.int64)
        mask, types = np.zeros_like(ids), np.zeros_like(ids)
        for n, (first, seq) in enumerate(sequences):  # the mask from lengths: a "[PAD]" in a text is still read
            ids[n, : len(seq)], mask[n, : len(seq)], types[n, first : len(seq)] = seq, 1, 1
        shape = (len(rows), task.num_choices, width) if task.head == "multiple-choice" else (len(rows), width)
        tensors = {"input_ids": ids, "attention_mask": mask}
        if self.token_types:
            tensors["token_type_ids"] = types
        batch = {k: torch.from_numpy(v.reshape(shape)).to(self.device) for k, v in tensors.items()}
        if with_labels:
            batch["labels"] = torch.from_numpy(split.labels[np.asarray(rows)]).to(self.device)
        return batch


def _length_bucketed(split: Encoded, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of examples of similar length (sorted within pools of 50 batches), in shuffled order:
    padding to the longest in a batch then costs little."""
    order = rng.permutation(len(split))
    pool = batch_size * 50
    batches = []
    for start in range(0, len(order), pool):
        chunk = order[start:start + pool]
        chunk = chunk[np.argsort([split.longest(i) for i in chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def predict(
    model: PreTrainedModel, split: Encoded, task: Task, batches: _Batches, batch_size: int = 64
) -> np.ndarray:
    """The model's outputs on every example, in split order: (N,) scores or (N, choices) logits, in float32."""
    import torch

    model.eval()
    order = np.argsort([split.longest(i) for i in range(len(split))], kind="stable")
    outputs = []
    with torch.no_grad():  # float32: bf16 outputs would tie many JSTS scores (Spearman counts ties)
        for start in range(0, len(split), batch_size):
            logits = model(**batches.make(split, order[start:start + batch_size], task, with_labels=False)).logits
            outputs.append(logits.float().squeeze(-1) if task.head == "regression" else logits.float())
    predictions = torch.cat(outputs).cpu().numpy()
    return predictions[np.argsort(order)]


def _optimizer(model, learning_rate: float, settings: dict, total_steps: int):
    """AdamW (no decay on biases and norms) with linear warmup then linear decay to 0."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n.lower()]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n.lower())]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=learning_rate,
    )
    warmup = max(1, round(settings["warmup_ratio"] * total_steps))

    def factor(step: int) -> float:
        return (step + 1) / warmup if step < warmup else max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _save(model, tokenizer: JapaneseTokenizer, store: Store) -> None:
    with tempfile.TemporaryDirectory() as local:
        model.save_pretrained(local)
        tokenizer.save_pretrained(local)
        store.upload(local)


# ---- results ----


def summarize(job: EvaluationJob, trials: list[dict], seconds: float) -> dict:
    """Per task and initialisation: each learning rate's mean and spread over seeds, and the best of them."""
    config = job.config
    by_task: dict[str, dict] = {}
    for task in parse_tasks(config.tasks):
        by_task[task.name] = {}
        for init in sorted({t["init"] for t in trials if t["task"] == task.name}):
            rows = [t for t in trials if t["task"] == task.name and t["init"] == init]
            by_lr = {}
            for lr in sorted({t["learning_rate"] for t in rows}):
                runs = [t for t in rows if t["learning_rate"] == lr]
                by_lr[f"{lr:g}"] = {m: _spread([t[m] for t in runs]) for m in task.metrics}
            best = max(by_lr, key=lambda lr: by_lr[lr][task.metrics[0]]["mean"])
            by_task[task.name][init] = {"best_learning_rate": float(best), **by_lr[best], "by_learning_rate": by_lr}
    return {
        "model": config.model_dir,
        "model_type": job.model_type,
        "tasks": by_task,
        "train_examples": {name: len(train) for name, (train, _) in job.data.items()},
        "train_rows": job.train_rows,
        "valid_examples": {name: len(valid) for name, (_, valid) in job.data.items()},
        "settings": asdict(config),
        "trials": sorted(trials, key=_trial_name),
        "seconds": seconds,
        "published": PUBLISHED,
    }


def _spread(values: list[float]) -> dict:
    """Mean, the sample standard deviation over seeds (0 for one seed) and the values."""
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std, "values": values}


def results_table(results: dict) -> str:
    """A markdown table: a row per initialisation (the best learning rate's mean ± seed std), then published."""
    tasks = list(results["tasks"])
    columns = [(task, metric) for task in tasks for metric in TASKS[task].metrics]
    header = "| model | " + " | ".join(f"{task} {metric}" for task, metric in columns) + " |"
    lines = [header, "|---" * (len(columns) + 1) + "|"]
    for init in (PRETRAINED, FROM_SCRATCH):
        if not all(init in results["tasks"][task] for task in tasks):
            continue
        cells = []
        for task, metric in columns:
            found = results["tasks"][task][init]
            spread = f"{found[metric]['mean']:.3f} ± {found[metric]['std']:.3f}"
            cells.append(f"{spread} (lr {found['best_learning_rate']:g})")
        lines.append(f"| {init}: {results['model']} | " + " | ".join(cells) + " |")
    for name, scores in results["published"].items():
        lines.append(f"| {name} | " + " | ".join(f"{scores[task][metric]:.3f}" for task, metric in columns) + " |")
    capped = [f"{task} {results['train_examples'][task]:,} of {results['train_rows'][task]:,}" for task in tasks
              if results["train_examples"][task] < results["train_rows"][task]]  # fmt: skip
    picked = ", ".join(f"{TASKS[task].metrics[0]} for {task}" for task in tasks)
    notes = [f"mean ± standard deviation over seeds {results['settings']['seeds']}, at the learning rate with the "
             f"best mean ({picked}); dev sets: " +
             ", ".join(f"{task} {n:,}" for task, n in results["valid_examples"].items()) + " examples"]  # fmt: skip
    if capped:
        notes.append("training examples capped (--max-train-examples): " + ", ".join(capped))
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"
