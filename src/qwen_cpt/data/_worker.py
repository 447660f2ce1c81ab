"""A tokenizer worker process, self-contained: it imports no ``qwen_cpt`` module.

:class:`~qwen_cpt.data.tokenize.TokenizerPool` runs this file's source with
``python -c SOURCE TOKENIZER_PATH``: a fresh interpreter that neither re-runs the user's script
(as ``multiprocessing``'s ``spawn``/``forkserver`` do with ``__main__``) nor imports torch
(it starts in a fraction of a second). It reads ``("encode", id, texts)`` messages on stdin and
answers ``("ids", id, ids)`` or ``("error", id, "message")`` on stdout, in order; a reader
thread drains stdin so the parent never blocks writing while this process writes an answer.
It exits at the end of stdin. The helpers here are also imported by the parent.
"""

from __future__ import annotations

import os
import pickle
import queue
import struct
import sys
import threading
from pathlib import Path

_HEADER = struct.Struct(">Q")


def write_message(fh, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    fh.write(_HEADER.pack(len(data)))
    fh.write(data)
    fh.flush()


def read_message(fh):
    """The next message, or ``None`` at the end of the stream (a closed pipe)."""
    head = fh.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    n = _HEADER.unpack(head)[0]
    data = fh.read(n)
    if len(data) < n:
        return None
    return pickle.loads(data)


def load_worker_tokenizer(tokenizer_path: str):
    fast = Path(tokenizer_path) / "tokenizer.json"
    if fast.is_file():  # the Rust tokenizer alone: a worker starts in well under a second
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(fast))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_path)


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


def main(argv: list[str]) -> int:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write into the answer pipe
    inbox: queue.Queue = queue.Queue()

    def reader() -> None:
        while True:
            msg = read_message(stdin)
            inbox.put(msg)
            if msg is None:
                return

    threading.Thread(target=reader, daemon=True).start()
    try:
        tokenizer = load_worker_tokenizer(argv[0])
        error = None
    except Exception as exc:  # reported with the first answer
        tokenizer, error = None, f"could not load the tokenizer {argv[0]!r}: {exc}"
    while True:
        msg = inbox.get()
        if msg is None:
            return 0
        _, rid, texts = msg
        if error is not None:
            write_message(stdout, ("error", rid, error))
            return 1
        try:
            write_message(stdout, ("ids", rid, encode_batch(tokenizer, texts)))
        except Exception as exc:
            write_message(stdout, ("error", rid, f"{type(exc).__name__}: {exc}"))
            return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
