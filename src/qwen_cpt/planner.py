"""The CPT planner: model size, learning rate, batch, memory and time of a run, before it starts.

Everything here is arithmetic on a model's shape (its ``config.json``), the token count and the
hardware, so ``qwen-cpt plan`` works offline and in milliseconds. The same functions resolve
``learning_rate: auto``, ``per_device_train_batch_size: auto`` and
``gradient_accumulation_steps: auto`` for the trainer (:func:`resolve_auto`).

Sources (see shared/REFERENCE.md):
- Step Law, Li et al. 2025 (arXiv 2503.04715): lr and batch from N (non-embedding) and D (tokens),
  fitted on AdamW training *from scratch*.
- DeepSeek LLM, 2024 (arXiv 2401.02954): lr and batch from the compute budget C.
- Ibrahim et al. 2024 (arXiv 2403.08763): continued pretraining re-warms the learning rate and
  re-decays it; the peak stays well below a from-scratch optimum to limit forgetting.
- torchtitan's FLOP count: 6 * N_matmul + 6 * L * H * (d_qk + d_v) * S per trained token.
- Korthikanti et al. 2022 (arXiv 2205.05198): activation memory per layer and selective
  recomputation.
- Memory figures are derived from what PyTorch autograd keeps for this trainer (fp32 master
  weights, bf16 autocast); ``benchmarks/memory_estimate.py`` checks them against measured RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GiB = 2**30
AUTO = "auto"
AUTO_FIELDS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps")
BYTES_PER_TOKEN_ESTIMATE = 3.6  # UTF-8 bytes per Qwen2.5 token, a rough average for mixed text
DEFAULT_MFU = 0.4  # torchtitan Llama-3.1-8B on H100 with torch.compile: about 39% (REFERENCE.md)
USABLE_FRACTION = 0.9  # headroom for allocator fragmentation; the verdict compares to 90%
CUDA_OVERHEAD_BYTES = 1.0 * GiB  # CUDA context, cuBLAS and NCCL workspaces (0.5 to 1.5 GiB)
# On CPU the trainer keeps freed blocks in glibc's heap (model.tune_cpu_allocator): its RSS
# peaked at 1.1x to 2.3x the live peak in benchmarks/memory_estimate.py (BENCHMARKS.md), so
# resolve_auto sizes CPU micro-batches against memory / 2.5.
CPU_RSS_FACTOR = 2.5


class PlannerError(ValueError):
    """The planner cannot work out a model shape or a needed number; the message names it."""


# --- model shapes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a dense decoder-only transformer (Llama/Qwen2 layout) that size a run.

    Assumes a gated MLP (gate, up, down), RMSNorm before attention and MLP, and grouped-query
    attention; that covers Qwen2/2.5/3, Llama and Mistral.
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    model_type: str = "qwen2"

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Read an HF ``config.json`` mapping or a ``transformers.PretrainedConfig``."""
        d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        if "text_config" in d and "hidden_size" not in d:  # multimodal wrappers
            d = dict(d["text_config"])
        model_type = str(d.get("model_type") or "")
        if any(d.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts")):
            raise PlannerError(
                f"model_type {model_type!r}: mixture-of-experts models are not supported by the "
                "planner (it sizes dense decoder-only transformers)"
            )
        required = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
        )
        missing = [k for k in required if not isinstance(d.get(k), int)]
        if missing:
            raise PlannerError(
                f"model config ({model_type or 'unknown model_type'}): missing or non-integer "
                f"{', '.join(missing)}"
            )
        heads = d["num_attention_heads"]
        # Qwen2's attention always has q/k/v biases and no o_proj bias; Llama-style configs say
        # so with attention_bias (which then covers o_proj too).
        qwen2 = model_type == "qwen2"
        attn_bias = bool(d.get("attention_bias") or False)
        return cls(
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            vocab_size=d["vocab_size"],
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            qkv_bias=qwen2 or attn_bias,
            o_bias=attn_bias and not qwen2,
            mlp_bias=bool(d.get("mlp_bias") or False),
            qk_norm=model_type.startswith("qwen3"),
            model_type=model_type,
        )


def _qwen25(h: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tied: bool):
    return ModelShape(h, inter, layers, heads, kv, vocab, tied, h // heads, qkv_bias=True)


# From the models' published config.json files (shared/REFERENCE.md); 72B from its config.json.
QWEN25_SHAPES: dict[str, ModelShape] = {
    "Qwen/Qwen2.5-0.5B": _qwen25(896, 4864, 24, 14, 2, 151936, True),
    "Qwen/Qwen2.5-1.5B": _qwen25(1536, 8960, 28, 12, 2, 151936, True),
    "Qwen/Qwen2.5-3B": _qwen25(2048, 11008, 36, 16, 2, 151936, True),
    "Qwen/Qwen2.5-7B": _qwen25(3584, 18944, 28, 28, 4, 152064, False),
    "Qwen/Qwen2.5-14B": _qwen25(5120, 13824, 48, 40, 8, 152064, False),
    "Qwen/Qwen2.5-32B": _qwen25(5120, 27648, 64, 40, 8, 152064, False),
    "Qwen/Qwen2.5-72B": _qwen25(8192, 29568, 80, 64, 8, 152064, False),
}


def lookup_shape(name: str) -> ModelShape | None:
    """The built-in shape for a Qwen2.5 hub id (``-Instruct`` and the org prefix optional)."""
    key = re.sub(r"-instruct$", "", name.strip().rstrip("/"), flags=re.IGNORECASE).lower()
    for hub_id, shape in QWEN25_SHAPES.items():
        if key in (hub_id.lower(), hub_id.split("/")[1].lower()):
            return shape
    return None


def load_shape(model_name_or_path: str) -> tuple[ModelShape, str]:
    """``(shape, source)``: a local model directory's config.json, else the built-in table."""
    path = Path(model_name_or_path).expanduser()
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise PlannerError(f"model_name_or_path: {str(path)!r} has no config.json")
        try:
            data = json.loads(cfg_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise PlannerError(f"{cfg_file}: not valid JSON ({exc})") from None
        return ModelShape.from_config(data), str(cfg_file)
    shape = lookup_shape(model_name_or_path)
    if shape is None:
        raise PlannerError(
            f"model_name_or_path: {model_name_or_path!r} is neither a local model directory nor a "
            f"Qwen2.5 id the planner knows offline ({', '.join(QWEN25_SHAPES)}, also -Instruct)"
        )
    return shape, "built-in Qwen2.5 shape table"


# --- parameter counts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts; a tied embedding/head matrix is counted once in ``total``.

    ``non_embedding`` excludes the input embedding and the LM head (Qwen2.5's report convention:
    7B has 7.62B parameters, 6.53B non-embedding). ``matrices`` are the 2-D hidden weights
    (what Muon takes); ``adamw_only`` is everything else (embeddings, head, norms, biases).
    """

    total: int
    non_embedding: int
    embedding: int
    lm_head: int  # 0 when tied
    per_layer: int
    matrices: int
    largest_matrix: int

    @property
    def adamw_only(self) -> int:
        return self.total - self.matrices


def count_params(shape: ModelShape) -> ParamCounts:
    """Count parameters of a Llama/Qwen2-layout decoder from its shape."""
    h, i, hd = shape.hidden_size, shape.intermediate_size, shape.head_dim
    q_dim, kv_dim = shape.num_heads * hd, shape.num_kv_heads * hd
    attn_w = h * q_dim + 2 * h * kv_dim + q_dim * h
    attn_b = (q_dim + 2 * kv_dim if shape.qkv_bias else 0) + (h if shape.o_bias else 0)
    mlp_w = 3 * h * i
    mlp_b = (2 * i + h) if shape.mlp_bias else 0
    norms = 2 * h + (2 * hd if shape.qk_norm else 0)
    per_layer = attn_w + attn_b + mlp_w + mlp_b + norms
    non_embedding = shape.num_layers * per_layer + h  # + final norm
    embedding = shape.vocab_size * h
    lm_head = 0 if shape.tie_word_embeddings else embedding
    largest = max(h * i, h * q_dim)
    return ParamCounts(
        total=non_embedding + embedding + lm_head,
        non_embedding=non_embedding,
        embedding=embedding,
        lm_head=lm_head,
        per_layer=per_layer,
        matrices=shape.num_layers * (attn_w + mlp_w),
        largest_matrix=largest,
    )


# --- FLOPs -----------------------------------------------------------------------------------------


def flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """Training FLOPs per token, torchtitan's convention.

    ``6 * N_matmul + 6 * L * H * (d_qk + d_v) * S``:
    - ``N_matmul`` = non-embedding parameters + the LM head (``vocab * hidden``, counted even
      when tied, since the head matmul runs either way); the embedding lookup is a gather, not a
      matmul, so it is excluded. 6 = 2 (multiply-add) x 3 (forward, input grad, weight grad).
    - the attention scores ``QK^T`` and ``AV``: per layer and head, 2*S*d_qk + 2*S*d_v forward,
      x3 for training, over the full sequence S (causal masking and document-aware packing do
      less work; the convention counts it all, as PaLM's and torchtitan's MFU do).
    Recomputation by gradient checkpointing is not counted: this is *model* FLOPs, for MFU.
    """
    p = count_params(shape)
    n_matmul = p.non_embedding + shape.vocab_size * shape.hidden_size
    attn = 6 * shape.num_layers * shape.num_heads * (2 * shape.head_dim) * seq_len
    return 6.0 * n_matmul + attn


def deepseek_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """DeepSeek LLM's M (arXiv 2401.02954 eq. 2): non-embedding FLOPs/token for its C = M * D.

    ``M = 72 * L * d^2 + 6 * L * d * S`` for a 4x-MLP transformer, i.e. 6 * (non-embedding matrix
    parameters) + the attention term; written here as ``6 * N_non_emb + 6 * L * d * S`` so it
    holds for a gated MLP and GQA. The vocabulary (head) is excluded, unlike torchtitan's count.
    """
    p = count_params(shape)
    return 6.0 * p.non_embedding + 6.0 * shape.num_layers * shape.hidden_size * seq_len


# --- learning rate ---------------------------------------------------------------------------------

SPEC_LR_TABLE = {"7B": 5e-5, "14B": 3e-5, "32B": 2e-5}  # the product spec's own anchors


def lr_spec(n_params: float) -> float:
    """The product spec's rule: ``5e-5 * (N / 7e9) ** -0.25``, N = total parameters.

    Its own table (7B 5e-5, 14B 3e-5, 32B 2e-5) falls faster than N^-0.25 (which would give
    4.2e-5 at 14B and 3.4e-5 at 32B), so the two disagree above 7B; the planner shows both.
    """
    _positive(n_params=n_params)
    return 5e-5 * (n_params / 7e9) ** -0.25


def lr_step_law(n_non_embedding: float, tokens: float) -> float:
    """Step Law (arXiv 2503.04715): ``eta_opt = 1.79 * N**-0.713 * D**0.307``.

    N = non-embedding parameters, D = training tokens; fitted on AdamW from scratch, so for
    continued pretraining it is an upper bound, not a target.
    """
    _positive(n_non_embedding=n_non_embedding, tokens=tokens)
    return 1.79 * n_non_embedding**-0.713 * tokens**0.307


def lr_deepseek(compute: float) -> float:
    """DeepSeek LLM (arXiv 2401.02954): ``eta_opt = 0.3118 * C**-0.125``, C in FLOPs."""
    _positive(compute=compute)
    return 0.3118 * compute**-0.125


def recommend_lr(n_params: float, n_non_embedding: float, tokens: float) -> tuple[float, str]:
    """The default CPT rule: the spec's rule, capped by Step Law, ``min(spec, step_law)``.

    Why: continued pretraining re-warms and re-decays the learning rate from a trained model,
    and a peak well below the from-scratch optimum limits forgetting (Ibrahim et al. 2024,
    arXiv 2403.08763). The spec's N^-0.25 rule gives CPT-sized rates (5e-5 at 7B); Step Law's
    from-scratch optimum can only be an upper bound, and it binds when D is small.
    """
    spec = lr_spec(n_params)
    step = lr_step_law(n_non_embedding, tokens)
    if spec <= step:
        return spec, f"spec 5e-5*(N/7e9)^-0.25 = {spec:.3g} (below the Step Law cap {step:.3g})"
    return step, f"Step Law cap 1.79*N^-0.713*D^0.307 = {step:.3g} (spec rule gives {spec:.3g})"


# --- batch size ------------------------------------------------------------------------------------


def batch_step_law(tokens: float) -> float:
    """Step Law (arXiv 2503.04715): ``B_opt = 0.58 * D**0.571`` tokens per optimizer step."""
    _positive(tokens=tokens)
    return 0.58 * tokens**0.571


def batch_step_law_for_steps(max_steps: int) -> float:
    """Step Law's B when the run is fixed at ``max_steps`` (D = steps * B, solved for B).

    ``B = 0.58 * (steps * B)**0.571``  =>  ``B = (0.58 * steps**0.571) ** (1 / 0.429)``.
    """
    _positive(max_steps=max_steps)
    return (0.58 * max_steps**0.571) ** (1 / (1 - 0.571))


def batch_spec(n_params: float, tokens: float) -> float:
    """The product spec's "effective batch proportional to (N*D)**0.4".

    The spec gives no constant and no unit (tokens? sequences?): taken as tokens it is 9e7 for
    7B on 1e10 tokens, far beyond any published optimum. Shown for reference, never used.
    """
    _positive(n_params=n_params, tokens=tokens)
    return (n_params * tokens) ** 0.4


def batch_deepseek(compute: float) -> float:
    """DeepSeek LLM (arXiv 2401.02954): ``B_opt = 0.2920 * C**0.3271`` tokens."""
    _positive(compute=compute)
    return 0.2920 * compute**0.3271


def split_batch(
    global_tokens: float, max_length: int, world_size: int, max_micro: int
) -> tuple[int, int]:
    """``(micro_batch, accumulation)`` per device for a global batch of ``global_tokens``.

    The global batch is rounded to whole sequences on every device (at least one each); the
    micro-batch is as large as memory allows (``max_micro``), and then evened out so that
    ``micro * accumulation`` overshoots the target by less than one accumulation step.
    """
    _positive(max_length=max_length, world_size=world_size)
    per_device = max(1, round(global_tokens / max_length / world_size))
    micro = max(1, min(max_micro, per_device))
    accum = math.ceil(per_device / micro)
    return math.ceil(per_device / accum), accum


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
    of bf16 logits per 1k tokens (REFERENCE.md) becomes 1.7 GiB.

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
) -> MemoryEstimate:
    """Estimate peak memory per device of one training step of this trainer.

    - weights: fp32 master weights (the trainer loads fp32 and autocasts to bf16), 4 B/param;
    - grads: fp32, 4 B/param;
    - optimizer: AdamW keeps two fp32 moments, 8 B/param (the fp32 master copy is the weights
      themselves, so AdamW totals 16 B/param with weights and grads). Muon keeps one fp32
      momentum on the hidden matrices (4 B) and AdamW's 8 B on embeddings, head, norms, biases;
    - optimizer_step_temp: ``adamw_impl="fused"`` (the trainer's choice on CPU and CUDA) has
      no temporaries; PyTorch's ``"foreach"`` AdamW allocates one sqrt(v) buffer for a whole
      parameter group, 4 B/param; ``"single"`` (the per-tensor loop) two buffers the size of
      the largest parameter. Muon adds Newton-Schulz on the largest matrix: a few bf16 copies
      and one fp32 update, about 10 B per element;
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
    not counted; the device holds the unsharded working set of about two blocks.
    """
    _positive(micro_batch=micro_batch, seq_len=seq_len, world_size=world_size)
    if optimizer not in ("adamw", "muon"):
        raise PlannerError(f"optimizer: must be adamw or muon, got {optimizer!r}")
    if adamw_impl not in ("fused", "foreach", "single"):
        raise PlannerError(f"adamw_impl: must be fused, foreach or single, got {adamw_impl!r}")
    p = param_counts or count_params(shape)
    cuda = device.startswith("cuda")
    shards = world_size
    tokens = micro_batch * seq_len
    act_bytes = 2 if bf16 else 4
    matmul_params = p.matrices + shape.vocab_size * shape.hidden_size

    if optimizer == "adamw":
        opt = 8.0 * p.total
        adamw_group = p.total
    else:
        opt = 4.0 * p.matrices + 8.0 * p.adamw_only
        adamw_group = p.adamw_only
    step_temp = {
        "fused": 0.0,
        "foreach": 4.0 * adamw_group / shards,
        "single": 8.0 * max(p.embedding, p.largest_matrix),
    }[adamw_impl]
    if optimizer == "muon":
        step_temp += 10.0 * p.largest_matrix

    sharded = world_size > 1 or cpu_offload
    if bf16 and cuda and not sharded:
        copies = 2.0 * matmul_params
    elif sharded:
        copies = 2.0 * 2 * max(p.per_layer, p.embedding)
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
            "AdamW: 2 fp32 moments, 8 B/param"
            if optimizer == "adamw"
            else "Muon: 1 fp32 momentum on hidden matrices (4 B), AdamW on the rest (8 B)"
        )
        + shard_note,
        "optimizer_step_temp": {
            "fused": "fused AdamW: none",
            "foreach": "foreach AdamW's sqrt(v) buffer, 4 B/param of its group",
            "single": "single-tensor AdamW: 2 buffers of the largest parameter",
        }[adamw_impl]
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
    )


_CKPT_NAMES = {"none": "no", "full": "full", "selective": "selective"}


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


# --- hardware and time -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GPU:
    name: str
    peak_tflops: float  # bf16 dense, datasheet
    memory_gib: float  # total, as nvidia-smi reports it
    note: str = ""


GPUS: dict[str, GPU] = {
    "H100": GPU("H100", 989.0, 79.6, "SXM, bf16 dense"),
    "H200": GPU("H200", 989.0, 140.4, "bf16 dense spec; a bf16 8192^3 matmul measured 790"),
    "A100": GPU("A100", 312.0, 80.0, "80 GB"),
    "A100-40GB": GPU("A100-40GB", 312.0, 40.0),
    "A10G": GPU("A10G", 125.0, 22.5, "NVIDIA's A10 figure; AWS's A10G is reported lower"),
    "L40S": GPU("L40S", 362.0, 45.0),
    "RTX4090": GPU("RTX4090", 165.0, 24.0),
}


def lookup_gpu(name: str) -> GPU:
    key = re.sub(r"[\s_]", "", name).upper().replace("RTX", "")
    for gpu_name, gpu in GPUS.items():
        if key == gpu_name.upper().replace("RTX", ""):
            return gpu
    raise PlannerError(f"--gpu: unknown GPU {name!r} (known: {', '.join(GPUS)})")


def estimate_seconds(
    tokens: float, flops_token: float, n_devices: int, peak_tflops: float, mfu: float = DEFAULT_MFU
) -> float:
    """Wall-clock seconds: ``tokens * flops/token / (devices * peak * MFU)``.

    MFU counts model FLOPs (:func:`flops_per_token`), so the recomputation of gradient
    checkpointing (about a third more work) has to be inside the MFU assumed.
    """
    _positive(tokens=tokens, flops_token=flops_token, n_devices=n_devices, peak_tflops=peak_tflops)
    if not 0 < mfu <= 1:
        raise PlannerError(f"mfu: must be in (0, 1], got {mfu}")
    return tokens * flops_token / (n_devices * peak_tflops * 1e12 * mfu)


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
    from .data import expand_paths

    files = expand_paths(cfg.train_files, "train_files")
    for i, src in enumerate(getattr(cfg, "sources", None) or []):
        entries = src["files"] if isinstance(src["files"], list) else [src["files"]]
        files += expand_paths(entries, f"sources[{i}].files")
    n_bytes = sum(f.stat().st_size for f in files if f.is_file())
    return n_bytes, max(1, round(n_bytes / BYTES_PER_TOKEN_ESTIMATE))


def _global_batch_tokens(cfg, micro: int, accum: int, world: int) -> int:
    return micro * accum * world * cfg.max_length


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


def _choose_batch(
    cfg, shape, p, n_tokens: int, world: int, device: str, capacity: float | None
) -> tuple[int, int, str]:
    """``(micro, accum, rule)`` for the config's batch fields, resolving any ``auto``."""
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
    n_blocks = max(1, math.ceil(n_tokens / cfg.max_length))
    per_device_cap = max(1, n_blocks // world)  # a step cannot take more than the data holds
    per_device = max(1, min(per_device_cap, round(target / cfg.max_length / world)))

    def fits(m: int) -> bool:
        est = _memory_for(cfg, shape, p, m, world, device, capacity)
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


def _steps(cfg, n_tokens: int, micro: int, accum: int, world: int) -> tuple[int, int]:
    """``(total, warmup)`` as the trainer counts them (packed blocks -> micro-batches -> steps)."""
    from .schedule import warmup_steps_for

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
    for n in (2, 4, 8, 16, 32, 64, 128, 256, 512):
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
    seconds = estimate_seconds(trained, fpt, gpus, gpu.peak_tflops, mfu)
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
            f"(about {(16 if not cfg.use_muon_optimizer else 12) * p.total / 2**30:.0f} GiB "
            "beside the bf16 model); the time ignores the per-step host-device copies and the "
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
    if mem["suggestions"]:
        lines.append("  to fit, change:")
        lines.extend(f"    - {s}" for s in mem["suggestions"])
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


def _positive(**values: float) -> None:
    for name, v in values.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise PlannerError(f"{name}: must be a positive number, got {v!r}")


# --- auto values for the trainer -------------------------------------------------------------------


def resolve_auto(
    cfg,
    model,
    n_train_tokens: int,
    world_size: int = 1,
    device_memory_gb: float | None = None,
    device: str | None = None,
) -> dict[str, tuple[int | float, str]]:
    """Concrete values for the config fields set to ``"auto"``: ``{field: (value, rule)}``.

    Fields that are not ``"auto"`` are left out. ``model`` is the loaded HF model (its
    parameters are counted, its ``config`` gives the shape) or an HF config / config dict.
    ``n_train_tokens``: tokens in the packed training data (one epoch). ``device_memory_gb``
    (GiB) defaults to the CUDA device's total memory, or on CPU to the memory available now plus
    what the model's parameters already take (they are resident when this is called); on CPU
    the estimate must fit in 1 / ``CPU_RSS_FACTOR`` of it, for the allocator's retained heap.
    ``world_size > 1`` assumes FSDP sharding of weights, gradients and optimizer state, as
    ``qwen-cpt plan --gpus`` does. ``device`` ("cuda" or "cpu") is the device that will train,
    when the model is not on it yet (FSDP2 loads on the CPU first).

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
        cfg_view, shape, p, n_train_tokens, world_size, device, capacity
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


class _ConfigView:
    """A config with a few attributes overridden, without copying or validating it."""

    def __init__(self, cfg, **overrides: Any):
        self._cfg, self._overrides = cfg, overrides

    def __getattr__(self, name: str) -> Any:
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._cfg, name)


def _counts_of(model, shape: ModelShape) -> ParamCounts:
    """Counts from a real module where one is given (exact for any architecture)."""
    from_shape = count_params(shape)
    if not hasattr(model, "parameters"):
        return from_shape
    from .model import count_parameters

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
    from .model import cpu_has_native_bf16

    return cpu_has_native_bf16()


# --- the `qwen-cpt plan` command -------------------------------------------------------------------


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``plan`` to the ``qwen-cpt`` subcommands."""
    p = subparsers.add_parser(
        "plan",
        help="estimate lr, batch, memory and time of a run, offline, before training",
        description="Plan a continued-pretraining run from its YAML config: model size, "
        "recommended learning rate and batch, steps, memory per device and time.",
    )
    p.add_argument("config", help="YAML file of CPTConfig fields")
    p.add_argument(
        "--tokens",
        type=float,
        default=None,
        help="tokens in the training data, one epoch (e.g. 1e9); default: the train_files' "
        f"size / {BYTES_PER_TOKEN_ESTIMATE} bytes per token",
    )
    p.add_argument("--gpus", type=int, default=1, help="number of devices (FSDP) [default: 1]")
    p.add_argument(
        "--gpu",
        default="H100",
        help=f"device type: {', '.join(GPUS)} [default: H100]",
    )
    p.add_argument(
        "--gpu-memory", type=float, default=None, help="memory per device in GiB (overrides --gpu)"
    )
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="assumed MFU [default: 0.4]")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def run_plan(args: argparse.Namespace) -> int:
    """Run ``qwen-cpt plan``: 0 with a plan printed (fitting or not: see its verdict), 2 on bad
    input."""
    import sys

    from .config import CPTConfig

    cfg = CPTConfig.from_yaml(args.config)
    try:
        if args.gpus < 1:
            raise PlannerError(f"--gpus: must be >= 1, got {args.gpus}")
        gpu = lookup_gpu(args.gpu)
        shape, shape_source = load_shape(cfg.model_name_or_path)
        if args.tokens is not None:
            _positive(tokens=args.tokens)
            n_tokens, source = int(args.tokens), "--tokens"
        elif cfg.train_files or getattr(cfg, "sources", None):
            n_bytes, n_tokens = train_files_tokens(cfg)
            source = (
                f"estimated: {n_bytes:,} bytes of training files / {BYTES_PER_TOKEN_ESTIMATE} "
                "bytes per token; pass --tokens for an exact count"
            )
        else:
            raise PlannerError(
                "--tokens: required, since the config has no train_files or sources to estimate "
                "it from"
            )
        plan = make_plan(
            cfg,
            shape,
            n_tokens,
            gpus=args.gpus,
            gpu=gpu,
            gpu_memory_gib=args.gpu_memory,
            mfu=args.mfu,
            shape_source=shape_source,
            tokens_source=source,
        )
    except PlannerError as exc:
        print(f"qwen-cpt plan: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0
