"""Sources of documents: files, in-memory sequences, iterable datasets; path expansion.

**Streaming, bounded memory.** Files are read piece by piece: a .jsonl line, a .txt file or
paragraph, or at most ``PIECE_BYTES`` of a document with no line breaks (a 100 MB one-line
document streams too). Nothing holds the corpus in RAM.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .types import CACHE_MANIFEST, DataError, Piece

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
COMPRESSED_SUFFIXES = (".gz", ".zst")
PIECE_BYTES = 1 << 20  # a document longer than this is tokenized in pieces of about this size


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
