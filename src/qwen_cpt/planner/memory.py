"""Memory per device of one training step: the estimate, by component, and its peak.

Sources (docs/design.md, "Memory arithmetic"):
- Korthikanti et al. 2022 (arXiv 2205.05198): activation memory per layer and selective
  recomputation.
- Memory figures are derived from what PyTorch autograd keeps for this trainer (fp32 master
  weights, bf16 autocast); ``benchmarks/memory_estimate.py`` checks them against measured RSS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..bf16_states import SLICE as _BF16_SLICE
from ..bf16_states import SLICE_BYTES as _BF16_SLICE_BYTES
from .base import GiB, PlannerError, _ConfigView, _positive
from .shapes import ModelShape, ParamCounts, count_params

USABLE_FRACTION = 0.9  # headroom for allocator fragmentation; the verdict compares to 90%
CUDA_OVERHEAD_BYTES = 1.0 * GiB  # CUDA context, cuBLAS and NCCL workspaces (0.5 to 1.5 GiB)


# --- memory ----------------------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """Bytes per device by component; ``peak`` is when they coexist, ``capacity`` what there is.

    Activations, logits and autocast weight copies (the forward/backward transients) die
    before the optimizer step, and its temporaries die before the next forward. The embedding's
    gradient arrives last in backward, when the activations are gone (``embedding_grad``). Gradients are
    freed after each step (``zero_grad(set_to_none=True)``), so with one micro-batch per step
    they grow during backward while the activations shrink, and the peak is
    ``weights + optimizer + max(transients, grads + step temporaries)``; with gradient
    accumulation the gradients of earlier micro-batches are held through the next forward:
    ``weights + optimizer + grads + max(transients, step temporaries)``. Plus ``overhead``.
    """

    components: dict[str, float]
    notes: dict[str, str]
    capacity: float | None = None
    grads_held_in_forward: bool = False  # gradient_accumulation_steps > 1
    # host memory per process that the device does not hold: with fsdp_cpu_offload, the fp32
    # weights, gradients and optimizer state (not part of ``peak``)
    host: float = 0.0

    @property
    def peak(self) -> float:
        c = self.components
        transient = c["weight_copies"] + c["activations"] + c["logits"]
        static = c["weights"] + c["optimizer"] + c["loss_workspace"] + c["overhead"]
        after_backward = max(c["optimizer_step_temp"], c["embedding_grad"])
        if self.grads_held_in_forward:
            return static + c["grads"] + max(transient, after_backward)
        return static + max(transient, c["grads"] + after_backward)

    @property
    def formula(self) -> str:
        transient = "weight_copies + activations + logits"
        static = "weights + optimizer + loss_workspace + overhead"
        late = "max(optimizer_step_temp, embedding_grad)"
        if self.grads_held_in_forward:
            return f"{static} + grads + max({transient}, {late})"
        return f"{static} + max({transient}, grads + {late})"

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.peak <= USABLE_FRACTION * self.capacity


def activation_bytes_per_token(
    shape: ModelShape,
    checkpointing: str,
    act_bytes: int,
    resid_bytes: int = 4,
    mask_len: int = 0,
    checkpoint_every: int = 1,
) -> float:
    """Bytes of saved activations per token of a micro-batch, summed over the decoder.

    Per layer (h hidden, I intermediate, q/kv projection widths), from what autograd saves in
    HF's Qwen2/Llama layer (listed with ``torch.autograd.graph.saved_tensors_hooks``; after
    Korthikanti et al. 2022, arXiv 2205.05198, for a gated MLP and GQA):
    - each RMSNorm: its input and the normalized tensor in fp32 (HF upcasts; the residual stream
      stays fp32 with fp32 master weights), and its output in the compute dtype, which the next
      projection saves;
    - attention: q, k (after RoPE), v and the output (o_proj saves the same storage), plus the
      fp32 log-sum-exp per head; no S^2 scores with a fused kernel. ``mask_len=S > 0``: SDPA
      gets transformers' block-causal mask for packed documents (document-aware packing without
      flash_attention_2), so k and v are expanded to all heads (``repeat_kv``) and SDPA saves the
      mask per layer in the compute dtype (S values per token), besides transformers' boolean
      mask (S bytes per token). flash_attention_2's varlen path, or unpacked SDPA, needs neither;
    - MLP: gate and up outputs, silu(gate) and the product fed to down_proj (4 x I).
    ``full`` checkpointing (one checkpoint per layer, as HF does) keeps only each layer's input
    and recomputes one layer at a time in backward; with ``checkpoint_every=k`` only layers
    0, k, 2k, ... are checkpointed (transformers' ``every_n_layers``) and the others keep all
    their activations. ``selective`` is op-level selective
    recomputation (as torchtitan's): matmul and attention outputs are kept, norms, RoPE and
    activation functions are recomputed. Dropout is off in these models, so no masks.
    """
    if checkpointing not in ("none", "full", "selective"):
        raise PlannerError(f"checkpointing: must be none, full or selective, got {checkpointing!r}")
    h, i = shape.hidden_size, shape.intermediate_size
    q_dim, kv_dim = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    a, r = act_bytes, resid_bytes
    kv_saved = q_dim if mask_len else kv_dim
    mask_per_layer = a * mask_len
    shared_mask = mask_len
    lse = 4 * shape.num_heads
    norm = 2 * r * h + a * h
    attn = a * (q_dim + 2 * kv_saved + q_dim) + lse + mask_per_layer
    mlp = 4 * a * i
    layer = 2 * norm + attn + mlp
    if checkpointing == "none":
        return shape.num_layers * layer + norm + shared_mask
    if checkpointing == "full":
        _positive(checkpoint_every=checkpoint_every)
        n_ckpt = math.ceil(shape.num_layers / checkpoint_every)
        kept = n_ckpt * r * h + (shape.num_layers - n_ckpt) * layer
        return kept + layer + norm + shared_mask
    kept = r * h + a * (q_dim + 2 * kv_saved + q_dim + h + 2 * i + h) + lse + mask_per_layer
    return shape.num_layers * kept + norm + shared_mask


def logits_bytes(
    vocab_size: int,
    hidden_size: int,
    tokens: int,
    chunked: bool,
    chunk_size: int,
    bf16: bool = False,
) -> float:
    """Peak bytes of the LM head's logits and the cross-entropy around them (``loss.py``).

    Plain loss (the model's own logits): at the start of backward three fp32
    ``[tokens x vocab]`` tensors coexist, the log-probabilities cross-entropy saved, their
    gradient and the logits' gradient (in the forward, the bf16 logits, their fp32 copy and the
    log-probabilities, which is not more): 12 B per token and vocabulary entry, so the 0.29 GiB
    of bf16 logits per 1k tokens (docs/design.md, "Memory arithmetic") becomes 1.7 GiB.

    Fused chunked loss (``use_fused_loss``, Liger-Kernel's FusedLinearCrossEntropy): one fp32
    ``[chunk x vocab]`` buffer turned into its own gradient in place (4 B), plus the head's fp32
    weight gradient accumulated over the chunks in the forward and held until backward
    (``vocab x hidden x 4`` B). With bf16 matmuls add a bf16 copy of the chunk (2 B) and of one
    chunk's weight gradient (``vocab x hidden x 2`` B). On a CPU the chunk buffer is a workspace
    kept between steps: see :func:`estimate_memory`.
    """
    if not chunked:
        return 12.0 * vocab_size * tokens
    per_elem = 6.0 if bf16 else 4.0
    return per_elem * vocab_size * (min(tokens, chunk_size) + hidden_size)


# the decoder's linear layers, as LoRA's all-linear finds them: (name, in, out) per layer
def _linears(shape: ModelShape) -> list[tuple[str, int, int]]:
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    return [
        ("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h),
        ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h),
    ]  # fmt: skip


@dataclass(frozen=True)
class LeanMode:
    """What trains in a lean run: LoRA (``lora_r > 0``) or freeze-tuning (``freeze_layers``),
    with or without the embeddings and head (``train_embeddings``)."""

    lora_r: int = 0
    lora_modules: tuple[str, ...] = ("all-linear",)
    dora: bool = False
    freeze_layers: int = 0
    train_embeddings: bool = True
    quantized: bool = False  # QLoRA: the decoder's linear layers held in 4-bit NF4

    def adapter_params(self, shape: ModelShape) -> tuple[int, int]:
        """``(LoRA matrix parameters, DoRA magnitude parameters)`` of the whole decoder."""
        if not self.lora_r:
            return 0, 0
        every = "all-linear" in self.lora_modules
        chosen = [(i, o) for n, i, o in _linears(shape) if every or n in self.lora_modules]
        lora = shape.num_layers * self.lora_r * sum(i + o for i, o in chosen)
        return lora, (shape.num_layers * sum(o for _, o in chosen) if self.dora else 0)

    def trainable(self, shape: ModelShape, p: ParamCounts) -> tuple[int, int]:
        """``(trainable parameters, of which 2-D hidden matrices)``, a tied table once."""
        tables = (p.embedding + p.lm_head) if self.train_embeddings else 0
        if self.lora_r:
            lora, magnitude = self.adapter_params(shape)
            return lora + magnitude + tables, lora
        k = min(self.freeze_layers, shape.num_layers)
        matrices = k * (p.matrices // shape.num_layers)
        return k * p.per_layer + shape.hidden_size + tables, matrices

    def describe(self) -> str:
        what = (
            f"{'Q' if self.quantized else ''}{'DoRA' if self.dora else 'LoRA'} r={self.lora_r} "
            f"on {', '.join(self.lora_modules)}"
            if self.lora_r
            else f"freeze-tuning: the last {self.freeze_layers} layers"
        )
        return what + (", embeddings and head trained" if self.train_embeddings else "")


def lean_compute_factor(shape: ModelShape, p: ParamCounts, lean: LeanMode | None) -> float:
    """Training FLOPs of a lean run over a full one's (6 per weight and token): a frozen matmul
    skips its weight gradient (4 of 6), and with freeze-tuning without trained embeddings the
    layers below the trained ones need no backward at all (2 of 6). Adapters add little."""
    if lean is None:
        return 1.0
    head = shape.vocab_size * shape.hidden_size
    body = p.non_embedding
    head_cost = 6.0 if lean.train_embeddings else 4.0
    if lean.lora_r:
        lora, _ = lean.adapter_params(shape)
        return (4.0 * body + head_cost * head + 6.0 * lora) / (6.0 * (body + head))
    k = min(lean.freeze_layers, shape.num_layers)
    trained = k * p.per_layer
    below = body - trained
    below_cost = 4.0 if lean.train_embeddings else 2.0
    return (below_cost * below + 6.0 * trained + head_cost * head) / (6.0 * (body + head))


def estimate_memory(
    shape: ModelShape,
    *,
    micro_batch: int,
    seq_len: int,
    gradient_accumulation_steps: int = 1,
    world_size: int = 1,
    optimizer: str = "adamw",
    checkpointing: str = "full",
    bf16: bool = True,
    chunked_loss: bool = True,
    loss_chunk_size: int = 1024,
    device: str = "cuda",
    packed_mask: bool | None = None,
    checkpoint_every: int = 1,
    adamw_impl: str = "fused",
    capacity_bytes: float | None = None,
    param_counts: ParamCounts | None = None,
    cpu_offload: bool = False,
    sync_every_micro_batch: bool = False,
    lean: LeanMode | None = None,
    optimizer_states: str = "fp32",
) -> MemoryEstimate:
    """Estimate peak memory per device of one training step of this trainer.

    - weights: fp32 master weights (the trainer loads fp32 and autocasts to bf16), 4 B/param;
    - grads: fp32, 4 B/param;
    - optimizer: AdamW keeps two fp32 moments, 8 B/param (the fp32 master copy is the weights
      themselves, so AdamW totals 16 B/param with weights and grads). Muon keeps one fp32
      momentum on the hidden matrices (4 B) and AdamW's 8 B on embeddings, head, norms, biases;
      ``optimizer_states="8bit"`` (bitsandbytes' AdamW8bit): AdamW's 2-D tensors keep two uint8
      moments and an fp32 scale per 256-element block each, 2.03 B/param; 1-D ones stay fp32;
      ``optimizer_states="bf16"`` (:mod:`qwen_cpt.bf16_states`): AdamW's moments in bf16,
      4 B/param, and Muon's momentum in bf16, 2 B;
    - optimizer_step_temp: ``adamw_impl="fused"`` (the trainer's choice on CPU and CUDA) has
      no temporaries; PyTorch's ``"foreach"`` AdamW allocates one sqrt(v) buffer for a whole
      parameter group, 4 B/param; ``"single"`` (the per-tensor loop) two buffers the size of
      the largest parameter. Muon adds Newton-Schulz on the largest matrix: a few bf16 copies
      and one fp32 update, about 10 B per element. 8-bit AdamW has none on CUDA (one fused
      kernel); on CPU it dequantizes both moments of one tensor to fp32 and computes the update
      with two more fp32 buffers: 20 B per element of the largest tensor (measured). bf16
      states are read into fp32 a slice of 4M elements at a time (24 B per slice element), and
      Muon's bf16 momentum adds its fp32 copy and the rounding's buffers: 14 B per element of
      the largest matrix instead of 10;
    - weight_copies: autocast's cached bf16 copies of every matmul weight, 2 B/param (CUDA bf16
      only; under FSDP the unsharded bf16 working set of about two blocks or the embedding);
    - activations: :func:`activation_bytes_per_token` x micro_batch x seq_len; ``packed_mask``
      (default: off CUDA) when SDPA gets the block-causal mask of packed documents, which
      flash_attention_2's varlen path (CUDA) does without;
    - embedding_grad: at the end of backward the embedding's dense fp32 gradient exists beside
      ``.grad`` until it is added in (with gradient accumulation), and with a tied head the
      head's gradient waits in autograd's input buffer for it: 4 B x vocab x hidden for each;
    - logits: :func:`logits_bytes`; on CPU the fused loss's fp32 chunk buffer
      (4 B x chunk x vocab) is a workspace kept between steps, so it is ``loss_workspace``,
      held even during the optimizer step (on CUDA the caching allocator reuses it instead);
    - overhead: CUDA context and library workspaces (1 GiB), none on CPU.
    ``world_size > 1`` assumes FSDP/ZeRO-3: weights, grads and optimizer state are sharded;
    with gradient accumulation the trainer reduce-scatters on the last micro-batch only, so
    until then each rank also holds unsharded fp32 gradients (4 B/param), unless
    ``sync_every_micro_batch`` (``fsdp_sync_every_micro_batch``). ``cpu_offload``
    (``fsdp_cpu_offload``): weights, gradients and optimizer state live in CPU memory and are
    not counted in ``peak`` but in ``host`` (fp32 weights and gradients, 8 B/param, plus the
    optimizer state, per process); the device holds the unsharded working set of about two
    blocks, in bf16 (fp32 without ``bf16``).
    ``lean`` (LoRA or freeze-tuning, one process): every weight is held in fp32 (4 B/param,
    adapters included), gradients and optimizer state only for what trains; autocast caches a
    bf16 copy only of weights that require grad (frozen ones are cast per use: one transient
    largest matrix); the embedding's and head's gradients exist only when they train; with
    freeze-tuning and frozen embeddings only the trained layers keep activations.
    """
    _positive(micro_batch=micro_batch, seq_len=seq_len, world_size=world_size)
    if optimizer not in ("adamw", "muon"):
        raise PlannerError(f"optimizer: must be adamw or muon, got {optimizer!r}")
    if optimizer_states not in ("fp32", "bf16", "8bit"):
        raise PlannerError(
            f"optimizer_states: must be fp32, bf16 or 8bit, got {optimizer_states!r}"
        )
    if adamw_impl not in ("fused", "foreach", "single"):
        raise PlannerError(f"adamw_impl: must be fused, foreach or single, got {adamw_impl!r}")
    p = param_counts or count_params(shape)
    cuda = device.startswith("cuda")
    shards = world_size
    tokens = micro_batch * seq_len
    act_bytes = 2 if bf16 else 4
    matmul_params = p.matrices + shape.vocab_size * shape.hidden_size

    tables = p.embedding + p.lm_head
    vectors = p.total - p.matrices - tables  # norm gains, biases
    if optimizer == "adamw":
        opt = _moment_bytes(p.matrices + tables, vectors, optimizer_states)
        adamw_group = p.total
        largest_adamw = max(p.embedding, p.lm_head, p.largest_matrix)
    else:
        opt = _momentum_bytes(optimizer_states) * p.matrices + _moment_bytes(
            tables, vectors, optimizer_states
        )
        adamw_group = p.adamw_only
        largest_adamw = max(p.embedding, p.lm_head)
    if optimizer_states == "8bit":
        step_temp = 0.0 if cuda else EIGHT_BIT_CPU_STEP_BYTES * largest_adamw
    elif optimizer_states == "bf16":
        step_temp = BF16_SLICE_BYTES * min(BF16_SLICE, largest_adamw)
    else:
        step_temp = {
            "fused": 0.0,
            "foreach": 4.0 * adamw_group / shards,
            "single": 8.0 * max(p.embedding, p.largest_matrix),
        }[adamw_impl]
    if optimizer == "muon":
        step_temp += _muon_temp_bytes(optimizer_states) * p.largest_matrix

    sharded = world_size > 1 or cpu_offload
    if bf16 and cuda and not sharded:
        copies = 2.0 * matmul_params
    elif sharded:  # FSDP2 unshards in the compute dtype (MixedPrecisionPolicy: bf16, else fp32)
        copies = (2.0 if bf16 else 4.0) * 2 * max(p.per_layer, p.embedding)
    else:
        copies = 0.0

    if packed_mask is None:
        packed_mask = not cuda
    mask_len = seq_len if packed_mask else 0
    act = tokens * activation_bytes_per_token(
        shape, checkpointing, act_bytes, mask_len=mask_len, checkpoint_every=checkpoint_every
    )
    mask_note = ", SDPA with the packed block-causal mask" if packed_mask else ""
    on_device = 0.0 if cpu_offload else 1.0
    unsharded_grads = (
        world_size > 1
        and gradient_accumulation_steps > 1
        and not (cpu_offload or sync_every_micro_batch)
    )
    if lean is not None:
        return _lean_memory(
            shape, p, lean, tokens=tokens, seq_len=seq_len, accum=gradient_accumulation_steps,
            optimizer=optimizer, act=act, adamw_impl=adamw_impl, bf16=bf16, cuda=cuda,
            chunked_loss=chunked_loss, loss_chunk_size=loss_chunk_size, capacity=capacity_bytes,
            optimizer_states=optimizer_states,
            activation_note=f"{_CKPT_NAMES[checkpointing]} checkpointing, {micro_batch} x "
            f"{seq_len} tokens, {'bf16' if bf16 else 'fp32'}{mask_note}",
        )  # fmt: skip
    components = {
        "weights": on_device * 4.0 * p.total / shards,
        "grads": on_device * 4.0 * p.total / shards + (4.0 * p.total if unsharded_grads else 0),
        "optimizer": on_device * opt / shards,
        "optimizer_step_temp": step_temp,
        "weight_copies": copies,
        "activations": act,
        "logits": logits_bytes(
            shape.vocab_size, shape.hidden_size, tokens, chunked_loss, loss_chunk_size, bf16
        ),
        "loss_workspace": 0.0,
        "embedding_grad": 4.0
        * shape.vocab_size
        * shape.hidden_size
        * (int(shape.tie_word_embeddings) + int(gradient_accumulation_steps > 1)),
        "overhead": CUDA_OVERHEAD_BYTES if cuda else 0.0,
    }
    if chunked_loss and not cuda:
        workspace = 4.0 * shape.vocab_size * min(tokens, loss_chunk_size)
        components["loss_workspace"] = workspace
        components["logits"] -= workspace
    shard_note = f", sharded over {world_size} devices (FSDP)" if world_size > 1 else ""
    if cpu_offload:
        shard_note += ", in CPU memory (fsdp_cpu_offload)"
    notes = {
        "weights": f"fp32 master weights, 4 B/param{shard_note}",
        "grads": f"fp32 gradients, 4 B/param{shard_note}"
        + (
            "; + unsharded fp32 gradients between micro-batches (4 B/param)"
            if unsharded_grads
            else "; reduce-scattered after every micro-batch"
            if world_size > 1 and gradient_accumulation_steps > 1
            else ""
        ),
        "optimizer": (
            f"AdamW: 2 {_MOMENTS[optimizer_states]}"
            if optimizer == "adamw"
            else f"Muon: 1 {'bf16' if optimizer_states == 'bf16' else 'fp32'} momentum on "
            f"hidden matrices ({_momentum_bytes(optimizer_states):.0f} B), AdamW on the rest "
            f"({_MOMENTS[optimizer_states]})"
        )
        + shard_note,
        "optimizer_step_temp": (
            (
                "8-bit AdamW: none (one fused kernel)"
                if cuda
                else "8-bit AdamW on CPU: fp32 moments and update of its largest tensor, 20 B/element"
            )
            if optimizer_states == "8bit"
            else "bf16 states: fp32 copies of one 4M-element slice at a time"
            if optimizer_states == "bf16"
            else {
                "fused": "fused AdamW: none",
                "foreach": "foreach AdamW's sqrt(v) buffer, 4 B/param of its group",
                "single": "single-tensor AdamW: 2 buffers of the largest parameter",
            }[adamw_impl]
        )
        + ("; Newton-Schulz on the largest matrix" if optimizer == "muon" else ""),
        "weight_copies": (
            "bf16 autocast copies of matmul weights, 2 B/param"
            if copies and not sharded
            else "unsharded bf16 working set: ~2 blocks or the embedding"
            if copies
            else "none (fp32 or CPU)"
        ),
        "activations": f"{_CKPT_NAMES[checkpointing]} checkpointing"
        + (
            f" of every {checkpoint_every}th layer"
            if checkpointing == "full" and checkpoint_every > 1
            else ""
        )
        + f", {micro_batch} x {seq_len} tokens, "
        f"{'bf16' if bf16 else 'fp32'}{mask_note}",
        "logits": (
            f"fused chunked loss: {min(tokens, loss_chunk_size)}-token chunk x "
            f"{shape.vocab_size} + the head's fp32 gradient"
            + (" (chunk buffer under loss_workspace)" if not cuda else "")
            if chunked_loss
            else f"full logits, {tokens} tokens x {shape.vocab_size} x 12 B"
        ),
        "embedding_grad": "end of backward: the embedding's gradient"
        + (" and the tied head's, waiting for it" if shape.tie_word_embeddings else "")
        + (", before .grad += it" if gradient_accumulation_steps > 1 else ""),
        "loss_workspace": "the fused loss's chunk buffer, kept between steps on CPU"
        if chunked_loss and not cuda
        else "none",
        "overhead": "CUDA context and workspaces" if cuda else "none (CPU)",
    }
    return MemoryEstimate(
        components=components,
        notes=notes,
        capacity=capacity_bytes,
        grads_held_in_forward=gradient_accumulation_steps > 1,
        host=(8.0 * p.total + opt) / shards if cpu_offload else 0.0,
    )


_CKPT_NAMES = {"none": "no", "full": "full", "selective": "selective"}
# bitsandbytes' blockwise 8-bit AdamW: two uint8 moments and, per 256-element block, one fp32
# scale for each; tensors under 4,096 elements (norms, biases) keep fp32 moments
EIGHT_BIT_BYTES = 2.0 + 2 * 4.0 / 256
EIGHT_BIT_CPU_STEP_BYTES = 20.0  # measured: peak RSS of one CPU step over the tensor's size
# QLoRA's NF4 with double quantization (Dettmers et al. 2023): 4 bits per weight, an 8-bit
# scale per 64-weight block and an fp32 scale per 256 blocks: 4.127 bits
NF4_BYTES = 0.5 + 1.0 / 64 + 4.0 / (64 * 256)
# optimizer_states: bf16 (qwen_cpt.bf16_states): the slice read into fp32 at a time, and its bytes
BF16_SLICE = float(_BF16_SLICE)
BF16_SLICE_BYTES = float(_BF16_SLICE_BYTES)
_MOMENTS = {
    "fp32": "fp32 moments, 8 B/param",
    "bf16": "bf16 moments, 4 B/param",
    "8bit": "8-bit moments, 2.03 B/param (1-D: 8 B)",
}


def _moment_bytes(n_2d: float, n_1d: float, states: str) -> float:
    """AdamW's moment bytes for ``n_2d`` matrix and ``n_1d`` vector parameters."""
    if states == "8bit":
        return EIGHT_BIT_BYTES * n_2d + 8.0 * n_1d
    if states == "bf16":
        return 4.0 * (n_2d + n_1d)
    return 8.0 * (n_2d + n_1d)


def _momentum_bytes(states: str) -> float:
    """Muon's momentum bytes per element (bitsandbytes' 8-bit covers AdamW only)."""
    return 2.0 if states == "bf16" else 4.0


def _muon_temp_bytes(states: str) -> float:
    """Muon's step temporaries per element of its largest matrix: the update and Newton-Schulz's
    bf16 copies (10 B), with bf16 momentum also its fp32 copy and the rounding's buffers."""
    return 14.0 if states == "bf16" else 10.0


def _lean_memory(
    shape,
    p,
    lean: LeanMode,
    *,
    tokens,
    seq_len,
    accum,
    optimizer,
    act,
    adamw_impl,
    bf16,
    cuda,
    chunked_loss,
    loss_chunk_size,
    capacity,
    activation_note,
    optimizer_states="fp32",
):
    """:func:`estimate_memory` for a LoRA or freeze-tuning run (see its docstring)."""  # fmt: skip
    lora, magnitude = lean.adapter_params(shape)
    trainable, matrices = lean.trainable(shape, p)
    table = shape.vocab_size * shape.hidden_size
    # trained tensors here are matrices and tables (a freeze run's few norm gains are left out)
    opt = (
        _moment_bytes(trainable, 0, optimizer_states)
        if optimizer == "adamw"
        else _momentum_bytes(optimizer_states) * matrices
        + _moment_bytes(trainable - matrices, 0, optimizer_states)
    )
    largest_trained = lean.lora_r * max(i + o for _, i, o in _linears(shape)) if lean.lora_r else 0
    if lean.freeze_layers:
        largest_trained = p.largest_matrix
    step_temp = {"fused": 0.0, "foreach": 4.0 * trainable, "single": 8.0 * p.largest_matrix}[
        adamw_impl
    ]
    if optimizer_states == "8bit":
        tables_trained = max(p.embedding, p.lm_head) if lean.train_embeddings else 0
        step_temp = (
            0.0
            if cuda
            else EIGHT_BIT_CPU_STEP_BYTES
            * max(tables_trained, 0 if optimizer == "muon" else largest_trained)
        )
    elif optimizer_states == "bf16":
        tables_trained = max(p.embedding, p.lm_head) if lean.train_embeddings else 0
        largest_adamw = max(tables_trained, 0 if optimizer == "muon" else largest_trained)
        step_temp = BF16_SLICE_BYTES * min(BF16_SLICE, largest_adamw)
    if optimizer == "muon":
        step_temp += _muon_temp_bytes(optimizer_states) * largest_trained
    copies = 0.0
    if bf16 and cuda:  # cached copies of trained matmul weights, one transient frozen one
        trained_matmul = matrices + (table if lean.train_embeddings else 0)
        copies = 2.0 * (trained_matmul + p.largest_matrix)
    elif lean.quantized:  # a 4-bit layer's weight, dequantized for its matmul
        copies = 4.0 * p.largest_matrix
    if lean.freeze_layers and not lean.train_embeddings:
        act *= min(lean.freeze_layers, shape.num_layers) / shape.num_layers
    logits = logits_bytes(
        shape.vocab_size, shape.hidden_size, tokens, chunked_loss, loss_chunk_size, bf16
    )
    if chunked_loss and not lean.train_embeddings:  # no fp32 gradient of the head
        logits -= (6.0 if bf16 else 4.0) * shape.vocab_size * shape.hidden_size
    base = 4.0 * p.total
    if lean.quantized:  # every decoder linear layer in 4 bits, the rest (tables, norms) fp32
        base -= (4.0 - NF4_BYTES) * p.matrices
    components = {
        "weights": base + 4.0 * (lora + magnitude),
        "grads": 4.0 * trainable,
        "optimizer": opt,
        "optimizer_step_temp": step_temp,
        "weight_copies": copies,
        "activations": act,
        "logits": logits,
        "loss_workspace": 0.0,
        "embedding_grad": 4.0 * table * (int(shape.tie_word_embeddings) + int(accum > 1))
        if lean.train_embeddings
        else 0.0,
        "overhead": CUDA_OVERHEAD_BYTES if cuda else 0.0,
    }
    if chunked_loss and not cuda:
        workspace = 4.0 * shape.vocab_size * min(tokens, loss_chunk_size)
        components["loss_workspace"] = workspace
        components["logits"] -= workspace
    what = lean.describe()
    notes = {
        "weights": (
            f"4-bit NF4 decoder matrices ({NF4_BYTES:.2f} B/param), fp32 tables, norms and "
            f"adapters ({what})"
            if lean.quantized
            else f"fp32 weights, 4 B/param, frozen base and adapters ({what})"
        ),
        "grads": f"fp32 gradients of the {trainable:,} trained parameters",
        "optimizer": (
            (
                "AdamW"
                if optimizer == "adamw"
                else f"Muon {_momentum_bytes(optimizer_states):.0f} B on matrices, AdamW"
            )
            + {"fp32": ": 8 B", "bf16": ": bf16 moments, 4 B", "8bit": ": 8-bit moments, 2.03 B"}[
                optimizer_states
            ]
        )
        + " per trained parameter",
        "optimizer_step_temp": (
            ("8-bit AdamW: none" if cuda else "8-bit AdamW on CPU: 20 B/element of its largest")
            if optimizer_states == "8bit"
            else "bf16 states: one 4M-element fp32 slice at a time"
            if optimizer_states == "bf16"
            else "fused AdamW: none"
            if adamw_impl == "fused"
            else adamw_impl
        )
        + ("; Newton-Schulz on the largest trained matrix" if optimizer == "muon" else ""),
        "weight_copies": "bf16 copies of trained matmul weights + one frozen matrix"
        if copies and cuda
        else "one 4-bit matrix dequantized to fp32 for its matmul"
        if copies
        else "none (fp32 or CPU)",
        "activations": activation_note
        + (", trained layers only" if lean.freeze_layers and not lean.train_embeddings else ""),
        "logits": "fused chunked loss" + ("" if lean.train_embeddings else ", frozen head")
        if chunked_loss
        else f"full logits, {tokens} tokens x {shape.vocab_size} x 12 B",
        "loss_workspace": "the fused loss's chunk buffer, kept between steps on CPU"
        if chunked_loss and not cuda
        else "none",
        "embedding_grad": "the embedding's gradient at the end of backward"
        if lean.train_embeddings
        else "none (frozen embeddings)",
        "overhead": "CUDA context and workspaces" if cuda else "none (CPU)",
    }
    return MemoryEstimate(components, notes, capacity, grads_held_in_forward=accum > 1)


def lean_mode_of(cfg) -> LeanMode | None:
    """The :class:`LeanMode` of a config (None: full training)."""
    if getattr(cfg, "use_lora", False):
        return LeanMode(
            lora_r=cfg.lora_r,
            lora_modules=tuple(cfg.lora_target_modules),
            dora=cfg.use_dora,
            train_embeddings=cfg.lora_train_embeddings,
            quantized=getattr(cfg, "use_qlora", False),
        )
    if getattr(cfg, "freeze_trainable_layers", 0):
        return LeanMode(
            freeze_layers=cfg.freeze_trainable_layers, train_embeddings=cfg.lora_train_embeddings
        )
    return None


def max_micro_batch(fits_with: Any, upper: int) -> int:
    """Largest micro-batch in ``[1, upper]`` for which ``fits_with(micro)`` holds (at least 1).

    ``fits_with`` must be monotone (memory grows with the micro-batch), so a bisection suffices.
    """
    if upper < 1 or not fits_with(1):
        return 1
    lo, hi = 1, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits_with(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _memory_for(cfg, shape, p, micro, world, device, capacity, accum=2) -> MemoryEstimate:
    """The estimate for ``cfg``; ``accum`` defaults to 2 (gradients held: the safe side).

    Assumes flash_attention_2 on CUDA when ``use_flash_attention`` (``qwen-cpt[gpu]``) and the
    attention is auto; see ``_dense_mask_attention`` for the others. ``fsdp_sync_every_micro_batch:
    None`` is estimated as the trainer decides it: the last micro-batch only if that fits.
    """
    sync = getattr(cfg, "fsdp_sync_every_micro_batch", False)
    if sync is None:
        last_only = _memory_for(
            _ConfigView(cfg, fsdp_sync_every_micro_batch=False),
            shape, p, micro, world, device, capacity, accum,
        )  # fmt: skip
        if device != "cuda" or capacity is None or last_only.peak <= USABLE_FRACTION * capacity:
            return last_only
        sync = True
    return estimate_memory(
        shape,
        micro_batch=micro,
        seq_len=cfg.max_length,
        gradient_accumulation_steps=accum,
        world_size=world,
        optimizer="muon" if cfg.use_muon_optimizer else "adamw",
        checkpointing="full" if cfg.use_gradient_checkpointing else "none",
        bf16=cfg.use_bf16,
        chunked_loss=cfg.use_fused_loss and _chunkable(shape.model_type),
        loss_chunk_size=cfg.loss_chunk_size,
        device=device,
        packed_mask=cfg.document_aware_packing and _dense_mask_attention(cfg, device),
        checkpoint_every=getattr(cfg, "gradient_checkpointing_every_n_layers", 1),
        capacity_bytes=capacity,
        param_counts=p,
        cpu_offload=getattr(cfg, "fsdp_cpu_offload", False),
        sync_every_micro_batch=sync,
        lean=lean_mode_of(cfg),
        optimizer_states=getattr(cfg, "optimizer_states", "fp32"),
    )


def _dense_mask_attention(cfg, device: str) -> bool:
    """Whether the run's attention takes transformers' dense block-causal mask for packed
    documents (SDPA, eager) rather than none (flash_attention_2's varlen path) or a sparse
    BlockMask with native grouped-query attention (flex_attention). ``auto`` without
    flash-attn may pick either SDPA or FlexAttention at start-up, so it counts as SDPA."""
    impl = getattr(cfg, "attention_implementation", "auto")
    if impl == "auto":
        return not (device == "cuda" and cfg.use_flash_attention)
    return impl not in ("flash_attention_2", "flex_attention")


def _chunkable(model_type: str) -> bool:
    # the same list loss.py uses; repeated here so the planner imports no torch
    return model_type in {"qwen2", "qwen3", "llama", "mistral"}
