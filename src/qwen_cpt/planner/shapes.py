"""Model shapes (from a ``config.json`` or the built-in Qwen2.5 table) and parameter counts."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import PlannerError

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


# From the models' published config.json files (docs/design.md, "Qwen2.5 shapes and tokenizer ids"); 72B from its config.json.
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
