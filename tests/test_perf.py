"""Speed and memory options: MFU accounting, selective activation checkpointing, per-layer
torch.compile, and the packed (document-aware) attention path on SDPA and eager.

``QWEN_CPT_SLOW=1`` also runs the inductor (real torch.compile) trainer test: its first step
compiles C++ kernels, about 25-30 s on a 2-core CPU with a cold compile cache.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import qwen_cpt.run as run_mod
from qwen_cpt import CPTConfig, CPTTrainer, make_tiny_model, perf
from qwen_cpt.cli import build_parser
from qwen_cpt.loss import lm_loss_sum
from qwen_cpt.model import enable_activation_checkpointing
from qwen_cpt.planner import QWEN25_SHAPES, flops_per_token

from .conftest import SAMPLE_TEXTS

EOS = 151643


# --- MFU accounting --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100-SXM4-40GB", 312.0),
        ("NVIDIA A10G", 125.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA GeForce RTX 4090", 165.0),
        ("NVIDIA T4", None),
        ("NVIDIA L40", None),
    ],
)
def test_gpu_peak_from_device_name(name, peak):
    assert perf.gpu_peak_tflops(name) == peak


def test_peak_on_cpu_is_unknown_unless_overridden():
    assert perf.peak_tflops("cpu") is None
    assert perf.peak_tflops(torch.device("cpu"), override=790) == 790.0
    with pytest.raises(ValueError, match="peak_tflops"):
        perf.peak_tflops("cpu", override=0)


def test_flops_and_mfu_use_the_planner_count():
    shape = QWEN25_SHAPES["Qwen/Qwen2.5-7B"]
    config = {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    }
    fpt = perf.model_flops_per_token(config, 4096)
    assert fpt == flops_per_token(shape, 4096)
    # 7B at 4k, 8.3k tok/s is about 50% of 790 TFLOP/s
    # (docs/design.md, "Throughput anchors and MFU")
    assert perf.achieved_tflops(8300, fpt) == pytest.approx(395, rel=0.02)
    assert perf.mfu(8300, fpt, 790) == pytest.approx(0.5, rel=0.02)
    meter = perf.FlopsMeter(config, 4096, "cpu")
    assert set(meter.metrics(1000.0)) == {"tflops"}
    meter = perf.FlopsMeter(config, 4096, "cpu", override=989)
    m = meter.metrics(8300.0)
    assert m["mfu"] == pytest.approx(m["tflops"] / 989)


def test_meter_skips_models_the_planner_cannot_size():
    meter = perf.FlopsMeter({"model_type": "mixtral", "num_local_experts": 8}, 128, "cpu", 100)
    assert meter.metrics(1000.0) == {}


def test_new_fields_are_cli_flags_and_validated():
    args = build_parser().parse_args(
        [
            "train",
            "--model_name_or_path",
            "m",
            "--peak-tflops",
            "790",
            "--gradient-checkpointing-every-n-layers",
            "2",
            "--use-torch-compile",
            "true",
        ]
    )
    assert args.peak_tflops == 790.0
    assert args.gradient_checkpointing_every_n_layers == 2 and args.use_torch_compile is True
    cfg = CPTConfig(model_name_or_path="m")
    assert cfg.peak_tflops is None and cfg.gradient_checkpointing_every_n_layers == 1
    assert cfg.use_torch_compile is None and cfg.attention_implementation == "auto"
    args = build_parser().parse_args(
        ["train", "--use-torch-compile", "null", "--attention-implementation", "flex_attention"]
    )
    assert args.use_torch_compile is None and args.attention_implementation == "flex_attention"
    with pytest.raises(ValueError, match="peak_tflops") as info:
        CPTConfig(model_name_or_path="m", peak_tflops=-1.0, gradient_checkpointing_every_n_layers=0)
    assert "gradient_checkpointing_every_n_layers" in str(info.value)


# --- activation checkpointing ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    """Four layers, so that every-2nd-layer checkpointing is visibly half of them."""
    return str(
        make_tiny_model(
            tmp_path_factory.mktemp("models") / "tiny4",
            hidden_size=32,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=64,
        )
    )


def _packed_batch(tokenizer, texts, block_len=None):
    """One document-aware packed block: eos after each doc, positions restart, first token of
    each document masked from the loss (as qwen_cpt.data packs)."""
    ids, pos, labels = [], [], []
    for t in texts:
        doc = tokenizer(t)["input_ids"] + [EOS]
        ids += doc
        pos += list(range(len(doc)))
        labels += [-100] + doc[1:]
    if block_len is not None:
        ids, pos, labels = ids[:block_len], pos[:block_len], labels[:block_len]
    return {
        "input_ids": torch.tensor([ids]),
        "position_ids": torch.tensor([pos]),
        "labels": torch.tensor([labels]),
    }


def _loss_and_grads(model, batch, chunked=True):
    model.zero_grad(set_to_none=True)
    loss = lm_loss_sum(model, batch, chunked, chunk_size=16)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def test_selective_checkpointing_recomputes_every_second_layer_exactly(tiny4, tokenizer):
    batch = _packed_batch(tokenizer, SAMPLE_TEXTS[:3])
    model = AutoModelForCausalLM.from_pretrained(tiny4, dtype=torch.float32).train()
    calls = [0] * 4
    for i, layer in enumerate(model.model.layers):
        # count runs of each layer's MLP, the recompute included (module hooks do not fire in
        # the recompute, so wrap forward itself)
        def counted(*args, _i=i, _forward=layer.mlp.forward, **kwargs):
            calls[_i] += 1
            return _forward(*args, **kwargs)

        layer.mlp.forward = counted

    ref_loss, ref_grads = _loss_and_grads(model, batch)
    assert calls == [1, 1, 1, 1]

    enable_activation_checkpointing(model, every_n_layers=2)
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [
        True,
        False,
        True,
        False,
    ]
    calls[:] = [0] * 4
    loss, grads = _loss_and_grads(model, batch)
    assert calls == [2, 1, 2, 1]  # layers 0 and 2 ran again in backward: half the layers
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)

    enable_activation_checkpointing(model, every_n_layers=1)
    calls[:] = [0] * 4
    full_loss, _ = _loss_and_grads(model, batch)
    assert calls == [2, 2, 2, 2] and full_loss == pytest.approx(ref_loss, rel=1e-6)


# --- torch.compile ---------------------------------------------------------------------------------


def test_compiled_layers_train_like_eager_and_keep_parameter_names(tiny_qwen, tokenizer):
    # aot_eager: dynamo capture and AOT autograd (what can break training) without inductor's
    # C++ build, so this runs in seconds; QWEN_CPT_SLOW=1 runs the real inductor path below.
    batch = _packed_batch(tokenizer, SAMPLE_TEXTS[:4])
    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        model = AutoModelForCausalLM.from_pretrained(tiny_qwen, dtype=torch.float32).train()
        names = list(model.state_dict())
        enable_activation_checkpointing(model)
        if compiled:
            assert perf.compile_decoder_layers(model, backend="aot_eager") == 2
            assert list(model.state_dict()) == names
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[compiled] = []
        for _ in range(3):
            loss, _ = _loss_and_grads(model, batch)
            opt.step()
            losses[compiled].append(loss / int((batch["labels"][:, 1:] != -100).sum()))
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)
    assert losses[True][-1] < losses[True][0]


def _train(model_dir, out, eval_texts=None, **overrides):
    fields = dict(
        model_name_or_path=model_dir,
        output_dir=str(out),
        max_length=64,
        per_device_train_batch_size=2,
        max_steps=2,
        logging_steps=1,
        eval_steps=10**6,
        save_steps=0,
        use_tensorboard=False,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        device="cpu",
    )
    cfg = CPTConfig(**{**fields, **overrides})
    trainer = CPTTrainer(cfg)
    trainer.train(SAMPLE_TEXTS, eval_texts)
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return trainer, [r for r in records if "loss" in r and "tokens_per_sec" in r]


def test_trainer_wires_compile_checkpointing_and_mfu(tiny4, tmp_path, monkeypatch):
    _, plain = _train(tiny4, tmp_path / "plain")
    assert all(r["tflops"] > 0 and "mfu" not in r for r in plain)  # CPU: no known peak

    compiled_with = []

    def fast_compile(model):
        compiled_with.append(model)
        return perf.compile_decoder_layers(model, backend="aot_eager")

    monkeypatch.setattr(run_mod, "compile_decoder_layers", fast_compile)
    torch._dynamo.reset()
    trainer, recs = _train(
        tiny4,
        tmp_path / "opt",
        use_torch_compile=True,
        gradient_checkpointing_every_n_layers=2,
        peak_tflops=0.5,
    )
    assert compiled_with == [trainer.model]
    flags = [layer.gradient_checkpointing for layer in trainer.model.model.layers]
    assert flags == [True, False, True, False]
    assert [r["loss"] for r in recs] == pytest.approx([r["loss"] for r in plain], abs=1e-4)
    for r in recs:
        assert r["mfu"] == pytest.approx(r["tflops"] / 0.5)
        assert r["tflops"] == pytest.approx(
            r["tokens_per_sec"] * perf.model_flops_per_token(trainer.model.config, 64) / 1e12
        )


@pytest.mark.skipif(
    os.environ.get("QWEN_CPT_SLOW") != "1", reason="inductor compile on CPU: set QWEN_CPT_SLOW=1"
)
def test_trainer_with_inductor_compile_matches_eager(tiny_qwen, tmp_path):
    torch._dynamo.reset()
    _, eager = _train(tiny_qwen, tmp_path / "eager")
    _, compiled = _train(tiny_qwen, tmp_path / "compiled", use_torch_compile=True)
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], abs=1e-4)


# --- attention implementations on packed documents -------------------------------------------------


def test_packed_documents_sdpa_and_flex_match_eager_and_each_is_document_exact(
    tiny_qwen, tokenizer
):
    """The attention choices of attention_implementation: auto, against plain HF (eager)
    attention. FlexAttention runs forward only here: it has no backward on a CPU (its backward
    is checked against eager at start-up on the GPU, qwen_cpt.autotune)."""
    batch = _packed_batch(tokenizer, SAMPLE_TEXTS[:3])
    models = {
        impl: AutoModelForCausalLM.from_pretrained(
            tiny_qwen, dtype=torch.float32, attn_implementation=impl
        ).eval()
        for impl in ("sdpa", "eager", "flex_attention")
    }
    with torch.no_grad():
        losses = {
            (impl, chunked): lm_loss_sum(m, batch, chunked, chunk_size=16).item()
            for impl, m in models.items()
            for chunked in (False, True)
        }
        for key, loss in losses.items():
            assert loss == pytest.approx(losses[("eager", False)], rel=1e-5), key

        # the third document's logits inside the block equal those of it alone, on both
        third = _packed_batch(tokenizer, SAMPLE_TEXTS[2:3])
        n = third["input_ids"].shape[1]
        for impl, m in models.items():
            packed = m(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
            ).logits[0, -n:]
            alone = m(
                input_ids=third["input_ids"], position_ids=third["position_ids"], use_cache=False
            ).logits[0]
            torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5, msg=impl)
            # with plain positions the eager path sees across documents (the mask is real)
            flat = torch.arange(batch["input_ids"].shape[1])[None]
            leaky = m(input_ids=batch["input_ids"], position_ids=flat, use_cache=False).logits
            assert (leaky[0, -n:] - alone).abs().max() > 1e-3, impl


# --- the fused linear cross-entropy (use_fused_loss) -----------------------------------------------


def _reference_ce(hidden, head, labels):
    logits = torch.nn.functional.linear(hidden[:, :-1], head.weight, head.bias).float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"
    )


def test_fused_loss_with_bias_and_ignored_rows_matches_cross_entropy():
    from qwen_cpt.loss import chunked_lm_loss_sum

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, 2:8] = -100  # one chunk of 3 rows is wholly ignored, others partly
    grads = []
    for fn in (_reference_ce, lambda h, m, y: chunked_lm_loss_sum(h, m, y, 3)):
        head.zero_grad()
        hidden.grad = None
        loss = fn(hidden, head, labels)
        (loss * 0.5).backward()  # the incoming gradient scales all three gradients
        grads.append((loss.detach(), hidden.grad.clone(), head.weight.grad, head.bias.grad))
    for ref, ours in zip(*grads):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # eval: no gradient work, same loss
        torch.testing.assert_close(chunked_lm_loss_sum(hidden, head, labels, 4), grads[0][0])


def test_fused_loss_under_bf16_autocast_tracks_autocast_reference():
    from qwen_cpt.loss import chunked_lm_loss_sum

    torch.manual_seed(0)
    head = torch.nn.Linear(32, 200, bias=False)
    hidden = torch.randn(1, 33, 32, requires_grad=True)
    labels = torch.randint(0, 200, (1, 33))
    results = []
    for fn in (_reference_ce, lambda h, m, y: chunked_lm_loss_sum(h, m, y, 8)):
        head.zero_grad()
        hidden.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(hidden, head, labels)
        loss.backward()
        assert hidden.grad.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
        results.append((loss.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    (ref_loss, ref_h, ref_w), (loss, gh, gw) = results
    torch.testing.assert_close(loss, ref_loss, rtol=2e-3, atol=0.05)
    torch.testing.assert_close(gh, ref_h, rtol=0.05, atol=2e-2)
    torch.testing.assert_close(gw, ref_w, rtol=0.05, atol=2e-2)


def test_fused_loss_reuses_one_cpu_logits_buffer():
    from qwen_cpt import loss as L

    head = torch.nn.Linear(8, 100, bias=False)
    hidden = torch.randn(1, 20, 8, requires_grad=True)
    labels = torch.randint(0, 100, (1, 20))
    L.chunked_lm_loss_sum(hidden, head, labels, 6).backward()
    buf = L._WORKSPACES[head]
    L.chunked_lm_loss_sum(hidden, head, labels, 6).backward()
    assert L._WORKSPACES[head] is buf and tuple(buf.shape) == (6, 100)


def test_evaluation_and_saving_do_not_count_as_training_time(tiny_qwen, tmp_path, monkeypatch):
    """tokens_per_sec (and so MFU) is the training speed: a slow evaluation or checkpoint
    between two log lines must not lower it (it did: the demo showed 922 instead of ~1,400
    tok/s for the window holding an evaluation). The trainer reads an injected clock: each
    training step takes 1 s on it, each evaluation and each save 1000 s."""
    from qwen_cpt.checkpoint import CheckpointManager
    from qwen_cpt.evaluate import Evaluator

    now = [0.0]

    def slowly(seconds, real):
        def run(*args, **kwargs):
            now[0] += seconds
            return real(*args, **kwargs)

        return run

    monkeypatch.setattr(CPTTrainer, "train_step", slowly(1.0, CPTTrainer.train_step))
    monkeypatch.setattr(Evaluator, "evaluate", slowly(1000.0, Evaluator.evaluate))
    monkeypatch.setattr(CheckpointManager, "save", slowly(1000.0, CheckpointManager.save))
    cfg = CPTConfig(
        model_name_or_path=tiny_qwen, output_dir=str(tmp_path / "run"), max_length=32,
        per_device_train_batch_size=2, max_steps=6, logging_steps=2, eval_steps=2, save_steps=2,
        use_tensorboard=False, device="cpu",
    )  # fmt: skip
    CPTTrainer(cfg, clock=lambda: now[0]).train(SAMPLE_TEXTS[:4], SAMPLE_TEXTS[4:6])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    logged = [r for r in records if "tokens_per_sec" in r]
    assert [r["step"] for r in logged] == [2, 4, 6]
    evals = [r["step"] for r in records if "eval_loss" in r]
    assert evals == [0, 2, 4, 6]  # the windows of steps 4 and 6 each hold an eval and a save
    tokens_per_window = 2 * 2 * 32  # 2 steps of 2 blocks of 32 tokens
    for r in logged:
        assert r["tokens_per_sec"] == tokens_per_window / 2.0, r  # 2 training seconds
    runtime = next(r["train_runtime_s"] for r in records if "train_runtime_s" in r)
    # the run's time counts everything: evaluations at steps 2, 4 and 6, save calls at steps
    # 2, 4 and 6 and the final one (which finds checkpoint-6 saved), and 6 training seconds
    assert runtime == 6 + 1000 * (3 + 4)
