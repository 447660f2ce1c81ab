"""Worker programs for tests/test_distributed.py, run as ``torchrun ... tests/dist_worker.py CASE``.

Each case asserts on its own and prints one ``RESULT {json}`` line from rank 0.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist


def muon_parity(*meshes: str) -> None:
    """DistributedMuon on FSDP2 shards == torch.optim.Muon on the full matrices, step by step.

    ``meshes``: ``1d`` (FSDP over every rank, the default), ``2x2`` (HSDP on 4 ranks:
    placements ``(Replicate(), Shard(0))``) and ``4x1`` (4 replicas, shard groups of one);
    each with buckets of one matrix per owner, of 4 KiB, and the default (one bucket).
    """
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    out = {"world": world}
    for name in meshes or ("1d",):
        if name == "1d":
            mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
        elif name in ("2x2", "4x1"):  # HSDP; 4x1: pure replication, Newton-Schulz local
            assert world == 4, f"{name} needs 4 processes"
            shape = (2, 2) if name == "2x2" else (4, 1)
            mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp_replicate", "dp_shard"))
        else:
            raise ValueError(f"mesh {name!r}: 1d, 2x2 or 4x1")
        for bucket in (1, 4096, None) if name != "4x1" else (None,):
            out[f"{name}/{bucket}"] = _muon_parity_on(mesh, bucket)
        if name == "2x2":
            out["refused"] = _muon_refuses_other_layouts(mesh)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(out))
    dist.destroy_process_group()


def _muon_parity_on(mesh, bucket_bytes) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from qwen_cpt.muon import DistributedMuon

    # rows that divide by the shard group, that don't, fewer rows than ranks, 1-row, tall, wide
    shapes = [(64, 176), (176, 64), (7, 5), (5, 7), (3, 9), (1, 8), (33, 33), (1, 40)]
    shapes += [(130, 3), (2, 100), (9, 9), (96, 32), (6, 6), (40, 24)]
    torch.manual_seed(0)
    full = [torch.randn(s) for s in shapes]
    module = torch.nn.ParameterList([torch.nn.Parameter(t.clone()) for t in full])
    fully_shard(module, mesh=mesh)
    expected = (Replicate(), Shard(0)) if mesh.ndim == 2 else (Shard(0),)
    assert all(tuple(p.placements) == expected for p in module), module[0].placements
    reference = [torch.nn.Parameter(t.clone()) for t in full]
    kw = dict(
        lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw"
    )
    extra = {} if bucket_bytes is None else {"bucket_bytes": bucket_bytes}
    ours = DistributedMuon(list(module), **kw, **extra)
    ref = torch.optim.Muon(reference, **kw)
    worst = 0.0
    for step in range(5):
        lr = 0.02 * (1 - step / 10)  # a schedule, as the trainer sets it
        for opt in (ours, ref):
            opt.param_groups[0]["lr"] = lr
        grads = [torch.randn(s) for s in shapes]  # same seed on every rank
        for p, r, g in zip(module, reference, grads):
            p.grad = distribute_tensor(g, p.device_mesh, p.placements)
            r.grad = g.clone()
        ours.step()
        ref.step()
        for p, r in zip(module, reference):
            worst = max(worst, (p.full_tensor() - r.detach()).abs().max().item())
        for p, r in zip(module, reference):
            buf = ours.state[p]["momentum_buffer"].full_tensor()
            assert torch.equal(buf, ref.state[r]["momentum_buffer"]), "momentum differs"
    moved = max((p.full_tensor() - t).abs().max().item() for p, t in zip(module, full))
    assert worst <= 1e-5, f"parameters differ from torch.optim.Muon by {worst}"
    assert moved > 1e-3, "the parameters did not move"
    # the worst over every rank (each replica group compared its own copy)
    worst_t = torch.tensor([worst])
    dist.all_reduce(worst_t, op=dist.ReduceOp.MAX)
    return {"max_abs_diff": worst_t.item(), "moved": moved, "buckets": ours.last_buckets}


def _muon_refuses_other_layouts(mesh) -> list[str]:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from qwen_cpt.muon import DistributedError, DistributedMuon

    refused = []
    for placements in [(Shard(0), Shard(0)), (Replicate(), Shard(1)), (Shard(0), Replicate())]:
        t = torch.nn.Parameter(distribute_tensor(torch.randn(8, 8), mesh, placements))
        if placements == (Shard(0), Replicate()):  # rows over the replicate dimension: fine
            DistributedMuon([t])
            continue
        try:
            DistributedMuon([t])
        except DistributedError as e:
            assert "sharded by rows (Shard(0)) on one mesh dimension" in str(e), e
            refused.append(str(placements))
    return refused


def timeout() -> None:
    """A collective that one rank never joins fails after distributed_timeout_minutes (15 s;
    long enough for a slow machine to start both ranks, which the same timeout covers)."""
    import os
    from pathlib import Path

    from qwen_cpt.distributed import World

    ctx = World.create(torch.device("cpu"), cpu_offload=False, timeout_minutes=0.25)
    done = Path(sys.argv[2])
    if ctx.rank == 1:  # alive but never joins, until rank 0 has seen its error
        deadline = time.monotonic() + 120
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        os._exit(0)
    start = time.monotonic()
    try:
        ctx.sum([1.0])
    except Exception as exc:  # gloo raises a RuntimeError naming the timeout
        waited = time.monotonic() - start
        print("RESULT " + json.dumps({"waited_s": waited, "error": str(exc)[:300]}))
        sys.stdout.flush()
        done.touch()
        os._exit(0)  # the group is broken: skip the destroy
    done.touch()
    raise AssertionError("the collective returned although rank 1 never joined")


def nan_stop() -> None:
    """A non-finite loss on rank 1 only, at step 2: the trainer stops on every rank before the
    optimizer step. (The loss function is made to return NaN on rank 1; the rest is the real
    trainer under torchrun.)"""
    import os

    import qwen_cpt.run as R
    import qwen_cpt.trainer as T
    from qwen_cpt import CPTConfig, CPTTrainer

    rank = int(os.environ["RANK"])
    trainer = CPTTrainer(CPTConfig.from_yaml(sys.argv[2]))
    real = R.lm_loss_sum

    def loss_fn(model, batch, *args, **kwargs):
        loss = real(model, batch, *args, **kwargs)
        return loss * float("nan") if rank == 1 and trainer.state.step == 1 else loss

    R.lm_loss_sum = loss_fn
    try:
        trainer.train()
    except T.TrainingError as exc:
        print(f"RANK {rank} STOPPED AT STEP {trainer.state.step}: {exc}", flush=True)
        if rank == 0:
            print("RESULT " + json.dumps({"step": trainer.state.step, "error": str(exc)}))
        return
    raise AssertionError(f"rank {rank} trained on after a NaN on rank 1")


def kernel_choice() -> None:
    """The trainer's start-up measurement under torchrun (made to run on CPU): rank 1 builds its
    probe from a model on meta, and the ranks' differing times are summed, so both choose alike."""
    import os

    from qwen_cpt import CPTConfig, CPTTrainer, autotune

    rank = int(os.environ["RANK"])
    # alone, rank 0 would pick eager and compile, rank 1 sdpa and no compile
    times = [
        {"eager": 1.0, "sdpa": 2.0, "compiled": 0.5},
        {"eager": 2.0, "sdpa": 1.5, "compiled": 10.0},
    ][rank]
    seen = []

    def timer(probe, **_):
        seen.append(probe.layer.self_attn.q_proj.weight.abs().sum().item())
        if probe.layer._compiled_call_impl is not None:
            return times["compiled"]
        return times[probe.config._attn_implementation]

    autotune.measures_on = lambda device: True
    autotune.AUTO_CANDIDATES = ("sdpa", "eager")
    autotune.COMPILE_KWARGS = {"backend": "eager"}
    autotune.time_micro_batch = timer
    trainer = CPTTrainer(CPTConfig.from_yaml(sys.argv[2]))
    loss = trainer.train()
    attn = trainer.model.config._attn_implementation
    assert attn == "eager", f"rank {rank} chose {attn}"
    assert seen and all(v > 0 for v in seen), f"rank {rank}: the probe's weights are {seen}"
    compiled = [layer._compiled_call_impl is not None for layer in trainer.model.model.layers]
    assert not any(compiled), f"rank {rank} compiled {compiled}"
    if rank == 0:
        print("RESULT " + json.dumps({"attention": attn, "loss": loss}))


if __name__ == "__main__":
    cases = {
        "muon_parity": lambda: muon_parity(*sys.argv[2:]),
        "timeout": timeout,
        "nan_stop": nan_stop,
        "kernel_choice": kernel_choice,
    }
    cases[sys.argv[1]]()
