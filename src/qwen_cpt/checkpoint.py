"""Checkpoints that survive crashes: atomic commit, a verified manifest, and full training state.

Commit protocol (after torchtitan's DCP commit, shared/REFERENCE.md):
1. everything is written into ``.tmp-<name>-<pid>/`` next to the target;
2. ``manifest.json`` lists every file with its size and sha256, written last;
3. all files and the folder are fsynced, then the folder is renamed to ``checkpoint-<step>``.
A kill at any moment leaves either the previous state or a complete new folder, plus at most a
``.tmp-*`` folder that the next start removes. "Latest" is the newest ``checkpoint-<step>`` whose
manifest verifies; a truncated or corrupted one is skipped with a warning that names it (HF
Trainer picks the newest folder unchecked, transformers #35782).

What a ``checkpoint-<step>/`` holds:
- the model in Hugging Face format (safetensors + config.json) and the tokenizer, so any
  checkpoint loads with ``from_pretrained``;
- ``optimizer.pt``: the optimizer states (Muon and AdamW parts), tensors only, read back with
  ``torch.load(weights_only=True)``: nothing is unpickled blindly;
- ``rng_state.safetensors``: torch (and CUDA) generator states;
- ``trainer_state.json``: step, epoch, tokens seen, loss sums, best eval loss, the data position,
  the batch geometry and the python/numpy RNG states, as JSON;
- ``config.yaml``: the run's resolved config.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
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
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or used; the message names the path."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [path, path.parent]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_manifest(folder: Path) -> None:
    files = {
        str(f.relative_to(folder)): {"size": f.stat().st_size, "sha256": _sha256(f)}
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1), encoding="utf-8")


def verify(folder: Path, checksums: bool = True) -> str | None:
    """``None`` if ``folder`` is a complete checkpoint, else what is wrong with it."""
    mpath = folder / MANIFEST
    if not mpath.is_file():
        return "no manifest.json (an incomplete save)"
    try:
        files = json.loads(mpath.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable manifest.json ({exc})"
    for name, meta in files.items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["size"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {meta['size']}"
        if checksums and _sha256(f) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


@contextlib.contextmanager
def _removing_on_failure(target: Path, tmp: Path):
    """On any failure remove ``tmp``; a full disk becomes a clear CheckpointError."""
    try:
        yield
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise CheckpointError(
                f"disk full while saving {target}; the partial save was removed and the "
                "previous checkpoint is intact. Free space or lower save_total_limit, then "
                "resume."
            ) from exc
        raise


def commit_folder(tmp: Path, target: Path, manifest: bool = True) -> Path:
    """Write the manifest of the filled ``tmp``, fsync it, and rename it to ``target``."""
    with _removing_on_failure(target, tmp):
        if manifest:
            write_manifest(tmp)
        _fsync_tree(tmp)
    old = None
    if target.exists():  # replacing best/ or final/: move the old one aside, then swap
        old = target.parent / f"{TMP_PREFIX}old-{target.name}-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def save_folder(target: Path, write_contents, manifest: bool = True) -> Path:
    """Create ``target`` atomically: ``write_contents(tmp_dir)`` fills it, then it is committed.

    On any failure (a full disk included) the partial folder is removed, the previous
    ``target`` stays as it was, and the error propagates.
    """
    target = Path(target)
    tmp = target.parent / f"{TMP_PREFIX}{target.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    with _removing_on_failure(target, tmp):
        tmp.mkdir(parents=True)
        write_contents(tmp)
    return commit_folder(tmp, target, manifest)


def write_run_files(folder: Path, tokenizer, config=None, state=None) -> None:
    """What every saved folder holds besides weights: the tokenizer, ``config.yaml`` and
    ``trainer_state.json``."""
    tokenizer.save_pretrained(folder)
    if config is not None:
        config.to_yaml(folder / "config.yaml")
    if state is not None:
        (folder / "trainer_state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")


def save_model_dir(
    target: Path, model, tokenizer, config=None, state=None, state_dict=None
) -> Path:
    """An HF-format model folder (``final/``, ``best/``): weights, tokenizer, config, state.

    ``state_dict``: the full weights when ``model``'s own are sharded (FSDP2).
    """

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        write_run_files(tmp, tokenizer, config, state)

    return save_folder(target, write)


def save_training_checkpoint(
    target: Path, model, tokenizer, config, state: dict, optimizer_state: dict, rng: dict
) -> Path:
    import torch
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        write_run_files(tmp, tokenizer, config, state)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        save_file(rng, str(tmp / "rng_state.safetensors"))

    return save_folder(target, write)


def load_training_state(folder: Path) -> tuple[dict, dict, dict]:
    """``(trainer_state, optimizer_state, rng_tensors)`` of a verified checkpoint folder."""
    import torch
    from safetensors.torch import load_file

    state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    optimizer_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    rng = load_file(str(folder / "rng_state.safetensors"))
    return state, optimizer_state, rng


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of committed ``checkpoint-<step>`` folders, oldest first."""
    out = []
    if Path(output_dir).is_dir():
        for p in Path(output_dir).iterdir():
            m = CHECKPOINT_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_valid_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint whose manifest verifies; broken ones are named in a warning."""
    for _, path in reversed(list_checkpoints(output_dir)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def rotate_checkpoints(output_dir: Path, limit: int | None, keep: Path | None = None) -> list[Path]:
    """Delete the oldest ``checkpoint-*`` beyond ``limit``.

    Never deleted: ``keep`` (the newest valid checkpoint, just written), ``best/`` and
    ``final/`` (separate folders), and any save in progress (``.tmp-*``, not matched here).
    """
    if limit is None:
        return []
    ckpts = [p for _, p in list_checkpoints(output_dir) if keep is None or p != Path(keep)]
    room = max(0, limit - (1 if keep is not None else 0))
    doomed = ckpts[: max(0, len(ckpts) - room)]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
        log.info("removed old checkpoint %s (save_total_limit=%d)", p, limit)
    return doomed


def remove_stale_tmp(output_dir: Path) -> None:
    for p in Path(output_dir).glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)
        log.warning("removed leftover partial save %s", p)


def jsonable_rng(python_state, numpy_state) -> dict[str, Any]:
    out: dict[str, Any] = {"python": [python_state[0], list(python_state[1]), python_state[2]]}
    if numpy_state is not None:
        out["numpy"] = [
            numpy_state[0],
            numpy_state[1].tolist(),
            int(numpy_state[2]),
            int(numpy_state[3]),
            float(numpy_state[4]),
        ]
    return out
