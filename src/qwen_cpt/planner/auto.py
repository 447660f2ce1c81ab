"""Start-up resolution of ``auto`` config fields (learning rate, micro-batch, accumulation).

The trainer calls :func:`resolve_auto` once the model is loaded and the data counted, and
:func:`sync_every_micro_batch` when FSDP2 decides when to reduce-scatter.
"""

from __future__ import annotations

import math

from .base import AUTO, GiB, _ConfigView, _positive
from .memory import USABLE_FRACTION, _memory_for, max_micro_batch
from .rules import batch_step_law, batch_step_law_for_steps, recommend_lr, split_batch
from .shapes import ModelShape, ParamCounts, count_params

AUTO_FIELDS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps")
# On CPU the trainer keeps freed blocks in glibc's heap (model.tune_cpu_allocator): its RSS
# peaked at 1.1x to 2.3x the live peak in benchmarks/memory_estimate.py (BENCHMARKS.md), so
# resolve_auto sizes CPU micro-batches against memory / 2.5.
CPU_RSS_FACTOR = 2.5


# --- auto values for the trainer -------------------------------------------------------------------


def _global_batch_tokens(cfg, micro: int, accum: int, world: int) -> int:
    return micro * accum * world * cfg.max_length


def _choose_batch(
    cfg,
    shape,
    p,
    n_tokens: int,
    world: int,
    device: str,
    capacity: float | None,
    shard: int | None = None,
) -> tuple[int, int, str]:
    """``(micro, accum, rule)`` for the config's batch fields, resolving any ``auto``: the
    batch is split over ``world`` ranks, the model's memory over ``shard`` (default: all)."""
    micro_cfg, accum_cfg = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    if micro_cfg != AUTO and accum_cfg != AUTO:
        return micro_cfg, accum_cfg, "from the config"
    if cfg.max_steps > 0:
        target = batch_step_law_for_steps(cfg.max_steps)
        rule = f"Step Law 0.58*D^0.571 with D = max_steps*B ({cfg.max_steps} steps)"
    else:
        trained = n_tokens * cfg.num_train_epochs
        target = batch_step_law(trained)
        rule = f"Step Law 0.58*D^0.571, D = {trained:.3g} tokens"
    rule += f" -> {target:,.0f} tokens per step"
    if target < cfg.max_length * world:  # a step cannot take less than one block per process
        rule += f", less than one block of {cfg.max_length} tokens per process: one block each"
    n_blocks = max(1, math.ceil(n_tokens / cfg.max_length))
    per_device_cap = max(1, n_blocks // world)  # a step cannot take more than the data holds
    per_device = max(1, min(per_device_cap, round(target / cfg.max_length / world)))

    def fits(m: int) -> bool:
        est = _memory_for(cfg, shape, p, m, shard or world, device, capacity)
        return capacity is None or bool(est.fits)

    if micro_cfg == AUTO:
        largest = max_micro_batch(fits, per_device)
        if capacity is not None:
            more = " or more" if largest == per_device else ""
            rule += f"; {capacity / GiB:.1f} GiB allows a micro-batch of {largest}{more}"
    if micro_cfg == AUTO and accum_cfg == AUTO:
        micro, accum = split_batch(per_device * cfg.max_length, cfg.max_length, 1, largest)
    elif micro_cfg == AUTO:
        accum = accum_cfg
        micro = min(max(1, math.ceil(per_device / accum)), largest)
    else:
        micro = micro_cfg
        accum = max(1, round(per_device / micro))
    return micro, accum, rule


def _trained_tokens(cfg, n_tokens: int, batch_tokens: int) -> float:
    if cfg.max_steps > 0:
        return float(cfg.max_steps * batch_tokens)
    return float(n_tokens * cfg.num_train_epochs)


def resolve_auto(
    cfg,
    model,
    n_train_tokens: int,
    world_size: int = 1,
    device_memory_gb: float | None = None,
    device: str | None = None,
    shard_size: int | None = None,
) -> dict[str, tuple[int | float, str]]:
    """Concrete values for the config fields set to ``"auto"``: ``{field: (value, rule)}``.

    Fields that are not ``"auto"`` are left out. ``model`` is the loaded HF model (its
    parameters are counted, its ``config`` gives the shape) or an HF config / config dict.
    ``n_train_tokens``: tokens in the packed training data (one epoch). ``device_memory_gb``
    (GiB) defaults to the CUDA device's total memory, or on CPU to the memory available now plus
    what the model's parameters already take (they are resident when this is called); on CPU
    the estimate must fit in 1 / ``CPU_RSS_FACTOR`` of it, for the allocator's retained heap.
    ``world_size > 1`` assumes FSDP sharding of weights, gradients and optimizer state, as
    ``qwen-cpt plan --gpus`` does; under HSDP, ``shard_size`` (``dp_shard``) is how many ranks
    share one copy of that state, while the batch is still split over all ``world_size``.
    ``device`` ("cuda" or "cpu") is the device that will train, when the model is not on it
    yet (FSDP2 loads on the CPU first).

    Order: the batch first (Step Law from D), then the learning rate, whose Step Law cap needs
    the tokens actually trained (which depends on the batch when ``max_steps`` is set).
    """
    _positive(n_train_tokens=n_train_tokens, world_size=world_size)
    wanted = [f for f in AUTO_FIELDS if getattr(cfg, f) == AUTO]
    if not wanted:
        return {}
    config = getattr(model, "config", model)
    shape = ModelShape.from_config(config)
    p = _counts_of(model, shape)
    device, capacity = _device_capacity(model, device_memory_gb, device)
    if device == "cpu":
        capacity /= CPU_RSS_FACTOR
    bf16 = cfg.use_bf16 and (device == "cuda" or _cpu_bf16())
    flash = getattr(config, "_attn_implementation", None) == "flash_attention_2"
    cfg_view = _ConfigView(cfg, use_bf16=bf16, use_flash_attention=flash)
    out: dict[str, tuple[int | float, str]] = {}
    micro, accum, rule = _choose_batch(
        cfg_view, shape, p, n_train_tokens, world_size, device, capacity, shard_size
    )
    if device == "cpu":
        rule += f" (CPU: memory / {CPU_RSS_FACTOR:g} for the allocator's retained heap)"
    if cfg.per_device_train_batch_size == AUTO:
        out["per_device_train_batch_size"] = (micro, rule)
    if cfg.gradient_accumulation_steps == AUTO:
        out["gradient_accumulation_steps"] = (accum, rule)
    if cfg.learning_rate == AUTO:
        batch_tokens = _global_batch_tokens(cfg, micro, accum, world_size)
        trained = _trained_tokens(cfg, n_train_tokens, batch_tokens)
        lr, lr_rule = recommend_lr(p.total, p.non_embedding, trained)
        out["learning_rate"] = (
            lr,
            f"{lr_rule}; N = {p.total:,} ({p.non_embedding:,} non-embedding), "
            f"D = {trained:.3g} tokens",
        )
    return out


def sync_every_micro_batch(
    cfg, model, world_size: int, device_memory_gb: float
) -> tuple[bool, str]:
    """Whether FSDP2 should reduce-scatter after every micro-batch, and why.

    Syncing on the last micro-batch only saves ``accum - 1`` reduce-scatters per step but holds
    unsharded fp32 gradients (4 B/param) until then; take it when the memory estimate says the
    step still fits the device, else sync every micro-batch.
    """
    config = getattr(model, "config", model)
    shape = ModelShape.from_config(config)
    p = _counts_of(model, shape)
    capacity = device_memory_gb * GiB
    flash = getattr(config, "_attn_implementation", None) == "flash_attention_2"
    view = _ConfigView(cfg, use_flash_attention=flash, fsdp_sync_every_micro_batch=False)
    micro, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    peak = _memory_for(view, shape, p, micro, world_size, "cuda", capacity, accum).peak
    limit = USABLE_FRACTION * capacity
    if peak <= limit:
        return False, f"on the last micro-batch only (estimated peak {peak / GiB:.1f} GiB fits)"
    return True, (
        f"after every micro-batch: holding unsharded gradients until the last would need "
        f"about {peak / GiB:.1f} GiB of {capacity / GiB:.1f} GiB (estimate)"
    )


def fits_sharded(cfg, model, shard: int, device_memory_gb: float) -> bool:
    """Whether a training step's estimated peak fits the device with the model's weights,
    gradients and optimizer state sharded over ``shard`` ranks (HSDP's ``dp_shard``)."""
    config = getattr(model, "config", model)
    shape = ModelShape.from_config(config)
    capacity = device_memory_gb * GiB
    micro, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    micro, accum = (1 if micro == AUTO else micro), (1 if accum == AUTO else accum)  # the least
    view = _ConfigView(cfg, fsdp_sync_every_micro_batch=True)
    peak = _memory_for(view, shape, _counts_of(model, shape), micro, shard, "cuda", capacity, accum)
    return peak.peak <= USABLE_FRACTION * capacity


def _counts_of(model, shape: ModelShape) -> ParamCounts:
    """Counts from a real module where one is given (exact for any architecture)."""
    from_shape = count_params(shape)
    if not hasattr(model, "parameters"):
        return from_shape
    from ..model import count_parameters

    total, non_emb = count_parameters(model)
    matrices = from_shape.matrices if total == from_shape.total else non_emb
    return ParamCounts(
        total=total,
        non_embedding=non_emb,
        embedding=from_shape.embedding,
        lm_head=total - non_emb - from_shape.embedding,
        per_layer=from_shape.per_layer,
        matrices=matrices,
        largest_matrix=from_shape.largest_matrix,
    )


def _device_capacity(
    model, device_memory_gb: float | None, device: str | None = None
) -> tuple[str, float]:
    params = list(model.parameters()) if hasattr(model, "parameters") else []
    if device is None:
        device = "cuda" if params and params[0].device.type == "cuda" else "cpu"
    if device_memory_gb is not None:
        _positive(device_memory_gb=device_memory_gb)
        return device, device_memory_gb * GiB
    if device == "cuda":
        import torch

        return device, float(
            torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        )
    import psutil

    resident = sum(p.numel() * p.element_size() for p in params)
    return device, float(psutil.virtual_memory().available + resident)


def _cpu_bf16() -> bool:
    from ..model import cpu_has_native_bf16

    return cpu_has_native_bf16()
