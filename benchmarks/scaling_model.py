"""A scaling model on paper: Qwen2.5 0.5B / 7B / 32B on 8 to 512 H100 or H200, FSDP vs HSDP.

    .venv/bin/python benchmarks/scaling_model.py             # the markdown tables (docs/scaling.md)
    .venv/bin/python benchmarks/scaling_model.py --json      # every number, machine-readable
    .venv/bin/python benchmarks/scaling_model.py --models 7B --gpus 64 --gpu H200

Nothing here is measured: it is arithmetic, in well under a second of compute (importing the
planner loads torch, but no tensor is made). For each model, GPU type, GPU count and layout
(FSDP: shard over all GPUs; HSDP: shard within a node of 8, replicate across nodes) it takes

- the parameter shapes of the trainer's FSDP2 units (``qwen_cpt.planner.comm.fsdp_units``, from
  the planner's built-in Qwen2.5 shapes) and the bytes per GPU per step of the all-gathers (bf16),
  reduce-scatters (fp32), HSDP all-reduce (fp32) and Muon's exchange (bf16), padding included
  (``qwen_cpt.planner.comm.step_volume``; ``benchmarks/comm_volume.py`` checks those against
  the bytes counted on gloo);
- the micro-batch the planner's memory estimate allows (``estimate_memory``: the trainer's
  defaults, full activation checkpointing, chunked loss, flash-attention, fp32 master weights),
  the accumulation that makes the global batch (4M tokens of 4096-token sequences by default),
  and whether gradients reduce on every micro-batch or the last only (the trainer's rule: the
  last only when the unsharded gradients fit);
- the compute per micro-batch (the planner's model FLOPs per token, torchtitan's convention, at
  ``--compute-efficiency`` of the bf16 dense peak, plus a third more for the recomputed
  forward), and the collectives' time at the link bandwidth times ``--link-efficiency``;
- the step's timeline as FSDP2 schedules it (``qwen_cpt.planner.comm.simulate_step``): what the
  prefetch hides, what stays exposed, then the optimizer (its elementwise pass over the local
  shard at HBM bandwidth, and for Muon the step-end exchange and Newton-Schulz with
  DistributedMuon's own owners, buckets and overlap, ``muon_exchange_seconds``, which nothing
  else overlaps);

and prints step time, MFU and tokens/s per GPU. The assumptions and their sources are in
``ASSUMPTIONS`` (printed with the table) and docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass

from qwen_cpt.planner.base import GiB
from qwen_cpt.planner.comm import (
    UnitTimes,
    fsdp_units,
    muon_exchange_seconds,
    muon_matrices,
    simulate_step,
    step_volume,
)
from qwen_cpt.planner.flops import flops_per_token
from qwen_cpt.planner.hardware import GPUS
from qwen_cpt.planner.memory import USABLE_FRACTION, estimate_memory, max_micro_batch
from qwen_cpt.planner.rules import split_batch
from qwen_cpt.planner.shapes import QWEN25_SHAPES, count_params


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # bf16 dense, FLOP/s
    memory_bytes: float
    hbm_bytes_s: float
    nvlink_bytes_s: float  # per GPU and direction
    network_bytes_s: float  # per GPU and direction, between nodes
    gpus_per_node: int = 8


HARDWARE = {
    "H100": Hardware("H100", 989e12, GPUS["H100"].memory_gib * GiB, 3.35e12, 450e9, 50e9),
    "H200": Hardware("H200", 989e12, GPUS["H200"].memory_gib * GiB, 4.8e12, 450e9, 50e9),
}
ASSUMPTIONS = {
    "peak": "bf16 dense 989 TFLOP/s for H100 SXM and H200 (NVIDIA datasheets; torchtitan's "
    "get_peak_flops)",
    "memory": "79.6 GiB (H100 80GB) and 140.4 GiB (H200 141GB) as nvidia-smi reports them, "
    "90% usable (the planner's USABLE_FRACTION)",
    "hbm": "3.35 TB/s (H100 SXM), 4.8 TB/s (H200) (NVIDIA datasheets)",
    "nvlink": "450 GB/s per GPU and direction inside a node: NVLink 4, 900 GB/s total "
    "bidirectional (NVIDIA H100/H200 datasheets), 8 GPUs per node through NVSwitch",
    "network": "50 GB/s per GPU and direction between nodes: one 400 Gb/s NIC per GPU "
    "(ConnectX-7 NDR InfiniBand, as in DGX H100/H200)",
    "link_efficiency": "0.8 of those link rates for large NCCL messages (our assumption)",
    "ring": "a collective over n GPUs moves (n-1)/n of the buffer over each GPU's link for "
    "all-gather and reduce-scatter, 2(n-1)/n for all-reduce (NVIDIA/nccl-tests, "
    "doc/PERFORMANCE.md); a group that spans nodes runs at the network rate",
    "compute_efficiency": "0.5 of peak for the model's own FLOPs (our assumption; published "
    "end-to-end MFUs of 7-8B dense models on H100 are 39-48%); Newton-Schulz at the same rate",
    "checkpointing": "full activation checkpointing (the trainer's default): the forward runs "
    "again in backward, 4/3 of the model FLOPs, which MFU does not count",
    "optimizer": "28 bytes of HBM traffic per local parameter per step (read p, g, m, v; write "
    "p, m, v in fp32)",
    "latency": "none: a bandwidth-only model (at 256-512 GPUs the 0.5B model's messages are "
    "small and per-message latency, ignored here, adds to them)",
}
OPT_BYTES_PER_PARAM = 28
MODELS = {"0.5B": "Qwen/Qwen2.5-0.5B", "7B": "Qwen/Qwen2.5-7B", "32B": "Qwen/Qwen2.5-32B"}
GPU_COUNTS = (8, 16, 32, 64, 128, 256, 512)


def choose_batch(shape, p, optimizer: str, shard: int, per_device: int, hw: Hardware):
    """``(micro, accum, sync_every)`` as the planner and trainer choose them, or None when even
    one sequence per micro-batch does not fit."""
    capacity = hw.memory_bytes

    def peak(micro: int, accum: int, sync: bool) -> float:
        return estimate_memory(
            shape, micro_batch=micro, seq_len=SEQ, gradient_accumulation_steps=accum,
            world_size=shard, optimizer=optimizer, checkpointing="full", bf16=True,
            chunked_loss=True, loss_chunk_size=1024, device="cuda", packed_mask=False,
            capacity_bytes=capacity, param_counts=p, sync_every_micro_batch=sync,
        ).peak  # fmt: skip

    limit = USABLE_FRACTION * capacity

    def fits(micro: int) -> bool:
        return peak(micro, 2, True) <= limit

    if not fits(1):
        return None
    largest = max_micro_batch(fits, per_device)
    micro, accum = split_batch(per_device * SEQ, SEQ, 1, largest)
    sync_every = accum > 1 and peak(micro, accum, False) > limit
    return micro, accum, sync_every


SEQ = 4096


def evaluate(
    model: str,
    hw: Hardware,
    gpus: int,
    mode: str,
    optimizer: str,
    *,
    global_tokens: int,
    compute_eff: float,
    link_eff: float,
) -> dict:
    shape = QWEN25_SHAPES[MODELS[model]]
    p = count_params(shape)
    node = hw.gpus_per_node
    shard = gpus if mode == "fsdp" else min(node, gpus)
    replicate = gpus // shard
    row = {"model": model, "gpu": hw.name, "gpus": gpus, "mode": mode, "optimizer": optimizer}
    row.update(shard=shard, replicate=replicate)
    per_device = max(1, round(global_tokens / SEQ / gpus))
    batch = choose_batch(shape, p, optimizer, shard, per_device, hw)
    if batch is None:
        row["fits"] = False
        return row
    micro, accum, sync_every = batch
    row.update(fits=True, micro=micro, accum=accum, sync_every_micro_batch=sync_every)
    units, mats = fsdp_units(shape), muon_matrices(shape)
    vol = step_volume(
        units, mats, shard=shard, replicate=replicate, param_bytes=2, reduce_bytes=4,
        micro_batches=accum, sync_micro_batches=accum if sync_every else 1,
        muon=optimizer == "muon",
    )  # fmt: skip
    row["bytes"] = {k: getattr(vol, k) for k in ("all_gather", "reduce_scatter", "all_reduce")}
    row["bytes"]["muon"] = vol.muon
    row["wire_bytes"] = vol.wire

    # compute per micro-batch, split over the units
    tokens = micro * SEQ
    rate = hw.peak_flops * compute_eff
    f_token = flops_per_token(shape, SEQ)
    head = 6.0 * shape.vocab_size * shape.hidden_size
    per_layer = (f_token - head) / shape.num_layers
    intra = shard <= node
    bw_a = (hw.nvlink_bytes_s if intra else hw.network_bytes_s) * link_eff
    bw_net = hw.network_bytes_s * link_eff

    def times(u, flops: float, recompute: bool) -> UnitTimes:
        n = u.padded_numel(shard)
        r = (shard - 1) / shard
        return UnitTimes(
            forward=flops * tokens / 3 / rate,
            backward=flops * tokens * (2 + recompute) / 3 / rate,
            all_gather=n * 2 * r / bw_a if shard > 1 else 0.0,
            reduce_scatter=n * 4 * r / bw_a if shard > 1 else 0.0,
            all_reduce=(n / shard) * 4 * 2 * (replicate - 1) / replicate / bw_net
            if replicate > 1
            else 0.0,
        )

    unit_times = [times(units[0], head, False)] + [times(u, per_layer, True) for u in units[1:]]
    local_params = sum(u.padded_numel(shard) for u in units) / shard
    opt = {"elementwise": OPT_BYTES_PER_PARAM * local_params / hw.hbm_bytes_s}
    if optimizer == "muon":
        bw_muon = (hw.nvlink_bytes_s if intra else hw.network_bytes_s) * link_eff
        muon = muon_exchange_seconds(mats, shard, bw_muon, rate)
        opt.update(muon_exchange=muon["exchange"], muon_newton_schulz=muon["newton_schulz"])
        opt.update(muon_total=muon["total"], muon_buckets=muon["buckets"])
        if replicate > 1:  # what if Newton-Schulz were split over the replicas too (not built)
            row["muon_split_over_replicas_s"] = split_over_replicas(
                mats, shard, replicate, rate, bw_net, muon["total"]
            )
    optimizer_s = opt["elementwise"] + opt.get("muon_total", 0.0)
    st = simulate_step(
        unit_times, micro_batches=accum, sync_every=sync_every,
        same_link=not intra or replicate == 1, optimizer_s=optimizer_s,
    )  # fmt: skip
    tokens_step = tokens * accum  # per GPU
    model_flops = f_token * tokens_step
    row["seconds"] = {
        "compute": st.compute,
        "step": st.total,
        "exposed_comm": st.micro_batches_end - st.compute,
        **st.exposed,
        **{f"opt_{k}": v for k, v in opt.items()},
    }
    row["mfu"] = model_flops / st.total / hw.peak_flops
    row["tokens_per_s_per_gpu"] = tokens_step / st.total
    row["global_batch_tokens"] = tokens_step * gpus
    # the largest message per rank: one layer's bf16 all-gather shard
    row["layer_shard_bytes"] = units[1].padded_numel(shard) * 2 / shard
    return row


def split_over_replicas(mats, shard, replicate, rate, bw_net, in_node_s) -> float:
    """A design DistributedMuon does not have, for docs/scaling.md: under HSDP every replica
    (node) orthogonalizes all matrices; if instead each node took 1/replicate of them (gathered
    inside the node, where the replicas' gradients are the same), its Newton-Schulz and
    in-node exchange would shrink about replicate-fold, and each GPU would then receive the
    other nodes' results for its rows: (replicate-1)/replicate of its bf16 shard of all
    matrices, over the network. Seconds, balanced FLOPs assumed."""
    shard_bytes = sum(math.ceil(r / shard) * c * 2 for r, c in mats)
    network = (replicate - 1) / replicate * shard_bytes / bw_net
    return in_node_s / replicate + network


def table(rows: list[dict]) -> str:
    """One markdown table per model: AdamW's micro-batch, volumes and time, and Muon's."""
    out = []
    by_key = {(r["model"], r["gpu"], r["gpus"], r["mode"], r["optimizer"]): r for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    head = (
        "| GPU | GPUs | layout | micro x accum | AG / RS / AR GB per GPU | compute s | "
        "exposed comm s | step s | MFU | tok/s/GPU | Muon GB | Muon step end s | Muon MFU |\n"
        "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for model in models:
        out.append(f"\n**Qwen2.5-{model}**\n\n{head}")
        keys = sorted(
            {k[1:4] for k in by_key if k[0] == model},
            key=lambda k: (k[0], k[1], k[2]),
        )
        for gpu, n, mode in keys:
            a = by_key.get((model, gpu, n, mode, "adamw"))
            m = by_key.get((model, gpu, n, mode, "muon"))
            layout = "FSDP" if mode == "fsdp" else f"HSDP {a['replicate']}x{a['shard']}"
            if mode == "hsdp" and n <= 8:
                layout = "HSDP (= FSDP)"
            cells = [gpu, str(n), layout]
            if not a["fits"]:
                cells += ["does not fit"] + [""] * 6
            else:
                s, b = a["seconds"], a["wire_bytes"]
                sync = "" if a["accum"] == 1 else (" every" if a["sync_every_micro_batch"] else "")
                cells += [
                    f"{a['micro']} x {a['accum']}{sync}",
                    f"{b['all_gather'] / 1e9:.1f} / {b['reduce_scatter'] / 1e9:.1f} / "
                    f"{b['all_reduce'] / 1e9:.2f}",
                    f"{s['compute']:.2f}",
                    f"{s['exposed_comm']:.2f}",
                    f"{s['step']:.2f}",
                    f"{a['mfu']:.1%}",
                    f"{a['tokens_per_s_per_gpu']:,.0f}",
                ]
            if m is None or not m["fits"]:
                cells += ["does not fit", "", ""]
            else:
                cells += [
                    f"{m['wire_bytes']['muon'] / 1e9:.2f}",
                    f"{m['seconds']['opt_muon_total']:.3f}",
                    f"{m['mfu']:.1%}",
                ]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--gpus", nargs="+", type=int, default=list(GPU_COUNTS))
    ap.add_argument("--gpu", nargs="+", default=list(HARDWARE), choices=list(HARDWARE))
    ap.add_argument("--global-batch-tokens", type=int, default=4 * 2**20)
    ap.add_argument("--compute-efficiency", type=float, default=0.5)
    ap.add_argument("--link-efficiency", type=float, default=0.8)
    ap.add_argument("--json", action="store_true", help="print every row as JSON")
    args = ap.parse_args(argv)
    if any(n % 8 and n > 8 for n in args.gpus):
        ap.error("--gpus: multiples of 8 above one node")
    rows = [
        evaluate(
            model, HARDWARE[gpu], n, mode, opt, global_tokens=args.global_batch_tokens,
            compute_eff=args.compute_efficiency, link_eff=args.link_efficiency,
        )
        for model in args.models
        for gpu in args.gpu
        for n in args.gpus
        for mode in ("fsdp", "hsdp")
        for opt in ("adamw", "muon")
    ]  # fmt: skip
    if args.json:
        json.dump({"assumptions": ASSUMPTIONS, "rows": rows}, sys.stdout, indent=1)
        print()
        return 0
    print(
        f"Global batch {args.global_batch_tokens:,} tokens of {SEQ}-token sequences; compute at "
        f"{args.compute_efficiency:g} of peak, links at {args.link_efficiency:g} of their rate. "
        "GB per GPU per step: what each GPU sends (ring factors applied). micro x accum: "
        "sequences per micro-batch x micro-batches per step (AdamW; 'every': gradients reduced "
        "on every micro-batch). A model, not a measurement."
    )
    print(table(rows))
    print("\nAssumptions:")
    for k, v in ASSUMPTIONS.items():
        print(f"- {k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
