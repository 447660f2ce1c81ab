"""The plan of a run as ``qwen-cpt plan`` prints it: :func:`make_plan`, :func:`format_plan`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .auto import _choose_batch, _global_batch_tokens, _trained_tokens
from .base import AUTO, GiB, _positive
from .flops import deepseek_flops_per_token, flops_per_token
from .hardware import DEFAULT_MFU, GPU, GPUS, estimate_seconds
from .memory import (
    USABLE_FRACTION,
    _chunkable,
    _dense_mask_attention,
    _memory_for,
    lean_compute_factor,
    lean_mode_of,
    max_micro_batch,
)
from .mode import lean_modes
from .rules import (
    SPEC_LR_TABLE,
    batch_deepseek,
    batch_spec,
    batch_step_law,
    lr_deepseek,
    lr_spec,
    lr_step_law,
    recommend_lr,
)
from .shapes import ModelShape, count_params

BYTES_PER_TOKEN_ESTIMATE = 3.6  # UTF-8 bytes per Qwen2.5 token, a rough average for mixed text


# --- the plan --------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything ``qwen-cpt plan`` prints; ``to_dict()`` is its ``--json`` output."""

    model: dict[str, Any]
    data: dict[str, Any]
    learning_rate: dict[str, Any]
    batch: dict[str, Any]
    steps: dict[str, Any]
    memory: dict[str, Any]
    time: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_files_tokens(cfg) -> tuple[int, int]:
    """``(bytes, estimated tokens)`` of ``train_files`` (or every ``sources`` entry's files).

    3.6 bytes per token on the whole file size, JSON keys and compression included, so it is a
    rough figure; ``--tokens`` gives the exact one.
    """
    from ..data import expand_paths

    files = expand_paths(cfg.train_files, "train_files")
    for i, src in enumerate(getattr(cfg, "sources", None) or []):
        entries = src["files"] if isinstance(src["files"], list) else [src["files"]]
        files += expand_paths(entries, f"sources[{i}].files")
    n_bytes = sum(f.stat().st_size for f in files if f.is_file())
    return n_bytes, max(1, round(n_bytes / BYTES_PER_TOKEN_ESTIMATE))


def _steps(cfg, n_tokens: int, micro: int, accum: int, world: int) -> tuple[int, int]:
    """``(total, warmup)`` as the trainer counts them (packed blocks -> micro-batches -> steps)."""
    from ..schedule import warmup_steps_for

    if cfg.max_steps > 0:
        total = cfg.max_steps
    else:
        blocks = max(1, math.ceil(n_tokens / cfg.max_length))
        per_device_blocks = math.ceil(blocks / world)
        steps_per_epoch = math.ceil(math.ceil(per_device_blocks / micro) / accum)
        total = math.ceil(steps_per_epoch * cfg.num_train_epochs)
    return total, warmup_steps_for(total, cfg.warmup_ratio)


def _suggestions(cfg, shape, p, micro, accum, world, device, capacity) -> list[str]:
    """Changes, cheapest first and cumulative, until the peak fits; each with its new peak.

    Order: the exact and free one (chunked loss), then reduce-scattering every micro-batch
    under FSDP (more communication, no unsharded gradients), then those that cost time (checkpointing:
    about 30% more compute; a smaller micro-batch at the same global batch), then a different
    optimizer (Muon: on par for CPT per Moonlight), then more devices. A change that does not
    lower the peak (say, a smaller micro-batch while optimizer temporaries dominate) is skipped.
    """
    import dataclasses

    limit = USABLE_FRACTION * capacity
    state = {"cfg": cfg, "micro": micro, "accum": accum, "world": world}
    out: list[str] = []

    def peak(**kw) -> float:
        s = {**state, **kw}
        return _memory_for(
            s["cfg"], shape, p, s["micro"], s["world"], device, capacity, s["accum"]
        ).peak

    def apply(change: str, **kw) -> bool:
        """Take ``change`` if it lowers the peak and record it; True once the run fits."""
        value = peak(**kw)
        if value >= 0.99 * peak():
            return False
        state.update(kw)
        fits = value <= limit
        out.append(f"{change}: peak {value / GiB:.1f} GiB ({'fits' if fits else 'still too big'})")
        return fits

    def cfg_with(**fields):
        return dataclasses.replace(state["cfg"], **fields)

    if not cfg.use_fused_loss and _chunkable(shape.model_type):
        if apply("use_fused_loss: true", cfg=cfg_with(use_fused_loss=True)):
            return out
    if world > 1 and accum > 1 and not cfg.fsdp_sync_every_micro_batch:
        change = "fsdp_sync_every_micro_batch: true (no unsharded gradients between micro-batches)"
        if apply(change, cfg=cfg_with(fsdp_sync_every_micro_batch=True)):
            return out
    if not cfg.use_gradient_checkpointing:
        if apply("use_gradient_checkpointing: true", cfg=cfg_with(use_gradient_checkpointing=True)):
            return out
    if micro > 1:
        sequences = micro * accum

        def fits_micro(m: int) -> bool:
            return peak(micro=m, accum=math.ceil(sequences / m)) <= limit

        best = max_micro_batch(fits_micro, micro)
        new_accum = math.ceil(sequences / best)
        change = (
            f"per_device_train_batch_size: {best}, gradient_accumulation_steps: {new_accum} "
            "(same global batch)"
        )
        if apply(change, micro=best, accum=new_accum):
            return out
    if not cfg.use_muon_optimizer:
        change = "use_muon_optimizer: true (4 B/param less on hidden matrices)"
        if apply(change, cfg=cfg_with(use_muon_optimizer=True)):
            return out
    for n in () if lean_mode_of(cfg) else (2, 4, 8, 16, 32, 64, 128, 256, 512):
        if n > state["world"] and peak(world=n) <= limit:
            apply(f"--gpus {n} (FSDP sharding)", world=n)
            return out
    out.append(
        "even so it does not fit: shorten max_length (activations grow with it) or use devices "
        "with more memory"
    )
    return out


def make_plan(
    cfg,
    shape: ModelShape,
    n_tokens: int,
    *,
    gpus: int = 1,
    gpu: GPU | None = None,
    gpu_memory_gib: float | None = None,
    mfu: float = DEFAULT_MFU,
    shape_source: str = "",
    tokens_source: str = "",
) -> Plan:
    """Plan a run of ``cfg`` on ``gpus`` devices over ``n_tokens`` training tokens per epoch."""
    _positive(n_tokens=n_tokens, gpus=gpus)
    gpu = gpu or GPUS["H100"]
    capacity = (gpu_memory_gib if gpu_memory_gib is not None else gpu.memory_gib) * GiB
    p = count_params(shape)
    S = cfg.max_length
    fpt = flops_per_token(shape, S)
    micro, accum, batch_rule = _choose_batch(cfg, shape, p, n_tokens, gpus, "cuda", capacity)
    batch_tokens = _global_batch_tokens(cfg, micro, accum, gpus)
    trained = _trained_tokens(cfg, n_tokens, batch_tokens)
    compute = fpt * trained
    ds_compute = deepseek_flops_per_token(shape, S) * trained

    rec_lr, rec_rule = recommend_lr(p.total, p.non_embedding, trained)
    lr_value, lr_from = (
        (rec_lr, "learning_rate: auto, the recommended value")
        if cfg.learning_rate == AUTO
        else (cfg.learning_rate, "from the config")
    )
    total, warmup = _steps(cfg, n_tokens, micro, accum, gpus)
    mem = _memory_for(cfg, shape, p, micro, gpus, "cuda", capacity, accum)
    lean = lean_mode_of(cfg)
    full_seconds = estimate_seconds(trained, fpt, gpus, gpu.peak_tflops, mfu)
    seconds = full_seconds * lean_compute_factor(shape, p, lean)
    impl = getattr(cfg, "attention_implementation", "auto")
    if _dense_mask_attention(cfg, "cuda"):
        attention_note = "memory assumes SDPA with the packed block-causal mask"
    elif impl == "auto":
        attention_note = (
            "memory assumes flash_attention_2 (pip install qwen-cpt[gpu]); with SDPA, packed "
            "documents add a block-causal mask and full-width k/v per layer"
        )
    else:
        attention_note = f"memory assumes {impl}, with no dense mask"
    notes = [attention_note]
    if gpus > 1:
        notes.append(
            f"--gpus {gpus}: memory assumes FSDP/ZeRO-3 sharding of weights, gradients and "
            "optimizer state; the time assumes data parallelism at the same MFU."
        )
    if getattr(cfg, "fsdp_cpu_offload", False):
        notes.append(
            "fsdp_cpu_offload: weights, gradients and optimizer state are in host memory "
            f"({mem.host / 2**30:.1f} GiB per process: fp32 weights and gradients, 8 B/param, "
            "and the optimizer state); the time ignores the per-step host-device copies and the "
            "CPU optimizer step, which make offloaded runs several times slower (not measured)."
        )
    return Plan(
        model={
            "name": cfg.model_name_or_path,
            "shape_source": shape_source,
            "shape": asdict(shape),
            "params_total": p.total,
            "params_non_embedding": p.non_embedding,
            "flops_per_token": fpt,
            "flops_formula": "6*N_matmul + 6*L*H*(d_qk+d_v)*S (torchtitan; lm_head in, "
            "embedding gather out)",
        },
        data={
            "tokens_per_epoch": n_tokens,
            "tokens_source": tokens_source,
            "tokens_trained": trained,
            "epochs": cfg.num_train_epochs if cfg.max_steps <= 0 else None,
            "max_steps": cfg.max_steps if cfg.max_steps > 0 else None,
            "compute_flops": compute,
        },
        learning_rate={
            "value": lr_value,
            "source": lr_from,
            "recommended": rec_lr,
            "recommended_rule": rec_rule,
            "spec": lr_spec(p.total),
            "spec_table": dict(SPEC_LR_TABLE),
            "step_law_upper_bound": lr_step_law(p.non_embedding, trained),
            "deepseek_from_scratch": lr_deepseek(ds_compute),
        },
        batch={
            "global_tokens": batch_tokens,
            "global_sequences": micro * accum * gpus,
            "sequence_length": S,
            "per_device_train_batch_size": micro,
            "gradient_accumulation_steps": accum,
            "devices": gpus,
            "source": batch_rule,
            "step_law_tokens": batch_step_law(trained),
            "deepseek_tokens": batch_deepseek(ds_compute),
            "spec_unitless": batch_spec(p.total, trained),
        },
        steps={
            "total": total,
            "warmup": warmup,
            "warmup_ratio": cfg.warmup_ratio,
            "scheduler": cfg.lr_scheduler_type,
        },
        memory={
            "gpu": gpu.name,
            "capacity_gib": capacity / GiB,
            "usable_gib": USABLE_FRACTION * capacity / GiB,
            "components_gib": {k: v / GiB for k, v in mem.components.items()},
            "component_notes": mem.notes,
            "peak_gib": mem.peak / GiB,
            "peak_formula": mem.formula,
            "fits": mem.fits,
            "suggestions": []
            if mem.fits
            else _suggestions(cfg, shape, p, micro, accum, gpus, "cuda", capacity),
            "lean_mode": lean.describe() if lean else None,
            "modes_that_fit": []
            if mem.fits or lean or gpus > 1
            else lean_modes(cfg, shape, p, micro, accum, gpus, capacity, full_seconds * gpus),
            "training_mode_auto": _auto_choice(cfg, shape, gpus, capacity),
        },
        time={
            "seconds": seconds,
            "hours": seconds / 3600,
            "gpu_peak_tflops": gpu.peak_tflops,
            "gpu_note": gpu.note,
            "mfu": mfu,
            "tokens_per_second_per_device": trained / seconds / gpus,
        },
        notes=notes,
    )


def _auto_choice(cfg, shape, gpus: int, capacity: float) -> str | None:
    """What ``training_mode: auto`` would choose on this GPU (None: the config is manual)."""
    if getattr(cfg, "training_mode", "manual") != "auto":
        return None
    from .mode import NoModeFits, choose_mode, describe

    try:
        flags, why = choose_mode(
            cfg, shape, world_size=gpus, device="cuda", capacity_bytes=capacity
        )
    except NoModeFits as exc:
        return str(exc)
    if flags.get("fsdp_cpu_offload"):  # the trainer checks the host's free memory; say how much
        import dataclasses

        view = dataclasses.replace(cfg, training_mode="manual", fsdp_cpu_offload=True)
        micro = 1 if cfg.per_device_train_batch_size == AUTO else cfg.per_device_train_batch_size
        host = _memory_for(view, shape, count_params(shape), micro, gpus, "cuda", capacity).host
        why += f"; it needs {host / GiB:.0f} GiB of host memory per process, checked at start-up"
    return f"{describe(flags)} ({why})"


def format_plan(plan: Plan) -> str:
    """The human-readable plan."""
    m, d, lr, b, st, mem, t = (
        plan.model,
        plan.data,
        plan.learning_rate,
        plan.batch,
        plan.steps,
        plan.memory,
        plan.time,
    )
    sh = m["shape"]
    lines = [
        f"model      {m['name']}  ({m['shape_source']})",
        f"           {_n(m['params_total'])} parameters, {_n(m['params_non_embedding'])} "
        f"non-embedding; {sh['num_layers']} layers, hidden {sh['hidden_size']}, "
        f"vocab {sh['vocab_size']}{', tied head' if sh['tie_word_embeddings'] else ''}",
        f"data       {_n(d['tokens_per_epoch'])} tokens per epoch ({d['tokens_source']})",
        f"           {_n(d['tokens_trained'])} tokens trained ("
        + (
            f"{d['epochs']:g} epoch(s))"
            if d["max_steps"] is None
            else f"max_steps {d['max_steps']} x global batch)"
        ),
        f"compute    {m['flops_per_token'] / 1e9:.2f} GFLOP/token ({m['flops_formula']}) "
        f"-> {d['compute_flops']:.3g} FLOPs",
        "",
        f"learning rate  {lr['value']:.3g}  ({lr['source']})",
        f"  recommended for CPT  {lr['recommended']:.3g}: {lr['recommended_rule']}",
        f"  spec rule            5e-5*(N/7e9)^-0.25 = {lr['spec']:.3g}; the spec's own table says "
        + ", ".join(f"{k} {v:g}" for k, v in lr["spec_table"].items())
        + " (falls faster than N^-0.25)",
        f"  Step Law             {lr['step_law_upper_bound']:.3g} (from-scratch optimum, "
        "arXiv 2503.04715; an upper bound for CPT)",
        f"  DeepSeek             {lr['deepseek_from_scratch']:.3g} (0.3118*C^-0.125, from "
        "scratch, arXiv 2401.02954; for reference)",
        "",
        f"batch      {b['global_sequences']} sequences x {b['sequence_length']} tokens = "
        f"{_n(b['global_tokens'])} tokens per step ({b['source']})",
        f"           per device: micro-batch {b['per_device_train_batch_size']} x "
        f"accumulation {b['gradient_accumulation_steps']} on {b['devices']} device(s)",
        f"           Step Law 0.58*D^0.571 = {_n(b['step_law_tokens'])} tokens; DeepSeek "
        f"0.2920*C^0.3271 = {_n(b['deepseek_tokens'])} tokens (from scratch); spec (N*D)^0.4 = "
        f"{b['spec_unitless']:.3g} (the spec gives no unit; not used)",
        f"steps      {st['total']} total, {st['warmup']} warmup (warmup_ratio "
        f"{st['warmup_ratio']:g}), then {st['scheduler']}",
        "",
        f"memory per device on {mem['gpu']} ({mem['capacity_gib']:.1f} GiB, "
        f"{mem['usable_gib']:.1f} usable):",
    ]
    for name, gib in mem["components_gib"].items():
        lines.append(f"  {name:<20} {gib:8.2f} GiB  {mem['component_notes'][name]}")
    verdict = "fits" if mem["fits"] else "DOES NOT FIT"
    lines.append(f"  {'peak':<20} {mem['peak_gib']:8.2f} GiB  -> {verdict}: {mem['peak_formula']}")
    if mem.get("lean_mode"):
        lines.append(f"  {'mode':<20} {mem['lean_mode']}")
    if mem.get("training_mode_auto"):
        lines.append(f"  {'training_mode: auto':<20} -> {mem['training_mode_auto']}")
    if mem["suggestions"]:
        lines.append("  to fit, change:")
        lines.extend(f"    - {s}" for s in mem["suggestions"])
    if mem.get("modes_that_fit"):
        lines.append("  modes that fit this one device, most faithful to full training first:")
        for m in mem["modes_that_fit"]:
            flags = ", ".join(f"{k}: {str(v).lower()}" for k, v in m["flags"].items())
            speed = (
                "several times slower (host copies and CPU optimizer step; not measured)"
                if m["hours"] is None
                else f"{m['compute_vs_full']:.0%} of full training's FLOPs, about "
                f"{m['hours']:.3g} h"
                + (
                    " plus the 4-bit dequantization (not measured)"
                    if m["flags"].get("use_qlora")
                    else ""
                )
            )
            lines.append(f"    - {m['mode']}: peak {m['peak_gib']:.1f} GiB, {speed}; set {flags}")
    elif mem["fits"] is False and mem.get("lean_mode") is None and plan.batch["devices"] == 1:
        lines.append("  no lean mode fits this device either (see docs: one GPU)")
    lines += [
        "",
        f"time       {t['hours']:.3g} h at MFU {t['mfu']:g} of {t['gpu_peak_tflops']:g} TFLOP/s "
        f"per device ({_n(t['tokens_per_second_per_device'])} tokens/s/device"
        + (f"; {t['gpu_note']}" if t["gpu_note"] else "")
        + ")",
    ]
    lines += [f"note       {n}" for n in plan.notes]
    return "\n".join(lines)


def _n(x: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"
