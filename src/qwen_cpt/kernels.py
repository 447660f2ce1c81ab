"""Liger-Kernel on CUDA: its fused linear cross-entropy, RMSNorm, SwiGLU and RoPE kernels.

With ``use_liger_kernel`` (on by default), a CUDA run with ``liger-kernel`` installed
(``pip install qwen-cpt[gpu]``) uses Liger's Triton kernels for Qwen2/Qwen3/Llama/Mistral
(Liger reports +20% throughput and -60% memory on Llama-3-8B: docs/design.md, "Liger kernels").
Each part is checked at start-up on the device before it is trusted, because Liger patches
transformers' modules and its API moves between versions:

- the fused linear cross-entropy against PyTorch's ``cross_entropy(hidden @ weight.T)``, loss
  and gradients, on a small random problem;
- the RMSNorm/SwiGLU/RoPE patch on a one-layer model of the same architecture: logits and
  gradients with the patch against the same model without it.

A part that fails its check, or cannot be imported, is not used: one warning says why, any
module-level patch is undone, and the run goes on with qwen-cpt's own chunked loss and
transformers' modules. Elsewhere (CPU, no liger-kernel) nothing changes.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX

log = logging.getLogger("qwen_cpt")

# model_type -> Liger's patch function for it (liger_kernel.transformers)
PATCHES = {
    "qwen2": "apply_liger_kernel_to_qwen2",
    "qwen3": "apply_liger_kernel_to_qwen3",
    "llama": "apply_liger_kernel_to_llama",
    "mistral": "apply_liger_kernel_to_mistral",
}
TOLERANCE = dict(rtol=1e-3, atol=1e-4)  # fp32 on both sides; Triton reorders sums


def enable_liger(model, device: torch.device, world=None) -> Callable | None:
    """Patch ``model`` with Liger's kernels and return its fused linear cross-entropy
    (``fn(weight, hidden, labels, bias) -> summed loss``), each only if it passes its check.

    ``world`` (:class:`qwen_cpt.distributed.World`): under torchrun each part is used only if
    it passed on every rank, so all ranks run the same kernels; every rank takes part in the
    agreement whether liger-kernel imports on it or not."""
    if device.type != "cuda":
        return None
    liger = None
    if importlib.util.find_spec("liger_kernel") is None:
        log.info("kernels: PyTorch's (liger-kernel is not installed: pip install qwen-cpt[gpu])")
    else:
        try:
            liger = importlib.import_module("liger_kernel.transformers")
        except Exception as exc:  # noqa: BLE001 - a broken install must not stop training
            log.warning("kernels: liger-kernel could not be imported (%s); using PyTorch's", exc)
    return apply_liger(liger, model, device, world)


def apply_liger(liger, model, device: torch.device, world=None) -> Callable | None:
    """The checks and the agreement of :func:`enable_liger` for the module ``liger`` (None: not
    available on this rank, which then votes no)."""
    agree = world.all_ok if world is not None else bool
    patch = getattr(liger, PATCHES.get(model.config.model_type, ""), None)
    if liger is not None and patch is None:
        log.info("kernels: Liger has no patch for %s here", model.config.model_type)
    problem = patch_and_verify(model, patch, device, agree)
    if problem and patch is not None:
        log.warning("kernels: Liger's RMSNorm/SwiGLU/RoPE not used: %s", problem)
    elif patch is not None:
        log.info("kernels: Liger's RMSNorm, SwiGLU and RoPE (checked on this device)")
    loss_cls = getattr(liger, "LigerFusedLinearCrossEntropyLoss", None)
    loss = verified_fused_ce(loss_cls, device) if liger is not None else None
    if not agree(loss is not None):
        if loss is not None:
            log.warning(
                "loss: Liger's fused linear cross-entropy not used: it failed on another rank"
            )
        loss = None
    if loss is not None:
        log.info("loss: Liger's fused linear cross-entropy (checked on this device)")
    return loss


def fused_ce_kwargs(loss_cls) -> dict:
    """Arguments for ``loss_cls``: a summed loss, our ignore index, and fp32 accumulation of the
    LM head's weight and bias gradients where its signature offers ``accum_dtype``.

    Liger >= 0.6 sums ``grad_weight`` over its chunks in the parameter's dtype unless
    ``accum_dtype`` is given (docs/design.md, "Liger kernels"): in bf16 that drops the low bits
    of 32 to 128 partial sums; our chunked loss sums in fp32, and so must Liger's."""
    kwargs = dict(ignore_index=IGNORE_INDEX, reduction="sum")
    try:
        params = inspect.signature(loss_cls).parameters
    except (TypeError, ValueError):  # no signature to read: call it as before
        return kwargs
    if "accum_dtype" in params:
        kwargs["accum_dtype"] = torch.float32
    return kwargs


def verified_fused_ce(loss_cls, device: torch.device) -> Callable | None:
    """``loss_cls(**fused_ce_kwargs(loss_cls))`` if it matches PyTorch's loss and gradients,
    else None."""
    if loss_cls is None:
        log.warning("loss: liger-kernel has no LigerFusedLinearCrossEntropyLoss; using ours")
        return None
    try:
        fn = loss_cls(**fused_ce_kwargs(loss_cls))
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(37, 64, generator=gen).to(device)
        weight = (torch.randn(300, 64, generator=gen) * 0.1).to(device)
        labels = torch.randint(0, 300, (37,), generator=gen)
        labels[::5] = IGNORE_INDEX
        labels = labels.to(device)
        results = []
        for compute in (
            lambda h, w: fn(w, h, labels, None),
            lambda h, w: F.cross_entropy(
                h @ w.T, labels, ignore_index=IGNORE_INDEX, reduction="sum"
            ),
        ):
            h = hidden.clone().requires_grad_()
            w = weight.clone().requires_grad_()
            loss = compute(h, w).float()
            loss.backward()
            results.append((loss.detach(), h.grad, w.grad))
        ours, ref = results
        for got, want in zip(ours, ref):
            if got is None or not torch.allclose(got, want, **TOLERANCE):
                raise ValueError("it differs from PyTorch's cross-entropy on a test problem")
    except Exception as exc:  # noqa: BLE001 - anything wrong: fall back to our chunked loss
        log.warning("loss: Liger's fused linear cross-entropy not used (%s); using ours", exc)
        return None
    return fn


def patch_and_verify(model, patch: Callable | None, device: torch.device, agree=bool) -> str | None:
    """Apply ``patch(model=...)``'s kernels to ``model`` if they pass on a one-layer copy of its
    architecture (on every rank: ``agree(ok)`` is True only if it passed on all); else undo the
    module-level changes and say why (None: patched). ``patch=None`` (nothing to apply on this
    rank) still takes part in the agreement."""
    modeling = sys.modules.get(type(model).__module__)
    saved = dict(vars(modeling)) if modeling is not None else {}
    kwargs = dict(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    problem = None if patch is not None else "no Liger patch on this rank"
    if patch is not None:
        try:
            reference = _one_layer_like(model).to(device)
            patched = copy.deepcopy(reference)
            want = _logits_and_grads(reference, device)  # before any patch
            patch(model=patched, **kwargs)
            got = _logits_and_grads(patched, device)
            for g, w in zip(got, want):
                if not torch.allclose(g, w, **TOLERANCE):
                    raise ValueError(
                        f"a one-layer {model.config.model_type} differs with the patch "
                        f"(max {(g - w).abs().max().item():.2e})"
                    )
        except Exception as exc:  # noqa: BLE001 - undo, and train with transformers' modules
            problem = str(exc) or type(exc).__name__
    if agree(problem is None):
        try:
            patch(model=model, **kwargs)
            return None
        except Exception as exc:  # noqa: BLE001
            problem = str(exc) or type(exc).__name__
    elif problem is None:
        problem = "it failed its check on another rank"
    if modeling is not None:
        for name in set(vars(modeling)) - set(saved):
            delattr(modeling, name)
        for name, value in saved.items():
            if vars(modeling).get(name) is not value:
                setattr(modeling, name, value)
    return problem


def _one_layer_like(model):
    """A small random model of ``model``'s class and settings: 1 layer, hidden 64, vocab 256."""
    settings = model.config.to_dict()
    for derived in ("layer_types", "head_dim", "max_window_layers"):  # recomputed for 1 layer
        settings.pop(derived, None)
    settings.update(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        pad_token_id=None,  # the real ids lie outside the small vocabulary
        bos_token_id=None,
        eos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):  # seeded, but the run's own RNG stays as it was
        torch.manual_seed(0)
        return type(model)(type(model.config)(**settings)).float()


def _logits_and_grads(model, device: torch.device) -> list[torch.Tensor]:
    """Logits of a packed batch (two documents) and the gradients of every parameter."""
    ids = torch.arange(24, device=device).remainder(model.config.vocab_size).unsqueeze(0)
    positions = torch.cat([torch.arange(10), torch.arange(14)]).unsqueeze(0).to(device)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits.float()
    logits.square().mean().backward()
    return [logits.detach()] + [p.grad for p in model.parameters() if p.grad is not None]
