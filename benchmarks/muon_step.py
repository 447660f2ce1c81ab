"""DistributedMuon's optimizer step on 1, 2 and 4 gloo processes (CPU): time, bytes, balance.

    .venv/bin/python benchmarks/muon_step.py                        # after vs before, 1/2/4
    .venv/bin/python benchmarks/muon_step.py --impl after --worlds 2 --steps 3
    git show 71e75cd:src/qwen_cpt/muon.py > /tmp/muon_before.py      # the "before" code

Each case is a ``torchrun`` of ``world`` processes (``OMP_NUM_THREADS=1``, one torch thread
each) that shards Qwen2.5-0.5B-shaped hidden matrices (hidden 896, intermediate 4864, 2 KV
heads of 64: q/k/v/o and gate/up/down per layer; ``--layers`` of them) with FSDP2 over a 1-D
mesh, sets one random gradient, and times ``DistributedMuon.step()``: ``--warmup`` untimed
steps, then ``--steps`` timed ones, each between two barriers; a step's time is the slowest
rank's. ``--impl`` picks the implementation: ``after``, the package's ``qwen_cpt.muon``, and
``before``, a muon.py loaded by path (``--before``, default /tmp/muon_before.py) as a module
of the package, so its relative imports resolve. ``after`` runs with the default bucket and
with ``--small-bucket-mib``.

Counted, by wrapping ``torch.distributed.all_to_all_single`` and the module's
``newton_schulz`` (neither changed):

- bytes each rank sends to and receives from the other ranks per step (its own part of an
  all-to-all stays local), compared with the formula (``predicted``): rank r sends, and
  receives, ``itemsize * (sum over matrices owned by another rank of ceil(rows/W) * cols +
  (W - 1) * sum over its own of ceil(rows/W) * cols)``, owners round-robin for ``before`` and
  ``qwen_cpt.muon.assign_owners`` for ``after``;
- the time each rank is blocked in the exchange: in a blocking ``all_to_all_single`` call
  (before), in the call and in its handle's ``wait()`` (after, asynchronous);
- Newton-Schulz FLOPs per rank (``steps * (4 n^2 m + 2 n^3)`` of each n x m, n <= m, matrix it
  orthogonalizes) and the largest rank's share, and the seconds each rank spends in it.

Output: a markdown table on stdout and ``benchmarks/results/muon_step.json``. On a 2-core
machine, 4 processes oversubscribe the cores: their times include waiting for a core.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "muon_step.json"
HIDDEN, INTER, KV = 896, 4864, 128  # Qwen2.5-0.5B's widths (2 KV heads x 64)


def layer_shapes(hidden: int = HIDDEN, inter: int = INTER, kv: int = KV) -> list[tuple]:
    return [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden)] + [
        (inter, hidden),
        (inter, hidden),
        (hidden, inter),
    ]


def flops(shape, steps: int = 5) -> int:
    n, m = sorted(shape)
    return steps * (4 * n * n * m + 2 * n**3)


def predicted_bytes(shapes, owners, world: int, rank: int, itemsize: int = 2) -> int:
    """Bytes rank ``rank`` sends to (and receives from) the other ranks per step."""
    if world == 1:
        return 0
    total = 0
    for (rows, cols), owner in zip(shapes, owners):
        piece = math.ceil(rows / world) * cols
        total += (world - 1) * piece if owner == rank else piece
    return total * itemsize


def load_impl(impl: str, before: str):
    if impl == "after":
        import qwen_cpt.muon as mod

        return mod
    import qwen_cpt  # noqa: F401  (the parent package of the module loaded below)

    spec = importlib.util.spec_from_file_location("qwen_cpt._muon_before", before)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


# --- the worker (under torchrun) ---------------------------------------------------------------


class _TimedWork:
    """An async all-to-all's handle whose ``wait()`` adds the time blocked to ``counted``."""

    def __init__(self, work, counted: dict):
        self.work, self.counted = work, counted

    def wait(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.work.wait(*args, **kwargs)
        finally:
            self.counted["blocked"] += time.perf_counter() - start


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    mod = load_impl(args.impl, args.before)

    counted = {"sent": 0, "received": 0, "calls": 0, "blocked": 0.0}
    ns = {"flops": 0, "seconds": 0.0}
    a2a = dist.all_to_all_single

    def counting_a2a(output, input, output_split_sizes=None, input_split_sizes=None, **kw):
        group = kw.get("group")
        me, size = dist.get_rank(group), dist.get_world_size(group)
        send = list(input_split_sizes or [input.numel() // size] * size)
        recv = list(output_split_sizes or [output.numel() // size] * size)
        counted["sent"] += (sum(send) - send[me]) * input.element_size()
        counted["received"] += (sum(recv) - recv[me]) * output.element_size()
        counted["calls"] += 1
        start = time.perf_counter()
        work = a2a(output, input, output_split_sizes, input_split_sizes, **kw)
        counted["blocked"] += time.perf_counter() - start
        return _TimedWork(work, counted) if work is not None else None

    dist.all_to_all_single = counting_a2a
    newton_schulz = mod.newton_schulz

    def timed_ns(g, coefficients, steps, eps):
        start = time.perf_counter()
        out = newton_schulz(g, coefficients, steps, eps)
        ns["seconds"] += time.perf_counter() - start
        ns["flops"] += flops(tuple(g.shape), steps)
        return out

    mod.newton_schulz = timed_ns

    shapes = layer_shapes() * args.layers
    torch.manual_seed(0)
    module = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes])
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(module, mesh=mesh)
    for p in module:
        p.grad = distribute_tensor(torch.randn(p.shape), mesh, p.placements)
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw")
    if args.bucket_mib is not None:
        kw["bucket_bytes"] = int(args.bucket_mib * 2**20)
    opt = mod.DistributedMuon(list(module), **kw)
    times = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            counted.update(sent=0, received=0, calls=0, blocked=0.0)
            ns.update(flops=0, seconds=0.0)
        dist.barrier()
        start = time.perf_counter()
        opt.step()
        elapsed = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends with its slowest rank
        times.append(elapsed.item())
    dist.all_to_all_single = a2a
    mine = torch.tensor(
        [counted[k] for k in ("sent", "received", "calls", "blocked")]
        + [ns["flops"], ns["seconds"]],
        dtype=torch.float64,
    )
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    if args.impl == "after":
        owners = mod.assign_owners(shapes, world, 5)
    else:  # round-robin over groups of `world` matrices
        owners = [i % world for i in range(len(shapes))]
    if rank == 0:
        n = args.steps
        per_rank = [
            dict(
                sent=int(t[0]) // n,
                received=int(t[1]) // n,
                calls=int(t[2]) // n,
                blocked_s=t[3].item() / n,
                ns_flops=int(t[4]) // n,
                ns_seconds=t[5].item() / n,
                predicted=predicted_bytes(shapes, owners, world, r),
            )
            for r, t in enumerate(every)
        ]
        total_flops = sum(r["ns_flops"] for r in per_rank)
        out = dict(
            impl=args.impl,
            world=world,
            bucket_mib=args.bucket_mib,
            buckets=getattr(opt, "last_buckets", None),
            matrices=len(shapes),
            muon_params=sum(r * c for r, c in shapes),
            step_s=times[args.warmup :],
            median_s=statistics.median(times[args.warmup :]),
            per_rank=per_rank,
            max_flops_share=max(r["ns_flops"] for r in per_rank) / total_flops,
            max_ns_s=max(r["ns_seconds"] for r in per_rank),
            max_blocked_s=max(r["blocked_s"] for r in per_rank),
            matches_formula=all(r["sent"] == r["received"] == r["predicted"] for r in per_rank),
        )
        print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()


# --- the driver --------------------------------------------------------------------------------


def run_case(args, impl: str, world: int, bucket_mib) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(world), __file__, "--worker", "--impl", impl]
    cmd += ["--before", args.before, "--layers", str(args.layers)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    if bucket_mib is not None:
        cmd += ["--bucket-mib", str(bucket_mib)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
    if res.returncode or line is None:
        raise SystemExit(f"{impl} on {world}: failed\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def table(results: list[dict]) -> str:
    lines = [
        "| impl | bucket | world | buckets | median step | fastest step | max-rank NS time | "
        "max-rank time blocked in all-to-all | bytes sent/rank/step (mean; max) | = formula | "
        "largest rank's NS FLOPs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        sent = [p["sent"] for p in r["per_rank"]]
        bucket = "-" if r["impl"] == "before" else r["bucket_mib"] or "default (64 MiB)"
        if isinstance(bucket, (int, float)):
            bucket = f"{bucket:g} MiB"
        lines.append(
            f"| {r['impl']} | {bucket} | {r['world']} | {r['buckets'] or '-'} | "
            f"{r['median_s'] * 1e3:,.0f} ms | {min(r['step_s']) * 1e3:,.0f} ms | "
            f"{r['max_ns_s'] * 1e3:,.0f} ms | {r['max_blocked_s'] * 1e3:,.0f} ms | "
            f"{statistics.mean(sent) / 1e6:.2f} MB; {max(sent) / 1e6:.2f} MB | "
            f"{'yes' if r['matches_formula'] else 'NO'} | {r['max_flops_share'] * 100:.1f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", choices=["before", "after", "both"], default="both")
    ap.add_argument("--before", default="/tmp/muon_before.py")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--bucket-mib", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--small-bucket-mib", type=float, default=8.0)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    started = datetime.datetime.now(datetime.timezone.utc)
    load = [os.getloadavg()[0]]
    impls = ["before", "after"] if args.impl == "both" else [args.impl]
    results = []
    for world in args.worlds:
        for impl in impls:
            buckets = [None] if impl == "before" or world == 1 else [None, args.small_bucket_mib]
            for bucket in buckets:
                r = run_case(args, impl, world, bucket)
                print(
                    f"{impl} world {world} bucket {bucket}: {r['median_s'] * 1e3:.0f} ms "
                    f"(steps {[round(t, 3) for t in r['step_s']]})",
                    file=sys.stderr,
                    flush=True,
                )
                results.append(r)
                load.append(os.getloadavg()[0])
    shapes = layer_shapes() * args.layers
    meta = dict(
        started=started.isoformat(timespec="seconds"),
        minutes=(datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() / 60,
        load_1min=load,
        cpus=os.cpu_count(),
        layers=args.layers,
        matrices=len(shapes),
        muon_params=sum(r * c for r, c in shapes),
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    print(
        f"{meta['matrices']} matrices, {meta['muon_params']:,} parameters; "
        f"{meta['minutes']:.1f} min; load {min(load):.1f}-{max(load):.1f}\n"
    )
    print(table(results))


if __name__ == "__main__":
    main()
