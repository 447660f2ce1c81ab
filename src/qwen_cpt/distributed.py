"""The run's place among processes, decided once at start-up: :class:`World`.

The trainer has one loop for one process and for many. Everything that differs lives here:

- **One plain process** (the default without torchrun): no process group; the model trains
  unwrapped on its device with ``torch.optim.Muon``; the collectives below return their input.
- **Sharded** (``WORLD_SIZE > 1`` under torchrun, or ``fsdp_cpu_offload`` on one process, which
  gets a private one-process group): the process group (NCCL for CUDA tensors plus gloo for CPU
  ones, gloo alone on a CPU) with ``distributed_timeout_minutes``, so a collective that hangs
  fails with an error; FSDP2 ``fully_shard`` per decoder layer, then a root unit that holds the
  embeddings, final norm and LM head together with the loss (:class:`LossModule`), so the chunked
  loss runs inside the root's forward. The mesh is 1-D (FSDP over every rank) or, with
  ``dp_replicate x dp_shard`` (auto on several nodes: shard within a node), 2-D: HSDP, each
  group of ``dp_shard`` consecutive ranks holds one sharded copy, and gradients are
  reduce-scattered inside it and all-reduced across the copies. On CUDA with ``use_bf16`` parameters compute in bf16 and
  gradients reduce in fp32 (``MixedPrecisionPolicy``); ``fsdp_cpu_offload`` keeps parameters,
  gradients and optimizer state in CPU memory (``CPUOffloadPolicy``). Muon is
  :class:`qwen_cpt.muon.DistributedMuon`, which orthogonalizes every matrix whole.

Launch: ``torchrun --nproc_per_node=N -m qwen_cpt train CONFIG.yaml`` (single node) or the same
with torchrun's rendezvous flags on every node. Checkpoints are one format for both
(:mod:`qwen_cpt.checkpoint`, DCP).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .elastic import describe_restarts, init_process_group
from .muon import DistributedError

log = logging.getLogger("qwen_cpt")

__all__ = [
    "DistributedError", "LossModule", "World", "decoder_layers", "launched_world_size", "mesh_shape",
]  # fmt: skip


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (or another launcher), 1 when run as a plain process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


class LossModule(torch.nn.Module):
    """The model plus its loss: ``module(batch)`` is the summed token loss of ``batch``. Under
    FSDP2 it is the root unit, so the root's parameters (embeddings, final norm, LM head) are
    gathered for the whole forward, chunked loss included."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._loss_fn(self.model, batch)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks FSDP2 shards one by one."""
    from .perf import decoder_layers as find

    try:
        return find(model, "FSDP2")
    except ValueError as e:
        raise DistributedError(str(e)) from None


@dataclasses.dataclass
class World:
    """This process's place in the job, the few collectives the trainer needs, and how the
    model is wrapped. Build it with :meth:`create`; close it with :meth:`close`."""

    rank: int = 0
    size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    sharded: bool = False  # FSDP2 shards and a process group
    cpu_offload: bool = False
    owns_group: bool = False  # this object created the process group, so it destroys it
    replicate: int = 1  # HSDP: model replicas (the outer mesh dimension, across nodes)
    shard: int = 1  # ranks that share one copy of the model (FSDP2's shard dimension)
    _root: torch.nn.Module | None = None

    # --- start-up --------------------------------------------------------------------------------
    @classmethod
    def create(cls, device: torch.device, cpu_offload: bool, timeout_minutes: float) -> World:
        """One plain process, or a sharded one in a process group (see the module docstring)."""
        world = launched_world_size()
        if world <= 1 and not cpu_offload:
            return cls(device=device)
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise DistributedError(
                    f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} "
                    "GPUs; set torchrun's --nproc_per_node to at most the number of GPUs"
                )
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            backend = "cpu:gloo,cuda:nccl"  # NCCL for the model, gloo for CPU-offloaded tensors
        elif device.type == "cpu":
            backend = "gloo"
        else:
            raise DistributedError(
                f"multi-process training supports cuda and cpu, not {device.type}"
            )
        owns = not dist.is_initialized()
        if owns:  # a private group on one plain process; else in the launcher's store, in a
            # namespace fresh for every torchrun restart, set-up bounded (qwen_cpt.elastic)
            init_process_group(backend, timedelta(minutes=timeout_minutes), world, rank)
        if dist.get_world_size() != max(world, 1):
            raise DistributedError(
                f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE is {world}"
            )
        if rank != dist.get_rank():
            raise DistributedError(f"RANK={rank} but the process group says rank {dist.get_rank()}")
        size = dist.get_world_size()
        return cls(dist.get_rank(), size, device, True, cpu_offload, owns, replicate=1, shard=size)

    def describe(self) -> str:
        if not self.sharded:  # describe_restarts: ", restart 1 of at most 3" under torchrun
            return f"one process on {self.device}{describe_restarts()}"
        return (
            f"{self.size} ranks (FSDP2{', CPU offload' if self.cpu_offload else ''}), "
            f"this is rank {self.rank} on {self.device}{describe_restarts()}"
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def set_mesh(self, replicate: int, shard: int) -> None:
        """HSDP's ``replicate x shard`` layout (from :func:`mesh_shape`); the default, set
        at start-up, shards over every rank."""
        if replicate * shard != self.size:
            raise DistributedError(f"a {replicate} x {shard} mesh needs {replicate * shard} ranks")
        self.replicate, self.shard = replicate, shard

    def describe_mesh(self) -> str:
        if self.replicate == 1:
            return f"FSDP2 over all {self.size} ranks"
        return (
            f"HSDP: {self.replicate} replicas (dp_replicate) x {self.shard} shards (dp_shard); "
            "gradients reduce-scattered within a replica group and all-reduced across them"
        )

    def token_share(self):
        """Several ranks: a :class:`qwen_cpt.data.tokenize.TokenShare` over a gloo group of
        its own (data exchange stays on the CPU, apart from the model's collectives)."""
        if not self.sharded or self.size == 1:
            return None
        from .data.tokenize import TokenShare

        return TokenShare.over(dist.new_group(backend="gloo"))

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    # --- collectives -----------------------------------------------------------------------------
    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64, so token counts stay exact)."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: list[float]) -> list[float]:
        """Element-wise maximum over ranks."""
        return self._reduce(values, dist.ReduceOp.MAX)

    def _reduce(self, values: list[float], op) -> list[float]:
        if not self.sharded:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce ``t`` (on the training device) in place, without a host sync."""
        if self.sharded:
            dist.all_reduce(t)
        return t

    def all_ok(self, ok: bool) -> bool:
        """True on every rank if ``ok`` was true on every rank."""
        return self._reduce([1.0 if ok else 0.0], dist.ReduceOp.MIN)[0] > 0

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
        if not self.sharded:
            return fn()
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

    # --- the model -------------------------------------------------------------------------------
    def load_model(self, load, build_skeleton, what: str, error_cls):
        """Sharded: rank 0 runs ``load()`` (the real weights, on the CPU), the others
        ``build_skeleton()`` (on meta); :meth:`parallelize` then gives every rank its shards.
        One process: ``load()``. A failure on any rank raises on all."""
        if not self.sharded:
            return load()
        model, error = None, None
        try:
            model = load() if self.is_main else build_skeleton()
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it, then raise
            error = exc
        self.raise_unless_all_ok(error, what, error_cls)
        return model

    def parallelize(self, model: torch.nn.Module, loss_fn, bf16_params: bool) -> LossModule:
        """The module the loop calls: ``LossModule(model, loss_fn)``, FSDP2-sharded when
        :attr:`sharded` (every rank's shards filled from rank 0's weights)."""
        root = LossModule(model, loss_fn)
        if not self.sharded:
            self._root = root
            return root
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        full = model.state_dict() if self.is_main else {}  # rank 0's weights, to broadcast
        if self.replicate > 1:  # ranks r*shard .. r*shard+shard-1 (one node's) share a copy
            mesh = init_device_mesh(
                self.device.type, (self.replicate, self.shard),
                mesh_dim_names=("dp_replicate", "dp_shard"),
            )  # fmt: skip
        else:
            mesh = init_device_mesh(self.device.type, (self.size,), mesh_dim_names=("dp_shard",))
        kwargs: dict = {"mesh": mesh}
        if bf16_params:
            kwargs["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32
            )
        if self.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=self.device.type == "cuda")
        for layer in decoder_layers(model):
            layer.float()
            fully_shard(layer, **kwargs)
        model.float()
        fully_shard(root, **kwargs)
        self._broadcast_weights(root, model, full)
        self._root = root
        return root

    def _broadcast_weights(self, root, model, full: dict) -> None:
        """Fill every rank's shards from rank 0's weights (the others built ``model`` on meta)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if any(p.device.type == "meta" for p in root.parameters()):
            root.to_empty(device="cpu" if self.cpu_offload else self.device)
            if self.cpu_offload:  # FSDP2 offloads parameters only: buffers stay on the device
                for module in root.modules():
                    for name, buffer in module._buffers.items():
                        if buffer is not None:
                            module._buffers[name] = buffer.to(self.device)
        set_model_state_dict(
            model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        )
        for buffer in root.buffers():  # not in the state dict: rotary inv_freq and the like
            dist.broadcast(buffer, src=0)

    def set_gradient_sync(self, sync: bool, all_reduce: bool = True) -> None:
        """Sharded: whether this backward reduce-scatters gradients (else they accumulate
        unsharded until a backward that does); under HSDP, whether it also all-reduces them
        across the replicas (else the reduce-scattered shards accumulate until the last
        micro-batch, so only one all-reduce per step crosses nodes). One process: nothing."""
        if self.sharded:
            self._root.set_requires_gradient_sync(sync)
            if sync and self.replicate > 1:
                self._root.set_requires_all_reduce(all_reduce)

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """``clip_grad_norm_`` over (possibly sharded) parameters: the global norm, a 0-d tensor
        on the device (read it when needed; reading syncs the host)."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def full_state_dict(self, model) -> dict[str, torch.Tensor]:
        """The unsharded weights (on rank 0's CPU when sharded; empty on the other ranks), a
        tied weight (Qwen2.5's embeddings and head) once."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            weights = get_model_state_dict(
                model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        else:
            weights = model.state_dict()
        from .checkpoint import without_tied

        return without_tied(model, weights)

    def this_ranks_part(self, micro: dict[str, torch.Tensor], per_rank: int) -> dict:
        """This rank's rows of a global micro-batch of ``size x per_rank`` rows."""
        lo = self.rank * per_rank
        return {k: v[lo : lo + per_rank] for k, v in micro.items()}

    def eval_share(self, items: list) -> list:
        """This rank's share of an evaluation set (every ``size``-th item)."""
        return items[self.rank :: self.size]


def mesh_shape(
    size: int, replicate: int | str, shard: int | str, per_node: int, fits_node=None
) -> tuple[int, int, str]:
    """``(dp_replicate, dp_shard, why)`` for ``size`` ranks from the config's two fields
    (ints or ``"auto"``); ``per_node``: torchrun's ``LOCAL_WORLD_SIZE``; ``fits_node(n)``:
    whether the model's training state fits sharded over ``n`` ranks (None: assume it does).
    Raises :class:`ValueError` naming the field when the numbers do not divide."""
    auto_r, auto_s = replicate == "auto", shard == "auto"
    if not auto_s and size % shard:
        raise ValueError(f"dp_shard: {shard} does not divide the {size} processes")
    if not auto_r and size % replicate:
        raise ValueError(f"dp_replicate: {replicate} does not divide the {size} processes")
    if not (auto_r or auto_s):
        if replicate * shard != size:
            raise ValueError(
                f"dp_replicate x dp_shard = {replicate} x {shard} = {replicate * shard}, but "
                f"there are {size} processes"
            )
        return replicate, shard, "config"
    if not auto_s:
        return size // shard, shard, "config"
    if not auto_r:
        return replicate, size // replicate, "config"
    if 1 < per_node < size and size % per_node == 0:
        if fits_node is None or fits_node(per_node):
            return size // per_node, per_node, (
                f"auto: {size // per_node} nodes of {per_node}; shard within a node, "
                "replicate across"
            )  # fmt: skip
        return 1, size, f"auto: the model does not fit sharded over one node's {per_node} ranks"
    return 1, size, "auto: one node"
