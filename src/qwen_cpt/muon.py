"""Muon for FSDP2-sharded matrices: :class:`DistributedMuon` orthogonalizes each matrix whole.

Newton-Schulz on a row shard would be a different, wrong update (docs/design.md, "Muon"): each
matrix has an owner rank, chosen so that every rank runs about the same Newton-Schulz FLOPs
(:func:`assign_owners`). The matrices travel in buckets (:func:`plan_buckets`): one all-to-all
brings a bucket's row shards to their owners, each owner orthogonalizes its full matrices, one
more all-to-all brings the rows back, and the exchanges of the neighbouring buckets run while
a bucket is orthogonalized. On one unsharded process the trainer uses ``torch.optim.Muon``
itself; tests/test_muon_distributed.py checks that the two give the same update.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist

from .bf16_states import _seed, evaluate_closure, keep_dtype, stochastic_round_

#: Default bucket: at most this many bytes of full bf16 matrices per owner rank per exchange.
DEFAULT_BUCKET_BYTES = 64 * 2**20


class DistributedError(RuntimeError):
    """The distributed setup cannot work as configured; the message says why."""


def newton_schulz(
    g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> torch.Tensor:
    """Orthogonalize ``g`` with the quintic Newton-Schulz iteration, in bf16, as torch's Muon.

    (Keller Jordan's Muon; the same operations and order as ``torch.optim.Muon``, so the two
    give the same update, which tests/test_muon_distributed.py checks.)
    """
    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


def ns_flops(shape, steps: int) -> int:
    """Matrix-multiply FLOPs of :func:`newton_schulz` on a ``shape`` matrix.

    With ``x`` n x m, n <= m (the transpose of a tall matrix), each step is ``x @ x.T``
    (2·n²·m), ``gram @ gram`` (2·n³) and ``poly @ x`` (2·n²·m); the element-wise terms
    (O(n·m) per step) are left out.
    """
    n, m = sorted(int(d) for d in shape[:2])
    return steps * (4 * n * n * m + 2 * n**3)


def exchange_bytes(shape, world: int, itemsize: int = 2) -> int:
    """Bytes of one matrix in the exchange: its rows padded to ``world * ceil(rows / world)``."""
    rows, cols = int(shape[0]), int(shape[1])
    return world * math.ceil(rows / world) * cols * itemsize


def _ns_order(shapes: tuple, steps: int) -> list[int]:
    """Largest Newton-Schulz cost first; ties by position (the same order on every rank)."""
    return sorted(range(len(shapes)), key=lambda i: (-ns_flops(shapes[i], steps), i))


def assign_owners(shapes, world: int, steps: int = 5) -> list[int]:
    """The rank that orthogonalizes each matrix: greedy, largest Newton-Schulz cost first,
    each onto the rank with the least cost so far (lowest rank on a tie).

    A function of the global shapes only, so every rank computes the same owners. Longest-
    processing-time-first keeps the largest load within 4/3 of the best possible, and within
    one matrix of the mean: an embedding-sized matrix gets a rank to itself while the others
    share the small ones.
    """
    loads = [0] * world
    owners = [0] * len(shapes)
    for i in _ns_order(tuple(shapes), steps):
        r = min(range(world), key=lambda j: (loads[j], j))
        owners[i] = r
        loads[r] += ns_flops(shapes[i], steps)
    return owners


@functools.lru_cache(maxsize=64)
def plan_buckets(
    shapes: tuple, world: int, steps: int, bucket_bytes: int
) -> tuple[list[int], list[list[int]]]:
    """``(owners, buckets)``: each matrix's owner (:func:`assign_owners`) and the matrices of
    each exchange, in the order they are processed (largest cost first).

    A bucket closes when the next matrix would bring its owner above ``bucket_bytes`` of full
    bf16 matrices (:func:`exchange_bytes`) in that bucket; a larger matrix travels alone. In
    the greedy order consecutive matrices go to different ranks and are of similar cost, so
    each bucket gives every rank a similar share of work.
    """
    owners = assign_owners(shapes, world, steps)
    buckets: list[list[int]] = []
    current: list[int] = []
    filled = [0] * world
    for i in _ns_order(shapes, steps):
        size, owner = exchange_bytes(shapes[i], world), owners[i]
        if filled[owner] and filled[owner] + size > bucket_bytes:
            buckets.append(current)
            current, filled = [], [0] * world
        current.append(i)
        filled[owner] += size
    if current:
        buckets.append(current)
    return owners, buckets


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Muon's per-matrix learning rate (``torch.optim.Muon``'s ``adjust_lr_fn`` rules)."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(
        f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got {adjust_lr_fn!r}"
    )


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class DistributedMuon(torch.optim.Optimizer):
    """``torch.optim.Muon`` for FSDP2-sharded matrices (``Shard(0)`` DTensors, 1-D or HSDP).

    Momentum, Nesterov, weight decay and the update are element-wise and run on each rank's
    row shard. Newton-Schulz runs on the whole matrix, by one owner rank per matrix:

    - **Owners** balance Newton-Schulz FLOPs (:func:`assign_owners`, greedy largest-first onto
      the least-loaded rank, from the global shapes, so the same on every rank), not matrix
      counts: round-robin would give the rank that draws the MLP matrices several times the
      work of the one that draws k/v projections.
    - **Buckets** (:func:`plan_buckets`): each owner receives at most ``bucket_bytes`` of full
      bf16 matrices per bucket (one larger matrix travels alone). Per bucket, one
      ``all_to_all_single`` sends every rank's rows (in bf16, the dtype Newton-Schulz starts
      from; row counts that do not divide by the group are padded for the transfer only) to
      the owners, which orthogonalize on ``ns_device`` (the GPU, also when states are
      offloaded to the CPU), and a second one sends each rank its rows back.
    - **Overlap**: the exchanges are asynchronous. While bucket k is orthogonalized, bucket
      k+1's rows are on their way to the owners (its momentum computed just before) and
      bucket k-1's results on their way back; bucket k-1 is applied after bucket k's
      Newton-Schulz. Up to about 7 x ``bucket_bytes`` of bf16 buffers live at once (each
      bucket's send, receive and result buffers are each about ``bucket_bytes`` when every
      owner's share is full), and the fp32 update of a matrix only while it is packed.

    **HSDP** (a 2-D mesh, placements ``(Replicate(), Shard(0))``): the exchange runs in the
    shard dimension's group (one node's ranks), and every replica group orthogonalizes all
    matrices itself, redundantly. The alternative, splitting Newton-Schulz over all ranks,
    would divide each rank's Newton-Schulz time by the number of replicas R but then send
    (R-1)/R of each rank's bf16 shard of results across nodes. Newton-Schulz does about
    ``ns_steps * 4 * min(rows, cols)`` FLOPs per element, 2 bytes of which would cross: for
    Qwen2.5-7B (min dimension 3584) about 7e4 FLOPs, 0.1 ns per element on an H100/H200 at
    ~600 TFLOP/s, against 0.32 ns for 2 bytes at 400 Gb/s per node shared by 8 GPUs
    (6.25 GB/s each), while NVLink inside the node moves them in ~0.003 ns. Splitting would
    break even only above ~16 GB/s of inter-node bandwidth per GPU, and smaller models (fewer
    FLOPs per element) need more; it would also add to the gradient all-reduce on the link
    HSDP keeps scarce, on the optimizer step's critical path. So all Muon traffic stays inside
    a node. On a cluster with one 400 Gb/s NIC per GPU (50 GB/s each, as in DGX H100/H200)
    that break-even is passed and splitting would shorten the step (docs/scaling.md estimates
    by how much); it is not built, and neither case was measured. The replicas compute the same result from the same (all-reduced) gradients with
    the same kernels. A shard dimension of size 1 (pure replication) and one process
    (unsharded parameters) orthogonalize locally, one matrix at a time.

    Hyperparameters and state (``momentum_buffer``, sharded like the parameter, so DCP saves it
    sharded) are those of ``torch.optim.Muon``. ``momentum_dtype=torch.bfloat16``
    (``optimizer_states: bf16``) keeps the momentum in bf16, 2 B per element: it is updated in
    fp32 and stored with stochastic rounding (:mod:`qwen_cpt.bf16_states`), seeded by ``seed``,
    a per-matrix step count and the matrix's index, so a resumed run rounds as a straight one.
    On one process it also serves ``torch.optim.Muon``'s place for that mode, one matrix at a
    time.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315),
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        ns_device: torch.device | str | None = None,
        momentum_dtype: torch.dtype | None = None,
        seed: int = 0,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ):
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        super().__init__(params, defaults)
        self.ns_device = None if ns_device is None else torch.device(ns_device)
        if momentum_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"momentum_dtype: None, float32 or bfloat16, got {momentum_dtype}")
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.momentum_dtype = momentum_dtype
        self.seed = seed
        self.bucket_bytes = int(bucket_bytes)
        self.last_buckets = 0  # buckets exchanged by the last step (all groups); for tests
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D parameters only, got shape {tuple(p.shape)}")
                _check_row_sharded(p)

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        if self.momentum_dtype is not None:
            keep_dtype(self, ("momentum_buffer",), self.momentum_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        index = 0
        self.last_buckets = 0
        for group in self.param_groups:
            # the matrices of each exchange group, in parameter order (the same on every rank)
            by_group: dict = {}
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                exchange = _exchange_group(p)
                key = None if exchange is None else exchange[0]
                by_group.setdefault(key, (exchange, [], []))
                by_group[key][1].append(p)
                by_group[key][2].append(index)
            for exchange, params, indices in by_group.values():
                if exchange is None:
                    # one matrix at a time: one update (fp32, the size of the matrix) at once
                    for p, i in zip(params, indices):
                        self._apply(p, self._newton_schulz(self._update(p, group, i), group), group)
                else:
                    self._step_sharded(params, indices, group, *exchange)
        return loss

    def _update(self, p: torch.Tensor, group: dict, index: int) -> torch.Tensor:
        """Momentum (kept in ``momentum_dtype``), then the Nesterov update to orthogonalize."""
        momentum = group["momentum"]
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad, dtype=self.momentum_dtype)
        grad, buf = _local(p.grad), _local(state["momentum_buffer"])
        if buf.dtype == grad.dtype:
            buf.lerp_(grad, 1 - momentum)
        else:  # bf16 momentum: update in fp32, store rounded stochastically
            state["step"] = state.get("step", torch.tensor(0.0)) + 1
            gen = torch.Generator(device=buf.device)
            gen.manual_seed(_seed(self.seed, int(state["step"].item()), index))
            full = buf.float()
            full.lerp_(grad, 1 - momentum)
            stochastic_round_(buf, full, gen)
            buf = full
        return grad.lerp(buf, momentum) if group["nesterov"] else buf

    def _apply(self, p: torch.Tensor, orthogonal: torch.Tensor, group: dict) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        local = _local(p)
        local.mul_(1 - lr * wd)
        local.add_(
            orthogonal.to(local.device), alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape)
        )

    def _newton_schulz(self, full: torch.Tensor, group) -> torch.Tensor:
        device = self.ns_device or full.device
        return newton_schulz(
            full.to(device), group["ns_coefficients"], group["ns_steps"], group["eps"]
        )

    # --- the sharded step: buckets, exchanged asynchronously ------------------------------------

    def _step_sharded(self, params, indices, group, pg, world: int, rank: int) -> None:
        shapes = tuple((int(p.shape[0]), int(p.shape[1])) for p in params)
        owners, plan = plan_buckets(shapes, world, group["ns_steps"], self.bucket_bytes)
        self.last_buckets += len(plan)
        device = _local(params[0].grad).device
        buckets = [_Bucket(idx, owners, shapes, world, rank) for idx in plan]

        def gather(b: _Bucket):
            """Pack this rank's rows of the bucket (computing their momentum now) and send
            them to their owners."""
            send = torch.empty(b.total, dtype=torch.bfloat16, device=device)
            for i in b.idx:
                update = self._update(params[i], group, indices[i])
                rows = b.view(send, i)
                rows[: update.shape[0]].copy_(update)  # the cast to bf16 rounds as .bfloat16()
                rows[update.shape[0] :].zero_()
            recv = torch.empty(world * b.owned, dtype=torch.bfloat16, device=device)
            work = dist.all_to_all_single(
                recv, send, [b.owned] * world, b.splits, group=pg, async_op=True
            )
            return work, recv, send

        def orthogonalize(b: _Bucket, recv: torch.Tensor):
            """Newton-Schulz on each matrix this rank owns; send each rank its rows."""
            back = torch.empty_like(recv)
            pieces, results = recv.view(world, b.owned), back.view(world, b.owned)
            for i in b.mine:
                lo, hi = b.within[i], b.within[i] + b.chunk[i]
                rows, cols = shapes[i]
                full = pieces[:, lo:hi].reshape(-1, cols)[:rows]
                ortho = self._newton_schulz(full, group)
                padded = _pad_rows(ortho, world * b.chunk_rows[i])  # a tall result is a .T
                results[:, lo:hi].copy_(padded.reshape(world, -1))
            rows_back = torch.empty(b.total, dtype=torch.bfloat16, device=device)
            work = dist.all_to_all_single(
                rows_back, back, b.splits, [b.owned] * world, group=pg, async_op=True
            )
            return work, rows_back, back

        def apply(b: _Bucket, rows_back: torch.Tensor) -> None:
            for i in b.idx:
                p = params[i]
                self._apply(p, b.view(rows_back, i)[: _local(p).shape[0]], group)

        incoming = gather(buckets[0])
        outgoing = None
        for k, b in enumerate(buckets):
            after = gather(buckets[k + 1]) if k + 1 < len(buckets) else None
            work, recv, _ = incoming
            work.wait()
            incoming = None  # bucket k's send buffer goes
            sent = orthogonalize(b, recv)
            del recv
            if outgoing is not None:
                outgoing[0].wait()
                apply(buckets[k - 1], outgoing[1])
            incoming, outgoing = after, sent
        outgoing[0].wait()
        apply(buckets[-1], outgoing[1])


class _Bucket:
    """The layout of one exchange on one rank.

    The send buffer holds, for owner 0, 1, ..., this rank's padded rows of each of that
    owner's matrices of the bucket (bucket order); owner ``j`` receives the same segment from
    every rank, so a matrix sits at the same offset (``within``) in every rank's segment for
    its owner and in each source's piece of the owner's receive buffer.
    """

    def __init__(self, idx, owners, shapes, world: int, rank: int):
        self.idx = idx
        self.chunk_rows = {i: math.ceil(shapes[i][0] / world) for i in idx}
        self.chunk = {i: self.chunk_rows[i] * shapes[i][1] for i in idx}
        self.cols = {i: shapes[i][1] for i in idx}
        self.owner = {i: owners[i] for i in idx}
        self.within: dict[int, int] = {}
        self.splits = [0] * world  # elements this rank sends to each owner
        for i in idx:
            o = owners[i]
            self.within[i] = self.splits[o]
            self.splits[o] += self.chunk[i]
        self.start = [sum(self.splits[:j]) for j in range(world)]
        self.total = sum(self.splits)
        self.mine = [i for i in idx if owners[i] == rank]
        self.owned = self.splits[rank]  # elements this rank receives from each rank

    def view(self, buf: torch.Tensor, i: int) -> torch.Tensor:
        """Matrix ``i``'s padded rows (``chunk_rows x cols``) in a send-layout buffer."""
        lo = self.start[self.owner[i]] + self.within[i]
        return buf[lo : lo + self.chunk[i]].view(self.chunk_rows[i], self.cols[i])


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _shard_dim(p: torch.Tensor) -> int | None:
    """The mesh dimension that shards ``p`` by rows, or None for a plain tensor."""
    if not hasattr(p, "placements"):
        return None
    from torch.distributed.tensor import Shard

    sharded = [d for d, pl in enumerate(p.placements) if not pl.is_replicate()]
    if len(sharded) != 1 or p.placements[sharded[0]] != Shard(0):
        raise DistributedError(
            f"DistributedMuon needs parameters sharded by rows (Shard(0)) on one mesh dimension "
            f"and replicated on any other (FSDP2's fully_shard, or HSDP on a 2-D mesh), got "
            f"placements {p.placements} on a {p.device_mesh.ndim}-D mesh"
        )
    return sharded[0]


def _exchange_group(p: torch.Tensor):
    """``(process group, size, rank)`` of the shard dimension, or None when ``p`` is whole on
    this rank (a plain tensor, or a shard dimension of one rank)."""
    dim = _shard_dim(p)
    if dim is None or p.device_mesh.size(dim) == 1:
        return None
    mesh = p.device_mesh
    return mesh.get_group(dim), mesh.size(dim), mesh.get_local_rank(dim)


def _check_row_sharded(p: torch.Tensor) -> None:
    """DistributedMuon's row arithmetic assumes FSDP2's layout: ``Shard(0)`` over a mesh
    dimension of W ranks, local rank r holding rows ``[r*ceil(n/W), (r+1)*ceil(n/W))``."""
    dim = _shard_dim(p)
    if dim is None:
        return
    world, rank = p.device_mesh.size(dim), p.device_mesh.get_local_rank(dim)
    chunk = math.ceil(p.shape[0] / world)
    expected = max(0, min(p.shape[0], (rank + 1) * chunk) - rank * chunk)
    if _local(p).shape[0] != expected:
        raise DistributedError(
            f"unexpected shard of a {tuple(p.shape)} matrix on rank {rank}: "
            f"{_local(p).shape[0]} rows, expected {expected}"
        )
