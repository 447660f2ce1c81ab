"""The start-up choice of attention kernel and torch.compile (qwen_cpt.autotune).

On CUDA the choice is measured; here (CPU) the same code runs with eager/SDPA as the candidates,
stand-in timers where a test needs a given ranking, and a deliberately wrong kernel that must be
refused by the exactness check.
"""

import logging

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from qwen_cpt import CPTConfig, CPTTrainer, autotune

from .conftest import SAMPLE_TEXTS
from .test_perf import _train as perf_train

CPU = torch.device("cpu")


def _leaky_attention(module, query, key, value, attention_mask, **kwargs):
    """Plain causal attention over the whole block: lets documents see each other."""
    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)


AttentionInterface.register("leaky_test", _leaky_attention)
AttentionMaskInterface.register("leaky_test", sdpa_mask)


def _packed_positions(*lengths: int) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])[None]


@pytest.fixture
def probe(tiny_qwen):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_qwen, dtype=torch.float32, attn_implementation="sdpa"
    )
    return autotune.make_probe(model, _packed_positions(20, 30, 14), CPU)


def test_probe_is_a_copy_of_the_first_layer_with_fresh_weights(tiny_qwen, probe):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen, dtype=torch.float32)
    first = model.model.layers[0]
    assert type(probe.layer) is type(first) and probe.layer is not first
    assert probe.num_layers == 2 and probe.position_ids.shape == (1, 64)
    own = dict(probe.layer.named_parameters())
    assert own.keys() == dict(first.named_parameters()).keys()
    assert all(p.dtype == torch.float32 for p in own.values())
    # weights of its own: training the probe can never touch the model
    assert not any(p.data_ptr() == q.data_ptr() for p, q in zip(own.values(), first.parameters()))


def test_exactness_check_passes_sdpa_and_refuses_a_leaky_or_unrunnable_kernel(probe):
    assert autotune.check_attention(probe, "sdpa") is None
    problem = autotune.check_attention(probe, "leaky_test")
    assert problem is not None and "differs from eager attention" in problem
    # FlexAttention has no backward on a CPU: refused with the reason, not a crash
    problem = autotune.check_attention(probe, "flex_attention")
    assert problem is not None and "backward on CPU" in problem


def test_the_fastest_exact_kernel_wins(probe, caplog):
    speed = {"eager": 3.0, "sdpa": 2.0, "leaky_test": 1.0}  # the wrong one is the fastest

    def timer(p, **_):
        return speed[p.config._attn_implementation]

    with caplog.at_level(logging.WARNING, logger="qwen_cpt"):
        best, times = autotune.choose_attention(probe, ("eager", "sdpa", "leaky_test"), timer=timer)
    assert best == "sdpa" and probe.config._attn_implementation == "sdpa"
    assert times == {"eager": 3.0, "sdpa": 2.0, "leaky_test": None}
    assert "leaky_test not used" in caplog.text

    speed["eager"] = 2.0  # a tie goes to the earlier candidate
    assert autotune.choose_attention(probe, ("eager", "sdpa"), timer=timer)[0] == "eager"


class _OtherRank:
    """A stand-in for the trainer's World: another rank measured ``theirs`` and passed ``their_ok``."""

    def __init__(self, theirs, their_ok=True):
        self.theirs, self.their_ok = list(theirs), their_ok

    def sum(self, values):
        return [v + self.theirs.pop(0) for v in values]

    def all_ok(self, ok):
        return ok and self.their_ok


def test_ranks_decide_on_summed_times_and_a_check_failed_anywhere(probe):
    def timer(p, **_):
        return {"eager": 1.0, "sdpa": 2.0}[p.config._attn_implementation]

    # here eager is faster, but the other rank's GPU finds sdpa much faster: both pick sdpa
    best, times = autotune.choose_attention(
        probe, ("eager", "sdpa"), ctx=_OtherRank([5.0, 0.5]), timer=timer
    )
    assert best == "sdpa" and times == {"eager": 6.0, "sdpa": 2.5}
    # a kernel that failed its check on another rank is used by none
    best, _ = autotune.choose_attention(
        probe, ("sdpa",), ctx=_OtherRank([float("inf")], their_ok=False), timer=timer
    )
    assert best is None


@pytest.mark.parametrize("compiled, expected", [(0.99, False), (0.9, True), (None, False)])
def test_compile_is_kept_only_when_clearly_faster(probe, monkeypatch, compiled, expected):
    def timer(p, warmup=2, **_):
        if p.layer._compiled_call_impl is None:
            return 1.0
        if compiled is None:
            raise RuntimeError("inductor failed")
        return compiled

    use, eager, got = autotune.choose_compile(probe, timer=timer, backend="eager")
    assert (use, eager, got) == (expected, 1.0, compiled)
    assert probe.layer._compiled_call_impl is None  # the probe is eager again either way


def test_real_timings_are_positive_and_compiled_layer_matches_eager(probe):
    t = autotune.time_micro_batch(probe, warmup=1, repeats=2)
    assert 0 < t < 30
    eager = autotune._forward_backward(probe, probe.position_ids)
    probe.layer.compile(backend="aot_eager")
    try:
        compiled = autotune._forward_backward(probe, probe.position_ids)
    finally:
        probe.layer._compiled_call_impl = None
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _train(tiny_qwen, out, **overrides):
    """test_perf's short CPU run, 3 steps; (trainer, the logged training losses)."""
    trainer, records = perf_train(tiny_qwen, out, max_steps=3, use_bf16=False, **overrides)
    return trainer, [r["loss"] for r in records]


def test_trainer_on_cpu_measures_nothing_and_uses_sdpa(tiny_qwen, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="qwen_cpt"):
        trainer, _ = _train(tiny_qwen, tmp_path / "run")
    assert trainer.model.config._attn_implementation == "sdpa"
    assert "attention: sdpa (on a CPU; FlexAttention has no backward here)" in caplog.text
    assert "torch.compile: off (on a CPU: compiling took longer than it saved)" in caplog.text
    assert trainer.model.model.layers[0]._compiled_call_impl is None


def test_trainer_uses_the_measured_choice_and_trains_the_same(tiny_qwen, tmp_path, monkeypatch):
    """With measuring switched on (as on CUDA), the trainer takes the kernel the probe found
    fastest and exact; eager attention then trains exactly like SDPA did."""
    _, sdpa = _train(tiny_qwen, tmp_path / "sdpa", attention_implementation="sdpa")

    seen = []

    def timer(p, **_):
        seen.append(p.position_ids.clone())
        return {"eager": 1.0, "sdpa": 2.0, "leaky_test": 0.1}[p.config._attn_implementation]

    monkeypatch.setattr(autotune, "measures_on", lambda device: True)
    monkeypatch.setattr(autotune, "AUTO_CANDIDATES", ("sdpa", "eager", "leaky_test"))
    monkeypatch.setattr(autotune, "time_micro_batch", timer)
    trainer, measured = _train(tiny_qwen, tmp_path / "auto", use_torch_compile=False)
    assert trainer.model.config._attn_implementation == "eager"
    assert measured == pytest.approx(sdpa, abs=1e-5)
    # measured on the run's first micro-batch: 2 blocks whose positions restart per document
    assert seen[0].shape == (2, 64) and (seen[0] == 0).sum() > 2


def test_unknown_or_unavailable_attention_is_a_clear_error(tiny_qwen, tmp_path):
    from qwen_cpt.config import ConfigError
    from qwen_cpt.model import ModelLoadError

    with pytest.raises(ConfigError, match="attention_implementation: must be one of auto, sdpa"):
        CPTConfig(model_name_or_path=tiny_qwen, attention_implementation="flash")
    for impl, words in (
        ("flex_attention", "no backward on a CPU"),
        ("flash_attention_2", "needs CUDA and flash-attn"),
    ):
        cfg = CPTConfig(
            model_name_or_path=tiny_qwen,
            output_dir=str(tmp_path / impl),
            attention_implementation=impl,
            device="cpu",
        )
        with pytest.raises(ModelLoadError, match=words):
            CPTTrainer(cfg).train(SAMPLE_TEXTS)
        assert not (tmp_path / impl).exists()  # stopped before anything was written


def test_when_every_candidate_fails_the_loaded_kernel_stays(tiny_qwen, monkeypatch, caplog):
    from types import SimpleNamespace

    from qwen_cpt.model import Runtime

    model = AutoModelForCausalLM.from_pretrained(
        tiny_qwen, dtype=torch.float32, attn_implementation="sdpa"
    )
    monkeypatch.setattr(autotune, "measures_on", lambda device: True)
    monkeypatch.setattr(autotune, "AUTO_CANDIDATES", ("leaky_test",))
    cfg = SimpleNamespace(
        attention_implementation="auto", use_torch_compile=False, use_flash_attention=False
    )
    runtime = Runtime(device=CPU, autocast_dtype=None, attn_implementation="sdpa")
    with caplog.at_level(logging.INFO, logger="qwen_cpt"):
        choice = autotune.choose_kernels(model, cfg, runtime, lambda: _packed_positions(30, 34))
    assert (choice.attention, choice.compile) == ("sdpa", False)
    assert choice.record["how"] == {"attention": "default", "compile": "configured"}
    assert model.config._attn_implementation == "sdpa"
    assert "attention: leaky_test not used: output differs from eager attention" in caplog.text
    assert "attention: sdpa (no candidate passed its check and timing here" in caplog.text


def test_a_compiled_layer_that_computes_otherwise_is_not_used(probe, caplog):
    def wrong_backend(gm, example_inputs):  # runs the graph, then scales its results by 1.1
        def run(*args):
            out = gm(*args)
            scale = [o * 1.1 if torch.is_tensor(o) and o.is_floating_point() else o for o in out]
            return type(out)(scale) if isinstance(out, (list, tuple)) else scale

        return run

    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="qwen_cpt"):
        use, _, compiled = autotune.choose_compile(
            probe,
            timer=lambda p, **_: 0.1 if p.layer._compiled_call_impl else 1.0,
            backend=wrong_backend,
        )
    assert (use, compiled) == (False, None)
    assert "the compiled layer's output differs from eager" in caplog.text
    assert probe.layer._compiled_call_impl is None
