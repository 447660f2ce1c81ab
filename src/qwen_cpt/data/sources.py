"""Sources of documents: files, in-memory sequences, iterable datasets; path expansion.

**Streaming, bounded memory.** Files are read piece by piece: a .jsonl line, a .txt file or
paragraph, or at most ``PIECE_BYTES`` of a document with no line breaks (a 100 MB one-line
document streams too). Nothing holds the corpus in RAM.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import io
import json
import os
import zlib
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


_DIGEST_SPAN = 64 << 10


def file_digest(path: Path) -> str:
    """Size and an xxhash of the first, middle and last 64 KiB of a file (cheap for any size);
    a prepare cache directory: of its manifest."""
    import xxhash

    path = Path(path)
    if path.is_dir():
        manifest = path / CACHE_MANIFEST
        data = manifest.read_bytes() if manifest.is_file() else b""
        return f"cache:{xxhash.xxh64(data).hexdigest()}"
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    h = xxhash.xxh64(str(size).encode())
    with open(path, "rb") as fh:
        for at in sorted({0, max(0, size // 2 - _DIGEST_SPAN // 2), max(0, size - _DIGEST_SPAN)}):
            fh.seek(at)
            h.update(fh.read(_DIGEST_SPAN))
    return f"{size}:{h.hexdigest()}"


def _hidden(path: Path, shown: Path | str = "") -> bool:
    """A dot-file or a file under a dot-folder, unless a part of ``shown`` (the entry as given,
    perhaps a pattern such as ``data/.*``) names or matches that dot-part."""
    named = [part for part in Path(shown).parts if part.startswith(".")]
    return any(
        part.startswith(".")
        and part not in (".", "..")
        and not any(fnmatch.fnmatchcase(part, n) for n in named)
        for part in path.parts
    )


def _under(path: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        path.resolve().relative_to(folder)
        return True
    except ValueError:
        return False


def expand_paths(
    entries: Sequence[str], what: str = "train_files", exclude: str | Path | None = None
) -> list[Path]:
    """Expand files, directories (recursively) and glob patterns into a sorted file list.

    A directory holding a ``qwen-cpt prepare`` cache is kept as one entry. Directories and
    patterns skip dot-files and dot-folders (``.git/``, ``.ipynb_checkpoints/``) unless the
    entry names them; a dot-file named as a path is read. Nothing under ``exclude`` (the run's
    ``output_dir``) is ever listed: a run never trains on its own metrics or checkpoints.
    """
    skip = Path(exclude).expanduser().resolve() if exclude else None
    files: list[Path] = []
    for entry in entries:
        p = Path(entry).expanduser()
        if any(ch in entry for ch in "*?["):
            pattern = os.path.expanduser(entry)
            matched = sorted(Path(m) for m in glob.glob(pattern, recursive=True))
            matched = [m for m in matched if m.is_file() and not _hidden(m, pattern)]
            if not matched:
                raise DataError(f"{what}: the pattern {entry!r} matches no file")
            kept = [m for m in matched if not _under(m, skip)]
            if not kept:
                raise DataError(
                    f"{what}: the pattern {entry!r} matches only files in the run's output_dir "
                    f"({str(exclude)!r}), which are never read as data"
                )
            files.extend(kept)
        elif p.is_dir() and (p / CACHE_MANIFEST).is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file() and _kind(f) and not _hidden(f.relative_to(p))
            )
            kept = [f for f in found if not _under(f, skip)]
            if found and not kept:
                raise DataError(
                    f"{what}: the directory {entry!r} holds data files only in the run's "
                    f"output_dir ({str(exclude)!r}), which are never read as data"
                )
            if not kept:
                raise DataError(
                    f"{what}: the directory {entry!r} holds no .txt, .jsonl or .parquet file"
                )
            files.extend(kept)
        elif p.is_file():
            if _under(p, skip):
                raise DataError(
                    f"{what}: {entry!r} is in the run's output_dir ({str(exclude)!r}); "
                    "a run never reads its own output as data"
                )
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


_MAGIC = {".gz": (b"\x1f\x8b", "gzip"), ".zst": (b"\x28\xb5\x2f\xfd", "zstd")}
_CHUNK = 1 << 16  # compressed bytes fed to the decompressor at a time


class _Decompressed(io.RawIOBase):
    """A .gz or .zst file, decompressed as it is read, that never ends early without a word.

    A file cut short (no end-of-stream marker, or a cut gzip trailer) raises :class:`DataError`
    saying "truncated"; a file whose content is not of its suffix's format says "not gzip" /
    "not zstd". Multi-member gzip and multi-frame zstd files are read whole. ``consumed`` and
    ``produced`` count compressed bytes read and decompressed bytes returned (the ratio of a
    sample estimates a file's decompressed size).
    """

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self.suffix = path.suffix
        magic, self.fmt = _MAGIC[self.suffix]
        self._fh = open(path, "rb")
        head = self._fh.read(len(magic))
        if head != magic:
            self._fh.close()
            raise DataError(
                f"{path}: not {self.fmt} (the file does not start like a {self.suffix})"
            )
        self._fh.seek(0)
        self._dec = self._new()
        self._in = b""  # compressed bytes not yet given to the decompressor
        self._out = b""  # decompressed bytes not yet returned
        self.consumed = 0
        self.produced = 0

    def _new(self):
        if self.fmt == "gzip":
            return zlib.decompressobj(31)
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj()

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        while not self._out:
            if self._dec.eof:  # a member/frame ended: another may follow
                rest = self._dec.unused_data + self._in
                self._in = b""
                while True:
                    if self.fmt == "gzip":
                        rest = rest.lstrip(b"\0")  # zero padding after a member is allowed
                    if rest:
                        break
                    rest = self._read_raw()
                    if not rest:
                        return  # a clean end
                self._dec = self._new()
                self._in = rest
            if not self._in:
                self._in = self._read_raw()
                if not self._in:
                    raise DataError(
                        f"{self.path}: truncated {self.fmt} file (it ends in the middle of the "
                        f"compressed data, after {self.produced:,} decompressed bytes)"
                    )
            data, self._in = self._in, b""
            try:
                if self.fmt == "gzip":
                    out = self._dec.decompress(data, 1 << 22)
                    self._in = self._dec.unconsumed_tail
                else:
                    out = self._dec.decompress(data)
            except zlib.error as exc:
                raise DataError(f"{self.path}: not gzip or corrupt gzip data ({exc})") from None
            except Exception as exc:  # zstandard.ZstdError
                raise DataError(f"{self.path}: not zstd or corrupt zstd data ({exc})") from None
            self._out = out

    def _read_raw(self) -> bytes:
        chunk = self._fh.read(_CHUNK)
        self.consumed += len(chunk)
        return chunk

    @property
    def ratio(self) -> float:
        """Decompressed bytes per compressed byte so far (bytes still buffered left out)."""
        return (self.produced + len(self._out)) / max(1, self.consumed - len(self._in))

    def readinto(self, b) -> int:
        self._fill()
        n = min(len(b), len(self._out))
        b[:n] = self._out[:n]
        self._out = self._out[n:]
        self.produced += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._fh.close()
        super().close()


def _open_binary(path: Path):
    if path.suffix in _MAGIC:
        return io.BufferedReader(_Decompressed(path), 1 << 20)
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
        return [[str(f), file_digest(f)] for f in self.files]

    def describe_identity(self) -> dict:
        """``{"files": {path: digest}, "options": {...}}``: what fixes this source's text."""
        options: dict[str, Any] = {"text_field": self.text_field}
        if any(_kind(f) == "txt" for f in self.files):
            options["txt_split"] = self.txt_split
        return {"files": {str(f): file_digest(f) for f in self.files}, "options": options}

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files if f.is_file())

    def decompressed_bytes(self, sample_bytes: int = 4 << 20, max_sampled: int = 8) -> int:
        """Bytes of the files once decompressed: exact for plain files; for compressed ones
        the compressed size times the ratio of a sample of up to ``sample_bytes`` (read from the
        start of up to ``max_sampled`` files; the others use their mean ratio). A gzip ISIZE
        trailer is modulo 2**32, so it is not used."""
        total = 0
        ratios: dict[str, list[float]] = {}
        unsampled: list[Path] = []
        for f in self.files:
            size = f.stat().st_size if f.is_file() else 0
            if f.suffix not in _MAGIC:
                total += size
            elif len(ratios.get(f.suffix, [])) < max_sampled:
                raw = _Decompressed(f)
                with raw:
                    while raw.produced < sample_bytes and raw.read(1 << 18):
                        pass
                    if raw.read(1) == b"":  # read whole: exact
                        ratio = raw.produced / max(1, size)
                    else:
                        ratio = raw.ratio
                ratios.setdefault(f.suffix, []).append(ratio)
                total += round(size * ratio)
            else:
                unsampled.append(f)
        for f in unsampled:
            rs = ratios[f.suffix]
            total += round(f.stat().st_size * sum(rs) / len(rs))
        return total

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
        import pyarrow as pa
        import pyarrow.parquet as pq

        def unreadable(exc: Exception, where: str = "") -> DataError:
            why = " ".join(str(exc).split())
            return DataError(f"{path}{where}: not a readable parquet file ({why})")

        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise unreadable(exc) from None
        if self.text_field not in pf.schema_arrow.names:
            raise DataError(f"{path}: parquet file has no column {self.text_field!r}")
        first_row = 0
        for g in range(pf.num_row_groups):  # jump straight to the row group holding ``row``
            n = pf.metadata.row_group(g).num_rows
            if first_row + n <= row:
                first_row += n
                continue
            try:
                column = pf.read_row_group(g, columns=[self.text_field]).column(0).to_pylist()
            except (pa.ArrowException, OSError) as exc:
                raise unreadable(exc, f": row group {g}") from None
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

    def describe_identity(self) -> dict:
        _, n, fingerprint = self.identity()[0]
        return {
            "files": {"<memory>": f"{n}:{fingerprint}"},
            "options": {"text_field": self.text_field, "rows": len(self.files)},
        }

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

    def describe_identity(self) -> dict:
        fingerprint = str(getattr(self.dataset, "_fingerprint", "") or "")
        return {
            "files": {"<iterable-dataset>": fingerprint},
            "options": {"text_field": self.text_field},
        }

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
