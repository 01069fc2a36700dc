"""Normalization, cleaning and sentence splitting of single records."""

import pytest

from jbert_ray import text as T

CLEAN_CASES = [  # (raw record, cleaned text, reject reason)
    ("東京は日本の首都です。", "東京は日本の首都です。", ""),
    ("ｶﾀｶﾅとＡＢＣ１２３", "カタカナとABC123", ""),  # NFKC: half-width kana, full-width Latin/digits
    ("  前後の空白　", "前後の空白", ""),
    ("NUL\x00の後も残る", "NUL の後も残る", ""),  # MeCab would stop at NUL; never drop the rest
    ("", "", T.REJECT_EMPTY),
    ("   \t  ", "", T.REJECT_EMPTY),
    ("only English text", "", T.REJECT_NO_JAPANESE),
    ("\x00\x01\x02\x03バイナリ", "", T.REJECT_BINARY),
    ("東京\ud800です。", "", T.REJECT_INVALID_UNICODE),  # a lone surrogate: no UTF-8 writer takes it
]


@pytest.mark.parametrize("raw, cleaned, reason", CLEAN_CASES)
def test_clean_text_normalizes_or_gives_a_reason(raw, cleaned, reason):
    assert T.clean_text(raw) == (cleaned, reason)


def test_non_japanese_records_can_be_kept():
    assert T.clean_text("only English text", T.TextConfig(require_japanese=False)) == ("only English text", "")


def test_normalization_can_be_turned_off():
    assert T.clean_text("ｶﾀｶﾅ", T.TextConfig(normalization="none")) == ("ｶﾀｶﾅ", "")


SPLIT_CASES = [
    ("東京は首都です。大阪は都市です。", ["東京は首都です。", "大阪は都市です。"]),
    ("「本当？」と聞いた。次の行\n\n改行の後", ["「本当？」と聞いた。", "次の行", "改行の後"]),
    ("本当!? はい。", ["本当!?", "はい。"]),
    ("コマンド foo!bar を実行", ["コマンド foo!bar を実行"]),  # ASCII ! inside a command stays
    ("", []),
]


@pytest.mark.parametrize("text, sentences", SPLIT_CASES)
def test_split_sentences(text, sentences):
    assert T.split_sentences(text) == sentences
