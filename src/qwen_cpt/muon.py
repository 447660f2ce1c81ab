"""Muon for FSDP2-sharded matrices: :class:`DistributedMuon` orthogonalizes each matrix whole.

Newton-Schulz on a row shard would be a different, wrong update (docs/design.md, "Muon"): each
matrix has an owner rank (round-robin), the shards of a group of ``world_size`` matrices travel
to their owners in one all-to-all, each owner runs Newton-Schulz on its full matrix, and one more
all-to-all brings the rows back. On one unsharded process the trainer uses ``torch.optim.Muon``
itself; tests/test_distributed.py checks that the two give the same update.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .bf16_states import _seed, evaluate_closure, keep_dtype, stochastic_round_


class DistributedError(RuntimeError):
    """The distributed setup cannot work as configured; the message says why."""


def newton_schulz(
    g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> torch.Tensor:
    """Orthogonalize ``g`` with the quintic Newton-Schulz iteration, in bf16, as torch's Muon.

    (Keller Jordan's Muon; the same operations and order as ``torch.optim.Muon``, so the two
    give the same update, which tests/test_distributed.py checks.)
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
    """``torch.optim.Muon`` for FSDP2-sharded (``Shard(0)`` DTensor) matrices.

    Momentum, Nesterov, weight decay and the update are element-wise and run on each rank's
    row shard. Newton-Schulz runs on the whole matrix: matrices are taken ``world_size`` at a
    time; matrix ``j`` of a group is owned by rank ``j``, which receives every rank's rows of it
    (one ``all_to_all_single`` for the whole group, in bf16, the dtype Newton-Schulz starts
    from), orthogonalizes it on ``ns_device`` (the GPU, also when states are offloaded to the
    CPU), and sends each rank its rows back (a second all-to-all). Each rank thus runs
    Newton-Schulz for about ``1 / world_size`` of the matrices. Row counts that do not divide
    by the world size are padded for the transfer only.

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
        self.momentum_dtype = momentum_dtype
        self.seed = seed
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
        for group in self.param_groups:
            params, indices = [], []
            for p in group["params"]:
                index += 1
                if p.grad is not None:
                    params.append(p)
                    indices.append(index)
            if not params:
                continue
            pg = _process_group(params[0])
            if pg is None or dist.get_world_size(pg) == 1:
                # one matrix at a time: one update (fp32, the size of the matrix) lives at once
                for p, i in zip(params, indices):
                    self._apply(p, self._newton_schulz(self._update(p, group, i), group), group)
                continue
            updates = [self._update(p, group, i) for p, i in zip(params, indices)]
            for p, o in zip(params, self._orthogonalize(params, updates, group)):
                self._apply(p, o, group)
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

    def _orthogonalize(self, params, updates, group) -> list[torch.Tensor]:
        """Each update's rows of Newton-Schulz(the full update matrix)."""
        pg = _process_group(params[0])
        world = dist.get_world_size(pg)
        rank = dist.get_rank(pg)
        comm_device = updates[0].device
        out: list[torch.Tensor] = [None] * len(params)  # type: ignore[list-item]
        for start in range(0, len(params), world):
            idx = list(range(start, min(start + world, len(params))))
            chunk_rows = [math.ceil(params[i].shape[0] / world) for i in idx]
            cols = [params[i].shape[1] for i in idx]
            # 1) every rank sends its (padded) rows of matrix j to rank j
            send = torch.cat(
                [
                    _pad_rows(updates[i], r).to(torch.bfloat16).flatten()
                    for i, r in zip(idx, chunk_rows)
                ]
            )
            send_splits = [r * c for r, c in zip(chunk_rows, cols)] + [0] * (world - len(idx))
            mine = rank < len(idx)
            recv_splits = [chunk_rows[rank] * cols[rank] if mine else 0] * world
            recv = torch.empty(sum(recv_splits), dtype=torch.bfloat16, device=comm_device)
            dist.all_to_all_single(recv, send, recv_splits, send_splits, group=pg)
            # 2) the owner orthogonalizes its whole matrix and 3) sends each rank its rows back
            if mine:
                i = idx[rank]
                full = recv.view(world * chunk_rows[rank], cols[rank])[: params[i].shape[0]]
                back = _pad_rows(self._newton_schulz(full, group), world * chunk_rows[rank])
                back = back.to(device=comm_device, dtype=torch.bfloat16).flatten()
            else:
                back = torch.empty(0, dtype=torch.bfloat16, device=comm_device)
            rows_back = torch.empty(sum(send_splits), dtype=torch.bfloat16, device=comm_device)
            dist.all_to_all_single(rows_back, back, send_splits, recv_splits, group=pg)
            offset = 0
            for i, r, c in zip(idx, chunk_rows, cols):
                piece = rows_back[offset : offset + r * c].view(r, c)
                out[i] = piece[: updates[i].shape[0]]
                offset += r * c
        return out


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _process_group(p: torch.Tensor):
    mesh = getattr(p, "device_mesh", None)
    return None if mesh is None else mesh.get_group()


def _check_row_sharded(p: torch.Tensor) -> None:
    """DistributedMuon's row arithmetic assumes FSDP2's layout: ``Shard(0)`` on a 1-D mesh,
    rank r holding rows ``[r*ceil(n/W), (r+1)*ceil(n/W))``."""
    if not hasattr(p, "placements"):
        return
    from torch.distributed.tensor import Shard

    if p.device_mesh.ndim != 1 or not isinstance(p.placements[0], Shard) or p.placements[0].dim:
        raise DistributedError(
            f"DistributedMuon needs parameters sharded by rows on a 1-D mesh (FSDP2's "
            f"fully_shard), got placements {p.placements} on a {p.device_mesh.ndim}-D mesh"
        )
    world, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
    chunk = math.ceil(p.shape[0] / world)
    expected = max(0, min(p.shape[0], (rank + 1) * chunk) - rank * chunk)
    if _local(p).shape[0] != expected:
        raise DistributedError(
            f"unexpected shard of a {tuple(p.shape)} matrix on rank {rank}: "
            f"{_local(p).shape[0]} rows, expected {expected}"
        )
