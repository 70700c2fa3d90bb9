"""BERT WordPiece tokenization in pure Python: `vocab.txt` in, `input_ids` and `attention_mask` out.

The steps follow the BERT normalizer and pre-tokenizer of the Hugging Face `tokenizers`
library, which the tests use as the reference (checked against version 0.23.3):

1. Clean: drop U+FFFD and every character of category Cc, Cf, Co or Cs (NUL included) except
   tab, newline and carriage return, which count as whitespace like every Unicode White_Space
   character. Unassigned code points (Cn) are kept.
2. Put spaces around CJK ideographs, so each becomes its own word.
3. Strip accents (NFD, then drop non-spacing marks, category Mn) and lower-case, char by char.
4. Split on whitespace, then isolate punctuation: Unicode P* plus the ASCII symbols
   ``!"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~``.
5. Apply greedy longest-match-first WordPiece with a ``##`` prefix on continuation pieces. A
   word longer than 100 characters, or one with a piece missing from the vocabulary, becomes [UNK].

NOTE: character categories come from Python's `unicodedata` (Unicode 14 in Python 3.11),
while the reference uses older tables. A scan of U+0020..U+2FFFF found 503 code points that
tokenize differently: marks, punctuation and format characters that Unicode added in recent
versions, mostly for historic and minority scripts.

Special tokens written inside the text (for example "[SEP]") are tokenized as plain text,
unlike the `tokenizers` library, which matches them first. So user text cannot inject
control tokens into the model input.
"""

from __future__ import annotations

import functools
import unicodedata
from pathlib import Path
from typing import Sequence

import numpy as np

from edgemm.errors import ConfigError, InputError, PackageError
from edgemm.runtime.spec import TextSpec

MAX_CHARS_PER_WORD = 100
CONTINUATION_PREFIX = "##"
WORD_CACHE_SIZE = 1 << 16

# BERT's CJK ranges as the reference implements them. It starts the fifth range at U+2B920
# where BERT's original code starts it at U+2B820, so U+2B820..U+2B91F stay inside words.
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B920, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)
_WHITESPACE_CONTROLS = "\t\n\r"


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in _CJK_RANGES)


def _is_punctuation(char: str) -> bool:
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_removed(char: str) -> bool:
    if char in _WHITESPACE_CONTROLS:
        return False
    return char == "\ufffd" or unicodedata.category(char) in ("Cc", "Cf", "Co", "Cs")


def _lower(text: str) -> str:
    # str.lower() turns a word-final capital sigma into "ς", but the reference lower-cases
    # each character on its own, which always gives "σ".
    return text.replace("\u03a3", "\u03c3").lower()


def _strip_accents(text: str) -> str:
    decomposed = unicodedata.normalize("NFD", text)
    return "".join(char for char in decomposed if unicodedata.category(char) != "Mn")


class WordPieceTokenizer:
    """Turn text into BERT `input_ids` and `attention_mask` with a WordPiece vocabulary.

    Calling the tokenizer on a batch returns int64 arrays of shape [batch, length], each row
    being [CLS] tokens [SEP] followed by [PAD]. Instances are safe to share between threads:
    the only mutable state is the word cache, a thread-safe `functools.lru_cache`.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        max_length: int = 64,
        lowercase: bool = True,
        strip_accents: bool = True,
        cls_token: str = "[CLS]",
        sep_token: str = "[SEP]",
        pad_token: str = "[PAD]",
        unk_token: str = "[UNK]",
        source: str = "the vocabulary",
    ):
        if max_length < 3:
            raise ConfigError(
                f"Text max_length is {max_length}, but [CLS] and [SEP] alone take 2 tokens.",
                "Set a max_length of 3 or more.",
            )
        for token in (cls_token, sep_token, pad_token, unk_token):
            if token not in vocab:
                raise PackageError(
                    f"Special token {token} is missing from {source}.",
                    "Use the vocab.txt the model was trained with.",
                )

        self.vocab = vocab
        self.max_length = max_length
        self.lowercase = lowercase
        self.strip_accents = strip_accents
        self.cls_id = vocab[cls_token]
        self.sep_id = vocab[sep_token]
        self.pad_id = vocab[pad_token]
        self.unk_id = vocab[unk_token]
        self._max_piece_chars = max(len(token) for token in vocab)
        self._word_ids = functools.lru_cache(maxsize=WORD_CACHE_SIZE)(self._compute_word_ids)

    @classmethod
    def from_file(cls, vocab_path: Path, **options) -> "WordPieceTokenizer":
        """Read a BERT `vocab.txt` (one token a line, the line number is the id)."""
        vocab_path = Path(vocab_path)
        try:
            lines = vocab_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError as error:
            raise PackageError(
                f"Vocabulary file {vocab_path} not found.",
                "Pass the vocab.txt that belongs to the model (it sits in every package and checkpoint).",
            ) from error
        except UnicodeDecodeError as error:
            raise PackageError(
                f"Vocabulary file {vocab_path} is not UTF-8 text: {error}.",
                "Pass a BERT vocab.txt with one token per line.",
            ) from error

        vocab: dict[str, int] = {}
        for index, line in enumerate(lines):
            vocab[line.rstrip()] = index
        return cls(vocab, source=str(vocab_path), **options)

    @classmethod
    def from_spec(cls, text_spec: TextSpec, vocab_path: Path) -> "WordPieceTokenizer":
        """Build the tokenizer a `TextSpec` describes, reading `vocab_path`."""
        if text_spec.tokenizer != "wordpiece":
            raise ConfigError(
                f"Tokenizer {text_spec.tokenizer!r} is not supported.",
                "edgemm supports tokenizer 'wordpiece' (BERT vocab.txt).",
            )
        return cls.from_file(
            vocab_path,
            max_length=text_spec.max_length,
            lowercase=text_spec.lowercase,
            strip_accents=text_spec.strip_accents,
            cls_token=text_spec.cls_token,
            sep_token=text_spec.sep_token,
            pad_token=text_spec.pad_token,
            unk_token=text_spec.unk_token,
        )

    def __call__(
        self,
        texts: str | Sequence[str],
        padding: str = "longest",
        max_length: int | None = None,
        first_position: int = 0,
    ) -> dict[str, np.ndarray]:
        """Tokenize a text or a batch of texts.

        `padding="longest"` pads to the longest row of the batch and `"max_length"` pads every
        row to `max_length` (default: the spec's). Longer texts are truncated so that each row
        has at most `max_length` tokens including [CLS] and [SEP].
        Raises `InputError` for a text that is not a string or is empty after cleaning. The
        message gives the text's position, counted from `first_position` (for callers that
        split a larger batch).
        """
        if isinstance(texts, str):
            texts = [texts]
        if padding not in ("longest", "max_length"):
            raise ConfigError(f"padding={padding!r} is invalid.", "Use 'longest' or 'max_length'.")
        limit = self.max_length if max_length is None else max_length
        if limit < 3:
            raise ConfigError(f"max_length={limit} is too small.", "Use 3 or more: [CLS] and [SEP] take 2.")

        rows = [self._encode(text, position, limit - 2) for position, text in enumerate(texts, start=first_position)]
        if not rows:
            raise InputError("The batch of texts is empty.", "Pass at least one text.")

        width = limit if padding == "max_length" else max(len(row) for row in rows)
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for index, row in enumerate(rows):
            input_ids[index, : len(row)] = row
            attention_mask[index, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def tokenize(self, text: str) -> list[str]:
        """Return the WordPiece tokens of one text, without special tokens or truncation."""
        inverse = {index: token for token, index in self.vocab.items()}
        ids = []
        for word in self._words(text):
            ids.extend(self._word_ids(word))
        return [inverse[index] for index in ids]

    def _encode(self, text: object, position: int, max_tokens: int) -> list[int]:
        if not isinstance(text, str):
            raise InputError(
                f"Text at position {position} of the batch is a {type(text).__name__}, not a string.",
                "Pass str values.",
            )
        if not text.strip():
            raise InputError(
                f"Text at position {position} of the batch is empty or whitespace only.",
                "Pass a non-empty text.",
            )

        ids: list[int] = []
        for word in self._words(text):
            ids.extend(self._word_ids(word))
            if len(ids) >= max_tokens:
                break
        if not ids:
            raise InputError(
                f"Text at position {position} of the batch has no tokens after removing control characters: {text!r}.",
                "Pass text with at least one visible character.",
            )
        return [self.cls_id, *ids[:max_tokens], self.sep_id]

    def _words(self, text: str) -> list[str]:
        """Split raw text on whitespace. Cleaning and the rest of the work happen per word."""
        # Removing control characters before the split matters: "a\x0bb" is the word "ab",
        # because vertical tab is a control character in the reference, not whitespace.
        # U+FFFD counts as printable, so it needs its own check.
        if not text.isprintable() or "\ufffd" in text:
            text = "".join(" " if char in _WHITESPACE_CONTROLS else char for char in text if not _is_removed(char))
        return text.split()

    def _compute_word_ids(self, word: str) -> tuple[int, ...]:
        ids: list[int] = []
        for piece in self._pre_tokenize(word):
            ids.extend(self._wordpiece(piece))
        return tuple(ids)

    def _pre_tokenize(self, word: str) -> list[str]:
        if not word.isascii():
            word = "".join(f" {char} " if _is_cjk(char) else char for char in word)
            if self.strip_accents:
                word = _strip_accents(word)
        if self.lowercase:
            word = _lower(word)

        pieces: list[str] = []
        current: list[str] = []
        for char in word:
            if char.isspace() or _is_punctuation(char):
                if current:
                    pieces.append("".join(current))
                    current = []
                if not char.isspace():
                    pieces.append(char)
            else:
                current.append(char)
        if current:
            pieces.append("".join(current))
        return pieces

    def _wordpiece(self, word: str) -> list[int]:
        if len(word) > MAX_CHARS_PER_WORD:
            return [self.unk_id]

        ids = []
        start = 0
        while start < len(word):
            end = min(len(word), start + self._max_piece_chars)
            match = None
            while start < end:
                piece = word[start:end] if start == 0 else CONTINUATION_PREFIX + word[start:end]
                match = self.vocab.get(piece)
                if match is not None:
                    break
                end -= 1
            if match is None:
                return [self.unk_id]
            ids.append(match)
            start = end
        return ids
