"""output_dir safety: one run at a time, no mixing of runs, broken checkpoints kept aside, crash-
safe replacement of best/ and final/, and rotation that says when it could not delete."""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen_cpt import CPTTrainer
from qwen_cpt import checkpoint as C
from qwen_cpt.checkpoint import CheckpointError, remove_stale_tmp, rotate_checkpoints, verify
from qwen_cpt.outdir import LOCK, OutputDirLock

from .test_resume import _cfg, _losses, _write_data

# Runs the CLI with DCP's file writes for checkpoint-1 stalled: the run holds output_dir with a
# save in progress (.tmp-checkpoint-1) until the test kills it.
_STALLED_SAVE = """
import sys, time
import torch.distributed.checkpoint.filesystem as fs
real = fs._write_files_from_queue
def slow(*args, **kwargs):
    if "checkpoint-1" in repr([f[0] for f in kwargs["file_queue"].queue]):
        time.sleep(600)
    return real(*args, **kwargs)
fs._write_files_from_queue = slow
from qwen_cpt.cli import main
sys.exit(main(["train", sys.argv[1]]))
"""


def _flip_a_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_run_refuses_a_busy_output_dir_and_a_dead_runs_lock_is_taken_over(
    tiny_qwen, tmp_path, caplog
):
    data = _write_data(tmp_path)
    out = tmp_path / "out"
    cfg = _cfg(tiny_qwen, out, data, max_steps=2, save_steps=1, resume_from_checkpoint="auto")
    cfg.to_yaml(tmp_path / "first.yaml")
    first = subprocess.Popen(
        [sys.executable, "-c", _STALLED_SAVE, str(tmp_path / "first.yaml")],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 900
        while not (out / ".tmp-checkpoint-1").is_dir() and time.time() < deadline:
            assert first.poll() is None, first.stdout.read()[-3000:]
            time.sleep(0.05)
        assert (out / ".tmp-checkpoint-1").is_dir()
        holder = json.loads((out / LOCK).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        for spec in ("auto", None):  # a resume or a fresh run: both refuse, touching nothing
            with pytest.raises(
                CheckpointError,
                match=rf"output_dir {out} is in use by pid {first.pid} on host "
                rf"{socket.gethostname()} since ",
            ) as err:
                CPTTrainer(
                    _cfg(tiny_qwen, out, data, max_steps=2, resume_from_checkpoint=spec)
                ).train()
            assert "\n" not in str(err.value)
            assert (out / ".tmp-checkpoint-1").is_dir()  # the first run's save is untouched
            assert json.loads((out / LOCK).read_text())["pid"] == first.pid
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the first run is gone and its lock stale: the next run takes it over and finishes
    caplog.set_level(logging.WARNING, logger="qwen_cpt")
    CPTTrainer(cfg).train()
    assert f"taking over the lock of pid {first.pid}" in caplog.text
    assert not (out / LOCK).exists()  # released at the end
    assert verify(out / "checkpoint-2") is None and sorted(_losses(out)) == [1, 2]


def test_a_stale_lock_is_taken_over_on_this_host_only(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    dead = _dead_pid()
    (out / LOCK).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "x"}))
    lock = OutputDirLock(out)
    lock.acquire()
    assert f"taking over the lock of pid {dead}" in caplog.text
    assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    with pytest.raises(CheckpointError, match=f"in use by pid {os.getpid()}"):
        OutputDirLock(out).acquire()  # held (by this very process): refused
    lock.release()
    assert not (out / LOCK).exists()

    (out / LOCK).write_text(json.dumps({"pid": dead, "host": "elsewhere", "started": "T0"}))
    with pytest.raises(
        CheckpointError,
        match=rf"output_dir {out} is in use by pid {dead} on host elsewhere since T0; if that "
        rf"run is gone, remove {out / LOCK} and start again",
    ):
        OutputDirLock(out).acquire()
    assert json.loads((out / LOCK).read_text())["host"] == "elsewhere"


def test_a_lock_of_an_earlier_start_of_the_same_torchrun_job_is_taken_over(
    tmp_path, caplog, monkeypatch
):
    """After a torchrun restart rank 0 may run on another node: the lock of an earlier start
    (a lower generation) of the same job is taken over; another job's, or this start's, not."""
    from qwen_cpt import elastic

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    monkeypatch.setattr(elastic, "_GENERATION", 5)
    for holder in (
        {"job": "job-2", "generation": 4},  # another job
        {"job": "job-1", "generation": 5},  # this very start (another rank's, say)
        {},  # no torchrun start recorded
    ):
        (out / LOCK).write_text(json.dumps({"pid": 1, "host": "node7", "started": "T", **holder}))
        with pytest.raises(CheckpointError, match="is in use by pid 1 on host node7"):
            OutputDirLock(out).acquire()
    (out / LOCK).write_text(
        json.dumps({"pid": 1, "host": "node7", "started": "T", "job": "job-1", "generation": 4})
    )
    lock = OutputDirLock(out)
    lock.acquire()
    assert "an earlier start of this torchrun job (generation 4, now 5)" in caplog.text
    held = json.loads((out / LOCK).read_text())
    assert (held["pid"], held["job"], held["generation"]) == (os.getpid(), "job-1", 5)
    lock.release()


def test_a_lock_is_released_when_the_run_fails(tiny_qwen, tmp_path):
    data = _write_data(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # refused: a used dir
    with pytest.raises(CheckpointError, match="holds a previous run"):
        CPTTrainer(_cfg(tiny_qwen, out, data, max_steps=2)).train()
    assert not (out / LOCK).exists()


def test_a_fresh_run_refuses_a_used_output_dir_unless_told_to_overwrite(
    tiny_qwen, tmp_path, caplog
):
    data = _write_data(tmp_path)
    out = tmp_path / "out"
    CPTTrainer(_cfg(tiny_qwen, out, data, max_steps=3, save_steps=1)).train()
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError) as err:
        CPTTrainer(_cfg(tiny_qwen, out, data, max_steps=2, save_steps=1)).train()
    msg = str(err.value)
    assert "\n" not in msg and f"output_dir {out} holds a previous run" in msg
    for way_out in ("resume_from_checkpoint: auto", "overwrite_output_dir: true", "output_dir"):
        assert way_out in msg
    assert (out / "metrics.jsonl").read_text() == before  # nothing touched
    assert verify(out / "checkpoint-3") is None and (out / "final").is_dir()

    caplog.set_level(logging.WARNING, logger="qwen_cpt")
    CPTTrainer(
        _cfg(tiny_qwen, out, data, max_steps=2, save_steps=1, overwrite_output_dir=True)
    ).train()
    assert "overwrite_output_dir: removed the previous run's files" in caplog.text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    steps = [json.loads(x).get("step") for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2 and steps.count(1) == 1  # this run's records only


def test_a_checkpoint_corrupted_in_place_is_set_aside_and_written_anew(tiny_qwen, tmp_path, caplog):
    data = _write_data(tmp_path)
    out = tmp_path / "out"
    kw = dict(max_steps=2, save_steps=1)
    CPTTrainer(_cfg(tiny_qwen, out, data, **kw)).train()
    weights = out / "checkpoint-2" / "model-00001-of-00001.safetensors"
    _flip_a_byte(weights)  # same size: only the checksum tells
    assert verify(out / "checkpoint-2", checksums=False) is None
    broken = weights.read_bytes()
    caplog.set_level(logging.WARNING, logger="qwen_cpt")
    # resumed from the older checkpoint, the run reaches step 2 again
    resumed = _cfg(tiny_qwen, out, data, resume_from_checkpoint=str(out / "checkpoint-1"), **kw)
    CPTTrainer(resumed).train()
    assert verify(out / "checkpoint-2") is None  # written anew, not skipped
    (aside,) = out.glob("checkpoint-2.corrupt-*")
    assert (aside / weights.name).read_bytes() == broken  # kept as it was
    assert f"checkpoint {out / 'checkpoint-2'} failed verification" in caplog.text
    assert str(aside) in caplog.text


def test_a_fresh_auto_start_sets_broken_checkpoints_aside(tiny_qwen, tmp_path, caplog):
    data = _write_data(tmp_path)
    out = tmp_path / "out"
    cfg = _cfg(tiny_qwen, out, data, max_steps=2, save_steps=1, resume_from_checkpoint="auto")
    CPTTrainer(cfg).train()
    ref = _losses(out)
    for step in (1, 2):
        _flip_a_byte(out / f"checkpoint-{step}" / "state" / "__0_0.distcp")
    caplog.set_level(logging.WARNING, logger="qwen_cpt")
    CPTTrainer(cfg).train()  # nothing valid: starts fresh, over neither of them
    assert len(list(out.glob("checkpoint-1.corrupt-*"))) == 1
    assert len(list(out.glob("checkpoint-2.corrupt-*"))) == 1
    assert verify(out / "checkpoint-1") is None and verify(out / "checkpoint-2") is None
    steps = [json.loads(x).get("step") for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(1) == 1 and _losses(out) == ref  # the old run's records are gone


def test_replacing_best_survives_a_crash_between_the_renames(tmp_path, monkeypatch):
    out = tmp_path / "out"

    def contents(text):
        return lambda tmp: (tmp / "weights.txt").write_text(text)

    C.save_folder(out / "best", contents("old"))
    real, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("killed between the renames")
        return real(src, dst)

    monkeypatch.setattr(C.os, "replace", crash_on_second)
    with pytest.raises(OSError, match="killed between"):
        C.save_folder(out / "best", contents("new"))
    monkeypatch.undo()
    assert not (out / "best").exists()
    remove_stale_tmp(out)  # the next start
    assert (out / "best" / "weights.txt").read_text() == "old"
    assert verify(out / "best") is None
    assert sorted(p.name for p in out.iterdir()) == ["best"]

    C.save_folder(out / "best", contents("new"))  # a crash after both renames: old copy left
    shutil.copytree(out / "best", out / f"{C.OLD_PREFIX}best")
    remove_stale_tmp(out)
    assert sorted(p.name for p in out.iterdir()) == ["best"]
    assert (out / "best" / "weights.txt").read_text() == "new"


def _fake_checkpoints(out: Path, *names: str) -> None:
    for n in names:
        (out / n).mkdir(parents=True)
        (out / n / "x").write_text(n)


def test_rotation_warns_about_a_folder_it_cannot_remove(tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    _fake_checkpoints(out, "checkpoint-1", "checkpoint-2", "checkpoint-3")
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if Path(path).name == "checkpoint-1":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(C.shutil, "rmtree", rmtree)
    caplog.set_level(logging.INFO, logger="qwen_cpt")
    removed = rotate_checkpoints(out, 1, keep=out / "checkpoint-3")
    assert removed == [out / "checkpoint-2"]
    assert f"could not remove old checkpoint {out / 'checkpoint-1'}" in caplog.text
    assert "Permission denied" in caplog.text
    assert f"removed old checkpoint {out / 'checkpoint-1'}" not in caplog.text
    assert (out / "checkpoint-1").is_dir()


def test_rotation_never_counts_or_deletes_corrupt_or_newer_checkpoints(tmp_path):
    out = tmp_path / "out"
    _fake_checkpoints(
        out, "checkpoint-1.corrupt-20260101T000000Z", "checkpoint-2", "checkpoint-3",
        "checkpoint-5",
    )  # fmt: skip
    assert rotate_checkpoints(out, 2, keep=out / "checkpoint-3") == []
    assert rotate_checkpoints(out, 1, keep=out / "checkpoint-3") == [out / "checkpoint-2"]
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint-1.corrupt-20260101T000000Z",
        "checkpoint-3",
        "checkpoint-5",  # a later step of the resumed run: verified when this run gets there
    ]
