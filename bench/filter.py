"""Is our scorer a good corpus filter? (issue 25, item 5.) Bad sentences of one kind at a time are planted among clean
ja_valid sentences; per kind: ROC AUC (bad rows should score lower) and precision in the bottom 10% for exact PLL,
the fast methods and KenLM 5-gram perplexity on MeCab words (CCNet's filter, what users pick instead), plus
minimal-pair agreement: one particle changed in a corpus sentence, the share of pairs where the original scores higher.

Our scores come from the product path, `jbert score --method M` on a trained model (pll_per_token of its parquet
parts); the model is bench/score_methods.py's (a mini ModernBERT, trained once and cached under --model-work).

KenLM is a bench-only dependency, kept out of .venv (constraints.txt mirrors it) and out of the repo. PyPI's `kenlm`
ships only a source archive whose module queries models; lmplz and build_binary are built from that same archive:

    python3 -m venv /tmp/benchenv
    /tmp/benchenv/bin/pip download --no-deps --no-binary kenlm kenlm -d /tmp/kenlm   # kenlm-0.3.0.tar.gz
    /tmp/benchenv/bin/pip install /tmp/kenlm/kenlm-*.tar.gz                          # the query module
    apt-get install -y cmake libboost-program-options-dev libboost-system-dev libboost-thread-dev \
        libboost-test-dev zlib1g-dev libbz2-dev liblzma-dev
    tar xzf /tmp/kenlm/kenlm-*.tar.gz -C /tmp/kenlm
    cmake -S /tmp/kenlm/kenlm-0.3.0 -B /tmp/kenlm/build -DCMAKE_BUILD_TYPE=Release
    make -C /tmp/kenlm/build -j2 lmplz build_binary                                 # ~6 min on 2 busy CPUs

    .venv/bin/python bench/filter.py     # ~10 min on 2 idle CPUs (+ ~20 min to train the model if not cached)
    .venv/bin/python bench/filter.py --model DIR --kenlm-bin BIN --kenlm-python PY
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from results import machine, publish  # bench/ is the script's folder, first on sys.path
from score_methods import ranks, spearman, train_model

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"
JBERT = Path(sys.executable).parent / "jbert"  # the console script of the venv running this bench
SEED = 25
NUM_CLEAN, NUM_DONORS = 900, 100  # clean rows; sentences corrupted once per word-level kind (10% of each mix)
NUM_PAIRS = 400  # minimal pairs
BOTTOM_SHARE = 0.10  # what a percentile filter at 10 removes; each mix is 10% bad, so precision = recall here
PARTICLES = ("が", "を", "に", "で", "は")
MIN_WORDS, MAX_WORDS = 8, 60  # sentences kept from ja_valid, in MeCab words
KENLM_QUERY = (  # runs in the bench venv: one sentence of space-separated words per line → log10 P, <s> … </s>
    "import sys, kenlm\nm = kenlm.Model(sys.argv[1])\n"
    "for line in sys.stdin:\n    print(m.score(line.rstrip('\\n'), bos=True, eos=True))\n"
)

# Another language, written for this bench in the corpus's own domain (software documentation), so topic gives
# nothing away: English, which our scorer scores like any text (only `jbert preprocess` drops text without kana or
# kanji), and Chinese, whose hanzi pass any "has kanji" rule. The two lists say the same things.
ENGLISH = """Print a short help message and exit. The configuration file is read at startup.
This option disables all warnings. Use this command to list the installed packages.
The output is written to standard output by default. If the file does not exist, it is created.
Run the program with root privileges. The default value is zero. Each line of the input is treated as a record.
Press the space bar to continue. The server listens on port eighty. Changes take effect after a restart.
Backups are stored in the home directory. This feature is experimental and may change.
Please report bugs to the maintainer. The manual page describes every option in detail.
Select a keyboard layout from the list. The network interface could not be found.
Temporary files are removed when the program exits. Passwords are never shown on the screen.
The archive contains the source code and the documentation. You can stop the service at any time.
Lines that begin with a hash sign are comments. The cache is cleared every night.
An error message is printed if the disk is full. Enter the name of the new user.
The kernel module is loaded automatically. Use the arrow keys to move the cursor.
The log file grows until it is rotated. Only the first ten lines are shown.
This package provides a graphical front end. The time zone is set during installation.
A mirror close to you will be faster. Files are compared line by line. The script stops at the first error.
Security updates are installed every day. The printer is shared with the whole office.
Hidden files start with a dot. The command returns zero on success. Messages are sent to the system log.
The window can be resized with the mouse. Fonts for many languages are available.
The disk is divided into several partitions. A new version of this program is available.
Old kernels are not removed automatically. The mail server rejected the message.
This directory holds the shared libraries. Each user has a private home directory.
The clock is synchronized over the network. Do not edit this file by hand.
The screen is locked after five minutes. Large files are split into smaller parts.
The test suite takes a few minutes to run. Spaces in file names must be quoted.
The installer asks a few simple questions. A link to the original file is created.
The program reads its input from a pipe. Debugging output is turned off by default.
Every change is recorded in the history. The default editor can be changed later."""
CHINESE = """显示简短的帮助信息并退出。配置文件在启动时读取。此选项会关闭所有警告。使用这个命令列出已安装的软件包。
默认情况下输出写到标准输出。如果文件不存在，就会创建它。请以管理员权限运行该程序。默认值为零。输入的每一行都被当作一条记录。
按空格键继续。服务器在八十端口上监听。更改在重新启动后生效。备份保存在用户的主目录中。这个功能还在试验阶段，以后可能会改变。
请把错误报告发给维护者。手册页详细说明了每个选项。请从列表中选择键盘布局。找不到网络接口。程序退出时会删除临时文件。
密码不会显示在屏幕上。这个压缩包包含源代码和文档。你可以随时停止这个服务。以井号开头的行是注释。缓存每天晚上清空一次。
如果磁盘已满，会打印一条错误信息。请输入新用户的名字。内核模块会自动加载。用方向键移动光标。日志文件会一直变大，直到被轮换。
只显示前十行。这个软件包提供图形界面。时区在安装过程中设置。离你近的镜像会更快。文件逐行进行比较。脚本在遇到第一个错误时停止。
安全更新每天都会安装。这台打印机由整个办公室共用。隐藏文件以点开头。命令成功时返回零。消息被发送到系统日志。
可以用鼠标调整窗口大小。提供多种语言的字体。磁盘被分成几个分区。这个程序有新版本可用。旧的内核不会被自动删除。
邮件服务器拒绝了这封邮件。这个目录存放共享库。每个用户都有自己的主目录。时钟通过网络同步。不要手动编辑这个文件。
五分钟后屏幕会被锁定。大文件会被分成较小的部分。运行测试需要几分钟。文件名中的空格必须加引号。安装程序会问几个简单的问题。
会创建一个指向原文件的链接。程序从管道读取输入。调试输出默认是关闭的。每次更改都会记录在历史中。默认编辑器以后可以更改。"""
# Characters of other scripts for injection: Hangul, Cyrillic, Greek, Thai, Devanagari, Arabic letters.
OTHER_SCRIPTS = "한국어문서입력Жизнькодфайлβγδλμπσωกขคงจฉคนमनसहकलاتبيرس"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a trained model dir; default: bench/score_methods.py's")
    parser.add_argument("--model-work", type=Path, default=REPO / "runs" / "score_methods",
                        help="where bench/score_methods.py trains and caches its model")  # fmt: skip
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "filter", help="texts, scores, KenLM models")
    parser.add_argument("--corpus-dir", type=Path, default=CORPUS)
    parser.add_argument("--kenlm-bin", type=Path, default=Path("/tmp/kenlm/build/bin"), help="lmplz, build_binary")
    parser.add_argument("--kenlm-python", type=Path, default=Path("/tmp/benchenv/bin/python"),
                        help="a Python with PyPI's kenlm module (the bench venv)")  # fmt: skip
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    check_kenlm(args.kenlm_bin, args.kenlm_python)
    at_start, started = machine(), time.perf_counter()
    model_dir = args.model or train_model(args.model_work, args.corpus_dir / "ja_train.jsonl.gz")
    args.work.mkdir(parents=True, exist_ok=True)
    bench = build_texts(args.corpus_dir / "ja_valid.jsonl.gz")
    texts = bench["texts"]
    print(f"{len(texts):,} texts to score: {NUM_CLEAN} clean, {NUM_DONORS} originals, {len(bench['kinds'])} kinds, "
          f"{len(bench['pairs'])} minimal pairs", flush=True)  # fmt: skip
    scores, timings, unk_rates = {}, {}, None
    for method in our_methods():
        start = time.perf_counter()
        scores[method], unk, via = score_ours(method, model_dir, texts, args.work / f"scores-{method}")
        timings[method] = (time.perf_counter() - start, via)
        unk_rates = unk if unk_rates is None else unk_rates
        print(f"  {method}: {timings[method][0]:.0f} s ({via})", flush=True)
    train_words = kenlm_training_words(args.corpus_dir / "ja_train.jsonl.gz", args.work)
    for name, every in (("KenLM", 1), ("KenLM, model's records", 4)):
        start = time.perf_counter()
        lm_path = train_kenlm(train_words, every, args.work, args.kenlm_bin)
        trained = time.perf_counter()
        scores[name] = score_kenlm(lm_path, texts, args.kenlm_python)
        timings[name] = (time.perf_counter() - trained, f"MeCab + query; lmplz + build_binary {trained - start:.0f} s")
        print(f"  {name}: {timings[name][0]:.0f} s ({timings[name][1]})", flush=True)
    rows, losses = table(bench, scores)
    publish("filter", title(model_dir), columns(scores), rows,
            notes(bench, scores, unk_rates, timings, losses, model_dir, time.perf_counter() - started),
            at_start)  # fmt: skip


# ---- planted kinds: each a pure function of a MeCab-tagged sentence and a seeded generator ----


def shuffled(words: list, rng: np.random.Generator) -> str:
    """Word order shuffled: the MeCab words in a random order, the final 。 kept last (the characters stay)."""
    body, end = (words[:-1], words[-1:]) if words[-1].surface in "。．！？" else (words, [])
    for _ in range(20):  # a permutation can give the sentence back (repeated words)
        text = join([body[i] for i in rng.permutation(len(body))] + end)
        if text != join(words):
            break
    return text


def particles_swapped(words: list, rng: np.random.Generator) -> str:
    """Each case/topic particle が/を/に/で/は (MeCab's 助詞) swapped for another of the five with p=1/2, at least one."""
    slots = particle_slots(words)
    chosen = [i for i in slots if rng.random() < 0.5] or [slots[rng.integers(len(slots))]]
    return replace_particles(words, chosen, rng)


def mojibake(text: str, rng: np.random.Generator) -> str:
    """UTF-8 read as Shift_JIS (cp932), the classic Japanese mojibake, over the middle half of the sentence."""
    start = len(text) // 4 + int(rng.integers(-2, 3))
    span = text[max(start, 0) : max(start, 0) + max(len(text) // 2, 4)]
    return text.replace(span, span.encode("utf-8").decode("cp932", errors="replace"), 1)


def script_injected(text: str, rng: np.random.Generator) -> str:
    """One character of another script (Hangul, Cyrillic, Greek, Thai, Devanagari, Arabic) per 8, at random places."""
    chars = list(text)
    for _ in range(max(2, len(text) // 8)):
        chars.insert(int(rng.integers(len(chars) + 1)), OTHER_SCRIPTS[rng.integers(len(OTHER_SCRIPTS))])
    return "".join(chars)


def truncated(words: list, rng: np.random.Generator) -> str:
    """Cut inside a word of ≥ 2 characters in the second half of the sentence (an extraction cut off mid-word)."""
    cuts = truncation_words(words)
    i = cuts[rng.integers(len(cuts))]
    surface = words[i].surface
    return (join(words[:i]) + words[i].white_space + surface[: rng.integers(1, len(surface))]).strip()


def repeated(words: list, rng: np.random.Generator) -> str:
    """A phrase of 2-4 words said three times in a row (a scraper's or a generator's stutter)."""
    size = int(rng.integers(2, 5))
    start = int(rng.integers(0, len(words) - size))
    phrase = words[start : start + size]
    return join(words[:start] + phrase * 3 + words[start + size :])


WORD_KINDS = {"word order shuffled": shuffled, "particles swapped": particles_swapped, "truncated mid-word": truncated,
              "phrase repeated": repeated}  # fmt: skip
CHAR_KINDS = {"mojibake (UTF-8 as cp932)": mojibake, "other scripts injected": script_injected}
LANGUAGE_KINDS = {"English sentences": ENGLISH, "Chinese sentences": CHINESE}


def minimal_pair(words: list, rng: np.random.Generator) -> str:
    """One particle of the five changed into another: the original should score higher."""
    slots = particle_slots(words)
    return replace_particles(words, [slots[rng.integers(len(slots))]], rng)


def replace_particles(words: list, indices: list[int], rng: np.random.Generator) -> str:
    out = [(w.white_space, w.surface) for w in words]
    for i in indices:
        others = [p for p in PARTICLES if p != words[i].surface]
        out[i] = (words[i].white_space, others[rng.integers(len(others))])
    return "".join(space + surface for space, surface in out).strip()


def particle_slots(words: list) -> list[int]:
    return [i for i, w in enumerate(words) if w.surface in PARTICLES and w.feature.pos1 == "助詞"]


def truncation_words(words: list) -> list[int]:
    return [i for i, w in enumerate(words) if i >= len(words) // 2 and len(w.surface) >= 2 and w.surface.isalnum()]


def join(words: list) -> str:
    """Words back into text, each with the whitespace MeCab saw before it (so `FILE に` keeps its space)."""
    return "".join(w.white_space + w.surface for w in words).strip()


# ---- the texts ----


def build_texts(valid_path: Path) -> dict:
    """Clean sentences, planted bad ones per kind, minimal pairs: ids, texts, and which ids form each mix."""
    rng = np.random.default_rng(SEED)
    tagger = pos_tagger()
    sentences = valid_sentences(valid_path, tagger)
    order = rng.permutation(len(sentences))
    if len(order) < NUM_CLEAN + NUM_DONORS:
        raise SystemExit(f"filter: only {len(order)} usable sentences in {valid_path}")
    clean = [sentences[i] for i in order[:NUM_CLEAN]]
    donors = [sentences[i] for i in order[NUM_CLEAN : NUM_CLEAN + NUM_DONORS]]
    texts = {f"clean-{i:04d}": text for i, (text, _) in enumerate(clean)}
    texts |= {f"donor-{i:04d}": text for i, (text, _) in enumerate(donors)}  # scored too: bad vs its own original
    kinds = {}
    for k, (kind, corrupt) in enumerate({**WORD_KINDS, **CHAR_KINDS}.items()):
        kind_rng = np.random.default_rng([SEED, k])
        for i, (text, words) in enumerate(donors):
            texts[f"k{k}-{i:04d}"] = corrupt(words if kind in WORD_KINDS else text, kind_rng)
        kinds[kind] = [f"k{k}-{i:04d}" for i in range(len(donors))]
    for k, (kind, block) in enumerate(LANGUAGE_KINDS.items(), start=len(kinds)):
        lines = re.findall(r"[^.。]+[.。]", block.replace("\n", " "))
        texts |= {f"k{k}-{i:04d}": line.strip() for i, line in enumerate(lines)}
        kinds[kind] = [f"k{k}-{i:04d}" for i in range(len(lines))]
    pair_rng = np.random.default_rng([SEED, 99])
    pairs = []
    for i, (_, words) in enumerate(clean[:NUM_PAIRS]):
        texts[f"pair-{i:04d}"] = minimal_pair(words, pair_rng)
        pairs.append((f"clean-{i:04d}", f"pair-{i:04d}"))
    mixes = {}  # kind → the clean ids it is mixed with: 9 clean rows per bad one
    for k, (kind, bad) in enumerate(kinds.items()):
        pick = np.random.default_rng([SEED, k, 1]).choice(NUM_CLEAN, min(9 * len(bad), NUM_CLEAN), replace=False)
        mixes[kind] = [f"clean-{i:04d}" for i in sorted(pick)]
    return {"texts": texts, "kinds": kinds, "mixes": mixes, "pairs": pairs, "num_sentences": len(sentences),
            "num_word_kinds": len(WORD_KINDS) + len(CHAR_KINDS)}  # fmt: skip


def valid_sentences(valid_path: Path, tagger) -> list[tuple[str, list]]:
    """ja_valid's sentences (split as preprocess splits), cleaned as the scorer cleans, deduplicated, that every kind
    can corrupt: 8-60 MeCab words, a particle to swap, a word to cut in the second half."""
    from jbert_ray.inference import MaskedLM
    from jbert_ray.text import split_sentences

    seen, out = set(), []
    with gzip.open(valid_path, "rt", encoding="utf-8") as f:
        for line in f:
            text, reason = MaskedLM.clean(json.loads(line)["text"])
            for sentence in split_sentences(text) if not reason else []:
                words = list(tagger(sentence))
                if sentence in seen or not MIN_WORDS <= len(words) <= MAX_WORDS:
                    continue
                if particle_slots(words) and truncation_words(words):
                    seen.add(sentence)
                    out.append((sentence, words))
    return out


def pos_tagger():
    """fugashi's UniDic tagger on unidic-lite, the dictionary our tokenizer splits words with (POS for particles)."""
    import fugashi
    import unidic_lite

    return fugashi.Tagger(f'-d "{unidic_lite.DICDIR}" -r "{os.path.join(unidic_lite.DICDIR, "mecabrc")}"')


# ---- scoring: ours through `jbert score`, KenLM through its own binaries and module ----


def score_ours(method: str, model_dir: Path, texts: dict[str, str], out: Path) -> tuple[dict, dict, str]:
    """(id → pll_per_token, id → unk_rate, how it ran) of `jbert score --method` over every text."""
    import pyarrow.parquet as pq

    if method not in cli_methods():
        return score_direct(method, model_dir, texts)
    out.parent.mkdir(parents=True, exist_ok=True)
    corpus = out.parent / "texts.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in texts.items()),
                      encoding="utf-8")  # fmt: skip
    command = [JBERT, "score", "--input", corpus, "--model", model_dir, "--out", out, "--method", method,
               "--id-field", "id", "--overwrite", "--no-progress"]  # fmt: skip
    subprocess.run(list(map(str, command)), check=True, cwd=REPO)
    table = pq.read_table(sorted(out.glob("parts/*.parquet")), columns=["id", "pll_per_token", "unk_rate", "error"])
    rows = table.to_pylist()
    bad = [r for r in rows if r["error"]]
    if bad:
        raise SystemExit(f"filter: {len(bad)} rows came back as errors, e.g. {bad[0]}")
    return ({r["id"]: r["pll_per_token"] for r in rows}, {r["id"]: r["unk_rate"] for r in rows},
            f"`jbert score --method {method}`, 2 actors")  # fmt: skip


def our_methods() -> list[str]:
    """Exact PLL, pll-word-l2r and the fast pll-strided where this checkout has it (CLI or `MaskedLM.score`)."""
    from jbert_ray.inference import PLL_METHODS

    offered = cli_methods()
    return [m for m in ("pll", "pll-word-l2r", "pll-strided") if m in offered or m in PLL_METHODS]


def cli_methods() -> list[str]:
    """The --method choices `jbert score --help` offers today (another session is adding pll-strided to them)."""
    usage = subprocess.run([str(JBERT), "score", "--help"], capture_output=True, text=True, check=True).stdout
    return re.search(r"--method \{([^}]*)\}", usage).group(1).split(",")


def score_direct(method: str, model_dir: Path, texts: dict[str, str]) -> tuple[dict, dict, str]:
    """`MaskedLM.score` in this process (2 torch threads, batches of 64) for a method the CLI does not offer yet."""
    import torch

    from jbert_ray.inference import MaskedLM

    torch.set_num_threads(2)
    lm = MaskedLM.from_pretrained(model_dir, "cpu")
    ids, values = list(texts), list(texts.values())
    results = [r for i in range(0, len(values), 64) for r in lm.score(values[i : i + 64], method)]
    how = f"`MaskedLM.score(method={method!r})`, k={lm.config.mask_stride}, one process: not in the CLI yet"
    return {i: r["pll_per_token"] for i, r in zip(ids, results)}, {i: r["unk_rate"] for i, r in zip(ids, results)}, how


def kenlm_training_words(train_path: Path, work: Path) -> Path:
    """ja_train cleaned as the scorer cleans, one sentence per line as MeCab words (the tokenizer's own split)."""
    from jbert_ray.inference import MaskedLM
    from jbert_ray.text import split_sentences
    from jbert_ray.tokenizer import build_tagger

    path = work / "ja_train.words.txt"
    wakati = build_tagger()
    with gzip.open(train_path, "rt", encoding="utf-8") as f, open(f"{path}.tmp", "w", encoding="utf-8") as out:
        for i, line in enumerate(f):
            text, reason = MaskedLM.clean(json.loads(line)["text"])
            for sentence in split_sentences(text) if not reason else []:
                out.write(f"{i}\t{wakati.parse(sentence).strip()}\n")  # record number: for the every-4th model
    os.replace(f"{path}.tmp", path)
    return path


def train_kenlm(train_words: Path, every: int, work: Path, kenlm_bin: Path) -> Path:
    """A 5-gram with modified Kneser-Ney (lmplz, CCNet's settings bar pruning) on records i % every == 0, binarized."""
    arpa, binary = work / f"ja_train_every{every}.arpa", work / f"ja_train_every{every}.bin"
    with open(train_words, encoding="utf-8") as f:
        lines = "".join(text for number, text in (line.split("\t", 1) for line in f) if int(number) % every == 0)
    with open(work / f"lmplz_every{every}.log", "w") as log:  # lmplz reports its progress on stderr
        subprocess.run([str(kenlm_bin / "lmplz"), "-o", "5", "-S", "2G", "-T", str(work), "--discount_fallback",
                        "--arpa", str(arpa)], input=lines, text=True, check=True, stderr=log)  # fmt: skip
        subprocess.run([str(kenlm_bin / "build_binary"), str(arpa), str(binary)], check=True, stdout=log, stderr=log)
    arpa.unlink()
    return binary


def score_kenlm(lm_path: Path, texts: dict[str, str], kenlm_python: Path) -> dict[str, float]:
    """id → log10 P per word with </s> counted (= −log10 perplexity; higher is better, as pll_per_token)."""
    from jbert_ray.inference import MaskedLM
    from jbert_ray.tokenizer import build_tagger

    wakati = build_tagger()
    words = [wakati.parse(MaskedLM.clean(t)[0]).strip() for t in texts.values()]
    done = subprocess.run([str(kenlm_python), "-c", KENLM_QUERY, str(lm_path)], input="\n".join(words) + "\n",
                          capture_output=True, text=True, check=True)  # fmt: skip
    totals = [float(v) for v in done.stdout.split()]
    return {i: total / (len(w.split()) + 1) for i, total, w in zip(texts, totals, words)}


def check_kenlm(kenlm_bin: Path, kenlm_python: Path) -> None:
    missing = [str(p) for p in (kenlm_bin / "lmplz", kenlm_bin / "build_binary", kenlm_python) if not p.exists()]
    if not missing and subprocess.run([str(kenlm_python), "-c", "import kenlm"], capture_output=True).returncode:
        missing.append(f"the kenlm module in {kenlm_python}")
    if missing:
        raise SystemExit(f"filter: KenLM is missing ({', '.join(missing)}); set it up as this script's docstring "
                         "says, or pass --kenlm-bin and --kenlm-python")  # fmt: skip


# ---- metrics and the table ----

METHODS = {"pll": "exact PLL", "KenLM": "KenLM 5-gram", "KenLM, model's records": "KenLM, ¼ of ja_train",
           "pll-word-l2r": "pll-word-l2r", "pll-strided": "pll-strided"}  # fmt: skip


def roc_auc(clean: np.ndarray, bad: np.ndarray) -> float:
    """P(a clean row scores above a bad one), ties counted half (Mann-Whitney U over average ranks)."""
    rank = ranks(np.concatenate([clean, bad]))[: len(clean)] + 1
    return float((rank.sum() - len(clean) * (len(clean) + 1) / 2) / (len(clean) * len(bad)))


def bottom_precision(clean: np.ndarray, bad: np.ndarray) -> float:
    """Share of bad rows among the lowest-scoring 10% of the mix (ties broken towards clean rows, no credit)."""
    values = np.concatenate([clean, bad])
    is_bad = np.r_[np.zeros(len(clean)), np.ones(len(bad))]
    order = np.lexsort((-is_bad, values))  # by score; among equal scores, clean rows first
    return float(is_bad[order[: int(np.ceil(BOTTOM_SHARE * len(values)))]].mean())


def pair_agreement(scores: dict[str, float], pairs: list[tuple[str, str]]) -> float:
    wins = [1.0 if scores[a] > scores[b] else 0.5 if scores[a] == scores[b] else 0.0 for a, b in pairs]
    return float(np.mean(wins))


def table(bench: dict, scores: dict) -> tuple[list[list], list[str]]:
    """Rows: each kind (exact PLL's losses to KenLM first), then minimal pairs; cells 'AUC / precision'."""
    rows, losses = [], []
    for kind, bad in bench["kinds"].items():
        cells, aucs = [], {}
        for method in shown(scores):
            clean_values = np.array([scores[method][i] for i in bench["mixes"][kind]])
            bad_values = np.array([scores[method][i] for i in bad])
            aucs[method] = roc_auc(clean_values, bad_values)
            cells.append(f"{aucs[method]:.3f} / {bottom_precision(clean_values, bad_values):.0%}")
        margin = aucs["pll"] - aucs["KenLM"]
        losses += [kind] if margin < 0 else []
        rows.append([kind, f"{len(bad)} + {len(bench['mixes'][kind])}", *cells, f"{margin:+.3f}"])
    rows.sort(key=lambda row: float(row[-1]))
    agreement = [f"{pair_agreement(scores[m], bench['pairs']):.1%}" for m in shown(scores)]
    margin = pair_agreement(scores["pll"], bench["pairs"]) - pair_agreement(scores["KenLM"], bench["pairs"])
    rows.append(["minimal pairs: original higher", f"{len(bench['pairs'])} pairs", *agreement, f"{margin:+.1%}"])
    return rows, losses


def shown(scores: dict) -> list[str]:
    """The table's methods in METHODS order: those that ran (pll-strided is new in the CLI and the library)."""
    return [m for m in METHODS if m in scores]


def columns(scores: dict) -> list[str]:
    return ["planted kind", "bad + clean rows", *(f"{METHODS[m]}: AUC / P@10%" for m in shown(scores)),
            "exact PLL − KenLM (AUC)"]  # fmt: skip


def title(model_dir: Path) -> str:
    """The table's title, with the model's size and its valid accuracy (pretraining's results.json, if beside it)."""
    results, config = Path(model_dir) / ".." / "results.json", Path(model_dir) / "config.json"
    accuracy = json.loads(results.read_text())["eval_accuracy"] if results.is_file() else None
    shown = f"valid masked-token accuracy {accuracy:.1%}" if accuracy is not None else "valid accuracy not recorded"
    model = json.loads(config.read_text()) if config.is_file() else {}
    size = f"{model.get('model_type', 'model')} H{model.get('hidden_size')} L{model.get('num_hidden_layers')}"
    return f"Filtering planted bad sentences in ja_valid: PLL vs KenLM 5-gram perplexity ({size}, {shown})"


def notes(bench: dict, scores: dict, unk_rates: dict, timings: dict, losses: list[str], model_dir: Path,
          total_s: float) -> list[str]:  # fmt: skip
    clean_ids = [f"clean-{i:04d}" for i in range(NUM_CLEAN)]
    kinds = bench["kinds"]
    unk = {kind: np.mean([unk_rates[i] for i in ids]) for kind, ids in {"clean": clean_ids, **kinds}.items()}
    shift = {kind: [mean_shift(scores[m], clean_ids, ids) for m in ("pll", "KenLM")] for kind, ids in kinds.items()}
    runtime = "; ".join(f"{METHODS[m]} {s:.1f} s ({how})" for m, (s, how) in timings.items())
    verdict = (f"exact PLL's AUC < KenLM's on: {', '.join(losses)}." if losses
               else "exact PLL's AUC ≥ KenLM's on every planted kind.")  # fmt: skip
    model = Path(model_dir).resolve()
    return [
        f"Target: exact PLL's AUC ≥ KenLM's on each planted kind. **{verdict}**",
        (f"Rows: {bench['num_sentences']:,} usable ja_valid sentences (cleaned and split as `jbert preprocess` does; "
         f"{MIN_WORDS}-{MAX_WORDS} MeCab words; each with a particle to swap and a word to cut), seed {SEED}: "
         f"{NUM_CLEAN} stay clean, {NUM_DONORS} others are corrupted once per Japanese kind; each kind is mixed with "
         "9 clean rows per bad one, so the bottom 10% has room for exactly the bad rows (P@10% is recall too). "
         f"Minimal pairs: {len(bench['pairs'])} clean sentences, one of が/を/に/で/は changed into another "
         "(some such changes stay grammatical, は↔が most often, so 100% is out of reach)."),
        ("Scores: pll_per_token from `jbert score`'s parts; KenLM: log10 P per MeCab word with </s>, i.e. "
         "−log10 perplexity, from PyPI's kenlm 0.3.0 module on a 5-gram lmplz built from that package's source "
         "(modified Kneser-Ney, no pruning), trained on all of ja_train, or on its every 4th record (the ones the "
         "model was trained on, for a like-for-like row), cleaned and split by the same code."),
        "Mean bad − mean clean, in standard deviations of the clean rows (exact PLL / KenLM): "
        + ", ".join(f"{kind} {p:+.2f} / {k:+.2f}" for kind, (p, k) in shift.items()) + ".",
        "Share of corrupted rows scored below their own original sentence (exact PLL / KenLM): "
        + ", ".join(f"{kind} {p:.0%} / {k:.0%}" for kind, (p, k) in below_original(bench, scores).items()) + ".",
        ascii_bias(bench["texts"], clean_ids, scores),
        low_ascii_auc(bench, scores),
        "[UNK] share of tokens (our tokenizer): " + ", ".join(f"{k} {v:.1%}" for k, v in unk.items()) + ".",
        f"Runtime {total_s / 60:.1f} min in all: {runtime}. "
        f"Model: {model.relative_to(REPO) if model.is_relative_to(REPO) else model}.",
    ]


def mean_shift(scores: dict[str, float], clean_ids: list[str], bad_ids: list[str]) -> float:
    clean = np.array([scores[i] for i in clean_ids])
    return float((np.mean([scores[i] for i in bad_ids]) - clean.mean()) / clean.std())


def below_original(bench: dict, scores: dict) -> dict[str, tuple[float, float]]:
    """Per Japanese kind: the share of corrupted rows exact PLL and KenLM score below the sentence they came from."""
    shares = {}
    for kind, bad in list(bench["kinds"].items())[: bench["num_word_kinds"]]:
        pairs = [(f"donor-{i:04d}", b) for i, b in enumerate(bad)]
        shares[kind] = tuple(float(np.mean([scores[m][b] < scores[m][d] for d, b in pairs])) for m in ("pll", "KenLM"))
    return shares


def low_ascii_auc(bench: dict, scores: dict, max_share: float = 0.05) -> str:
    """AUC of exact PLL and KenLM on rows from sentences of ≤ 5% ASCII: is quoted code what blurs PLL's ranking?"""
    texts = bench["texts"]
    plain = {i for i, t in texts.items() if len(re.findall(r"[\x21-\x7e]", t)) <= max_share * len(t)}
    parts = []
    for kind, bad in list(bench["kinds"].items())[: bench["num_word_kinds"]]:
        clean = [i for i in bench["mixes"][kind] if i in plain]
        bad = [b for i, b in enumerate(bad) if f"donor-{i:04d}" in plain]  # by the sentence it was made from
        aucs = [roc_auc(np.array([scores[m][i] for i in clean]), np.array([scores[m][i] for i in bad]))
                for m in ("pll", "KenLM")]  # fmt: skip
        parts.append(f"{kind} {aucs[0]:.3f} / {aucs[1]:.3f}")
    return (f"Only rows from sentences of ≤ {max_share:.0%} ASCII ({len(clean)} clean, {len(bad)} bad per kind), "
            f"AUC exact PLL / KenLM: {', '.join(parts)}.")  # fmt: skip


def ascii_bias(texts: dict[str, str], clean_ids: list[str], scores: dict) -> str:
    """How much each score of the clean rows follows their share of ASCII (commands, identifiers, file names)."""
    share = np.array([len(re.findall(r"[\x21-\x7e]", texts[i])) / len(texts[i]) for i in clean_ids])
    parts = []
    for method in ("pll", "KenLM"):
        values = np.array([scores[method][i] for i in clean_ids])
        bottom = np.argsort(values, kind="stable")[: int(BOTTOM_SHARE * len(values))]
        parts.append(f"{METHODS[method]}: Spearman {spearman(values, share):+.2f}, its bottom 10% of clean rows "
                     f"{share[bottom].mean():.0%} ASCII")  # fmt: skip
    return f"Clean rows are {share.mean():.0%} ASCII; each score against a row's ASCII share: {'; '.join(parts)}."


if __name__ == "__main__":
    main()
