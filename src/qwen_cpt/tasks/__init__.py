"""Two small lm-eval multiple-choice tasks made from real text of this machine, shipped here.

- ``stdlib_next_line``: eight lines of a Python standard-library module; which of four lines
  really comes next (the other three are lines of other modules). The demo's domain.
- ``docs_next_sentence``: three sentences of a man page, a licence or a pydoc topic; which of
  four sentences really comes next. The demo's general text.

Every item comes from a document that :func:`held_out` keeps out of the demo's training data (by
a hash of its name, the same on every machine), and names it in its ``doc`` field. The YAMLs load
their ``.jsonl`` through ``_load.py`` (lm-eval's ``custom_dataset``), so the folder works from
wherever the package is installed: ``eval_tasks: [<TASKS_DIR>]`` or one YAML path. Rebuild the
data from this machine with ``python -m qwen_cpt.tasks``.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

TASKS_DIR = Path(__file__).parent
CODE_TASK, GENERAL_TASK = "stdlib_next_line", "docs_next_sentence"
SHIPPED = (CODE_TASK, GENERAL_TASK)
ITEMS = 200  # per task: lm-eval's stderr of an accuracy is then about 0.03


def held_out(name: str, every: int = 10) -> bool:
    """A stable ~1/every split by name hash, the same on every machine."""
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % every == 0


def task_path(name: str) -> Path:
    return TASKS_DIR / f"{name}.yaml"


def _pick(rng: random.Random, pool: list[tuple[str, str]], doc: str, target: str) -> list[str]:
    """Three distinct distractors from ``pool`` (``(doc, text)``) taken from other documents."""
    out: list[str] = []
    while len(out) < 3:
        d, text = rng.choice(pool)
        if d != doc and text != target and text not in out:
            out.append(text)
    return out


def _items(rng, candidates, pool, n: int) -> list[dict]:
    """``n`` items spread over the documents: ``candidates`` is ``{doc: [(context, target)]}``."""
    docs = sorted(candidates)
    per_doc = {d: rng.sample(c, len(c)) for d, c in candidates.items()}
    items: list[dict] = []
    while len(items) < n and any(per_doc.values()):
        for d in docs:
            if per_doc[d] and len(items) < n:
                context, target = per_doc[d].pop()
                choices = [target, *_pick(rng, pool, d, target)]
                rng.shuffle(choices)
                items.append(
                    {
                        "doc": d,
                        "context": context,
                        "choices": choices,
                        "answer": choices.index(target),
                    }
                )
    return items


def next_line_items(docs: list[tuple[str, str]], n: int = ITEMS, seed: int = 0) -> list[dict]:
    """Items of ``stdlib_next_line`` from held-out ``(name, source)`` documents."""
    rng = random.Random(seed)
    candidates, pool = {}, []
    for name, text in docs:
        lines = text.splitlines()
        good = [
            i
            for i, line in enumerate(lines)
            if i >= 8 and 16 <= len(line.strip()) <= 100 and not line.lstrip().startswith("#")
        ]
        if good:
            candidates[name] = [("\n".join(lines[i - 8 : i]) + "\n", lines[i]) for i in good]
            pool += [(name, lines[i]) for i in good]
    return _items(rng, candidates, pool, n)


_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def sentences(text: str) -> list[str]:
    """Sentences of prose, whitespace folded; too short or too long ones dropped later."""
    return [s.strip() for s in _SENTENCE.split(" ".join(text.split())) if s.strip()]


def next_sentence_items(docs: list[tuple[str, str]], n: int = ITEMS, seed: int = 0) -> list[dict]:
    """Items of ``docs_next_sentence`` from held-out ``(name, prose)`` documents."""
    rng = random.Random(seed)
    candidates, pool = {}, []
    for name, text in docs:
        s = sentences(text)
        ok = [i for i in range(3, len(s)) if 30 <= len(s[i]) <= 200]
        if ok:
            candidates[name] = [(" ".join(s[i - 3 : i]), s[i]) for i in ok]
            pool += [(name, s[i]) for i in ok]
    return _items(rng, candidates, pool, n)


def write_tasks(code_docs, general_docs, folder: Path = TASKS_DIR) -> dict[str, int]:
    """Write both tasks' ``.jsonl`` from held-out documents; returns items per task."""
    built = {
        CODE_TASK: next_line_items([d for d in code_docs if held_out(d[0])]),
        GENERAL_TASK: next_sentence_items([d for d in general_docs if held_out(d[0])]),
    }
    for name, items in built.items():
        with open(Path(folder) / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(it, ensure_ascii=False) + "\n" for it in items)
    return {k: len(v) for k, v in built.items()}
