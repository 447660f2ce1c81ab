"""Block streams with an exact position, their weighted mixture, and the run's data from the config.

**Exact data position.** A stream's state is a few numbers: the epoch, the position of the
piece being packed (file index, byte offset, line) and how many of its tokens are already in
blocks. Restoring it re-reads and re-tokenizes that one piece, so restore time does not grow
with the steps trained (HF Trainer replays batches instead: 28 h in transformers #18649).
Compressed files (.gz, .zst) are the exception: seeking in them decompresses from the start of
the file (no tokenization); a ``qwen-cpt prepare`` cache restores in O(1) for any input.

**Mixing and replay.** Named sources with weights are interleaved block by block by a
deterministic token-deficit rule, so the achieved token shares track the weights to within one
block (replay of general data limits forgetting: Ibrahim et al. 2024, arXiv 2403.08763).
"""

from __future__ import annotations

import collections
import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cache import CacheSource, CacheStream
from .packing import Packer
from .sources import FileSource, IterableSource, SequenceSource, expand_paths
from .tokenize import TokenizerPool, _batched, encode_batch, tokenizer_digest
from .types import Block, DataError, Piece, SourceSpec, StreamState


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
        share=None,
    ):
        self.name = name
        self.source = source
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.document_aware = document_aware
        self.seed = seed
        self.max_samples = max_samples
        self.shuffle_files = shuffle_files
        self.pool = TokenizerPool(tokenizer, num_workers, tokenizer_path, share)
        self.held: HeldOut | None = None  # a validation slice this stream leaves out (or is)
        self.state = StreamState()
        self._it: Iterator[Block] | None = None

    def file_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.source.files)))
        if self.shuffle_files and len(order) > 1:
            random.Random(f"{self.seed}:{self.name}:{epoch}").shuffle(order)
        return order

    def _pieces(self, epoch: int, start: dict | None, doc: int) -> Iterator[tuple[Piece, int]]:
        """``(piece, document index)`` from ``start``; stops after ``max_samples`` documents.

        With ``held``, the documents it names are left out (a training stream) or are the only
        ones read (the validation slice, which stops after its last one)."""
        order = self.file_order(epoch)
        held, skipping, left = self.held, False, len(self.held.keys) if self.held else 0
        for piece in self.source.pieces(order, start):
            resumed = start is not None and piece.pos == start
            if piece.first and not resumed and held is not None:
                inside = doc_key(order, piece.pos) in held.keys
                skipping = inside != held.keep
                if held.keep and inside:
                    left -= 1
                elif held.keep and left == 0:
                    return
            if skipping:
                continue
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
        probe.pool, probe.held = self.pool, self.held
        n = 0
        while True:
            probe.next_block()
            if probe.state.epoch > 0:
                return n
            n += 1

    def estimate_blocks(self, sample_bytes: int = 1 << 20) -> int:
        """Blocks in one epoch estimated from (decompressed) file sizes and a sample's tokens/byte."""
        sized = getattr(self.source, "decompressed_bytes", None)  # compressed files: unpacked
        total = sized() if sized is not None else self.source.total_bytes()
        texts, seen = [], 0
        for piece in self.source.pieces(range(len(self.source.files))):
            texts.append(piece.text)
            seen += len(piece.text.encode("utf-8"))
            if seen >= sample_bytes:
                break
        tokens = sum(len(x) + 1 for x in encode_batch(self.tokenizer, texts)) if texts else 0
        return max(1, round(total * tokens / max(1, seen) / self.max_length))

    def describe_identity(self) -> dict:
        """What fixes this stream's tokens: files and digests, text options, tokenizer."""
        desc = self.source.describe_identity()
        desc["options"] = dict(
            desc["options"], max_samples=self.max_samples, document_aware=self.document_aware
        )
        if self.held is not None:  # a resume that holds out another slice trains on other data
            desc["options"]["validation_split"] = self.held.split
        desc["tokenizer"] = tokenizer_digest(self.tokenizer)
        return desc

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

    def next_block(self, build: bool = True) -> Block | None:
        """The next block of the mixture; with ``build=False`` (a block another rank trains
        on) a prepared cache steps past it without reading it, and None is returned."""
        total = sum(self.taken.values())
        # the source furthest behind its share of the tokens taken so far (ties: listed first)
        name = max(self.streams, key=lambda k: self.shares[k] * (total + 1) - self.taken[k])
        stream = self.streams[name]
        if not build and hasattr(stream, "skip_block"):
            self.taken[name] += stream.skip_block()
            return None
        block = stream.next_block()
        self.taken[name] += len(block.input_ids)
        return block if build else None

    @property
    def reads_by_offset(self) -> bool:
        """Every source is a prepared cache: a rank can skip the blocks other ranks train on."""
        return all(hasattr(s, "skip_block") for s in self.streams.values())

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

    def describe_identity(self) -> dict:
        """``{name: {"files": {path: digest}, "options": {...}, "tokenizer": digest}}``.

        Store it in ``trainer_state.json`` (``data_identity``) and compare it with
        :func:`diff_identity` to name what changed on a resume.
        """
        out = {}
        for k, s in self.streams.items():
            desc = s.describe_identity()
            desc["options"] = dict(desc["options"], weight=self.weights[k])
            out[k] = desc
        return out

    def identity(self) -> str:
        """A short hex digest of :meth:`describe_identity`."""
        blob = json.dumps(self.describe_identity(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def close(self) -> None:
        for s in self.streams.values():
            s.close()


def diff_identity(saved: dict, current: dict) -> list[str]:
    """Human lines naming what differs between two :meth:`Mixture.describe_identity` dicts,
    e.g. ``"train: data/a.jsonl changed content"``, ``"train: text_field: 'text' -> 'body'"``,
    ``"train: added file data/c.jsonl"``, ``"train: tokenizer changed"``; ``[]`` if equal."""
    lines: list[str] = []
    for name in saved:
        if name not in current:
            lines.append(f"source {name!r} removed")
    for name in current:
        if name not in saved:
            lines.append(f"source {name!r} added")
    for name in (n for n in saved if n in current):
        old, new = saved[name] or {}, current[name] or {}
        of, nf = old.get("files", {}), new.get("files", {})
        for path in of:
            if path not in nf:
                lines.append(f"{name}: removed file {path}")
            elif of[path] != nf[path]:
                lines.append(f"{name}: {path} changed content")
        lines.extend(f"{name}: added file {path}" for path in nf if path not in of)
        oo, no = old.get("options", {}), new.get("options", {})
        for key in sorted(set(oo) | set(no)):
            if oo.get(key) != no.get(key):
                lines.append(f"{name}: {key}: {oo.get(key)!r} -> {no.get(key)!r}")
        if old.get("tokenizer") != new.get("tokenizer"):
            lines.append(f"{name}: tokenizer changed")
    return lines


# --- building the run's data from the config ------------------------------------------------------


def _file_or_cache_source(files: list[Path], text_field: str, cfg):
    caches = [f for f in files if f.is_dir()]
    if caches:
        if len(files) > 1:
            raise DataError(
                f"a prepared cache ({caches[0]}) must be a source of its own; "
                "list other files under another source"
            )
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
    out = getattr(cfg, "output_dir", None) or None  # never read the run's own output as data
    if cfg.sources:
        if train_texts is not None:
            raise DataError("train_texts and config.sources conflict: give one or the other")
        for i, src in enumerate(cfg.sources):
            field_ = src.get("text_field", cfg.text_field)
            files = src["files"] if isinstance(src["files"], list) else [src["files"]]
            what = f"sources[{i}] ({src['name']}).files"
            if src.get("clean"):  # cleaned once (qwen_cpt.clean), then its shards are read
                from ..clean import clean_source

                source = FileSource(clean_source(src, i, cfg), "text", "file", False)
            else:
                source = _file_or_cache_source(expand_paths(files, what, out), field_, cfg)
            train.append(SourceSpec(src["name"], source, float(src.get("weight", 1.0))))
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
                            expand_paths(ef, what, out), field_, cfg.txt_split, cfg.skip_bad_records
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
                    expand_paths(cfg.train_files, "train_files", out), cfg.text_field, cfg
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
                expand_paths(cfg.eval_files, "eval_files", out),
                cfg.text_field,
                cfg.txt_split,
                cfg.skip_bad_records,
            )
        )
    for k, part in enumerate(eval_parts):
        evals.insert(k, SourceSpec("eval" if k == 0 else "eval_files", part))
    return train, evals


@dataclass(frozen=True)
class HeldOut:
    """The documents (or, for a cache, blocks) of a validation slice, by :func:`doc_key`."""

    keys: frozenset
    keep: bool  # True: the validation stream reads only these; False: training skips them
    split: float


def doc_key(order, pos: dict) -> tuple:
    """Where a document starts, independent of the epoch's file order: (file, row, offset)."""
    return (order[pos["file"]], pos.get("row"), pos.get("offset"))


def _unit(seed: int, name: str, key) -> float:
    """A uniform number in [0, 1) fixed by the seed, the source's name and a document's key."""
    import xxhash

    return xxhash.xxh64_intdigest(f"{seed}:{name}:{key}".encode()) / 2.0**64


def hold_out_validation(stream, split: float, max_blocks: int) -> list[Block]:
    """Hold out about ``split`` of a training stream's documents as a validation set.

    A document is held out when a hash of the seed, the source's name and where the document
    starts falls below ``split``: the same documents every epoch, on every resume and on any
    number of processes. The documents are read in file order until the slice holds
    ``max_blocks`` blocks, so a large corpus is only read at its start; a corpus with no
    document under the threshold (a few texts) gives up its lowest one, if it has two or more.
    ``stream`` then skips those documents; the slice's blocks are returned (``[]`` when the
    stream has a single document and nothing can be spared).
    """
    if isinstance(stream, CacheStream):
        return stream.hold_out(split, max_blocks)
    src, tok = stream.source, stream.tokenizer
    held: dict = {}  # key -> its hash
    lowest, n_docs, tokens, cap = None, 0, 0, max_blocks * stream.max_length
    order = list(range(len(src.files)))
    inside, whole = False, True
    for piece in src.pieces(order):
        if piece.first:
            if tokens >= cap or (stream.max_samples is not None and n_docs >= stream.max_samples):
                whole = False
                break
            n_docs += 1
            key = doc_key(order, piece.pos)
            u = _unit(stream.seed, stream.name, key)
            inside = u < split
            if inside:
                held[key] = u
            if lowest is None or u < lowest[0]:
                lowest = (u, key)
        if inside and tokens < cap:  # a long held-out document is not tokenized to its end
            tokens += len(encode_batch(tok, [piece.text])[0]) + 1
    if whole and n_docs < 2:
        return []  # a single document: nothing can be spared
    if not held and split > 0:
        held[lowest[1]] = lowest[0]
    if whole and len(held) == n_docs:  # training keeps at least one document
        del held[max(held, key=held.get)]
    keys = frozenset(held)
    stream.held = HeldOut(keys, keep=False, split=split)
    reader = BlockStream(
        stream.name,
        src,
        tok,
        stream.max_length,
        document_aware=stream.document_aware,
        seed=stream.seed,
        shuffle_files=False,
    )
    reader.held = HeldOut(keys, keep=True, split=split)
    try:
        return one_epoch(reader, max_blocks)
    finally:
        reader.close()


def check_cache_tokenizer(source: CacheSource, tokenizer) -> None:
    """Refuse a cache made with another tokenizer: its ids mean other tokens (or none) here."""
    m = source.manifest
    made_with = m.get("tokenizer_digest")
    if made_with is None:  # a cache from before digests were recorded: size is all we can check
        if m.get("vocab_size") not in (None, len(tokenizer)):
            raise DataError(
                f"{source.directory}: cache was made with a tokenizer of {m['vocab_size']} tokens "
                f"({m.get('tokenizer')}), this model's has {len(tokenizer)}; re-run qwen-cpt prepare"
            )
        return
    if made_with != tokenizer_digest(tokenizer):
        raise DataError(
            f"{source.directory}: cache was made with another tokenizer ({m.get('tokenizer')}, "
            f"{m.get('vocab_size')} tokens, digest {made_with}); this model's tokenizer "
            f"({getattr(tokenizer, 'name_or_path', '')}, {len(tokenizer)} tokens) has digest "
            f"{tokenizer_digest(tokenizer)}; re-run qwen-cpt prepare with this model's tokenizer"
        )


def open_stream(
    spec: SourceSpec, tokenizer, cfg, tokenizer_path: str | None, train: bool, share=None
):
    """The stream of one source; ``share`` (a :class:`~.tokenize.TokenShare`): the ranks that
    tokenize a training stream together."""
    if type(spec.source).__name__ == "CacheSource":
        check_cache_tokenizer(spec.source, tokenizer)
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
        share=share if train else None,
    )


def one_epoch(stream, limit: int | None = None) -> list[Block]:
    """Every block of one epoch of a (small) stream, e.g. an eval set (at most ``limit``)."""
    blocks = []
    while limit is None or len(blocks) < limit:
        block = stream.next_block()
        if stream.state.epoch > 0:
            return blocks
        blocks.append(block)
    return blocks
