"""Process-group set-up that survives torchrun's restarts: :func:`init_process_group`.

Under ``torchrun --max-restarts=N`` a rank that crashes makes torchrun stop the other ranks and
start the whole group again (``TORCHELASTIC_RESTART_COUNT`` counts the restarts). The new
workers meet in torchrun's own TCP store, and that store is the same server in every round: the
c10d rendezvous keeps the store it shares with the workers from its first round on
(``DynamicRendezvousHandler.next_rendezvous`` in
``torch/distributed/elastic/rendezvous/dynamic_rendezvous.py``, torch 2.13: ``_bootstrap_store_info``
and ``_shared_tcp_store_server`` are built once), while ``env://`` connects to it without any
prefix of its own (``_create_c10d_store`` in ``torch/distributed/rendezvous.py``: "We create a new
TCPStore for every retry so no need to add prefix for each attempt", no longer true). So the
keys of the last round are still there: gloo's ``connectFullMesh`` reads each peer's address
from key ``default_pg/0//cpu//0/<rank>``, and a restarted rank that reads it before its peer
has written the new one connects to the dead process of the last round: ``Connection refused``,
or a rank that waits for a peer which never connects, until the whole timeout. NCCL's unique
id goes through the same store (pytorch/pytorch#135712, where ``TORCHELASTIC_RESTART_COUNT`` was
found not to be a usable round key across nodes: each node's agent counts its own restarts, and
a membership change restarts without counting).

So the group gets a namespace of its own in that store for every start: rank 0 draws a new
generation number (an atomic counter in the store) and publishes it; every other rank proves it
joined that generation, not a stale one, by a nonce of its own that rank 0 echoes back. The
process group is then built on ``PrefixStore("qwen_cpt/<generation>/pg", store)``, whose keys no
earlier round wrote. Every wait of this set-up is bounded by :func:`setup_timeout` (a few
minutes, not ``distributed_timeout_minutes``, which also covers checkpoint saves); a set-up that
cannot connect fails with one error naming this rank, the world size and the store's address.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from datetime import timedelta

import torch.distributed as dist

from .muon import DistributedError

log = logging.getLogger("qwen_cpt")

__all__ = [
    "check_restart", "describe_restarts", "generation", "init_process_group", "max_restarts",
    "restart_count", "setup_timeout",
]  # fmt: skip

SETUP_TIMEOUT_S = 300.0  # the most the set-up waits for the store and the other ranks
_GENERATION: int | None = None  # this start's generation in torchrun's store, once joined


def generation() -> int | None:
    """This start's generation (unique per start of the group within a torchrun job, growing
    with every restart), or None before a group joined one (or without torchrun)."""
    return _GENERATION


PREFIX = "qwen_cpt"
_POLL_S = 0.2


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def restart_count() -> int:
    """How many times torchrun restarted this node's worker group (0 outside torchrun)."""
    return _int_env("TORCHELASTIC_RESTART_COUNT") or 0


def max_restarts() -> int:
    """torchrun's ``--max-restarts`` (0 outside torchrun)."""
    return _int_env("TORCHELASTIC_MAX_RESTARTS") or 0


def describe_restarts() -> str:
    """``", restart 1 of at most 3"`` under torchrun with ``--max-restarts``, else ``""``."""
    if max_restarts() <= 0:
        return ""
    return f", restart {restart_count()} of at most {max_restarts()}"


def check_restart(resume_from_checkpoint: str | None) -> None:
    """On a torchrun restart: warn (rank 0) how the run continues; refuse, on every rank, a
    config that would start the run over (``resume_from_checkpoint`` unset)."""
    n = restart_count()
    if n == 0:
        return
    what = f"torchrun restarted the group (restart {n} of at most {max_restarts()})"
    if resume_from_checkpoint is None:
        from .resume import ResumeError

        raise ResumeError(
            f"{what}, but resume_from_checkpoint is not set, so this start would train from "
            "step 0 again over the crashed run's output_dir; set resume_from_checkpoint: auto "
            "so that a restart resumes from the newest valid checkpoint"
        )
    if os.environ.get("RANK", "0") != "0":
        return
    if resume_from_checkpoint == "auto":
        log.warning("%s: resuming from the newest valid checkpoint", what)
    else:
        log.warning(
            "%s: resuming from %s again, as resume_from_checkpoint says, not from a newer "
            "checkpoint of the crashed run; set resume_from_checkpoint: auto to continue from "
            "the newest valid one",
            what,
            resume_from_checkpoint,
        )


def setup_timeout(timeout: timedelta) -> float:
    """Seconds the set-up may wait: ``SETUP_TIMEOUT_S``, or the collective timeout if shorter."""
    return min(SETUP_TIMEOUT_S, timeout.total_seconds())


def init_process_group(
    backend: str,
    timeout: timedelta,
    world: int,
    rank: int,
    setup_timeout_s: float | None = None,
) -> None:
    """The default process group for ``world`` ranks (``rank`` is this one), with collectives
    that time out after ``timeout``. ``world <= 1`` without ``MASTER_ADDR``: a private
    one-process group (``fsdp_cpu_offload`` on one plain process). Otherwise the group meets
    in the launcher's store (``MASTER_ADDR:MASTER_PORT``), in a namespace fresh for this start
    (see the module docstring); set-up waits at most ``setup_timeout_s``."""
    if world <= 1 and "MASTER_ADDR" not in os.environ:
        # One plain process, sharded only for FSDP2's CPU offload: a private group. Under
        # torchrun (even one rank) the group joins the launcher's store instead: with
        # TORCHELASTIC_USE_AGENT_STORE set, a tcp:// init only connects as a client, to a
        # port nobody serves, and waits out the timeout (docs/design.md, "Process groups").
        init = f"tcp://127.0.0.1:{_free_port()}"
        dist.init_process_group(backend, init_method=init, rank=0, world_size=1, timeout=timeout)
        return
    world = max(world, 1)
    limit = setup_timeout(timeout) if setup_timeout_s is None else setup_timeout_s
    where = _store_address()
    me = f"rank {rank} of {world}"
    deadline = time.monotonic() + limit  # for the whole set-up: store, generation, group
    store = _connect(where, rank, world, limit, me)
    global _GENERATION
    generation = _join_generation(store, rank, world, deadline, me, where, limit)
    _GENERATION = generation
    store.set_timeout(timeout)  # what torch's own rendezvous gives the group's store
    pg_store = dist.PrefixStore(f"{PREFIX}/{generation}/pg", store)
    bounded = timedelta(seconds=max(1.0, deadline - time.monotonic()))
    try:
        # the set-up bound first (gloo connects here); the collective timeout once connected
        dist.init_process_group(
            backend, store=pg_store, rank=rank, world_size=world, timeout=bounded
        )
    except Exception as exc:  # noqa: BLE001 - one clear error in place of the backend's
        raise DistributedError(
            f"{me}: the {backend} process group did not connect within {limit:.0f} s "
            f"(store at {where}, generation {generation}): {_first_line(exc)}"
        ) from exc
    try:
        dist.distributed_c10d._set_pg_timeout(timeout)
    except (AttributeError, ValueError, RuntimeError) as exc:  # a torch without it: keep it
        log.warning("could not set the process group's timeout to %s: %s", timeout, exc)
    log.debug("%s joined generation %d of the store at %s", me, generation, where)


def _store_address() -> str:
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        missing = " and ".join(
            v for v, x in (("MASTER_ADDR", addr), ("MASTER_PORT", port)) if not x
        )
        raise DistributedError(
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but {missing} is not set; launch with "
            "torchrun (or set MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE)"
        )
    return f"{addr}:{port}"


def _connect(where: str, rank: int, world: int, limit: float, me: str) -> dist.Store:
    """A client of the launcher's store; or, without torchrun's agent store, rank 0 hosts it."""
    host, port = where.rsplit(":", 1)
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    try:
        return dist.TCPStore(
            host, int(port), world, is_master=not agent and rank == 0,
            timeout=timedelta(seconds=limit), wait_for_workers=False, multi_tenant=True,
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - DistNetworkError, DistStoreError, ...
        raise DistributedError(
            f"{me}: could not reach the process group's store at {where} within {limit:.0f} s: "
            f"{_first_line(exc)}"
        ) from exc


def _join_generation(
    store: dist.Store, rank: int, world: int, deadline: float, me: str, where: str, limit: float
) -> int:
    """The generation every rank of this start agrees on; keys under it are new."""
    current = f"{PREFIX}/current"
    if rank == 0:
        generation = store.add(f"{PREFIX}/generation", 1)  # unique: an atomic counter
        store.set(current, str(generation))
        for r in range(1, world):
            hello = f"{PREFIX}/{generation}/hello/{r}"
            if not _wait(store, hello, deadline):
                missing = [
                    q for q in range(r, world)
                    if not store.check([f"{PREFIX}/{generation}/hello/{q}"])
                ]  # fmt: skip
                raise DistributedError(
                    f"{me}: rank(s) {_ranks(missing)} did not join the process group within "
                    f"{limit:.0f} s (store at {where}); see their logs"
                )
            store.set(f"{PREFIX}/{generation}/welcome/{r}", store.get(hello))
        return generation
    nonce = uuid.uuid4().hex.encode()
    said_hello = None
    while True:
        if not _wait(store, current, deadline, step=None):
            break
        generation = int(store.get(current))
        if generation != said_hello:  # a new generation (or the first read)
            store.set(f"{PREFIX}/{generation}/hello/{rank}", nonce)
            said_hello = generation
        welcome = f"{PREFIX}/{generation}/welcome/{rank}"
        if _wait(store, welcome, deadline, step=1.0) and store.get(welcome) == nonce:
            return generation
        # no answer yet, or one to an earlier start's rank: read the generation again
        if time.monotonic() >= deadline:
            break
        time.sleep(_POLL_S)
    raise DistributedError(
        f"{me}: rank 0 did not open the process group within {limit:.0f} s (store at {where}); "
        "see rank 0's log"
    )


def _wait(store: dist.Store, key: str, deadline: float, step: float | None = None) -> bool:
    """Wait until ``key`` exists, at most until ``deadline`` (or ``step`` seconds): exists?"""
    left = deadline - time.monotonic()
    if step is not None:
        left = min(left, step)
    if store.check([key]):
        return True
    if left <= 0:
        return False
    try:
        store.wait([key], timedelta(seconds=left))
    except Exception:  # noqa: BLE001 - DistStoreError: timed out
        return store.check([key])
    return True


def _ranks(ranks: list[int]) -> str:
    if len(ranks) > 8:
        return ", ".join(map(str, ranks[:8])) + f" and {len(ranks) - 8} more"
    return ", ".join(map(str, ranks))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
