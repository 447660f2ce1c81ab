"""Packing token ids into fixed-length training blocks.

**Document-aware packing** (run_clm's ``group_texts``, done right): documents are joined with
eos and cut into ``max_length`` blocks. ``position_ids`` restart at 0 at each document start,
so with ``attention_mask=None`` and ``use_cache=False`` transformers builds a block-causal mask
(sdpa/eager/flex) or takes the varlen path (flash_attention_2): no token attends across a
document boundary (docs/design.md, "Packing and document boundaries"). A document's first token is not a target inside a
block, since predicting it would need exactly that cross-document context. The tail that does
not fill a block is padded with eos and masked out of the loss; being last in a causal block,
the padding never influences a real token.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .types import IGNORE_INDEX, Block


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
