"""qwen-cpt: efficient continued pretraining of Qwen2.5 and other Hugging Face causal LMs.

from qwen_cpt import CPTTrainer, CPTConfig
trainer = CPTTrainer(CPTConfig(model_name_or_path="Qwen/Qwen2.5-7B", output_dir="./cpt_output"))
final_loss = trainer.train(["your text 1", "your text 2"])
"""

from .config import ConfigError, CPTConfig
from .data import DataError
from .model import ModelLoadError, make_tiny_model
from .trainer import CPTTrainer, TrainingError

__all__ = [
    "CPTConfig",
    "CPTTrainer",
    "ConfigError",
    "DataError",
    "ModelLoadError",
    "TrainingError",
    "make_tiny_model",
]
__version__ = "0.1.0"
