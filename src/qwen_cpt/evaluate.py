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
    def loss_sum(self, loss_module, blocks: list[D.Block]) -> tuple[float, int, float]:
        """(summed token loss, tokens, standard error of the mean loss) over ``blocks``.

        The standard error treats each eval batch (a run of consecutive blocks) as one draw of a
        ratio estimator, so blocks of the same document are not counted as independent: the
        honest noise of the loss that the report's verdicts use (docs/design.md, "Eval noise").

        Every rank runs the same number of forward passes (FSDP2 gathers parameters in each):
        a rank whose share ran out repeats a block and does not count it.
        """
        bs, world = self.batch_size, self.world
        mine = world.eval_share(blocks)
        n_batches = math.ceil(math.ceil(len(blocks) / world.size) / bs)
        losses, counts = [], []  # per counted batch: its loss sum L_i (on the device) and n_i
        from tqdm.auto import tqdm

        shown = sys.stderr.isatty() and world.is_main
        for i in tqdm(range(n_batches), desc="eval", unit="batch", leave=False, disable=not shown):
            part = mine[i * bs : (i + 1) * bs]
            host = D.collate(part or blocks[:1])
            batch = {k: v.to(self.runtime.device) for k, v in host.items()}
            with self.runtime.autocast:
                loss = loss_module(batch)
            if part:
                losses.append(loss.double())
                counts.append(D.count_loss_tokens(host))  # counted on the host: no sync
        li = torch.stack(losses) if losses else torch.zeros(0, dtype=torch.float64)
        ni = torch.tensor(counts, dtype=torch.float64, device=li.device)
        sums = [li.sum(), ni.sum(), (li * li).sum(), (li * ni).sum(), (ni * ni).sum(), len(counts)]
        total, n, *sq = world.sum([float(x) for x in sums])  # one sync, after the last batch
        return total, int(n), _stderr(total, n, *sq)

    def evaluate(self, loss_module, step: int) -> dict[str, float]:
        loss_module.eval()
        try:
            parts = {name: self.loss_sum(loss_module, b) for name, b in self.eval_sets.items()}
        finally:
            loss_module.train()
        metrics: dict[str, float] = {}
        for name, (loss_sum, n, se) in parts.items():
            if name not in GENERAL or len(parts) > 1:
                metrics[f"eval_loss/{name}"] = loss_sum / max(1, n)
                metrics[f"eval_ppl/{name}"] = math.exp(min(loss_sum / max(1, n), 50.0))
                if math.isfinite(se):
                    metrics[f"eval_loss_se/{name}"] = se
        overall = [p for name, p in parts.items() if name in GENERAL] or list(parts.values())
        loss = sum(p[0] for p in overall) / max(1, sum(p[1] for p in overall))
        metrics = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), **metrics}
        if len(overall) == 1 and math.isfinite(overall[0][2]):
            metrics["eval_loss_se"] = overall[0][2]
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


def _stderr(total: float, n: float, l2: float, ln: float, n2: float, k: float) -> float:
    """Standard error of ``total / n``, the ratio of per-batch loss sums ``L_i`` to token counts
    ``n_i`` over ``k`` batches: ``sqrt(k / (k - 1) * sum((L_i - m n_i)^2)) / n`` with ``m`` the
    mean; NaN for fewer than two batches."""
    if k < 2 or n <= 0:
        return math.nan
    m = total / n
    ss = max(0.0, l2 - 2 * m * ln + m * m * n2)
    return math.sqrt(k / (k - 1) * ss) / n


class ForgettingAlarm:
    """``forgetting_tolerance``: one warning per eval set whose loss has risen more than the
    tolerance (nats/token) above its value at the run's first eval (step 0; a resumed run reads
    it back from ``metrics.jsonl``)."""

    def __init__(self, tolerance: float | None, metrics_file):
        self.tolerance, self.metrics_file = tolerance, metrics_file
        self.start: dict[str, float] | None = None
        self.warned: set[str] = set()

    def check(self, metrics: dict[str, float], step: int) -> list[str]:
        """The eval sets that crossed the tolerance at this eval (each warned once)."""
        if self.tolerance is None:
            return []
        losses = {
            k: v for k, v in metrics.items() if k == "eval_loss" or k.startswith("eval_loss/")
        }
        if any(f"eval_loss/{g}" in losses for g in GENERAL):  # the same set, warned by name
            losses.pop("eval_loss", None)
        if self.start is None:
            self.start = losses if step == 0 else self._first_eval() or losses
            return []
        crossed = []
        for key, v in losses.items():
            first = self.start.get(key)
            if first is None or key in self.warned or not v - first > self.tolerance:
                continue
            self.warned.add(key)
            crossed.append(key)
            name = key.partition("/")[2] or "the eval data"
            name += " (eval_files/eval_texts)" if name in GENERAL else ""
            log.warning(
                "forgetting: eval loss of %s is %.4f at step %d, %.4f above its start %.4f "
                "(forgetting_tolerance %g); give the general (replay) source more weight in "
                "sources, or lower learning_rate",
                name, v, step, v - first, first, self.tolerance,
            )  # fmt: skip
        return crossed

    def _first_eval(self) -> dict[str, float] | None:
        import json

        try:
            for line in open(self.metrics_file, encoding="utf-8"):
                rec = json.loads(line)
                if "eval_loss" in rec:
                    return {
                        k: v for k, v in rec.items() if k.startswith("eval_loss") and "_se" not in k
                    }
        except (OSError, ValueError):
            pass
        return None
