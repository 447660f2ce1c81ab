"""The data pipeline: sources -> pieces of text -> token ids (worker processes) -> packed blocks.

Design goals, each tested, each explained in the module that implements it:
- :mod:`.sources`: streaming, bounded memory (files are read piece by piece);
- :mod:`.tokenize`: parallel tokenization in worker processes, in a fixed order;
- :mod:`.packing`: document-aware packing into ``max_length`` blocks;
- :mod:`.streams`: an exact data position (restored by re-reading one piece), and mixing;
- :mod:`.cache`: a tokenized, memory-mapped cache (``qwen-cpt prepare``).
:mod:`.types` holds the small types they share (``Block``, ``Piece``, ``DataError``, ...).
"""

from .cache import SHARD_TOKENS, CacheSource, CacheStream, prepare
from .packing import Packer, pack_documents
from .sources import (
    COMPRESSED_SUFFIXES,
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    PIECE_BYTES,
    TEXT_SUFFIXES,
    FileSource,
    IterableSource,
    SequenceSource,
    expand_paths,
    file_digest,
    read_documents,
)
from .streams import (
    BlockStream,
    Mixture,
    diff_identity,
    hold_out_validation,
    one_epoch,
    open_stream,
    resolve_sources,
)
from .tokenize import TokenizerPool, encode_batch, tokenize_documents, tokenizer_digest
from .types import (
    CACHE_MANIFEST,
    IGNORE_INDEX,
    Block,
    DataError,
    Piece,
    SourceSpec,
    StreamState,
    collate,
    count_loss_tokens,
)

__all__ = [
    "CACHE_MANIFEST",
    "COMPRESSED_SUFFIXES",
    "IGNORE_INDEX",
    "JSONL_SUFFIXES",
    "PARQUET_SUFFIXES",
    "PIECE_BYTES",
    "SHARD_TOKENS",
    "TEXT_SUFFIXES",
    "Block",
    "BlockStream",
    "CacheSource",
    "CacheStream",
    "DataError",
    "FileSource",
    "IterableSource",
    "Mixture",
    "Packer",
    "Piece",
    "SequenceSource",
    "SourceSpec",
    "StreamState",
    "TokenizerPool",
    "collate",
    "count_loss_tokens",
    "diff_identity",
    "encode_batch",
    "expand_paths",
    "file_digest",
    "hold_out_validation",
    "one_epoch",
    "open_stream",
    "pack_documents",
    "prepare",
    "read_documents",
    "resolve_sources",
    "tokenize_documents",
    "tokenizer_digest",
]
