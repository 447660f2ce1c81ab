"""Tokenization of pieces of text, in worker processes or in-process.

**Parallel tokenization.** ``dataloader_num_workers`` processes tokenize batches of pieces
with the fast (Rust) tokenizer; at most a few batches are in flight and results are consumed
in submission order, so the block order is the same for any worker count.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from .types import Piece

_worker_tokenizer = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    fast = Path(tokenizer_path) / "tokenizer.json"
    if fast.is_file():  # the Rust tokenizer alone: a worker starts in well under a second
        from tokenizers import Tokenizer

        _worker_tokenizer = Tokenizer.from_file(str(fast))
        return
    from transformers import AutoTokenizer

    _worker_tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)


def encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens; the Rust backend directly when there is one (1.5x)."""
    backend = (
        tokenizer
        if hasattr(tokenizer, "encode_batch")
        else getattr(tokenizer, "backend_tokenizer", None)
    )
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _encode(texts: list[str]) -> list[list[int]]:
    return encode_batch(_worker_tokenizer, texts)


def _batched(items: Iterable, size: int, max_chars: int = 4 << 20) -> Iterator[list]:
    batch: list = []
    chars = 0
    for item in items:
        batch.append(item)
        chars += len(item.text) if isinstance(item, Piece) else len(item)
        if len(batch) == size or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class TokenizerPool:
    """Worker processes that tokenize batches; ``None`` workers means in-process."""

    def __init__(self, tokenizer, num_workers: int = 0, tokenizer_path: str | None = None):
        self.tokenizer = tokenizer
        self.pool = None
        self.num_workers = num_workers if tokenizer_path else 0
        if self.num_workers > 0:
            ctx = mp.get_context("spawn")  # fork after the Rust tokenizer's threads can deadlock
            self.pool = ctx.Pool(self.num_workers, _init_worker, (tokenizer_path,))

    def map(self, batches: Iterable[list[str]]) -> Iterator[list[list[int]]]:
        """Tokenize ``batches`` in order, with at most 2 batches per worker in flight."""
        if self.pool is None:
            for b in batches:
                yield encode_batch(self.tokenizer, b)
            return
        pending: collections.deque = collections.deque()
        for b in batches:
            pending.append(self.pool.apply_async(_encode, (b,)))
            if len(pending) >= 2 * self.num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool = None


def tokenize_documents(
    docs: Iterable[str],
    tokenizer,
    num_workers: int = 0,
    tokenizer_path: str | None = None,
    batch_size: int = 256,
) -> Iterator[list[int]]:
    """Yield token ids per document, in input order (deterministic for any worker count)."""
    pool = TokenizerPool(tokenizer, num_workers, tokenizer_path)
    try:
        for ids in pool.map(_batched(docs, batch_size)):
            yield from ids
    finally:
        pool.close()
