"""Training FLOPs per token.

Sources (docs/design.md, "Throughput anchors and MFU"):
- torchtitan's FLOP count: 6 * N_matmul + 6 * L * H * (d_qk + d_v) * S per trained token.
- DeepSeek LLM, 2024 (arXiv 2401.02954): its non-embedding M, for the compute budget C = M * D.
"""

from __future__ import annotations

from .shapes import ModelShape, count_params

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
