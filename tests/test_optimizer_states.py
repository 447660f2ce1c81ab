"""Lean optimizer states against fp32 ones: 8-bit AdamW moments (``optimizer_states: 8bit``,
bitsandbytes' AdamW8bit) and bf16 moments and Muon momentum (``optimizer_states: bf16``).

References: the fp32 run of the same model, data and steps for the loss curve; a straight run for
the resume (per-step losses ``==``); the tensors really held for "8-bit" and "bf16";
``torch.optim.AdamW`` and ``torch.optim.Muon`` for the bf16 optimizers' arithmetic.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from qwen_cpt import CPTConfig, CPTTrainer
from qwen_cpt.config import ConfigError
from qwen_cpt.planner import estimate_memory
from qwen_cpt.planner.shapes import ModelShape

from .test_resume import _cfg, _losses, _write_data

STEPS = dict(max_steps=8, save_steps=4)


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    """Hidden 64: its attention and MLP matrices (4,096 and 8,192 elements) reach
    bitsandbytes' 8-bit threshold, as the embedding does; hidden 32 would leave them fp32."""
    from qwen_cpt import make_tiny_model

    root = tmp_path_factory.mktemp("models")
    return str(
        make_tiny_model(
            root / "tiny-64", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            intermediate_size=128,
        )
    )  # fmt: skip


def _state_bytes(ckpt: Path) -> int:
    return sum(f.stat().st_size for f in (ckpt / "state").glob("*"))


def _eval_losses(out) -> list[float]:
    recs = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in recs if "eval_loss" in r]


def _follows_fp32_and_resumes(model, tmp_path, data, kw, states, fp32, lean):
    """The lean run's per-step losses are within 1e-3 (relative) of the fp32 run's, differ from
    them, and equal a resume's from checkpoint-4 bit for bit; held-out loss went down. Returns
    the resumed run's folder."""
    ref, got = _losses(fp32), _losses(lean)
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    assert got[1] == ref[1]  # the same weights at step 1
    worst = max(abs(got[s] - ref[s]) / ref[s] for s in ref)
    assert worst <= 1e-3, (worst, ref, got)
    assert got != ref  # a different optimizer ran
    evals, ref_evals = _eval_losses(lean), _eval_losses(fp32)
    assert evals[-1] < evals[0]  # held-out loss went down
    assert abs(evals[-1] - ref_evals[-1]) <= 1e-3 * ref_evals[-1]
    resumed = tmp_path / "resumed"
    ckpt = lean / "checkpoint-4"
    cfg = _cfg(
        model, resumed, data, optimizer_states=states, resume_from_checkpoint=str(ckpt), **kw
    )
    CPTTrainer(cfg).train()
    after = _losses(resumed)
    assert sorted(after) == [5, 6, 7, 8]
    assert [after[s] for s in after] == [got[s] for s in after]
    # resuming it with fp32 moments is refused before training, naming the field
    with pytest.raises(Exception, match=f"optimizer_states: the checkpoint has '{states}'"):
        CPTTrainer(
            _cfg(model, tmp_path / "other", data, resume_from_checkpoint=str(ckpt), **kw)
        ).train()
    return resumed


_FP32_RUNS: dict = {}  # (model, muon) -> the fp32 reference run, shared by the lean tests


def _fp32_and_lean(model, tmp_path, muon: bool, states: str):
    """``(data, fields, fp32 run, lean run)``: the same 8 steps with fp32 and ``states`` (the
    fp32 run is trained once per model and optimizer, for the 8-bit and bf16 tests alike)."""
    data = _write_data(tmp_path)
    kw = dict(STEPS, use_muon_optimizer=muon)
    fp32, lean = _FP32_RUNS.get((model, muon)), tmp_path / states
    if fp32 is None or not (fp32 / "checkpoint-4").is_dir():
        fp32 = tmp_path / "fp32"
        CPTTrainer(_cfg(model, fp32, data, **kw)).train()
        _FP32_RUNS[(model, muon)] = fp32
    CPTTrainer(_cfg(model, lean, data, optimizer_states=states, **kw)).train()
    return data, kw, fp32, lean


@pytest.mark.parametrize("muon", [False, True], ids=["adamw", "muon"])
def test_8bit_moments_track_fp32_and_resume_exactly(tiny64, tmp_path, muon):
    data, kw, fp32, eight = _fp32_and_lean(tiny64, tmp_path, muon, "8bit")

    # the moments really are 8-bit: the checkpoint's AdamW state holds uint8 codes, one byte
    # per element, for the embedding and (without Muon) the hidden matrices, beside fp32 scales
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(eight / "checkpoint-4" / "state")).read_metadata()
    codes = {
        k.split(".state.", 1)[1].split(".__bnb")[0]: v
        for k, v in meta.state_dict_metadata.items()
        if k.startswith("optimizer.adamw.") and k.endswith((".state1", ".state2"))
    }
    assert "model.embed_tokens.weight" in codes
    assert muon != ("model.layers.0.self_attn.q_proj.weight" in codes)  # Muon holds matrices
    for v in codes.values():  # bitsandbytes keeps fp32 moments under 4,096 elements
        assert v.properties.dtype == (torch.uint8 if v.size.numel() >= 4096 else torch.float32)
    assert meta.state_dict_metadata[
        "optimizer.adamw.state.model.embed_tokens.weight.__bnb_optimizer_quant_state__.state1"
    ].size == torch.Size([151936, 64])
    # and the checkpoint holds them so: under 35% of the fp32 run's optimizer state (2 bytes
    # plus block scales against 8 per element, the embedding being most of this model)
    assert _state_bytes(eight / "checkpoint-4") < 0.35 * _state_bytes(fp32 / "checkpoint-4")

    # the loss curve follows fp32's. Step 1 sees the same weights; after it the only
    # difference is the moments' quantization error (blockwise dynamic 8-bit codes, a relative
    # error of about 1% per element that averages out over a tensor). Measured here: at most
    # 1.3e-4 relative over 12 steps. The bound, 1e-3, is 8x that; a 10% error in the learning
    # rate or a missed bias correction moves these losses by more than 1e-2.
    # Resumed from checkpoint-4: the same losses as the straight 8-bit run, bit for bit.
    _follows_fp32_and_resumes(tiny64, tmp_path, data, kw, "8bit", fp32, eight)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(optimizer_states="int4"), "optimizer_states: must be one of fp32, bf16, 8bit"),
        (
            dict(optimizer_states="8bit", fsdp_cpu_offload=True),
            "optimizer_states: 8bit does not run with fsdp_cpu_offload",
        ),
    ],
)
def test_bad_optimizer_states_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        CPTConfig(model_name_or_path="m", **fields)


def _trained(make, shapes, steps=6, seed=1):
    """The parameters after ``steps`` steps of the optimizer ``make(groups)`` on fixed random
    gradients: a 2-D tensor with weight decay, a 1-D one without and at its own lr."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).requires_grad_(True) for s in shapes]
    groups = [{"params": params[:1], "weight_decay": 0.1}]
    if len(params) > 1:
        groups.append({"params": params[1:], "weight_decay": 0.0, "lr": 3e-3})
    opt = make(groups)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


def test_bf16_adamw_is_torchs_adamw_with_bf16_moments():
    from qwen_cpt.bf16_states import AdamWBF16

    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    shapes = [(37, 19), (5,)]
    ref, _ = _trained(lambda g: torch.optim.AdamW(g, foreach=False, **kw), shapes)
    # with fp32 states the arithmetic is torch's single-tensor AdamW's, bit for bit
    same, _ = _trained(lambda g: AdamWBF16(g, state_dtype=torch.float32, **kw), shapes)
    assert all(torch.equal(a, b) for a, b in zip(ref, same))
    # bf16 moments: both really bf16, and the weights within bf16's rounding of the update.
    # Each step moves a weight by at most lr (Adam's normalized step); the moments' relative
    # rounding error (2^-8 at most) changes m / sqrt(v) by about 2^-8, so after 6 steps the
    # weights differ by well under 6 * lr * 2^-7 = 5e-4. A lost bias correction or a wrong
    # beta moves them by > 1e-3.
    got, opt = _trained(lambda g: AdamWBF16(g, **kw), shapes)
    state = opt.state[got[0]]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    diff = max((a - b).abs().max().item() for a, b in zip(ref, got))
    assert 0 < diff < 5e-4, diff
    # the weights go on being fp32 (the master copy)
    assert all(p.dtype == torch.float32 for p in got)


def test_stochastic_rounding_keeps_small_updates_that_rounding_to_nearest_loses():
    """A second moment at 1.0 moving toward g^2 = 1.5 with beta2 = 0.999: each step adds 5e-4,
    under half bf16's spacing at 1.0 (2^-7 / 2 = 3.9e-3). Rounded to nearest it never moves;
    stochastically rounded it follows fp32 in the mean, element by element unbiased."""
    from qwen_cpt.bf16_states import stochastic_round_

    n, beta2, steps = 20_000, 0.999, 300
    exact = torch.ones(n)
    nearest = torch.ones(n, dtype=torch.bfloat16)
    sr = torch.ones(n, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        exact.mul_(beta2).add_(1.5 * (1 - beta2))
        nearest = (nearest.float() * beta2 + 1.5 * (1 - beta2)).bfloat16()
        stochastic_round_(sr, sr.float() * beta2 + 1.5 * (1 - beta2), gen)
    target = exact[0].item()  # 1.5 - 0.5 * 0.999^300 = 1.130
    assert torch.all(nearest == 1.0)
    # per element the rounding error is a martingale of at most one spacing per step, so the
    # mean of 20,000 elements is within a few 1e-4 of exact; the bound is 3e-3
    assert abs(sr.float().mean().item() - target) < 3e-3, (sr.float().mean(), target)
    # exact values stay exact, signs and non-finite values are kept
    src = torch.tensor([1.0, -2.5, 0.0, float("inf"), float("-inf"), 3.0e38])
    out = torch.empty(6, dtype=torch.bfloat16)
    stochastic_round_(out, src, gen)
    assert out[:5].tolist() == [1.0, -2.5, 0.0, float("inf"), float("-inf")]
    assert torch.isnan(_rounded(float("nan")))
    # negative values round away from zero as often as positive ones round up
    pos = _rounded(1 + 2**-9, n=20_000).float().mean() - 1
    neg = -(_rounded(-(1 + 2**-9), n=20_000).float().mean() + 1)
    assert abs(pos - 2**-9) < 4e-4 and abs(neg - 2**-9) < 4e-4, (pos, neg)


def _rounded(value: float, n: int = 1) -> torch.Tensor:
    from qwen_cpt.bf16_states import stochastic_round_

    out = torch.empty(n, dtype=torch.bfloat16)
    stochastic_round_(out, torch.full((n,), value), torch.Generator().manual_seed(n))
    return out


def test_muon_with_bf16_momentum_against_torch_muon():
    from qwen_cpt.muon import DistributedMuon

    kw = dict(
        lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw"
    )
    shapes = [(16, 24), (32, 8)]

    def muon(make):
        return _trained(lambda groups: make([p for g in groups for p in g["params"]]), shapes)

    ref, _ = muon(lambda ps: torch.optim.Muon(ps, **kw))
    same, _ = muon(lambda ps: DistributedMuon(ps, **kw))  # fp32 momentum, one process
    assert all(torch.equal(a, b) for a, b in zip(ref, same))
    got, opt = muon(lambda ps: DistributedMuon(ps, momentum_dtype=torch.bfloat16, **kw))
    assert opt.state[got[0]]["momentum_buffer"].dtype == torch.bfloat16
    # Newton-Schulz already starts from a bf16 copy of the update, so the momentum's rounding
    # adds an error of the same order: measured 4e-4 over 6 steps of lr 0.02 (adjusted to
    # 0.02 * 0.2 * sqrt(32) = 0.023 per step); bound 2e-3, a tenth of one step
    diff = max((a - b).abs().max().item() for a, b in zip(ref, got))
    assert 0 < diff < 2e-3, diff


@pytest.mark.parametrize("muon", [False, True], ids=["adamw", "muon"])
def test_bf16_states_track_fp32_and_resume_exactly(tiny64, tmp_path, muon):
    from torch.distributed.checkpoint import FileSystemReader

    data, kw, fp32, half = _fp32_and_lean(tiny64, tmp_path, muon, "bf16")

    # the checkpoint holds bf16 moments (and Muon's bf16 momentum): half the fp32 state
    def held(ckpt):
        meta = FileSystemReader(str(ckpt / "state")).read_metadata()
        return {
            k: v.properties.dtype
            for k, v in meta.state_dict_metadata.items()
            if k.endswith((".exp_avg", ".exp_avg_sq", ".momentum_buffer"))
        }

    states = held(half / "checkpoint-4")
    assert states and set(states.values()) == {torch.bfloat16}, states
    assert any(k.endswith(".momentum_buffer") for k in states) == muon
    ratio = _state_bytes(half / "checkpoint-4") / _state_bytes(fp32 / "checkpoint-4")
    assert 0.45 < ratio < 0.55, ratio

    # the loss curve follows fp32's: step 1 sees the same weights, and after it the moments
    # differ by bf16's unbiased rounding (2^-9 relative on average). Measured here: at most
    # 2.6e-5 (AdamW) and 2.4e-5 (Muon) relative over 8 steps; the bound is 1e-3 (a 10% error
    # in the learning rate or a missed bias correction moves these losses by more than 1e-2).
    # (the rounding noise is seeded by the step, so a resume repeats it)
    resumed = _follows_fp32_and_resumes(tiny64, tmp_path, data, kw, "bf16", fp32, half)
    # and they stayed bf16 through the load (torch's load_state_dict casts states to fp32)
    assert set(held(resumed / "checkpoint-8").values()) == {torch.bfloat16}


def test_8bit_under_fsdp_or_without_bitsandbytes_is_one_line(monkeypatch):
    from qwen_cpt.distributed import World
    from qwen_cpt.lean import check_world

    for states in ("bf16", "8bit"):
        cfg = CPTConfig(model_name_or_path="m", optimizer_states=states)
        with pytest.raises(ConfigError, match=f"{states} runs on one process only") as e:
            check_world(cfg, World(rank=0, size=2, sharded=True))
        assert "\n" not in e.value.errors[0]
    check_world(cfg, World())  # one process, bitsandbytes installed: fine
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"8bit needs bitsandbytes .*qwen-cpt\[lean\]") as e:
        check_world(cfg, World())
    assert "\n" not in e.value.errors[0]


QWEN_7B = ModelShape(
    model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
    num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, tie_word_embeddings=False,
)  # fmt: skip


def test_planner_counts_8bit_moments():
    kw = dict(micro_batch=1, seq_len=2048, device="cuda")
    fp32 = estimate_memory(QWEN_7B, **kw)
    eight = estimate_memory(QWEN_7B, optimizer_states="8bit", **kw)
    from qwen_cpt.planner.shapes import count_params

    p = count_params(QWEN_7B)
    vectors = p.total - p.matrices - p.embedding - p.lm_head
    # 2 uint8 moments + 2 fp32 scales per 256 elements on every 2-D tensor; fp32 on vectors
    assert eight.components["optimizer"] == pytest.approx(
        (2 + 8 / 256) * (p.total - vectors) + 8 * vectors
    )
    assert fp32.components["optimizer"] / eight.components["optimizer"] > 3.9
    assert eight.components["optimizer_step_temp"] == 0  # one fused kernel on CUDA
    for key in ("weights", "grads", "activations", "logits"):
        assert eight.components[key] == fp32.components[key], key
    # on CPU the step dequantizes the largest tensor's moments: 20 B per element (measured)
    cpu = estimate_memory(QWEN_7B, optimizer_states="8bit", micro_batch=1, seq_len=64, device="cpu")
    assert cpu.components["optimizer_step_temp"] == 20.0 * max(p.embedding, p.lm_head)


def test_planner_counts_bf16_states():
    from qwen_cpt.planner.shapes import count_params

    p = count_params(QWEN_7B)
    kw = dict(micro_batch=1, seq_len=2048, device="cuda")
    for optimizer, fp32_bytes, bf16_bytes in (
        ("adamw", 8.0 * p.total, 4.0 * p.total),
        # Muon: one momentum on the hidden matrices, AdamW's two moments on the rest
        ("muon", 4.0 * p.matrices + 8.0 * p.adamw_only, 2.0 * p.matrices + 4.0 * p.adamw_only),
    ):
        fp32 = estimate_memory(QWEN_7B, optimizer=optimizer, **kw)
        half = estimate_memory(QWEN_7B, optimizer=optimizer, optimizer_states="bf16", **kw)
        assert fp32.components["optimizer"] == pytest.approx(fp32_bytes)
        assert half.components["optimizer"] == pytest.approx(bf16_bytes)
        for key in ("weights", "grads", "activations", "logits"):
            assert half.components[key] == fp32.components[key], key
    # the step reads one 4M-element slice into fp32 at a time: 24 B per slice element
    adamw = estimate_memory(QWEN_7B, optimizer_states="bf16", **kw)
    assert adamw.components["optimizer_step_temp"] == 24.0 * 2**22


def test_muon_on_a_model_not_trained_with_muon_says_what_was_measured(tiny_qwen, tmp_path, caplog):
    import logging
    import shutil

    from transformers import AutoModelForCausalLM

    from qwen_cpt.optim import MUON_ON_ADAMW_MODEL, build_optimizers

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    muon_run = tmp_path / "final"  # a qwen-cpt output whose run used Muon
    shutil.copytree(tiny_qwen, muon_run)
    (muon_run / "config.yaml").write_text("use_muon_optimizer: true\n")
    for path, said in ((tiny_qwen, True), (muon_run, False)):
        cfg = CPTConfig(model_name_or_path=str(path), use_muon_optimizer=True)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="qwen_cpt"):
            build_optimizers(model, cfg)
        assert (MUON_ON_ADAMW_MODEL in caplog.messages) == said, (path, caplog.messages)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qwen_cpt"):
        build_optimizers(model, CPTConfig(model_name_or_path=tiny_qwen))  # AdamW: nothing said
    assert MUON_ON_ADAMW_MODEL not in caplog.messages
