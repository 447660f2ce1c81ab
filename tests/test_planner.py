"""The CPT planner: parameter counts, FLOPs, lr/batch rules, memory, `qwen-cpt plan`, auto values.

Expected numbers are computed by hand in the comments, not by calling the code under test.
"""

from __future__ import annotations

import json
import math

import pytest

from qwen_cpt.cli import build_parser, main
from qwen_cpt.config import ConfigError, CPTConfig
from qwen_cpt.planner import (
    QWEN25_SHAPES,
    GiB,
    ModelShape,
    PlannerError,
    batch_deepseek,
    batch_spec,
    batch_step_law,
    batch_step_law_for_steps,
    count_params,
    estimate_memory,
    estimate_seconds,
    flops_per_token,
    load_shape,
    lookup_gpu,
    lookup_shape,
    lr_deepseek,
    lr_spec,
    lr_step_law,
    max_micro_batch,
    recommend_lr,
    resolve_auto,
    split_batch,
)

# h 64, I 176, 2 layers, 4 heads (d 16), 2 kv heads, vocab 1000, tied, q/k/v biases (Qwen2)
SMALL = ModelShape(
    hidden_size=64,
    intermediate_size=176,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    vocab_size=1000,
    tie_word_embeddings=True,
    head_dim=16,
    qkv_bias=True,
)
# per layer: q 64*64 + k,v 2*64*32 + o 64*64 = 12288 weights, biases 64+32+32 = 128,
# MLP 3*64*176 = 33792, two norms 128  -> 46336; x2 + final norm 64 = 92736 non-embedding
SMALL_NON_EMB = 92736
SMALL_TOTAL = 92736 + 1000 * 64  # tied: the embedding counted once


def _qwen2_config_dict(shape: ModelShape) -> dict:
    return {
        "model_type": "qwen2",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "vocab_size": shape.vocab_size,
        "tie_word_embeddings": shape.tie_word_embeddings,
    }


# --- parameter counts ------------------------------------------------------------------------------


def test_qwen25_7b_counts_match_the_published_figures():
    p = count_params(QWEN25_SHAPES["Qwen/Qwen2.5-7B"])
    assert p.total == pytest.approx(7.62e9, rel=0.01)
    assert p.non_embedding == pytest.approx(6.53e9, rel=0.01)


@pytest.mark.parametrize(
    "hub_id, total, non_emb",  # Qwen2.5 technical report, Table 1 / model cards
    [
        ("Qwen/Qwen2.5-0.5B", 0.49e9, 0.36e9),
        ("Qwen/Qwen2.5-1.5B", 1.54e9, 1.31e9),
        ("Qwen/Qwen2.5-3B", 3.09e9, 2.77e9),
        ("Qwen/Qwen2.5-14B", 14.7e9, 13.1e9),
        ("Qwen/Qwen2.5-32B", 32.5e9, 31.0e9),
        ("Qwen/Qwen2.5-72B", 72.7e9, 70.0e9),
    ],
)
def test_every_qwen25_size_is_within_one_percent_of_its_report(hub_id, total, non_emb):
    p = count_params(QWEN25_SHAPES[hub_id])
    assert p.total == pytest.approx(total, rel=0.01)
    assert p.non_embedding == pytest.approx(non_emb, rel=0.01)


def test_small_shape_counts_by_hand():
    p = count_params(SMALL)
    assert p.non_embedding == SMALL_NON_EMB
    assert p.total == SMALL_TOTAL
    assert p.lm_head == 0
    assert p.matrices == 2 * (12288 + 33792)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_counts_from_hf_config_equal_the_real_module(arch):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from qwen_cpt.model import count_parameters

    kw = dict(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    )
    config = (
        Qwen2Config(tie_word_embeddings=True, **kw)
        if arch == "qwen2"
        else LlamaConfig(tie_word_embeddings=False, **kw)
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for source in (config, config.to_dict()):  # a PretrainedConfig or a config.json mapping
        p = count_params(ModelShape.from_config(source))
        assert (p.total, p.non_embedding) == count_parameters(model)


def test_shape_from_config_matches_the_builtin_table():
    shape = QWEN25_SHAPES["Qwen/Qwen2.5-7B"]
    assert ModelShape.from_config(_qwen2_config_dict(shape)) == shape


def test_shape_rejects_moe_and_incomplete_configs():
    with pytest.raises(PlannerError, match="mixture-of-experts"):
        ModelShape.from_config({**_qwen2_config_dict(SMALL), "num_experts": 8})
    bad = _qwen2_config_dict(SMALL)
    del bad["intermediate_size"]
    with pytest.raises(PlannerError, match="intermediate_size"):
        ModelShape.from_config(bad)


def test_lookup_accepts_instruct_and_short_ids():
    shape = QWEN25_SHAPES["Qwen/Qwen2.5-7B"]
    assert lookup_shape("Qwen/Qwen2.5-7B-Instruct") == shape
    assert lookup_shape("qwen2.5-7b") == shape
    assert lookup_shape("meta-llama/Llama-3-8B") is None
    with pytest.raises(PlannerError, match="model_name_or_path: 'org/unknown'"):
        load_shape("org/unknown")


def test_load_shape_reads_a_local_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_qwen2_config_dict(SMALL)))
    shape, source = load_shape(str(tmp_path))
    assert shape == SMALL
    assert source.endswith("config.json")


# --- FLOPs and time --------------------------------------------------------------------------------


def test_flops_per_token_small_by_hand():
    # N_matmul = 92736 non-embedding + 1000*64 head = 156736 -> 6N = 940416;
    # attention 6 * L 2 * H 4 * (16 + 16) * S 128 = 196608
    assert flops_per_token(SMALL, 128) == 940416 + 196608


def test_flops_per_token_gives_reference_throughput_targets():
    # On one H200 at 50% of 790 TFLOP/s, 7B at 4k -> 8.3k tok/s, 0.5B -> 98k
    # (docs/design.md, "Throughput anchors and MFU")
    achieved = 0.5 * 790e12
    assert achieved / flops_per_token(QWEN25_SHAPES["Qwen/Qwen2.5-7B"], 4096) == pytest.approx(
        8.3e3, rel=0.01
    )
    assert achieved / flops_per_token(QWEN25_SHAPES["Qwen/Qwen2.5-0.5B"], 4096) == pytest.approx(
        98e3, rel=0.01
    )


def test_estimate_seconds_by_hand():
    # 1e9 tokens * 4.736e10 FLOP / (8 * 989e12 * 0.4) = 14964.6 s
    assert estimate_seconds(1e9, 4.736e10, 8, 989.0, 0.4) == pytest.approx(14964.6, rel=1e-4)
    with pytest.raises(PlannerError, match="mfu"):
        estimate_seconds(1e9, 4.736e10, 8, 989.0, 1.5)


def test_gpu_table_lookup():
    assert lookup_gpu("h100").peak_tflops == 989.0
    assert lookup_gpu("RTX 4090").peak_tflops == 165.0
    assert lookup_gpu("A100").peak_tflops == 312.0
    with pytest.raises(PlannerError, match="--gpu: unknown GPU 'V100'"):
        lookup_gpu("V100")


# --- learning rate and batch -----------------------------------------------------------------------


def test_spec_lr_rule():
    assert lr_spec(7e9) == pytest.approx(5e-5, rel=1e-12)
    assert lr_spec(14e9) == pytest.approx(
        5e-5 * 2**-0.25, rel=1e-12
    )  # 4.2e-5, not the table's 3e-5


def test_step_law_values():
    # 1.79 * 6.53e9^-0.713 * 1e10^0.307 = 2.1126e-4 ; 0.58 * 1e10^0.571 = 297459.6 tokens
    assert lr_step_law(6.53e9, 1e10) == pytest.approx(2.1126e-4, rel=1e-4)
    assert batch_step_law(1e10) == pytest.approx(297459.6, rel=1e-6)


def test_deepseek_and_spec_batch_values():
    # 0.3118 * 1e20^-0.125 = 9.86e-4 ; 0.2920 * 1e20^0.3271 = 1.0171e6 ; (7e9 * 1e10)^0.4
    assert lr_deepseek(1e20) == pytest.approx(9.86e-4, rel=1e-3)
    assert batch_deepseek(1e20) == pytest.approx(1.0171e6, rel=1e-4)
    assert batch_spec(7e9, 1e10) == pytest.approx((7e19) ** 0.4)


def test_recommended_lr_is_spec_capped_by_step_law():
    n_total, n_non_emb = 7.62e9, 6.53e9
    lr, rule = recommend_lr(n_total, n_non_emb, 1e10)
    assert lr == lr_spec(n_total) and rule.startswith("spec")
    # with 1e5 tokens Step Law gives 2.1126e-4 * 1e-5^0.307 = 6.2e-6, below the spec rule
    lr, rule = recommend_lr(n_total, n_non_emb, 1e5)
    assert lr == pytest.approx(6.16e-6, rel=0.01) and rule.startswith("Step Law")


def test_rules_reject_non_positive_inputs():
    with pytest.raises(PlannerError, match="tokens: must be a positive number, got 0"):
        lr_step_law(1e9, 0)


def test_batch_for_fixed_steps_is_step_laws_fixed_point():
    b = batch_step_law_for_steps(1000)
    assert batch_step_law(1000 * b) == pytest.approx(b, rel=1e-9)


def test_split_batch():
    # 65536 tokens / 2048 / 2 devices = 16 sequences each
    assert split_batch(65536, 2048, 2, 4) == (4, 4)
    assert split_batch(65536, 2048, 2, 5) == (4, 4)  # 5 x 4 would overshoot: evened to 4 x 4
    assert split_batch(10 * 2048, 2048, 1, 8) == (5, 2)
    assert split_batch(100, 2048, 4, 8) == (1, 1)  # at least one sequence per device


def test_max_micro_batch_bisects():
    assert max_micro_batch(lambda m: m <= 7, 64) == 7
    assert max_micro_batch(lambda m: False, 64) == 1


# --- memory ----------------------------------------------------------------------------------------


def test_memory_components_small_cpu_fp32_by_hand():
    est = estimate_memory(
        SMALL,
        micro_batch=8,
        seq_len=8,
        optimizer="adamw",
        adamw_impl="single",
        checkpointing="none",
        bf16=False,
        chunked_loss=False,
        device="cpu",
    )
    c = est.components
    assert c["weights"] == 4 * SMALL_TOTAL == 626944
    assert c["grads"] == 626944
    assert c["optimizer"] == 8 * SMALL_TOTAL == 1253888
    assert c["optimizer_step_temp"] == 8 * 64000  # two buffers of the embedding, the largest
    # fp32 on CPU: SDPA gets the packed block-causal mask. Per token and layer: each norm
    # (4+4+4)*64 = 768; q, k and v expanded to 4 heads, output: 4*(64+64+64+64) = 1024, lse 4*4,
    # the mask saved per layer 4*8 -> 1072; MLP 4*4*176 = 2816 -> 2*768 + 1072 + 2816 = 5424;
    # x2 layers + final norm 768 + the bool mask 8 = 11624 per token, x 64 tokens
    assert c["activations"] == 11624 * 64
    assert c["logits"] == 12 * 1000 * 64
    assert c["weight_copies"] == 0 and c["overhead"] == 0 and c["loss_workspace"] == 0
    assert c["embedding_grad"] == 4 * 1000 * 64  # the tied head's gradient waits for it
    # one micro-batch per step: weights + optimizer + max(acts + logits, grads + step temp)
    assert est.peak == 626944 + 1253888 + max(743936 + 768000, 626944 + 512000)
    accum = estimate_memory(
        SMALL,
        micro_batch=8,
        seq_len=8,
        gradient_accumulation_steps=4,
        adamw_impl="single",
        checkpointing="none",
        bf16=False,
        chunked_loss=False,
        device="cpu",
    )
    assert accum.peak == 626944 * 2 + 1253888 + 743936 + 768000  # grads held through forward
    assert accum.components["embedding_grad"] == 2 * 4 * 1000 * 64  # + the new one beside .grad


def test_memory_components_small_cuda_bf16_muon_by_hand():
    est = estimate_memory(
        SMALL,
        micro_batch=2,
        seq_len=8,
        optimizer="muon",
        checkpointing="full",
        bf16=True,
        chunked_loss=True,
        loss_chunk_size=4,
        device="cuda",
    )
    c = est.components
    # Muon: 4 B on the 92160 hidden-matrix params, 8 B on the other 64576
    assert c["optimizer"] == 4 * 92160 + 8 * 64576
    # fused AdamW has no temporaries; Newton-Schulz ~10 B x the largest matrix (64 x 176)
    assert c["optimizer_step_temp"] == 10 * 64 * 176
    assert c["weight_copies"] == 2 * (92160 + 64000)  # bf16 copies of matrices and the head
    # bf16, flash-attn (no mask, native GQA): norm 2*4*64 + 2*64 = 640; full checkpointing keeps
    # 4*64 per layer, recomputes one layer (2*640 + 2*(64+32+32+64) + 16 + 4*2*176 = 3088) and
    # the final norm 640
    assert c["activations"] == (2 * 4 * 64 + 3088 + 640) * 16
    # fused loss in bf16: (4 + 2) B x vocab x (chunk of 4 tokens + hidden 64 for the head's grad)
    assert c["logits"] == 6 * 1000 * (4 + 64)
    assert c["overhead"] == 1 * GiB


def test_fused_loss_and_adamw_variants_on_cpu():
    est = estimate_memory(
        SMALL,
        micro_batch=2,
        seq_len=8,
        bf16=False,
        chunked_loss=True,
        loss_chunk_size=4,
        device="cpu",
        adamw_impl="foreach",
    )
    c = est.components
    # the fp32 chunk buffer, 4 x 1000 x 4 tokens, stays allocated between steps on a CPU
    assert c["loss_workspace"] == 4 * 1000 * 4
    assert c["logits"] == 4 * 1000 * 64  # the head's fp32 gradient, held into backward
    assert c["optimizer_step_temp"] == 4 * SMALL_TOTAL  # foreach: one buffer for the group
    assert "loss_workspace" in est.formula
    # with accumulation, after backward: the tied head's and the embedding's gradients beside
    # .grad (2 x 4 x 1000 x 64) outweigh the transients (activations + 256000 of logits)
    held = estimate_memory(
        SMALL,
        micro_batch=1,
        seq_len=2,
        gradient_accumulation_steps=2,
        bf16=False,
        loss_chunk_size=4,
        device="cpu",
    )
    c = held.components
    static = c["weights"] + c["optimizer"] + c["loss_workspace"] + c["grads"]
    assert c["activations"] + c["logits"] < 512000
    assert held.peak == static + 512000
    with pytest.raises(PlannerError, match="adamw_impl"):
        estimate_memory(SMALL, micro_batch=1, seq_len=8, adamw_impl="fast")


def test_fsdp_shards_the_states():
    one = estimate_memory(SMALL, micro_batch=1, seq_len=8).components
    four = estimate_memory(SMALL, micro_batch=1, seq_len=8, world_size=4).components
    for k in ("weights", "grads", "optimizer"):
        assert four[k] == one[k] / 4
    assert four["activations"] == one["activations"]
    # with accumulation the trainer reduce-scatters on the last micro-batch only: until then
    # each rank also holds the unsharded fp32 gradients
    accum = estimate_memory(
        SMALL, micro_batch=1, seq_len=8, world_size=4, gradient_accumulation_steps=2
    ).components
    assert accum["grads"] == one["grads"] / 4 + one["grads"]


def test_gradient_sync_on_the_last_micro_batch_only_when_it_fits():
    from qwen_cpt.planner import sync_every_micro_batch

    cfg = CPTConfig(
        model_name_or_path="m", max_length=64, gradient_accumulation_steps=4, use_bf16=True
    )
    model = _qwen2_config_dict(SMALL)
    assert sync_every_micro_batch(cfg, model, 4, device_memory_gb=80)[0] is False
    sync, why = sync_every_micro_batch(cfg, model, 4, device_memory_gb=0.02)
    assert sync is True and "would need about" in why
    # the plan of fsdp_sync_every_micro_batch: null is the one the trainer will run
    last = estimate_memory(
        SMALL, micro_batch=1, seq_len=64, world_size=4, gradient_accumulation_steps=4
    )
    every = estimate_memory(
        SMALL,
        micro_batch=1,
        seq_len=64,
        world_size=4,
        gradient_accumulation_steps=4,
        sync_every_micro_batch=True,
    )
    assert every.components["grads"] == last.components["grads"] - 4.0 * SMALL_TOTAL


def test_cpu_offload_keeps_the_states_off_the_device():
    one = estimate_memory(SMALL, micro_batch=1, seq_len=8, gradient_accumulation_steps=4)
    off = estimate_memory(
        SMALL, micro_batch=1, seq_len=8, gradient_accumulation_steps=4, cpu_offload=True
    )
    for k in ("weights", "grads", "optimizer"):
        assert one.components[k] > 0 and off.components[k] == 0
    assert off.components["activations"] == one.components["activations"]
    assert off.peak < one.peak


def test_checkpointing_every_kth_layer_by_hand():
    # SMALL in bf16 on flash: a full layer saves 3088 B/token (see above), a checkpointed one
    # its fp32 input 4*64; every 2nd of 2 layers: layer 0 checkpointed, layer 1 kept, plus the
    # recomputed layer and the final norm 640
    every2 = estimate_memory(
        SMALL, micro_batch=1, seq_len=8, checkpointing="full", checkpoint_every=2
    ).components["activations"]
    assert every2 == (4 * 64 + 3088 + 3088 + 640) * 8


def test_checkpointing_orders_activation_memory():
    def acts(mode):
        return estimate_memory(
            QWEN25_SHAPES["Qwen/Qwen2.5-7B"], micro_batch=1, seq_len=4096, checkpointing=mode
        ).components["activations"]

    assert acts("full") < acts("selective") < acts("none")
    with pytest.raises(PlannerError, match="checkpointing"):
        acts("some")


def test_7b_adamw_states_are_16_bytes_per_param():
    # AdamW with fp32 states and master weights: about 16 B/param = 113 GiB at 7B
    # (docs/design.md, "Memory arithmetic")
    c = estimate_memory(QWEN25_SHAPES["Qwen/Qwen2.5-7B"], micro_batch=1, seq_len=2048).components
    assert (c["weights"] + c["grads"] + c["optimizer"]) / GiB == pytest.approx(113.5, rel=0.01)


# --- `qwen-cpt plan` -------------------------------------------------------------------------------


def _yaml(tmp_path, text: str):
    path = tmp_path / "cpt.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("hub_id", sorted(QWEN25_SHAPES))
def test_plan_works_offline_for_every_qwen25_size(tmp_path, capsys, hub_id):
    cfg = _yaml(tmp_path, f"model_name_or_path: {hub_id}\n")
    assert main(["plan", cfg, "--tokens", "1e9", "--gpus", "8", "--gpu", "H100"]) == 0
    text = capsys.readouterr().out
    assert "peak" in text and "learning rate" in text and "time" in text

    assert main(["plan", cfg, "--tokens", "1e9", "--gpus", "8", "--gpu", "H100", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"]["params_total"] == count_params(QWEN25_SHAPES[hub_id]).total
    assert plan["batch"]["devices"] == 8
    assert plan["memory"]["fits"] in (True, False)
    assert plan["memory"]["fits"] or plan["memory"]["suggestions"]


def test_plan_resolves_auto_and_counts_steps(tmp_path, capsys):
    cfg = _yaml(
        tmp_path,
        "model_name_or_path: Qwen/Qwen2.5-7B-Instruct\nmax_length: 4096\nnum_train_epochs: 1\n"
        "learning_rate: auto\nper_device_train_batch_size: auto\n"
        "gradient_accumulation_steps: auto\nwarmup_ratio: 0.03\n",
    )
    assert main(["plan", cfg, "--tokens", "1e9", "--gpus", "8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    lr, batch, steps = plan["learning_rate"], plan["batch"], plan["steps"]
    assert lr["value"] == pytest.approx(
        lr_spec(count_params(QWEN25_SHAPES["Qwen/Qwen2.5-7B"]).total)
    )
    # Step Law: 0.58 * 1e9^0.571 = 79,878 tokens -> round(79878 / 4096 / 8) = 2 sequences each
    assert batch["global_sequences"] == 16 and batch["global_tokens"] == 16 * 4096
    # 1e9 tokens -> 244141 blocks -> 30518 per device -> 15259 micro-batches of 2 -> steps
    assert steps["total"] == 15259
    assert steps["warmup"] == math.ceil(15259 * 0.03)
    assert plan["memory"]["fits"] is True


def test_plan_estimates_tokens_from_train_files(tmp_path, capsys):
    (tmp_path / "data.txt").write_text("x" * 36_000)
    cfg = _yaml(tmp_path, f"model_name_or_path: Qwen/Qwen2.5-0.5B\ntrain_files: [{tmp_path}]\n")
    assert main(["plan", cfg, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["data"]["tokens_per_epoch"] == 10_000  # 36,000 bytes / 3.6
    assert "estimated" in plan["data"]["tokens_source"]


def test_plan_reads_a_local_model_directory(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(_qwen2_config_dict(SMALL)))
    cfg = _yaml(tmp_path, f"model_name_or_path: {model_dir}\n")
    assert main(["plan", cfg, "--tokens", "1e6", "--gpu-memory", "24", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"]["params_total"] == SMALL_TOTAL
    assert plan["memory"]["capacity_gib"] == 24


def test_plan_says_what_to_change_when_it_does_not_fit(tmp_path, capsys):
    cfg = _yaml(
        tmp_path,
        "model_name_or_path: Qwen/Qwen2.5-7B\nuse_gradient_checkpointing: false\n"
        "use_fused_loss: false\nper_device_train_batch_size: 8\n",
    )
    assert main(["plan", cfg, "--tokens", "1e9", "--gpu", "H100"]) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out
    assert "use_fused_loss: true" in out and "use_gradient_checkpointing: true" in out
    assert "--gpus" in out  # 7B with AdamW needs 113 GiB of states: only sharding fits


@pytest.mark.parametrize(
    "yaml_text, args, message",
    [
        ("model_name_or_path: Qwen/Qwen2.5-7B\n", [], "--tokens: required"),
        ("model_name_or_path: org/unknown\n", ["--tokens", "1e9"], "model_name_or_path"),
        ("model_name_or_path: Qwen/Qwen2.5-7B\n", ["--tokens", "1e9", "--gpu", "V100"], "V100"),
        ("model_name_or_path: Qwen/Qwen2.5-7B\n", ["--tokens", "-5"], "tokens"),
        ("model_name_or_path: Qwen/Qwen2.5-7B\n", ["--tokens", "1e9", "--gpus", "0"], "--gpus"),
    ],
)
def test_plan_errors_name_the_input(tmp_path, capsys, yaml_text, args, message):
    assert main(["plan", _yaml(tmp_path, yaml_text), *args]) == 2
    assert message in capsys.readouterr().err


# --- "auto" in CPTConfig ---------------------------------------------------------------------------


def test_config_accepts_auto_and_rejects_other_strings():
    cfg = CPTConfig(
        model_name_or_path="m",
        learning_rate="auto",
        per_device_train_batch_size="auto",
        gradient_accumulation_steps="auto",
    )
    assert (cfg.learning_rate, cfg.per_device_train_batch_size) == ("auto", "auto")
    with pytest.raises(ConfigError, match="learning_rate: expected float or auto, got 'fast'"):
        CPTConfig(model_name_or_path="m", learning_rate="fast")
    with pytest.raises(ConfigError, match="per_device_train_batch_size: expected int or auto"):
        CPTConfig(model_name_or_path="m", per_device_train_batch_size="fast")


def test_numeric_values_behave_as_before():
    cfg = CPTConfig(model_name_or_path="m", learning_rate=5e-5)
    assert cfg.learning_rate == 5e-5 and isinstance(cfg.learning_rate, float)
    assert isinstance(CPTConfig(model_name_or_path="m", learning_rate=1).learning_rate, float)
    with pytest.raises(ConfigError, match="learning_rate: must be > 0"):
        CPTConfig(model_name_or_path="m", learning_rate=0.0)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps: must be >= 1"):
        CPTConfig(model_name_or_path="m", gradient_accumulation_steps=0)


def test_yaml_and_cli_flags_accept_auto(tmp_path):
    cfg = CPTConfig.from_yaml(
        _yaml(tmp_path, "model_name_or_path: m\nlearning_rate: auto\n"),
        {"gradient_accumulation_steps": "auto"},
    )
    assert cfg.learning_rate == "auto" and cfg.gradient_accumulation_steps == "auto"
    args = build_parser().parse_args(
        ["train", "--learning_rate", "auto", "--per-device-train-batch-size", "AUTO"]
    )
    assert args.learning_rate == "auto" and args.per_device_train_batch_size == "auto"
    args = build_parser().parse_args(["train", "--learning_rate", "3e-5"])
    assert args.learning_rate == 3e-5


# --- resolve_auto ----------------------------------------------------------------------------------


def test_resolve_auto_returns_only_auto_fields():
    cfg = CPTConfig(model_name_or_path="m", learning_rate="auto")
    out = resolve_auto(cfg, _qwen2_config_dict(SMALL), n_train_tokens=10**6, device_memory_gb=8)
    assert set(out) == {"learning_rate"}
    lr, rule = out["learning_rate"]
    # num_train_epochs defaults to 3: D = 3e6 tokens trained
    assert lr == recommend_lr(SMALL_TOTAL, SMALL_NON_EMB, 3e6)[0]
    assert "N = " in rule and "D = 3e+06" in rule
    assert resolve_auto(CPTConfig(model_name_or_path="m"), _qwen2_config_dict(SMALL), 10**6) == {}


def test_resolve_auto_batch_from_step_law_and_memory():
    cfg = CPTConfig(
        model_name_or_path="m",
        max_length=256,
        num_train_epochs=1,
        per_device_train_batch_size="auto",
        gradient_accumulation_steps="auto",
    )
    # Step Law for D = 1e8: 0.58 * 1e8^0.571 = 21,450 tokens -> round(21450 / 256) = 84 sequences
    out = resolve_auto(cfg, _qwen2_config_dict(SMALL), n_train_tokens=10**8, device_memory_gb=64)
    micro, accum = out["per_device_train_batch_size"][0], out["gradient_accumulation_steps"][0]
    assert (micro, accum) == (84, 1)
    assert "Step Law" in out["per_device_train_batch_size"][1]
    assert "CPU: memory / 2.5" in out["per_device_train_batch_size"][1]  # no GPU here
    # on 2 devices, 42 sequences each; with too little memory the micro-batch shrinks
    out = resolve_auto(cfg, _qwen2_config_dict(SMALL), 10**8, world_size=2, device_memory_gb=0.03)
    micro, accum = out["per_device_train_batch_size"][0], out["gradient_accumulation_steps"][0]
    assert micro < 42 and micro * accum >= 42 and micro * (accum - 1) < 42


def test_resolve_auto_under_hsdp_sizes_memory_by_the_shard_group():
    """7B on 16 GPUs of 40 GiB: sharded over all 16 a micro-batch of 5 fits; as HSDP 4 x 4
    each GPU holds a quarter of the state, not a sixteenth, and the same batch per device is
    reached with micro-batches of 1 (the run passes ``world.shard``)."""
    from qwen_cpt.planner.shapes import lookup_shape

    cfg = CPTConfig(
        model_name_or_path="m",
        max_length=4096,
        num_train_epochs=1,
        per_device_train_batch_size="auto",
        gradient_accumulation_steps="auto",
    )
    config = _qwen2_config_dict(lookup_shape("Qwen/Qwen2.5-7B"))

    def batch(shard):
        out = resolve_auto(
            cfg, config, 10**10, world_size=16, shard_size=shard, device_memory_gb=40,
            device="cuda",
        )  # fmt: skip
        return out["per_device_train_batch_size"][0], out["gradient_accumulation_steps"][0]

    assert batch(16) == batch(None) == (5, 1)
    assert batch(4) == (1, 5)


def test_resolve_auto_with_a_loaded_model_and_fixed_micro_batch():
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    model = AutoModelForCausalLM.from_config(
        Qwen2Config(**_qwen2_config_dict(SMALL)), dtype=torch.float32
    )
    cfg = CPTConfig(
        model_name_or_path="m",
        max_length=256,
        max_steps=1000,
        learning_rate="auto",
        per_device_train_batch_size=4,
        gradient_accumulation_steps="auto",
    )
    out = resolve_auto(cfg, model, n_train_tokens=10**7)
    # max_steps 1000: B = (0.58 * 1000^0.571)^(1/0.429) = 2,764 tokens -> 11 sequences -> 3 x 4
    assert out["gradient_accumulation_steps"][0] == 3
    assert isinstance(out["learning_rate"][0], float)
    assert set(out) == {"learning_rate", "gradient_accumulation_steps"}


def _plan_json(tmp_path, capsys, extra: str) -> dict:
    text = (
        "model_name_or_path: Qwen/Qwen2.5-7B\nper_device_train_batch_size: 1\n"
        "gradient_accumulation_steps: 8\nmax_length: 4096\n" + extra
    )
    path = _yaml(tmp_path, text)
    assert main(["plan", path, "--tokens", "1e9", "--gpu", "H100", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_memory_follows_the_attention_that_will_run(tmp_path, capsys):
    """Only SDPA/eager take the dense block-causal mask (and full-width k/v) for packed
    documents; flash_attention_2 and flex_attention do without. auto without flash-attn may
    end on SDPA at start-up, so it is planned as SDPA."""
    plans = {
        name: _plan_json(tmp_path, capsys, extra)
        for name, extra in {
            "auto+flash": "",
            "auto, no flash": "use_flash_attention: false\n",
            "sdpa": "attention_implementation: sdpa\n",
            "flex": "attention_implementation: flex_attention\n",
            "flash": "attention_implementation: flash_attention_2\nuse_flash_attention: false\n",
        }.items()
    }
    acts = {k: p["memory"]["components_gib"]["activations"] for k, p in plans.items()}
    assert acts["auto, no flash"] == acts["sdpa"] > acts["flex"] == acts["flash"]
    assert acts["auto+flash"] == acts["flash"]
    assert plans["flex"]["notes"][0] == "memory assumes flex_attention, with no dense mask"
    assert plans["sdpa"]["notes"][0] == "memory assumes SDPA with the packed block-causal mask"
    assert plans["auto+flash"]["notes"][0].startswith("memory assumes flash_attention_2")


def test_auto_batch_for_a_short_run_says_it_takes_one_block():
    """A few max_steps give a Step-Law batch below one block; the rule says what it does
    instead of "-> 1 tokens per step"."""
    cfg = CPTConfig(
        model_name_or_path="m", max_length=256, max_steps=4,
        per_device_train_batch_size="auto", gradient_accumulation_steps="auto",
    )  # fmt: skip
    out = resolve_auto(cfg, _qwen2_config_dict(SMALL), n_train_tokens=10**6, device_memory_gb=8)
    assert (out["per_device_train_batch_size"][0], out["gradient_accumulation_steps"][0]) == (1, 1)
    assert (
        "less than one block of 256 tokens per process: one block each"
        in (out["per_device_train_batch_size"][1])
    )


# --- lean modes: LoRA, freeze-tuning, and what fits one GPU ---------------------------------------


def test_lora_memory_by_hand():
    from qwen_cpt.planner.memory import LeanMode

    # LoRA r=2 on every linear: per layer r*(in+out) summed over q 64+64, k 64+32, v 64+32,
    # o 64+64, gate/up 64+176 each, down 176+64 = 1168 -> x 2 layers x r 2 = 4672 parameters
    lean = LeanMode(lora_r=2, train_embeddings=True)
    est = estimate_memory(
        SMALL, micro_batch=1, seq_len=8, bf16=False, chunked_loss=False, device="cpu", lean=lean
    )
    c = est.components
    trained = 4672 + 64000  # adapters + the tied embedding/head, once
    assert c["weights"] == 4 * (SMALL_TOTAL + 4672)
    assert c["grads"] == 4 * trained and c["optimizer"] == 8 * trained
    assert c["embedding_grad"] == 4 * 64000  # tied: the head's gradient waits for the embedding's
    frozen = estimate_memory(
        SMALL,
        micro_batch=1,
        seq_len=8,
        bf16=False,
        chunked_loss=False,
        device="cpu",
        lean=LeanMode(lora_r=2, train_embeddings=False),
    ).components
    assert frozen["grads"] == 4 * 4672 and frozen["embedding_grad"] == 0
    # DoRA adds one magnitude per output feature: (64+32+32+64+176+176+64) x 2 layers
    dora = LeanMode(lora_r=2, dora=True).adapter_params(SMALL)
    assert dora == (4672, 2 * 608)


def test_qlora_memory_by_hand():
    from qwen_cpt.planner.memory import NF4_BYTES, LeanMode

    # per layer q 64x64, k and v 64x32, o 64x64, gate/up/down 64x176: 46080, x 2 layers
    matrices = 2 * (2 * 4096 + 2 * 2048 + 3 * 11264)
    assert NF4_BYTES == pytest.approx(4.127 / 8, abs=1e-3)  # QLoRA's 4.127 bits per weight
    kw = dict(micro_batch=1, seq_len=8, bf16=False, chunked_loss=False, device="cpu")
    lora = estimate_memory(SMALL, lean=LeanMode(lora_r=2), **kw).components
    q = estimate_memory(SMALL, lean=LeanMode(lora_r=2, quantized=True), **kw).components
    # the decoder's matrices in 4 bits; tables, norms, biases and adapters stay fp32
    assert q["weights"] == pytest.approx(4 * (SMALL_TOTAL - matrices + 4672) + NF4_BYTES * matrices)
    assert q["weight_copies"] == 4 * 11264  # one 4-bit matrix dequantized for its matmul
    # what trains, and so its gradients and optimizer state, is LoRA's
    assert (q["grads"], q["optimizer"]) == (lora["grads"], lora["optimizer"])


def test_freeze_memory_and_compute_by_hand():
    from qwen_cpt.planner.memory import LeanMode, lean_compute_factor

    full = estimate_memory(SMALL, micro_batch=1, seq_len=8, bf16=False, device="cpu")
    lean = LeanMode(freeze_layers=1, train_embeddings=False)
    est = estimate_memory(SMALL, micro_batch=1, seq_len=8, bf16=False, device="cpu", lean=lean)
    # the last layer (46336) and the final norm (64) train
    assert est.components["grads"] == 4 * (46336 + 64)
    # frozen embeddings: only the trained layer keeps activations (half of two layers)
    assert est.components["activations"] == full.components["activations"] / 2
    p = count_params(SMALL)
    # forward 2 per weight and token for the frozen layer, 6 for the trained one, 4 for the
    # frozen head: (2*(92736-46336) + 6*46336 + 4*64000) / (6*(92736+64000))
    expected = (2 * (92736 - 46336) + 6 * 46336 + 4 * 64000) / (6 * (92736 + 64000))
    assert lean_compute_factor(SMALL, p, lean) == pytest.approx(expected)


def test_plan_lists_the_modes_that_fit_one_gpu(tmp_path, capsys):
    cfg = _yaml(tmp_path, "model_name_or_path: Qwen/Qwen2.5-7B\nper_device_train_batch_size: 1\n")
    args = ["plan", cfg, "--tokens", "1e8", "--gpu", "A100", "--gpu-memory", "40"]
    assert main([*args, "--json"]) == 0
    mem = json.loads(capsys.readouterr().out)["memory"]
    assert mem["fits"] is False
    modes = {m["mode"]: m for m in mem["modes_that_fit"]}
    assert modes and all(m["fits"] and m["peak_gib"] <= 36 for m in modes.values())
    assert mem["modes_that_fit"][0]["flags"] == {"fsdp_cpu_offload": True}
    assert any(m["flags"].get("use_lora") for m in modes.values())
    # QLoRA comes last (least faithful: its base is quantized) and takes the least memory of
    # the modes that keep the weights on the GPU
    qlora = [m for m in mem["modes_that_fit"] if m["flags"].get("use_qlora")]
    assert qlora and mem["modes_that_fit"][-len(qlora) :] == qlora
    on_gpu = [m["peak_gib"] for m in modes.values() if not m["flags"].get("fsdp_cpu_offload")]
    assert min(m["peak_gib"] for m in qlora) == min(on_gpu)
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "modes that fit this one device" in text and "use_lora: true" in text
    # a LoRA config is planned as LoRA, and never told to add GPUs (one process only)
    lora = _yaml(tmp_path, "model_name_or_path: Qwen/Qwen2.5-7B\nuse_lora: true\n")
    assert main(["plan", lora, "--tokens", "1e8", "--gpu-memory", "40", "--json"]) == 0
    mem = json.loads(capsys.readouterr().out)["memory"]
    assert mem["lean_mode"].startswith("LoRA r=64")
    assert not any("--gpus" in s for s in mem["suggestions"])
