"""The small stateful parts of a run: train counters and RNG states, each with
``state_dict()``/``load_state_dict()`` for :class:`qwen_cpt.checkpoint.CheckpointManager`."""

from __future__ import annotations

import dataclasses
import json
import random

import torch


@dataclasses.dataclass
class TrainState:
    step: int = 0
    epoch: float = 0.0
    tokens_seen: int = 0
    loss_sum: float = 0.0  # token-weighted sum of training loss over the run
    loss_tokens: int = 0
    best_eval_loss: float | None = None
    skipped_steps: int = 0

    @property
    def avg_loss(self) -> float:
        return self.loss_sum / max(1, self.loss_tokens)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])


class RNGState:
    """This process's generators: Python's, NumPy's, torch's, and its CUDA device's."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict:
        import numpy as np

        np_state = np.random.get_state()
        host = {
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy": [
                np_state[0],
                np_state[1].tolist(),
                int(np_state[2]),
                int(np_state[3]),
                float(np_state[4]),
            ],
        }
        out = {"torch": torch.get_rng_state(), "host": json.dumps(host)}
        if self.device.type == "cuda":
            out["cuda"] = torch.cuda.get_rng_state(self.device)
        return out

    def load_state_dict(self, state: dict) -> None:
        import numpy as np

        host = json.loads(state["host"])
        py = host["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        n = host["numpy"]
        np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)


class Value:
    """A stateful part that holds a plain dict (the trackers' state, the same on every rank)."""

    def __init__(self, value: dict):
        self.value = value

    def state_dict(self) -> dict:
        return self.value

    def load_state_dict(self, state: dict) -> None:
        self.value = state


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed)
