"""``qwen-cpt clean``: clean a corpus before training on it.

Reads every input format the trainer reads and writes ``part-*.jsonl.zst`` shards, a report
(``clean_report.html`` and ``clean_report.json``) and ``clean_manifest.json`` (resolved options,
library versions, input digests). Stages, each optional: language identification (py3langid),
quality heuristics (datatrove's Gopher and FineWeb filters), decontamination against eval files
(13-gram windows), exact dedup on normalized text and near-duplicate removal (rensa MinHash LSH).

Modules: :mod:`.options` (the knobs), :mod:`.text` (normalization and tokens), :mod:`.langid`,
:mod:`.quality`, :mod:`.decontam`, :mod:`.pipeline` (the resumable, parallel job),
:mod:`.report`, :mod:`.stages` (names they share).
"""

from __future__ import annotations

import argparse
import dataclasses

from ..config import parse_bool
from .options import CleanOptions, option_help, option_types
from .pipeline import clean
from .stages import MANIFEST, REPORT_HTML, REPORT_JSON

__all__ = [
    "MANIFEST",
    "REPORT_HTML",
    "REPORT_JSON",
    "CleanOptions",
    "add_clean_parser",
    "clean",
    "run_clean",
]


def add_clean_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``clean`` to the ``qwen-cpt`` subcommands; every :class:`CleanOptions` field is a
    flag (``--near-dedup false``, ``--languages en zh``)."""
    p = subparsers.add_parser(
        "clean",
        help="dedup, filter and decontaminate a corpus into .jsonl.zst shards, with a report",
        description="Clean a corpus: language, quality, decontamination, exact and "
        "near-duplicate stages; writes part-*.jsonl.zst shards and clean_report.html.",
    )
    p.add_argument("--input", nargs="+", required=True, help="files, directories or globs")
    p.add_argument("--output", required=True, help="new directory for the cleaned shards")
    helps, types = option_help(), option_types()
    for f in dataclasses.fields(CleanOptions):
        hint = types[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw: dict = {"dest": f.name, "default": argparse.SUPPRESS}
        if hint is bool:
            kw.update(type=parse_bool, metavar="BOOL")
        elif hint is int or hint is float:
            kw.update(type=hint, metavar=hint.__name__.upper())
        elif "list" in str(hint):
            kw.update(nargs="*", metavar="VALUE")
        else:
            kw.update(metavar="TEXT")
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            help=f"{helps[f.name]} [default: {default!r}]".replace("%", "%%"),
            **kw,
        )
    return p


def run_clean(args: argparse.Namespace) -> int:
    names = {f.name for f in dataclasses.fields(CleanOptions)}
    opts = CleanOptions(**{k: v for k, v in vars(args).items() if k in names})
    report = clean(args.input, args.output, opts)
    t = report["totals"]
    removed = ", ".join(
        f"{s['stage']} {s['documents_removed']:,}"
        for s in report["stages"]
        if s["documents_removed"]
    )
    print(
        f"cleaned {args.output}: kept {t['documents_out']:,} of {t['documents_in']:,} documents "
        f"({t['bytes_out'] / 1e6:,.1f} of {t['bytes_in'] / 1e6:,.1f} MB) in {t['shards']} shards"
        f"{'; removed: ' + removed if removed else ''}; report: {args.output}/{REPORT_HTML}"
    )
    return 0
