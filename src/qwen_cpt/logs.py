"""What a person sees while a run trains: log lines, the progress bar, and the speed window."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable

import torch

log = logging.getLogger("qwen_cpt")


def setup_logging(level: int = logging.INFO) -> None:
    """Give the library logger a stderr handler unless the application configured logging."""
    if not sys.stderr.isatty():  # transformers' per-save bars would litter CI logs
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if log.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[qwen-cpt %(asctime)s] %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


@contextlib.contextmanager
def progress(total: int, initial: int, enabled: bool):
    """A step progress bar on a terminal (log lines print above it), nothing elsewhere."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    shown = enabled and sys.stderr.isatty()
    bar = tqdm(
        total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True,
        disable=not shown,
    )  # fmt: skip
    with logging_redirect_tqdm([log]) if shown else contextlib.nullcontext():
        try:
            yield bar
        finally:
            bar.close()


def log_step(bar, step: int, total: int, m: dict) -> None:
    bar.set_postfix(
        loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", tok_s=f"{m['tokens_per_sec']:.0f}"
    )
    line = (
        f"step {step}/{total} | epoch {m['epoch']:.2f} | loss {m['loss']:.4f} | "
        f"avg {m['avg_loss']:.4f} | lr {m['lr']:.3e} | grad_norm {m['grad_norm']:.3f} | "
        f"{m['tokens_per_sec']:.0f} tok/s | mem {m['memory_gb']:.2f} GB"
    )
    if "tflops" in m:
        line += f" | {m['tflops']:.3g} TFLOP/s" + (f" (MFU {m['mfu']:.1%})" if "mfu" in m else "")
    log.info(line)


class Window:
    """Loss and throughput over the training steps since the last log line.

    The loss is summed on the device and read once, at the log line (no host sync per step).
    ``clock``: seconds, ``time.perf_counter`` unless a test injects one.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.start = clock()
        self.loss_sum: torch.Tensor | float = 0.0
        self.loss_tokens = self.tokens = 0

        self._unfolded: torch.Tensor | float = 0.0  # not yet in the run's totals
        self._unfolded_tokens = 0

    def add(self, loss_sum: torch.Tensor, loss_tokens: int, tokens: int) -> None:
        self.loss_sum = self.loss_sum + loss_sum.detach()
        self._unfolded = self._unfolded + loss_sum.detach()
        self.loss_tokens += loss_tokens
        self._unfolded_tokens += loss_tokens
        self.tokens += tokens

    def fold_into(self, state) -> None:
        """Add the loss since the last fold to ``state.loss_sum``/``loss_tokens`` (one read)."""
        state.loss_sum += float(self._unfolded)
        state.loss_tokens += self._unfolded_tokens
        self._unfolded, self._unfolded_tokens = 0.0, 0

    def loss(self) -> float:
        return float(self.loss_sum) / self.loss_tokens if self.loss_tokens else float("nan")

    def tokens_per_sec(self) -> float:
        return self.tokens / max(self.clock() - self.start, 1e-9)

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside does not count towards tokens_per_sec."""
        t0 = self.clock()
        try:
            yield
        finally:
            self.start += self.clock() - t0


def memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated, or this process's resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30
