"""The Liger-Kernel glue: its checks and fallbacks, with stand-ins for liger-kernel on CPU.

Liger's Triton kernels need CUDA, so these tests give ``qwen_cpt.kernels`` stand-ins with
Liger's calling conventions: a correct one must be taken, a wrong one refused with a warning
and its module-level patch undone.
"""

import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from qwen_cpt import kernels
from qwen_cpt.data import IGNORE_INDEX
from qwen_cpt.loss import lm_loss_sum

CPU = torch.device("cpu")


class GoodLoss:
    """Liger's LigerFusedLinearCrossEntropyLoss contract: (weight, hidden, labels, bias)."""

    def __init__(self, ignore_index=-100, reduction="mean"):
        self.ignore_index, self.reduction = ignore_index, reduction

    def __call__(self, weight, hidden, labels, bias=None):
        logits = hidden @ weight.T + (0 if bias is None else bias)
        return F.cross_entropy(
            logits.float(), labels, ignore_index=self.ignore_index, reduction=self.reduction
        )


class WrongLoss(GoodLoss):
    def __call__(self, weight, hidden, labels, bias=None):
        return super().__call__(weight, hidden, labels, bias) * 1.01


class OldApiLoss:
    def __init__(self, *args):  # no keyword arguments: an API we do not know
        pass


def test_fused_ce_is_taken_only_when_it_matches_pytorch(caplog):
    assert isinstance(kernels.verified_fused_ce(GoodLoss, CPU), GoodLoss)
    with caplog.at_level(logging.WARNING, logger="qwen_cpt"):
        assert kernels.verified_fused_ce(WrongLoss, CPU) is None
        assert kernels.verified_fused_ce(OldApiLoss, CPU) is None
        assert kernels.verified_fused_ce(None, CPU) is None
    text = caplog.text
    assert "differs from PyTorch's cross-entropy" in text
    assert text.count("using ours") == 3


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def _rms_forward(scale: float):
    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (self.weight * (x.float() * torch.rsqrt(var + self.variance_epsilon))).to(
            x.dtype
        ) * scale

    return forward


def _patch_with(scale: float, marker: str):
    """A stand-in for apply_liger_kernel_to_qwen2: a module-level swap and an RMSNorm forward
    bound on the given instance (exact when scale is 1)."""

    def patch(model=None, **kwargs):
        modeling = sys.modules[type(model).__module__]
        setattr(modeling, marker, object())
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.forward = types.MethodType(_rms_forward(scale), module)
        model._patched_by_test = True

    return patch


def test_kernel_patch_is_checked_on_a_one_layer_model(tiny_qwen):
    model = _model(tiny_qwen)
    modeling = sys.modules[type(model).__module__]
    assert kernels.patch_and_verify(model, _patch_with(1.0, "_qwen_cpt_good"), CPU) is None
    assert getattr(model, "_patched_by_test", False)  # the real model got the kernels
    delattr(modeling, "_qwen_cpt_good")


def test_a_wrong_kernel_patch_is_undone(tiny_qwen):
    model = _model(tiny_qwen)
    modeling = sys.modules[type(model).__module__]
    problem = kernels.patch_and_verify(model, _patch_with(1.01, "_qwen_cpt_bad"), CPU)
    assert problem and "differs with the patch" in problem
    assert not hasattr(modeling, "_qwen_cpt_bad")  # the module-level change was undone
    assert not getattr(model, "_patched_by_test", False)  # the real model was not touched


def test_nothing_changes_off_cuda(tiny_qwen, monkeypatch):
    boom = types.ModuleType("liger_kernel")  # importing it would be a bug off CUDA
    monkeypatch.setitem(sys.modules, "liger_kernel", boom)
    assert kernels.enable_liger(_model(tiny_qwen), CPU) is None


@pytest.mark.parametrize("autocast", [False, True])
def test_loss_through_a_fused_ce_equals_the_chunked_loss(tiny_qwen, autocast):
    torch.manual_seed(0)
    ids = torch.randint(0, 5000, (2, 16))
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    batch = {"input_ids": ids, "position_ids": torch.arange(16).repeat(2, 1), "labels": labels}
    results = []
    for fused in (None, GoodLoss(ignore_index=IGNORE_INDEX, reduction="sum")):
        model = _model(tiny_qwen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = lm_loss_sum(model, batch, True, 8, fused_ce=fused)
        loss.backward()
        results.append((loss.detach(), model.model.layers[0].mlp.up_proj.weight.grad))
    (ref, ref_grad), (got, got_grad) = results
    tol = dict(rtol=2e-2, atol=1e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, ref, **tol)
    torch.testing.assert_close(got_grad, ref_grad, **tol)


def test_the_start_up_check_leaves_the_runs_random_state_alone(tiny_qwen):
    """The check builds a seeded one-layer model; the run's global RNG must not be re-seeded by
    it (it was: torch.manual_seed(0) after the run's seed)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    small = kernels._one_layer_like(model)
    assert torch.equal(torch.rand(3), expected)
    again = kernels._one_layer_like(model)  # and it is the same small model every time
    for a, b in zip(small.parameters(), again.parameters()):
        assert torch.equal(a, b)
