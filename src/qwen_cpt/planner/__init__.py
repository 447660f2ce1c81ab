"""The CPT planner: model size, learning rate, batch, memory and time of a run, before it starts.

Everything here is arithmetic on a model's shape (its ``config.json``), the token count and the
hardware, so ``qwen-cpt plan`` works offline and in milliseconds. The same functions resolve
``learning_rate: auto``, ``per_device_train_batch_size: auto`` and
``gradient_accumulation_steps: auto`` for the trainer (:func:`resolve_auto`).

Modules, each citing its sources:
- :mod:`.shapes`: model shapes and parameter counts;
- :mod:`.flops`: training FLOPs per token (torchtitan's convention, DeepSeek's M);
- :mod:`.rules`: learning-rate and batch rules (Step Law, DeepSeek LLM, the CPT default);
- :mod:`.memory`: memory per device of a training step;
- :mod:`.hardware`: the GPU table and the time of a run;
- :mod:`.auto`: ``auto`` config fields resolved at start-up;
- :mod:`.plan`: the plan ``qwen-cpt plan`` prints; :mod:`.cli`: that command;
- :mod:`.base`: the error type and small helpers they share.
"""

from .auto import (
    AUTO_FIELDS,
    CPU_RSS_FACTOR,
    fits_sharded,
    resolve_auto,
    sync_every_micro_batch,
)
from .base import AUTO, GiB, PlannerError
from .cli import add_plan_parser, run_plan
from .flops import deepseek_flops_per_token, flops_per_token
from .hardware import DEFAULT_MFU, GPU, GPUS, estimate_seconds, lookup_gpu
from .memory import (
    CUDA_OVERHEAD_BYTES,
    USABLE_FRACTION,
    MemoryEstimate,
    activation_bytes_per_token,
    estimate_memory,
    logits_bytes,
    max_micro_batch,
)
from .plan import BYTES_PER_TOKEN_ESTIMATE, Plan, format_plan, make_plan, train_files_tokens
from .rules import (
    SPEC_LR_TABLE,
    batch_deepseek,
    batch_spec,
    batch_step_law,
    batch_step_law_for_steps,
    lr_deepseek,
    lr_spec,
    lr_step_law,
    recommend_lr,
    split_batch,
)
from .shapes import QWEN25_SHAPES, ModelShape, ParamCounts, count_params, load_shape, lookup_shape

__all__ = [
    "AUTO",
    "AUTO_FIELDS",
    "fits_sharded",
    "BYTES_PER_TOKEN_ESTIMATE",
    "CPU_RSS_FACTOR",
    "CUDA_OVERHEAD_BYTES",
    "DEFAULT_MFU",
    "GPU",
    "GPUS",
    "QWEN25_SHAPES",
    "SPEC_LR_TABLE",
    "USABLE_FRACTION",
    "GiB",
    "MemoryEstimate",
    "ModelShape",
    "ParamCounts",
    "Plan",
    "PlannerError",
    "activation_bytes_per_token",
    "add_plan_parser",
    "batch_deepseek",
    "batch_spec",
    "batch_step_law",
    "batch_step_law_for_steps",
    "count_params",
    "deepseek_flops_per_token",
    "estimate_memory",
    "estimate_seconds",
    "flops_per_token",
    "format_plan",
    "load_shape",
    "logits_bytes",
    "lookup_gpu",
    "lookup_shape",
    "lr_deepseek",
    "lr_spec",
    "lr_step_law",
    "make_plan",
    "max_micro_batch",
    "recommend_lr",
    "resolve_auto",
    "run_plan",
    "split_batch",
    "sync_every_micro_batch",
    "train_files_tokens",
]
