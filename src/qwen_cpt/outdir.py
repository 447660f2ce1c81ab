"""Who may write ``output_dir``, and what a new run may do with an old run's files there.

- :class:`OutputDirLock`: ``output_dir/.lock`` (pid, host, start time), created with
  ``O_CREAT | O_EXCL`` before anything in ``output_dir`` is touched and removed at the end of
  the run, so that a second trainer on the same folder refuses instead of removing the first
  one's save in progress. A lock whose process is gone (same host, pid not alive) is taken over
  with a warning; one from another host is never taken over.
- :func:`check_fresh_start`: a fresh run (``resume_from_checkpoint: null``) refuses a folder
  that holds another run's checkpoints, models or metrics, unless ``overwrite_output_dir``.
- :func:`set_aside_broken`: before a run writes over a checkpoint that failed verification
  (a resume from an older one, or ``auto`` with none valid), the broken folder is moved aside
  to ``checkpoint-<step>.corrupt-<UTC time>``, never deleted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from .checkpoint import (
    CheckpointError,
    list_checkpoints,
    move_aside_corrupt,
    refuse_old_layout,
    verify,
)

log = logging.getLogger("qwen_cpt")

LOCK = ".lock"
# what a run writes into output_dir (besides .lock and .tmp-* / .old-* of saves in progress)
RUN_ENTRIES = ("final", "best", "metrics.jsonl", "logs", "config.yaml")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _torchrun_start() -> dict:
    """``{"job": torchrun's run id, "generation": this start's}`` under torchrun, else ``{}``."""
    from .elastic import generation

    job, gen = os.environ.get("TORCHELASTIC_RUN_ID"), generation()
    return {"job": job, "generation": gen} if job and gen is not None else {}


class OutputDirLock:
    """``output_dir/.lock`` for one run; :meth:`acquire` refuses while another run holds it."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / LOCK
        self.token = uuid.uuid4().hex
        self.held = False
        self.created = False  # output_dir did not exist: an empty one is removed on release

    def acquire(self) -> None:
        self.created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            me = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "token": self.token,
                **_torchrun_start(),
            }
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(me, fh)
                fh.flush()
                os.fsync(fh.fileno())
            self.held = True
            return
        raise CheckpointError(f"output_dir {self.out}: could not take the lock {self.path}")

    def _holder(self) -> dict | None:
        for _ in range(20):  # a run that has just created the file may still be writing it
            try:
                holder = json.loads(self.path.read_text(encoding="utf-8"))
                if isinstance(holder, dict) and "pid" in holder:
                    return holder
            except FileNotFoundError:
                return None
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        return {}

    def _take_over_if_stale(self) -> None:
        holder = self._holder()
        if holder is None:  # released meanwhile: try again
            return
        if not holder:
            raise CheckpointError(
                f"output_dir {self.out} is locked by {self.path}, which names no run; if no "
                "run is using this folder, remove that file and start again"
            )
        pid, host = holder.get("pid"), holder.get("host")
        since = holder.get("started", "an unknown time")
        here = socket.gethostname()
        mine = _torchrun_start()
        earlier = holder.get("generation")
        if (
            mine and holder.get("job") == mine["job"] and isinstance(earlier, int)
            and earlier < mine["generation"]
        ):  # fmt: skip
            # an earlier start of this torchrun job, whose workers torchrun stopped before it
            # started this one (rank 0 may now run on another node)
            log.warning(
                "output_dir %s: taking over the lock of pid %s on host %s, an earlier start of "
                "this torchrun job (generation %s, now %s): torchrun restarted the group",
                self.out, pid, host, earlier, mine["generation"],
            )  # fmt: skip
            self.path.unlink(missing_ok=True)
            return
        if host == here and isinstance(pid, int) and pid != os.getpid() and not _alive(pid):
            log.warning(
                "output_dir %s: taking over the lock of pid %s on host %s (since %s), which is "
                "no longer running",
                self.out,
                pid,
                host,
                since,
            )
            self.path.unlink(missing_ok=True)
            return
        hint = (
            "wait for it to finish, or use another output_dir"
            if host == here
            else f"if that run is gone, remove {self.path} and start again"
        )
        raise CheckpointError(
            f"output_dir {self.out} is in use by pid {pid} on host {host} since {since}; {hint}"
        )

    def release(self) -> None:
        """Remove the lock if this process still holds it (never another run's), and
        ``output_dir`` if the run created it and failed before writing anything."""
        if not self.held:
            return
        self.held = False
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        mine = isinstance(holder, dict) and holder.get("token") == self.token
        if mine and holder.get("pid") == os.getpid():  # not from a forked child
            self.path.unlink(missing_ok=True)
            if self.created:
                with contextlib.suppress(OSError):
                    self.out.rmdir()  # only if empty


def previous_run_entries(out: Path) -> list[Path]:
    """The files and folders in ``out`` that a previous run left (checkpoints, models, metrics)."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [p for _, p in list_checkpoints(out)]
    found += [out / n for n in ("final", "best", "metrics.jsonl") if (out / n).exists()]
    return found


def check_fresh_start(out: Path, overwrite: bool) -> None:
    """A fresh run refuses a used ``out``; with ``overwrite`` it removes the old run's files."""
    out = Path(out)
    used = previous_run_entries(out)
    if not used:
        return
    names = ", ".join(p.name for p in used[:4]) + (", ..." if len(used) > 4 else "")
    if not overwrite:
        raise CheckpointError(
            f"output_dir {out} holds a previous run ({names}); to continue it set "
            "resume_from_checkpoint: auto, to replace it set overwrite_output_dir: true, or "
            "use another output_dir"
        )
    doomed = used + [out / n for n in RUN_ENTRIES if (out / n).exists() and out / n not in used]
    doomed += sorted(p for p in out.glob("report*") if p not in doomed)
    for p in doomed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    log.warning(
        "overwrite_output_dir: removed the previous run's files from %s: %s",
        out,
        ", ".join(p.name for p in doomed),
    )


def set_aside_broken(out: Path, after_step: int | None) -> None:
    """Move aside every ``checkpoint-<step>`` newer than ``after_step`` (all of them if None)
    that fails verification: a resume from ``after_step`` (or a fresh ``auto`` start) would
    otherwise write over it. They were found broken by the resume; each is checked again here,
    as the folder may have changed since."""
    for step, path in list_checkpoints(out):
        if after_step is not None and step <= after_step:
            continue
        refuse_old_layout(path)
        problem = verify(path)
        if problem is not None:
            move_aside_corrupt(path, problem)
