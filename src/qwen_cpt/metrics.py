"""The metric registry: every key the trainer writes to ``metrics.jsonl``, and how to show it.

Each line of ``metrics.jsonl`` is ``{"step": <int>, <name>: <value>, ...}``. A :class:`Metric`
describes one exact name (``loss``) or one family of names, given by its prefix ending in ``/``
(``eval_loss/`` covers ``eval_loss/<source>``). The run report (:mod:`qwen_cpt.report`) takes its
labels, units and the chart or table each metric goes in from here, so a metric the trainer starts
logging is added here once and shows up in every report. The guide (docs/guide.en.md) says what
the metrics mean under torchrun; (docs/design.md, "Throughput anchors and MFU") how MFU is
measured.
This module is a leaf: it imports nothing from qwen_cpt.
"""

from __future__ import annotations

from dataclasses import dataclass

# When a metric is logged only under some condition (``Metric.only_if``):
CONDITIONS = {
    "eval": "eval data is given (eval_files, eval_texts or a source's eval_files)",
    "eval_sets": "more than one eval set, or a named one",
    "mixture": "more than one training source",
    "multi_process": "more than one process (torchrun)",
    "flops": "the model's FLOPs per token are known (dense decoder architectures)",
    "peak": "the device's bf16 peak is known (a known GPU, or peak_tflops)",
    "downstream": "eval_tasks is set (lm-evaluation-harness tasks)",
    "eval_batches": "an eval set fills at least two eval batches (for a standard error)",
}


@dataclass(frozen=True)
class Metric:
    name: str  # the exact key, or a family prefix ending in "/"
    label: str  # what a reader calls it
    unit: str  # "" when it has none
    fmt: str  # a format spec, or human (1.23K), pct (a fraction, as 12.3%), duration (1h 02m), text
    logged: str  # when: start (step 0 of a fresh run), step (each logging step), eval, end
    chart: str | None  # the report chart it is drawn in: loss, lr, throughput, memory, mix
    table: str | None  # the report table it is listed in: summary, forgetting, cost, mix, setup
    smaller_is_better: bool | None  # None: neither (a setting, a count of parameters, a share)
    only_if: str | None = None  # a key of CONDITIONS; None: always logged

    @property
    def family(self) -> bool:
        return self.name.endswith("/")


# fmt: off
METRICS: tuple[Metric, ...] = tuple(Metric(*row) for row in (
    #name                         label                       unit           fmt         logged   chart         table         smaller  only_if
    ("step",                      "optimizer step",           "",            ",.0f",     "step",  None,         "summary",    None,    None),
    ("muon_params",               "Muon parameters",          "",            ",.0f",     "start", None,         "setup",      None,    None),
    ("adamw_params",              "AdamW parameters",         "",            ",.0f",     "start", None,         "setup",      None,    None),
    ("epoch",                     "epochs",                   "",            ".4g",      "step",  None,         "summary",    None,    None),
    ("loss",                      "train loss",               "nats/token",  ".4f",      "step",  "loss",       "summary",    True,    None),
    ("avg_loss",                  "mean train loss",          "nats/token",  ".4f",      "step",  None,         "summary",    True,    None),
    ("lr",                        "learning rate",            "",            ".3g",      "step",  "lr",         None,         None,    None),
    ("grad_norm",                 "gradient norm",            "",            ".4g",      "step",  "lr",         None,         None,    None),
    ("tokens_per_sec",            "tokens/s",                 "tokens/s",    "human",    "step",  "throughput", "cost",       False,   None),
    ("tokens_per_sec_per_device", "tokens/s per device",      "tokens/s",    "human",    "step",  "throughput", "cost",       False,   "multi_process"),
    ("tflops",                    "TFLOPS",                   "TFLOP/s",     ".1f",      "step",  None,         "cost",       False,   "flops"),
    ("mfu",                       "MFU",                      "% of peak",   "pct",      "step",  "throughput", "cost",       False,   "peak"),
    ("tokens_seen",               "tokens",                   "tokens",      "human",    "step",  None,         "summary",    None,    None),
    ("memory_gb",                 "peak memory",              "GB",          ".2f",      "step",  "memory",     "cost",       True,    None),
    ("data_share/",               "data share",               "% of tokens", "pct",      "step",  "mix",        "mix",        None,    "mixture"),
    ("skipped_steps",             "non-finite steps skipped", "",            ",.0f",     "step",  None,         "summary",    True,    None),
    ("eval_loss",                 "eval loss",                "nats/token",  ".4f",      "eval",  "loss",       "forgetting", True,    "eval"),
    ("eval_ppl",                  "eval perplexity",          "",            "human",    "eval",  None,         "forgetting", True,    "eval"),
    ("eval_loss/",                "eval loss",                "nats/token",  ".4f",      "eval",  "loss",       "forgetting", True,    "eval_sets"),
    ("eval_ppl/",                 "eval perplexity",          "",            "human",    "eval",  None,         "forgetting", True,    "eval_sets"),
    ("eval_loss_se",              "eval loss standard error", "nats/token",  ".4f",      "eval",  None,         "forgetting", None,    "eval_batches"),
    ("eval_loss_se/",             "eval loss standard error", "nats/token",  ".4f",      "eval",  None,         "forgetting", None,    "eval_batches"),
    # <task>/<metric> of lm-eval; higher is better but for the names qwen_cpt.report.read says
    ("downstream/",               "downstream score",         "",            ".4f",      "eval",  None,         "forgetting", False,   "downstream"),
    ("attention",                 "attention kernel",         "",            "text",     "start", None,         "setup",      None,    None),
    ("precision",                 "precision",                "",            "text",     "start", None,         "setup",      None,    None),
    ("torch_compile",             "torch.compile",            "",            "text",     "start", None,         "setup",      None,    None),
    ("train_runtime_s",           "run time",                 "s",           "duration", "end",   None,         "setup",      None,    None),
))
# fmt: on
_BY_NAME = {m.name: m for m in METRICS}


def describe(name: str) -> Metric | None:
    """The entry for a ``metrics.jsonl`` key: its exact entry, else its family's, else None."""
    head, sep, rest = name.partition("/")
    return _BY_NAME.get(head + sep) if rest else _BY_NAME.get(name) if not sep else None


def member(name: str) -> str:
    """What a family key names (``eval_loss/domain`` -> ``domain``); the key itself otherwise."""
    return name.partition("/")[2] or name
