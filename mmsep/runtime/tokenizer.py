"""CLIP's byte-level BPE tokenizer, without torch.

Produces the same ids as ``open_clip.get_tokenizer('ViT-H-14-378-quickgelu')`` (open_clip's
``SimpleTokenizer`` with its default "lower" cleaning), which is what MMAudio feeds the DFN5B CLIP
text tower. The merge table is open_clip's ``bpe_simple_vocab_16e6.txt.gz``, shipped in ``data/``.

Pipeline: clean (ftfy, HTML unescape twice, whitespace collapse, lower case) -> split into
pre-tokens with CLIP's regex -> map each pre-token's UTF-8 bytes to printable characters -> BPE
merges -> ids, framed by start/end tokens, truncated (end token kept last) and zero-padded.
"""

from __future__ import annotations

import functools
import gzip
import html
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import ftfy
import numpy as np
import regex

from ..model_files import VOCAB_FILE

CONTEXT_LENGTH = 77
START_TOKEN = "<start_of_text>"
END_TOKEN = "<end_of_text>"
END_OF_WORD = "</w>"
# CLIP's vocabulary has 49408 entries: 256 byte symbols, the same 256 with the end-of-word mark,
# the first 48894 merges of the file, and the two special tokens.
NUM_MERGES = 49408 - 2 * 256 - 2


def _byte_symbols() -> list[tuple[int, str]]:
    """(byte value, symbol) pairs in CLIP's vocabulary order.

    Bytes that are printable Latin-1 characters stand for themselves; the other 68 bytes
    (controls, space, soft hyphen, ...) are given the code points 256, 257, ... in byte order.
    The printable ones come first in the vocabulary, which fixes ids 0..255.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    kept = set(printable)
    others = [b for b in range(256) if b not in kept]
    return ([(b, chr(b)) for b in printable]
            + [(b, chr(256 + i)) for i, b in enumerate(others)])


def clean_text(text: str) -> str:
    """open_clip's "lower" cleaning: ftfy, HTML unescape twice, collapse whitespace, lower case."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """Byte-level BPE tokenizer with CLIP's vocabulary; call it like open_clip's tokenizer."""

    def __init__(self, vocab_file: str | os.PathLike = VOCAB_FILE, *, cache_size: int = 65536):
        vocab_file = Path(vocab_file)
        try:
            with gzip.open(vocab_file, "rt", encoding="utf-8") as fh:
                lines = fh.read().split("\n")
        except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
            raise ValueError(f"{vocab_file}: cannot read the CLIP BPE vocabulary ({exc})") from exc
        # The first line is a version header; the merges follow, one "left right" pair per line.
        merges = [tuple(line.split()) for line in lines[1:1 + NUM_MERGES]]
        if len(merges) != NUM_MERGES or any(len(pair) != 2 for pair in merges):
            raise ValueError(f"{vocab_file}: not a CLIP BPE merge list "
                             f"(expected {NUM_MERGES} pairs after the header)")

        symbols = _byte_symbols()
        self._byte_to_symbol = [""] * 256
        for byte, symbol in symbols:
            self._byte_to_symbol[byte] = symbol
        vocab = [s for _, s in symbols]
        vocab += [s + END_OF_WORD for s in vocab]
        vocab += [left + right for left, right in merges]
        vocab += [START_TOKEN, END_TOKEN]
        self.ids = {token: index for index, token in enumerate(vocab)}
        self.vocab_size = len(vocab)
        self.start_id = self.ids[START_TOKEN]
        self.end_id = self.ids[END_TOKEN]
        self._rank = {pair: rank for rank, pair in enumerate(merges)}
        # Special tokens written in the text are kept whole (as open_clip does); then English
        # contractions, runs of letters, single digits, and runs of everything else.
        self._pretoken = regex.compile(
            rf"{regex.escape(START_TOKEN)}|{regex.escape(END_TOKEN)}"
            r"|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
            regex.IGNORECASE)
        self._word_ids = functools.lru_cache(maxsize=cache_size)(self._encode_word)

    def _merge(self, symbols: list[str]) -> list[str]:
        """Apply merges to one word, always taking the best-ranked adjacent pair first."""
        rank = self._rank
        while len(symbols) > 1:
            best, best_rank = None, NUM_MERGES
            for pair in zip(symbols, symbols[1:]):
                r = rank.get(pair, NUM_MERGES)
                if r < best_rank:
                    best, best_rank = pair, r
            if best is None:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _encode_word(self, word: str) -> tuple[int, ...]:
        if word in (START_TOKEN, END_TOKEN):
            return (self.ids[word],)
        symbols = [self._byte_to_symbol[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        return tuple(self.ids[s] for s in self._merge(symbols))

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without start/end tokens or padding."""
        ids: list[int] = []
        for word in self._pretoken.findall(clean_text(text)):
            ids.extend(self._word_ids(word))
        return ids

    def length(self, text: str) -> int:
        """Tokens of ``text`` with its start and end tokens; past the context length the text
        is cut (``__call__``)."""
        return len(self.encode(text)) + 2

    def __call__(self, texts: str | Sequence[str],
                 context_length: int = CONTEXT_LENGTH) -> np.ndarray:
        """(B, context_length) int64 ids: start, text, end, zeros; long texts keep the end token."""
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
            raise TypeError("tokenize expects a string or a list of strings, "
                            f"got {type(texts).__name__}")
        if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)) \
                or context_length < 2:
            raise ValueError(f"context_length must be an integer >= 2, got {context_length!r}")
        out = np.zeros((len(texts), context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.start_id, *self.encode(text)][:context_length - 1]
            ids.append(self.end_id)
            out[row, :len(ids)] = ids
        return out


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> ClipTokenizer:
    """The shared tokenizer over the bundled vocabulary (built on first use, ~0.2 s)."""
    return ClipTokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
    """CLIP token ids for ``texts`` as a numpy int64 array of shape (B, context_length)."""
    return default_tokenizer()(texts, context_length)
