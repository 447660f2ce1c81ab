import math

import pytest

from qwen_cpt.schedule import lr_multiplier, warmup_steps_for


def test_warmup_then_cosine_hand_values():
    assert warmup_steps_for(100, 0.03) == 3
    assert [lr_multiplier(s, 100, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(4, 100, 4) == 1.0
    assert lr_multiplier(52, 100, 4) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_multiplier(99, 100, 4, min_ratio=0.1) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 95 / 96))
    )


def test_constant_and_wsd():
    assert lr_multiplier(50, 100, 0, "constant") == 1.0
    # wsd: flat until the last 10 steps, then linear down to min_ratio on the last step
    assert lr_multiplier(89, 100, 5, "wsd", min_ratio=0.0, decay_ratio=0.1) == 1.0
    assert lr_multiplier(90, 100, 5, "wsd", min_ratio=0.0, decay_ratio=0.1) == pytest.approx(0.9)
    assert lr_multiplier(99, 100, 5, "wsd", min_ratio=0.2, decay_ratio=0.1) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        lr_multiplier(0, 10, 0, "linear-ish")
