"""The error every config check raises, in a module of its own so that the parts that check
options (the clean options, LoRA) need not import the config they are part of."""

from __future__ import annotations


class ConfigError(ValueError):
    """One or more invalid config values. ``errors`` lists every problem found."""

    def __init__(self, errors: list[str], source: str | None = None):
        self.errors = list(errors)
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"invalid configuration{where} ({len(self.errors)} problem(s)):\n{lines}")
