"""Communication of one data-parallel training step: bytes per rank, and its time on paper.

The formulas that ``benchmarks/scaling_model.py`` evaluates for Qwen2.5 on 8 to 512 GPUs and
that ``benchmarks/comm_volume.py`` checks against the bytes FSDP2 and
:class:`qwen_cpt.muon.DistributedMuon` actually hand to ``torch.distributed`` (docs/scaling.md).
Arithmetic on parameter shapes; no tensor is made (Muon's owners and buckets come from
``qwen_cpt.muon.plan_buckets`` itself, so the model follows the optimizer's plan).

How the trainer communicates (``qwen_cpt.distributed.World.parallelize``): ``fully_shard`` on
every decoder layer, then on a root unit (embeddings, final norm, LM head). On a mesh of
``replicate x shard`` ranks (``replicate == 1``: plain FSDP) each unit's parameters are split by
rows over the ``shard`` ranks of a replica, every tensor's first dimension padded to a multiple
of ``shard`` (FSDP2's ``_get_dim0_padded_size``). Per micro-batch:

- all-gather: each unit is gathered in ``param_bytes`` (bf16 with the trainer's
  ``MixedPrecisionPolicy`` on CUDA, fp32 on a CPU) before its forward; decoder layers are
  resharded after forward (``reshard_after_forward=True``) and gathered again for backward; the
  root is not (FSDP2 keeps the root unsharded between forward and backward);
- reduce-scatter: on a micro-batch that syncs gradients, each unit's padded gradient in
  ``reduce_bytes`` (fp32: ``reduce_dtype=float32``) within the shard group;
- all-reduce (HSDP only): the reduce-scattered shard of each unit across the ``replicate``
  ranks that hold the same shard, in ``reduce_bytes``, once per step: on the last micro-batch
  (the trainer turns it off on the others, where the reduce-scattered shards accumulate).

Per optimizer step, with Muon: every 2-D hidden matrix (``n`` rows, ``c`` columns) has an owner
in its shard group; each of the other ``shard - 1`` ranks sends it its ``ceil(n / shard) x c``
rows (padded), and the owner sends each of them its rows of the orthogonalized matrix back, in
bf16 (``muon_bytes``): averaged over the group's ranks, each sends and receives
``2 * (shard - 1) / shard * ceil(n / shard) * c * muon_bytes`` per matrix.

"Bytes" of a collective below are the size of the tensor handed to it (the all-gather's output,
the reduce-scatter's input, the all-reduce's tensor): what ``benchmarks/comm_volume.py`` counts.
What crosses each rank's link is that times the ring factor of NCCL's bus-bandwidth convention
(NVIDIA/nccl-tests, ``doc/PERFORMANCE.md``): ``(n - 1) / n`` for all-gather and reduce-scatter,
``2 (n - 1) / n`` for all-reduce, over a group of ``n``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .shapes import ModelShape

Dims = tuple[int, ...]


# --- what FSDP2 and Muon move ----------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One ``fully_shard`` unit: its parameters' shapes; ``root`` is not resharded after
    forward."""

    name: str
    params: tuple[Dims, ...]
    root: bool = False

    def padded_numel(self, shard: int) -> int:
        return sum(padded_numel(d, shard) for d in self.params)


def padded_numel(dims: Dims, shard: int) -> int:
    """Elements of a tensor with its first dimension padded to a multiple of ``shard``."""
    rest = math.prod(dims[1:])
    return math.ceil(dims[0] / shard) * shard * rest


def layer_params(shape: ModelShape) -> tuple[tuple[str, Dims], ...]:
    """A Qwen2/Llama decoder layer's parameters, named as HF names them, in module order."""
    h, i, hd = shape.hidden_size, shape.intermediate_size, shape.head_dim
    q, kv = shape.num_heads * hd, shape.num_kv_heads * hd
    out: list[tuple[str, Dims]] = [("self_attn.q_proj.weight", (q, h))]
    if shape.qkv_bias:
        out.append(("self_attn.q_proj.bias", (q,)))
    out += [("self_attn.k_proj.weight", (kv, h))]
    if shape.qkv_bias:
        out.append(("self_attn.k_proj.bias", (kv,)))
    out += [("self_attn.v_proj.weight", (kv, h))]
    if shape.qkv_bias:
        out.append(("self_attn.v_proj.bias", (kv,)))
    out += [("self_attn.o_proj.weight", (h, q))]
    if shape.o_bias:
        out.append(("self_attn.o_proj.bias", (h,)))
    if shape.qk_norm:
        out += [("self_attn.q_norm.weight", (hd,)), ("self_attn.k_norm.weight", (hd,))]
    for name, dims in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
        out.append((f"mlp.{name}.weight", dims))
        if shape.mlp_bias:
            out.append((f"mlp.{name}.bias", (dims[0],)))
    out += [("input_layernorm.weight", (h,)), ("post_attention_layernorm.weight", (h,))]
    return tuple(out)


def fsdp_units(shape: ModelShape) -> list[Unit]:
    """The trainer's units: the root (embedding, final norm, an untied LM head), then layers."""
    v, h = shape.vocab_size, shape.hidden_size
    root: list[Dims] = [(v, h), (h,)] + ([] if shape.tie_word_embeddings else [(v, h)])
    layer = tuple(d for _, d in layer_params(shape))
    return [Unit("root", tuple(root), root=True)] + [
        Unit(f"layer{k}", layer) for k in range(shape.num_layers)
    ]


def muon_matrices(shape: ModelShape) -> list[Dims]:
    """The 2-D hidden matrices Muon takes (``qwen_cpt.optim.split_parameters``: not the
    embedding or head), in the model's parameter order."""
    one = [d for _, d in layer_params(shape) if len(d) == 2]
    return one * shape.num_layers


# --- bytes per rank per step -----------------------------------------------------------------------


@dataclass
class Volume:
    """Bytes per rank per optimizer step, by collective (see the module docstring)."""

    all_gather: float = 0.0
    reduce_scatter: float = 0.0
    all_reduce: float = 0.0
    muon: float = 0.0  # all-to-all, sent to other ranks (the same is received), mean over ranks
    # the wire bytes each rank sends: ring factors applied (the all-to-all is already that)
    wire: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def step_volume(
    units: list[Unit],
    matrices: list[Dims],
    *,
    shard: int,
    replicate: int = 1,
    param_bytes: int = 2,
    reduce_bytes: int = 4,
    muon_bytes: int = 2,
    micro_batches: int = 1,
    sync_micro_batches: int = 1,
    muon: bool = False,
) -> Volume:
    """Bytes per rank of one step of ``micro_batches`` forward+backward passes, of which
    ``sync_micro_batches`` reduce gradients (1: the last only; ``micro_batches``: every one).

    ``muon``: add DistributedMuon's exchange of ``matrices`` (each rank's mean); without it the
    optimizer (AdamW) works on the local shards and communicates nothing.
    """
    if shard < 1 or replicate < 1 or not 1 <= sync_micro_batches <= micro_batches:
        raise ValueError("shard, replicate >= 1 and 1 <= sync_micro_batches <= micro_batches")
    gather = sum(u.padded_numel(shard) * (1 if u.root else 2) for u in units)
    padded = sum(u.padded_numel(shard) for u in units)
    v = Volume()
    if shard > 1:
        v.all_gather = micro_batches * gather * param_bytes
        v.reduce_scatter = sync_micro_batches * padded * reduce_bytes
    if replicate > 1:  # once per step, whatever the reduce-scatters (World.set_gradient_sync)
        v.all_reduce = padded / shard * reduce_bytes
    if muon and shard > 1:
        v.muon = sum(muon_pair_bytes(d, shard, muon_bytes) for d in matrices)
    v.wire = {
        "all_gather": v.all_gather * ring(shard),
        "reduce_scatter": v.reduce_scatter * ring(shard),
        "all_reduce": v.all_reduce * 2 * ring(replicate),
        "muon": v.muon,
    }
    return v


def muon_pair_bytes(dims: Dims, shard: int, muon_bytes: int = 2) -> float:
    """Mean bytes a rank sends (and receives) for one matrix's two all-to-alls."""
    rows, cols = dims
    return 2 * (shard - 1) / shard * math.ceil(rows / shard) * cols * muon_bytes


def ring(n: int) -> float:
    """``(n - 1) / n``: the share of an all-gather's output a ring moves over each link."""
    return (n - 1) / n


# --- time of a step --------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitTimes:
    """Seconds of one unit per micro-batch: its compute forward and backward (recomputation
    included), and its collectives at the bandwidth of the link they use."""

    forward: float
    backward: float
    all_gather: float
    reduce_scatter: float
    all_reduce: float


@dataclass
class StepTime:
    compute: float  # forward + backward compute of all micro-batches, nothing else
    micro_batches_end: float  # when the last micro-batch's last collective has finished
    optimizer: float  # the optimizer's own work and Muon's exchange, after that
    total: float
    exposed: dict[str, float] = field(default_factory=dict)


def simulate_step(
    units: list[UnitTimes],
    *,
    micro_batches: int,
    sync_every: bool,
    same_link: bool,
    optimizer_s: float = 0.0,
) -> StepTime:
    """The step's timeline, one compute stream and two FIFO links, as FSDP2 schedules it.

    ``units[0]`` is the root; the others are decoder layers in forward order.

    - Forward: the root is gathered first; layer ``i + 1``'s all-gather is issued when layer
      ``i``'s compute starts (FSDP2's implicit prefetch, at most two gathered layers), and
      compute waits for its all-gather. The root's compute (LM head and loss) ends the forward.
    - Backward: the root's compute first (its parameters stay gathered), then the layers in
      reverse, each waiting for its all-gather, issued when the layer after it started its
      backward (FSDP2's backward prefetch). A syncing micro-batch reduce-scatters each layer
      when its backward ends, and the root (which holds the embedding, whose gradient comes last)
      at the very end. HSDP all-reduces each reduce-scattered shard as soon as it is there.
    - All-gathers and reduce-scatters share link A in issue order (FIFO); the HSDP all-reduce
      uses link B (the inter-node network), which is link A too when ``same_link``. So what
      cannot hide is the first all-gather, the reduce-scatter and all-reduce of the root, and
      whatever the links still carry after the last compute; the next micro-batch starts when
      its first all-gather can.
    - Then the optimizer (``optimizer_s``: its elementwise work and Muon's step-end exchange and
      Newton-Schulz), which waits for every gradient.
    """
    t_comp = 0.0
    link = {"a": 0.0, "b": 0.0}
    b_link = "a" if same_link else "b"

    def on(which: str, ready: float, seconds: float) -> float:
        start = max(link[which], ready)
        link[which] = start + seconds
        return link[which]

    root, layers = units[0], units[1:]
    compute_total = 0.0
    exposed_ag = 0.0
    for mb in range(micro_batches):
        sync = sync_every or mb == micro_batches - 1
        # forward
        first_start = t_comp
        ag_done = [0.0] * len(layers)
        root_ready = on("a", t_comp, root.all_gather)
        if layers:
            ag_done[0] = on("a", t_comp, layers[0].all_gather)
        t = max(t_comp, root_ready)
        exposed_ag += t - first_start
        for i, u in enumerate(layers):
            start = max(t, ag_done[i])
            exposed_ag += start - t
            if i + 1 < len(layers):
                ag_done[i + 1] = on("a", start, layers[i + 1].all_gather)
            t = start + u.forward
        t += root.forward
        # backward
        n = len(layers)
        bw_ag = [0.0] * n
        if n:
            bw_ag[n - 1] = on("a", t, layers[n - 1].all_gather)
        t += root.backward
        for i in range(n - 1, -1, -1):
            start = max(t, bw_ag[i])
            exposed_ag += start - t
            if i > 0:
                bw_ag[i - 1] = on("a", start, layers[i - 1].all_gather)
            t = start + layers[i].backward
            if sync:
                rs = on("a", t, layers[i].reduce_scatter)
                if layers[i].all_reduce:
                    on(b_link, rs, layers[i].all_reduce)
        if sync:
            rs = on("a", t, root.reduce_scatter)
            if root.all_reduce:
                on(b_link, rs, root.all_reduce)
        compute_total += sum(u.forward + u.backward for u in units)
        t_comp = t
    end = max(t_comp, link["a"], link["b"])
    total = end + optimizer_s
    exposed = {
        "all_gather_wait": exposed_ag,
        "gradient_tail": end - t_comp,  # reduce-scatter / all-reduce after the last compute
        "optimizer": optimizer_s,
    }
    return StepTime(compute_total, end, optimizer_s, total, exposed)


def muon_exchange_seconds(
    matrices: list[Dims],
    shard: int,
    bandwidth: float,
    flops_rate: float,
    *,
    muon_bytes: int = 2,
    ns_steps: int = 5,
    bucket_bytes: int | None = None,
) -> dict[str, float]:
    """Seconds of DistributedMuon's step end: its all-to-alls and Newton-Schulz, as it runs them.

    The owners and buckets are the optimizer's own (``qwen_cpt.muon.plan_buckets``: owners
    balance Newton-Schulz FLOPs, buckets hold at most ``bucket_bytes`` of full matrices per
    owner). An all-to-all lasts as long as its busiest rank's traffic, in or out; a bucket's
    Newton-Schulz as long as its busiest owner's FLOPs at ``flops_rate``. DistributedMuon
    overlaps bucket k's Newton-Schulz with bucket k+1's rows going out and bucket k-1's
    results coming back (both on the same link), so the step end is
    ``in(0) + sum_k max(ns(k), in(k+1) + out(k-1)) + out(last)``. Nothing else runs then:
    the gradients must all be reduced before, and the next forward waits for the weights.
    ``bandwidth`` in bytes/s per rank and direction; ``flops_rate`` in FLOP/s per GPU.
    Returns the exchange's and Newton-Schulz's own totals and the overlapped ``total``.
    """
    from ..muon import DEFAULT_BUCKET_BYTES, ns_flops, plan_buckets

    if shard <= 1:  # one matrix at a time, locally
        ns = sum(ns_flops(d, ns_steps) for d in matrices) / flops_rate
        return {"exchange": 0.0, "newton_schulz": ns, "total": ns, "buckets": 0}
    shapes = tuple((int(r), int(c)) for r, c in matrices)
    owners, buckets = plan_buckets(
        shapes, shard, ns_steps, DEFAULT_BUCKET_BYTES if bucket_bytes is None else bucket_bytes
    )
    a2a, ns = [], []
    for idx in buckets:
        recv, send, flops = [0.0] * shard, [0.0] * shard, [0.0] * shard
        for i in idx:
            rows, cols = shapes[i]
            chunk = math.ceil(rows / shard) * cols * muon_bytes
            o = owners[i]
            recv[o] += (shard - 1) * chunk
            for r in range(shard):
                if r != o:
                    send[r] += chunk
            flops[o] += ns_flops(shapes[i], ns_steps)
        a2a.append(max(max(recv), max(send)) / bandwidth)
        ns.append(max(flops) / flops_rate)
    k = len(buckets)
    total = a2a[0] + a2a[-1]
    for j in range(k):
        during = (a2a[j + 1] if j + 1 < k else 0.0) + (a2a[j - 1] if j > 0 else 0.0)
        total += max(ns[j], during)
    return {"exchange": 2 * sum(a2a), "newton_schulz": sum(ns), "total": total, "buckets": k}
