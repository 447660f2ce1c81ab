"""8-bit AdamW moments (``optimizer_states: 8bit``, bitsandbytes' AdamW8bit) against fp32 ones.

References: the fp32 run of the same model, data and steps for the loss curve; a straight run for
the resume (per-step losses ``==``); the tensors bitsandbytes really holds for "8-bit".
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


@pytest.mark.parametrize("muon", [False, True], ids=["adamw", "muon"])
def test_8bit_moments_track_fp32_and_resume_exactly(tiny64, tmp_path, muon):
    data = _write_data(tmp_path)
    kw = dict(STEPS, use_muon_optimizer=muon)
    fp32 = tmp_path / "fp32"
    CPTTrainer(_cfg(tiny64, fp32, data, **kw)).train()
    eight = tmp_path / "8bit"
    trainer = CPTTrainer(_cfg(tiny64, eight, data, optimizer_states="8bit", **kw))
    trainer.train()

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
    ref, got = _losses(fp32), _losses(eight)
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    assert got[1] == ref[1]
    worst = max(abs(got[s] - ref[s]) / ref[s] for s in ref)
    assert worst <= 1e-3, (worst, ref, got)
    assert got != ref  # a different optimizer ran
    evals, ref_evals = _eval_losses(eight), _eval_losses(fp32)
    assert evals[-1] < evals[0]  # held-out loss went down
    assert abs(evals[-1] - ref_evals[-1]) <= 1e-3 * ref_evals[-1]

    # resumed from checkpoint-4: the same losses as the straight 8-bit run, bit for bit
    resumed = tmp_path / "resumed"
    ckpt = eight / "checkpoint-4"
    CPTTrainer(
        _cfg(tiny64, resumed, data, optimizer_states="8bit", resume_from_checkpoint=str(ckpt), **kw)
    ).train()
    after = _losses(resumed)
    assert sorted(after) == [5, 6, 7, 8]
    assert [after[s] for s in after] == [got[s] for s in after]

    # resuming it with fp32 moments is refused before training, naming the field
    with pytest.raises(Exception, match="optimizer_states: the checkpoint has '8bit'"):
        CPTTrainer(
            _cfg(tiny64, tmp_path / "other", data, resume_from_checkpoint=str(ckpt), **kw)
        ).train()


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(optimizer_states="int4"), "optimizer_states: must be one of fp32, 8bit"),
        (
            dict(optimizer_states="8bit", fsdp_cpu_offload=True),
            "optimizer_states: 8bit does not run with fsdp_cpu_offload",
        ),
    ],
)
def test_bad_optimizer_states_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        CPTConfig(model_name_or_path="m", **fields)


def test_8bit_under_fsdp_or_without_bitsandbytes_is_one_line(monkeypatch):
    from qwen_cpt.distributed import World
    from qwen_cpt.lean import check_world

    cfg = CPTConfig(model_name_or_path="m", optimizer_states="8bit")
    with pytest.raises(ConfigError, match="optimizer_states: 8bit runs on one process only") as e:
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
