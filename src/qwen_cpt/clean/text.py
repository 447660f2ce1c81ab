"""Text normalization and tokens shared by the cleaning stages.

One token stream serves exact dedup, MinHash shingles and decontamination windows: the text is
NFKC-normalized and case-folded, and its tokens are runs of letters and digits, except that each
Chinese/Japanese character is a token of its own (these scripts put no spaces between words;
(docs/design.md, "Corpus cleaning")). Punctuation, symbols and whitespace separate tokens and are
otherwise dropped, so spacing and punctuation changes do not make two documents differ.
"""

from __future__ import annotations

import re
import unicodedata

# Han (CJK unified ideographs and extensions A, compatibility), Hiragana, Katakana.
CJK_CHARS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK = re.compile(f"[{CJK_CHARS}]")
TOKEN = re.compile(f"[{CJK_CHARS}]|[^\\W_{CJK_CHARS}]+")
# For the quality rules: words, single CJK characters and runs of punctuation (as nltk's
# word_tokenize gives them, which datatrove's English filters were tuned on).
QUALITY_TOKEN = re.compile(f"[{CJK_CHARS}]|[^\\W_{CJK_CHARS}]+|[^\\w\\s]+|_+")
_SENTENCE = re.compile(r"[^.!?。！？\n]+(?:[.!?。！？]+|\n+|$)")


def tokens(text: str) -> list[str]:
    """Normalized tokens of ``text`` (see the module docstring)."""
    return TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())


def normalized(toks: list[str]) -> str:
    """The text exact dedup compares: the tokens joined by single spaces."""
    return " ".join(toks)


def shingles(toks: list[str], n: int) -> list[str]:
    """The ``n``-token shingles of a document (one shingle if it is shorter than ``n``)."""
    if len(toks) <= n:
        return [" ".join(toks)] if toks else []
    return [" ".join(toks[i : i + n]) for i in range(len(toks) - n + 1)]


def cjk_fraction(text: str, sample: int = 4000) -> float:
    """Share of Chinese/Japanese characters among the non-space characters of ``text``'s start."""
    head = text[:sample]
    visible = len(head) - sum(ch.isspace() for ch in head)
    return len(_CJK.findall(head)) / visible if visible else 0.0


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.findall(text) if s.strip()]


def snippet(text: str, limit: int = 300) -> str:
    """The start of a document for the report, on one line."""
    flat = " ".join(text[: limit * 2].split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
