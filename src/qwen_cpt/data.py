"""The data pipeline: sources -> pieces of text -> token ids (worker processes) -> packed blocks.

Design goals, each tested:
- **Streaming, bounded memory.** Files are read piece by piece: a .jsonl line, a .txt file or
  paragraph, or at most ``PIECE_BYTES`` of a document with no line breaks (a 100 MB one-line
  document streams too). Nothing holds the corpus in RAM.
- **Parallel tokenization.** ``dataloader_num_workers`` processes tokenize batches of pieces
  with the fast (Rust) tokenizer; at most a few batches are in flight and results are consumed
  in submission order, so the block order is the same for any worker count.
- **Document-aware packing** (run_clm's ``group_texts``, done right): documents are joined with
  eos and cut into ``max_length`` blocks. ``position_ids`` restart at 0 at each document start,
  so with ``attention_mask=None`` and ``use_cache=False`` transformers builds a block-causal mask
  (sdpa/eager/flex) or takes the varlen path (flash_attention_2): no token attends across a
  document boundary (shared/REFERENCE.md). A document's first token is not a target inside a
  block, since predicting it would need exactly that cross-document context. The tail that does
  not fill a block is padded with eos and masked out of the loss; being last in a causal block,
  the padding never influences a real token.
- **Exact data position.** A stream's state is a few numbers: the epoch, the position of the
  piece being packed (file index, byte offset, line) and how many of its tokens are already in
  blocks. Restoring it re-reads and re-tokenizes that one piece, so restore time does not grow
  with the steps trained (HF Trainer replays batches instead: 28 h in transformers #18649).
  Compressed files (.gz, .zst) are the exception: seeking in them decompresses from the start of
  the file (no tokenization); a ``qwen-cpt prepare`` cache restores in O(1) for any input.
- **Mixing and replay.** Named sources with weights are interleaved block by block by a
  deterministic token-deficit rule, so the achieved token shares track the weights to within one
  block (replay of general data limits forgetting: Ibrahim et al. 2024, arXiv 2403.08763).
"""

from __future__ import annotations

import collections
import glob
import gzip
import hashlib
import io
import json
import multiprocessing as mp
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100
TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
COMPRESSED_SUFFIXES = (".gz", ".zst")
PIECE_BYTES = 1 << 20  # a document longer than this is tokenized in pieces of about this size
CACHE_MANIFEST = "qwen_cpt_cache.json"


class DataError(ValueError):
    """Unusable training or eval input; the message names the file, line, field or pattern."""


# --- paths -----------------------------------------------------------------------------------------


def _kind(path: Path) -> str:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in TEXT_SUFFIXES:
        return "txt"
    if last in JSONL_SUFFIXES:
        return "jsonl"
    if last in PARQUET_SUFFIXES and path.suffix not in COMPRESSED_SUFFIXES:
        return "parquet"
    return ""


def _supported(path: Path) -> bool:
    return bool(_kind(path)) or (path / CACHE_MANIFEST).is_file()


def expand_paths(entries: Sequence[str], what: str = "train_files") -> list[Path]:
    """Expand files, directories (recursively) and glob patterns into a sorted file list.

    A directory holding a ``qwen-cpt prepare`` cache is kept as one entry.
    """
    files: list[Path] = []
    for entry in entries:
        p = Path(entry).expanduser()
        if any(ch in entry for ch in "*?["):
            matched = sorted(Path(m) for m in glob.glob(os.path.expanduser(entry), recursive=True))
            matched = [m for m in matched if m.is_file()]
            if not matched:
                raise DataError(f"{what}: the pattern {entry!r} matches no file")
            files.extend(matched)
        elif p.is_dir() and (p / CACHE_MANIFEST).is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _kind(f))
            if not found:
                raise DataError(
                    f"{what}: the directory {entry!r} holds no .txt, .jsonl or .parquet file"
                )
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{what}: no such file or directory: {entry!r}")
    for f in files:
        if not _supported(f):
            raise DataError(
                f"{what}: unsupported file type {''.join(f.suffixes) or '(none)'!r} for "
                f"{str(f)!r} (expected .txt, .md, .jsonl or .parquet, optionally .gz or .zst, "
                "or a qwen-cpt prepare cache directory)"
            )
        if f.is_file() and f.stat().st_size == 0:
            raise DataError(f"{what}: the file {str(f)!r} is empty")
    return files


def _open_binary(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return open(path, "rb")


def _seek(fh, offset: int) -> None:
    if offset:
        try:
            fh.seek(offset)
        except (OSError, io.UnsupportedOperation):  # a compressed stream: read forward
            remaining = offset
            while remaining:
                chunk = fh.read(min(remaining, 1 << 24))
                if not chunk:
                    break
                remaining -= len(chunk)


# --- pieces of text --------------------------------------------------------------------------------


@dataclass
class Piece:
    """A unit of text to tokenize: a whole document or a slice of a long one."""

    text: str
    pos: dict  # where it starts: {"file", "offset", "line"} or {"row"}; JSON-serializable
    first: bool = True  # starts a document
    last: bool = True  # ends a document (an eos follows it)


class _LineReader:
    """Binary lines of at most ``limit`` bytes, cut after whitespace, never inside a character.

    Works on compressed streams too (no seeking back: the cut-off rest is pushed back).
    """

    def __init__(self, fh, offset: int = 0):
        self.fh = fh
        self.offset = offset  # logical byte offset of the next byte returned
        self._pushback = b""

    def readline(self, limit: int) -> bytes:
        data = self._pushback
        self._pushback = b""
        if not data.endswith(b"\n") and len(data) < limit:
            data += self.fh.readline(limit - len(data))
        if len(data) >= limit and not data.endswith(b"\n"):
            window = data[-4096:]
            cut = max(window.rfind(b" "), window.rfind(b"\t"))
            if cut >= 0:
                cut += len(data) - len(window)
            else:  # no whitespace near the end: cut before a UTF-8 lead byte
                cut = len(data) - 1
                while cut > 0 and (data[cut] & 0xC0) == 0x80:
                    cut -= 1
                cut -= 1
            data, self._pushback = data[: cut + 1], data[cut + 1 :]
        self.offset += len(data)
        return data


class FileSource:
    """Documents from files: .txt/.md (per file, or per blank-line paragraph), .jsonl, .parquet."""

    def __init__(
        self,
        files: Sequence[Path],
        text_field: str = "text",
        txt_split: str = "file",
        skip_bad_records: bool = False,
    ):
        self.files = [Path(f) for f in files]
        self.text_field = text_field
        self.txt_split = txt_split
        self.skip_bad_records = skip_bad_records
        self._skipped: set[str] = set()

    def identity(self) -> list:
        return [[str(f), f.stat().st_size if f.is_file() else 0] for f in self.files]

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files if f.is_file())

    def pieces(self, order: Sequence[int], start: dict | None = None) -> Iterator[Piece]:
        """Pieces of the files in ``order`` (indexes into ``files``), from ``start`` on."""
        begin = start["file"] if start else 0
        for k in range(begin, len(order)):
            path = self.files[order[k]]
            at = start if (start and k == begin) else {"offset": 0, "line": 1, "row": 0}
            kind = _kind(path)
            if kind == "parquet":
                yield from self._parquet(path, k, at.get("row", 0))
            elif kind == "jsonl":
                yield from self._jsonl(path, k, at["offset"], at["line"])
            else:
                yield from self._txt(path, k, at["offset"], at["line"], at.get("cont", False))

    def _bad(self, message: str) -> None:
        if not self.skip_bad_records:
            raise DataError(message)
        self._skipped.add(message.split(": ", 1)[0])  # "file:line": each record counts once

    @property
    def skipped(self) -> int:
        """Distinct malformed records skipped so far (re-reading an epoch does not recount)."""
        return len(self._skipped)

    def _txt(self, path: Path, k: int, offset: int, line: int, cont: bool) -> Iterator[Piece]:
        with _open_binary(path) as fh:
            _seek(fh, offset)
            reader = _LineReader(fh, offset)
            doc_start = not cont
            buf: list[str] = []
            buf_pos = None
            buf_bytes = 0
            while True:
                pos = {"file": k, "offset": reader.offset, "line": line, "cont": not doc_start}
                raw = reader.readline(PIECE_BYTES - buf_bytes)  # a piece never exceeds PIECE_BYTES
                if not raw:
                    break
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    bad_line = line + raw[: exc.start].count(b"\n")
                    line += raw.count(b"\n")
                    self._bad(f"{path}:{bad_line}: not valid UTF-8 ({exc.reason})")
                    continue
                line += raw.count(b"\n")
                if self.txt_split == "paragraph" and not text.strip():
                    if buf:  # a blank line ends the paragraph
                        yield Piece("".join(buf), buf_pos, first=doc_start, last=True)
                        buf, buf_pos, buf_bytes = [], None, 0
                    doc_start = True
                    continue
                if buf_pos is None:
                    buf_pos = pos
                buf.append(text)
                buf_bytes += len(raw)
                if buf_bytes >= PIECE_BYTES - 8192:  # a long document goes on in the next piece
                    yield Piece("".join(buf), buf_pos, first=doc_start, last=False)
                    buf, buf_pos, buf_bytes, doc_start = [], None, 0, False
            text = "".join(buf)
            if text.strip() or not doc_start:  # a continued document still needs its eos
                end = {"file": k, "offset": reader.offset, "line": line, "cont": not doc_start}
                yield Piece(text, buf_pos or end, first=doc_start, last=True)

    def _jsonl(self, path: Path, k: int, offset: int, line: int) -> Iterator[Piece]:
        with _open_binary(path) as fh:
            _seek(fh, offset)
            for raw in fh:
                pos = {"file": k, "offset": offset, "line": line}
                offset += len(raw)
                line += 1
                lineno = pos["line"]
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    self._bad(f"{path}:{lineno}: not valid UTF-8 ({exc.reason})")
                    continue
                except json.JSONDecodeError as exc:
                    self._bad(f"{path}:{lineno}: malformed JSON ({exc.msg})")
                    continue
                if not isinstance(record, dict) or self.text_field not in record:
                    self._bad(f"{path}:{lineno}: record has no field {self.text_field!r}")
                    continue
                text = record[self.text_field]
                if not isinstance(text, str):
                    self._bad(
                        f"{path}:{lineno}: field {self.text_field!r} is "
                        f"{type(text).__name__}, not text"
                    )
                    continue
                if text.strip():
                    yield Piece(text, pos)

    def _parquet(self, path: Path, k: int, row: int) -> Iterator[Piece]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if self.text_field not in pf.schema_arrow.names:
            raise DataError(f"{path}: parquet file has no column {self.text_field!r}")
        first_row = 0
        for g in range(pf.num_row_groups):  # jump straight to the row group holding ``row``
            n = pf.metadata.row_group(g).num_rows
            if first_row + n <= row:
                first_row += n
                continue
            column = pf.read_row_group(g, columns=[self.text_field]).column(0).to_pylist()
            for i in range(max(0, row - first_row), n):
                text = column[i]
                if isinstance(text, str) and text.strip():
                    yield Piece(text, {"file": k, "row": first_row + i})
                elif text is not None and not isinstance(text, str):
                    self._bad(f"{path}:row {first_row + i}: {self.text_field!r} is not text")
            first_row += n


class SequenceSource:
    """Documents from an in-memory list of strings or a Hugging Face ``datasets.Dataset``.

    Each row counts as a "file", so the per-epoch file shuffle shuffles documents.
    """

    def __init__(self, items, text_field: str = "text"):
        self.items = items
        self.text_field = text_field
        self.files = list(range(len(items)))
        self.skipped = 0

    def identity(self) -> list:
        fingerprint = getattr(self.items, "_fingerprint", None)  # a datasets.Dataset has one
        if fingerprint is None:
            h = hashlib.sha256()
            for i in range(len(self.items)):
                h.update(str(self._text(i)).encode("utf-8", "replace") + b"\0")
            fingerprint = h.hexdigest()[:16]
        return [["<memory>", len(self.items), fingerprint]]

    def total_bytes(self) -> int:
        return 0

    def _text(self, i: int) -> Any:
        item = self.items[i]
        if isinstance(item, dict):
            if self.text_field not in item:
                raise DataError(f"dataset row {i}: no field {self.text_field!r}")
            return item[self.text_field]
        return item

    def pieces(self, order: Sequence[int], start: dict | None = None) -> Iterator[Piece]:
        for k in range(start["file"] if start else 0, len(order)):
            text = self._text(order[k])
            if not isinstance(text, str):
                raise DataError(f"text {order[k]}: expected a string, got {type(text).__name__}")
            if text.strip():
                yield Piece(text, {"file": k, "row": order[k]})

    def __len__(self) -> int:
        return len(self.items)


class IterableSource:
    """Documents from a Hugging Face ``datasets.IterableDataset`` (rows are counted to resume)."""

    def __init__(self, dataset, text_field: str = "text"):
        self.dataset = dataset
        self.text_field = text_field
        self.files: list = [None]
        self.skipped = 0

    def identity(self) -> list:
        return [["<iterable-dataset>", 0]]

    def total_bytes(self) -> int:
        return 0

    def pieces(self, order: Sequence[int], start: dict | None = None) -> Iterator[Piece]:
        skip = start["row"] if start else 0
        for i, row in enumerate(self.dataset):
            if i < skip:
                continue
            text = row.get(self.text_field) if isinstance(row, dict) else row
            if not isinstance(text, str):
                raise DataError(f"dataset row {i}: no text in field {self.text_field!r}")
            if text.strip():
                yield Piece(text, {"file": 0, "row": i})


# --- legacy helpers used by small callers and tests ----------------------------------------------


def read_documents(files: Iterable[Path], text_field: str = "text") -> Iterator[str]:
    """Yield whole documents from files (pieces of one document joined)."""
    src = FileSource(list(files), text_field)
    parts: list[str] = []
    for piece in src.pieces(range(len(src.files))):
        parts.append(piece.text)
        if piece.last:
            yield "".join(parts)
            parts = []


# --- tokenization ----------------------------------------------------------------------------------

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


# --- packing ---------------------------------------------------------------------------------------


@dataclass
class Block:
    """One packed training sequence (``source`` names the stream it came from)."""

    input_ids: list[int]
    position_ids: list[int]
    labels: list[int]
    source: str = ""


class Packer:
    """Cuts a stream of tokenized pieces into ``max_length`` blocks (see the module docstring)."""

    def __init__(self, max_length: int, eos_id: int, document_aware: bool = True):
        self.max_length = max_length
        self.eos_id = eos_id
        self.document_aware = document_aware
        self._reset()

    def _reset(self) -> None:
        self.ids: list[int] = []
        self.pos: list[int] = []
        self.labels: list[int] = []
        self.doc_pos = 0  # position of the next token within its document, in this block

    def feed(
        self, ids: list[int], first: bool, last: bool, skip: int = 0
    ) -> Iterator[tuple[Block, int]]:
        """Add one piece; yield ``(block, tokens of this piece used so far)`` per full block."""
        tokens = ids + [self.eos_id] if last else ids
        used = skip
        if first and skip == 0:
            self.doc_pos = 0
        while used < len(tokens):
            room = self.max_length - len(self.ids)
            part = tokens[used : used + room]
            if not self.ids:
                self.doc_pos = 0  # positions restart at every block start
            starts_doc = first and used == 0
            if self.document_aware:
                self.pos.extend(range(self.doc_pos, self.doc_pos + len(part)))
            self.doc_pos += len(part)
            if starts_doc and self.ids and self.document_aware:
                self.labels.append(IGNORE_INDEX)  # the first token would need the previous doc
                self.labels.extend(part[1:])
            else:
                self.labels.extend(part)
            self.ids.extend(part)
            used += len(part)
            if len(self.ids) == self.max_length:
                yield self._emit(), used

    def flush(self) -> Block | None:
        """The padded tail block, if any tokens are waiting."""
        if not self.ids:
            return None
        n_pad = self.max_length - len(self.ids)
        self.ids.extend([self.eos_id] * n_pad)
        self.labels.extend([IGNORE_INDEX] * n_pad)
        if self.document_aware:
            self.pos.extend(range(n_pad))  # a segment of its own, last, so nothing sees it
        return self._emit()

    def _emit(self) -> Block:
        pos = self.pos if self.document_aware else list(range(len(self.ids)))
        block = Block(list(self.ids), list(pos), list(self.labels))
        self._reset()
        return block


def pack_documents(
    token_docs: Iterable[list[int]],
    max_length: int,
    eos_id: int,
    document_aware: bool = True,
    keep_tail: bool = True,
) -> Iterator[Block]:
    """Concatenate documents (each followed by eos) and cut them into ``max_length`` blocks."""
    packer = Packer(max_length, eos_id, document_aware)
    for doc in token_docs:
        for block, _ in packer.feed(list(doc), True, True):
            yield block
    tail = packer.flush()
    if tail is not None and keep_tail:
        yield tail


def collate(blocks: Sequence[Block]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.tensor([b.input_ids for b in blocks], dtype=torch.long),
        "position_ids": torch.tensor([b.position_ids for b in blocks], dtype=torch.long),
        "labels": torch.tensor([b.labels for b in blocks], dtype=torch.long),
    }


def count_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that contribute to the loss: labels after the causal shift that are not ignored."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


# --- streams of blocks with an exact position -------------------------------------------------------


@dataclass
class StreamState:
    epoch: int = 0
    piece: dict | None = None  # position of the piece being packed when the last block left
    skip: int = 0  # tokens of that piece already in earlier blocks
    doc: int = -1  # index (in this epoch) of that piece's document, for max_samples
    blocks: int = 0  # blocks emitted this epoch


class BlockStream:
    """Endless blocks from one source, epoch after epoch, with a small exact state.

    File order is shuffled per epoch (seeded); within a file, records keep their order.
    """

    def __init__(
        self,
        name: str,
        source,
        tokenizer,
        max_length: int,
        *,
        document_aware: bool = True,
        num_workers: int = 0,
        tokenizer_path: str | None = None,
        seed: int = 0,
        max_samples: int | None = None,
        shuffle_files: bool = True,
    ):
        self.name = name
        self.source = source
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.document_aware = document_aware
        self.seed = seed
        self.max_samples = max_samples
        self.shuffle_files = shuffle_files
        self.pool = TokenizerPool(tokenizer, num_workers, tokenizer_path)
        self.state = StreamState()
        self._it: Iterator[Block] | None = None

    def file_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.source.files)))
        if self.shuffle_files and len(order) > 1:
            random.Random(f"{self.seed}:{self.name}:{epoch}").shuffle(order)
        return order

    def _pieces(self, epoch: int, start: dict | None, doc: int) -> Iterator[tuple[Piece, int]]:
        """``(piece, document index)`` from ``start``; stops after ``max_samples`` documents."""
        for piece in self.source.pieces(self.file_order(epoch), start):
            resumed = start is not None and piece.pos == start
            if piece.first and not resumed:
                doc += 1
                if self.max_samples is not None and doc >= self.max_samples:
                    return
            yield piece, doc

    def _tokenized(
        self, pieces: Iterator[tuple[Piece, int]]
    ) -> Iterator[tuple[Piece, int, list[int]]]:
        held: collections.deque = collections.deque()

        def texts():
            for batch in _batched(pieces, 256):
                held.append(batch)
                yield [p.text for p, _ in batch]

        for ids in self.pool.map(texts()):
            for (piece, doc), piece_ids in zip(held.popleft(), ids):
                yield piece, doc, piece_ids

    def _blocks(self) -> Iterator[Block]:
        st = self.state
        packer = Packer(self.max_length, self.tokenizer.eos_token_id, self.document_aware)
        while True:
            start, skip = st.piece, st.skip
            for piece, doc, ids in self._tokenized(self._pieces(st.epoch, start, st.doc)):
                first_skip = skip if (start is not None and piece.pos == start) else 0
                skip = 0
                for block, used in packer.feed(ids, piece.first, piece.last, first_skip):
                    st.piece, st.skip, st.doc = piece.pos, used, doc
                    st.blocks += 1
                    block.source = self.name
                    yield block
                    # a piece used up exactly: the next block starts with the next piece
            tail = packer.flush()
            if tail is not None:
                st.blocks += 1
                tail.source = self.name
                yield tail
            if st.blocks == 0:
                raise DataError(f"source {self.name!r}: no documents (every text is empty)")
            st.epoch, st.piece, st.skip, st.doc, st.blocks = st.epoch + 1, None, 0, -1, 0

    def next_block(self) -> Block:
        if self._it is None:
            self._it = self._blocks()
        return next(self._it)

    def state_dict(self) -> dict:
        return dict(vars(self.state))

    def load_state_dict(self, state: dict) -> None:
        self.state = StreamState(**state)
        self._it = None

    def count_blocks(self) -> int:
        """Blocks in one epoch, found by tokenizing the epoch once (small corpora only)."""
        probe = BlockStream(
            self.name,
            self.source,
            self.tokenizer,
            self.max_length,
            document_aware=self.document_aware,
            seed=self.seed,
            max_samples=self.max_samples,
            shuffle_files=self.shuffle_files,
        )
        probe.pool = self.pool
        n = 0
        while True:
            probe.next_block()
            if probe.state.epoch > 0:
                return n
            n += 1

    def estimate_blocks(self, sample_bytes: int = 1 << 20) -> int:
        """Blocks in one epoch estimated from file sizes and the tokens/byte of a sample."""
        total = self.source.total_bytes()
        texts, seen = [], 0
        for piece in self.source.pieces(range(len(self.source.files))):
            texts.append(piece.text)
            seen += len(piece.text.encode("utf-8"))
            if seen >= sample_bytes:
                break
        tokens = sum(len(x) + 1 for x in encode_batch(self.tokenizer, texts)) if texts else 0
        return max(1, round(total * tokens / max(1, seen) / self.max_length))

    def close(self) -> None:
        self.pool.close()


@dataclass
class Mixture:
    """Interleaves named streams by weight, block by block, with a deterministic token deficit."""

    streams: dict[str, Any]
    weights: dict[str, float]
    taken: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        total = sum(self.weights.values())
        self.shares = {k: w / total for k, w in self.weights.items()}
        self.taken = {k: self.taken.get(k, 0) for k in self.streams}

    def next_block(self) -> Block:
        total = sum(self.taken.values())
        # the source furthest behind its share of the tokens taken so far (ties: listed first)
        name = max(self.streams, key=lambda k: self.shares[k] * (total + 1) - self.taken[k])
        block = self.streams[name].next_block()
        self.taken[name] += len(block.input_ids)
        return block

    def achieved_shares(self) -> dict[str, float]:
        total = max(1, sum(self.taken.values()))
        return {k: v / total for k, v in self.taken.items()}

    @property
    def primary(self):
        return next(iter(self.streams.values()))

    def state_dict(self) -> dict:
        return {
            "taken": dict(self.taken),
            "streams": {k: s.state_dict() for k, s in self.streams.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if set(state["streams"]) != set(self.streams):
            raise DataError(
                f"data sources changed: the checkpoint has {sorted(state['streams'])}, "
                f"this run has {sorted(self.streams)}"
            )
        self.taken = dict(state["taken"])
        for k, s in self.streams.items():
            s.load_state_dict(state["streams"][k])

    def identity(self) -> str:
        h = hashlib.sha256()
        for k, s in self.streams.items():
            h.update(json.dumps([k, self.weights[k], s.source.identity()]).encode())
        return h.hexdigest()[:16]

    def close(self) -> None:
        for s in self.streams.values():
            s.close()


# --- building the run's data from the config ------------------------------------------------------


@dataclass
class SourceSpec:
    name: str
    source: Any
    weight: float = 1.0


def _file_or_cache_source(files: list[Path], text_field: str, cfg):
    caches = [f for f in files if f.is_dir()]
    if caches:
        if len(files) > 1:
            raise DataError(
                f"a prepared cache ({caches[0]}) must be a source of its own; "
                "list other files under another source"
            )
        from .cache import CacheSource

        return CacheSource(caches[0])
    return FileSource(files, text_field, cfg.txt_split, cfg.skip_bad_records)


def resolve_sources(
    cfg, train_texts=None, eval_texts=None
) -> tuple[list[SourceSpec], list[SourceSpec]]:
    """Train and eval sources from the config and ``train()``'s arguments, checked up front.

    Paths, globs and empty files are checked here, before any model loads or file is written.
    Eval sources: ``eval`` (``eval_files`` + ``eval_texts``) and one per source that lists
    ``eval_files``, reported as ``eval_loss/<name>``.
    """
    train: list[SourceSpec] = []
    evals: list[SourceSpec] = []
    if cfg.sources:
        if train_texts is not None:
            raise DataError("train_texts and config.sources conflict: give one or the other")
        for i, src in enumerate(cfg.sources):
            field_ = src.get("text_field", cfg.text_field)
            files = src["files"] if isinstance(src["files"], list) else [src["files"]]
            what = f"sources[{i}] ({src['name']}).files"
            train.append(
                SourceSpec(
                    src["name"],
                    _file_or_cache_source(expand_paths(files, what), field_, cfg),
                    float(src.get("weight", 1.0)),
                )
            )
            if src.get("eval_files"):
                ef = (
                    src["eval_files"]
                    if isinstance(src["eval_files"], list)
                    else [src["eval_files"]]
                )
                what = f"sources[{i}] ({src['name']}).eval_files"
                evals.append(
                    SourceSpec(
                        src["name"],
                        FileSource(
                            expand_paths(ef, what), field_, cfg.txt_split, cfg.skip_bad_records
                        ),
                    )
                )
    else:
        parts = []
        if train_texts is not None:
            parts.append(
                IterableSource(train_texts, cfg.text_field)
                if type(train_texts).__name__ == "IterableDataset"
                else SequenceSource(train_texts, cfg.text_field)
            )
        if cfg.train_files:
            parts.append(
                _file_or_cache_source(
                    expand_paths(cfg.train_files, "train_files"), cfg.text_field, cfg
                )
            )
        if not parts:
            raise DataError(
                "nothing to train on: pass train_texts to train() or set train_files (or sources) "
                "in the config"
            )
        for k, part in enumerate(parts):
            name = "train" if len(parts) == 1 else ("texts", "files")[k]
            train.append(SourceSpec(name, part))
    eval_items = list(cfg.eval_texts) + list(eval_texts or [])
    eval_parts = []
    if eval_items:
        eval_parts.append(SequenceSource(eval_items, cfg.text_field))
    if cfg.eval_files:
        eval_parts.append(
            FileSource(
                expand_paths(cfg.eval_files, "eval_files"),
                cfg.text_field,
                cfg.txt_split,
                cfg.skip_bad_records,
            )
        )
    for k, part in enumerate(eval_parts):
        evals.insert(k, SourceSpec("eval" if k == 0 else "eval_files", part))
    return train, evals


def open_stream(spec: SourceSpec, tokenizer, cfg, tokenizer_path: str | None, train: bool):
    if type(spec.source).__name__ == "CacheSource":
        from .cache import CacheStream

        return CacheStream(
            spec.name,
            spec.source,
            tokenizer.eos_token_id,
            cfg.max_length,
            document_aware=cfg.document_aware_packing,
            seed=cfg.seed,
        )
    max_samples = cfg.max_samples if train else None
    if isinstance(spec.source, SequenceSource) and max_samples is not None:
        spec.source.files = spec.source.files[:max_samples]  # a fixed subset, shuffled per epoch
        max_samples = None
    return BlockStream(
        spec.name,
        spec.source,
        tokenizer,
        cfg.max_length,
        document_aware=cfg.document_aware_packing,
        num_workers=cfg.dataloader_num_workers if train else 0,
        tokenizer_path=tokenizer_path,
        seed=cfg.seed,
        max_samples=max_samples,
        shuffle_files=train,
    )


def one_epoch(stream) -> list[Block]:
    """Every block of one epoch of a (small) stream, e.g. an eval set."""
    blocks = []
    while True:
        block = stream.next_block()
        if stream.state.epoch > 0:
            return blocks
        blocks.append(block)
