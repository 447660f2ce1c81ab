"""Causal-LM loss as a *sum* over tokens, so callers can weight micro-batches by token count.

Two paths, numerically the same (tested against HF's own loss to 1e-5 in fp32):
- chunked (``use_fused_loss``): run the decoder, then a fused linear cross-entropy over the LM
  head, chunk by chunk. Each chunk's logits are turned into their gradient in place (softmax
  minus one-hot) and multiplied out into the gradients of the hidden states and of the head
  right away, in the forward pass (Liger-Kernel's FusedLinearCrossEntropy, in plain PyTorch).
  Peak memory holds one chunk of logits instead of ``tokens x vocab`` (for Qwen's 152k
  vocabulary that is 0.6 GiB of fp32 logits per 1k tokens, and as much again for each of their
  gradient and log-softmax), and the head costs 3 matmuls per token, not the 4 of
  recomputing it under activation checkpointing. On a CPU the chunk buffer is allocated once
  and reused, so the step does not page-fault a fresh 0.6 GiB buffer per chunk;
- plain: the model's full logits, then cross-entropy; for architectures whose head does more than
  a linear layer (logit soft-capping, scaling), where the chunked path would be wrong.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX

# Architectures whose logits are exactly ``lm_head(final_hidden_state)``.
CHUNKABLE_MODEL_TYPES = {"qwen2", "qwen3", "llama", "mistral"}


def supports_chunked_loss(model) -> bool:
    return getattr(model.config, "model_type", None) in CHUNKABLE_MODEL_TYPES and hasattr(
        model, model.base_model_prefix
    )


# CPU only: one reusable logits buffer per LM head module, freed with the model. On CUDA the
# caching allocator already reuses the memory.
_WORKSPACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _logits_buffer(head: torch.nn.Module, rows: int, chunk_size: int) -> torch.Tensor:
    weight = head.weight
    shape = (min(chunk_size, rows), weight.shape[0])
    if weight.device.type != "cpu":
        return torch.empty(shape, dtype=torch.float32, device=weight.device)
    buf = _WORKSPACES.get(head)
    if buf is None or buf.shape[0] < shape[0] or buf.shape[1] != shape[1]:
        buf = torch.empty(shape, dtype=torch.float32)
        _WORKSPACES[head] = buf
    return buf


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, chunked.

    Forward computes the loss and the gradients wanted (``want_grad``: one flag each for
    ``hidden``, ``weight`` and ``bias``; backward only scales them by the incoming gradient). A
    frozen head (LoRA, freeze-tuning without trained embeddings) gets no fp32 weight gradient:
    neither its vocab x hidden buffer nor its matmul. Matmuls run
    in ``compute_dtype`` (the autocast dtype, if any), softmax and the loss in fp32, and the
    weight gradient accumulates in fp32 across chunks.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, head, chunk_size, compute_dtype, want_grad):
        rows = hidden.shape[0]
        w = weight.to(compute_dtype)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        want_h, want_w, want_b = want_grad
        grad_h = torch.zeros_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if want_b else None
        want_grad = want_h or want_w or want_b
        buf = _logits_buffer(head, rows, chunk_size)
        on_cpu = hidden.device.type == "cpu"
        for start in range(0, rows, chunk_size):
            y = labels[start : start + chunk_size]
            valid = y != IGNORE_INDEX
            if on_cpu and not bool(valid.any()):  # a host read is free on a CPU, a sync on GPU
                continue
            h = hidden[start : start + chunk_size].to(compute_dtype)
            logits = buf[: h.shape[0]]
            if compute_dtype == torch.float32:
                torch.mm(h, w.t(), out=logits)
            else:
                logits.copy_(torch.mm(h, w.t()))
            if bias is not None:
                logits.add_(bias.float())
            y_safe = y.clamp(min=0).unsqueeze(1)
            target = logits.gather(1, y_safe).squeeze(1)
            row_max = logits.amax(dim=1)
            logits.sub_(row_max.unsqueeze(1)).exp_()  # in place: no second [chunk x vocab]
            denom = logits.sum(dim=1)
            lse = row_max + denom.log()
            loss += torch.where(valid, lse - target, 0.0).sum()
            if not want_grad:
                continue
            # d(sum CE)/d(logits) = softmax - one_hot(label), zero on ignored rows: one scale
            # per row does both, without asking the host whether any row is ignored
            logits.mul_((valid / denom).unsqueeze(1))
            logits.scatter_add_(1, y_safe, -valid.unsqueeze(1).to(logits.dtype))
            g = logits if compute_dtype == torch.float32 else logits.to(compute_dtype)
            if grad_h is not None:
                grad_h[start : start + chunk_size] = torch.mm(g, w).to(hidden.dtype)
            if grad_w is None:
                pass
            elif compute_dtype == torch.float32:
                grad_w.addmm_(g.t(), h)
            else:
                grad_w.add_(torch.mm(g.t(), h))
            if grad_b is not None:
                grad_b.add_(logits.sum(dim=0))
        ctx.grads = (grad_h, grad_w, grad_b) if want_grad else None
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("fused cross-entropy: forward ran without gradients")
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None  # the buffers are scaled in place: a second backward must not reuse them
        w_dtype, b_dtype = ctx.dtypes
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss).to(w_dtype)
        if grad_b is not None:
            grad_b = grad_b.mul_(grad_loss).to(b_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _shift(hidden: torch.Tensor, labels: torch.Tensor, head) -> tuple:
    """``(hidden[:, :-1], labels[:, 1:])`` flattened, and the dtype the head's matmuls use:
    the autocast dtype if autocast is on, else the head's own."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    device_type = h.device.type
    compute_dtype = (
        torch.get_autocast_dtype(device_type)
        if torch.is_autocast_enabled(device_type)
        else head.weight.dtype
    )
    return h, y, compute_dtype


def chunked_lm_loss_sum(
    hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """Sum of next-token cross-entropy over ``hidden[:, :-1]`` vs ``labels[:, 1:]``."""
    h, y, compute_dtype = _shift(hidden, labels, head)
    grad = torch.is_grad_enabled()
    want_grad = (
        grad and h.requires_grad,
        grad and head.weight.requires_grad,
        grad and head.bias is not None and head.bias.requires_grad,
    )
    with torch.autocast(h.device.type, enabled=False):
        return _FusedLinearCrossEntropy.apply(
            h, head.weight, head.bias, y, head, chunk_size, compute_dtype, want_grad
        )


def liger_lm_loss_sum(hidden: torch.Tensor, head, labels: torch.Tensor, fused_ce) -> torch.Tensor:
    """The summed loss through Liger's fused linear cross-entropy (``qwen_cpt.kernels``), its
    matmuls in the same dtype as the chunked path's."""
    h, y, dtype = _shift(hidden, labels, head)
    bias = None if head.bias is None else head.bias.to(dtype)
    with torch.autocast(h.device.type, enabled=False):
        return fused_ce(head.weight.to(dtype), h.to(dtype), y, bias).float()


# Attention kernels that keep packed documents apart only within a one-row batch: with more rows
# transformers runs plain causal attention over each row, so a token would see the earlier
# documents of its block (docs/design.md, "FlashAttention-2 and packed batches").
VARLEN_ATTENTION = {"flash_attention_2", "flash_attention_3"}
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def needs_flattening(model) -> bool:
    """Whether ``model``'s attention needs :func:`flatten_packed` batches."""
    return getattr(model.config, "_attn_implementation", None) in VARLEN_ATTENTION


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Where a document starts in ``position_ids`` ``[rows, seq]``: every row start, and every
    token whose position is not the previous one plus one (transformers' rule for the
    block-causal mask, ``find_packed_sequence_indices``), so the varlen path cuts exactly where
    SDPA's mask does."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def varlen_kwargs(position_ids: torch.Tensor) -> dict:
    """FlashAttention's varlen arguments for ``position_ids`` ``[rows, seq]`` flattened to one
    row: ``cu_seq_lens_q/k`` (int32, on the positions' device) and ``max_length_q/k``.

    Worked out on the host from one small copy of the positions: one sync per micro-batch,
    where transformers' own derivation from ``position_ids`` reads the device twice per layer.
    """
    host = position_ids.detach().to("cpu", non_blocking=False)
    idx = document_starts(host).reshape(-1).nonzero().reshape(-1)
    cu = torch.cat([idx, torch.tensor([host.numel()])]).to(torch.int32)
    max_length = int(cu.diff().max())
    cu = cu.to(position_ids.device)
    return {
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max_length,
        "max_length_k": max_length,
    }


def flatten_packed(batch: dict[str, torch.Tensor]) -> dict:
    """A ``[rows, seq]`` packed batch as one ``[1, rows x seq]`` row, as transformers'
    ``DataCollatorWithFlattening`` builds it: ``position_ids`` keep restarting per document,
    the first token of every row is no target (in the rows it was never one: the loss shifts
    within a row), and the varlen arguments name every document, rows' starts included. The
    summed loss and every token's logits equal those of the batch as rows under SDPA's
    block-causal mask."""
    labels = batch["labels"].clone()
    labels[:, 0] = IGNORE_INDEX  # the row joins: the previous row's last token predicts nothing
    return {
        "input_ids": batch["input_ids"].reshape(1, -1),
        "position_ids": batch["position_ids"].reshape(1, -1),
        "labels": labels.reshape(1, -1),
        **varlen_kwargs(batch["position_ids"]),
    }


def lm_loss_sum(
    model,
    batch: dict[str, torch.Tensor],
    chunked: bool,
    chunk_size: int = 1024,
    fused_ce=None,
):
    """Forward ``batch`` and return the summed token loss (fp32 scalar).

    ``fused_ce``: Liger's verified fused linear cross-entropy, used instead of the chunked loss.
    Under FlashAttention the batch is flattened to one row first (:func:`flatten_packed`).
    """
    if needs_flattening(model) and "cu_seq_lens_q" not in batch:
        batch = flatten_packed(batch)
    varlen = {k: batch[k] for k in VARLEN_KEYS if k in batch}
    kwargs = dict(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=None,  # with restarting position_ids: the block-causal packed mask
        use_cache=False,
        **varlen,
    )
    if chunked:
        base = getattr(model, model.base_model_prefix)
        hidden = base(**kwargs).last_hidden_state
        head = model.get_output_embeddings()
        if fused_ce is not None:
            return liger_lm_loss_sum(hidden, head, batch["labels"], fused_ce)
        return chunked_lm_loss_sum(hidden, head, batch["labels"], chunk_size)
    logits = model(**kwargs).logits
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
