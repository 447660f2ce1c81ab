"""The docs are tested like code, so they stay true as the code changes.

- docs/config.md equals what scripts/gen_config_reference.py writes from the live ``CPTConfig``.
- Every ```python block of README.md and then docs/guide.en.md runs, in order, one namespace per
  document, all in one temporary directory that holds small ``data/`` files (a block identical to
  one already run, comments aside, runs once), with these substitutions (the rule, applied to
  every block):
    * ``Qwen/<model>`` hub ids become the session's tiny model (``tiny_qwen``);
    * ``max_length=<n>`` becomes 64, ``per_device_train_batch_size=<n>`` and
      ``gradient_accumulation_steps=<n>`` become 1: the tiny model still has Qwen's 152k-row LM
      head, and a full 2048-token batch of 16 blocks costs minutes on a shared 2-core CPU;
    * ``dataloader_num_workers=<n>`` becomes 0 (worker tokenization has its own tests);
    * ``WANDB_MODE=offline``, so ``wandb_project`` runs the W&B code path without a network.
  A block preceded by the line ``<!-- no-test -->`` is skipped (use sparingly).
- docs/guide.zh.md holds the same code as the English guide: its python blocks equal the English
  ones token for token once comments are dropped, and its shell commands are the same.
- Every ```yaml block of the docs and every examples/*.yaml loads into ``CPTConfig``; the quickstart
  example trains for two steps; the planner figures quoted for the other examples hold.
- In ```bash blocks, a line whose program is ``qwen-cpt`` must parse with the real CLI parser
  (``qwen_cpt.cli.build_parser``); ``train`` configs with their flag overrides must validate, and
  ``plan`` commands on examples must run. ``torchrun`` lines (also under ``srun``) must parse
  with torchrun's own parser and launch ``-m qwen_cpt``, whose arguments are checked as above.
  Lines that run other programs (SHELL_PROGRAMS: make, tensorboard, pip, kill, sbatch) and shell
  assignments are skipped; any other program fails the test, so that a new kind of command gets
  a deliberate decision here. The ``qwen-cpt`` commands in the examples'
  comments are checked the same way.
- The troubleshooting tables (between ``<!-- errors:begin -->`` and ``<!-- errors:end -->``) quote
  messages in backticks in their first column; every quoted fragment must occur in a string
  literal under src/qwen_cpt/ (all fragments of a row in the same file), and both guides quote
  the same messages.
- The performance tables (``<!-- perf-table:begin/end -->``) show only measured figures: a row
  either says "not measured yet" / "尚未测量", or has a date and figures found in BENCHMARKS.md.
- In-page anchors and relative links of the docs resolve.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import json
import math
import re
import shlex
import tokenize
from pathlib import Path

import pytest
import yaml

from qwen_cpt import CPTConfig
from qwen_cpt.cli import build_parser, main

from .conftest import SAMPLE_TEXTS

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src" / "qwen_cpt"
README = REPO / "README.md"
GUIDE_EN = REPO / "docs" / "guide.en.md"
GUIDE_ZH = REPO / "docs" / "guide.zh.md"
CONFIG_MD = REPO / "docs" / "config.md"
GUIDES = [GUIDE_EN, GUIDE_ZH]
DOCS = [README, GUIDE_EN, GUIDE_ZH]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
GEN_SCRIPT = REPO / "scripts" / "gen_config_reference.py"
REGEN_COMMAND = ".venv/bin/python scripts/gen_config_reference.py  (or: make docs)"

NO_TEST = "<!-- no-test -->"
SHELL_PROGRAMS = {"make", "tensorboard", "pip", "kill", "sbatch"}
NOT_MEASURED = ("not measured yet", "尚未测量")


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# --- markdown helpers -----------------------------------------------------------------------------


def code_blocks(path: Path, lang: str) -> list[tuple[int, str, bool]]:
    """``[(line number, code, skipped)]`` of the fenced ```lang blocks of ``path``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == f"```{lang}":
            start = i + 1
            j = start
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            prev = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
            blocks.append((start + 1, "\n".join(lines[start:j]) + "\n", prev == NO_TEST))
            i = j + 1
        else:
            i += 1
    return blocks


def section(path: Path, name: str) -> str:
    text = path.read_text(encoding="utf-8")
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    assert text.count(begin) == 1 and text.count(end) == 1, f"{_rel(path)}: {begin} ... {end}"
    return text.split(begin, 1)[1].split(end, 1)[0]


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the markdown tables in ``text``, as lists of cells."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|") or re.fullmatch(r"\|[\s|:-]+\|", line):
            continue
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows[1:] if rows else rows  # the first row of each section's table is its header


# --- 1. the config reference ----------------------------------------------------------------------


def _gen_module():
    spec = importlib.util.spec_from_file_location("gen_config_reference", GEN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_current():
    expected = _gen_module().render()
    current = CONFIG_MD.read_text(encoding="utf-8") if CONFIG_MD.is_file() else ""
    assert current == expected, f"docs/config.md is out of date; run: {REGEN_COMMAND}"


def test_config_reference_lists_every_field_once():
    import dataclasses

    gen = _gen_module()
    groups = gen.field_groups(CPTConfig)
    listed = [name for _, names in groups for name in names]
    assert listed == [f.name for f in dataclasses.fields(CPTConfig)]
    assert "other" not in [title for title, _ in groups]  # every field sits under a group comment
    text = gen.render()
    for f in dataclasses.fields(CPTConfig):
        assert text.count(f"| `{f.name}` |") == 1, f.name


# --- 2. python blocks run --------------------------------------------------------------------------


def _write_sample_data(root: Path) -> None:
    data = root / "data"
    data.mkdir()
    lines = "".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXTS)
    (data / "train.jsonl").write_text(lines, encoding="utf-8")
    (data / "heldout.jsonl").write_text(
        "".join(json.dumps({"text": t[::-1]}) + "\n" for t in SAMPLE_TEXTS[:6]), encoding="utf-8"
    )


def adapt(code: str, model: str) -> str:
    code = re.sub(r"Qwen/Qwen[\w.\-]*", model, code)
    code = re.sub(r"\bmax_length=\d+", "max_length=64", code)
    code = re.sub(r"\bper_device_train_batch_size=\d+", "per_device_train_batch_size=1", code)
    code = re.sub(r"\bgradient_accumulation_steps=\d+", "gradient_accumulation_steps=1", code)
    return re.sub(r"\bdataloader_num_workers=\d+", "dataloader_num_workers=0", code)


def test_python_blocks_run(tiny_qwen, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # offline, not disabled: wandb keeps the first mode it sees for the whole process, and the
    # tracker tests after this one need offline runs
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    _write_sample_data(tmp_path)
    done: set[str] = set()  # the guide repeats the README's snippet: run each code once
    for doc in (README, GUIDE_EN):
        blocks = code_blocks(doc, "python")
        assert blocks, f"{_rel(doc)} has no python block"
        namespace: dict = {"__name__": "__docs__"}
        for line, code, skipped in blocks:
            key = ast.dump(ast.parse(code))  # the same code however it is laid out
            if skipped or key in done:
                continue
            try:
                exec(compile(adapt(code, tiny_qwen), f"{_rel(doc)}:{line}", "exec"), namespace)
            except Exception as exc:
                pytest.fail(
                    f"{_rel(doc)}, python block at line {line}: {type(exc).__name__}: {exc}"
                )
            done.add(key)
            if "final_loss" in namespace:
                assert math.isfinite(namespace["final_loss"]), f"{_rel(doc)}:{line}"
    assert (tmp_path / "cpt_output" / "final" / "model.safetensors").is_file()


def _code_tokens(code: str) -> list[tuple[int, str]]:
    skip = {tokenize.COMMENT, tokenize.NL}
    return [
        (t.type, t.string)
        for t in tokenize.generate_tokens(io.StringIO(code).readline)
        if t.type not in skip
    ]


def _shell_lines(path: Path) -> list[tuple[int, list[str]]]:
    """``[(line number, words)]`` of the commands in the ```bash blocks, comments dropped."""
    out = []
    for start, code, _ in code_blocks(path, "bash"):
        for offset, raw in enumerate(code.replace("\\\n", " ").splitlines()):
            words = shlex.split(raw, comments=True)
            if words:
                out.append((start + offset, words))
    return out


def test_chinese_guide_has_the_same_code():
    en, zh = code_blocks(GUIDE_EN, "python"), code_blocks(GUIDE_ZH, "python")
    assert len(en) == len(zh), "guide.en.md and guide.zh.md differ in their python blocks"
    for (en_line, en_code, en_skip), (zh_line, zh_code, zh_skip) in zip(en, zh):
        assert _code_tokens(en_code) == _code_tokens(zh_code) and en_skip == zh_skip, (
            f"python block at guide.en.md:{en_line} differs from guide.zh.md:{zh_line} "
            "(comments aside)"
        )
    assert [w for _, w in _shell_lines(GUIDE_EN)] == [w for _, w in _shell_lines(GUIDE_ZH)]


# --- 3. configs load ---------------------------------------------------------------------------------


def test_there_are_examples():
    names = {p.name for p in EXAMPLES}
    assert {"quickstart_tiny.yaml", "domain_cpt_qwen2.5_7b.yaml"} <= names, names
    assert any(yaml.safe_load(p.read_text())["learning_rate"] == "auto" for p in EXAMPLES)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads(path):
    cfg = CPTConfig.from_yaml(path)
    assert cfg.model_name_or_path


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_yaml_blocks_load(doc):
    for line, code, skipped in code_blocks(doc, "yaml"):
        if not skipped:
            try:
                CPTConfig.from_dict(yaml.safe_load(code), source=f"{_rel(doc)}:{line}")
            except Exception as exc:
                pytest.fail(f"{_rel(doc)}, yaml block at line {line}: {exc}")


def test_quickstart_example_trains(tiny_qwen, tmp_path, monkeypatch):
    from qwen_cpt import CPTTrainer

    monkeypatch.chdir(REPO)  # its data paths are relative to the repository root
    overrides = {"model_name_or_path": tiny_qwen, "output_dir": str(tmp_path / "out")}
    overrides |= {"max_steps": 2, "logging_steps": 1, "resume_from_checkpoint": None}
    overrides |= {"max_length": 64, "per_device_train_batch_size": 2}
    cfg = CPTConfig.from_yaml(REPO / "examples" / "quickstart_tiny.yaml", overrides)
    assert math.isfinite(CPTTrainer(cfg).train())
    records = [
        json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().split("\n") if x
    ]
    assert any("eval_loss" in r for r in records)
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


def _plan(example: str, tokens: float, gpu: str, **changes):
    from qwen_cpt.planner import load_shape, lookup_gpu, make_plan

    cfg = CPTConfig.from_yaml(REPO / "examples" / example, changes)
    shape, _ = load_shape(cfg.model_name_or_path)
    return make_plan(cfg, shape, int(tokens), gpu=lookup_gpu(gpu))


def test_7b_example_memory_claims():
    """examples/domain_cpt_qwen2.5_7b.yaml and section 6 of the guides quote these estimates."""
    name = "domain_cpt_qwen2.5_7b.yaml"
    muon = _plan(name, 2e9, "H200")
    adamw = _plan(name, 2e9, "H200", use_muon_optimizer=False)
    assert muon.memory["fits"] and round(muon.memory["peak_gib"], -1) == 110
    assert not adamw.memory["fits"] and round(adamw.memory["peak_gib"]) == 134
    assert not _plan(name, 2e9, "H100").memory["fits"]
    assert not _plan(name, 2e9, "A100").memory["fits"]


def test_auto_lr_example_matches_the_guides():
    plan = _plan("auto_lr_qwen2.5_1.5b.yaml", 5e8, "H100")
    assert plan.learning_rate["source"] != "from the config"  # learning_rate: auto
    value = f"{plan.learning_rate['value']:.2g}".replace("e-05", "e-5")
    for guide in GUIDES:
        text = guide.read_text(encoding="utf-8")
        assert f"--learning_rate {value}" in text, (_rel(guide), value)


# --- 4. shell commands parse ---------------------------------------------------------------------------


def _example_comment_commands() -> list[tuple[str, list[str]]]:
    out = []
    for path in EXAMPLES:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            m = re.match(r"#\s+(qwen-cpt .*)$", line)
            if m:
                command = re.sub(r"<[^>]+>", "1", m.group(1))  # a placeholder such as <value>
                out.append((f"{_rel(path)}:{n}", shlex.split(command, comments=True)))
    return out


def _all_commands() -> list[tuple[str, list[str]]]:
    out = [(f"{_rel(d)}:{n}", words) for d in DOCS for n, words in _shell_lines(d)]
    return out + _example_comment_commands()


def _torchrun_target(where: str, args: list[str]) -> list[str]:
    """The qwen-cpt arguments of a torchrun command; torchrun's own flags must parse too."""
    from torch.distributed.run import get_args_parser

    try:
        ns = get_args_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: torchrun rejects {shlex.join(args)}")
    launches = (ns.module and ns.training_script == "qwen_cpt") or (
        ns.no_python and ns.training_script == "qwen-cpt"
    )
    assert launches, f"{where}: torchrun should start `-m qwen_cpt` (or --no-python qwen-cpt)"
    return ns.training_script_args


def test_shell_commands_in_docs_exist(capsys):
    commands = _all_commands()
    checked = 0
    for where, words in commands:
        if any("$(" in w for w in words[:1]):  # a shell variable assignment (SLURM script)
            continue
        while words and re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0]):  # VAR=value prefixes
            words = words[1:]
        if words[0] == "srun":  # SLURM starts the command on every node
            words = words[1:]
        program = words[0]
        if program == "torchrun":
            args = _torchrun_target(where, words[1:])
        elif program in SHELL_PROGRAMS:
            continue
        else:
            assert program == "qwen-cpt", f"{where}: unknown program {program!r} in a bash block"
            args = words[1:]
        try:
            ns = build_parser().parse_args(args)
        except SystemExit as exc:
            if exc.code == 0 and ("--help" in args or "-h" in args):
                continue
            pytest.fail(f"{where}: qwen-cpt rejects {shlex.join(words)}: {capsys.readouterr().err}")
        for arg in args:
            if arg.startswith("examples/"):
                assert (REPO / arg).is_file(), f"{where}: {arg} does not exist"
        if ns.command == "train" and ns.config and ns.config.startswith("examples/"):
            from qwen_cpt.config import field_types

            overrides = {k: v for k, v in vars(ns).items() if k in field_types()}
            CPTConfig.from_yaml(REPO / ns.config, overrides)
        checked += 1
    assert checked >= 10, "expected the docs to show qwen-cpt commands"


def test_plan_commands_in_docs_run(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    plans = {tuple(w) for _, w in _all_commands() if w[:2] == ["qwen-cpt", "plan"]}
    assert plans
    for words in sorted(plans):
        assert main(list(words[1:])) == 0, f"{shlex.join(words)}: {capsys.readouterr().err}"
    capsys.readouterr()


# --- 5. troubleshooting tables quote the code ---------------------------------------------------------


def _literals(path: Path) -> list[str]:
    """The string literals of a source file; an f-string's fields become NUL, so no quoted
    fragment can span one."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.JoinedStr):
            out.append(
                "".join(
                    v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else "\0"
                    for v in node.values
                )
            )
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append(node.value)
    return out


def error_fragments(guide: Path) -> list[tuple[str, ...]]:
    rows = table_rows(section(guide, "errors"))
    assert rows, f"{_rel(guide)}: the troubleshooting table is empty"
    out = []
    for cells in rows:
        parts = tuple(p.strip() for p in re.findall(r"`([^`]+)`", cells[0]))
        assert parts, f"{_rel(guide)}: no quoted message in row {cells[0]!r}"
        out.append(parts)
    return out


def test_troubleshooting_messages_occur_in_the_code():
    literals = {p: _literals(p) for p in sorted(SRC.rglob("*.py"))}
    missing = []
    for guide in GUIDES:
        for parts in error_fragments(guide):
            if not any(
                all(any(part in lit for lit in lits) for part in parts)
                for lits in literals.values()
            ):
                missing.append(" … ".join(parts))
    assert not missing, (
        "troubleshooting rows quote messages that src/qwen_cpt/ no longer prints; update the "
        "tables in docs/guide.en.md and docs/guide.zh.md: " + "; ".join(sorted(set(missing)))
    )


def test_both_guides_explain_the_same_messages():
    assert error_fragments(GUIDE_EN) == error_fragments(GUIDE_ZH)


def test_key_messages_are_explained():
    quoted = {p for parts in error_fragments(GUIDE_EN) for p in parts}
    for needed in (
        "invalid configuration",
        "malformed JSON",
        "could not load a causal LM from",
        "cannot resume exactly from",
        "disk full while saving",
        "non-finite",
        "stopped by",
        "wandb_project is set but wandb is not installed",
        "TensorBoard logging is off",
        "precision: fp32 (use_bf16: this CPU has no native bf16 matmul)",
        "flash-attn is not installed: pip install",
        "differs from eager attention",
    ):
        assert needed in quoted, needed


# --- 6. the performance table shows measurements only ---------------------------------------------------


@pytest.mark.parametrize("guide", GUIDES, ids=_rel)
def test_performance_table_shows_only_measured_figures(guide):
    bench = REPO / "BENCHMARKS.md"
    measured = bench.read_text(encoding="utf-8") if bench.is_file() else ""
    rows = table_rows(section(guide, "perf-table"))
    assert rows
    for cells in rows:
        assert len(cells) == 5, cells  # setup | machine | date | throughput | peak memory
        shown = [c for c in cells[3:] if not any(m in c for m in NOT_MEASURED)]
        if not shown:
            continue
        where = f"{_rel(guide)}, row {cells[0]!r}"
        assert measured, f"{where} shows figures, but there is no BENCHMARKS.md"
        assert re.search(r"\d{4}-\d{2}-\d{2}", cells[2]), f"{where}: no date"
        assert cells[1] and not any(m in cells[1] for m in NOT_MEASURED), f"{where}: no machine"
        for figure in re.findall(r"\d[\d,.]*", " ".join(shown)):
            assert figure in measured, f"{where}: {figure} is not in BENCHMARKS.md"


# --- 7. links ------------------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS + [CONFIG_MD], ids=_rel)
def test_links_resolve(doc):
    text = doc.read_text(encoding="utf-8")
    anchors = {_slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        if path:
            assert (doc.parent / path).exists(), f"{_rel(doc)}: broken link {target}"
        elif anchor:
            assert anchor in anchors, f"{_rel(doc)}: no heading for #{anchor}"


def test_readme_points_to_the_docs():
    text = README.read_text(encoding="utf-8")
    for target in ("docs/guide.en.md", "docs/guide.zh.md", "docs/config.md", "examples/"):
        assert f"]({target})" in text, target
    assert "make demo" in text and "make test" in text
