"""``training_mode: auto``: the most faithful training mode that fits the device, chosen at
start-up from the model's shape and the memory estimate (:mod:`.memory`), before the model is
loaded (QLoRA quantizes while loading, and CPU offload shapes the process group).

The candidates, most faithful to full training first, are those ``qwen-cpt plan`` lists
(:func:`.plan.lean_modes`): full training as configured; CPU offload (on a GPU only: on a
CPU, device and host are one memory); bf16, then 8-bit optimizer states; freeze-tuning of the
most layers that fit; LoRA with the embeddings and head trained, then adapters only; QLoRA the
same two ways. Under torchrun (several processes) the lean modes are refused, so only full
training and CPU offload are candidates.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .auto import CPU_RSS_FACTOR
from .base import AUTO, GiB
from .memory import USABLE_FRACTION, _memory_for
from .shapes import ModelShape, count_params


class NoModeFits(ValueError):
    """Not even the leanest mode fits; the message says what was tried."""


def choose_mode(
    cfg,
    shape: ModelShape,
    *,
    world_size: int,
    device: str,
    capacity_bytes: float,
    host_bytes: float | None = None,
) -> tuple[dict[str, Any], str]:
    """``(fields to set, why)`` for the most faithful mode whose estimated peak fits
    ``USABLE_FRACTION`` of ``capacity_bytes`` (on a CPU: of the memory / ``CPU_RSS_FACTOR``,
    as ``auto`` batches are sized there). ``{}`` when full training as configured fits.
    ``host_bytes``: the host memory free for CPU offload's weights, gradients and optimizer
    state (per process); None: not checked (``qwen-cpt plan`` on another machine)."""
    from .auto import _cpu_bf16
    from .plan import lean_modes

    # the candidates are plain configs (training_mode manual) with the precision that will run
    bf16 = cfg.use_bf16 and (device == "cuda" or _cpu_bf16())
    cfg = dataclasses.replace(cfg, training_mode="manual", use_bf16=bf16)
    p = count_params(shape)
    micro = 1 if cfg.per_device_train_batch_size == AUTO else cfg.per_device_train_batch_size
    accum = 2 if cfg.gradient_accumulation_steps == AUTO else cfg.gradient_accumulation_steps
    capacity = capacity_bytes / (CPU_RSS_FACTOR if device == "cpu" else 1.0)
    limit = USABLE_FRACTION * capacity
    where = (
        f"{_size(limit)} usable of {_size(capacity_bytes)}"
        + (f" (CPU: / {CPU_RSS_FACTOR:g} for the allocator's heap)" if device == "cpu" else "")
        + f", micro-batch {micro} x {cfg.max_length} tokens"
    )
    full = _memory_for(cfg, shape, p, micro, world_size, device, capacity, accum).peak
    if full <= limit:
        return {}, f"full training as configured fits: {_size(full)}, {where}"

    def host_fits(host: float) -> bool:
        return host_bytes is None or host <= USABLE_FRACTION * host_bytes

    host_note = "" if host_bytes is None else f", {_size(host_bytes)} host memory free"
    if world_size > 1:
        view = dataclasses.replace(cfg, fsdp_cpu_offload=True)
        est = _memory_for(view, shape, p, micro, world_size, device, capacity, accum)
        off = est.peak
        if off <= limit and host_fits(est.host):
            return {"fsdp_cpu_offload": True}, (
                f"full training needs {_size(full)} per process, CPU offload {_size(off)}; "
                f"{where}; the lean modes run on one process only"
            )
        raise NoModeFits(
            f"training_mode: auto: neither full training ({_size(full)}) nor CPU offload "
            f"({_size(off)}, host {_size(est.host)}) fits {where}{host_note} per process; use "
            "more processes or a shorter max_length"
        )
    modes = lean_modes(cfg, shape, p, micro, accum, 1, capacity, 0.0, device=device, every=True)
    if device == "cpu":  # offload only moves memory from the device to the host: one memory here
        modes = [m for m in modes if not m["flags"].get("fsdp_cpu_offload")]
    for m in modes:
        if m["flags"].get("fsdp_cpu_offload") and not host_fits(m["host_gib"] * GiB):
            m["fits"], m["mode"] = False, f"{m['mode']} (host {_size(m['host_gib'] * GiB)})"
    for m in modes:
        if m["fits"]:
            skipped = [f"{x['mode']} {_size(x['peak_gib'] * GiB)}" for x in modes[: modes.index(m)]]
            return dict(m["flags"]), (
                f"needs {_size(m['peak_gib'] * GiB)}; {where}{host_note}; full training needs "
                f"{_size(full)}"
                + (f"; more faithful, not fitting: {'; '.join(skipped)}" if skipped else "")
            )
    leanest = min(modes, key=lambda m: m["peak_gib"])
    raise NoModeFits(
        f"training_mode: auto: no mode fits {where}: full training needs {_size(full)}, the "
        f"leanest ({leanest['mode']}) {_size(leanest['peak_gib'] * GiB)}; shorten max_length, "
        "lower lora_r, or use a larger device"
    )


def _size(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"


def describe(flags: dict[str, Any]) -> str:
    """The chosen mode in a few words, for config.yaml's ``training_mode_chosen``."""
    if not flags:
        return "full training"
    if flags.get("fsdp_cpu_offload"):
        return "full training, CPU offload"
    if "optimizer_states" in flags:
        return f"full training, {flags['optimizer_states']} optimizer states"
    if flags.get("freeze_trainable_layers"):
        return f"freeze-tuning, last {flags['freeze_trainable_layers']} layers"
    kind = "QLoRA" if flags.get("use_qlora") else "LoRA"
    emb = "embeddings and head trained" if flags.get("lora_train_embeddings") else "adapters only"
    return f"{kind} r={flags.get('lora_r')}, {emb}"
