"""Held-out loss and perplexity, per eval set and overall, split over the ranks."""

from __future__ import annotations

import logging
import math
import sys

import torch

from . import data as D

log = logging.getLogger("qwen_cpt")
GENERAL = ("eval", "eval_files")  # the names of the general eval set (eval_texts, eval_files)


class Evaluator:
    """``evaluate()`` -> metrics: ``eval_loss``/``eval_ppl`` (the general eval set if given,
    else every set token-weighted) and ``eval_loss/<set>``/``eval_ppl/<set>`` per named set."""

    def __init__(self, eval_sets: dict[str, list[D.Block]], batch_size: int, world, runtime):
        self.eval_sets, self.batch_size = eval_sets, batch_size
        self.world, self.runtime = world, runtime

    def __bool__(self) -> bool:
        return bool(self.eval_sets)

    @torch.no_grad()
    def loss_sum(self, loss_module, blocks: list[D.Block]) -> tuple[float, int]:
        """(summed token loss, tokens) over ``blocks``.

        Every rank runs the same number of forward passes (FSDP2 gathers parameters in each):
        a rank whose share ran out repeats a block and does not count it.
        """
        bs, world = self.batch_size, self.world
        mine = world.eval_share(blocks)
        n_batches = math.ceil(math.ceil(len(blocks) / world.size) / bs)
        total = torch.zeros((), dtype=torch.float64, device=self.runtime.device)
        n = 0
        from tqdm.auto import tqdm

        shown = sys.stderr.isatty() and world.is_main
        for i in tqdm(range(n_batches), desc="eval", unit="batch", leave=False, disable=not shown):
            part = mine[i * bs : (i + 1) * bs]
            batch = D.collate(part or blocks[:1])
            batch = {k: v.to(self.runtime.device) for k, v in batch.items()}
            with self.runtime.autocast:
                loss = loss_module(batch)
            if part:
                total += loss.double()
                n += D.count_loss_tokens(batch)
        total, n = world.sum([float(total), n])
        return total, int(n)

    def evaluate(self, loss_module, step: int) -> dict[str, float]:
        loss_module.eval()
        try:
            parts = {name: self.loss_sum(loss_module, b) for name, b in self.eval_sets.items()}
        finally:
            loss_module.train()
        metrics: dict[str, float] = {}
        for name, (loss_sum, n) in parts.items():
            if name not in GENERAL or len(parts) > 1:
                metrics[f"eval_loss/{name}"] = loss_sum / max(1, n)
                metrics[f"eval_ppl/{name}"] = math.exp(min(loss_sum / max(1, n), 50.0))
        overall = [p for name, p in parts.items() if name in GENERAL] or list(parts.values())
        loss = sum(p[0] for p in overall) / max(1, sum(p[1] for p in overall))
        metrics = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), **metrics}
        per_source = ", ".join(
            f"{k[len('eval_loss/') :]} {v:.4f}" for k, v in metrics.items() if "eval_loss/" in k
        )
        log.info(
            "eval step %d: loss %.4f, perplexity %.2f%s",
            step,
            loss,
            metrics["eval_ppl"],
            f" ({per_source})" if per_source else "",
        )
        return metrics
