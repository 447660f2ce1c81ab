"""Count the bytes FSDP2 and DistributedMuon really communicate, and compare with the formulas.

    .venv/bin/python benchmarks/comm_volume.py            # 2 and 4 ranks (1-D), 2 x 2 (HSDP)
    .venv/bin/python benchmarks/comm_volume.py --json
    .venv/bin/python benchmarks/comm_volume.py --cases 2x2 --bf16-params

Each case is one ``python -m torch.distributed.run --standalone --nproc_per_node N`` of this
script in ``--worker`` mode (gloo, CPU). The worker builds a tiny Qwen2 model (transformers'
``Qwen2Config``: hidden 64, 4 heads, 2 KV heads, intermediate 150 and vocabulary 1001, so rows
do not divide by the ranks and FSDP2 pads) with the same seed on every rank, wraps it as the
trainer does (``qwen_cpt.distributed.LossModule`` around the model and its chunked loss,
``fully_shard`` on every decoder layer from ``decoder_layers``, then on the root; activation
checkpointing on, as the trainer's default) on a 1-D mesh of all ranks or a 2 x 2
``("dp_replicate", "dp_shard")`` mesh (HSDP), and the trainer's optimizers
(``qwen_cpt.optim.build_optimizers``: AdamW, or DistributedMuon plus AdamW). Then it runs one
optimizer step (``--accum`` micro-batches, gradients reduced on the last) with AdamW and one
with Muon, each on a fresh model, and counts what every rank hands to the ``torch.distributed``
collectives that FSDP2 (``_fsdp_collectives.py``: ``all_gather_single``,
``reduce_scatter_single``, ``all_reduce`` for HSDP) and DistributedMuon (``all_to_all_single``)
call, by wrapping them in the ``torch.distributed`` namespace (only the outermost call of a
nested one is counted; any other collective is counted under its own name):

- all-gather: the output tensor's bytes; reduce-scatter: the input's; all-reduce: the tensor's;
- all-to-all: the bytes sent to other ranks (the input minus this rank's own split).

Rank 0 prints the mean over ranks of each and ``qwen_cpt.planner.comm.step_volume`` for the
same shapes (from the model's config), mesh and dtypes (fp32 parameters and gradients on a CPU,
unless ``--bf16-params`` sets the trainer's CUDA policy ``MixedPrecisionPolicy(bf16, fp32)``;
Muon's exchange in bf16), and the ratio counted / formula. docs/scaling.md shows the output.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

TINY = dict(
    hidden_size=64,
    intermediate_size=150,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1001,
    max_position_embeddings=256,
)
CASES = {"2": (1, 2), "4": (1, 4), "2x2": (2, 2)}  # name: (replicate, shard)
KINDS = ("all_gather", "reduce_scatter", "all_reduce", "muon")


# --- counting ----------------------------------------------------------------------------------


class Counter:
    """Wraps ``torch.distributed`` collectives and adds up, per kind, the bytes of each call."""

    NAMES = {
        "all_gather_single": ("all_gather", "output_tensor"),
        "all_gather_into_tensor": ("all_gather", "output_tensor"),
        "reduce_scatter_single": ("reduce_scatter", "input"),
        "reduce_scatter_tensor": ("reduce_scatter", "input"),
        "all_reduce": ("all_reduce", "tensor"),
        "all_to_all_single": ("muon", None),
        "broadcast": ("broadcast", "tensor"),
        "all_gather": ("all_gather_list", None),
        "reduce_scatter": ("reduce_scatter_list", None),
        "all_to_all": ("all_to_all_list", None),
        "send": ("send", "tensor"),
        "isend": ("send", "tensor"),
    }

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.bytes: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.on = False
        self._depth = 0
        for name, (kind, arg) in self.NAMES.items():
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(getattr(dist, name), kind, arg))

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def _wrap(self, fn, kind: str, arg: str | None):
        sig = inspect.signature(fn)

        def wrapper(*args, **kwargs):
            if self.on and self._depth == 0:
                bound = sig.bind(*args, **kwargs)
                bound.apply_defaults()
                self.bytes[kind] += self._size(kind, arg, bound.arguments)
                self.calls[kind] += 1
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        wrapper.__wrapped__ = fn
        return wrapper

    def _size(self, kind: str, arg: str | None, a: dict) -> float:
        def nbytes(t) -> int:
            return t.numel() * t.element_size()

        if arg is not None:
            return nbytes(a[arg])
        if kind == "muon":  # all_to_all_single: what leaves this rank
            inp, splits, group = a["input"], a["input_split_sizes"], a["group"]
            n = self.dist.get_world_size(group)
            me = self.dist.get_rank(group)
            row = inp.element_size() * (inp[0].numel() if inp.dim() > 1 else 1)
            own = (splits[me] if splits else inp.shape[0] // n) * row
            return nbytes(inp) - own
        tensors = a.get("tensor_list") or a.get("output_tensor_list") or a.get("input_list") or []
        return sum(nbytes(t) for t in tensors)


# --- the worker (under torchrun) ---------------------------------------------------------------


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen_cpt.config import CPTConfig
    from qwen_cpt.distributed import LossModule, World, decoder_layers
    from qwen_cpt.loss import lm_loss_sum
    from qwen_cpt.model import enable_activation_checkpointing
    from qwen_cpt.optim import build_optimizers
    from qwen_cpt.planner.comm import fsdp_units, muon_matrices, step_volume
    from qwen_cpt.planner.shapes import ModelShape

    counter = Counter()  # before anything imports the collectives by name
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    replicate, shard = args.replicate, world // args.replicate
    if replicate > 1:
        mesh = init_device_mesh(
            "cpu", (replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard")
        )
    else:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
    config = Qwen2Config(**TINY, tie_word_embeddings=not args.untied)
    config.use_cache = False
    kwargs: dict = {"mesh": mesh}
    if args.bf16_params:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    out: dict = {"world": world, "replicate": replicate, "shard": shard, "results": {}}
    for optimizer in ("adamw", "muon"):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).float().train()
        enable_activation_checkpointing(model)
        loss_fn = functools.partial(lm_loss_sum, chunked=True, chunk_size=32)
        root = LossModule(model, loss_fn)
        for layer in decoder_layers(model):
            fully_shard(layer, **kwargs)
        fully_shard(root, **kwargs)
        cfg = CPTConfig(
            model_name_or_path="tiny", use_muon_optimizer=optimizer == "muon", learning_rate=1e-3
        )
        opts = build_optimizers(model, cfg, sharded=True, ns_device=torch.device("cpu"))
        gen = torch.Generator().manual_seed(1 + rank)
        counter.reset()
        counter.on = True
        # the trainer's switch: reduce-scatter on the last micro-batch (or every one with
        # --sync-every), all-reduce across replicas on the last one only
        ctx = World(rank, world, torch.device("cpu"), True, replicate=replicate, shard=shard,
                    _root=root)  # fmt: skip
        for mb in range(args.accum):
            ids = torch.randint(0, TINY["vocab_size"], (args.batch, args.seq), generator=gen)
            pos = torch.arange(args.seq).expand(args.batch, -1)
            last = mb == args.accum - 1
            ctx.set_gradient_sync(args.sync_every or last, all_reduce=last)
            loss = root({"input_ids": ids, "labels": ids, "position_ids": pos})
            loss.backward()
        opts.step()
        opts.zero_grad()
        counter.on = False
        counted = {k: counter.bytes.get(k, 0.0) for k in set(counter.bytes) | set(KINDS)}
        gathered: list = [None] * world
        dist.all_gather_object(gathered, {"bytes": counted, "calls": dict(counter.calls)})
        shape = ModelShape.from_config(config)
        vol = step_volume(
            fsdp_units(shape), muon_matrices(shape), shard=shard, replicate=replicate,
            param_bytes=2 if args.bf16_params else 4, reduce_bytes=4, muon_bytes=2,
            micro_batches=args.accum, muon=optimizer == "muon",
            sync_micro_batches=args.accum if args.sync_every else 1,
        )  # fmt: skip
        kinds = sorted(set().union(*(g["bytes"] for g in gathered)))
        mean = {k: sum(g["bytes"].get(k, 0.0) for g in gathered) / world for k in kinds}
        out["results"][optimizer] = {
            "counted_mean": mean,
            "counted_per_rank": [g["bytes"] for g in gathered],
            "calls_rank0": gathered[0]["calls"],
            "formula": {k: getattr(vol, k) for k in KINDS},
        }
        del opts, root, model
    if rank == 0:
        print("RESULT " + json.dumps(out))
    dist.destroy_process_group()


# --- the driver --------------------------------------------------------------------------------


def run_case(name: str, args) -> dict:
    replicate, shard = CASES[name]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(replicate * shard), __file__, "--worker",
        "--replicate", str(replicate), "--accum", str(args.accum), "--batch", str(args.batch),
        "--seq", str(args.seq),
    ] + (["--bf16-params"] if args.bf16_params else []) + (["--untied"] if args.untied else [])  # fmt: skip
    cmd += ["--sync-every"] if args.sync_every else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if res.returncode != 0:
        raise SystemExit(f"case {name} failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def compare(case: dict) -> list[dict]:
    """Rows of ``(optimizer, kind, counted, formula, ratio)``; a kind neither side has is left
    out, and a collective the formulas do not know appears with formula 0."""
    rows = []
    for optimizer, r in case["results"].items():
        kinds = [k for k in KINDS if r["formula"][k] or r["counted_mean"].get(k)]
        kinds += sorted(k for k in r["counted_mean"] if k not in KINDS and r["counted_mean"][k])
        for k in kinds:
            c, f = r["counted_mean"].get(k, 0.0), r["formula"].get(k, 0.0)
            rows.append(
                dict(optimizer=optimizer, kind=k, counted=c, formula=f, ratio=c / f if f else None)
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per step [1]")
    ap.add_argument("--batch", type=int, default=2, help="sequences per micro-batch and rank")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--bf16-params", action="store_true", help="gather in bf16 (CUDA's policy)")
    ap.add_argument("--untied", action="store_true", help="an untied LM head (as 7B and 32B)")
    ap.add_argument("--sync-every", action="store_true", help="reduce-scatter on every micro-batch")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--replicate", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    cases = {name: run_case(name, args) for name in args.cases}
    report = {name: {"mesh": c, "rows": compare(c)} for name, c in cases.items()}
    if args.json:
        print(json.dumps({k: v["rows"] for k, v in report.items()}, indent=1))
        return 0
    dtype = "bf16" if args.bf16_params else "fp32"
    print(
        f"Bytes per rank of one step ({args.accum} micro-batch(es) of {args.batch} x {args.seq} "
        f"tokens per rank), gloo on CPU; parameters gathered in {dtype}, gradients reduced in "
        f"fp32, Muon's exchange in bf16. Counted: mean over ranks.\n"
    )
    print("| ranks | mesh | optimizer | collective | counted B/rank | formula B/rank | ratio |")
    print("|---|---|---|---|---:|---:|---:|")
    worst = 0.0
    for rep in report.values():
        c = rep["mesh"]
        mesh = f"{c['replicate']} x {c['shard']} (HSDP)" if c["replicate"] > 1 else "1-D"
        for r in rep["rows"]:
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.4f}"
            if r["ratio"] is not None:
                worst = max(worst, abs(r["ratio"] - 1))
            print(
                f"| {c['world']} | {mesh} | {r['optimizer']} | {r['kind']} | "
                f"{r['counted']:,.0f} | {r['formula']:,.0f} | {ratio} |"
            )
    print(f"\nlargest deviation from the formula: {worst:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
