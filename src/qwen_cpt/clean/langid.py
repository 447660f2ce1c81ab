"""Language identification with py3langid, whose model ships inside its wheel (no download).

py3langid is the maintained fork of langid.py (97 languages, a naive-Bayes model over byte
n-grams); with ``norm_probs=True`` its score is a probability (docs/design.md,
"Corpus cleaning").
"""

from __future__ import annotations

import functools


@functools.cache
def known_languages() -> frozenset[str]:
    """The language codes py3langid can answer."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return frozenset(LanguageIdentifier.from_model_file(MODEL_FILE).nb_classes)


class LanguageId:
    def __init__(self, sample_chars: int = 4000):
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        self.sample_chars = sample_chars

    def classify(self, text: str) -> tuple[str, float]:
        """``(ISO 639-1 code, probability)`` of the start of ``text``."""
        lang, score = self._identifier.classify(text[: self.sample_chars])
        return str(lang), float(score)
