"""Small things every planner module shares: the error type, GiB, ``auto`` and two helpers."""

from __future__ import annotations

import math
from typing import Any

GiB = 2**30
AUTO = "auto"


class PlannerError(ValueError):
    """The planner cannot work out a model shape or a needed number; the message names it."""


def _positive(**values: float) -> None:
    for name, v in values.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise PlannerError(f"{name}: must be a positive number, got {v!r}")


class _ConfigView:
    """A config with a few attributes overridden, without copying or validating it."""

    def __init__(self, cfg, **overrides: Any):
        self._cfg, self._overrides = cfg, overrides

    def __getattr__(self, name: str) -> Any:
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._cfg, name)
