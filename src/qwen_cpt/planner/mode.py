"""``training_mode: auto``: the most faithful training mode that fits the device, chosen at
start-up from the model's shape and the memory estimate (:mod:`.memory`), before the model is
loaded (QLoRA quantizes while loading, and CPU offload shapes the process group).

The candidates, most faithful to full training first, are those ``qwen-cpt plan`` lists
(:func:`lean_modes`): full training as configured; CPU offload (on a GPU only: on a CPU, device
and host are one memory); bf16, then 8-bit optimizer states; freeze-tuning of the
most layers that fit; LoRA with the embeddings and head trained, then adapters only; QLoRA the
same two ways. Under torchrun (several processes) the lean modes are refused, so only full
training and CPU offload are candidates.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .auto import CPU_RSS_FACTOR
from .base import AUTO, GiB
from .memory import USABLE_FRACTION, _memory_for, lean_compute_factor, lean_mode_of
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


def lean_modes(
    cfg, shape, p, micro, accum, gpus, capacity, seconds, device="cuda", every=False
) -> list[dict[str, Any]]:
    """The modes that fit one device when full training does not, most faithful first.

    1. ``fsdp_cpu_offload``: full training, weights, gradients and optimizer state in host RAM;
       exact, but the host-device copies and the CPU optimizer step make it several times
       slower (not measured yet, so no speed is given);
    2. full training with bf16 optimizer states (stochastic rounding): the same update to within
       bf16's rounding of the moments (unbiased), 4 B/param less than fp32 AdamW moments;
       then 8-bit AdamW moments (bitsandbytes): within the moments' blockwise quantization
       error (about 1%), 6 B/param less than fp32 moments;
    3. freeze-tuning with the most trained layers that fit (a subset of full training);
    4. LoRA at ``lora_r`` with the embeddings and head trained (Unsloth's CPT recipe), then
       without them (adapters only: less memory, less like full CPT);
    5. QLoRA, the same two on a 4-bit NF4 base: least memory, and the base itself is changed
       by its quantization error.
    Each with its peak, its FLOPs over full training's and the flags to set. One process only:
    the lean modes do not run under torchrun in this version. ``every``: all of them, each
    with ``fits`` (else only those that fit); ``device``: "cuda" or "cpu".
    """
    limit = USABLE_FRACTION * capacity
    base = dataclasses.replace(  # each candidate is a plain (manual) config of its own
        cfg,
        use_lora=False,
        use_dora=False,
        use_qlora=False,
        freeze_trainable_layers=0,
        training_mode="manual",
    )

    def mode(name: str, flags: dict, view) -> dict[str, Any]:
        mem = _memory_for(view, shape, p, micro, 1, device, capacity, accum)
        factor = lean_compute_factor(shape, p, lean_mode_of(view))
        return {
            "mode": name,
            "flags": flags,
            "peak_gib": mem.peak / GiB,
            "host_gib": mem.host / GiB,
            "fits": mem.peak <= limit,
            "compute_vs_full": factor,
            "hours": None if flags.get("fsdp_cpu_offload") else seconds * factor / gpus / 3600,
        }

    out = []
    if gpus == 1:
        out.append(mode("full training, CPU offload", {"fsdp_cpu_offload": True},
                        dataclasses.replace(base, fsdp_cpu_offload=True)))  # fmt: skip
    if getattr(cfg, "optimizer_states", "fp32") == "fp32":
        out.append(mode("full training, bf16 optimizer states", {"optimizer_states": "bf16"},
                        dataclasses.replace(base, optimizer_states="bf16")))  # fmt: skip
    if getattr(cfg, "optimizer_states", "fp32") in ("fp32", "bf16"):
        out.append(mode("full training, 8-bit AdamW states", {"optimizer_states": "8bit"},
                        dataclasses.replace(base, optimizer_states="8bit")))  # fmt: skip
    layers = [
        k for k in range(shape.num_layers - 1, 0, -1)
        if _memory_for(dataclasses.replace(base, freeze_trainable_layers=k), shape, p, micro, 1,
                       device, capacity, accum).peak <= limit
    ]  # fmt: skip
    if layers:
        k = layers[0]
        out.append(mode(f"freeze-tuning, last {k} of {shape.num_layers} layers",
                        {"freeze_trainable_layers": k},
                        dataclasses.replace(base, freeze_trainable_layers=k)))  # fmt: skip
    for quantized in (False, True):
        for emb in (True, False):
            view = dataclasses.replace(
                base, use_lora=True, lora_train_embeddings=emb, use_qlora=quantized
            )
            flags = {"use_lora": True, "lora_r": cfg.lora_r, "lora_train_embeddings": emb}
            if quantized:
                flags["use_qlora"] = True
            out.append(
                mode(
                    f"{'QLoRA (4-bit base)' if quantized else 'LoRA'} r={cfg.lora_r}"
                    + (", embeddings and head trained" if emb else ", adapters only"),
                    flags,
                    view,
                )
            )
    return out if every else [m for m in out if m["fits"]]


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
