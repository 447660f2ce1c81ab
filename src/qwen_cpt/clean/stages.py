"""Names shared by the cleaning modules (a leaf: imports no other qwen_cpt module)."""

from __future__ import annotations

# The order in which a document meets the stages; the first that removes it is its verdict.
STAGES = ("language", "quality", "decontamination", "exact_dedup", "near_dedup")
KEPT = 0
CODE = {name: i + 1 for i, name in enumerate(STAGES)}
MANIFEST = "clean_manifest.json"
REPORT_JSON = "clean_report.json"
REPORT_HTML = "clean_report.html"


def library_versions() -> dict[str, str]:
    """Versions of qwen-cpt and of the libraries whose results the output depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("qwen-cpt", "rensa", "py3langid", "datatrove", "zstandard", "numpy", "xxhash"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
