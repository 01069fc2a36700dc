"""The MeCab + WordPiece tokenizer: identical ids to transformers' BertJapaneseTokenizer, word starts, robustness.

Word splits below hold for unidic-lite 1.0.8 (MeCab via fugashi 1.5)."""

import json
import pickle
import re
from importlib.metadata import version

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from jbert_ray.errors import UserError
from jbert_ray.text import normalize
from jbert_ray.tokenizer import SPECIAL_TOKENS, JapaneseTokenizer, TokenizerConfig, train_vocab

# cl-tohoku/bert-base-japanese-v2's tokenizer_config.json: no dictionary record, no mecab_option.
TOHOKU_CONFIG = {"tokenizer_class": "BertJapaneseTokenizer", "model_max_length": 512, "do_lower_case": False,
                 "word_tokenizer_type": "mecab", "subword_tokenizer_type": "wordpiece",
                 "mecab_kwargs": {"mecab_dic": "unidic_lite"}}

REFUSED_MECAB_OPTIONS = [  # (a tokenizer dir's mecab_option, the word the error names)
    ("-d /tmp/x", "-d"),
    ("-r /etc/passwd", "-r"),
    ("--rcfile=/etc/passwd", "--rcfile=/etc/passwd"),
    ("-u/etc/passwd", "-u/etc/passwd"),
    ("-t 0.5 --userdic /etc/passwd", "--userdic"),
    ("-o /tmp/mecab_output", "-o"),  # writes a file
    ("-- -d /tmp/x", "--"),  # ends MeCab's options: our -Owakati would be ignored
    ('-x "a -d /tmp/x', '-x "a -d /tmp/x'),  # unbalanced quote
]
SAFE_MECAB_OPTIONS = ["-M 5", "-t0.5 --cost-factor=800 -C", "-x 名詞 -m -b 100000"]
USER_DICTIONARY_CSV = (  # one UniDic entry: 東京都庁前 as a single word
    "東京都庁前,,,1,名詞,固有名詞,地名,一般,*,*,トウキョウトチョウマエ,東京都庁前,東京都庁前,"
    "トーキョートチョーマエ,東京都庁前,トーキョートチョーマエ,固,*,*,*,*\n"
)

WORD_CASES = [
    ("東京は日本の首都です。", ["東京", "は", "日本", "の", "首都", "です", "。"]),
    ("ｶﾀｶﾅとＡＢＣ１２３", ["カタカナ", "と", "ABC", "123"]),
    ("Ｗｅｂサーバーのポート８０８０を開く", ["Web", "サーバー", "の", "ポート", "8080", "を", "開く"]),
    ("吾輩は猫である。", ["吾輩", "は", "猫", "で", "ある", "。"]),
]

HARD_TEXTS = [
    "",
    "   \t ",
    "a\x00b",
    "\x01\x02テスト\x7f",
    "絵文字😀🎌とｶﾀｶﾅ",
    "abc123 ＸＹＺ４５６ mixed ラテン",
    "ｸﾞｸﾞｯﾎﾟｲﾎﾟｲ謎語彙ｚｚｚ",  # words MeCab does not know
    "[MASK]の前後[SEP]",
    "あ" * 300,  # one word longer than WordPiece's 100-character limit
]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return JapaneseTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def reference(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def tohoku_dir(tokenizer_dir, path, **mecab_kwargs):
    """A Tohoku-style directory with our vocabulary and `mecab_kwargs` added to Tohoku's."""
    path.mkdir(exist_ok=True)
    (path / "vocab.txt").write_text((tokenizer_dir / "vocab.txt").read_text())
    config = {**TOHOKU_CONFIG, "mecab_kwargs": {**TOHOKU_CONFIG["mecab_kwargs"], **mecab_kwargs}}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("text, words", WORD_CASES)
def test_words_are_mecab_words_after_nfkc(tokenizer, text, words):
    assert tokenizer.words(text) == words


def test_saved_directory_loads_as_bert_japanese_tokenizer(reference, tokenizer_dir):
    assert type(reference).__name__ == "BertJapaneseTokenizer"
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["word_tokenizer_type"] == "mecab" and config["mecab_kwargs"]["mecab_dic"] == "unidic_lite"
    assert reference.model_max_length == 512


def test_ids_identical_to_transformers_on_every_sample_record(tokenizer, reference, sample_texts):
    ours = tokenizer.encode_batch(sample_texts)
    theirs = reference(sample_texts)["input_ids"]
    mismatches = [text for text, a, b in zip(sample_texts, ours, theirs) if a.ids != b]
    assert len(sample_texts) == 9064 and mismatches == []


@pytest.mark.parametrize("text", [t for t in HARD_TEXTS if "\x00" not in t])
def test_ids_identical_to_transformers_on_hard_texts(tokenizer, reference, text):
    assert tokenizer.encode(text).ids == reference(text)["input_ids"]


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_hard_texts_encode_with_one_word_start_per_word(tokenizer, text):
    encoding = tokenizer.encode(text)
    assert encoding.ids[0] == tokenizer.cls_token_id and encoding.ids[-1] == tokenizer.sep_token_id
    assert len(encoding.ids) == len(encoding.word_start)
    assert all(encoding.word_start[i] for i, id_ in enumerate(encoding.ids) if id_ in tokenizer.special_ids)


def test_text_after_nul_is_kept(tokenizer):
    # transformers' MeCab call stops at NUL and silently drops "b"; we keep it.
    assert tokenizer.decode(tokenizer.encode("a\x00b").ids) == "ab"


def test_a_lone_surrogate_becomes_unk_instead_of_crashing_mecab(tokenizer):
    encoding = tokenizer.encode("東京\ud800です。")
    assert tokenizer.unk_token_id in encoding.ids
    assert encoding == tokenizer.encode("東京\ufffdです。")


def test_one_megabyte_line_encodes(tokenizer):
    text = "東京は日本の首都です。" * 100_000
    encoding = tokenizer.encode(text)
    assert len(encoding.ids) == 2 + 100_000 * len(tokenizer.encode("東京は日本の首都です。", False).ids)


def test_word_start_marks_the_first_piece_of_each_mecab_word(tokenizer):
    text = "吾輩は猫である。名前はまだ無い。"
    encoding = tokenizer.encode(text, add_special_tokens=False)
    tokens = tokenizer.convert_ids_to_tokens(encoding.ids)
    assert sum(encoding.word_start) == len(tokenizer.words(text))
    assert all(start == (not token.startswith("##")) for token, start in zip(tokens, encoding.word_start))


def test_decode_gives_back_the_normalized_text_without_spaces(tokenizer, sample_texts):
    known = [t for t in sample_texts[:300] if tokenizer.unk_token_id not in tokenizer.encode(t).ids]
    assert len(known) > 100
    for text in known:
        assert tokenizer.decode(tokenizer.encode(text).ids) == "".join(normalize(text).split())


def test_mask_token_in_text_is_one_special_token(tokenizer):
    encoding = tokenizer.encode("東京は日本の[MASK]です。")
    assert encoding.ids.count(tokenizer.mask_token_id) == 1


def test_a_full_word_cache_is_emptied_and_ids_stay_the_same(tokenizer_dir, sample_texts, monkeypatch):
    import jbert_ray.tokenizer as tokenizer_module

    expected = [e.ids for e in JapaneseTokenizer.from_pretrained(tokenizer_dir).encode_batch(sample_texts[:300])]
    monkeypatch.setattr(tokenizer_module, "_CACHE_LIMIT", 200)
    small = JapaneseTokenizer.from_pretrained(tokenizer_dir)
    ids = [e.ids for batch in range(0, 300, 5) for e in small.encode_batch(sample_texts[batch : batch + 5])]
    assert ids == expected and len(small._word_ids) <= 200 + 150  # cleared when full (5 texts add < 150 words)


def test_pickled_tokenizer_encodes_the_same(tokenizer, sample_texts):
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert [e.ids for e in clone.encode_batch(sample_texts[:50])] == [
        e.ids for e in tokenizer.encode_batch(sample_texts[:50])
    ]


def test_save_and_load_round_trip(tokenizer, tmp_path, sample_texts):
    tokenizer.save_pretrained(tmp_path)
    again = JapaneseTokenizer.from_pretrained(tmp_path)
    assert again.vocab == tokenizer.vocab
    assert again.encode(sample_texts[0]) == tokenizer.encode(sample_texts[0])


def test_train_vocab_puts_special_tokens_first_and_respects_size():
    counts = {"東京": 50, "京都": 40, "都市": 30, "日本": 20, "の": 100}
    tokenizer = train_vocab(counts, TokenizerConfig(vocab_size=30, min_frequency=1))
    assert tokenizer.vocab[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    assert len(tokenizer.vocab) <= 30
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("東京の京都", False).ids)[0] in ("東京", "東")


def test_lowercase_vocab_lowercases_latin_letters_like_transformers(tmp_path):
    counts = {"web": 10, "サーバー": 10, "Linux": 5}
    train_vocab(counts, TokenizerConfig(vocab_size=60, min_frequency=1, do_lower_case=True)).save_pretrained(tmp_path)
    ours = JapaneseTokenizer.from_pretrained(tmp_path)
    assert ours.encode("WebサーバーとLinux").ids == AutoTokenizer.from_pretrained(tmp_path)("WebサーバーとLinux")["input_ids"]


def test_directory_without_vocab_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="not a tokenizer directory"):
        JapaneseTokenizer.from_pretrained(tmp_path)


def test_tohoku_v3_directory_without_unidic_names_the_missing_package(tokenizer_dir, tmp_path):
    # bert-base-japanese-v3 is laid out like ours but uses the full unidic dictionary.
    (tmp_path / "vocab.txt").write_text((tokenizer_dir / "vocab.txt").read_text())
    config = {"tokenizer_class": "BertJapaneseTokenizer", "do_lower_case": False, "word_tokenizer_type": "mecab",
              "subword_tokenizer_type": "wordpiece", "mecab_kwargs": {"mecab_dic": "unidic"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    try:
        import unidic  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install unidic"):
            JapaneseTokenizer.from_pretrained(tmp_path)
    else:
        assert JapaneseTokenizer.from_pretrained(tmp_path).mecab_dic == "unidic"


@pytest.mark.parametrize("option, refused", REFUSED_MECAB_OPTIONS)
def test_mecab_option_outside_the_safe_list_is_refused(tokenizer_dir, tmp_path, option, refused):
    path = tohoku_dir(tokenizer_dir, tmp_path, mecab_option=option)
    message = f"MeCab option {re.escape(repr(refused))} .* JBERT_ALLOW_MECAB_OPTION=1"
    with pytest.raises(UserError, match=message) as error:
        JapaneseTokenizer.from_pretrained(path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("option", [None, *SAFE_MECAB_OPTIONS])
def test_tohoku_dir_with_safe_mecab_options_loads_with_transformers_ids(tokenizer_dir, tmp_path, option):
    # A guard, not new behaviour: Tohoku's own dirs (no mecab_option, no dictionary record) load as before.
    path = tohoku_dir(tokenizer_dir, tmp_path, **({"mecab_option": option} if option else {}))
    text = "ｸﾞｸﾞｯﾎﾟｲﾎﾟｲ謎語彙は東京にある。"  # unknown words: -M changes how they group
    ours = JapaneseTokenizer.from_pretrained(path).encode(text).ids
    assert ours == AutoTokenizer.from_pretrained(path)(text)["input_ids"]


def test_refused_mecab_option_passes_when_the_user_allows_it(tokenizer_dir, tmp_path, monkeypatch):
    import fugashi
    import unidic_lite

    # A user dictionary (-u) is the usual reason to trust a directory's options.
    (csv := tmp_path / "user.csv").write_text(USER_DICTIONARY_CSV)
    user_dic = tmp_path / "user.dic"
    # The first word stands for the program's name (argv[0]).
    fugashi.build_dictionary(f'mecab-dict-index -d "{unidic_lite.DICDIR}" -u "{user_dic}" -f utf8 -t utf8 "{csv}"')
    path = tohoku_dir(tokenizer_dir, tmp_path / "tokenizer", mecab_option=f'-u "{user_dic}"')
    with pytest.raises(UserError, match="MeCab option '-u'"):
        JapaneseTokenizer.from_pretrained(path)
    monkeypatch.setenv("JBERT_ALLOW_MECAB_OPTION", "1")
    assert JapaneseTokenizer.from_pretrained(path).words("東京都庁前に行く") == ["東京都庁前", "に", "行く"]


def test_saved_directory_records_the_mecab_dictionary_version(tokenizer_dir):
    import unidic_lite

    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    package = f"unidic-lite=={version('unidic-lite')}"
    assert config["mecab_dictionary"] == {"name": "unidic_lite", "version": unidic_lite.VERSION, "package": package}


def test_directory_made_with_another_dictionary_version_is_refused(tokenizer_dir, tmp_path):
    import unidic_lite

    for name in ("vocab.txt", "tokenizer_config.json"):
        (tmp_path / name).write_text((tokenizer_dir / name).read_text())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["mecab_dictionary"].update(version="2.1.1", package="unidic-lite==1.0.7")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    recorded, installed = "unidic_lite 2.1.1 (unidic-lite==1.0.7), ", f"unidic_lite {unidic_lite.VERSION} "
    with pytest.raises(UserError, match=f"{re.escape(recorded)}.* has {re.escape(installed)}"):
        JapaneseTokenizer.from_pretrained(tmp_path)


def test_character_tokenizer_directories_are_refused(tokenizer_dir, tmp_path):
    (tmp_path / "vocab.txt").write_text((tokenizer_dir / "vocab.txt").read_text())
    config = {"word_tokenizer_type": "mecab", "subword_tokenizer_type": "character"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="character"):
        JapaneseTokenizer.from_pretrained(tmp_path)


HARD_CHARACTERS = st.characters() | st.sampled_from(["\x00", "\u0301", "\u3099", "😀", "\u200d", "\ufeff", "\u200b", "\r"])


@given(text=st.text(HARD_CHARACTERS | st.characters(categories=["Cs"]), max_size=60))
@settings(deadline=None)
def test_any_text_encodes_without_raising(tokenizer, text):
    encoding = tokenizer.encode(text)
    assert encoding.ids[0] == tokenizer.cls_token_id and encoding.ids[-1] == tokenizer.sep_token_id
    assert len(encoding.ids) == len(encoding.word_start)


VALID_CHARACTERS = st.characters(exclude_categories=["Cs"]) | st.sampled_from(["\u0301", "\u3099", "😀", "\u200d", "\ufeff", "\r"])


@given(text=st.text(VALID_CHARACTERS.filter(lambda ch: ch != "\x00") | st.sampled_from("東京の猫ですア"), max_size=60)
       | st.text("あ", min_size=90, max_size=120))  # words near WordPiece's 100-character limit
@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_on_valid_unicode_ids_equal_bert_japanese_tokenizer(tokenizer, reference, text):
    assert tokenizer.encode(text).ids == reference(text)["input_ids"]
