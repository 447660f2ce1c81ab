"""The product spec's import line, for scripts run from a clone of this repository::

    from src.pretrain.cpt import CPTTrainer, CPTConfig

``src`` is then the repository's ``src/`` folder (a namespace package found through the
script's directory or the current one), and this module re-exports ``qwen_cpt``'s public names.
Installed code should write ``from qwen_cpt import CPTTrainer, CPTConfig``; both name the same
classes. Without an install (``pip install -r requirements_cpt.txt``), ``qwen_cpt`` is taken
from this clone's ``src/`` folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import qwen_cpt
except ModuleNotFoundError as exc:  # a clone that was never installed: use its own src/
    if exc.name != "qwen_cpt":
        raise
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import qwen_cpt

from qwen_cpt import (
    ConfigError,
    CPTConfig,
    CPTTrainer,
    DataError,
    ModelLoadError,
    TrainingError,
    make_tiny_model,
)
from qwen_cpt.checkpoint import CheckpointError
from qwen_cpt.optim import OptimizerSetupError
from qwen_cpt.trainer import ResumeError, TrainingInterrupted

__all__ = [
    "CPTConfig",
    "CPTTrainer",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ModelLoadError",
    "OptimizerSetupError",
    "ResumeError",
    "TrainingError",
    "TrainingInterrupted",
    "make_tiny_model",
]
__version__ = qwen_cpt.__version__
