"""Run reports: a self-contained HTML page with real charts, for one run or a comparison."""

from __future__ import annotations

import base64
import json
import math
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qwen_cpt.cli import main
from qwen_cpt.config import CPTConfig
from qwen_cpt.report import (
    ema,
    eval_changes,
    human,
    load_run,
    runtime,
    score_changes,
    smoothing_weight,
    write_report,
)

CHARTS = ("loss", "lr", "throughput", "memory")


def make_run(
    directory: Path,
    steps: int = 50,
    eval_every: int = 25,
    sources: tuple[str, ...] = ("domain", "general"),
    seed: int = 0,
    lr: float = 5e-5,
    extras: bool = True,
    **config,
) -> Path:
    """A run directory as the trainer leaves it: metrics.jsonl, config.yaml, final/."""
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    tokens_per_step = 4096
    records: list[dict] = []
    if extras:
        records.append({"step": 0, "muon_params": 3_000_000, "adamw_params": 1_000_000})

    def evaluate(step: int) -> None:
        rec = {"step": step, "eval_loss": 3.0 - 0.4 * step / steps}
        rec["eval_ppl"] = math.exp(rec["eval_loss"])
        if "domain" in sources:
            rec["eval_loss/domain"] = 3.4 - 0.8 * step / steps  # learns the domain
        if "general" in sources:
            rec["eval_loss/general"] = 2.6 + 0.05 * step / steps  # forgets a little
        records.append(rec)

    if eval_every:
        evaluate(0)
    for step in range(1, steps + 1):
        warm = min(1.0, step / max(1, steps // 10))
        rec = {
            "step": step,
            "epoch": step / steps,
            "loss": 3.2 - 0.8 * step / steps + rng.gauss(0, 0.08),
            "avg_loss": 3.2 - 0.4 * step / steps,
            "lr": lr * warm * (0.5 + 0.5 * math.cos(math.pi * step / steps)),
            "grad_norm": 1.5 - step / steps + abs(rng.gauss(0, 0.1)),
            "tokens_per_sec": 12_000 + rng.gauss(0, 500),
            "tokens_seen": tokens_per_step * step,
            "memory_gb": 10.0 + 2.0 * min(1.0, step / 5),
        }
        if extras:
            rec["tflops"] = 150 + rng.gauss(0, 5)
            rec["mfu"] = 0.4 + rng.gauss(0, 0.01)
        records.append(rec)
        if eval_every and step % eval_every == 0 and step != steps:
            evaluate(step)
    if eval_every:
        evaluate(steps)
    if extras:
        records.append({"step": steps, "train_runtime_s": 3723.0})
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = CPTConfig(
        model_name_or_path="Qwen/Qwen2.5-0.5B",
        output_dir=str(directory),
        learning_rate=lr,
        max_steps=steps,
        **config,
    )
    cfg.to_yaml(directory / "config.yaml")
    (directory / "final").mkdir()
    (directory / "final" / "trainer_state.json").write_text(
        json.dumps({"step": steps, "tokens_seen": tokens_per_step * steps, "best_eval_loss": 2.6})
    )
    return directory


def assert_real_png(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.is_file(), path
    assert path.stat().st_size > 5_000, path
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert w > 200 and h > 150, (path, img.shape)
    rgb = (img[..., :3].reshape(-1, 3) * 255).astype(np.uint32)
    colours = np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2])
    assert len(colours) > 20, f"{path} is (nearly) a single colour"


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


# --- one run ---------------------------------------------------------------------------------------


def test_single_run_report(tmp_path):
    run = make_run(tmp_path / "qwen-math-cpt")
    path = write_report([run])
    assert path == run / "report.html"
    page = path.read_text(encoding="utf-8")

    pngs = embedded_pngs(page)
    assert len(pngs) == 4
    for data in pngs:
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
    for chart in CHARTS:
        assert_real_png(run / f"report_{chart}.png")
        assert f'href="report_{chart}.png"' in page
    assert "<script" not in page  # self-contained and static
    assert re.search(r"(src|href)=\"https?://", page) is None

    # names the run and the metrics
    assert "qwen-math-cpt" in page
    for text in ("eval_loss", "eval_loss/domain", "eval_loss/general", "domain", "general"):
        assert text in page
    for section in ("Learning", "Forgetting", "Run cost", "Setup", "Resolved config"):
        assert section in page
    # forgetting: general got worse and is flagged, domain got better
    assert 'class="worse"' in page
    assert "Got worse: general." in page
    assert "▼ better" in page
    # setup: config, optimizer split, run time
    assert "learning_rate" in page and "Qwen/Qwen2.5-0.5B" in page
    assert "Muon: 3,000,000 (75.0%)" in page and "AdamW: 1,000,000 (25.0%)" in page
    assert "1h 02m 03s" in page  # train_runtime_s = 3723
    assert "final/" in page
    # run cost: median MFU (logged as a fraction) in percent, TFLOPS
    assert re.search(r">(39|40)\.\d%<", page)
    assert "peak memory GB" in page and ">12.00<" in page


def test_forgetting_numbers(tmp_path):
    run = load_run(make_run(tmp_path / "r"))
    changes = {c.key: c for c in eval_changes(run)}
    assert list(changes) == ["eval_loss", "eval_loss/domain", "eval_loss/general"]
    dom, gen = changes["eval_loss/domain"], changes["eval_loss/general"]
    assert (dom.before_step, dom.after_step) == (0, 50)
    assert dom.before == pytest.approx(3.4) and dom.after == pytest.approx(2.6)
    assert dom.delta == pytest.approx(-0.8) and dom.pct == pytest.approx(-0.8 / 3.4 * 100)
    assert gen.delta == pytest.approx(0.05) and gen.source == "general"
    assert changes["eval_loss"].source == "all eval data"


def test_eval_steps_map_to_tokens(tmp_path):
    run = load_run(make_run(tmp_path / "r"))
    assert run.tokens_at([0, 25, 50]) == [0, 25 * 4096, 50 * 4096]
    assert run.tokens_at([60]) == [pytest.approx(60 * 4096)]  # beyond the end: average rate


def test_html_is_escaped(tmp_path):
    run = make_run(
        tmp_path / "a<b>&c",
        sources=(),
        eval_every=25,
        train_files=["<script>alert(1)</script>.txt"],
    )
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 50, 'eval_loss/"x"<y>': 2.0}) + "\n")
    page = write_report([run]).read_text()
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.txt" in page
    assert "a&lt;b&gt;&amp;c" in page
    assert "a<b>&c" not in page
    assert "&quot;x&quot;&lt;y&gt;" in page


# --- awkward runs ----------------------------------------------------------------------------------


def test_run_without_eval(tmp_path):
    run = make_run(tmp_path / "no-eval", eval_every=0, extras=False)
    page = write_report([run]).read_text()
    assert "No eval records" in page
    assert len(embedded_pngs(page)) == 4
    for chart in CHARTS:
        assert_real_png(run / f"report_{chart}.png")
    # no optimizer counts, no train_runtime_s: fall back to the config and the throughput
    assert "AdamW for all parameters (counts not logged)" in page
    assert "tokens per second" in page


@pytest.mark.parametrize("steps", [1, 2])
def test_very_short_runs(tmp_path, steps):
    run = make_run(tmp_path / f"short{steps}", steps=steps, eval_every=1)
    page = write_report([run]).read_text()
    assert len(embedded_pngs(page)) == 4
    assert "eval_loss/domain" in page


def test_run_with_one_eval_and_nothing_else(tmp_path):
    """Killed right after the step-0 eval: no training records, no config.yaml."""
    run = tmp_path / "killed"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 0, "eval_loss": 3.0, "eval_loss/domain": 3.3})
        + "\n"
        + '{"step": 1, "lo'
    )
    page = write_report([run]).read_text()
    assert "one eval only" in page
    assert "no training records" in page
    assert "1 unreadable line(s)" in page
    assert "No config.yaml found" in page
    assert len(embedded_pngs(page)) == 4


def test_resumed_run_and_non_finite_values(tmp_path):
    run = tmp_path / "resumed"
    run.mkdir()
    lines = [
        {"step": 1, "loss": 3.0, "tokens_seen": 100},
        {"step": 2, "loss": "nan", "tokens_seen": 200},
        {"step": 3, "loss": 2.8, "tokens_seen": 300},
        {"step": 2, "loss": 2.9, "tokens_seen": 200},  # resumed from checkpoint-1
        {"step": 3, "loss": 2.7, "tokens_seen": 300},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    loaded = load_run(run)
    assert loaded.series("loss") == ([1, 2, 3], [3.0, 2.9, 2.7])
    write_report([run])
    assert_real_png(run / "report_loss.png")


def test_missing_run_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        write_report([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        write_report([tmp_path / "empty"])


# --- comparison ------------------------------------------------------------------------------------


def test_two_run_comparison(tmp_path):
    a = make_run(tmp_path / "lr-5e-5", seed=1, lr=5e-5)
    b = make_run(tmp_path / "lr-1e-4-muon", seed=2, lr=1e-4, use_muon_optimizer=True)
    out = write_report([a, b])
    assert out == a / "report.html"
    page = out.read_text()
    assert "lr-5e-5" in page and "lr-1e-4-muon" in page
    # the same model, no source, the same day: the folder's name tells them apart
    day = load_run(a).name.rsplit(" · ", 1)[1]
    assert (
        f"Training report: Qwen2.5-0.5B · {day} (lr-5e-5) vs Qwen2.5-0.5B · {day} (lr-1e-4-muon)"
        in page
    )
    assert len(embedded_pngs(page)) == 4
    for chart in CHARTS:
        assert_real_png(a / f"report_{chart}.png")
    # config fields that differ are marked
    assert "3 field(s) differ between the runs:" in page
    diff_rows = re.findall(r'<tr class="diff"><td><code>([^<]+)</code>', page)
    assert {"learning_rate", "use_muon_optimizer", "output_dir"} <= set(diff_rows)
    assert "max_steps" not in diff_rows
    # a forgetting table per run
    assert page.count("Got worse: general.") == 2


def test_runs_with_the_same_directory_name_are_told_apart(tmp_path):
    a = make_run(tmp_path / "exp1" / "output")
    b = make_run(tmp_path / "exp2" / "output", seed=3)
    page = write_report([a, b], tmp_path / "compare.html").read_text()
    assert "exp1/output" in page and "exp2/output" in page
    assert_real_png(tmp_path / "compare_loss.png")


def test_comparison_with_and_without_eval(tmp_path):
    a = make_run(tmp_path / "with-eval")
    b = make_run(tmp_path / "without-eval", eval_every=0, extras=False)
    out = write_report([a, b], tmp_path / "cmp")
    assert out == tmp_path / "cmp" / "report.html"
    page = out.read_text()
    assert "No eval records" in page and "Got worse: general." in page
    for chart in CHARTS:
        assert_real_png(tmp_path / "cmp" / f"report_{chart}.png")


# --- helpers ---------------------------------------------------------------------------------------


def test_smoothing_and_formatting():
    assert ema([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])  # debiased
    assert ema([0.0, 1.0], 0.0) == [0.0, 1.0]
    assert smoothing_weight(3) == 0.0
    assert 0.5 < smoothing_weight(50) < smoothing_weight(500) < 1
    assert human(1234) == "1.23K" and human(5.6e9) == "5.6B" and human(12) == "12"


def test_runtime_falls_back_to_throughput(tmp_path):
    run = load_run(make_run(tmp_path / "r", extras=False))
    secs, source = runtime(run)
    assert secs == pytest.approx(50 * 4096 / 12_000, rel=0.1)
    assert "tokens per second" in source


def test_without_matplotlib_the_report_still_has_tables(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    run = make_run(tmp_path / "r")
    page = write_report([run]).read_text()
    assert "matplotlib is not installed" in page
    assert "eval_loss/general" in page
    assert not list(run.glob("*.png"))


# --- CLI -------------------------------------------------------------------------------------------


def test_cli_report(tmp_path, capsys):
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b", seed=5)
    assert main(["report", str(a), str(b)]) == 0
    assert capsys.readouterr().out.strip() == str(a / "report.html")
    assert re.search(
        r"Training report: Qwen2\.5-0\.5B · [0-9-]+ \(a\) vs Qwen2\.5-0\.5B · [0-9-]+ \(b\)",
        (a / "report.html").read_text(),
    )


def test_cli_report_out_and_errors(tmp_path, capsys):
    a = make_run(tmp_path / "a")
    assert main(["report", str(a), "--out", str(tmp_path / "x.html")]) == 0
    assert (tmp_path / "x.html").is_file() and (tmp_path / "x_loss.png").is_file()
    capsys.readouterr()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err


# --- optional: what a browser shows ----------------------------------------------------------------


def test_report_renders_in_a_headless_browser(tmp_path):
    browser = next(
        (
            shutil.which(b)
            for b in ("chromium", "chromium-browser", "google-chrome")
            if shutil.which(b)
        ),
        None,
    )
    if browser is None:
        pytest.skip("no chromium on PATH")
    report = write_report([make_run(tmp_path / "r")])
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1280,2400",
            report.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert_real_png(shot)


# --- what the run used, perplexity, smoothing, names, downstream scores -------------------------------


def _append_records(run: Path, records: list[dict]) -> None:
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in records))


def _row(page: str, label: str) -> str:
    """The <tr> of a table row whose first cell contains ``label``."""
    m = re.search(r"<tr[^>]*>(?:(?!</tr>).)*" + re.escape(label) + r"(?:(?!</tr>).)*</tr>", page)
    assert m, label
    return m.group(0)


def test_setup_shows_the_kernel_and_precision_used_not_the_config(tmp_path):
    run = make_run(tmp_path / "cpu", use_flash_attention=True, use_bf16=True)
    records = (run / "metrics.jsonl").read_text().splitlines()
    first = json.loads(records[0])
    first.update(attention="sdpa", precision="fp32", torch_compile=False)
    (run / "metrics.jsonl").write_text("\n".join([json.dumps(first), *records[1:]]) + "\n")
    page = write_report([run]).read_text()
    assert '<span data-metric="attention">sdpa</span>' in page
    assert '<span data-metric="precision">fp32</span>' in page
    assert '<span data-metric="torch_compile">off</span>' in page
    # an old run that did not log them says so instead of repeating the config
    old = write_report([make_run(tmp_path / "old", use_flash_attention=True)]).read_text()
    assert '<span data-metric="attention">not recorded' in old
    assert "flash_attention_2" not in old


def test_perplexity_per_eval_set_final_and_best(tmp_path):
    run = make_run(tmp_path / "ppl", steps=40, eval_every=10)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        if "eval_loss/general" in r:  # general is best at step 0 (forgetting), domain at the end
            r["eval_ppl/general"] = math.exp(r["eval_loss/general"])
            r["eval_ppl/domain"] = math.exp(r["eval_loss/domain"])
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    page = write_report([run]).read_text()
    general, domain = _row(page, ">general <code"), _row(page, ">domain <code")
    # general: before 2.6, after 2.65, best 2.6 at step 0 with perplexity e^2.6 = 13.5
    assert re.search(
        r">2\.6000<span class=\"step\">step 0</span></td><td[^>]*><span data-metric=\"eval_ppl/general\">13\.5<",
        general,
    )
    assert f"{math.exp(2.6):.3g} → {math.exp(2.65):.3g}" in general
    # domain: best is the last eval, 2.6 at step 40
    assert re.search(
        r">2\.6000<span class=\"step\">step 40</span></td><td[^>]*><span data-metric=\"eval_ppl/domain\">13\.5<",
        domain,
    )
    # the summary has the last overall eval perplexity: e^2.6
    assert re.search(r'data-metric="eval_ppl">eval perplexity, last</th>', page)


@pytest.mark.parametrize("steps", [8, 60])
def test_train_loss_is_called_smoothed_only_when_it_is(tmp_path, steps):
    run = make_run(tmp_path / f"s{steps}", steps=steps)
    page = write_report([run]).read_text()
    losses = [
        json.loads(x)["loss"]
        for x in (run / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in x
    ]
    cell = re.search(r'<td class="num">([0-9.]+)<div class="step">([^<]*)</div></td>', page)
    assert cell, "the train loss cell"
    value, note = float(cell.group(1)), cell.group(2)
    if steps == 8:  # too short: the raw last value, said to be raw
        assert value == round(losses[-1], 4) and "too few to smooth" in note
    else:
        w = smoothing_weight(len(losses))
        assert value == round(ema(losses, w)[-1], 4) != round(losses[-1], 4)
        assert f"as logged {losses[-1]:.4f}" in note and "EMA" in note


def test_runs_are_named_by_run_name_or_model_source_and_date(tmp_path):
    import datetime as dt

    named = make_run(tmp_path / "run", run_name="legal-cpt-v2")
    assert load_run(named).name == "legal-cpt-v2"
    import yaml

    out = make_run(tmp_path / "out")  # make_run's own `sources` are eval sets: edit config.yaml
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["sources"] = [{"name": "legal", "files": ["x.jsonl"]}, {"name": "web", "files": ["y"]}]
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    today = dt.date.fromtimestamp((out / "config.yaml").stat().st_mtime).isoformat()
    assert load_run(out).name == f"Qwen2.5-0.5B · legal · {today}"
    files = make_run(tmp_path / "out2", train_files=["data/court_rulings.jsonl"])
    assert load_run(files).name == f"Qwen2.5-0.5B · court_rulings.jsonl · {today}"
    page = write_report([named]).read_text()
    assert "<title>Training report: legal-cpt-v2</title>" in page


def test_downstream_before_and_after_with_verdicts(tmp_path):
    run = make_run(tmp_path / "ds", steps=20, eval_every=10)
    d = "downstream/"
    _append_records(run, [
        {"step": 0, f"{d}code_mc/acc": 0.25, f"{d}code_mc/acc_stderr": 0.02,
         f"{d}docs_mc/acc": 0.50, f"{d}docs_mc/acc_stderr": 0.05,
         f"{d}general_mc/acc": 0.60, f"{d}general_mc/acc_stderr": 0.02,
         f"{d}wiki/word_perplexity": 30.0},
        {"step": 20, f"{d}code_mc/acc": 0.40, f"{d}code_mc/acc_stderr": 0.02,
         f"{d}docs_mc/acc": 0.55, f"{d}docs_mc/acc_stderr": 0.05,
         f"{d}general_mc/acc": 0.50, f"{d}general_mc/acc_stderr": 0.02,
         f"{d}wiki/word_perplexity": 25.0},
    ])  # fmt: skip
    changes = {c.key: c for c in score_changes(load_run(run))}
    assert set(changes) == {
        f"{d}code_mc/acc",
        f"{d}docs_mc/acc",
        f"{d}general_mc/acc",
        f"{d}wiki/word_perplexity",
    }
    assert changes[f"{d}code_mc/acc"].verdict == "better"  # +0.15 > 2*sqrt(2)*0.02 = 0.057
    assert changes[f"{d}docs_mc/acc"].verdict == "same"  # +0.05 < 2*sqrt(2)*0.05 = 0.141
    assert changes[f"{d}general_mc/acc"].verdict == "worse"
    assert changes[f"{d}wiki/word_perplexity"].verdict == "better"  # lower perplexity is better
    page = write_report([run]).read_text()
    assert page.index('id="downstream"') < page.index('id="learning"')  # at the top
    code = _row(page, 'data-metric="downstream/code_mc/acc">code_mc')
    assert "0.2500" in code and "0.4000" in code and "+0.1500" in code and "▲ better" in code
    assert "same within noise" in _row(page, ">docs_mc<")
    assert "Got worse: general_mc acc." in page
    assert "not in the metric registry" not in page


def test_answer_section_gives_loss_verdicts_by_their_noise(tmp_path):
    """The top section: the domain first, a general set judged by eval_loss_se (a rise within
    twice the standard error of the difference is the same), the setup the run used and its
    achieved mix; the eval_files set is shown once, not also as all eval data."""
    run = make_run(tmp_path / "ans", steps=20, eval_every=10, sources=("domain",))
    _append_records(run, [
        {"step": 0, "eval_loss/eval": 3.0, "eval_loss_se/eval": 0.05, "eval_ppl/eval": 20.1,
         "eval_loss/domain": 3.4, "eval_loss_se/domain": 0.01,
         "attention": "sdpa", "precision": "fp32", "torch_compile": False},
        {"step": 20, "eval_loss/eval": 3.1, "eval_loss_se/eval": 0.05, "eval_ppl/eval": 22.2,
         "eval_loss/domain": 2.6, "eval_loss_se/domain": 0.01},
    ])  # fmt: skip
    loaded = load_run(run)
    changes = {c.key: c for c in eval_changes(loaded)}
    assert "eval_loss" not in changes  # the same set as eval_loss/eval
    general = changes["eval_loss/eval"]
    assert general.noise == pytest.approx(2 * math.sqrt(2) * 0.05)
    assert general.verdict == "same" and not general.worse  # +0.1 <= 0.141
    assert changes["eval_loss/domain"].verdict == "better"
    page = write_report([run]).read_text()
    top = page[page.index('id="answer"') : page.index('id="summary"')]
    assert top.index("domain loss") < top.index("eval_files loss")  # the domain first
    assert "3.0000 → 3.1000" in top and "same within noise" in top and "0.1414" in top
    assert "general (eval_files) loss the same within noise" in top
    assert "attention sdpa; precision fp32; torch.compile off" in top
    assert "not in the metric registry" not in page
