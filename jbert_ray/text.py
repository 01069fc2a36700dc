"""Normalization and cleaning of one Japanese text record: the single source of truth that the vocab,
preprocessing and inference stages all call, so every stage sees the same characters."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

from jbert_ray.errors import UserError

# Reasons a record is rejected; they appear in rejects/ files and in manifests.
REJECT_INVALID_UTF8 = "invalid_utf8"
REJECT_INVALID_JSON = "invalid_json"
REJECT_MISSING_FIELD = "missing_field"
REJECT_NOT_TEXT = "not_text"
REJECT_EMPTY = "empty"
REJECT_BINARY = "binary"
REJECT_NO_JAPANESE = "no_japanese"
REJECT_TOO_LONG = "too_long"
REJECT_UNREADABLE = "unreadable"  # the file could not be read on (e.g. a corrupt .gz); the rest of it is lost
REJECT_INVALID_UNICODE = (
    "invalid_unicode"  # a lone surrogate ("\ud800" is valid JSON): not encodable as UTF-8
)

# Lone UTF-16 surrogates: JSON escapes can produce them, but no UTF-8 writer (parquet, files, MeCab) takes them.
_SURROGATE = re.compile("[\ud800-\udfff]")

# Control characters other than tab and newlines: MeCab stops reading at NUL, and the rest are noise.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_JAPANESE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f]")
# A sentence ends at a line break, after 。 (NFKC keeps it full-width), or after !/? (NFKC of ！？) when
# followed by a space or non-ASCII text, so `foo!bar` in a shell command stays whole; closing brackets stay.
_SENTENCE_END = re.compile(r"\n+|(?:(?<=[。．])|(?<=[!?！？])(?=\s|[^\x00-\x7f]))(?![」』）)\]。!?！？])")
_BINARY_CONTROL_FRACTION = 0.1  # above this share of control characters a record is binary, not text


@dataclass(frozen=True)
class TextConfig:
    normalization: Literal["NFKC", "NFC", "none"] = "NFKC"  # Unicode normalization of every record
    require_japanese: bool = True  # reject records without kana or kanji (stray English-only lines)
    max_chars: int = 1_000_000  # longer records are rejected: dumps gone wrong (a file on one line)

    def __post_init__(self):
        if self.normalization not in ("NFKC", "NFC", "none") or self.max_chars < 1:
            raise UserError(
                f"normalization {self.normalization!r} is not NFKC, NFC or none, or max_chars < 1"
            )


def has_invalid_unicode(text: str) -> bool:
    """True if `text` holds a lone surrogate, which crawled JSON corpora contain and UTF-8 cannot encode."""
    return _SURROGATE.search(text) is not None


def replace_invalid_unicode(text: str) -> str:
    """Lone surrogates → U+FFFD (the tokenizer then gives [UNK] for them, as for any unknown character)."""
    return _SURROGATE.sub("\ufffd", text)


def normalize(text: str, form: str = "NFKC") -> str:
    """Apply Unicode normalization (the one BertJapaneseTokenizer applies: NFKC by default)."""
    return text if form.lower() == "none" else unicodedata.normalize(form, text)


def clean_text(text: str, config: TextConfig = TextConfig()) -> tuple[str, str]:
    """Normalize one record; return (clean text, "") or ("", reject reason)."""
    if len(text) > config.max_chars:
        return "", REJECT_TOO_LONG
    if has_invalid_unicode(text):
        return "", REJECT_INVALID_UNICODE
    if not text.strip():
        return "", REJECT_EMPTY
    controls = len(_CONTROL.findall(text))
    if controls > 2 and controls > _BINARY_CONTROL_FRACTION * len(text):
        return "", REJECT_BINARY
    if controls:
        text = _CONTROL.sub(" ", text)
    text = normalize(text, config.normalization).strip()
    if not text:
        return "", REJECT_EMPTY
    if config.require_japanese and not _JAPANESE.search(text):
        return "", REJECT_NO_JAPANESE
    return text, ""


def split_sentences(text: str) -> list[str]:
    """Split after 。！？ and at line breaks; keep the punctuation, drop empty pieces."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]
