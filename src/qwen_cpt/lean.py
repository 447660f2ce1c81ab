"""Lean modes for one GPU: LoRA / DoRA adapters (through PEFT) and freeze-tuning.

Both train a part of the model and freeze the rest:

- **LoRA / DoRA** (``use_lora``, ``use_dora``): PEFT injects adapters into the HF model in place,
  so the trainer, the loss and the kernels keep using the same model object; the
  :class:`peft.PeftModel` wrapper is kept aside (:func:`peft_wrapper`) for the adapter files.
  ``lora_train_embeddings`` trains ``embed_tokens`` and ``lm_head`` themselves (no PEFT copy,
  so a tied pair stays one tensor and is trained once), as CPT on new text needs.
- **Freeze-tuning** (``freeze_trainable_layers: k``): the last k decoder layers and the final
  norm train, everything else is frozen (LLaMA-Factory's ``freeze``).

Saves (docs/design.md, "LoRA and freeze-tuning"): a ``checkpoint-<step>/`` holds only the
trainable tensors and their optimizer state (the frozen rest is ``model_name_or_path``, loaded
again on resume); ``final/`` and ``best/`` hold the merged full model as a plain HF folder and,
with LoRA, the PEFT adapter in ``adapter/``.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from .config import ConfigError

log = logging.getLogger("qwen_cpt")

ADAPTER_DIR = "adapter"  # final/adapter/: a PEFT adapter (a subfolder, so that from_pretrained
# of final/ reads the merged model, not the adapter: transformers loads an adapter_config.json
# it finds in the folder itself)
_WRAPPERS: dict[int, object] = {}  # id(HF model) -> its PeftModel


def lean_mode(cfg) -> str | None:
    """``"lora"``, ``"dora"``, ``"freeze"`` or None (full training); QLoRA is LoRA or DoRA on a
    4-bit base (``use_qlora``, loaded so by :func:`qwen_cpt.model.load_model`)."""
    if cfg.use_lora:
        return "dora" if cfg.use_dora else "lora"
    return "freeze" if cfg.freeze_trainable_layers else None


def check_world(cfg, world) -> None:
    """Refuse a lean mode or 8-bit/bf16 optimizer states under FSDP2 (torchrun): not
    implemented, and never silently wrong. Called before the model is loaded."""
    states = getattr(cfg, "optimizer_states", "fp32")
    if states != "fp32" and world.sharded:
        why = (
            "bitsandbytes steps plain tensors, not DTensor shards"
            if states == "8bit"
            else "not tested on sharded parameters yet"
        )
        raise ConfigError(
            [
                f"optimizer_states: {states} runs on one process only in this version, not "
                f"under torchrun (FSDP2, {world.size} ranks: {why}); use fp32 states there"
            ]
        )
    for needs_bnb, what in (
        (getattr(cfg, "optimizer_states", "fp32") == "8bit", "optimizer_states: 8bit"),
        (getattr(cfg, "use_qlora", False), "use_qlora"),
    ):
        if needs_bnb:
            from .optim import import_bitsandbytes

            import_bitsandbytes(what)  # installed, or one line now, not after the model loads
    mode = lean_mode(cfg)
    if mode and world.sharded:
        field = "use_lora" if cfg.use_lora else "freeze_trainable_layers"
        raise ConfigError(
            [
                f"{field}: runs on one process only in this version, not under torchrun "
                f"(FSDP2, {world.size} ranks); launch it without torchrun on one GPU"
            ]
        )


def apply_lean_mode(model, cfg):
    """Freeze what does not train and add the adapters; return the same (HF) model object."""
    mode = lean_mode(cfg)
    if mode is None:
        return model
    if mode in ("lora", "dora"):
        _add_lora(model, cfg)
    else:
        _freeze_all_but_last(model, cfg.freeze_trainable_layers)
    if cfg.lora_train_embeddings:
        for p in _table_params(model):
            p.requires_grad_(True)
    trainable = {id(p): p.numel() for p in model.parameters() if p.requires_grad}
    total = sum(_numel(p) for p in {id(p): p for p in model.parameters()}.values())
    name = {"lora": "LoRA", "dora": "DoRA", "freeze": "freeze-tuning"}[mode]
    if getattr(cfg, "use_qlora", False):
        name = f"Q{name} (4-bit NF4 base, double quantization)"
    log.info(
        "%s: training %s of %s parameters (%.2f%%)%s",
        name,
        f"{sum(trainable.values()):,}", f"{total:,}", 100 * sum(trainable.values()) / total,
        ", embeddings and head included" if cfg.lora_train_embeddings else "",
    )  # fmt: skip
    return model


def _numel(p) -> int:
    """Elements of a parameter; a 4-bit one (two per stored byte) counts its full shape."""
    state = getattr(p, "quant_state", None)
    return int(torch.Size(state.shape).numel()) if state is not None else p.numel()


def _table_params(model) -> list[torch.nn.Parameter]:
    params = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not params[0]:
        params.append(head.weight)
    return params


def _add_lora(model, cfg) -> None:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # a dependency; only a broken install lacks it
        raise ConfigError([f"use_lora: needs peft (pip install peft): {exc}"]) from None
    targets = cfg.lora_target_modules
    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        use_dora=cfg.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        wrapper = get_peft_model(model, config)
    except ValueError as exc:  # PEFT's "Target modules ... not found"
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ConfigError([f"lora_target_modules: {first}"]) from None
    _WRAPPERS[id(model)] = wrapper
    # PEFT's wrapper moves nothing; the base model now holds the adapters (all-linear skips the
    # LM head, and lora_target_modules may not name it)


def _freeze_all_but_last(model, k: int) -> None:
    from .perf import decoder_layers

    layers = decoder_layers(model, "freeze_trainable_layers")
    if k > len(layers):
        raise ConfigError(
            [f"freeze_trainable_layers: {k} is more than the model's {len(layers)} layers"]
        )
    model.requires_grad_(False)
    for layer in layers[len(layers) - k :]:
        layer.requires_grad_(True)
    base = getattr(model, model.base_model_prefix)
    norm = getattr(base, "norm", None)
    if isinstance(norm, torch.nn.Module):
        norm.requires_grad_(True)


def peft_wrapper(model):
    """The :class:`peft.PeftModel` around ``model`` (None without LoRA)."""
    return _WRAPPERS.get(id(model))


def is_partial(model) -> bool:
    """Whether some parameters are frozen: checkpoints then hold the trainable ones only."""
    return any(not p.requires_grad for p in model.parameters())


def trainable_names(model) -> set[str]:
    """State-dict names of the trainable parameters (both names of a tied one)."""
    return {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}


def _is_4bit(module) -> bool:
    weight = getattr(module, "weight", None)
    return getattr(weight, "quant_state", None) is not None  # bitsandbytes' Params4bit


def _dequantized(linear) -> torch.Tensor:
    """A 4-bit linear layer's weight in fp32, as its forward computes with it."""
    from peft.utils.integrations import dequantize_bnb_weight

    weight = linear.weight
    return dequantize_bnb_weight(weight, state=weight.quant_state).float()


@torch.no_grad()
def _merge_4bit(module) -> torch.Tensor:
    """A LoRA layer on a 4-bit base, merged in full precision: the dequantized base weight plus
    PEFT's own update for each active adapter (``get_delta_weight``, or the variant's
    ``merge_safe`` for DoRA). PEFT's ``merge()`` would quantize the sum to 4 bits again, which
    loses most of the update."""
    weight = _dequantized(module.get_base_layer())
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        if adapter in module.lora_variant:
            weight = module.lora_variant[adapter].merge_safe(module, adapter, weight)
        else:
            weight = weight + module.get_delta_weight(adapter).float()
    return weight


@torch.no_grad()
def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter merged in, on the CPU; ``model`` is not
    changed (best/ is saved mid-run). Each adapted layer is copied and merged by PEFT itself
    (``merge()``: LoRA's ``W + s*B@A``, DoRA's magnitude-scaled form), one layer at a time.
    QLoRA: a 4-bit base layer is dequantized to fp32 first, adapted or not, so the folder is a
    plain HF model whose logits are the adapter model's."""
    from peft.tuners.lora import LoraLayer

    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def replace(name: str, params: dict[str, torch.Tensor]) -> None:
        for key in [k for k in weights if k.startswith(f"{name}.")]:
            del weights[key]
        for pname, p in params.items():
            weights[f"{name}.{pname}"] = p.detach().cpu()

    lora_names = set()
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        lora_names.add(name)
        base = module.get_base_layer()
        if _is_4bit(base):
            params = {"weight": _merge_4bit(module)}
            if base.bias is not None:
                params["bias"] = base.bias
            replace(name, params)
            continue
        merged = copy.deepcopy(module)
        merged.merge(safe_merge=True)
        replace(name, dict(merged.get_base_layer().named_parameters(recurse=False)))
        del merged
    for name, module in model.named_modules():  # 4-bit layers without an adapter
        inside = any(name == n or name.startswith(f"{n}.") for n in lora_names)
        if not inside and _is_4bit(module):
            params = {"weight": _dequantized(module)}
            if module.bias is not None:
                params["bias"] = module.bias
            replace(name, params)
    return weights


def is_quantized(model) -> bool:
    """Whether the model holds 4-bit layers (QLoRA's base)."""
    return any(_is_4bit(m) for m in model.modules())


def save_plain_model(folder: Path, model, weights: dict[str, torch.Tensor]) -> None:
    """``weights`` as a plain HF folder (safetensors, config without a quantization_config).
    ``save_pretrained`` of a quantized model would write its own 4-bit state instead."""
    from huggingface_hub import save_torch_state_dict

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = next(iter(weights.values())).dtype
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    save_torch_state_dict(weights, folder, metadata={"format": "pt"})


def save_adapter(folder: Path, model, train_embeddings: bool) -> None:
    """The PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``; with
    ``train_embeddings`` also the trained embeddings and head) into ``folder``."""
    wrapper = peft_wrapper(model)
    wrapper.save_pretrained(str(folder), save_embedding_layers=train_embeddings)
