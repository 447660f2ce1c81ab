"""Reading documents, tokenizing them, and packing them into fixed-length training blocks.

Packing (run_clm's ``group_texts``, done right):
- each document is followed by eos, and the stream is cut into ``max_length`` blocks;
- with ``document_aware`` packing, ``position_ids`` restart at 0 at every document start inside
  a block. transformers then builds a block-causal mask (sdpa/eager/flex) or takes the varlen
  path (flash_attention_2) when the forward pass gets ``attention_mask=None`` and
  ``use_cache=False`` (shared/REFERENCE.md), so no token attends across a document boundary. The
  label of a document's first token is masked there, since predicting it would need exactly
  that cross-document context;
- the tail that does not fill a block is kept (a tiny corpus still trains): it is padded with
  eos, its padding masked out of the loss, and, being at the end of a causal block, the padding
  never influences a real token.
"""

from __future__ import annotations

import glob
import json
import multiprocessing as mp
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100
TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")


class DataError(ValueError):
    """Unusable training or eval input; the message names the file, line, field or pattern."""


# --- sources ---------------------------------------------------------------------------------------


def expand_paths(entries: Sequence[str], what: str = "train_files") -> list[Path]:
    """Expand files, directories (recursively) and glob patterns into a sorted file list."""
    files: list[Path] = []
    for entry in entries:
        p = Path(entry).expanduser()
        if any(ch in entry for ch in "*?["):
            matched = sorted(Path(m) for m in glob.glob(os.path.expanduser(entry), recursive=True))
            matched = [m for m in matched if m.is_file()]
            if not matched:
                raise DataError(f"{what}: the pattern {entry!r} matches no file")
            files.extend(matched)
        elif p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file() and f.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES
            )
            if not found:
                raise DataError(f"{what}: the directory {entry!r} holds no .txt or .jsonl file")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{what}: no such file or directory: {entry!r}")
    for f in files:
        if f.suffix not in TEXT_SUFFIXES + JSONL_SUFFIXES:
            raise DataError(
                f"{what}: unsupported file type {f.suffix or '(none)'!r} for {str(f)!r} "
                f"(expected one of {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)})"
            )
    return files


def read_documents(files: Iterable[Path], text_field: str = "text") -> Iterator[str]:
    """Yield documents: a whole .txt file is one document; a .jsonl line is one record."""
    for path in files:
        if path.suffix in TEXT_SUFFIXES:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                line = path.read_bytes()[: exc.start].count(b"\n") + 1
                raise DataError(f"{path}:{line}: not valid UTF-8 ({exc.reason})") from None
            if text.strip():
                yield text
            continue
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid UTF-8 ({exc.reason})") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise DataError(f"{path}:{lineno}: record has no field {text_field!r}")
                text = record[text_field]
                if not isinstance(text, str):
                    raise DataError(
                        f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not text"
                    )
                if text.strip():
                    yield text


# --- tokenization ----------------------------------------------------------------------------------

_worker_tokenizer = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    _worker_tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)


def _encode(texts: list[str]) -> list[list[int]]:
    return _worker_tokenizer(texts, add_special_tokens=False)["input_ids"]


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_documents(
    docs: Iterable[str],
    tokenizer,
    num_workers: int = 0,
    tokenizer_path: str | None = None,
    batch_size: int = 256,
) -> Iterator[list[int]]:
    """Yield token ids per document, in input order (deterministic for any worker count)."""
    batches = _batched(docs, batch_size)
    if num_workers <= 0 or tokenizer_path is None:
        for batch in batches:
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]
        return
    ctx = mp.get_context("spawn")  # fork after the Rust tokenizer's threads ran can deadlock
    with ctx.Pool(num_workers, initializer=_init_worker, initargs=(tokenizer_path,)) as pool:
        for ids in pool.imap(_encode, batches):  # imap keeps input order
            yield from ids


# --- packing ---------------------------------------------------------------------------------------


@dataclass
class Block:
    """One packed training sequence."""

    input_ids: list[int]
    position_ids: list[int]
    labels: list[int]


def pack_documents(
    token_docs: Iterable[list[int]],
    max_length: int,
    eos_id: int,
    document_aware: bool = True,
    keep_tail: bool = True,
) -> Iterator[Block]:
    """Concatenate documents (each followed by eos) and cut them into ``max_length`` blocks."""
    ids: list[int] = []
    pos: list[int] = []
    labels: list[int] = []
    for doc in token_docs:
        tokens = list(doc) + [eos_id]
        start = 0
        while start < len(tokens):
            room = max_length - len(ids)
            piece = tokens[start : start + room]
            first = len(ids) if start == 0 else None  # index of this document's first token
            if document_aware:  # each piece opens a block or a document: positions restart
                pos.extend(range(len(piece)))
            ids.extend(piece)
            labels.extend(piece)
            if document_aware and first is not None and first > 0:
                labels[first] = IGNORE_INDEX
            start += len(piece)
            if len(ids) == max_length:
                yield _block(ids, pos, labels, document_aware)
                ids, pos, labels = [], [], []
    if ids and keep_tail:
        n_pad = max_length - len(ids)
        ids.extend([eos_id] * n_pad)
        labels.extend([IGNORE_INDEX] * n_pad)
        if document_aware:
            pos.extend(range(n_pad))  # a segment of its own; it comes last, so nothing sees it
        yield _block(ids, pos, labels, document_aware)


def _block(ids, pos, labels, document_aware) -> Block:
    return Block(
        input_ids=list(ids),
        position_ids=list(pos) if document_aware else list(range(len(ids))),
        labels=list(labels),
    )


def collate(blocks: Sequence[Block]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.tensor([b.input_ids for b in blocks], dtype=torch.long),
        "position_ids": torch.tensor([b.position_ids for b in blocks], dtype=torch.long),
        "labels": torch.tensor([b.labels for b in blocks], dtype=torch.long),
    }


def count_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that contribute to the loss: labels after the causal shift that are not ignored."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def build_blocks(
    texts: Iterable[str],
    tokenizer,
    max_length: int,
    document_aware: bool = True,
    num_workers: int = 0,
    tokenizer_path: str | None = None,
) -> list[Block]:
    token_docs = tokenize_documents(texts, tokenizer, num_workers, tokenizer_path)
    return list(pack_documents(token_docs, max_length, tokenizer.eos_token_id, document_aware))


def take(items: Iterable[str], limit: int | None) -> Iterator[str]:
    for i, item in enumerate(items):
        if limit is not None and i >= limit:
            return
        yield item
