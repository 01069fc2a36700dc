"""Learning efficiency: what a model learns of Japanese in the same wall-clock budget, ours against the peers.

    python bench/quality.py                         # 20 minutes per run on 2 CPUs (~70 minutes in all)
    python bench/quality.py --minutes 5 --run ours --run "ours-bert:--arch bert"   # levers, one row each

Every run trains the same dims (hidden 256, 4 layers, 4 heads, FFN 1024) with the same tokenizer (a 32,768-entry
WordPiece vocab over MeCab words of ../shared/corpus/ja_train) on the same token stream, on all of this machine's
CPUs, for the same --minutes of training (start-up and export are outside the budget on every side):
  ours           `jbert pretrain --time-budget M --model-config dims.json`, default flags otherwise: Ray Train + the
                 Ray Data masking stream, as users run it (extra flags after "LABEL:" in --run)
  hf-modernbert  the fair peer: transformers' Trainer + ModernBertForMaskedLM with ModernBERT's MLM recipe (30%
                 masking, sparse prediction, dropout 0, AdamW 8e-4 betas 0.9/0.98 wd 1e-5, 6% warmup then linear
                 decay, batch 32, bf16 where the CPU has it), max_steps from a timing run's steady step time
  hf-run_mlm     a second reference: transformers' run_mlm recipe in one process: group_texts into 128-token blocks,
                 DataCollatorForLanguageModeling (15% tokens, 80/10/10), BertForMaskedLM (dropout 0.1), AdamW 5e-4,
                 batch 32, warmup 200 steps, then linear decay laid over the budget (as ours), torch on all CPUs,
                 bf16 autocast where ours uses it by default (as Trainer's --bf16 does on a CPU)
One evaluator for every run: masked-token accuracy and perplexity with 15% *token* masking at a fixed seed over
the same 400 blocks of 128 tokens of ../shared/corpus/ja_valid (split by source file), plus the top-5 fill-mask
answers on FILL_MASK sentences written before any tuning, each with the content words we accept as plausible.
Results are kept per label under --work (a later call prints them again; --rerun replaces them); the table lists
every run given, and loss_vs_tokens.png plots every curve.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jbert_ray.masking import IGNORE_INDEX, MaskingConfig, mask_tokens
from jbert_ray.pretrain.metrics import read_metrics
from jbert_ray.pretrain.step import autocast_for
from jbert_ray.tokenizer import JapaneseTokenizer

sys.path.insert(0, str(REPO / "bench"))
from results import machine, publish

CORPUS = REPO.parent / "shared" / "corpus"
DIMS = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 1024}
SEQ_LEN = 128
EVAL_BLOCKS = 400
EVAL_SEED = 1234
# Written before any tuning (documentation prose, like the corpus); a row counts if any accepted word is in the top 5.
FILL_MASK = [
    ("セルに[MASK]を入力します。", {"値", "数値", "数式", "データ", "文字", "テキスト", "関数", "日付", "文字列", "内容"}),
    ("[MASK]メニューから印刷を選択します。", {"ファイル", "表示", "編集", "書式", "ツール", "挿入", "コンテキスト"}),
    ("このダイアログでフォントの[MASK]を変更できます。", {"サイズ", "色", "種類", "設定", "名前", "スタイル", "大きさ", "属性", "書式"}),
    ("使い方を表示して[MASK]する。", {"終了"}),
    ("出力結果を[MASK]に保存します。", {"ファイル", "標準", "ディレクトリ", "バッファ", "メモリ", "変数"}),
    ("詳細な[MASK]を出力します。", {"報告", "情報", "メッセージ", "ログ", "出力", "結果", "説明", "エラー"}),
    ("パッケージを[MASK]するには、次のコマンドを実行します。", {"インストール", "削除", "更新", "アップグレード", "作成", "設定", "構築", "ビルド", "導入"}),
    ("環境[MASK]を設定してください。", {"変数", "設定"}),
    ("画像の[MASK]を変更します。", {"サイズ", "色", "大きさ", "解像度", "名前", "形式", "モード", "レイヤー", "幅", "高さ"}),
    ("ファイルを[MASK]モードで開きます。", {"読み込み", "書き込み", "読み取り", "追加", "テキスト", "バイナリ", "編集", "読み出し"}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget per run")
    parser.add_argument("--work", default="/tmp/jbert_quality", help="tokenizer, shards, runs and results")
    parser.add_argument(
        "--run", action="append", metavar="LABEL[:FLAGS]",
        help='"hf-modernbert", "hf-run_mlm", or a label for `jbert pretrain` with extra flags (default: all three)',
    )
    parser.add_argument("--rerun", action="store_true", help="train again even if a result is kept")
    parser.add_argument("--note", action="append", default=[], help="a sentence printed under the table")
    parser.add_argument("--table", help="name of the results file (default: quality, or quality-Mmin-levers)")
    parser.add_argument("--title", help="the table's title (default: from the runs)")
    args = parser.parse_args()
    work = Path(args.work)
    runs = args.run or ["ours", "hf-modernbert", "hf-run_mlm"]
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (an idle machine reads ~0); "
          f"budget {args.minutes:g} min per run; dims {DIMS}", flush=True)
    results = trained_runs(work, runs, args.minutes, args.rerun)
    if args.run:
        name, title = f"quality-{args.minutes:g}min-levers", f"Learning: levers, {args.minutes:g} minutes each"
    else:
        name, title = "quality", f"Learning efficiency: {args.minutes:g} minutes of training, ours vs HF ModernBERT and run_mlm"
    publish_table(results, args.table or name, args.title or title, args.note)
    plot(results, work / "loss_vs_tokens.png")


def trained_runs(work: Path, runs: list[str], minutes: float, rerun: bool = False) -> list[dict]:
    """Each run's result (its model dir, curve and evaluation), kept under `work` from an earlier call unless
    `rerun`; bench/downstream.py fine-tunes the same models."""
    tokenizer_dir, shards_dir = prepare_data(work)
    evaluator = Evaluator(tokenizer_dir)
    results = []
    for spec in runs:
        label, _, flags = spec.partition(":")
        path = work / "results" / f"{label}_{minutes:g}min.json"
        if path.exists() and not rerun:
            result = json.loads(path.read_text())
        else:
            trained = train(work, label, flags, shards_dir, tokenizer_dir, minutes)
            result = {"label": label, "flags": flags, "minutes": minutes, **trained,
                      **evaluator.evaluate(trained["model_dir"]), "date": machine()["date"]}  # fmt: skip
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, ensure_ascii=False, indent=1))
        results.append(result)
        print(f"[{label}] valid acc {result['accuracy']:.1%}, ppl {result['perplexity']:.1f}, "
              f"{result['plausible']}/{len(FILL_MASK)} fill-mask rows plausible", flush=True)
    return results


def train(work: Path, label: str, flags: str, shards_dir: Path, tokenizer_dir: Path, minutes: float) -> dict:
    """One run: a peer by its label, else `jbert pretrain` with the flags."""
    if label == "hf-modernbert":
        return train_hf_modernbert(work, shards_dir, tokenizer_dir, minutes)
    if label == "hf-run_mlm":
        return train_hf_run_mlm(work, shards_dir, tokenizer_dir, minutes)
    return train_ours(work, label, shards_dir, minutes, shlex.split(flags))


def prepare_data(work: Path) -> tuple[Path, Path]:
    """The tokenizer and shards both sides train on, built once with our CLI (cached under --work)."""
    tokenizer_dir, shards_dir = work / "tokenizer", work / "shards"
    train = str(CORPUS / "ja_train.jsonl.gz")
    if not (tokenizer_dir / "vocab.txt").exists():
        _jbert("vocab", "--input", train, "--out", str(tokenizer_dir), "--vocab-size", "32768", "--overwrite")
    if not (shards_dir / "manifest.json").exists():
        _jbert("preprocess", "--input", train, "--tokenizer", str(tokenizer_dir), "--out", str(shards_dir),
               "--max-seq-len", str(SEQ_LEN), "--pack-across-docs", "--valid-fraction", "0.01", "--overwrite")
    return tokenizer_dir, shards_dir


def train_ours(work: Path, label: str, shards_dir: Path, minutes: float, flags: list[str]) -> dict:
    """`jbert pretrain` as a user runs it; the dims come from a ModelConfig JSON unless the flags give one."""
    run_dir = work / "runs" / label
    dims = work / "dims.json"
    dims.write_text(json.dumps(DIMS))
    command = ["pretrain", "--data", str(shards_dir), "--out", str(run_dir), "--time-budget", f"{minutes:g}"]
    if "--model-config" not in flags:
        command += ["--model-config", str(dims)]
    if run_dir.exists():
        shutil.rmtree(run_dir)
    started = time.perf_counter()
    _jbert(*command, *flags)
    wall = time.perf_counter() - started
    rows = read_metrics(run_dir / "metrics.csv")
    curve = [(r["tokens"], r["loss"]) for r in rows if r.get("tokens") and r.get("loss")]
    return {"model_dir": str(run_dir / "model"), "steps": int(rows[-1]["step"]), "tokens": rows[-1]["tokens"],
            "train_s": rows[-1]["elapsed_s"], "wall_s": wall, "curve": curve}


def train_hf_run_mlm(work: Path, shards_dir: Path, tokenizer_dir: Path, minutes: float) -> dict:
    """transformers' run_mlm recipe on the same token stream, for the same training time, all CPU threads."""
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        BertJapaneseTokenizer,
        DataCollatorForLanguageModeling,
    )

    from jbert_ray.checkpoint import save_model_dir

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    hf_tokenizer = BertJapaneseTokenizer.from_pretrained(tokenizer_dir)
    blocks = grouped_blocks(sorted((shards_dir / "train").glob("**/*.parquet")))
    np.random.default_rng(0).shuffle(blocks)
    config = BertConfig(vocab_size=hf_tokenizer.vocab_size, hidden_size=DIMS["hidden_size"],
                        num_hidden_layers=DIMS["num_layers"], num_attention_heads=DIMS["num_heads"],
                        intermediate_size=DIMS["intermediate_size"], pad_token_id=hf_tokenizer.pad_token_id)
    model = BertForMaskedLM(config).train()
    autocast = autocast_for(torch.device("cpu"))  # the precision ours picks on this CPU
    collator = DataCollatorForLanguageModeling(hf_tokenizer, mlm_probability=0.15)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.0)
    budget = 60 * minutes
    # run_mlm's linear schedule needs a step count; we lay its decay over the budget, as ours does.
    warmup, curve, step, tokens, losses = 200, [], 0, 0, []
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < budget:
        lr = 5e-4 * min((step + 1) / warmup, 1 - elapsed / budget)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = blocks[(step * 32) % len(blocks):][:32]
        batch = collator([{"input_ids": row.tolist()} for row in rows])
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step, tokens = step + 1, tokens + rows.size
        losses.append(loss.item())
        if step % 10 == 0:
            curve.append((tokens, float(np.mean(losses))))
            losses = []
    model_dir = work / "runs" / "hf-run_mlm" / "model"
    save_model_dir(model_dir, model, JapaneseTokenizer.from_pretrained(tokenizer_dir))
    return {"model_dir": str(model_dir), "steps": step, "tokens": tokens, "train_s": time.perf_counter() - started,
            "wall_s": time.perf_counter() - started, "curve": curve}


def train_hf_modernbert(work: Path, shards_dir: Path, tokenizer_dir: Path, minutes: float) -> dict:
    """The peer a competent user picks: transformers' Trainer + ModernBertForMaskedLM, set up as ModernBERT's paper
    and model docs recommend for MLM (30% masking, sparse prediction, no dropout, AdamW lr 8e-4 betas 0.9/0.98
    wd 1e-5, 6% warmup then linear decay), batch 32, bf16 where the CPU has it natively, all CPU threads.

    Trainer's schedule needs `max_steps`: a timing run measures the steady step time after the first steps (the
    first are slow, and a plan drawn from them ends the schedule minutes early), and a callback stops at the budget
    if the plan was still too long. The timing run is outside the budget, as our start-up is."""
    from transformers import (
        BertJapaneseTokenizer,
        DataCollatorForLanguageModeling,
        ModernBertConfig,
        ModernBertForMaskedLM,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers.utils import logging as hf_logging

    from jbert_ray.checkpoint import save_model_dir
    from jbert_ray.pretrain.step import has_native_bf16

    hf_logging.set_verbosity_error()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    hf_tokenizer = BertJapaneseTokenizer.from_pretrained(tokenizer_dir)
    blocks = grouped_blocks(sorted((shards_dir / "train").glob("**/*.parquet")))
    np.random.default_rng(0).shuffle(blocks)
    dataset = [{"input_ids": row.tolist()} for row in blocks]
    ids = {name: getattr(hf_tokenizer, f"{name}_token_id") for name in ("pad", "cls", "sep")}
    config = ModernBertConfig(
        vocab_size=hf_tokenizer.vocab_size, hidden_size=DIMS["hidden_size"], num_hidden_layers=DIMS["num_layers"],
        num_attention_heads=DIMS["num_heads"], intermediate_size=DIMS["intermediate_size"],
        pad_token_id=ids["pad"], bos_token_id=ids["cls"], eos_token_id=ids["sep"], cls_token_id=ids["cls"],
        sep_token_id=ids["sep"], sparse_prediction=True,
        embedding_dropout=0.0, mlp_dropout=0.0, attention_dropout=0.0,
    )
    collator = DataCollatorForLanguageModeling(hf_tokenizer, mlm_probability=0.3)
    output_dir = work / "runs" / "hf-modernbert"
    budget = 60 * minutes

    class Clock(TrainerCallback):
        def __init__(self, stop_after_s: float | None = None, time_from_step: int = 10):
            self.stop_after_s, self.time_from_step, self.start, self.times = stop_after_s, time_from_step, None, []

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())
            if self.stop_after_s and self.times[-1] - self.start >= self.stop_after_s:
                control.should_training_stop = True

        def steady_step_s(self) -> float:
            steady = self.times[self.time_from_step:]
            return (steady[-1] - steady[0]) / (len(steady) - 1)

    def trainer(max_steps: int, callback: Clock) -> Trainer:
        torch.manual_seed(0)
        arguments = TrainingArguments(
            output_dir=str(output_dir / "trainer"), max_steps=max_steps, per_device_train_batch_size=32,
            learning_rate=8e-4, adam_beta1=0.9, adam_beta2=0.98, adam_epsilon=1e-6, weight_decay=1e-5,
            warmup_steps=0.06, lr_scheduler_type="linear", max_grad_norm=1.0, bf16=has_native_bf16(torch.device("cpu")),
            use_cpu=True, logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
            dataloader_num_workers=0,
        )  # fmt: skip
        run = Trainer(model=ModernBertForMaskedLM(config), args=arguments, train_dataset=dataset,
                      data_collator=collator, callbacks=[callback])  # fmt: skip
        run.remove_callback(PrinterCallback)  # a dict printed every 10 steps; the log history keeps them
        return run

    probe = Clock()
    trainer(40, probe).train()
    max_steps = int(budget / probe.steady_step_s())
    clock = Clock(stop_after_s=budget)
    run = trainer(max_steps, clock)
    run.train()
    train_s = clock.times[-1] - clock.start
    steps = len(clock.times)
    model_dir = output_dir / "model"
    save_model_dir(model_dir, run.model, JapaneseTokenizer.from_pretrained(tokenizer_dir))
    curve = [(entry["step"] * 32 * SEQ_LEN, entry["loss"]) for entry in run.state.log_history if "loss" in entry]
    return {"model_dir": str(model_dir), "steps": steps, "tokens": steps * 32 * SEQ_LEN, "train_s": train_s,
            "wall_s": train_s, "planned_steps": max_steps, "curve": curve}


def grouped_blocks(train_files: list[Path]) -> np.ndarray:
    """run_mlm's group_texts: every training token in order, cut into SEQ_LEN-token blocks."""
    import pyarrow.parquet as pq

    ids = np.concatenate([np.concatenate(pq.read_table(f, columns=["input_ids"])["input_ids"].to_numpy(False))
                          for f in train_files])  # fmt: skip
    return ids[: len(ids) // SEQ_LEN * SEQ_LEN].reshape(-1, SEQ_LEN)


class Evaluator:
    """The same masked blocks and fill-mask sentences for every model dir."""

    def __init__(self, tokenizer_dir: Path):
        import gzip

        tokenizer = JapaneseTokenizer.from_pretrained(tokenizer_dir)
        with gzip.open(CORPUS / "ja_valid.jsonl.gz", "rt", encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        content = np.concatenate([e.ids[1:-1] for e in tokenizer.encode_batch(texts)])
        width = SEQ_LEN - 2
        blocks = content[: len(content) // width * width].reshape(-1, width)
        blocks = blocks[np.linspace(0, len(blocks) - 1, EVAL_BLOCKS).astype(int)]  # spread over the valid set
        ids = np.concatenate([np.full((EVAL_BLOCKS, 1), tokenizer.cls_token_id), blocks,
                              np.full((EVAL_BLOCKS, 1), tokenizer.sep_token_id)], axis=1)
        self.input_ids, self.labels = mask_tokens(
            ids, np.ones_like(ids, dtype=bool), vocab_size=tokenizer.vocab_size,
            special_ids=sorted(tokenizer.special_ids), mask_id=tokenizer.mask_token_id,
            config=MaskingConfig(mask_prob=0.15, whole_word=False), rng=np.random.default_rng(EVAL_SEED),
        )

    def evaluate(self, model_dir: str) -> dict:
        from transformers import AutoModelForMaskedLM

        from jbert_ray.inference import MaskedLM

        model = AutoModelForMaskedLM.from_pretrained(model_dir, local_files_only=True).eval()
        loss_sum, correct, count = 0.0, 0, 0
        with torch.inference_mode():
            for start in range(0, EVAL_BLOCKS, 50):
                ids = torch.from_numpy(self.input_ids[start:start + 50]).long()
                labels = torch.from_numpy(self.labels[start:start + 50])
                logits = model(input_ids=ids).logits
                picked = labels != IGNORE_INDEX
                loss_sum += torch.nn.functional.cross_entropy(logits[picked], labels[picked], reduction="sum").item()
                correct += (logits[picked].argmax(-1) == labels[picked]).sum().item()
                count += int(picked.sum())
        answers = MaskedLM.from_pretrained(model_dir, device="cpu").fill_mask([t for t, _ in FILL_MASK], top_k=5)
        top5 = [[c["token"] for c in masks[0]] for masks in answers]
        plausible = sum(bool(set(words) & accepted) for words, (_, accepted) in zip(top5, FILL_MASK))
        return {"accuracy": correct / count, "perplexity": math.exp(loss_sum / count), "masked_tokens": count,
                "fill_mask": top5, "plausible": plausible}


def publish_table(results: list[dict], name: str, title: str, notes: list[str]) -> None:
    rows = [[r["label"], f"`{r['flags'] or '(defaults)'}`", f"{r['minutes']:g} min", f"{r['steps']:,}",
             f"{r['tokens'] / 1e6:.2f} M", f"{r['accuracy']:.1%}", f"{r['perplexity']:.1f}",
             f"{r['plausible']}/{len(FILL_MASK)}", r.get("date", "")] for r in results]  # fmt: skip
    answers = [f"`{text}`: " + "; ".join(f"{r['label']} {' / '.join(r['fill_mask'][i])}" for r in results)
               for i, (text, _) in enumerate(FILL_MASK)]  # fmt: skip
    publish(name, title,
            ["run", "flags", "budget", "steps", "tokens", "valid masked-token acc", "valid ppl",
             "fill-mask rows plausible", "trained on"], rows,
            [*notes, "Top-5 fill-mask answers: " + " — ".join(answers)])  # fmt: skip


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        if r["curve"]:
            tokens, loss = zip(*r["curve"])
            ax.plot(np.array(tokens) / 1e6, loss, label=f"{r['label']} (valid acc {r['accuracy']:.1%})")
    ax.set_xlabel("tokens trained on (millions)")
    ax.set_ylabel("train masked-LM loss")
    ax.set_title("loss vs tokens, 2 CPUs, same budget")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"\nplot: {path}")


def _jbert(*args: str, log: Path = Path("/tmp/jbert_quality.log")) -> None:
    """Run a `jbert` command of this environment; its stderr (Ray's logs) goes to `log`."""
    command = [str(Path(sys.executable).with_name("jbert")), *args, "--no-progress"]
    print("$ jbert " + " ".join(args), flush=True)
    with open(log, "a", encoding="utf-8") as stderr:
        result = subprocess.run(command, stdout=sys.stdout, stderr=stderr, check=False)
    if result.returncode:
        sys.exit(f"jbert {args[0]} failed (exit {result.returncode}); see {log}")


if __name__ == "__main__":
    main()
