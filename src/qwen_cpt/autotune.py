"""Start-up measurements that pick the attention kernel and ``torch.compile`` on the run's device.

Which attention is fastest for packed documents, and whether compiling the decoder layers pays,
depends on the GPU, the torch version, the model's shape, the batch, and how many documents a
block holds (FlexAttention skips the blocks its mask rules out; SDPA with a dense block-causal
mask does not). So on CUDA, ``attention_implementation: auto`` and ``use_torch_compile: null``
are decided by measuring, on this device, before the first step:

- a *probe*: one decoder layer with the model's own code and shapes (a copy of the first layer,
  Liger patches and activation checkpointing included, random weights), the rotary embedding,
  and the run's first micro-batch of ``position_ids`` (so the real document boundaries);
- the probe runs as training does: in training mode, with activation checkpointing as
  configured, on the run's micro-batch of several rows (FlashAttention-2 gets it flattened to
  one row, as the loss gives it: qwen_cpt.loss.flatten_packed);
- exactness first: each candidate attention gives the layer's output and input gradient of
  eager attention (plain HF math) with the same block-causal mask, in fp32, on two rows of
  several documents each, or it is not used;
- then time: forward + backward of the probe, plus the mask build (once per forward, shared by
  the layers), counted as ``mask + layers x layer``, median of a few repeats after warm-up;
- compile is kept only when the compiled layer gives the eager layer's results (training
  precision) and is at least ``COMPILE_MARGIN`` faster.

Under torchrun every rank measures, the times are summed over ranks and a candidate must pass on
all of them, so all ranks choose the same. The choice, and what it was measured on, goes into
every checkpoint; a resume on the same kind of device, torch and transformers takes it from
there instead of measuring again, so timing noise cannot switch kernels mid-run. On a CPU nothing is measured: FlexAttention has no
backward there (torch 2.13), and compiling took longer than it saved in the CPU runs measured
(BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .loss import VARLEN_ATTENTION, varlen_kwargs
from .perf import compile_layer, decoder_layers, uncompile_layer

log = logging.getLogger("qwen_cpt")

AUTO_CANDIDATES = ("sdpa", "flex_attention")  # on CUDA; flash_attention_2 first where installed
COMPILE_MARGIN = 0.03  # compile only if >= 3% faster: it costs start-up time and recompiles
COMPILE_KWARGS: dict = {}  # as compile_decoder_layers: inductor, default mode
# exactness check: two rows of 512 tokens, documents of these lengths (a one-token one included)
CHECK_DOCUMENTS = ((97, 1, 150, 3, 261), (300, 2, 180, 30))
CHECK_RTOL = 5e-3  # of the reference's largest value; a leaked or missing key moves it by O(1)
BF16_RTOL = 3e-2  # bf16 rounds each result to about 3 significant digits


@dataclass
class Probe:
    """One decoder layer of the model, ready to run alone on ``device``."""

    layer: torch.nn.Module
    rotary: torch.nn.Module
    config: object  # the layer's own config copy: its _attn_implementation picks the kernel
    position_ids: torch.Tensor  # [batch, seq] on device
    hidden_size: int
    num_layers: int
    device: torch.device
    autocast_dtype: torch.dtype | None  # the training step's autocast (None: fp32)

    def autocast(self):
        dtype = self.autocast_dtype or torch.bfloat16
        return torch.autocast(
            self.device.type, dtype=dtype, enabled=self.autocast_dtype is not None
        )


def make_probe(
    model, position_ids: torch.Tensor, device: torch.device, autocast_dtype=None
) -> Probe | None:
    """A copy of ``model``'s first decoder layer on ``device`` with random fp32 weights, or None
    if the model has no layers and rotary embedding this can run alone."""
    try:
        layers = decoder_layers(model)
    except ValueError:
        return None
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        return None
    # one deepcopy, so the layer's submodules keep sharing a single config object
    layer, config = copy.deepcopy((layers[0], model.config))
    layer = layer.to_empty(device=device).float()  # rank > 0 holds meta tensors until sharding
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            else:  # norm weights 1, biases small
                p.copy_(
                    torch.ones(p.shape)
                    if "norm" in name
                    else torch.randn(p.shape, generator=gen) * 0.02
                )
    try:  # rebuilt from the config: on meta (ranks > 0) its inv_freq buffer holds no data
        rotary = type(rotary)(config=config).to(device)
    except TypeError:
        rotary = copy.deepcopy(rotary).to(device)
    layer.train()  # it measures training: checkpointing (if enabled) recomputes only in train mode
    return Probe(
        layer=layer,
        rotary=rotary,
        config=config,
        position_ids=position_ids.to(device),
        hidden_size=config.hidden_size,
        num_layers=len(layers),
        device=device,
        autocast_dtype=autocast_dtype,
    )


def _set_attention(probe: Probe, impl: str) -> None:
    probe.config._attn_implementation = impl
    for m in probe.layer.modules():  # in case a submodule holds a config of its own
        cfg = getattr(m, "config", None)
        if cfg is not None and cfg is not probe.config:
            cfg._attn_implementation = impl


def _mask(probe: Probe, hidden: torch.Tensor, position_ids: torch.Tensor):
    """What the model builds once per forward for the layers: the attention mask, or for a
    varlen kernel (FlashAttention) the flattened batch's segments."""
    if probe.config._attn_implementation in VARLEN_ATTENTION:
        return varlen_kwargs(position_ids)
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(
        config=probe.config,
        inputs_embeds=hidden,
        attention_mask=None,
        cache=None,
        position_ids=position_ids,
    )


def _layer(probe: Probe, hidden: torch.Tensor, mask, position_ids: torch.Tensor) -> torch.Tensor:
    shape, kwargs = hidden.shape, {}
    if isinstance(mask, dict):  # varlen: one row, as qwen_cpt.loss.flatten_packed gives it
        hidden, position_ids, kwargs, mask = (
            hidden.reshape(1, -1, shape[-1]),
            position_ids.reshape(1, -1),
            mask,
            None,
        )
    out = probe.layer(
        hidden,
        attention_mask=mask,
        position_ids=position_ids,
        position_embeddings=probe.rotary(hidden, position_ids),
        **kwargs,
    )
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(shape)


def _forward_backward(probe: Probe, position_ids: torch.Tensor, seed: int = 0):
    """(output, input gradient) of the probe layer on random hidden states."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    b, s = position_ids.shape
    hidden = torch.randn(b, s, probe.hidden_size, generator=gen).to(probe.device)
    hidden.requires_grad_(True)
    grad_out = torch.randn(b, s, probe.hidden_size, generator=gen).to(probe.device)
    out = _layer(probe, hidden, _mask(probe, hidden, position_ids), position_ids)
    out.backward(grad_out.to(out.dtype))
    probe.layer.zero_grad(set_to_none=True)
    return out.detach().float(), hidden.grad.float()


def check_positions(device) -> torch.Tensor:
    """``[2, 512]`` positions of :data:`CHECK_DOCUMENTS`: two rows, several documents each."""
    rows = [torch.cat([torch.arange(n) for n in docs]) for docs in CHECK_DOCUMENTS]
    return torch.stack(rows).to(device)


def check_attention(probe: Probe, impl: str) -> str | None:
    """None if ``impl`` gives eager attention's output and input gradient on two rows of
    ``CHECK_DOCUMENTS`` (boundaries are sure to be there, a one-token document included,
    whatever the run's data), in training mode, else what went wrong. In fp32; FlashAttention,
    which has no fp32 kernel, in bf16 autocast against eager attention in bf16."""
    pos = check_positions(probe.device)
    half = impl in VARLEN_ATTENTION
    precision = (
        torch.autocast(probe.device.type, dtype=torch.bfloat16)
        if half
        else contextlib.nullcontext()
    )
    try:
        with _fp32_matmuls(), precision:
            _set_attention(probe, "eager")
            ref = _forward_backward(probe, pos)
            _set_attention(probe, impl)
            got = _forward_backward(probe, pos)
    except Exception as exc:  # noqa: BLE001 - a kernel that cannot run here is not a choice
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    bad = _largest_difference(got, ref, BF16_RTOL if half else CHECK_RTOL)
    if bad is None:
        return None
    what, err, scale = bad
    return f"{what} differs from eager attention by {err:.3g} (scale {scale:.3g})"


def _largest_difference(got, ref, rtol: float):
    """(which of output / input gradient, its largest difference, the reference's largest
    value) for the first that differs from ``ref`` by more than ``rtol`` of that value (NaN
    included), or None."""
    for what, a, b in (("output", got[0], ref[0]), ("input gradient", got[1], ref[1])):
        err = (a - b).abs().max().item()
        scale = b.abs().max().item()
        if not err <= rtol * scale + 1e-6:
            return what, err, scale
    return None


@contextlib.contextmanager
def _fp32_matmuls():
    """No TF32 inside: the exactness check compares fp32 results."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], object], device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_micro_batch(probe: Probe, warmup: int = 2, repeats: int = 5) -> float:
    """Seconds of attention-kernel-dependent work per micro-batch: one mask build plus
    ``num_layers`` forward + backward passes of the probe layer, in the training precision."""
    b, s = probe.position_ids.shape
    hidden = torch.randn(b, s, probe.hidden_size, device=probe.device, requires_grad=True)
    grad = torch.randn(b, s, probe.hidden_size, device=probe.device)
    with probe.autocast():
        mask = _mask(probe, hidden, probe.position_ids)  # also the first (compiling) build

        def mask_once():
            return _mask(probe, hidden, probe.position_ids)

        def layer_once():
            out = _layer(probe, hidden, mask, probe.position_ids)
            out.backward(grad.to(out.dtype))
            hidden.grad = None
            probe.layer.zero_grad(set_to_none=True)

        t_mask = _median_seconds(mask_once, probe.device, 1, repeats)
        t_layer = _median_seconds(layer_once, probe.device, warmup, repeats)
    return t_mask + probe.num_layers * t_layer


def _agree(ctx, values: list[float]) -> list[float]:
    """Sum of ``values`` over ranks (every rank then decides alike)."""
    return values if ctx is None else ctx.sum(values)


def choose_attention(probe: Probe, candidates, ctx=None, timer=None):
    """(fastest exact candidate, {candidate: seconds per micro-batch or None if rejected})."""
    timer = timer or time_micro_batch
    times: dict[str, float | None] = {}
    for impl in candidates:
        problem = check_attention(probe, impl)
        ok = problem is None if ctx is None else ctx.all_ok(problem is None)
        if problem is not None:
            log.warning("attention: %s not used: %s", impl, problem)
        elif not ok:
            log.warning("attention: %s not used: it failed its check on another rank", impl)
        seconds = float("inf")
        if ok:
            _set_attention(probe, impl)
            try:
                seconds = timer(probe)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory for one kernel
                log.warning("attention: %s not used: timing it failed: %s", impl, exc)
        seconds = _agree(ctx, [seconds])[0]
        times[impl] = seconds if seconds != float("inf") else None
    usable = {k: v for k, v in times.items() if v is not None}
    if not usable:
        return None, times
    best = min(usable, key=lambda k: (usable[k], candidates.index(k)))
    _set_attention(probe, best)
    return best, times


def choose_compile(probe: Probe, ctx=None, timer=None, **compile_kwargs):
    """(compile?, eager seconds, compiled seconds or None) for the probe's attention.

    The compiled layer must also give the eager layer's output and input gradient, in the
    training precision on the probe's blocks (``compile_mismatch``), or it is not used."""
    timer = timer or time_micro_batch
    eager = _agree(ctx, [timer(probe)])[0]
    compiled = float("inf")
    with probe.autocast():
        reference = _forward_backward(probe, probe.position_ids)
    try:
        compile_layer(probe.layer, **compile_kwargs)  # as the trainer compiles its layers
        with probe.autocast():
            problem = compile_mismatch(
                _forward_backward(probe, probe.position_ids), reference, probe
            )
        if problem:
            log.warning("torch.compile: not used: the compiled layer's %s", problem)
        else:
            compiled = timer(probe, warmup=3)
    except Exception as exc:  # noqa: BLE001 - a compile failure means eager
        log.warning("torch.compile: not used: compiling a decoder layer failed: %s", exc)
    finally:
        uncompile_layer(probe.layer)  # back to eager
    compiled = _agree(ctx, [compiled])[0]
    use = compiled <= (1.0 - COMPILE_MARGIN) * eager
    return use, eager, (compiled if compiled != float("inf") else None)


def compile_mismatch(got, reference, probe: Probe) -> str | None:
    """What differs between the compiled and the eager layer, or None. bf16 rounds each result
    to about 3 significant digits and compiled code fuses and reorders, so the tolerance there
    is wider than fp32's."""
    rtol = BF16_RTOL if probe.autocast_dtype is not None else CHECK_RTOL
    bad = _largest_difference(got, reference, rtol)
    if bad is None:
        return None
    what, err, scale = bad
    return f"{what} differs from eager by {err:.3g} (scale {scale:.3g})"


def measures_on(device: torch.device) -> bool:
    """Whether auto settings are measured on ``device`` (CUDA) or fixed (CPU)."""
    return device.type == "cuda"


class KernelChoice(NamedTuple):
    """What :func:`choose_kernels` settled: the attention, compile or not, and ``record``, the
    JSON-able account a checkpoint keeps (``trainer_state.json``, ``"kernels"``)."""

    attention: str
    compile: bool
    record: dict


def environment(device: torch.device) -> dict:
    """What a measurement depends on besides the model and the batch: the device kind, torch,
    transformers and flash-attn. A resume reuses a checkpoint's choice only when these match."""
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = device.type
    return {
        "device": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "flash_attn": importlib.util.find_spec("flash_attn") is not None,
    }


def reusable(saved: dict | None, device: torch.device) -> tuple[dict | None, str]:
    """``(saved, why)`` if a checkpoint's ``"kernels"`` record can stand for this run's
    measurement, else ``(None, why not)``."""
    if not saved or "attention" not in saved or "compile" not in saved:
        return None, "the checkpoint records no kernel choice"
    then, now = saved.get("measured_on", {}).get("environment"), environment(device)
    if then != now:
        changed = [
            f"{k} {then.get(k) if then else None!r} -> {now[k]!r}"
            for k in now
            if not then or then.get(k) != now[k]
        ]
        return None, "the checkpoint's choice was measured elsewhere (" + ", ".join(changed) + ")"
    return saved, "measured when the run started, reused on resume"


def choose_kernels(
    model,
    cfg,
    runtime,
    first_position_ids: Callable[[], torch.Tensor],
    ctx=None,
    saved: dict | None = None,
) -> KernelChoice:
    """Settle ``attention_implementation`` and ``use_torch_compile`` for this run; returns
    (attention, compile?, record) with ``model`` switched to that attention and every choice
    logged. ``first_position_ids()`` gives the run's first micro-batch positions, read only when
    something is measured. ``saved``: the ``"kernels"`` record of the checkpoint a run resumes
    from; its auto choices are taken as they are (see :func:`reusable`) rather than measured
    again. ``ctx`` (the World) makes every rank decide alike: which candidates there are, each
    check, each time."""
    attn, dev = runtime.attn_implementation, runtime.device
    measured = measures_on(dev)
    has_flash = attn == "flash_attention_2"
    if measured and ctx is not None:
        has_flash = ctx.all_ok(has_flash)  # a rank without flash-attn: none uses it
    auto_attn = cfg.attention_implementation == "auto"
    auto_compile = cfg.use_torch_compile is None
    candidates = (("flash_attention_2",) if has_flash else ()) + AUTO_CANDIDATES
    if attn == "flash_attention_2" and not has_flash:
        attn = "sdpa"
    why = "as configured"
    if auto_attn and not measured:
        why = "on a CPU; FlexAttention has no backward here"
    reused, reuse_why = (None, "")
    if saved is not None and measured and (auto_attn or auto_compile):
        reused, reuse_why = reusable(saved, dev)
        if ctx is not None and not ctx.all_ok(reused is not None):  # all ranks, or none
            reused, reuse_why = None, reuse_why if reused is None else "not so on another rank"
        if reused is None:
            log.info("autotune: measuring again: %s", reuse_why)
    probe, positions = None, None
    if measured and reused is None and (auto_attn or auto_compile):
        positions = first_position_ids()
        probe = make_probe(model, positions, dev, runtime.autocast_dtype)
        if probe is None:
            log.info(
                "autotune: nothing measured (%s has no decoder layer that runs alone)",
                type(model).__name__,
            )
        else:
            fields = [("attention_implementation", auto_attn), ("use_torch_compile", auto_compile)]
            log.info(
                "autotune: measuring on one decoder layer on this GPU, in training mode (set %s "
                "to skip)",
                " and ".join(name for name, auto in fields if auto),
            )
    how = {"attention": "configured" if not auto_attn else "default", "compile": "configured"}
    if reused is not None and auto_attn:
        attn, why, how["attention"] = reused["attention"], reuse_why, "resumed"
    elif probe is not None and auto_attn:
        best, times = choose_attention(probe, candidates, ctx)
        if best is not None:
            attn, why, how["attention"] = best, "measured here: " + _seconds(times), "measured"
        else:
            why = "no candidate passed its check and timing here; the default"
        if cfg.use_flash_attention and not has_flash:
            why += "; flash-attn is not installed: pip install qwen-cpt[gpu]"
    model.set_attn_implementation(attn)  # transformers >= 4.56; the mask follows the config
    log.info("attention: %s (%s)", attn, why)

    use_compile = bool(cfg.use_torch_compile)
    if auto_compile and reused is not None:
        use_compile, how["compile"] = bool(reused["compile"]), "resumed"
        log.info("torch.compile: %s (%s)", "on" if use_compile else "off", reuse_why)
    elif auto_compile and probe is None:
        reason = (
            "nothing to measure" if measured else "on a CPU: compiling took longer than it saved"
        )
        how["compile"] = "default"
        log.info("torch.compile: off (%s)", reason)
    elif auto_compile:
        _set_attention(probe, attn)
        use_compile, eager, compiled = choose_compile(probe, ctx, **COMPILE_KWARGS)
        how["compile"] = "measured"
        log.info(
            "torch.compile: %s (measured here: the layers of a micro-batch take %s eager, "
            "%s compiled)",
            "on" if use_compile else "off",
            _ms(eager),
            _ms(compiled),
        )
    if probe is not None and dev.type == "cuda":  # give its memory back before training, and
        del probe  # start the peak memory statistic (memory_gb) from the training alone
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    if reused is not None:
        measured_on = reused.get("measured_on", {})
    else:
        measured_on = {"environment": environment(dev)}
        if positions is not None:
            measured_on["batch"] = list(positions.shape)
            measured_on["documents"] = int(document_count(positions))
    record = {"attention": attn, "compile": use_compile, "how": how, "measured_on": measured_on}
    return KernelChoice(attn, use_compile, record)


def document_count(position_ids: torch.Tensor) -> int:
    """Documents in a ``[rows, seq]`` packed batch (each row's start begins one)."""
    from .loss import document_starts

    return int(document_starts(position_ids.cpu()).sum())


def _ms(seconds: float | None) -> str:
    return "failed" if seconds is None else f"{seconds * 1e3:.1f} ms"


def _seconds(times: dict[str, float | None]) -> str:
    return ", ".join(f"{k} {_ms(v)}" for k, v in times.items())
