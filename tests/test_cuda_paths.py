"""The CUDA-only paths, their logic tested here on a CPU (issue #20), their kernels on CUDA.

On a CPU the FlashAttention-2 path is played by ``varlen_test``: an attention that, like
flash-attn's varlen kernel, attends within the segments ``cu_seq_lens_q`` names, and like
flash-attn without them runs plain causal attention over each row. The tests marked ``cuda``
run the real kernels and are skipped without a GPU.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from qwen_cpt import kernels, loss, perf
from qwen_cpt import model as model_mod
from qwen_cpt.data import IGNORE_INDEX, collate, count_loss_tokens, pack_documents

from .conftest import SAMPLE_TEXTS

CPU = torch.device("cpu")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """flash-attn's contract on a CPU: [batch, heads, seq, dim] in, [batch, seq, heads, dim]
    out; causal within each ``cu_seq_lens_q`` segment of the flattened tokens, or over each
    whole row when no segments are given (what FA2 does with a batch of several rows)."""
    b, h, s, d = query.shape
    rep = h // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    assert b == 1, "varlen attention takes one flattened row"
    assert cu.dtype == torch.int32 and kwargs["max_length_q"] == int(cu.diff().max())
    out = torch.empty_like(query)
    for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist()):
        out[:, :, lo:hi] = F.scaled_dot_product_attention(
            query[:, :, lo:hi], key[:, :, lo:hi], value[:, :, lo:hi], is_causal=True, scale=scaling
        )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("varlen_test", _varlen_attention)
AttentionMaskInterface.register("varlen_test", flash_attention_mask)


@pytest.fixture
def varlen(monkeypatch):
    monkeypatch.setattr(loss, "VARLEN_ATTENTION", loss.VARLEN_ATTENTION | {"varlen_test"})


def _blocks(tokenizer, n=3, max_length=40):
    docs = tokenizer(SAMPLE_TEXTS, add_special_tokens=False)["input_ids"]
    blocks = list(pack_documents(docs, max_length, tokenizer.eos_token_id))[:n]
    assert len(blocks) == n
    return blocks


# --- 1. FlashAttention-2: one row per micro-batch --------------------------------------------------


def test_flattened_batch_positions_labels_and_segments():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]])
    ids = torch.arange(12).reshape(2, 6)
    labels = ids.clone()
    labels[0, 3] = labels[1, 2] = IGNORE_INDEX  # a document's first token, as packing makes it
    flat = loss.flatten_packed({"input_ids": ids, "position_ids": pos, "labels": labels})
    assert flat["input_ids"].tolist() == [list(range(12))]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 1, 0, 1, 2, 3]]
    # the second row's first token is no target: the first row's last token must not predict it
    assert flat["labels"].tolist() == [[-100, 1, 2, -100, 4, 5, -100, 7, -100, 9, 10, 11]]
    assert flat["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 8, 12]
    assert flat["cu_seq_lens_q"].dtype == torch.int32
    assert flat["max_length_q"] == flat["max_length_k"] == 4
    assert count_loss_tokens(flat) == count_loss_tokens({"labels": labels})
    # a row that does not start at position 0 still starts a segment of its own
    cut = loss.varlen_kwargs(torch.tensor([[0, 1, 2], [3, 4, 5]]))
    assert cut["cu_seq_lens_q"].tolist() == [0, 3, 6]
    # the input is left as it was
    assert labels[1, 0] == 6


def test_flattened_varlen_equals_sdpa_on_the_rows(tiny_qwen, tokenizer, varlen):
    """Every token's logits, each document's loss and the gradients of the flattened one-row
    batch under varlen attention equal those of the rows under SDPA's block-causal mask."""
    batch = collate(_blocks(tokenizer))
    assert (batch["position_ids"] == 0).sum() > batch["position_ids"].shape[0]  # several docs a row
    results = {}
    for impl in ("sdpa", "varlen_test"):
        model = AutoModelForCausalLM.from_pretrained(
            tiny_qwen, dtype=torch.float32, attn_implementation=impl
        )
        flat = loss.flatten_packed(batch) if impl != "sdpa" else batch
        kwargs = {k: v for k, v in flat.items() if k in (*loss.VARLEN_KEYS, "position_ids")}
        logits = model(input_ids=flat["input_ids"], use_cache=False, **kwargs).logits
        summed = loss.lm_loss_sum(model, batch, chunked=True, chunk_size=16)
        summed.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results[impl] = logits.reshape(batch["input_ids"].shape + (-1,)).detach(), summed, grads
    (ref_logits, ref_loss, ref_grads), (logits, got_loss, grads) = results.values()
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_loss, ref_loss, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    # per document: the token losses of each document agree (same logits, same targets)
    token_loss = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none"
    )
    ref_token_loss = F.cross_entropy(
        ref_logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none"
    )
    starts = loss.document_starts(batch["position_ids"])[:, 1:]
    doc = starts.long().cumsum(-1) + 100 * torch.arange(starts.shape[0])[:, None]
    for d in doc.unique():
        sel = (doc == d) & (batch["labels"][:, 1:] != IGNORE_INDEX)
        torch.testing.assert_close(token_loss[sel].sum(), ref_token_loss[sel].sum())


def test_unflattened_rows_would_leak_across_documents(tiny_qwen, tokenizer, varlen):
    """Without flattening, the varlen kernel sees no segments in a batch of two rows: plain
    causal attention over each row (FA2's behaviour), whose loss differs. So the test above
    would catch a regression."""
    batch = collate(_blocks(tokenizer, 2))
    model = AutoModelForCausalLM.from_pretrained(
        tiny_qwen, dtype=torch.float32, attn_implementation="varlen_test"
    )
    flat = loss.flatten_packed(batch)
    with torch.no_grad():
        fixed = model(
            input_ids=flat["input_ids"],
            use_cache=False,
            **{k: flat[k] for k in (*loss.VARLEN_KEYS, "position_ids")},
        ).logits.reshape(2, -1, model.config.vocab_size)
        leaky = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
    later = loss.document_starts(batch["position_ids"])
    later[:, 0] = False
    first_doc = ~later.cummax(-1).values  # the tokens of each row's first document
    # the rows' first documents see nothing earlier either way; the later ones differ
    torch.testing.assert_close(leaky[first_doc], fixed[first_doc], atol=1e-5, rtol=1e-5)
    assert (leaky[~first_doc] - fixed[~first_doc]).abs().max() > 100 * 1e-5


@cuda
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn")
def test_flash_attention_2_on_two_rows_equals_sdpa(tiny_qwen, tokenizer):
    batch = {k: v.cuda() for k, v in collate(_blocks(tokenizer)).items()}
    losses = []
    for impl in ("sdpa", "flash_attention_2"):
        model = AutoModelForCausalLM.from_pretrained(
            tiny_qwen, dtype=torch.bfloat16, attn_implementation=impl
        ).cuda()
        with torch.no_grad():
            losses.append(loss.lm_loss_sum(model, batch, chunked=True).float())
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=1e-2)


# --- 2. Liger: fp32 gradient sums ------------------------------------------------------------------


class _LossWithAccum:
    """Liger >= 0.6's constructor: ``accum_dtype`` among its keywords."""

    def __init__(self, ignore_index=-100, reduction="mean", accum_dtype=None):
        self.ignore_index, self.reduction, self.accum_dtype = ignore_index, reduction, accum_dtype

    def __call__(self, weight, hidden, labels, bias=None):
        return F.cross_entropy(
            (hidden @ weight.T).float(), labels, ignore_index=self.ignore_index, reduction="sum"
        )


def test_liger_loss_gets_fp32_accumulation_where_its_signature_has_it():
    from .test_kernels import GoodLoss

    assert kernels.fused_ce_kwargs(_LossWithAccum) == dict(
        ignore_index=IGNORE_INDEX, reduction="sum", accum_dtype=torch.float32
    )
    fn = kernels.verified_fused_ce(_LossWithAccum, CPU)
    assert fn is not None and fn.accum_dtype is torch.float32
    # an older Liger without the keyword is built as before, not refused
    assert "accum_dtype" not in kernels.fused_ce_kwargs(GoodLoss)
    assert isinstance(kernels.verified_fused_ce(GoodLoss, CPU), GoodLoss)


@cuda
@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel")
def test_real_liger_loss_accumulates_in_fp32():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss as Loss

    if "accum_dtype" not in inspect.signature(Loss).parameters:
        pytest.skip("this liger-kernel has no accum_dtype")
    fn = kernels.verified_fused_ce(Loss, torch.device("cuda"))
    assert fn is not None and fn.accum_dtype is torch.float32


# --- 9. every kernel decision agreed across ranks ---------------------------------------------------


class _Votes:
    """A World stand-in: records each vote; the other rank says ``theirs`` in turn."""

    def __init__(self, *theirs):
        self.theirs, self.votes = list(theirs), []

    def all_ok(self, ok):
        self.votes.append(ok)
        return ok and self.theirs.pop(0)


def _fake_liger(marker):
    from .test_kernels import GoodLoss, _patch_with

    return types.SimpleNamespace(
        apply_liger_kernel_to_qwen2=_patch_with(1.0, marker),
        LigerFusedLinearCrossEntropyLoss=GoodLoss,
    )


@pytest.mark.parametrize("theirs", [(True, True), (False, True), (True, False), (False, False)])
def test_liger_patch_and_loss_are_each_used_only_if_every_rank_passed(tiny_qwen, theirs):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    modeling = sys.modules[type(model).__module__]
    world = _Votes(*theirs)
    fused = kernels.apply_liger(_fake_liger("_qwen_cpt_vote"), model, CPU, world)
    assert world.votes == [True, True]  # here both parts passed; the other rank decides
    patched = getattr(model, "_patched_by_test", False)
    assert patched == theirs[0] and hasattr(modeling, "_qwen_cpt_vote") == theirs[0]
    assert (fused is not None) == theirs[1]
    if hasattr(modeling, "_qwen_cpt_vote"):
        delattr(modeling, "_qwen_cpt_vote")


def test_a_rank_without_liger_still_votes_and_votes_no(tiny_qwen):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    world = _Votes(True, True)
    assert kernels.apply_liger(None, model, CPU, world) is None
    assert world.votes == [False, False]  # as many collectives as the other ranks make
    assert not getattr(model, "_patched_by_test", False)


def test_attention_candidates_and_a_resumed_choice_are_agreed(tiny_qwen, monkeypatch):
    """flash-attn on one rank only: no rank offers FlashAttention-2; a checkpoint's choice one
    rank cannot reuse is measured again on all."""
    from qwen_cpt import autotune
    from qwen_cpt.model import Runtime

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen, attn_implementation="sdpa")
    monkeypatch.setattr(autotune, "measures_on", lambda device: True)
    monkeypatch.setattr(autotune, "AUTO_CANDIDATES", ("sdpa",))
    offered = []

    def choose(probe, candidates, ctx=None, timer=None):
        offered.append(candidates)
        return "sdpa", {"sdpa": 1.0}

    monkeypatch.setattr(autotune, "choose_attention", choose)
    cfg = types.SimpleNamespace(
        attention_implementation="auto", use_torch_compile=False, use_flash_attention=True
    )
    here = Runtime(device=CPU, autocast_dtype=None, attn_implementation="flash_attention_2")
    saved = {"attention": "eager", "compile": False, "measured_on": {}}
    saved["measured_on"]["environment"] = autotune.environment(CPU)
    pos = lambda: torch.arange(8).repeat(2, 1)  # noqa: E731
    world = _Votes(False, False)  # the other rank: no flash-attn, and cannot reuse
    choice = autotune.choose_kernels(model, cfg, here, pos, world, saved)
    assert world.votes == [True, True]
    assert offered == [("sdpa",)] and choice.attention == "sdpa"
    assert choice.record["how"]["attention"] == "measured"


# --- 3 and 4. the probe measures training; a resume reuses the kernels ------------------------------


def test_probe_trains_and_a_resume_reuses_the_saved_choice(tiny_qwen, tmp_path, monkeypatch):
    from qwen_cpt import autotune
    from qwen_cpt import run as run_mod
    from qwen_cpt.distributed import World

    from .test_perf import _train

    seen, order = [], []

    def timer(p, **_):
        seen.append((p.layer.training, p.layer.gradient_checkpointing, tuple(p.position_ids.shape)))
        if p.layer._compiled_call_impl is not None:
            return 0.5
        return {"eager": 1.0, "sdpa": 2.0}[p.config._attn_implementation]

    checked = []
    real_check = autotune.check_attention

    def check(probe, impl):
        checked.append(probe.layer.training)
        return real_check(probe, impl)

    real_parallelize, real_compile = World.parallelize, run_mod.compile_decoder_layers
    monkeypatch.setattr(autotune, "measures_on", lambda device: True)
    monkeypatch.setattr(autotune, "AUTO_CANDIDATES", ("sdpa", "eager"))
    monkeypatch.setattr(autotune, "COMPILE_KWARGS", {"backend": "eager"})
    monkeypatch.setattr(autotune, "time_micro_batch", timer)
    monkeypatch.setattr(autotune, "check_attention", check)
    monkeypatch.setattr(
        World,
        "parallelize",
        lambda self, *a, **k: order.append("parallelize") or real_parallelize(self, *a, **k),
    )
    monkeypatch.setattr(
        run_mod,
        "compile_decoder_layers",
        lambda model: order.append("compile") or real_compile(model, backend="eager"),
    )
    torch._dynamo.reset()
    out = tmp_path / "run"
    trainer, _ = _train(tiny_qwen, out, max_steps=2, use_bf16=False)
    assert seen and all(training and ckpt for training, ckpt, _ in seen)  # train mode, checkpointed
    assert seen[0][2] == (2, 64)  # the run's first micro-batch: its two rows
    assert checked and all(checked)
    assert trainer.model.training  # trained in training mode, with no eval set to switch it
    assert order == ["parallelize", "compile"]  # compiled after wrapping (FSDP2: after sharding)
    assert trainer.model.config._attn_implementation == "eager"
    state = (out / "checkpoint-2" / "trainer_state.json").read_text()
    kernels_saved = __import__("json").loads(state)["kernels"]
    assert kernels_saved["attention"] == "eager" and kernels_saved["compile"] is True
    assert kernels_saved["how"] == {"attention": "measured", "compile": "measured"}
    assert kernels_saved["measured_on"]["batch"] == [2, 64]
    assert kernels_saved["measured_on"]["environment"]["torch"] == torch.__version__

    def must_not_measure(*args, **kwargs):
        raise AssertionError("a resume measured again")

    monkeypatch.setattr(autotune, "time_micro_batch", must_not_measure)
    monkeypatch.setattr(autotune, "make_probe", must_not_measure)
    order.clear()
    torch._dynamo.reset()
    resumed, _ = _train(tiny_qwen, out, max_steps=3, use_bf16=False, resume_from_checkpoint="auto")
    assert resumed.state.step == 3
    assert resumed.model.config._attn_implementation == "eager"
    assert order == ["parallelize", "compile"]
    again = __import__("json").loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert again["kernels"]["how"] == {"attention": "resumed", "compile": "resumed"}
    assert again["kernels"]["measured_on"] == kernels_saved["measured_on"]


def test_a_choice_measured_elsewhere_is_measured_again():
    from qwen_cpt import autotune

    env = autotune.environment(CPU)
    saved = {"attention": "sdpa", "compile": True, "measured_on": {"environment": env}}
    assert autotune.reusable(saved, CPU)[0] is saved
    other = {**saved, "measured_on": {"environment": {**env, "device": "NVIDIA H100"}}}
    got, why = autotune.reusable(other, CPU)
    assert got is None and "'NVIDIA H100' -> 'cpu'" in why
    assert autotune.reusable(None, CPU)[0] is None
    assert autotune.reusable({"attention": "sdpa"}, CPU)[0] is None


def test_deterministic_sets_the_algorithms_and_the_cublas_workspace(monkeypatch):
    import dataclasses

    from qwen_cpt import CPTConfig

    assert {f.name: f.default for f in dataclasses.fields(CPTConfig)}["deterministic"] is False
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.delenv("FLASH_ATTENTION_DETERMINISTIC", raising=False)
    was = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic
    try:
        model_mod.set_deterministic(False)
        assert not torch.are_deterministic_algorithms_enabled()
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        model_mod.set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert os.environ["FLASH_ATTENTION_DETERMINISTIC"] == "1"
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(was[0])
        torch.backends.cudnn.deterministic = was[1]


# --- 5. FlexAttention in the autocast dtype ---------------------------------------------------------


def test_flex_gets_q_k_v_in_the_autocast_dtype():
    got = []

    def flex(module, query, key, value, mask, **kwargs):
        got.append((query.dtype, key.dtype, value.dtype, kwargs))
        return query, None

    wrapped = model_mod.flex_in_autocast_dtype(flex)
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)  # fp32: rotary's product
    v = torch.randn(1, 2, 4, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wrapped(None, q, k, v, None, scaling=0.5)
    wrapped(None, q, k, v, None)  # no autocast: left as they are
    assert got[0][:3] == (torch.bfloat16,) * 3 and got[0][3] == {"scaling": 0.5}
    assert got[1][:3] == (torch.float32, torch.float32, torch.bfloat16)


def test_loading_a_model_routes_flex_through_the_cast(tiny_qwen):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model_mod.install_flex_autocast()
    model_mod.install_flex_autocast()  # once: not wrapped twice
    flex = ALL_ATTENTION_FUNCTIONS["flex_attention"]
    inner = flex.wrapped_for_autocast
    assert not hasattr(inner, "wrapped_for_autocast")
    assert inner.__module__ == "transformers.integrations.flex_attention"


# --- 6 and 7. compiled layers: one graph for all, hooks outside -------------------------------------


def _layer_idx_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa whose result depends on ``module.layer_idx`` (by nothing): dynamo specialises on
    the int unless told not to, as it would for any attention code that computes with it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return out * (1.0 + 0.0 * module.layer_idx), weights


AttentionInterface.register("layer_idx_test", _layer_idx_attention)
AttentionMaskInterface.register("layer_idx_test", AttentionMaskInterface._global_mapping["sdpa"])


def _counting_backend():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend, graphs


@torch._dynamo.config.patch(allow_unspec_int_on_nn_module=False, recompile_limit=8)
def test_layers_share_compiled_graphs_whatever_their_layer_idx():
    from transformers import Qwen2Config

    config = Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, use_cache=False,
    )  # fmt: skip
    ids, pos = torch.randint(0, 128, (2, 16)), torch.arange(16).repeat(2, 1)
    counts = {}
    for guarded in (False, True):
        torch._dynamo.reset()
        model = AutoModelForCausalLM.from_config(config, attn_implementation="layer_idx_test")
        backend, graphs = _counting_backend()
        if guarded:
            perf.compile_decoder_layers(model, backend=backend)
        else:  # the layers compiled without the guard
            for layer in perf.decoder_layers(model):
                perf.compile_layer(layer, backend=backend)
        for _ in range(2):
            model(input_ids=ids, position_ids=pos).logits.sum().backward()
        counts[guarded] = len(graphs)
    assert counts[False] == 4  # one graph per layer: past 8 layers, the rest would run eagerly
    assert counts[True] <= 2  # layer 0, then one graph with layer_idx symbolic for the rest
    assert torch._dynamo.config.recompile_limit >= 8


def test_compiled_layer_runs_its_hooks_outside_the_compiled_code():
    from transformers import Qwen2Config

    config = Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, use_cache=False,
    )  # fmt: skip
    torch._dynamo.reset()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    layer = model.model.layers[0]
    in_compiled = []
    layer.register_forward_pre_hook(lambda m, a: in_compiled.append(torch.compiler.is_compiling()))
    backend, graphs = _counting_backend()
    perf.compile_layer(layer, backend=backend)
    assert layer._compiled_call_impl is not None
    ids = torch.randint(0, 128, (1, 8))
    model(input_ids=ids).logits.sum().backward()
    assert graphs and in_compiled == [False]  # forward compiled, the (FSDP2-like) hook eager
    perf.uncompile_layer(layer)
    assert layer._compiled_call_impl is None and "forward" not in vars(layer)
    layer.compile(backend=backend)  # Module.compile: the hook would run inside compiled code
    model(input_ids=ids)
    assert in_compiled[-1] is True


# --- 8. cuda:N is made the current device -----------------------------------------------------------


def test_cuda_n_is_made_the_current_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    runtime = model_mod.resolve_runtime("cuda:2", True, False, "sdpa")
    assert runtime.device == torch.device("cuda", 2) and calls == [2]
    assert model_mod.resolve_runtime("cuda", True, False, "sdpa").device.index == 1
    assert calls == [2, 1]
    with pytest.raises(model_mod.ModelLoadError, match="cuda:7 was asked for"):
        model_mod.resolve_runtime("cuda:7", True, False, "sdpa")


# --- 10. no host syncs on the hot path --------------------------------------------------------------


def test_host_batches_are_pinned_before_an_async_copy(monkeypatch):
    events = []
    real_to = torch.Tensor.to

    def pin(self):
        events.append("pin")
        return self

    def to(self, *args, **kwargs):
        if args and torch.device(args[0]).type == "cuda":
            events.append(("to", kwargs.get("non_blocking")))
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: False)
    monkeypatch.setattr(torch.Tensor, "to", to)
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long)}
    perf.to_device(batch, torch.device("cuda", 0))
    assert events == ["pin", ("to", True)]
    events.clear()
    perf.to_device(batch, CPU)  # a CPU run: nothing to pin
    assert events == []


def test_chunked_loss_never_reads_the_device():
    """On the meta device any host read (``bool(t)``, ``.item()``) raises, so the chunked loss
    running there, with ignored rows and a fully ignored chunk, asks the host nothing."""
    hidden = torch.randn(40, 16, device="meta", requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=True, device="meta")
    labels = torch.zeros(2, 21, dtype=torch.long, device="meta")
    labels[0, :10] = IGNORE_INDEX  # a whole chunk and part of the next
    total = loss._FusedLinearCrossEntropy.apply(
        hidden,
        head.weight,
        head.bias,
        labels.reshape(-1)[:40],
        head,
        8,
        torch.float32,
        (True, True, True),
    )
    total.backward()
    assert hidden.grad is not None and head.weight.grad.shape == (50, 16)


def test_the_chunk_scale_zeroes_ignored_rows_exactly(tiny_qwen, tokenizer):
    """The row scale that replaced the host-side ``valid.all()`` test keeps the gradients
    exact when whole chunks, and single rows, are ignored."""
    torch.manual_seed(0)
    hidden = torch.randn(1, 33, 16, requires_grad=True)
    head = torch.nn.Linear(16, 40, bias=True)
    labels = torch.randint(0, 40, (1, 33))
    labels[0, 1:12] = IGNORE_INDEX  # the first chunk of 8 all ignored, the second in part
    labels[0, 20] = IGNORE_INDEX
    ours = loss.chunked_lm_loss_sum(hidden, head, labels, 8)
    ours.backward()
    got = hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()
    hidden.grad = head.weight.grad = head.bias.grad = None
    ref = F.cross_entropy(head(hidden[0, :-1]), labels[0, 1:], reduction="sum")
    ref.backward()
    torch.testing.assert_close(ours, ref)
    for g, r in zip(got, (hidden.grad, head.weight.grad, head.bias.grad)):
        torch.testing.assert_close(g, r)


@cuda
def test_cuda_loss_step_has_no_sync(tiny_qwen, tokenizer):
    batch = collate(_blocks(tokenizer))
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen, attn_implementation="sdpa").cuda()
    batch = perf.to_device(batch, torch.device("cuda"))
    hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    hidden = hidden.last_hidden_state.detach().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss.chunked_lm_loss_sum(hidden, model.lm_head, batch["labels"], 16).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
def test_cuda_pinned_copy_lands_on_the_device():
    batch = {"x": torch.arange(6).reshape(2, 3)}
    got = perf.to_device(batch, torch.device("cuda"))
    assert got["x"].is_cuda and got["x"].cpu().tolist() == [[0, 1, 2], [3, 4, 5]]
