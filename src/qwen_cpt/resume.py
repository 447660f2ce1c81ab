"""Which checkpoint a run resumes from, and the refusals that keep a resume exact.

A resume must keep the fields that fix the blocks and their order (``max_length``, packing,
``seed``), the data, the architecture, and the global batch, which fixes what a step is:
``per_device_train_batch_size x gradient_accumulation_steps x processes`` blocks, the next ones
of the stream. How the global batch is split over processes and micro-batches may change: the
step's token-weighted loss does not depend on the split, and DCP reshards the state.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from .checkpoint import (
    FORMAT,
    CheckpointError,
    latest_valid_checkpoint,
    refuse_old_layout,
    verify,
)
from .config import AUTO, ConfigError, CPTConfig

log = logging.getLogger("qwen_cpt")

GEOMETRY_FIELDS = (
    "max_length",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "document_aware_packing",
    "seed",
    "use_muon_optimizer",
    "optimizer_states",
    *(LEAN_FIELDS := (
        "use_lora", "lora_r", "lora_target_modules", "use_dora", "use_qlora", "lora_train_embeddings",
        "freeze_trainable_layers",
    )),
)  # fmt: skip
# a changed optimizer has other state to resume: Muon+AdamW or AdamW alone, fp32 or 8-bit moments;
# a changed lean mode (LoRA, freeze) trains other tensors
FIXED_FIELDS = (
    "max_length", "document_aware_packing", "seed", "use_muon_optimizer", "optimizer_states",
    *LEAN_FIELDS,
)  # fmt: skip
ARCH_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
)
AUTO_FIELDS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps")


class ResumeError(RuntimeError):
    """The checkpoint cannot be resumed with this config; the message names both values."""


def geometry(cfg: CPTConfig, world_size: int) -> dict:
    return {**{k: getattr(cfg, k) for k in GEOMETRY_FIELDS}, "world_size": world_size}


def find_checkpoint(cfg: CPTConfig, out: Path) -> Path | None:
    """The checkpoint ``resume_from_checkpoint`` names (verified), or None to start fresh."""
    spec = cfg.resume_from_checkpoint
    if spec is None:
        return None
    if spec == "auto":
        path = latest_valid_checkpoint(out)
        if path is None:
            log.info("resume_from_checkpoint=auto: no valid checkpoint in %s; starting fresh", out)
        return path
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"resume_from_checkpoint: {spec!r} is not a directory")
    refuse_old_layout(path)
    problem = verify(path)
    if problem:
        raise CheckpointError(f"resume_from_checkpoint: {spec!r} is not usable: {problem}")
    return path


def saved_config(cfg: CPTConfig, out: Path) -> CPTConfig | None:
    """The config a resume would continue (its checkpoint's config.yaml), read before the
    checkpoint is verified: every checkpoint of a run holds the same training mode. None when
    the run starts fresh."""
    spec = cfg.resume_from_checkpoint
    if spec is None:
        return None
    if spec == "auto":
        found = sorted(
            (int(p.name.split("-", 1)[1]), p)
            for p in out.glob("checkpoint-*")
            if p.name.split("-", 1)[1].isdigit() and (p / "config.yaml").is_file()
        )
        if not found:
            return None
        path = found[-1][1]
    else:
        path = Path(spec).expanduser()
    try:
        return CPTConfig.from_yaml(path / "config.yaml")
    except (OSError, ConfigError):
        return None  # resume.check names the problem later


def take_auto_fields(cfg: CPTConfig, path: Path) -> None:
    """``auto`` learning rate / batch fields of a resume come from the checkpoint's config, so
    the run keeps its geometry even if free memory changed."""
    saved = CPTConfig.from_yaml(path / "config.yaml")
    for name in AUTO_FIELDS:
        if getattr(cfg, name) == AUTO:
            setattr(cfg, name, getattr(saved, name))
            log.info("%s: auto -> %s (from %s)", name, getattr(saved, name), path)


def check(path: Path, cfg: CPTConfig, world_size: int, model_config, data) -> dict:
    """Refuse, before training, a resume that could not continue the same run exactly; return
    the checkpoint's ``trainer_state.json``. ``data``: the run's training mixture."""
    from .data import diff_identity

    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    if state.get("format") != FORMAT:
        refuse_old_layout(path)
        raise CheckpointError(f"{path}: checkpoint format {state.get('format')!r}, not {FORMAT}")
    problems = []
    saved, current = state["geometry"], geometry(cfg, world_size)
    for key in FIXED_FIELDS:
        if current[key] != saved.get(key, current[key]):
            problems.append(
                f"{key}: the checkpoint has {saved[key]!r}, this run has {current[key]!r}"
            )
    split = [global_batch(saved), global_batch(current)]
    if split[0][1] != split[1][1]:
        problems.append(
            "global batch (per_device_train_batch_size x gradient_accumulation_steps x "
            f"processes): the checkpoint has {split[0][0]}, this run has {split[1][0]}"
        )
    saved_arch = json.loads((path / "config.json").read_text(encoding="utf-8"))
    arch = model_config.to_dict()
    for key in ARCH_FIELDS:
        if key in saved_arch and saved_arch.get(key) != arch.get(key):
            problems.append(
                f"model {key}: the checkpoint has {saved_arch.get(key)!r}, "
                f"{cfg.model_name_or_path} has {arch.get(key)!r}"
            )
    if state["data_fingerprint"] != data.identity():
        saved_identity = state.get("data_identity")
        changes = diff_identity(saved_identity, data.describe_identity()) if saved_identity else []
        problems.append(
            "training data: "
            + ("; ".join(changes) if changes else "it differs from the checkpoint's")
            + f" (fingerprint {state['data_fingerprint']} -> {data.identity()})"
        )
    if problems:
        raise ResumeError(
            f"cannot resume exactly from {path}:\n  - "
            + "\n  - ".join(problems)
            + f"\nTo continue with new settings, start a new run with model_name_or_path set "
            f"to {path} (its weights are a Hugging Face model)."
        )
    log.info("resuming from %s at step %d", path, state["step"])
    if split[0][0] != split[1][0]:
        log.info(
            "global batch split as %s (the checkpoint: %s): the same blocks per step",
            split[1][0],
            split[0][0],
        )
    return state


def global_batch(geometry: dict) -> tuple[str, int]:
    """``("2 x 4 x 8 = 64 blocks", 64)``: how a step's blocks are split, and how many."""
    parts = [
        geometry["per_device_train_batch_size"],
        geometry["gradient_accumulation_steps"],
        geometry["world_size"],
    ]
    return " x ".join(map(str, parts)) + f" = {math.prod(parts)} blocks", math.prod(parts)
