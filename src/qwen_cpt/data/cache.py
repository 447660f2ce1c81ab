"""A tokenized cache for big or repeated runs: ``qwen-cpt prepare``.

Layout of a cache directory:
- ``qwen_cpt_cache.json``: the manifest (tokenizer, eos id, shards, totals, inputs);
- ``tokens-NNNNN.bin``: uint32 token ids of whole documents, each followed by eos;
- ``docs-NNNNN.bin``: uint64 offsets where each document starts in that shard.

Training reads it with ``numpy.memmap``: a block is a slice, built on demand, so the cache is
never loaded into RAM, any ``max_length`` works, blocks are shuffled globally per epoch, and the
data position is two integers (epoch, blocks taken), restored in O(1).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .sources import FileSource, expand_paths, file_digest
from .tokenize import TokenizerPool, _batched, tokenizer_digest
from .types import CACHE_MANIFEST, IGNORE_INDEX, Block, DataError

log = logging.getLogger("qwen_cpt")
SHARD_TOKENS = 1 << 26  # 64M tokens (256 MB) per shard


def prepare(
    inputs: list[str],
    output: str | Path,
    tokenizer,
    tokenizer_path: str | None,
    workers: int = 0,
    text_field: str = "text",
    txt_split: str = "file",
    skip_bad_records: bool = False,
    progress: bool | None = None,
    attach: Sequence[Path] = (),
) -> dict:
    """Tokenize ``inputs`` into a cache at ``output``; returns the manifest. The ``attach``
    files (``prepare --clean``'s report and manifest) are copied into the cache."""
    from tqdm.auto import tqdm

    files = expand_paths(inputs, "--input")
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"--output: {str(out)!r} exists and is not empty")
    source = FileSource(files, text_field, txt_split, skip_bad_records)
    eos = tokenizer.eos_token_id
    tmp = out.parent / f".tmp-{out.name}"
    tmp.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    tok_buf: list[np.ndarray] = []
    doc_starts: list[int] = []
    shard_tokens = 0
    n_docs = n_tokens = 0
    started = time.perf_counter()
    bar = tqdm(
        total=source.total_bytes(),
        unit="B",
        unit_scale=True,
        desc="tokenizing",
        disable=not sys.stderr.isatty() if progress is None else not progress,
    )

    def flush() -> None:
        nonlocal tok_buf, doc_starts, shard_tokens
        if not shard_tokens:
            return
        i = len(shards)
        np.concatenate(tok_buf).astype(np.uint32).tofile(tmp / f"tokens-{i:05d}.bin")
        np.asarray(doc_starts, dtype=np.uint64).tofile(tmp / f"docs-{i:05d}.bin")
        shards.append(
            {
                "tokens": f"tokens-{i:05d}.bin",
                "docs": f"docs-{i:05d}.bin",
                "n_tokens": shard_tokens,
                "n_docs": len(doc_starts),
            }
        )
        tok_buf, doc_starts, shard_tokens = [], [], 0

    pool = TokenizerPool(tokenizer, workers, tokenizer_path)
    held: list = []

    def texts():
        for batch in _batched(source.pieces(range(len(files))), 256):
            held.append(batch)
            yield [p.text for p in batch]

    try:
        for ids_batch in pool.map(texts()):
            batch = held.pop(0)
            for piece, ids in zip(batch, ids_batch):
                if piece.first:
                    if shard_tokens >= SHARD_TOKENS:
                        flush()
                    doc_starts.append(shard_tokens)
                    n_docs += 1
                arr = np.asarray(ids + [eos] if piece.last else ids, dtype=np.uint32)
                tok_buf.append(arr)
                shard_tokens += len(arr)
                n_tokens += len(arr)
                bar.update(len(piece.text.encode("utf-8")))
        flush()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        pool.close()
        bar.close()
    if n_docs == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"--input: no documents found in {inputs}")
    elapsed = time.perf_counter() - started
    manifest = {
        "format": 1,
        "tokenizer": str(tokenizer_path or getattr(tokenizer, "name_or_path", "")),
        "tokenizer_digest": tokenizer_digest(tokenizer),
        "eos_token_id": eos,
        "vocab_size": len(tokenizer),
        "dtype": "uint32",
        "shards": shards,
        "total_tokens": n_tokens,
        "total_docs": n_docs,
        "skipped_records": source.skipped,
        "inputs": source.identity(),
        "seconds": round(elapsed, 3),
    }
    for f in attach:
        shutil.copy2(f, tmp / Path(f).name)
    (tmp / CACHE_MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    tmp.rename(out)
    manifest["tokens_per_sec"] = n_tokens / max(elapsed, 1e-9)
    return manifest


class CacheSource:
    """A prepared cache, memory-mapped."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        try:
            self.manifest = json.loads(
                (self.directory / CACHE_MANIFEST).read_text(encoding="utf-8")
            )
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.directory}: unreadable cache manifest ({exc})") from None
        self.tokens = []
        self.docs = []
        for shard in self.manifest["shards"]:
            t = self.directory / shard["tokens"]
            if not t.is_file() or t.stat().st_size != 4 * shard["n_tokens"]:
                raise DataError(f"{t}: missing or truncated cache shard")
            self.tokens.append(np.memmap(t, dtype=np.uint32, mode="r"))
            self.docs.append(
                np.fromfile(self.directory / shard["docs"], dtype=np.uint64).astype(np.int64)
            )
        self.skipped = self.manifest.get("skipped_records", 0)
        self.files = [self.directory]

    def identity(self) -> list:
        return [[str(self.directory), self.manifest["total_tokens"], self.manifest["total_docs"]]]

    def total_bytes(self) -> int:
        return 0


class CacheStream:
    """Blocks from a :class:`CacheSource`, globally shuffled per epoch; state (epoch, index)."""

    def __init__(
        self,
        name: str,
        source: CacheSource,
        eos_id: int,
        max_length: int,
        *,
        document_aware: bool = True,
        seed: int = 0,
        vocab_rows: int | None = None,
    ):
        if source.manifest["eos_token_id"] != eos_id:
            raise DataError(
                f"{source.directory}: cache was made with eos id {source.manifest['eos_token_id']}, "
                f"this tokenizer's is {eos_id}"
            )
        self.name = name
        self.source = source
        self.eos_id = eos_id
        self.max_length = max_length
        self.document_aware = document_aware
        self.seed = seed
        counts = [-(-int(s["n_tokens"]) // max_length) for s in source.manifest["shards"]]
        self.offsets = np.cumsum([0] + counts)
        self.n_blocks = int(self.offsets[-1])
        self.epoch = 0
        self.index = 0
        self._order = None
        self.held: np.ndarray | None = None  # blocks held out as a validation slice
        self.held_split: float | None = None

    def _perm(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            perm = rng.permutation(self.n_blocks)
            if self.held is not None:
                perm = perm[~np.isin(perm, self.held)]
            self._order = (self.epoch, perm)
        return self._order[1]

    def hold_out(self, split: float, max_blocks: int) -> list[Block]:
        """Hold out about ``split`` of the cache's blocks (at most ``max_blocks``, at least one
        when there are two or more) as a validation set: chosen by the seed, the same on every
        resume, and skipped by this stream from now on. Returns the held-out blocks."""
        u = np.random.default_rng([self.seed, 0x5EED]).random(self.n_blocks)
        held = np.flatnonzero(u < split)[:max_blocks]
        if held.size == 0 and self.n_blocks >= 2 and split > 0:
            held = np.array([int(np.argmin(u))])
        if held.size == 0:
            return []
        self.held, self.held_split, self._order = held, split, None
        return [self.block(int(g)) for g in held]

    def block(self, g: int) -> Block:
        shard = int(np.searchsorted(self.offsets, g, side="right") - 1)
        start = (g - int(self.offsets[shard])) * self.max_length
        toks = self.source.tokens[shard]
        ids = np.asarray(toks[start : start + self.max_length], dtype=np.int64)
        n = len(ids)
        labels = ids.copy()
        if self.document_aware:
            docs = self.source.docs[shard]
            lo, hi = np.searchsorted(docs, [start, start + n])
            rel = docs[lo:hi] - start  # document starts inside this block
            marker = np.zeros(n, dtype=np.int64)
            marker[rel] = rel
            seg_start = np.maximum.accumulate(marker)
            pos = np.arange(n) - seg_start
            labels[rel[rel > 0]] = IGNORE_INDEX
        else:
            pos = np.arange(n)
        if n < self.max_length:  # the tail of a shard: pad, mask, own segment
            pad = self.max_length - n
            ids = np.concatenate([ids, np.full(pad, self.eos_id)])
            labels = np.concatenate([labels, np.full(pad, IGNORE_INDEX)])
            pos = np.concatenate(
                [pos, np.arange(pad) if self.document_aware else np.arange(n, n + pad)]
            )
        return Block(ids.tolist(), pos.tolist(), labels.tolist(), self.name)

    def next_block(self) -> Block:
        return self.block(self._advance())

    def skip_block(self) -> int:
        """Step past the next block without reading it (another rank trains on it); its length
        in tokens (every block of a cache is ``max_length`` long, padded at a shard's end)."""
        self._advance()
        return self.max_length

    def _advance(self) -> int:
        if self.index >= len(self._perm()):
            self.epoch, self.index = self.epoch + 1, 0
        g = int(self._perm()[self.index])
        self.index += 1
        return g

    @property
    def state(self):
        return self

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def count_blocks(self) -> int:
        return self.n_blocks - (0 if self.held is None else len(self.held))

    def describe_identity(self) -> dict:
        """The cache (a digest of its manifest) and the tokenizer it was made with."""
        m = self.source.manifest
        return {
            "files": {str(self.source.directory): file_digest(self.source.directory)},
            "options": {"document_aware": self.document_aware, "cache_tokenizer": m["tokenizer"]}
            | ({} if self.held_split is None else {"validation_split": self.held_split}),
            "tokenizer": m.get("tokenizer_digest") or m["tokenizer"],
        }

    def close(self) -> None:
        pass
