"""Quality heuristics: datatrove's Gopher quality, Gopher repetition and FineWeb filters.

The rules and thresholds are datatrove's implementations of the published ones
(docs/design.md, "Quality heuristics"). Two changes make them fit any script:

- datatrove splits words with nltk or spaCy, which need downloaded models; here a small
  :class:`RegexWordTokenizer` (words, single CJK characters, punctuation runs) is passed
  instead, through datatrove's own hook for custom tokenizers;
- the stop-word rule (English stop words) applies to documents langid calls English only;
- a document that is mostly Chinese/Japanese (no spaces between words) is measured in
  characters: each character is a "word", and the mean-word-length and English stop-word rules,
  which have no meaning there, are skipped (docs/design.md, "Corpus cleaning").
"""

from __future__ import annotations

from .options import CleanOptions
from .text import QUALITY_TOKEN, cjk_fraction, sentences

CJK_DOC_FRACTION = 0.3  # a document is measured in characters above this share of CJK
# FineWeb's short line: at most 30 characters; a CJK character is a word's worth of text, so
# there at most 10 (docs/design.md, "Quality heuristics").
SHORT_LINE, SHORT_LINE_CJK = 30, 10


def _word_tokenizer():
    from datatrove.utils.word_tokenizers import WordTokenizer

    class RegexWordTokenizer(WordTokenizer):
        """Words, single CJK characters and punctuation runs; needs no model files."""

        def word_tokenize(self, text: str) -> list[str]:
            return QUALITY_TOKEN.findall(text)

        def sent_tokenize(self, text: str) -> list[str]:
            return sentences(text)

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            spans, at = [], 0
            for s in sentences(text):
                start = text.index(s, at)
                spans.append((start, start + len(s)))
                at = start + len(s)
            return spans

    return RegexWordTokenizer("any")


class QualityFilter:
    """``check(text) -> None`` (kept) or the name of the first rule the document fails."""

    def __init__(self, opts: CleanOptions):
        from datatrove.data import Document
        from datatrove.pipeline.filters import (
            FineWebQualityFilter,
            GopherQualityFilter,
            GopherRepetitionFilter,
        )

        self._document = Document
        tok = _word_tokenizer()
        common = dict(
            min_doc_words=opts.min_words,
            max_doc_words=opts.max_words,
            max_symbol_word_ratio=opts.max_symbol_word_ratio,
            max_bullet_lines_ratio=opts.max_bullet_lines_ratio,
            max_ellipsis_lines_ratio=opts.max_ellipsis_lines_ratio,
            max_non_alpha_words_ratio=opts.min_alpha_words_ratio,  # datatrove's name for it
            language=tok,
        )
        self.gopher = GopherQualityFilter(
            min_avg_word_length=opts.min_mean_word_length,
            max_avg_word_length=opts.max_mean_word_length,
            min_stop_words=opts.min_stop_words,
            **common,
        )
        self.gopher_other = GopherQualityFilter(  # stop words are English ones
            min_avg_word_length=opts.min_mean_word_length,
            max_avg_word_length=opts.max_mean_word_length,
            min_stop_words=None,
            **common,
        )
        self.gopher_cjk = GopherQualityFilter(
            min_avg_word_length=None, max_avg_word_length=None, min_stop_words=None, **common
        )
        self.repetition = GopherRepetitionFilter(
            dup_line_frac=opts.max_dup_line_fraction, language=tok
        )
        fineweb = dict(
            line_punct_thr=opts.min_line_punct_ratio,
            short_line_thr=opts.max_short_line_ratio,
            language=tok,
        )
        self.fineweb = FineWebQualityFilter(short_line_length=SHORT_LINE, **fineweb)
        self.fineweb_cjk = FineWebQualityFilter(short_line_length=SHORT_LINE_CJK, **fineweb)

    def check(self, text: str, lang: str = "en") -> str | None:
        """``lang`` (from langid) decides whether the English stop-word rule applies."""
        doc = self._document(text=text, id="")
        cjk = cjk_fraction(text) > CJK_DOC_FRACTION
        gopher = self.gopher_cjk if cjk else self.gopher if lang == "en" else self.gopher_other
        for name, f in (
            ("gopher", gopher),
            ("gopher_repetition", self.repetition),
            ("fineweb", self.fineweb_cjk if cjk else self.fineweb),
        ):
            try:
                verdict = f.filter(doc)
            except ZeroDivisionError:  # no words at all (only symbols)
                return f"{name}:no_words"
            if verdict is not True:
                reason = verdict[1] if isinstance(verdict, tuple) else "failed"
                return f"{name}:{reason}"
        return None
