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

**Ranks share the work.** Under torchrun every rank reads the same stream, so each would
tokenize all of it (8 GPUs: 8 times the work). With a :class:`TokenShare`, rank ``r`` of ``n``
tokenizes items ``r, r + n, ...`` of every batch (in its own worker processes, if any) and the
ranks exchange the ids (one gloo all-gather per batch, ids as int32 arrays): the tokenizing over
all ranks is that of one process, and every rank packs the very blocks one process would,
so losses, data positions and resumes on another number of processes are unchanged. A
failure on one rank is sent with the ids, so every rank stops with it instead of waiting.
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
    "TokenShare",
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


class TokenShare:
    """This rank's place among the ranks that tokenize together, and how they exchange ids:
    ``gather(obj)`` returns every rank's ``obj``, in rank order (an all-gather)."""

    def __init__(self, rank: int, size: int, gather):
        self.rank, self.size, self._gather = rank, size, gather

    @classmethod
    def over(cls, group) -> TokenShare:
        """Over a torch.distributed (gloo) process group."""
        import torch.distributed as dist

        size = dist.get_world_size(group)

        def gather(obj):
            out = [None] * size
            dist.all_gather_object(out, obj, group=group)
            return out

        return cls(dist.get_rank(group), size, gather)

    def exchange(self, total: int, part: list[list[int]] | None, error: BaseException | None):
        """Every rank's ids of a batch of ``total`` items, given this rank's ``part`` (items
        ``rank::size``), in the batch's order; raises :class:`DataError` on every rank when
        any rank sends an ``error`` instead."""
        import numpy as np

        if error is not None:
            payload = ("error", f"rank {self.rank}: {error}")
        else:
            lengths = np.fromiter((len(x) for x in part), dtype=np.int64, count=len(part))
            flat = [t for x in part for t in x]
            payload = ("ok", lengths, np.asarray(flat, dtype=np.int32))
        got = self._gather(payload)
        failed = [p[1] for p in got if p[0] == "error"]
        if failed:
            raise DataError(f"data: tokenizing failed on {failed[0]}")
        out: list = [None] * total
        for k, (_, lengths, flat) in enumerate(got):
            ends = np.cumsum(lengths)
            pieces = np.split(flat, ends[:-1]) if len(lengths) else []
            out[k :: self.size] = [x.tolist() for x in pieces]
        return out


class TokenizerPool:
    """Worker processes that tokenize batches; 0 workers (or no tokenizer path) is in-process.
    With a :class:`TokenShare` of several ranks, each rank tokenizes its share of every batch.
    ``chars``: the characters this rank (or its workers) tokenized."""

    def __init__(
        self,
        tokenizer,
        num_workers: int = 0,
        tokenizer_path: str | None = None,
        share: TokenShare | None = None,
    ):
        self.tokenizer = tokenizer
        self.share = share if share is not None and share.size > 1 else None
        self.chars = 0
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
        self.chars += sum(len(t) for t in batch)
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
        if self.share is None:
            yield from self._map(batches)
            return
        rank, size = self.share.rank, self.share.size
        totals: collections.deque = collections.deque()

        def parts():
            for b in batches:
                totals.append(len(b))
                yield b[rank::size]

        mine = self._map(parts())
        while True:
            part, error = None, None
            try:
                part = next(mine)
            except StopIteration:  # every rank reads the same batches: all end here together
                return
            except Exception as exc:  # noqa: BLE001 - sent to every rank, raised on all
                error = exc
            try:
                yield self.share.exchange(totals.popleft() if totals else 0, part, error)
            except DataError:
                if error is not None:  # this rank's own error, as it would be on one process
                    raise error from None
                raise

    def _map(self, batches: Iterable[list[str]]) -> Iterator[list[list[int]]]:
        if not self.workers:
            for b in batches:
                self.chars += sum(len(t) for t in b)
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
