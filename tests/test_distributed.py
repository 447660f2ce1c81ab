"""Multi-process training with torchrun on CPU (gloo): FSDP2, distributed Muon, DCP, failures.

The references: a single-process run with the same global batch (losses per step within a
relative 1e-4) and a straight two-process run (resumed losses ``==``). Every run here is a real
``torchrun`` of ``python -m qwen_cpt``. Distributed Muon against ``torch.optim.Muon`` is in
tests/test_muon_distributed.py, HSDP in tests/test_hsdp.py.
"""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qwen_cpt import CPTConfig, CPTTrainer
from qwen_cpt.trainer import ResumeError

from .test_resume import _cfg, _losses, _write_data

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
WORKER = str(Path(__file__).with_name("dist_worker.py"))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _torchrun(args: list[str], nproc: int = 2, **popen):
    cmd = [*TORCHRUN, str(nproc), *args]
    if popen:
        return subprocess.Popen(
            cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)


def _result(res: subprocess.CompletedProcess) -> dict:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def _train(cfg: CPTConfig, tmp_path: Path, name: str, nproc: int = 2, **popen):
    path = tmp_path / f"{name}.yaml"
    cfg.to_yaml(path)
    args = ["-m", "qwen_cpt", "train", str(path)]
    if popen:
        return _torchrun(args, nproc, **popen)
    res = _torchrun(args, nproc)
    if res.returncode != 0 and re.search(r"exitcode\s*: -(6|11) ", res.stderr):
        # A rank killed by SIGABRT (rank 1 during the first evaluation), seen once on the
        # 2-core machine in about 20 runs of this file and not reproduced in 10 reruns; a
        # deterministic bug fails again. Print the log, and retry once.
        print(f"torchrun run {name!r}: a rank crashed; retrying once:\n{res.stderr[-6000:]}")
        shutil.rmtree(cfg.output_dir, ignore_errors=True)
        res = _torchrun(args, nproc)
    return res


# Per rank 1 block per micro-batch, 2 ranks: the same global batch as one process with 2.
DIST = dict(per_device_train_batch_size=1)
SINGLE = dict(per_device_train_batch_size=2)


def test_a_hung_collective_times_out_with_an_error(tmp_path):
    out = _result(_torchrun([WORKER, "timeout", str(tmp_path / "done")]))
    assert 10 <= out["waited_s"] < 60  # distributed_timeout_minutes=0.25 (15 s)
    assert "timed out" in out["error"].lower()


def test_ranks_agree_on_the_measured_attention_and_compile(tiny_qwen, tmp_path):
    """The start-up measurement under torchrun: every rank builds its probe (rank 1 from a
    model on meta), times differ per rank, and the summed times decide alike on both."""
    cfg = _cfg(tiny_qwen, tmp_path / "run", _write_data(tmp_path), max_steps=2, **DIST)
    path = tmp_path / "run.yaml"
    cfg.to_yaml(path)
    out = _result(_torchrun([WORKER, "kernel_choice", str(path)]))
    assert out["attention"] == "eager" and math.isfinite(out["loss"])


def test_a_nan_on_one_rank_stops_the_trainer_on_every_rank(tiny_qwen, tmp_path):
    cfg = _cfg(tiny_qwen, tmp_path / "run", _write_data(tmp_path), max_steps=4, **DIST)
    path = tmp_path / "run.yaml"
    cfg.to_yaml(path)
    res = _torchrun([WORKER, "nan_stop", str(path)])
    out = _result(res)
    assert out["step"] == 1  # step 2 never reached the optimizer
    assert (
        "non-finite loss at step 2 (summed over all 2 ranks; every rank stops here)"
        in (out["error"])
    )
    assert "RANK 1 STOPPED AT STEP 1" in res.stdout and "RANK 0 STOPPED AT STEP 1" in res.stdout
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").open()]
    assert max(steps) == 1


def _eval_losses(out: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval_loss"] for r in recs if "eval_loss" in r}


def _rank_pid(agent: subprocess.Popen, local_rank: int) -> int:
    """The pid of torchrun's worker with ``LOCAL_RANK=local_rank``."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == agent.pid:  # the parent pid
            children.append(stat.parent.name)
    for pid in children:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"LOCAL_RANK={local_rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker with LOCAL_RANK={local_rank} among {children}")


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early:\n{proc.stdout.read()[-3000:]}")
        if (out / "metrics.jsonl").is_file() and step in _losses(out):
            return
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached")


@pytest.mark.parametrize("muon", [True, False], ids=["muon", "adamw"])
def test_two_processes_match_one_and_resume_exactly(tiny_qwen, tmp_path, muon):
    data = _write_data(tmp_path)
    # one short document: one eval block, so rank 1 has none and runs a stand-in forward
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"text": "The court held that the contract was void."}) + "\n")
    kw = dict(
        use_muon_optimizer=muon,
        max_steps=6,
        save_steps=100,
        eval_files=[str(heldout)],
        eval_steps=3,
        per_device_eval_batch_size=1,
    )

    # 1) one process, global batch 2 x 2 micro-batches
    single = tmp_path / "single"
    CPTTrainer(_cfg(tiny_qwen, single, data, **SINGLE, **kw)).train()
    ref = _losses(single)

    # 2) two processes, 1 block each per micro-batch: the same global batch and blocks
    straight = tmp_path / "straight"
    res = _train(_cfg(tiny_qwen, straight, data, **DIST, **kw), tmp_path, "straight")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "distributed: 2 ranks (FSDP2)" in res.stderr
    assert "global batch 4 x 24 tokens" in res.stderr
    assert "gradients: reduce-scattered on the last micro-batch only" in res.stderr
    assert res.stdout.count("final average training loss") == 1  # rank 0 speaks
    assert not (straight / ".lock").exists()  # rank 0 held output_dir's lock and released it
    dist = _losses(straight)
    assert sorted(dist) == list(range(1, 7))  # one metrics line per step: rank 0 writes
    for step in ref:
        assert math.isclose(dist[step], ref[step], rel_tol=1e-4), (step, dist[step], ref[step])
    assert dist[6] < dist[1]
    ref_eval, dist_eval = _eval_losses(single), _eval_losses(straight)
    assert sorted(dist_eval) == sorted(ref_eval) == [0, 3, 6]
    for step in ref_eval:
        assert math.isclose(dist_eval[step], ref_eval[step], rel_tol=1e-4), step
    assert (straight / "best" / "model.safetensors").is_file()

    # 3) final/ is one consolidated HF folder that transformers loads on one process
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    saved = load_file(str(straight / "final" / "model.safetensors"))
    assert set(saved) == set(load_file(str(single / "final" / "model.safetensors")))
    model = AutoModelForCausalLM.from_pretrained(straight / "final")
    reference = AutoModelForCausalLM.from_pretrained(single / "final")
    ids = torch.tensor([[9707, 11, 1879, 0, 151643]])
    with torch.no_grad():
        diff = (model(ids).logits - reference(ids).logits).abs().max().item()
    assert diff < 1e-2, diff
    initial = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    assert not torch.equal(model.model.norm.weight, initial.model.norm.weight)  # it trained
    # the last checkpoint's weights (consolidated by DCP) are the trainer's at that step
    assert _max_logit_diff(straight / "checkpoint-6", straight / "final") <= 1e-5

    # 4) interrupted, then resumed with resume_from_checkpoint=auto: losses == the straight run
    broken = tmp_path / "broken"
    if muon:  # SIGTERM to rank 1 only: both ranks agree, save once at the same step, exit
        proc = _train(_cfg(tiny_qwen, broken, data, **DIST, **kw), tmp_path, "broken", popen=True)
        _wait_for_step(broken, 1, proc)
        os.kill(_rank_pid(proc, 1), signal.SIGTERM)
        log = proc.communicate(timeout=600)[0]
        assert proc.returncode != 0
        saved_at = [int(m) for m in re.findall(r"step (\d+) finished and saved", log)]
        assert len(saved_at) == 2 and saved_at[0] == saved_at[1], log[-3000:]  # both ranks
        assert "SIGTERM received by another rank" in log
        assert (broken / f"checkpoint-{saved_at[0]}" / "state" / ".metadata").is_file()
    else:  # SIGKILL of the whole job after a periodic save: resume from the last checkpoint
        kill_kw = {**kw, "save_steps": 2}
        proc = _train(
            _cfg(tiny_qwen, broken, data, **DIST, **kill_kw), tmp_path, "broken", popen=True
        )
        _wait_for_step(broken, 3, proc)
        ranks = [_rank_pid(proc, rank) for rank in (0, 1)]
        holder = json.loads((broken / ".lock").read_text())
        assert holder["pid"] == ranks[0]  # rank 0 holds the lock for the whole job
        for pid in ranks:
            os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=600)
        assert (broken / "checkpoint-2" / "manifest.json").is_file()
    cfg = _cfg(tiny_qwen, broken, data, **DIST, **kw, resume_from_checkpoint="auto")
    res = _train(cfg, tmp_path, "resume")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resuming from" in res.stderr
    if not muon:  # the killed job's lock named a dead pid: taken over, then released
        assert "taking over the lock of pid" in res.stderr
        assert not (broken / ".lock").exists()
    resumed = _losses(broken)
    assert sorted(resumed) == list(range(1, 7))
    assert resumed == dist


def _max_logit_diff(a: Path, b: Path) -> float:
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[9707, 11, 1879, 0, 151643, 785, 1156]])
    with torch.no_grad():
        la, lb = (AutoModelForCausalLM.from_pretrained(p).eval()(ids).logits for p in (a, b))
    return (la - lb).abs().max().item()


def test_a_job_on_an_output_dir_in_use_is_refused_on_every_rank(tiny_qwen, tmp_path):
    """output_dir/.lock names a live run (this test's process): both ranks stop before
    loading anything, rank 0 names the holder, and the folder is left as it was."""
    import socket

    data = _write_data(tmp_path)
    out = tmp_path / "used"
    out.mkdir()
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": "now", "token": "x"}
    (out / ".lock").write_text(json.dumps(holder))
    before = sorted(p.name for p in out.iterdir())
    res = _train(_cfg(tiny_qwen, out, data, **DIST, max_steps=2), tmp_path, "used")
    assert res.returncode != 0
    assert f"output_dir {out} is in use by pid {os.getpid()}" in res.stderr
    assert "data:" not in res.stderr  # refused before the data is read or the model loads
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / ".lock").read_text()) == holder


def test_resume_on_another_number_of_processes(tiny_qwen, tmp_path):
    """A 2-process checkpoint continues on one plain process with the same global batch (one
    checkpoint format for every world size: DCP reshards the model and optimizer state). The
    2-process run saves in the background (async_checkpoint, on its own gloo group)."""
    data = _write_data(tmp_path)
    kw = dict(use_muon_optimizer=True, max_steps=4, save_steps=2)
    out = tmp_path / "two"
    res = _train(_cfg(tiny_qwen, out, data, **kw, **DIST, async_checkpoint=True), tmp_path, "two")
    assert "checkpoint-2: writing in the background" in res.stderr
    # its last checkpoint, written in the background and consolidated by DCP, is the model
    # the trainer gathered into final/
    assert _max_logit_diff(out / "checkpoint-4", out / "final") <= 1e-5
    assert res.returncode == 0, res.stderr[-3000:]
    ref = _losses(out)
    ckpt = str(out / "checkpoint-2")

    one = tmp_path / "one"
    resumed_cfg = _cfg(tiny_qwen, one, data, **kw, **SINGLE, resume_from_checkpoint=ckpt)
    CPTTrainer(resumed_cfg).train()
    resumed = _losses(one)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert math.isclose(resumed[step], ref[step], rel_tol=1e-5), (step, resumed, ref)

    # refused: a different global batch
    wrong = _cfg(tiny_qwen, tmp_path / "x", data, **kw, **DIST, resume_from_checkpoint=ckpt)
    with pytest.raises(ResumeError) as err:
        CPTTrainer(wrong).train()
    msg = str(err.value)
    assert "the checkpoint has 1 x 2 x 2 = 4 blocks, this run has 1 x 2 x 1 = 2 blocks" in msg
    assert f"start a new run with model_name_or_path set to {ckpt}" in msg
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_a_model_that_fails_to_load_on_rank_0_stops_every_rank(tiny_qwen, tmp_path):
    """Only rank 0 reads the weights (the others build the model on meta and get them
    broadcast): its failure must end every rank at once, not leave them waiting."""
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_qwen, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    # A rank left waiting would sit in a collective for the whole 60-minute timeout, past the
    # run's own subprocess limit: ending at all, with rank 1 told of rank 0's failure and no
    # collective timed out, is the proof (no wall-clock assertion).
    cfg = _cfg(
        str(broken), tmp_path / "out", _write_data(tmp_path), max_steps=2,
        distributed_timeout_minutes=60, **DIST,
    )  # fmt: skip
    res = _train(cfg, tmp_path, "broken")
    assert res.returncode != 0
    assert "Timed out" not in res.stderr and "timed out" not in res.stderr
    assert f"could not load a causal LM from {str(broken)!r}" in res.stderr
    assert "failed on another rank; see its log" in res.stderr
    assert not (tmp_path / "out").exists()


def test_cpu_offload_on_one_process_matches_plain_training(tiny_qwen, tmp_path):
    """fsdp_cpu_offload runs FSDP2 with CPUOffloadPolicy on a one-process group."""
    data = _write_data(tmp_path)
    kw = dict(use_muon_optimizer=True, max_steps=3, save_steps=100, **SINGLE)
    CPTTrainer(_cfg(tiny_qwen, tmp_path / "plain", data, **kw)).train()
    trainer = CPTTrainer(_cfg(tiny_qwen, tmp_path / "offload", data, fsdp_cpu_offload=True, **kw))
    trainer.train()
    plain, offload = _losses(tmp_path / "plain"), _losses(tmp_path / "offload")
    assert sorted(offload) == [1, 2, 3]
    for step in plain:
        assert math.isclose(offload[step], plain[step], rel_tol=1e-5)
    assert not torch.distributed.is_initialized()  # the private group was closed
    assert (tmp_path / "offload" / "final" / "model.safetensors").is_file()
    # the same under torchrun with one rank (a one-GPU user's launch): it joined the
    # launcher's store, where a private tcp:// group waited out the 60-minute timeout
    res = _train(_cfg(tiny_qwen, tmp_path / "one", data, fsdp_cpu_offload=True, **kw), tmp_path,
                 "one", nproc=1)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert _losses(tmp_path / "one") == offload


def test_cpu_offload_on_two_processes_matches_one_process(tiny_qwen, tmp_path):
    """Rank 1 builds the model on meta, FSDP2 keeps its shards in CPU memory, and rank 0's
    weights reach it; gradients are reduce-scattered at every micro-batch."""
    data = _write_data(tmp_path)
    kw = dict(use_muon_optimizer=True, max_steps=3, save_steps=100)
    CPTTrainer(_cfg(tiny_qwen, tmp_path / "one", data, **kw, **SINGLE)).train()
    cfg = _cfg(tiny_qwen, tmp_path / "two", data, **kw, **DIST, fsdp_cpu_offload=True)
    res = _train(cfg, tmp_path, "two")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "distributed: 2 ranks (FSDP2, CPU offload)" in res.stderr
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3]
    for step in one:
        assert math.isclose(two[step], one[step], rel_tol=1e-4), (step, two, one)


def test_two_nodes_with_the_readme_rendezvous_flags(tiny_qwen, tmp_path):
    """README's multi-node command, as two torchrun agents ("nodes") of one process each that
    meet through c10d rendezvous on this machine."""
    import socket

    data = _write_data(tmp_path)
    kw = dict(use_muon_optimizer=True, max_steps=3, save_steps=100)
    CPTTrainer(_cfg(tiny_qwen, tmp_path / "one", data, **kw, **SINGLE)).train()
    path = tmp_path / "nodes.yaml"
    _cfg(tiny_qwen, tmp_path / "nodes", data, **kw, **DIST).to_yaml(path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    flags = [
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}",
        "--rdzv_id=cpt-test",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", *flags, "-m", "qwen_cpt", "train"]
    nodes = [
        subprocess.Popen(
            [*cmd, str(path)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    logs = [node.communicate(timeout=900)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-2000:] for log in logs)
    assert any("distributed: 2 ranks (FSDP2)" in log for log in logs)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "nodes")
    assert sorted(two) == [1, 2, 3]
    for step in one:
        assert math.isclose(two[step], one[step], rel_tol=1e-4), (step, two, one)
