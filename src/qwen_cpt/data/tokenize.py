"""Tokenization of pieces of text, in worker processes or in-process.

**Parallel tokenization.** ``dataloader_num_workers`` processes tokenize batches of pieces
with the fast (Rust) tokenizer; at most a few batches are in flight and results are consumed
in submission order, so the block order is the same for any worker count.

**Workers never re-run the user's script.** A worker is ``python -c <source of ._worker>``:
a fresh interpreter that imports no qwen_cpt module (nor torch). ``multiprocessing``'s
``spawn`` and ``forkserver`` import the parent's ``__main__`` by path, so a plain script
without an ``if __name__ == "__main__":`` guard would run again in every worker. Workers talk
over pipes, are never restarted, and a worker that fails stops the run with one
:class:`DataError` line.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from . import _worker
from ._worker import encode_batch, load_worker_tokenizer, read_message, write_message
from .types import DataError, Piece

__all__ = [
    "TokenizerPool",
    "encode_batch",
    "load_worker_tokenizer",
    "read_message",
    "tokenize_documents",
    "tokenizer_digest",
    "write_message",
]


def tokenizer_digest(tokenizer) -> str:
    """A hash of a tokenizer's vocabulary, merges and special tokens (computed once per object)."""
    cached = getattr(tokenizer, "_qwen_cpt_digest", None)
    if cached:
        return cached
    import xxhash

    h = xxhash.xxh64()
    backend = (
        tokenizer if hasattr(tokenizer, "to_str") else getattr(tokenizer, "backend_tokenizer", None)
    )
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    h.update(repr(getattr(tokenizer, "eos_token_id", None)).encode())
    digest = h.hexdigest()
    try:
        tokenizer._qwen_cpt_digest = digest
    except AttributeError:
        pass
    return digest


def _chars(item) -> int:
    """Characters of text in a batch item: a str, a Piece, or a tuple holding one."""
    if isinstance(item, Piece):
        return len(item.text)
    if isinstance(item, str):
        return len(item)
    if isinstance(item, tuple):
        return sum(_chars(x) for x in item if isinstance(x, (Piece, str, tuple)))
    return len(item) if hasattr(item, "__len__") else 0


def _batched(items: Iterable, size: int, max_chars: int = 4 << 20) -> Iterator[list]:
    """Lists of at most ``size`` items and, unless one item is larger, ``max_chars`` of text."""
    batch: list = []
    chars = 0
    for item in items:
        batch.append(item)
        chars += _chars(item)
        if len(batch) == size or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


@functools.lru_cache(maxsize=1)
def _worker_source() -> str:
    return Path(_worker.__file__).read_text(encoding="utf-8")


class _Worker:
    def __init__(self, tokenizer_path: str, index: int):
        self.index = index
        self.log = tempfile.TemporaryFile()
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _worker_source(), tokenizer_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            cwd=os.getcwd(),
        )

    def _failure(self, what: str) -> DataError:
        self.proc.poll()
        self.log.seek(0)
        lines = [ln for ln in self.log.read().decode("utf-8", "replace").splitlines() if ln]
        last = lines[-1].strip() if lines else f"exit status {self.proc.returncode}"
        return DataError(f"tokenizer worker {self.index} {what}: {last}")

    def send(self, msg) -> None:
        try:
            write_message(self.proc.stdin, msg)
        except (BrokenPipeError, OSError, ValueError):
            raise self._failure("died") from None

    def receive(self):
        try:
            msg = read_message(self.proc.stdout)
        except (OSError, ValueError, pickle.UnpicklingError):
            msg = None
        if msg is None:
            raise self._failure("died")
        if msg[0] == "error":
            raise DataError(f"tokenizer worker {self.index} failed: {msg[2]}")
        return msg

    def close(self) -> None:
        for fh in (self.proc.stdin, self.proc.stdout):
            try:
                fh.close()
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()


class TokenizerPool:
    """Worker processes that tokenize batches; 0 workers (or no tokenizer path) is in-process."""

    def __init__(self, tokenizer, num_workers: int = 0, tokenizer_path: str | None = None):
        self.tokenizer = tokenizer
        self.num_workers = num_workers if tokenizer_path else 0
        self.workers: list[_Worker] = []
        self._next_id = 0
        self._results: dict[int, list] = {}  # answers read while waiting for another request
        self._dropped: set[int] = set()  # requests of an abandoned map
        if self.num_workers > 0:
            self.workers = [_Worker(str(tokenizer_path), i) for i in range(self.num_workers)]

    @property
    def pool(self):  # compatibility: truthy when workers run
        return self.workers or None

    def _submit(self, batch: list[str]) -> tuple[int, _Worker]:
        rid = self._next_id
        self._next_id += 1
        worker = self.workers[rid % len(self.workers)]
        worker.send(("encode", rid, batch))
        return rid, worker

    def _result(self, rid: int, worker: _Worker) -> list[list[int]]:
        while rid not in self._results:
            _, got, ids = worker.receive()
            if got in self._dropped:
                self._dropped.discard(got)
            else:
                self._results[got] = ids
        return self._results.pop(rid)

    def map(self, batches: Iterable[list[str]]) -> Iterator[list[list[int]]]:
        """Tokenize ``batches`` in order, with at most 2 batches per worker in flight."""
        if not self.workers:
            for b in batches:
                yield encode_batch(self.tokenizer, b)
            return
        pending: collections.deque = collections.deque()
        try:
            for b in batches:
                pending.append(self._submit(b))
                if len(pending) >= 2 * self.num_workers:
                    yield self._result(*pending.popleft())
            while pending:
                yield self._result(*pending.popleft())
        finally:  # an abandoned map: its answers are dropped when they come
            self._dropped.update(rid for rid, _ in pending)

    def close(self) -> None:
        for w in self.workers:
            w.close()
        self.workers = []

    def __del__(self):  # workers also exit by themselves when this process ends (stdin closes)
        try:
            self.close()
        except Exception:
            pass


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
