"""Decontamination: training documents that share an n-gram window with an eval set.

The eval sets' n-gram windows (13 tokens by default, the window of GPT-3's and lm-eval's
contamination checks; (docs/design.md, "Decontamination")) are held in one set in memory. Its
size is that of the eval data, which is small next to the corpus. A training document is
contaminated by an eval set when one of its windows is one of that set's windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..data.sources import FileSource, expand_paths
from .text import tokens


def parse_eval_entries(entries: Sequence[str]) -> list[tuple[str, str]]:
    """``NAME=PATH`` or ``PATH`` (named after its file stem) -> ``[(name, path)]``."""
    out = []
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not name or "/" in name:
            path = entry
            name = Path(entry).name.split(".")[0] or entry
        out.append((name, path))
    return out


def read_whole_documents(source: FileSource):
    """Whole documents of a source (the pieces of a long document joined)."""
    parts: list[str] = []
    for piece in source.pieces(range(len(source.files))):
        parts.append(piece.text)
        if piece.last:
            yield "".join(parts)
            parts = []


class EvalIndex:
    """The n-gram windows of each named eval set."""

    def __init__(self, entries: Sequence[str], n: int, text_field: str = "text"):
        self.n = n
        self.names: list[str] = []
        self.windows: dict[tuple[str, ...], int] = {}  # window -> bitmask of eval sets
        self.stats: dict[str, dict] = {}
        for bit, (name, path) in enumerate(parse_eval_entries(entries)):
            files = expand_paths([path], what=f"eval_files ({name})")
            docs = short = 0
            grams = 0
            for text in read_whole_documents(FileSource(files, text_field)):
                toks = tokens(text)
                docs += 1
                if len(toks) < n:
                    short += 1
                    continue
                for i in range(len(toks) - n + 1):
                    w = tuple(toks[i : i + n])
                    self.windows[w] = self.windows.get(w, 0) | (1 << bit)
                    grams += 1
            self.names.append(name)
            self.stats[name] = {
                "path": path,
                "files": [str(f) for f in files],
                "documents": docs,
                "shorter_than_window": short,
                "windows": grams,
            }

    def __bool__(self) -> bool:
        return bool(self.names)

    def hits(self, toks: list[str]) -> dict[str, tuple[int, str]]:
        """``{eval set: (windows matched, first matched window)}`` for one document."""
        n, index = self.n, self.windows
        found: dict[int, list] = {}
        for i in range(len(toks) - n + 1):
            mask = index.get(tuple(toks[i : i + n]))
            if mask:
                for bit in range(len(self.names)):
                    if mask >> bit & 1:
                        entry = found.setdefault(bit, [0, i])
                        entry[0] += 1
        return {
            self.names[bit]: (count, " ".join(toks[at : at + n]))
            for bit, (count, at) in sorted(found.items())
        }


def task_documents(tasks: Sequence[str]) -> dict[str, list[str]]:
    """``{task: texts}``: each evaluation document of the lm-eval ``tasks`` as the model would
    see it, its prompt (``doc_to_text``) followed by its answer (the target, or for a multiple
    choice task the right choice), so a training page holding the question or the answer is
    found. The tasks are resolved and checked as the training config's ``eval_tasks`` are
    (:meth:`qwen_cpt.downstream.Downstream.from_config`: a bad name or YAML is one error)."""
    from types import SimpleNamespace

    from ..downstream import Downstream

    spec = SimpleNamespace(
        eval_tasks=list(tasks), eval_tasks_limit=None, per_device_eval_batch_size=1
    )
    resolved = Downstream.from_config(spec)
    loaded = resolved.manager.load(list(resolved.specs))["tasks"]
    out: dict[str, list[str]] = {}
    for name, task in sorted(loaded.items()):
        texts = []
        for doc in task.eval_docs:
            prompt, target = task.doc_to_text(doc), task.doc_to_target(doc)
            if task.OUTPUT_TYPE == "multiple_choice":
                choices = task.doc_to_choice(doc)
                if isinstance(target, int) and 0 <= target < len(choices):
                    target = choices[target]
            parts = [x for x in (prompt, target) if isinstance(x, str) and x.strip()]
            if parts:
                texts.append(" ".join(parts))
        out[str(name)] = texts
    return out
