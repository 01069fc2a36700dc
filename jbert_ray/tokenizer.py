"""Japanese BERT tokenizer: NFKC → MeCab words (fugashi) → WordPiece ids (`tokenizers`), plus word starts.

The saved directory is laid out like the Tohoku Japanese BERT ones, so `transformers.AutoTokenizer` loads it as
`BertJapaneseTokenizer`; our batch path gives the same ids, only faster: MeCab in wakati mode and a word → ids
cache in front of WordPiece (most Japanese words are whole vocabulary entries: they skip WordPiece altogether), a
text of one-piece words looked up without a Python loop, and no garbage-collector passes over a batch's lists.
Per-text Python work is what separates this path from bare MeCab, so the common case is kept inline.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shlex
import socket
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from jbert_ray.errors import UserError
from jbert_ray.text import normalize, replace_invalid_unicode

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD, UNK, CLS, SEP, MASK = SPECIAL_TOKENS
MAX_WORD_CHARS = 100  # longer words become [UNK], as in transformers' WordpieceTokenizer
_CACHE_LIMIT = 1_000_000  # words; bounds memory on corpora with endless unique strings (hashes, URLs)
_SEVERAL_PIECES = -1  # in the word cache: the word's ids are in the multi-piece cache
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
_DICTIONARY_PACKAGES = {"unidic_lite": "unidic-lite", "unidic": "unidic", "ipadic": "ipadic"}
# A tokenizer dir's mecab_option goes to MeCab, whose -d, -r, -u (and -o, ...) read or write any file. Only
# these pass unless the user trusts the dir (option → takes a value): none touches a file or changes the shape
# of the wakati output (-a, -N and the format options do; -p crashes MeCab).
_SAFE_MECAB_OPTIONS = {
    **dict.fromkeys(("-M", "--max-grouping-size", "-t", "--theta", "-c", "--cost-factor"), True),
    **dict.fromkeys(("-x", "--unk-feature", "-b", "--input-buffer-size"), True),
    **dict.fromkeys(("-C", "--allocate-sentence", "-m", "--marginal"), False),
}
# An environment variable, not a flag: every process that loads a tokenizer (preprocess actors, train workers,
# score actors, Serve replicas) must see it. A local Ray's workers inherit the driver's environment at
# ray.init; on a running cluster it goes in the job's runtime_env env_vars.
ALLOW_MECAB_OPTION_ENV = "JBERT_ALLOW_MECAB_OPTION"


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 32768  # WordPiece entries including the 5 special tokens (Tohoku v3 uses 32768)
    min_frequency: int = 2  # minimum count of a merged piece (words seen once are mostly noise)
    limit_alphabet: int = 0  # distinct characters kept as pieces; 0 = a quarter of the vocab size
    do_lower_case: bool = False  # lowercase Latin letters (Japanese BERTs are cased)
    mecab_dic: Literal["unidic_lite", "unidic", "ipadic"] = "unidic_lite"  # MeCab dictionary package
    model_max_length: int = 512  # written to tokenizer_config.json (otherwise transformers says 1e30)

    def __post_init__(self):
        if self.vocab_size < 16 or self.min_frequency < 1 or self.limit_alphabet < 0:
            raise UserError(
                f"--vocab-size {self.vocab_size} must be ≥ 16, --min-frequency ≥ 1, --limit-alphabet ≥ 0"
            )


class Encoding(NamedTuple):
    ids: list[int]
    word_start: list[bool]  # True where a token begins a MeCab word (special tokens are words of their own)


class JapaneseTokenizer:
    """MeCab + WordPiece tokenizer with the API of a Tohoku-style `BertJapaneseTokenizer` directory."""

    def __init__(
        self,
        vocab: list[str],
        do_lower_case: bool = False,
        mecab_dic: str = "unidic_lite",
        mecab_option: str = "",
        normalize_text: bool = True,
        model_max_length: int = 512,
    ):
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise UserError(f"vocabulary lacks special tokens {missing}")
        self.vocab = vocab
        self.token_to_id = {token: i for i, token in enumerate(vocab)}
        self.do_lower_case = do_lower_case
        self.mecab_dic = mecab_dic
        self.mecab_option = mecab_option
        self.normalize_text = normalize_text
        self.model_max_length = model_max_length
        self.pad_token_id, self.unk_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id = (
            self.token_to_id[t] for t in SPECIAL_TOKENS
        )
        self.special_ids = frozenset(self.token_to_id[t] for t in SPECIAL_TOKENS)
        self._layout_ids = frozenset((self.pad_token_id, self.cls_token_id, self.sep_token_id))
        self._tagger = None  # built on first use, so the object pickles to Ray workers cheaply
        self._word_ids = _WordIds(self.token_to_id, do_lower_case)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    # ---- loading and saving (Tohoku-style HF directory) ----

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> JapaneseTokenizer:
        """Load our tokenizer directory or any Tohoku-style `BertJapaneseTokenizer` directory."""
        path = Path(path)
        vocab_file = path / "vocab.txt"
        if not vocab_file.is_file():
            raise UserError(f"{path} is not a tokenizer directory: it has no vocab.txt")
        config = _read_json(path / "tokenizer_config.json")
        word_type = config.get("word_tokenizer_type", "mecab")
        subword_type = config.get("subword_tokenizer_type", "wordpiece")
        if word_type != "mecab" or subword_type != "wordpiece":
            raise UserError(
                f"{path}: word_tokenizer_type={word_type!r}, subword_tokenizer_type={subword_type!r}; "
                "jbert_ray supports Japanese BERT tokenizers with mecab words and wordpiece subwords"
            )
        mecab = config.get("mecab_kwargs") or {}
        tokenizer = cls(
            vocab=_read_vocab(vocab_file),
            do_lower_case=bool(config.get("do_lower_case", False)),
            mecab_dic=mecab.get("mecab_dic", "unidic_lite"),
            mecab_option=mecab.get("mecab_option") or "",
            normalize_text=bool(mecab.get("normalize_text", True)),
            model_max_length=int(min(config.get("model_max_length", 512), 1 << 20)),
        )
        tokenizer._parse("")  # builds the tagger: fail now, not in a worker, if the dictionary is missing
        if "mecab_dictionary" in config:  # older dirs and Tohoku's have no record: they load as before
            _check_dictionary(path, config["mecab_dictionary"], installed_dictionary(tokenizer.mecab_dic))
        return tokenizer

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write vocab.txt, tokenizer_config.json and special_tokens_map.json (Tohoku layout)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "vocab.txt").write_text("".join(token + "\n" for token in self.vocab), encoding="utf-8")
        special = {"unk_token": UNK, "sep_token": SEP, "pad_token": PAD, "cls_token": CLS, "mask_token": MASK}
        mecab_kwargs = {"mecab_dic": self.mecab_dic}
        if self.mecab_option:
            mecab_kwargs["mecab_option"] = self.mecab_option
        if not self.normalize_text:
            mecab_kwargs["normalize_text"] = False
        config = {
            "tokenizer_class": "BertJapaneseTokenizer",
            "do_lower_case": self.do_lower_case,
            "word_tokenizer_type": "mecab",
            "subword_tokenizer_type": "wordpiece",
            "mecab_kwargs": mecab_kwargs,
            # Word splits, hence ids, change with the dictionary: from_pretrained refuses another one.
            "mecab_dictionary": installed_dictionary(self.mecab_dic),
            "model_max_length": self.model_max_length,
            **special,
        }
        _write_json(path / "tokenizer_config.json", config)
        _write_json(path / "special_tokens_map.json", special)

    # ---- encoding ----

    def words(self, text: str) -> list[str]:
        """MeCab words of one text (after NFKC), as BertJapaneseTokenizer's word tokenizer splits it."""
        text = replace_invalid_unicode(text)  # MeCab takes UTF-8, which a lone surrogate is not
        if self.normalize_text:
            text = normalize(text)
        # MeCab reads a C string: it would silently stop at NUL.
        return self._parse(text.replace("\x00", " ")).split()

    def encode(self, text: str, add_special_tokens: bool = True) -> Encoding:
        """Token ids and word starts of one text."""
        return self.encode_batch([text], add_special_tokens)[0]

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = True) -> list[Encoding]:
        """Encode many texts; ids equal `AutoTokenizer.from_pretrained(dir)(text)["input_ids"]`."""
        if len(self._word_ids) > _CACHE_LIMIT:
            self._word_ids = _WordIds(self.token_to_id, self.do_lower_case)
        # The garbage collector would scan the batch's lists again and again (1.3× the time); nothing here cycles.
        with _garbage_collector_paused():
            return [self._assemble(self._split(text), add_special_tokens) for text in texts]

    def _split(self, text: str) -> list[str] | tuple[int | list[str], ...]:
        """A text's MeCab words; a text with a special token, NUL or a lone surrogate as a tuple of special-token
        ids and word lists (the general path). "[MASK]" written in the text is split out before normalization,
        like transformers does."""
        if "[" not in text and "\x00" not in text:
            try:  # the common case, inline: per-text Python work is what this tokenizer's speed is made of
                return self._parse(unicodedata.normalize("NFKC", text) if self.normalize_text else text).split()
            except UnicodeEncodeError:  # a lone surrogate: the general path replaces it
                pass
        return tuple(
            self.token_to_id[chunk] if chunk in SPECIAL_TOKENS else self.words(chunk)
            for chunk in _SPECIAL_SPLIT.split(text)
            if chunk
        )

    def _parse(self, text: str) -> str:
        if self._tagger is None:
            self._tagger = build_tagger(self.mecab_dic, self.mecab_option)
        return self._tagger.parse(text)

    def _assemble(self, text: list[str] | tuple[int | list[str], ...], add_special_tokens: bool) -> Encoding:
        if type(text) is list:  # words only: one id per word is the common case, looked up in C
            ids = list(map(self._word_ids.__getitem__, text))  # a word not seen yet is looked up on the spot
            if _SEVERAL_PIECES not in ids:
                if add_special_tokens:
                    ids.insert(0, self.cls_token_id)
                    ids.append(self.sep_token_id)
                return Encoding(ids, [True] * len(ids))
            text = (text,)
        ids: list[int] = [self.cls_token_id] if add_special_tokens else []
        starts: list[bool] = [True] * len(ids)
        for chunk in text:
            if isinstance(chunk, int):
                ids.append(chunk)
                starts.append(True)
                continue
            found = list(map(self._word_ids.__getitem__, chunk))
            done = 0  # copy the one-piece runs between multi-piece words in slices
            while (at := _find(found, _SEVERAL_PIECES, done)) >= 0:
                pieces = self._word_ids.multi_piece[chunk[at]]
                ids.extend(found[done:at])
                ids.extend(pieces)
                starts.extend([True] * (at - done + 1))
                starts.extend([False] * (len(pieces) - 1))
                done = at + 1
            ids.extend(found[done:])
            starts.extend([True] * (len(found) - done))
        if add_special_tokens:
            ids.append(self.sep_token_id)
            starts.append(True)
        return Encoding(ids, starts)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.vocab[i] for i in ids]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Join pieces without spaces or '##' (Japanese has no spaces); skips [PAD] [CLS] [SEP], keeps [UNK]."""
        tokens = [self.vocab[i] for i in ids if not (skip_special_tokens and i in self._layout_ids)]
        return "".join(t.removeprefix("##") for t in tokens)

    def __getstate__(self) -> dict:
        # The MeCab tagger cannot be pickled and the word cache can be large: workers rebuild both.
        return {**self.__dict__, "_tagger": None, "_word_ids": _WordIds(self.token_to_id, self.do_lower_case)}


class _WordIds(dict):
    """word → its id, or _SEVERAL_PIECES with its ids in `multi_piece`. A word not seen yet is looked up when it is
    first asked for (`__missing__`), so every later lookup is one C-level dict access and nothing else."""

    def __init__(self, vocabulary: dict[str, int], lower: bool):
        super().__init__()
        self.vocabulary, self.lower = vocabulary, lower
        self.multi_piece: dict[str, list[int]] = {}
        self._wordpiece = None

    def __missing__(self, word: str) -> int:
        key = word.lower() if self.lower else word
        # A whole vocabulary entry is its own id (WordPiece's longest match starts with the whole word): most
        # words never need the WordPiece model.
        piece_id = self.vocabulary.get(key) if len(key) <= MAX_WORD_CHARS else None
        if piece_id is None:
            ids = [piece.id for piece in self._wordpiece_model().tokenize(key)]
            piece_id = ids[0] if len(ids) == 1 else _SEVERAL_PIECES
            if len(ids) > 1:
                self.multi_piece[word] = ids
        self[word] = piece_id
        return piece_id

    def _wordpiece_model(self):
        """The `tokenizers` WordPiece model, built on first use (a 32k-entry map into Rust takes ~9 ms)."""
        if self._wordpiece is None:
            from tokenizers.models import WordPiece

            self._wordpiece = WordPiece(self.vocabulary, unk_token=UNK, max_input_chars_per_word=MAX_WORD_CHARS)
        return self._wordpiece


@contextmanager
def _garbage_collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a block, then back on if it was on."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _find(values: list[int], value: int, start: int) -> int:
    """Index of `value` in `values` from `start` on (a C-level scan), or -1."""
    try:
        return values.index(value, start)
    except ValueError:
        return -1


def build_tagger(mecab_dic: str = "unidic_lite", mecab_option: str = ""):
    """A wakati (space-separated words) MeCab tagger with the same dictionary options as transformers."""
    import fugashi

    refused = _refused_mecab_option(mecab_option)
    if refused is not None and os.environ.get(ALLOW_MECAB_OPTION_ENV) != "1":
        runtime_env = json.dumps({"env_vars": {ALLOW_MECAB_OPTION_ENV: "1"}})
        raise UserError(
            f"MeCab option {refused!r} (mecab_kwargs.mecab_option in tokenizer_config.json) is refused: it "
            f"could read or write files or break word splitting; allowed: {' '.join(_SAFE_MECAB_OPTIONS)}. "
            f"If you trust the directory, set {ALLOW_MECAB_OPTION_ENV}=1 for every process that loads it "
            f"(a cluster job: ray job submit --runtime-env-json '{runtime_env}')"
        )
    dic_dir = _import_dictionary(mecab_dic).DICDIR
    mecabrc = os.path.join(dic_dir, "mecabrc")
    if not os.path.isfile(mecabrc):
        raise UserError(
            f"MeCab dictionary {mecab_dic!r} is installed but its files are missing from {dic_dir}"
            + (": run `python -m unidic download`" if mecab_dic == "unidic" else "")
        )
    return fugashi.GenericTagger(f'-d "{dic_dir}" -r "{mecabrc}" {mecab_option} -Owakati')


def installed_dictionary(mecab_dic: str) -> dict[str, str]:
    """Name, version and pip package of the installed MeCab dictionary, as tokenizer_config.json records it.
    The version is the dictionary's own (`unidic_lite.VERSION`, read from its dicdir/version: 2.1.2 in
    unidic-lite 1.0.8): that, not the package's version, decides the word splits."""
    from importlib.metadata import version

    package = _DICTIONARY_PACKAGES[mecab_dic]
    dictionary_version = _import_dictionary(mecab_dic).VERSION
    return {"name": mecab_dic, "version": dictionary_version, "package": f"{package}=={version(package)}"}


def train_vocab(
    word_counts: Mapping[str, int], config: TokenizerConfig = TokenizerConfig()
) -> JapaneseTokenizer:
    """Train WordPiece (the `tokenizers` trainer) on MeCab word counts; return the tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if not word_counts:
        raise UserError("no words to train a vocabulary on: the corpus has no usable text")
    if config.vocab_size <= len(SPECIAL_TOKENS):
        raise UserError(f"vocab size must exceed {len(SPECIAL_TOKENS)} (the special tokens)")
    tokenizer = Tokenizer(models.WordPiece(unk_token=UNK, max_input_chars_per_word=MAX_WORD_CHARS))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordPieceTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        limit_alphabet=config.limit_alphabet or max(config.vocab_size // 4, 1),
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tokenizer.train_from_iterator(_repeat_words(word_counts, config.do_lower_case), trainer=trainer)
    vocab = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    return JapaneseTokenizer(
        vocab,
        do_lower_case=config.do_lower_case,
        mecab_dic=config.mecab_dic,
        model_max_length=config.model_max_length,
    )


def train_vocab_on_texts(texts: Iterable[str], config: TokenizerConfig = TokenizerConfig()) -> JapaneseTokenizer:
    """`train_vocab` on the MeCab words of `texts`, counted in this process: for small corpora, tests and
    benchmarks (`jbert vocab` counts across the cluster)."""
    tagger = build_tagger(config.mecab_dic)
    return train_vocab(Counter(word for text in texts for word in tagger.parse(normalize(text)).split()), config)


def _repeat_words(word_counts: Mapping[str, int], lower: bool, chunk: int = 4096) -> Iterator[str]:
    # The trainer only takes text; feeding "w w w …" lets its Rust pre-tokenizer rebuild the counts quickly.
    for word, count in word_counts.items():
        word = word.lower() if lower else word
        for start in range(0, count, chunk):
            yield " ".join([word] * min(chunk, count - start))


def _import_dictionary(mecab_dic: str):
    """The dictionary's Python package (unidic_lite, unidic or ipadic: each has DICDIR and VERSION)."""
    if mecab_dic not in _DICTIONARY_PACKAGES:
        raise UserError(f"unknown MeCab dictionary {mecab_dic!r}; use one of {sorted(_DICTIONARY_PACKAGES)}")
    try:
        return __import__(mecab_dic)
    except ImportError:
        raise UserError(
            f"MeCab dictionary {mecab_dic!r} is not installed: pip install {_DICTIONARY_PACKAGES[mecab_dic]}"
            + (" && python -m unidic download" if mecab_dic == "unidic" else "")
        ) from None


def _check_dictionary(path: Path, recorded: object, installed: dict[str, str]) -> None:
    """Refuse a tokenizer dir whose recorded MeCab dictionary is not the one installed on this node."""
    recorded = recorded if isinstance(recorded, dict) else {}
    if (recorded.get("name"), recorded.get("version")) != (installed["name"], installed["version"]):
        raise UserError(
            f"{path} was made with MeCab dictionary {recorded.get('name')} {recorded.get('version')} "
            f"({recorded.get('package')}), but this node ({socket.gethostname()}) has {installed['name']} "
            f"{installed['version']} ({installed['package']}): install the recorded one here or rebuild the "
            "tokenizer with `jbert vocab`"
        )


def _refused_mecab_option(mecab_option: str) -> str | None:
    """The first word of `mecab_option` outside _SAFE_MECAB_OPTIONS, or None. Read as MeCab reads it: fugashi
    splits with shlex, and an option's value is attached (`-t0.5`, `--theta=0.5`) or the next word."""
    try:
        words = shlex.split(mecab_option)
    except ValueError:  # unbalanced quotes
        return mecab_option
    value_next = False
    for word in words:
        if value_next:
            value_next = False
            continue
        if word.startswith("--"):
            name, attached = word.split("=")[0], "=" in word
        else:
            name, attached = word[:2], len(word) > 2
        takes_value = _SAFE_MECAB_OPTIONS.get(name)
        if takes_value is None or (attached and not takes_value):  # also `--` (ends MeCab's options), paths
            return word
        value_next = takes_value and not attached
    return None


def _read_vocab(path: Path) -> list[str]:
    # One token per line, split on "\n" only, as transformers' load_vocab reads it.
    lines = path.read_text(encoding="utf-8").split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON: {error}") from None


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
