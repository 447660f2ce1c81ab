"""The demo at a small budget: a base pretrained here, then CPT with and without replay.

What must hold at any budget: the base already knows its language (its domain loss starts well
below ln(vocab), where an untrained model sits), the domain loss falls in both CPT runs, no
held-out document is trained on, and the printed rows are the numbers in metrics.jsonl.
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("lm_eval")

from qwen_cpt import demo  # noqa: E402
from qwen_cpt.tasks import held_out  # noqa: E402


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = demo.run_demo(str(out), budget=0.25, task_limit=8)
    return out, result


def test_demo_starts_from_a_pretrained_base_and_learns_the_domain(ran, capsys):
    out, result = ran
    assert result["base_loss"] < math.log(demo.VOCAB) - 0.5  # not an untrained model
    assert result["improved"]
    for name in ("cpt-no-replay", "cpt-replay"):
        rows = {label: (b, a, v) for label, b, a, v in result["results"][name]}
        b, a, v = rows["domain loss (code)"]
        assert a < b and v == "better", (name, rows)
        assert {"general loss", "stdlib_next_line acc", "docs_next_sentence acc"} <= set(rows)
        # the printed numbers are the run's own first and last eval
        recs = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in recs if "eval_loss/code" in r]
        assert evals[0]["eval_loss/code"] == b and evals[-1]["eval_loss/code"] == a
        assert evals[0]["step"] == 0
        page = (out / name / "report.html").read_text()
        assert "What the run learned, and what it kept" in page and "domain" in page
    # the replay run trained on both sources, in about the configured mix
    recs = [json.loads(x) for x in (out / "cpt-replay" / "metrics.jsonl").read_text().splitlines()]
    share = [r["data_share/general"] for r in recs if "data_share/general" in r][-1]
    assert 0.15 < share < 0.45


def test_demo_reuses_its_base_and_never_trains_on_held_out_text(ran):
    out, _ = ran
    bases = list(out.glob("base-*/run/final/config.json"))
    assert len(bases) == 1
    for kind, corpus in (("general", demo.general_corpus()), ("code", demo.code_corpus())):
        train = (out / "data" / f"{kind}_train.jsonl").read_text(encoding="utf-8")
        trained = {json.loads(x)["text"] for x in train.splitlines()}
        for name, text in corpus:
            assert (text in trained) != held_out(name), name
    # a second build with the same inputs finds the cached base
    general = (out / "data" / "general_train.jsonl", out / "data" / "general_heldout.jsonl")
    assert demo.build_base(out, out / "data", general, 0.25) == bases[0].parent


def test_roff_text_keeps_words_and_drops_markup():
    src = '.TH LS 1\n.SH "NAME"\nls \\- list \\fBdirectory\\fR contents\n.PP\n\\(bu item\n'
    assert demo.roff_text(src) == "NAME\nls - list directory contents\n item"
