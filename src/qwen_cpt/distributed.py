"""Multi-process training on PyTorch's own stack: torchrun, FSDP2, DCP and a distributed Muon.

Launch: ``torchrun --nproc_per_node=N -m qwen_cpt train CONFIG.yaml`` (single node) or the same
with torchrun's rendezvous flags on every node. The trainer sees ``WORLD_SIZE > 1`` and:

- initialises the process group (NCCL for CUDA tensors plus gloo for CPU ones, gloo alone on a
  CPU) with ``distributed_timeout_minutes``, so a collective that hangs fails with an error;
- shards the model with FSDP2: ``fully_shard`` per decoder layer, then a root unit that holds
  the embeddings, final norm and LM head together with the loss (:class:`LossModule`), so the
  chunked loss runs inside the root's forward. On CUDA with ``use_bf16`` parameters compute in
  bf16 and gradients reduce in fp32 (``MixedPrecisionPolicy``); ``fsdp_cpu_offload`` keeps
  parameters, gradients and optimizer state in CPU memory (``CPUOffloadPolicy``);
- steps Muon with :class:`DistributedMuon`, which orthogonalizes every matrix whole: each matrix
  has an owner rank (round-robin), the shards of a group of ``world_size`` matrices travel to
  their owners in one all-to-all, each owner runs Newton-Schulz on its full matrix, and one
  more all-to-all brings the rows back. Newton-Schulz on a row shard would be a different,
  wrong update (shared/REFERENCE.md);
- saves sharded checkpoints with DCP (:func:`save_sharded_checkpoint`) under the same atomic
  commit and manifest as single-process ones, and consolidated HF ``final/`` and ``best/``.

Every rank reads the same data stream and keeps its own slice of each global batch (see
``CPTTrainer._step_batches``), so the data position is one global value and a resume is exact.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("qwen_cpt")


class DistributedError(RuntimeError):
    """The distributed setup cannot work as configured; the message says why."""


# --- the process group --------------------------------------------------------------------------


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (or another launcher), 1 when run as a plain process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


@dataclass
class DistContext:
    """This process's place in the job, and the few collectives the trainer needs."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this module created the process group, so it destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64, so token counts stay exact)."""
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def max(self, values: list[float]) -> list[float]:
        """Element-wise maximum over ranks."""
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def all_ok(self, ok: bool) -> bool:
        """True on every rank if ``ok`` was true on every rank."""
        t = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def raise_unless_all_ok(self, error: BaseException | None, what: str, error_cls) -> None:
        """After a step every rank tried: raise on every rank if it failed on any.

        The rank that failed raises ``error_cls`` naming its error; the others say that it
        failed elsewhere, instead of waiting in the next collective until the timeout.
        """
        if self.all_ok(error is None):
            return
        if error is not None:
            if isinstance(error, error_cls):
                raise error
            raise error_cls(f"{what} failed on rank {self.rank}: {error}") from error
        raise error_cls(f"{what} failed on another rank; see its log")

    def on_main(self, fn):
        """Run ``fn`` on rank 0 only and give its result, or raise its exception, on all ranks."""
        box: list = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as exc:
                box[0] = ("error", exc)
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: torch.device, cpu_offload: bool, timeout_minutes: float):
    """A :class:`DistContext` when this run is sharded, else None (plain single-process training).

    A run is sharded when a launcher started several processes, or when ``fsdp_cpu_offload``
    asks for FSDP2 on one process (then a one-process group is created here).
    """
    world = launched_world_size()
    if world <= 1 and not cpu_offload:
        return None
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                "set torchrun's --nproc_per_node to at most the number of GPUs"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"  # NCCL for the model, gloo for CPU-offloaded tensors
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise DistributedError(f"multi-process training supports cuda and cpu, not {device.type}")
    owns = not dist.is_initialized()
    if owns:
        kwargs = {}
        if world <= 1:  # one process, sharded only for FSDP2's CPU offload: a private group
            kwargs = dict(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes), **kwargs)
    if dist.get_world_size() != max(world, 1):
        raise DistributedError(
            f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE is {world}"
        )
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)
    if rank != ctx.rank:
        raise DistributedError(f"RANK={rank} but the process group says rank {ctx.rank}")
    return ctx


# --- FSDP2 ---------------------------------------------------------------------------------------


class LossModule(torch.nn.Module):
    """The FSDP2 root: the model plus its loss, so the root's parameters (embeddings, final
    norm, LM head) are gathered for the whole forward, chunked loss included."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._loss_fn(self.model, batch)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise DistributedError(
            f"cannot find the decoder layers of {type(model).__name__} (expected "
            f"model.{getattr(model, 'base_model_prefix', 'model')}.layers) to shard with FSDP2"
        )
    return list(layers)


def shard_model(
    model: torch.nn.Module,
    loss_fn,
    ctx: DistContext,
    *,
    bf16_params: bool,
    cpu_offload: bool,
) -> LossModule:
    """``fully_shard`` each decoder layer, then the root; parameters end up as fp32 shards.

    Rank 0 brings the loaded model, in its checkpoint's dtype (bf16 for Qwen2.5) on the CPU;
    each layer is cast to fp32 just before it is sharded, so it never holds more than the bf16
    model plus one fp32 layer in host memory. The other ranks bring the model on the meta
    device (no memory) and receive their shards from rank 0.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    full = model.state_dict() if ctx.is_main else {}  # rank 0's weights, to broadcast
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    kwargs: dict = {"mesh": mesh}
    if bf16_params:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=ctx.device.type == "cuda")
    for layer in decoder_layers(model):
        layer.float()
        fully_shard(layer, **kwargs)
    model.float()
    root = LossModule(model, loss_fn)
    fully_shard(root, **kwargs)
    _broadcast_weights(root, model, full, ctx, cpu_offload)
    return root


def _broadcast_weights(root, model, full: dict, ctx: DistContext, cpu_offload: bool) -> None:
    """Fill every rank's shards from rank 0's weights (the others built ``model`` on meta)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(p.device.type == "meta" for p in root.parameters()):
        root.to_empty(device="cpu" if cpu_offload else ctx.device)
        if cpu_offload:  # FSDP2 offloads parameters only: buffers live on the device, as on rank 0
            for module in root.modules():
                for name, buffer in module._buffers.items():
                    if buffer is not None:
                        module._buffers[name] = buffer.to(ctx.device)
    set_model_state_dict(
        model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    for buffer in root.buffers():  # not in the state dict: rotary inv_freq and the like
        dist.broadcast(buffer, src=0)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """``clip_grad_norm_`` over (possibly sharded) parameters; the global norm as a float."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm.item())


# --- distributed Muon -----------------------------------------------------------------------------


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
    sharded) are those of ``torch.optim.Muon``.
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
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D parameters only, got shape {tuple(p.shape)}")
                _check_row_sharded(p)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            momentum = group["momentum"]
            updates = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                grad, buf = _local(p.grad), _local(state["momentum_buffer"])
                buf.lerp_(grad, 1 - momentum)
                updates.append(grad.lerp(buf, momentum) if group["nesterov"] else buf)
            orthogonal = self._orthogonalize(params, updates, group)
            lr, wd = group["lr"], group["weight_decay"]
            for p, o in zip(params, orthogonal):
                local = _local(p)
                local.mul_(1 - lr * wd)
                local.add_(
                    o.to(local.device), alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape)
                )
        return loss

    def _newton_schulz(self, full: torch.Tensor, group) -> torch.Tensor:
        device = self.ns_device or full.device
        return newton_schulz(
            full.to(device), group["ns_coefficients"], group["ns_steps"], group["eps"]
        )

    def _orthogonalize(self, params, updates, group) -> list[torch.Tensor]:
        """Each update's rows of Newton-Schulz(the full update matrix)."""
        if not params:
            return []
        pg = _process_group(params[0])
        world = 1 if pg is None else dist.get_world_size(pg)
        if world == 1:
            return [self._newton_schulz(u, group) for u in updates]
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


# --- sharded checkpoints --------------------------------------------------------------------------


def _state_dicts(model, optimizers: dict) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    return {
        "model": get_model_state_dict(model),
        "optim": {name: get_optimizer_state_dict(model, opt) for name, opt in optimizers.items()},
    }


def save_sharded_checkpoint(
    target: Path,
    ctx: DistContext,
    model,
    optimizers: dict,
    rng: dict[str, torch.Tensor],
    write_main_files,
) -> Path:
    """Save a checkpoint with DCP, committed atomically like a single-process one.

    1. rank 0 creates ``.tmp-<name>/``; 2. every rank writes its DCP shards (``dcp/``) and its
    RNG state (``rng/rank-<r>.safetensors``); 3. rank 0 writes the small files
    (``write_main_files(tmp)``: trainer state, config, tokenizer), the manifest with every
    file's sha256, fsyncs, and renames the folder into place. A failure on any rank removes the
    partial folder and raises on every rank; the previous checkpoint is untouched.
    The output folder must be on a file system every rank can reach (as DCP requires).
    """
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    from .checkpoint import TMP_PREFIX, CheckpointError, commit_folder

    target = Path(target)
    tmp = target.parent / f"{TMP_PREFIX}{target.name}"

    def fresh_tmp() -> None:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)

    ctx.on_main(fresh_tmp)
    error: BaseException | None = None
    try:
        dcp.save(_state_dicts(model, optimizers), checkpoint_id=str(tmp / "dcp"))
        (tmp / "rng").mkdir(exist_ok=True)
        save_file(rng, str(tmp / "rng" / f"rank-{ctx.rank}.safetensors"))
    except Exception as exc:  # noqa: BLE001 - reported on every rank below
        error = exc
    try:
        ctx.raise_unless_all_ok(error, f"saving {target}", CheckpointError)
    except CheckpointError:
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise

    def commit() -> Path:
        try:
            write_main_files(tmp)
            return commit_folder(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    return ctx.on_main(commit)


def load_sharded_checkpoint(
    path: Path, ctx: DistContext, model, optimizers: dict
) -> dict[str, torch.Tensor]:
    """Load model and optimizer state from ``path/dcp`` into this run's shards (DCP reshards
    when the number of processes differs); return this rank's RNG state."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = _state_dicts(model, optimizers)
    dcp.load(state, checkpoint_id=str(Path(path) / "dcp"))
    set_model_state_dict(model, state["model"])
    for name, opt in optimizers.items():
        set_optimizer_state_dict(model, opt, state["optim"][name])
    rng = Path(path) / "rng" / f"rank-{ctx.rank}.safetensors"
    if not rng.is_file():  # saved by fewer processes: this rank starts from rank 0's generator
        rng = rng.with_name("rank-0.safetensors")
    return load_file(str(rng))


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The unsharded weights on rank 0's CPU (an empty dict on the other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    seen: set[int] = set()  # a tied weight (Qwen2.5's embeddings and head) is saved once
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            weights.pop(name, None)
        seen.add(id(p))
    return weights
