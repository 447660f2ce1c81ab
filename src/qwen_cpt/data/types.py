"""Types, constants and helpers shared by the data modules (a leaf: no qwen_cpt.data imports)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100
CACHE_MANIFEST = "qwen_cpt_cache.json"


class DataError(ValueError):
    """Unusable training or eval input; the message names the file, line, field or pattern."""


@dataclass
class Piece:
    """A unit of text to tokenize: a whole document or a slice of a long one."""

    text: str
    pos: dict  # where it starts: {"file", "offset", "line"} or {"row"}; JSON-serializable
    first: bool = True  # starts a document
    last: bool = True  # ends a document (an eos follows it)


@dataclass
class Block:
    """One packed training sequence (``source`` names the stream it came from)."""

    input_ids: list[int]
    position_ids: list[int]
    labels: list[int]
    source: str = ""


def collate(blocks: Sequence[Block]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.tensor([b.input_ids for b in blocks], dtype=torch.long),
        "position_ids": torch.tensor([b.position_ids for b in blocks], dtype=torch.long),
        "labels": torch.tensor([b.labels for b in blocks], dtype=torch.long),
    }


def count_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that contribute to the loss: labels after the causal shift that are not ignored."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@dataclass
class StreamState:
    epoch: int = 0
    piece: dict | None = None  # position of the piece being packed when the last block left
    skip: int = 0  # tokens of that piece already in earlier blocks
    doc: int = -1  # index (in this epoch) of that piece's document, for max_samples
    blocks: int = 0  # blocks emitted this epoch


@dataclass
class SourceSpec:
    name: str
    source: Any
    weight: float = 1.0
