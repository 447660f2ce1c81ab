"""Compatibility shim for the product spec's ``from src.pretrain.cpt import CPTTrainer, CPTConfig``.

Not installed: ``pyproject.toml`` packages ``qwen_cpt`` only. See ``src/pretrain/cpt.py``.
"""
