"""Speed accounting and speed options: achieved TFLOP/s and MFU, and per-layer torch.compile.

MFU (model FLOPs utilization) = achieved model FLOP/s / the device's dense bf16 peak. Model
FLOPs per token come from :func:`qwen_cpt.planner.flops_per_token` (torchtitan's convention:
``6 * N_matmul + 6 * L * H * (d_qk + d_v) * S``, LM head included, embedding gather and the
recomputation of activation checkpointing excluded), so the trainer's MFU and the planner's
time estimate use the same count.

Peaks are the datasheet bf16 dense figures of :data:`qwen_cpt.planner.GPUS` (H100 SXM and H200
989 TFLOP/s, A100 312, A10G 125, L40S 362, RTX 4090 165), matched against
``torch.cuda.get_device_name``. On a CPU, or a GPU not in the table, there is no peak and no MFU
unless ``peak_tflops`` is set. Datasheet peaks are not reached in practice: on this workplace's
H200 a bf16 8192^3 matmul ran at about 790 TFLOP/s
(docs/design.md, "Throughput anchors and MFU"), so an MFU against 989 of about 0.8 is the
ceiling there. Variants with a lower peak than the table's entry (H100 PCIe/NVL) need
``peak_tflops``.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch

from .planner import GPUS, ModelShape, PlannerError, flops_per_token

log = logging.getLogger("qwen_cpt")


def gpu_peak_tflops(device_name: str) -> float | None:
    """bf16 dense peak TFLOP/s for a ``torch.cuda.get_device_name`` string, or None if unknown.

    ``"NVIDIA H100 80GB HBM3"`` -> 989, ``"NVIDIA A100-SXM4-40GB"`` -> 312,
    ``"NVIDIA GeForce RTX 4090"`` -> 165. Longer table names are tried first, so a name
    holding one entry as a prefix of another still gets the specific one.
    """
    key = re.sub(r"[\s_-]", "", device_name).upper()
    for name in sorted(GPUS, key=len, reverse=True):
        if re.sub(r"[\s_-]", "", name).upper() in key:
            return GPUS[name].peak_tflops
    return None


def peak_tflops(device: torch.device | str, override: float | None = None) -> float | None:
    """The peak to measure MFU against: ``override`` if given, else the GPU's table entry.

    None on a CPU and on a GPU the table does not know: MFU is then not reported.
    """
    if override is not None:
        if override <= 0:
            raise ValueError(f"peak_tflops: must be > 0, got {override}")
        return float(override)
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return gpu_peak_tflops(torch.cuda.get_device_name(device))


def model_flops_per_token(model_config: Any, seq_len: int) -> float:
    """Training FLOPs per token of a HF model config at sequence length ``seq_len``.

    Raises :class:`qwen_cpt.planner.PlannerError` for architectures the planner cannot size
    (mixture-of-experts, configs without the usual fields).
    """
    return flops_per_token(ModelShape.from_config(model_config), seq_len)


def achieved_tflops(tokens_per_sec: float, flops_token: float) -> float:
    """Model TFLOP/s achieved at ``tokens_per_sec`` (recomputation not counted)."""
    return tokens_per_sec * flops_token / 1e12


def mfu(tokens_per_sec: float, flops_token: float, peak: float) -> float:
    """Model FLOPs utilization: achieved TFLOP/s over ``peak`` TFLOP/s (0.4 means 40%)."""
    if peak <= 0:
        raise ValueError(f"peak: must be > 0 TFLOP/s, got {peak}")
    return achieved_tflops(tokens_per_sec, flops_token) / peak


class FlopsMeter:
    """Turns a logged tokens/s into ``tflops`` (always) and ``mfu`` (when a peak is known).

    Built once per run; if the planner cannot size the model, :meth:`metrics` returns ``{}``
    and says so once in the log, rather than stopping a training run over a metric.
    """

    def __init__(
        self,
        model_config: Any,
        seq_len: int,
        device: torch.device | str,
        override: float | None = None,
    ):
        self.peak = peak_tflops(device, override)
        try:
            self.flops_per_token: float | None = model_flops_per_token(model_config, seq_len)
        except PlannerError as exc:
            self.flops_per_token = None
            log.info("throughput: no TFLOP/s or MFU in the metrics (%s)", exc)
            return
        if self.peak is None:
            log.info(
                "throughput: %.3g GFLOP/token; MFU not reported (no known bf16 peak for %s; "
                "set peak_tflops to report it)",
                self.flops_per_token / 1e9,
                torch.device(device),
            )
        else:
            log.info(
                "throughput: %.3g GFLOP/token, MFU against a peak of %g TFLOP/s",
                self.flops_per_token / 1e9,
                self.peak,
            )

    def metrics(self, tokens_per_sec: float) -> dict[str, float]:
        if self.flops_per_token is None:
            return {}
        out = {"tflops": achieved_tflops(tokens_per_sec, self.flops_per_token)}
        if self.peak is not None:
            out["mfu"] = out["tflops"] / self.peak
        return out


# --- torch.compile ---------------------------------------------------------------------------------


def decoder_layers(model, purpose: str = "use_torch_compile") -> list[torch.nn.Module]:
    """The repeated decoder blocks of a HF causal LM (``model.model.layers`` for Qwen2/Llama);
    ``purpose`` starts the error when there are none."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    layers = getattr(base, "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers):
        return list(layers)
    from transformers.modeling_layers import GradientCheckpointingLayer

    found = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not found:
        raise ValueError(
            f"{purpose}: found no decoder layers in {type(model).__name__} "
            "(expected <base>.layers or transformers GradientCheckpointingLayer blocks)"
        )
    return found


def compile_decoder_layers(model, **compile_kwargs: Any) -> int:
    """``torch.compile`` each decoder layer in place (``use_torch_compile``); returns the count.

    Per layer rather than the whole model: every layer has the same code, so one compiled graph
    serves them all (compile time does not grow with depth), the embedding, mask construction
    and chunked loss stay eager, and parameter names are unchanged, so checkpoints and resume
    are unaffected. Activation checkpointing applied to the layers stays in force (dynamo
    traces the non-reentrant checkpoint). Under FSDP2 call this after ``fully_shard``: each
    layer's ``forward`` is compiled, not its ``__call__``, so the hooks ``fully_shard`` adds run
    eagerly around the compiled code instead of breaking its graph (:func:`compile_layer`).
    Meant for CUDA; on a CPU the first step pays the compilation (about 25 s for a 2-layer
    model on 2 cores) for no gain.
    """
    layers = decoder_layers(model)
    guard_per_layer_recompiles(len(layers))
    for layer in layers:
        compile_layer(layer, **compile_kwargs)
    log.info("torch.compile: %d decoder layers (compiled on their first step)", len(layers))
    return len(layers)


def compile_layer(layer: torch.nn.Module, **compile_kwargs: Any) -> None:
    """Compile ``layer.forward`` and mark the layer compiled as ``Module.compile`` does.

    ``Module.compile`` compiles ``_call_impl``, which runs the module's hooks: FSDP2's
    ``fully_shard`` hooks (all-gather before, reshard after) would then sit inside the compiled
    call, where dynamo skips them with graph breaks (``torch._dynamo.config.skip_fsdp_hooks``).
    Here ``_call_impl`` stays eager, hooks included, and only ``forward`` is compiled.
    ``layer._compiled_call_impl is not None`` tells a compiled layer, as with
    ``Module.compile``; :func:`uncompile_layer` undoes it.
    """
    layer.forward = torch.compile(type(layer).forward.__get__(layer), **compile_kwargs)
    layer._compiled_call_impl = layer._call_impl  # eager hooks around the compiled forward


def uncompile_layer(layer: torch.nn.Module) -> None:
    """Back to eager after :func:`compile_layer` (or ``Module.compile``)."""
    layer.__dict__.pop("forward", None)
    layer._compiled_call_impl = None


def guard_per_layer_recompiles(num_layers: int) -> None:
    """Let the decoder layers share one compiled graph although they differ in int attributes.

    Dynamo specialises on the int attributes of a module by default
    (``torch._dynamo.config.allow_unspec_int_on_nn_module = False``), so attention code that
    uses ``module.layer_idx`` in the traced computation compiles once per layer, and past
    ``recompile_limit`` (8) the remaining layers run uncompiled without an error. Unspecialised,
    such an int becomes a symbolic input after the first recompile: two graphs for any depth.
    The limit is also raised to cover the layers, so a model whose layers differ for another
    reason still compiles every layer (slowly) rather than silently running part eagerly.
    """
    config = torch._dynamo.config
    if hasattr(config, "allow_unspec_int_on_nn_module"):
        config.allow_unspec_int_on_nn_module = True
    if getattr(config, "recompile_limit", None) is not None:
        config.recompile_limit = max(config.recompile_limit, num_layers + 2)


# --- host to device ---------------------------------------------------------------------------------


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``batch`` on ``device``. On CUDA the host tensors are pinned first, so the copy is truly
    asynchronous: ``non_blocking=True`` from pageable memory is a synchronous copy in disguise
    (the CUDA driver stages it through a pinned buffer while the host waits)."""
    device = torch.device(device)
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {
        k: (v.pin_memory() if v.device.type == "cpu" and not v.is_pinned() else v).to(
            device, non_blocking=True
        )
        for k, v in batch.items()
    }
