"""Self-healing runs: one rank of ``torchrun --max-restarts 3`` dies by SIGKILL, torchrun restarts
the group, and the run resumes from the newest valid checkpoint with the losses of a run that
was never interrupted (``==``). Every run is a real ``torchrun ... -m qwen_cpt train`` on CPU.

The moments: during a step, during a checkpoint save (the save's ``.tmp-`` folder exists; the
rank is frozen with SIGSTOP first, so that the save provably has not committed, then killed),
and just after a save committed. ``QWEN_CPT_RESTART_REPEATS=10`` runs each moment 10 times.

Also the cause, without the trainer: torchrun's store outlives a restart with the last round's
keys in it, so a plain ``env://`` group of the new round reads a dead peer's address; the group
of :func:`qwen_cpt.elastic.init_process_group` does not, and its set-up fails within its bound,
naming the rank, when a peer never comes.
"""

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from qwen_cpt.checkpoint import list_checkpoints, verify

from .test_distributed import ENV, TORCHRUN, _rank_pid
from .test_resume import _cfg, _losses, _write_data

REPEATS = int(os.environ.get("QWEN_CPT_RESTART_REPEATS", "1"))
DEADLINE_S = 900  # generous: the 2-core CI machine is loaded; never an assertion on time
# 2 ranks x 1 block x 2 micro-batches: 4 blocks a step; checkpoints every 2 steps
KW = dict(
    per_device_train_batch_size=1,
    max_steps=8,
    save_steps=2,
    resume_from_checkpoint="auto",
    use_muon_optimizer=True,
)


def _launch(cfg, tmp: Path, name: str) -> tuple[subprocess.Popen, Path]:
    """``torchrun --standalone --nproc_per_node 2 --max-restarts 3 -m qwen_cpt train``; its
    output goes to a file (a pipe nobody reads while waiting could fill and stall the run)."""
    path = tmp / f"{name}.yaml"
    cfg.to_yaml(path)
    log = tmp / f"{name}.log"
    cmd = [*TORCHRUN, "2", "--max-restarts", "3", "-m", "qwen_cpt", "train", str(path)]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=ENV, stdout=fh, stderr=subprocess.STDOUT, text=True)
    return proc, log


def _finish(proc: subprocess.Popen, log: Path) -> str:
    try:
        proc.wait(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the run did not end:\n{log.read_text()[-6000:]}") from None
    return log.read_text()


def _wait_until(cond, proc: subprocess.Popen, log: Path, what: str, poll: float = 0.005) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{log.read_text()[-6000:]}")
        time.sleep(poll)
    raise AssertionError(f"{what}: not reached")


def _logged(out: Path, step: int) -> bool:
    try:
        return step in _losses(out)
    except (OSError, ValueError):  # not there yet, or a line being written
        return False


def _steps(out: Path) -> list[int]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in recs if "loss" in r]


@pytest.fixture(scope="module")
def setup(tiny_qwen, tmp_path_factory):
    """The data and an uninterrupted run of the same config: its per-step losses."""
    tmp = tmp_path_factory.mktemp("restarts")
    data = _write_data(tmp)
    out = tmp / "straight"
    proc, log = _launch(_cfg(tiny_qwen, out, data, **KW), tmp, "straight")
    text = _finish(proc, log)
    assert proc.returncode == 0, text[-6000:]
    assert "restart 0 of at most 3" in text
    assert "torchrun restarted the group" not in text
    ref = _losses(out)
    assert sorted(ref) == list(range(1, 9)), ref
    return tiny_qwen, data, ref


def _kill_during_step(out, proc, log):
    """Rank 1, while step 4 runs (step 3 is logged; no save follows step 3: the run saves at
    steps 2, 4, 6, 8 and at the end of the epoch, step 5)."""
    _wait_until(lambda: _logged(out, 3), proc, log, "step 3")
    os.kill(_rank_pid(proc, 1), signal.SIGKILL)
    return 1


def _kill_during_save(out, proc, log):
    """Rank 0 (the one that writes the folder and commits it) while checkpoint-4 is saved:
    frozen by SIGSTOP as soon as its ``.tmp-`` folder exists, checked to be uncommitted, then
    killed; the partial folder stays behind."""
    tmp, done = out / ".tmp-checkpoint-4", out / "checkpoint-4"
    _wait_until(tmp.exists, proc, log, ".tmp-checkpoint-4")
    pid = _rank_pid(proc, 0)
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(0.5)  # a rename already under way would show by now
        assert tmp.exists() and not done.exists(), "checkpoint-4 committed before the kill"
    finally:
        os.kill(pid, signal.SIGKILL)
    return 0


def _kill_after_save(out, proc, log):
    """Rank 1, as soon as checkpoint-4 is committed (its manifest is in the renamed folder)."""
    _wait_until((out / "checkpoint-4" / "manifest.json").exists, proc, log, "checkpoint-4")
    os.kill(_rank_pid(proc, 1), signal.SIGKILL)
    return 1


MOMENTS = {"step": _kill_during_step, "save": _kill_during_save, "after_save": _kill_after_save}


@pytest.mark.parametrize("attempt", range(REPEATS), ids=lambda i: f"try{i}")
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_killed_rank_is_restarted_and_the_run_resumes_exactly(setup, tmp_path, moment, attempt):
    model, data, ref = setup
    out = tmp_path / "run"
    proc, log = _launch(_cfg(model, out, data, **KW), tmp_path, "run")
    killed = MOMENTS[moment](out, proc, log)
    text = _finish(proc, log)
    assert proc.returncode == 0, text[-6000:]
    assert "torchrun restarted the group (restart 1 of at most 3): resuming from the newest " \
        "valid checkpoint" in text, text[-6000:]  # fmt: skip
    assert "this is rank 0 on cpu, restart 1 of at most 3" in text
    assert "restart 2 of" not in text  # one kill, one restart
    assert "Connection refused" not in text, text[-6000:]
    # the survivor's end is one line (it lost its peer), not a traceback through FSDP or DCP
    assert "Traceback" not in text, text[-6000:]
    resumed_from = 4 if moment == "after_save" else 2
    assert f"resuming from {out / f'checkpoint-{resumed_from}'} at step" in text, text[-6000:]
    if moment == "save":  # the partial save of the killed rank, removed at the restart
        assert f"removed leftover partial save {out / '.tmp-checkpoint-4'}" in text
    if killed == 0:  # its lock names a dead pid: taken over
        assert "taking over the lock of pid" in text
    assert _losses(out) == ref
    steps = _steps(out)
    assert steps == sorted(set(steps)) == list(range(1, 9)), steps  # each step once
    # every checkpoint left verifies; none was set aside as broken, no partial save is left
    assert [s for s, _ in list_checkpoints(out)][-1] == 8
    assert all(verify(p) is None for _, p in list_checkpoints(out))
    assert not [p.name for p in out.iterdir() if ".corrupt-" in p.name or p.name.startswith(".")]


# --- the cause, and the set-up's bounds, without the trainer -------------------------------------

ROUND = """
import os, sys, time
from datetime import timedelta
import torch, torch.distributed as dist
rank = int(os.environ["RANK"])
if rank == 0:
    time.sleep(float(os.environ["ZERO_WAITS"]))  # rank 1 reads the store first
try:
    if os.environ["HOW"] == "plain":
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    else:
        from qwen_cpt import elastic
        limit = float(os.environ["SETUP_S"])
        elastic.init_process_group("gloo", timedelta(seconds=60), 2, rank, setup_timeout_s=limit)
    t = torch.ones(1)
    dist.all_reduce(t)
    print("SUM", t.item(), flush=True)
except Exception as exc:
    print("ERROR", str(exc).splitlines()[0], flush=True)
    sys.exit(3)
"""


def _round(store_port: int, how: str, zero_waits=0.0, ranks=(0, 1), setup_s=30.0) -> list:
    """One round of ranks in the test's store, as torchrun's workers in its agent's store."""
    procs = []
    for rank in ranks:
        env = {
            **ENV, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(store_port), "TORCHELASTIC_USE_AGENT_STORE": "True",
            "HOW": how, "ZERO_WAITS": str(zero_waits), "SETUP_S": str(setup_s),
        }  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", ROUND],
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    return [p.communicate(timeout=300)[0] for p in procs]


@pytest.fixture
def agent_store():
    """A store that outlives the rounds, as torchrun's agent's does."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=60))
    yield store
    del store


def test_the_last_rounds_addresses_stay_in_the_store(agent_store):
    """The root cause: after a round of plain ``env://`` groups, gloo's address keys of every
    rank are still in the store torchrun keeps, where the next round's ranks read them (a rank
    that reads one before its peer rewrote it connects to a dead process)."""
    first = _round(agent_store.port, "plain")
    assert all("SUM 2.0" in o for o in first), first
    assert agent_store.check([f"default_pg/0//cpu//0/{rank}" for rank in (0, 1)])


def test_the_elastic_group_gets_a_fresh_namespace_every_round(agent_store):
    for generation in (1, 2, 3):  # rank 1 reads the store first: not the last generation
        outs = _round(agent_store.port, "elastic", zero_waits=2)
        assert all("SUM 2.0" in o for o in outs), outs
        assert int(agent_store.get("qwen_cpt/current")) == generation
        assert agent_store.check([f"qwen_cpt/{generation}/pg/0//cpu//0/1"])
    assert not agent_store.check(["default_pg/0//cpu//0/1"])  # nothing outside the namespace


def test_a_set_up_without_rank_0_fails_within_its_bound_naming_the_rank(agent_store):
    (out,) = _round(agent_store.port, "elastic", ranks=(1,), setup_s=5)
    assert "ERROR rank 1 of 2: rank 0 did not open the process group within 5 s" in out, out
    assert f"127.0.0.1:{agent_store.port}" in out


def test_a_set_up_with_a_missing_rank_fails_on_rank_0_naming_it(agent_store):
    (out,) = _round(agent_store.port, "elastic", ranks=(0,), setup_s=5)
    assert "ERROR rank 0 of 2: rank(s) 1 did not join the process group within 5 s" in out, out


def test_an_unreachable_store_fails_within_the_bound():
    import socket

    with socket.socket() as s:  # a port nobody serves
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (out,) = _round(port, "elastic", ranks=(1,), setup_s=5)
    assert f"ERROR rank 1 of 2: could not reach the process group's store at 127.0.0.1:{port}" in (
        out
    ), out


# --- what a restart says, and the config it refuses ----------------------------------------------


def test_the_restart_count_in_the_log_and_a_restart_that_would_start_over(monkeypatch, caplog):
    from qwen_cpt import elastic
    from qwen_cpt.resume import ResumeError

    for var in ("TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "RANK"):
        monkeypatch.delenv(var, raising=False)
    assert elastic.describe_restarts() == "" and elastic.restart_count() == 0
    elastic.check_restart(None)  # no torchrun: nothing to say
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert elastic.describe_restarts() == ", restart 0 of at most 3"
    elastic.check_restart(None)  # the first start
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert elastic.describe_restarts() == ", restart 1 of at most 3"
    with pytest.raises(ResumeError) as err:  # on every rank, before output_dir is touched
        elastic.check_restart(None)
    assert "set resume_from_checkpoint: auto" in str(err.value)
    with caplog.at_level("WARNING", logger="qwen_cpt"):
        elastic.check_restart("auto")
        elastic.check_restart("/runs/a/checkpoint-10")
    assert caplog.messages == [
        "torchrun restarted the group (restart 1 of at most 3): resuming from the newest valid "
        "checkpoint",
        "torchrun restarted the group (restart 1 of at most 3): resuming from "
        "/runs/a/checkpoint-10 again, as resume_from_checkpoint says, not from a newer checkpoint "
        "of the crashed run; set resume_from_checkpoint: auto to continue from the newest valid "
        "one",
    ]
    caplog.clear()
    monkeypatch.setenv("RANK", "1")  # rank 0 speaks
    with caplog.at_level("WARNING", logger="qwen_cpt"):
        elastic.check_restart("auto")
    assert caplog.messages == []
