"""Saving models in Hugging Face format, atomically, and rotating old checkpoints.

A folder is written under a temporary name, its files are fsynced, then it is renamed into place:
a crash mid-save leaves a ``.tmp-*`` folder (removed on the next save), never a half-written
``checkpoint-<step>/`` or ``final/``. Weights are safetensors only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger("qwen_cpt")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-"


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_model_dir(
    target: Path,
    model,
    tokenizer,
    config=None,
    state: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` + ``tokenizer`` (+ config.yaml, trainer_state.json) to ``target`` atomically."""
    target = Path(target)
    tmp = target.parent / f"{TMP_PREFIX}{target.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if config is not None:
            config.to_yaml(tmp / "config.yaml")
        if state is not None:
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint stays as it was
        raise
    old = None
    if target.exists():  # replacing best/ or final/: move the old one aside first
        old = target.parent / f"{TMP_PREFIX}old-{target.name}-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of committed ``checkpoint-<step>`` folders, oldest first."""
    out = []
    if Path(output_dir).is_dir():
        for p in Path(output_dir).iterdir():
            m = CHECKPOINT_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


def rotate_checkpoints(output_dir: Path, limit: int | None) -> list[Path]:
    """Delete the oldest ``checkpoint-*`` beyond ``limit``; the newest is always kept.

    ``best/`` and ``final/`` are separate folders and never touched here.
    """
    if limit is None:
        return []
    ckpts = list_checkpoints(output_dir)
    doomed = [p for _, p in ckpts[: max(0, len(ckpts) - max(1, limit))]]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
        log.info("removed old checkpoint %s (save_total_limit=%d)", p, limit)
    return doomed


def remove_stale_tmp(output_dir: Path) -> None:
    for p in Path(output_dir).glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)
        log.warning("removed leftover partial save %s", p)
