"""Code cites its facts from docs/design.md, and only from sources inside the repository.

- No file under src/, benchmarks/, scripts/ or tests/ mentions ``REFERENCE.md`` or a path
  relative to a ``shared/`` folder: that folder is not part of the product.
- Code cites a fact as ``(docs/design.md, "<section>")``, one section per citation, the section
  name on one line (the citation may break before it). Every mention of ``docs/design.md``
  follows that format, and every cited section is a ``##`` heading of docs/design.md.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DESIGN = REPO / "docs" / "design.md"
SCANNED_DIRS = ("src", "benchmarks", "scripts", "tests")
SKIPPED_PARTS = {"__pycache__", ".pytest_cache", ".ruff_cache"}

FORBIDDEN = {
    "REFERENCE.md": re.compile(r"REFERENCE\.md"),
    "a shared/ path": re.compile(r"(?<![\w.-])shared/"),
}
MENTION = re.compile(r"docs/design\.md")
# (docs/design.md, "Section"): the section may follow on the next line, after a comment marker.
CITATION = re.compile(r"docs/design\.md,\s*(?:#\s*)?\"([^\"\n]+)\"")


def _files() -> list[Path]:
    out = []
    for top in SCANNED_DIRS:
        for path in sorted((REPO / top).rglob("*")):
            if not path.is_file() or SKIPPED_PARTS & set(path.parts):
                continue
            if path.resolve() == Path(__file__).resolve():
                continue
            out.append(path)
    return out


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary files (images, caches) cite nothing


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _headings() -> set[str]:
    return {
        m.group(1).strip()
        for m in re.finditer(r"^## (.+)$", DESIGN.read_text(encoding="utf-8"), re.MULTILINE)
    }


def test_no_file_cites_sources_outside_the_repository():
    found = []
    for path in _files():
        text = _text(path)
        if text is None:
            continue
        for what, pattern in FORBIDDEN.items():
            for m in pattern.finditer(text):
                found.append(f"{path.relative_to(REPO)}:{_line(text, m.start())} ({what})")
    assert not found, "cite docs/design.md instead of:\n" + "\n".join(found)


def test_every_design_citation_names_a_section_in_the_citation_format():
    loose = []
    for path in _files():
        text = _text(path)
        if text is None:
            continue
        cited = {m.start() for m in CITATION.finditer(text)}
        for m in MENTION.finditer(text):
            if m.start() not in cited:
                loose.append(f"{path.relative_to(REPO)}:{_line(text, m.start())}")
    hint = 'cite as (docs/design.md, "<section>"), naming a section, at:'
    assert not loose, "\n".join([hint, *loose])


def test_every_cited_section_is_a_heading_of_the_design_note():
    headings = _headings()
    assert headings, f"{DESIGN.relative_to(REPO)} has no ## headings"
    missing = []
    for path in _files():
        text = _text(path)
        if text is None:
            continue
        for m in CITATION.finditer(text):
            if m.group(1) not in headings:
                where = f"{path.relative_to(REPO)}:{_line(text, m.start())}"
                missing.append(f'{where}: "{m.group(1)}"')
    assert not missing, (
        f"sections not among the ## headings of docs/design.md ({sorted(headings)}):\n"
        + "\n".join(missing)
    )


def _import_graph() -> dict[str, set[str]]:
    """``module -> qwen_cpt modules it imports`` (also inside functions), from the source."""
    import ast

    root = REPO / "src" / "qwen_cpt"
    files = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for t in targets:  # a package's own __init__ is not an import "back"
                if t in files and t != name and not name.startswith(t + "."):
                    graph[name].add(t)
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = _import_graph()
    assert "qwen_cpt.run" in graph["qwen_cpt.trainer"]  # the graph sees imports
    assert "qwen_cpt.checkpoint" in graph["qwen_cpt.distributed"]  # ... also inside functions

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph[start] - seen:
            seen.add(nxt)
            if nxt == goal or reaches(nxt, goal, seen):
                return True
        return False

    cycles = sorted(m for m in graph if reaches(m, m, set()))
    assert not cycles, f"modules on an import cycle: {cycles}"
