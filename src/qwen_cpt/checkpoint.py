"""Checkpoints that survive crashes: one format for one process and for many, written by DCP.

What a ``checkpoint-<step>/`` holds (format 2):

- the model in Hugging Face format: ``model-*.safetensors`` with their index and ``config.json``,
  written by ``torch.distributed.checkpoint`` (DCP) with its ``HuggingFaceStorageWriter``
  (every rank writes its shards, rank 0 consolidates them into whole tensors), so every
  checkpoint loads with ``AutoModelForCausalLM.from_pretrained(checkpoint-<step>)``; and the
  tokenizer;
- ``state/``: DCP's own format for everything else that resumes the run: the optimizer states
  (sharded as the parameters), the train state, the data position, the schedule, the trackers'
  state, and every rank's RNG states. DCP reshards both parts when the number of processes
  changes;
- ``trainer_state.json``: a readable summary (step, the batch geometry, the data fingerprint),
  which a resume checks before it loads any weights; ``config.yaml``: the run's config;
- ``manifest.json``: every file's size and xxh3-128 hash, written last.

A run that freezes parameters (LoRA, freeze-tuning: :mod:`qwen_cpt.lean`) saves only the
trainable tensors in both parts; its frozen rest is ``model_name_or_path``. Its ``final/`` and
``best/`` hold the merged full model, and with LoRA the PEFT adapter in ``adapter/``.

Commit protocol (torchtitan's; docs/design.md, "Checkpoint commit protocol"): everything is
written into ``.tmp-<name>/`` next to the target; the manifest is written; files and folder are
fsynced; the folder is renamed to ``checkpoint-<step>``. A kill at any moment leaves the previous
checkpoints as they were plus at most a ``.tmp-*`` folder, which the next start removes. "Latest"
is the newest checkpoint whose manifest verifies (HF Trainer picks the newest folder unchecked,
transformers #35782); a truncated or corrupted one is skipped with a warning that names it.

With ``async_checkpoint`` the save uses DCP's ``async_save``: the state is copied to CPU memory
(a consistent snapshot) and training goes on while a background thread writes it; the commit
follows when the writes are done. At most one save is in flight; the next save, the end of the
run and a stop signal wait for it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import re
import shutil
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

log = logging.getLogger("qwen_cpt")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"  # the previous best/ or final/ while it is replaced (remove_stale_tmp)
CORRUPT_INFIX = ".corrupt-"  # checkpoint-<step>.corrupt-<UTC time>: failed verification, kept
MANIFEST = "manifest.json"
FORMAT = 2  # format 1 (qwen-cpt 0.1): optimizer.pt or dcp/ beside the weights
STATE_DIR = "state"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or used; the message names the path."""


class CheckpointSaveError(CheckpointError):
    """A save failed while training (a full disk, a rank's write); the previous checkpoint is
    intact. Other CheckpointErrors are refusals of bad input, made before training."""


def _failures() -> tuple[type[BaseException], ...]:
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)  # DCP's exception is a BaseException


_FAILURES = _failures()
# One plain process saves and loads with DCP's no_dist on purpose; DCP warns of it every time.
warnings.filterwarnings("ignore", "torch.distributed is (disabled, )?unavailable or uninitialized")


# --- integrity --------------------------------------------------------------------------------------


def file_hash(path: Path) -> str:
    """xxh3-128 of a file: 3.7-5x sha256's speed on our CPU (BENCHMARKS.md), 5-7 GB/s."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, checksums: bool = True) -> None:
    files = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            entry: dict[str, Any] = {"size": f.stat().st_size}
            if checksums:
                entry["xxh3_128"] = file_hash(f)
            files[str(f.relative_to(folder))] = entry
    manifest = {"format": FORMAT, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def old_layout(folder: Path) -> bool:
    """A checkpoint written by qwen-cpt 0.1 (``optimizer.pt`` or ``dcp/`` beside the weights)."""
    return (folder / "optimizer.pt").is_file() or (folder / "dcp").is_dir()


def verify(folder: Path, checksums: bool = True) -> str | None:
    """``None`` if ``folder`` is a complete checkpoint, else what is wrong with it."""
    mpath = folder / MANIFEST
    if not mpath.is_file():
        return "no manifest.json (an incomplete save)"
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest.json ({exc})"
    for name, meta in files.items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["size"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {meta['size']}"
        if checksums and "xxh3_128" in meta and file_hash(f) != meta["xxh3_128"]:
            return f"{name} does not match its checksum"
    return None


def refuse_old_layout(folder: Path) -> None:
    if old_layout(folder):
        raise CheckpointError(
            f"{folder} was written by qwen-cpt 0.1 (optimizer.pt or dcp/ beside the weights), "
            f"whose checkpoints this version cannot resume. Start a new run from its weights: "
            f"model_name_or_path={folder} for a single-process one, or that run's final/ folder."
        )


# --- the atomic commit ------------------------------------------------------------------------------


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


@contextlib.contextmanager
def _removing_on_failure(target: Path, tmp: Path):
    """On any failure remove ``tmp``; a write that failed becomes one clear CheckpointError."""
    try:
        yield
    except BaseException as exc:
        clear = _save_failure(exc, target)
        shutil.rmtree(tmp, ignore_errors=True)
        if clear is not None:
            raise clear from exc
        raise


def _disk_full(target: Path) -> CheckpointError:
    return CheckpointSaveError(
        f"disk full while saving {target}; the partial save was removed and the previous "
        "checkpoint is intact. Free space or lower save_total_limit, then resume."
    )


def _causes(exc: BaseException | None):
    """``exc`` and what it wraps: its causes and, for DCP's CheckpointException, every rank's."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        todo += [pair[0] for pair in (getattr(e, "failures", None) or {}).values()]


# torch's zip writer reports a short write (a full disk) as "unexpected pos N vs M" or "failed
# writing file"; it does not keep the errno (docs/design.md, "Saving on a full disk").
_SHORT_WRITE = ("unexpected pos", "failed writing file", "file write failed")
_LOW_SPACE = 64 << 20


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def _save_failure(exc: BaseException | None, target: Path) -> CheckpointError | None:
    """A save's error as one line (call it before removing the partial save): a full disk, or
    the innermost cause; None for an error that is not the save's (e.g. KeyboardInterrupt)."""
    if exc is None or isinstance(exc, CheckpointError):
        return exc
    causes = list(_causes(exc))
    if any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in causes) or any(
        "No space left on device" in str(e) for e in causes
    ):
        return _disk_full(target)
    short = [e for e in causes if any(m in str(e) for m in _SHORT_WRITE)]
    if short:
        free = _free_bytes(target.parent)
        if free is not None and free < _LOW_SPACE:
            return _disk_full(target)
    if not isinstance(exc, _FAILURES):
        return None
    inner = next(
        (e for e in reversed(causes) if not type(e).__name__.startswith("CheckpointException")),
        exc,
    )
    first = (str(inner).strip().splitlines() or [""])[0][:300]
    return CheckpointSaveError(
        f"saving {target} failed ({type(inner).__name__}: {first}); the partial save was "
        "removed and the previous checkpoint is intact"
    )


def commit_folder(tmp: Path, target: Path, checksums: bool = True) -> Path:
    """Write the manifest of the filled ``tmp``, fsync it, and rename it to ``target``."""
    with _removing_on_failure(target, tmp):
        write_manifest(tmp, checksums)
        _fsync_tree(tmp)
    old = None
    if target.exists():  # replacing best/ or final/: move the old one aside, then swap
        # a crash between the two renames leaves .old-<name> and no <name>: remove_stale_tmp
        # renames it back; it deletes .old-<name> only while <name> exists
        old = target.parent / f"{OLD_PREFIX}{target.name}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def move_aside_corrupt(path: Path, problem: str) -> Path:
    """Rename a checkpoint that failed verification to ``<name>.corrupt-<UTC time>`` (kept,
    never deleted automatically: neither listed, counted nor rotated as a checkpoint)."""
    import time

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.parent / f"{path.name}{CORRUPT_INFIX}{stamp}"
    n = 1
    while aside.exists():
        aside = path.parent / f"{path.name}{CORRUPT_INFIX}{stamp}-{n}"
        n += 1
    os.replace(path, aside)
    log.warning(
        "checkpoint %s failed verification (%s); moved it aside to %s", path, problem, aside
    )
    return aside


def tmp_path(target: Path) -> Path:
    return target.parent / f"{TMP_PREFIX}{target.name}"


def save_folder(target: Path, write_contents: Callable[[Path], None]) -> Path:
    """Create ``target`` atomically: ``write_contents(tmp_dir)`` fills it, then it is committed.

    On any failure (a full disk included) the partial folder is removed, the previous
    ``target`` stays as it was, and the error propagates.
    """
    target = Path(target)
    tmp = tmp_path(target)
    if tmp.exists():
        shutil.rmtree(tmp)
    with _removing_on_failure(target, tmp):
        tmp.mkdir(parents=True)
        write_contents(tmp)
    return commit_folder(tmp, target)


def write_run_files(folder: Path, tokenizer, config=None, state=None) -> None:
    """What every saved folder holds besides weights: the tokenizer, ``config.yaml`` and
    ``trainer_state.json``."""
    tokenizer.save_pretrained(folder)
    if config is not None:
        config.to_yaml(folder / "config.yaml")
    if state is not None:
        (folder / "trainer_state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")


def save_model_dir(target: Path, model, tokenizer, config, state, weights: dict) -> Path:
    """An HF-format model folder (``final/``, ``best/``): ``weights`` (whole tensors, a tied
    weight once), tokenizer, config, state."""

    from . import lean

    def write(tmp: Path) -> None:
        if lean.peft_wrapper(model) is not None:  # LoRA: the merged model, and the adapter
            merged = without_tied(model, lean.merged_state_dict(model))
            if lean.is_quantized(model):  # QLoRA: the merged model on the dequantized base
                lean.save_plain_model(tmp, model, merged)
            else:
                model.save_pretrained(tmp, safe_serialization=True, state_dict=merged)
            lean.save_adapter(tmp / lean.ADAPTER_DIR, model, config.lora_train_embeddings)
        else:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
        write_run_files(tmp, tokenizer, config, state)

    return save_folder(target, write)


# --- finding checkpoints ----------------------------------------------------------------------------


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
    """The newest checkpoint whose manifest verifies; broken ones are named in a warning.

    Only the checkpoint that is picked (and any newer broken one) is hashed, not every one.
    """
    for _, path in reversed(list_checkpoints(output_dir)):
        refuse_old_layout(path)
        problem = verify(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def rotate_checkpoints(output_dir: Path, limit: int | None, keep: Path | None = None) -> list[Path]:
    """Delete the oldest ``checkpoint-*`` beyond ``limit``; return those removed.

    Never deleted: ``keep`` (the newest valid checkpoint, just written) and any checkpoint of
    a later step (left by the run this one resumes; it is verified when this run reaches its
    step), ``best/`` and ``final/`` (separate folders), any save in progress (``.tmp-*``) and
    any checkpoint set aside as corrupt (``checkpoint-<step>.corrupt-*``): none of them is
    matched or counted here. A folder that cannot be removed is named in a warning.
    """
    if limit is None:
        return []
    keep_step = None
    if keep is not None and (m := CHECKPOINT_RE.match(Path(keep).name)):
        keep_step = int(m.group(1))
    ckpts = [
        p
        for step, p in list_checkpoints(output_dir)
        if (keep is None or p != Path(keep)) and (keep_step is None or step < keep_step)
    ]
    room = max(0, limit - (1 if keep is not None else 0))
    removed = []
    for p in ckpts[: max(0, len(ckpts) - room)]:
        try:
            shutil.rmtree(p)
        except OSError as exc:
            log.warning(
                "could not remove old checkpoint %s (save_total_limit=%d): %s; training goes on",
                p,
                limit,
                exc,
            )
            continue
        removed.append(p)
        log.info("removed old checkpoint %s (save_total_limit=%d)", p, limit)
    return removed


def remove_stale_tmp(output_dir: Path) -> None:
    """Remove the partial saves (``.tmp-*``) a crash left; put back a ``best/`` or ``final/``
    that a crash left set aside as ``.old-<name>`` mid-replacement."""
    for p in Path(output_dir).glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)
        log.warning("removed leftover partial save %s", p)
    for p in Path(output_dir).glob(f"{OLD_PREFIX}*"):
        target = p.parent / p.name[len(OLD_PREFIX) :]
        if target.exists():
            shutil.rmtree(p, ignore_errors=True)
            log.info("removed %s, the replaced previous copy of %s", p, target)
        else:
            os.replace(p, target)
            log.warning("restored %s from %s (its replacement was interrupted)", target, p)


def without_tied(model, weights: dict) -> dict:
    """``weights`` with a tied parameter (Qwen2.5's embeddings and head) once, as HF saves it."""
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            weights.pop(name, None)
        seen.add(id(p))
    return weights


# --- reading a checkpoint's state without running its code -------------------------------------------


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle; a pickle can run any code. Only the classes a DCP
    checkpoint holds are allowed: DCP's metadata records, ``torch.Size``, dtypes, layouts, paths."""

    DCP = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    OTHERS = {
        ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
    }  # fmt: skip

    def find_class(self, module: str, name: str):
        import torch

        obj = super().find_class(module, name) if module in self.DCP else None
        if isinstance(obj, type) or (module, name) in self.OTHERS:
            return obj or super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def _unsafe(path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: refused as unsafe: it would load {what}, which no checkpoint of qwen-cpt holds "
        "(a pickle can run code); resume only from checkpoints you trust"
    )


def _state_reader(path: Path):
    """DCP's reader for ``state/``, with its pickled metadata read through the allowlist."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            meta_path = self._get_metadata_path(kwargs.get("rank"))
            with open(meta_path, "rb") as fh:
                try:
                    metadata = _MetadataUnpickler(fh).load()
                except pickle.UnpicklingError as exc:
                    raise _unsafe(meta_path, str(exc)) from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _state_planner(path: Path):
    """DCP's load planner, reading the non-tensor entries (JSON strings) with
    ``torch.load(weights_only=True)``, where DCP itself unpickles them freely."""
    import io

    import torch
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as exc:
                raise _unsafe(path / read_item.dest_index.fqn, f"({exc})") from None
            value = io.BytesIO()
            torch.save(obj, value)  # the checked object, for DCP's own load_bytes
            value.seek(0)
            super().load_bytes(read_item, value)

    return SafePlanner()


# --- the manager ------------------------------------------------------------------------------------


class CheckpointManager:
    """Saves and restores the model and every stateful part of a run through DCP.

    ``parts``: name -> object with ``state_dict()``/``load_state_dict()`` whose state is small
    and JSON-able (train state, data position, schedule, trackers); ``rng``: this rank's RNG
    part (tensors; one per rank); the optimizers go in by name. The same code runs on one
    process (DCP without a process group) and on many.
    """

    def __init__(self, output_dir: Path, world, *, keep: int | None, use_async: bool):
        self.output_dir = Path(output_dir)
        self.world = world
        self.keep = keep
        self.use_async = use_async
        self.checksums = True  # benchmarks/checkpoint_stall.py turns it off to measure its cost
        self._pending: tuple[Path, list[Future], threading.Thread | None] | None = None
        # checkpoints this manager committed: only a folder from before this run is hashed
        # before a save at its step skips it
        self._written: set[Path] = set()
        self._error: BaseException | None = None
        # Async saves coordinate on gloo groups of their own, apart from training's collectives:
        # one for the weights' save and one for the state's, whose threads run side by side.
        self._groups = (None, None)
        if use_async and world.sharded:
            import torch.distributed as dist

            self._groups = (dist.new_group(backend="gloo"), dist.new_group(backend="gloo"))

    # --- saving ----------------------------------------------------------------------------------
    def save(
        self,
        target: Path,
        model,
        optimizers: dict,
        parts: dict,
        rng,
        write_main_files: Callable[[Path], None],
        blocking: bool = False,
    ) -> Path:
        """Write ``target`` (``checkpoint-<step>``); with async checkpoints and not
        ``blocking``, return once the state is staged and let the writes go on."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        self.wait()  # one save in flight at most
        world, tmp, target = self.world, tmp_path(target), Path(target)
        if world.on_main(lambda: self._saved_already(target)):
            return target  # saved already (the last step was a save step, say)

        def fresh_tmp() -> None:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            write_main_files(tmp)  # config.json, tokenizer, config.yaml, trainer_state.json

        self._all_or_cleanup(lambda: world.on_main(fresh_tmp), target, tmp)
        model_sd, state_sd = self._state_dicts(model, optimizers, parts, rng)
        writer = HuggingFaceStorageWriter(
            str(tmp), save_distributed=world.sharded, enable_consolidation=world.sharded
        )
        use_async = self.use_async and not blocking
        futures: list[Future] = []

        def write() -> None:
            if use_async:
                kw = [
                    {"process_group": g} if world.sharded else {"no_dist": True}
                    for g in self._groups
                ]
                futures.append(dcp.async_save(model_sd, storage_writer=writer, **kw[0]))
                state_dir = str(tmp / STATE_DIR)
                futures.append(dcp.async_save(state_sd, checkpoint_id=state_dir, **kw[1]))
            else:
                kw = {"no_dist": not world.sharded}
                dcp.save(model_sd, storage_writer=writer, **kw)
                dcp.save(state_sd, checkpoint_id=str(tmp / STATE_DIR), **kw)

        self._all_or_cleanup(write, target, tmp)
        if not use_async:
            world.on_main(lambda: self._commit(tmp, target))
            return target
        thread = None
        if world.is_main:  # commit when every rank's writes are done (rank 0's futures end last)
            thread = threading.Thread(
                target=self._commit_when_done, args=(tmp, target, futures), daemon=True
            )
            thread.start()
        self._pending = (target, futures, thread)
        log.info("%s: writing in the background", target)
        return target

    def _saved_already(self, target: Path) -> bool:
        """Whether ``target`` exists and verifies: sizes for one this run wrote, every hash for
        one from before it. One that fails is moved aside (never written over)."""
        if not target.exists() and not target.is_symlink():
            return False
        mine = target in self._written
        problem = verify(target, checksums=not mine) if target.is_dir() else "not a folder"
        if problem is None:
            if not mine:
                log.info("%s exists and verifies (from an earlier run); not written again", target)
            self._written.add(target)
            return True
        self._written.discard(target)
        move_aside_corrupt(target, problem)
        return False

    def _all_or_cleanup(self, fn, target: Path, tmp: Path) -> None:
        """``fn()`` on every rank; if it failed on any, remove the partial save and raise on all."""
        error = None
        try:
            fn()
        except _FAILURES as exc:  # reported on every rank below
            error = exc
        try:
            if error is not None:
                error = _save_failure(error, target) or error
            self.world.raise_unless_all_ok(error, f"saving {target}", CheckpointSaveError)
        except CheckpointError:
            if self.world.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _commit(self, tmp: Path, target: Path) -> None:
        try:
            shutil.rmtree(tmp / "sharded", ignore_errors=True)  # consolidated into whole tensors
            commit_folder(tmp, target, self.checksums)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._written.add(target)
        rotate_checkpoints(self.output_dir, self.keep, keep=target)
        log.info("saved %s", target)

    def _commit_when_done(self, tmp: Path, target: Path, futures: list[Future]) -> None:
        error = None
        for f in futures:  # every write must be over before the folder is removed or renamed
            try:
                f.result()
            except _FAILURES as exc:
                error = error or exc
        try:
            if error is not None:
                raise error
            self._commit(tmp, target)
        except _FAILURES as exc:  # raised in the training thread by wait()
            self._error = _save_failure(exc, target) or exc  # before the partial save goes
            shutil.rmtree(tmp, ignore_errors=True)

    def wait(self) -> None:
        """Finish the save in flight (every rank); raise on every rank if it failed on any."""
        target, error = self._finish_pending()
        if error is not None:
            error = _save_failure(error, target) or error
        self.world.raise_unless_all_ok(error, f"saving {target}", CheckpointSaveError)

    def close(self) -> None:
        """At the end of a run, also a failed one: let a save in flight finish and commit (this
        rank only, no collective: another rank may be gone); report, never raise, its error."""
        target, error = self._finish_pending()
        if error is not None:
            log.warning("the background save of %s failed: %s", target, error)

    def _finish_pending(self) -> tuple[Path | None, BaseException | None]:
        """Wait for this rank's writes and for the commit thread: (target, first error)."""
        if self._pending is None:
            return None, None
        (target, futures, thread), self._pending = self._pending, None
        error = None
        for f in futures:
            try:
                f.result()
            except _FAILURES as exc:
                error = error or exc
        if thread is not None:
            thread.join()  # it has committed, or removed the partial folder
        error, self._error = self._error or error, None  # the commit thread's is classified
        return target, error

    def _state_dicts(self, model, optimizers: dict, parts: dict, rng) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        from .lean import is_partial, trainable_names

        optim = {name: get_optimizer_state_dict(model, opt) for name, opt in optimizers.items()}
        run = {name: json.dumps(part.state_dict()) for name, part in parts.items()}
        state = {
            "optimizer": optim,
            "run": run,
            "rng": {f"rank{self.world.rank}": rng.state_dict()},
        }
        weights = get_model_state_dict(model)
        if is_partial(model):  # LoRA / freeze: the frozen rest is model_name_or_path itself
            keep = trainable_names(model)
            weights = {k: v for k, v in weights.items() if k in keep}
        return without_tied(model, weights), state

    # --- restoring -------------------------------------------------------------------------------
    def load(self, path: Path, model, optimizers: dict, parts: dict, rng) -> None:
        """Load ``path`` into this run's model, optimizers, parts and RNG (DCP reshards when the
        number of processes differs). A rank that the checkpoint has no RNG state for (it was
        saved by fewer processes) starts from rank 0's."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageReader
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        model_sd, state_sd = self._state_dicts(model, optimizers, parts, rng)
        no_dist = not self.world.sharded
        dcp.load(model_sd, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=no_dist)
        # DCP refused any weight the files lack; only a tied duplicate is absent here
        set_model_state_dict(model, model_sd, options=StateDictOptions(strict=False))
        reader = _state_reader(Path(path) / STATE_DIR)
        saved = reader.read_metadata().state_dict_metadata
        mine = f"rank{self.world.rank}"
        if not any(k.startswith(f"rng.{mine}.") for k in saved):
            state_sd["rng"] = {"rank0": state_sd["rng"][mine]}
        planner = _state_planner(Path(path) / STATE_DIR)
        dcp.load(state_sd, storage_reader=reader, planner=planner, no_dist=no_dist)
        for name, opt in optimizers.items():
            set_optimizer_state_dict(model, opt, state_sd["optimizer"][name])
        for name, part in parts.items():
            part.load_state_dict(json.loads(state_sd["run"][name]))
        rng.load_state_dict(next(iter(state_sd["rng"].values())))
