"""DistributedMuon: parity with ``torch.optim.Muon`` under torchrun (gloo, CPU) on 2 and 4
processes, 1-D and HSDP (2 x 2, 4 x 1) meshes, several bucket sizes; and the owner
assignment's balance and the bucket plan, without torchrun.

The worker is tests/dist_worker.py ``muon_parity``: 5 steps with a changing lr, parameters
within 1e-5 of torch's Muon and momentum buffers ``torch.equal``, on shapes whose rows do not
divide by the shard group, 1-row, tall and wide matrices.
"""

import random

import pytest

from qwen_cpt.muon import assign_owners, exchange_bytes, ns_flops, plan_buckets

from .test_distributed import WORKER, _result, _torchrun


def _check(out: dict, name: str, buckets_at_least: int) -> None:
    tiny, small, default = (out[f"{name}/{b}"] for b in (1, 4096, None))
    for run in (tiny, small, default):
        assert run["max_abs_diff"] <= 1e-5 and run["moved"] > 1e-3, (name, run)
    assert tiny["buckets"] >= buckets_at_least  # one matrix per owner per bucket: 14 matrices
    assert tiny["buckets"] > small["buckets"] > default["buckets"] == 1


def test_two_processes_match_torch_muon():
    out = _result(_torchrun([WORKER, "muon_parity", "1d"], 2))
    assert out["world"] == 2
    _check(out, "1d", 7)


def test_four_processes_1d_and_hsdp_match_torch_muon():
    out = _result(_torchrun([WORKER, "muon_parity", "1d", "2x2", "4x1"], 4))
    assert out["world"] == 4
    _check(out, "1d", 4)
    _check(out, "2x2", 7)  # the exchange runs within each replica group of 2
    only = out["4x1/None"]  # shard groups of one rank: Newton-Schulz locally, no exchange
    assert only["max_abs_diff"] <= 1e-5 and only["buckets"] == 0
    assert out["refused"] == ["(Shard(dim=0), Shard(dim=0))", "(Replicate(), Shard(dim=1))"]


def _layer(hidden: int, inter: int, kv: int) -> list[tuple[int, int]]:
    return [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden)] + [
        (inter, hidden),
        (inter, hidden),
        (hidden, inter),
    ]


def _loads(shapes, owners, world: int) -> list[int]:
    loads = [0] * world
    for s, o in zip(shapes, owners):
        loads[o] += ns_flops(s, 5)
    return loads


def test_ns_flops_counts_the_three_matmuls_of_a_step():
    assert ns_flops((3, 7), 1) == ns_flops((7, 3), 1) == 2 * 9 * 7 + 2 * 27 + 2 * 9 * 7
    assert ns_flops((64, 176), 5) == 5 * (4 * 64 * 64 * 176 + 2 * 64**3)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_owners_balance_newton_schulz_flops(world):
    # an embedding-sized matrix beside 3 Qwen2.5-0.5B-like layers, and 28 7B-like layers
    emb = [(151936 // 16, 896)] + _layer(896, 4864, 128) * 3
    seven_b = _layer(3584, 18944, 512) * 28
    for shapes in (emb, seven_b):
        owners = assign_owners(shapes, world)
        assert owners == assign_owners(list(shapes), world)  # deterministic, from shapes only
        loads = _loads(shapes, owners, world)
        mean, biggest = sum(loads) / world, max(ns_flops(s, 5) for s in shapes)
        assert max(loads) - min(loads) <= biggest  # greedy onto the least-loaded rank
        if biggest > mean:  # a rank to itself
            assert owners.count(owners[0]) == 1 and loads[owners[0]] == biggest
    # round-robin over groups of `world` matrices (the previous owners) vs the greedy ones
    shapes = emb
    rr = _loads(shapes, [i % world for i in range(len(shapes))], world)
    greedy = _loads(shapes, assign_owners(shapes, world), world)
    assert max(greedy) <= max(rr)
    if world == 4:
        mean = sum(greedy) / world
        assert max(greedy) / mean < 1.05 and max(rr) / mean > 1.4
    seven = _loads(seven_b, assign_owners(seven_b, world), world)
    assert max(seven) / (sum(seven) / world) < 1.001


def test_owners_stay_within_one_matrix_of_each_other_on_random_shapes():
    rng = random.Random(0)
    for _ in range(50):
        world = rng.choice([2, 3, 4, 8, 16])
        shapes = [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(rng.randint(1, 60))]
        loads = _loads(shapes, assign_owners(shapes, world), world)
        assert max(loads) - min(loads) <= max(ns_flops(s, 5) for s in shapes)


@pytest.mark.parametrize("bucket_bytes", [1, 4096, 1 << 20, 1 << 40])
def test_buckets_cover_each_matrix_once_within_the_size(bucket_bytes):
    shapes = tuple([(64, 176), (176, 64), (7, 5), (1, 8), (33, 33), (130, 3), (2, 100)] * 5)
    world = 4
    owners, buckets = plan_buckets(shapes, world, 5, bucket_bytes)
    assert owners == assign_owners(shapes, world)
    assert sorted(i for b in buckets for i in b) == list(range(len(shapes)))
    costs = [ns_flops(shapes[i], 5) for b in buckets for i in b]
    assert costs == sorted(costs, reverse=True)  # the largest first
    for b in buckets:
        for r in range(world):
            mine = [exchange_bytes(shapes[i], world) for i in b if owners[i] == r]
            assert len(mine) <= 1 or sum(mine) <= bucket_bytes
    if bucket_bytes == 1:
        assert all(len(b) <= world for b in buckets)
    if bucket_bytes == 1 << 40:
        assert len(buckets) == 1
    assert exchange_bytes((7, 5), 4) == 8 * 5 * 2  # rows padded to 4 * ceil(7 / 4)
