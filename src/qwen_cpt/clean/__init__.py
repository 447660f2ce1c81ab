"""``qwen-cpt clean``: clean a corpus before training on it.

Reads every input format the trainer reads and writes ``part-*.jsonl.zst`` shards, a report
(``clean_report.html`` and ``clean_report.json``) and ``clean_manifest.json`` (resolved options,
library versions, input digests). Stages, each optional: language identification (py3langid),
quality heuristics (datatrove's Gopher and FineWeb filters), decontamination against eval files
(13-gram windows), exact dedup on normalized text and near-duplicate removal (rensa MinHash LSH).

The same options clean a corpus on its way into a ``prepare`` cache (``qwen-cpt prepare --clean
true``) and a training source that asks for it (``sources: [{..., clean: {...}}]``), through
the same :func:`clean`; a run that reads a cleaned output records which
(:func:`cleaned_inputs`).

Modules: :mod:`.options` (the knobs), :mod:`.text` (normalization and tokens), :mod:`.langid`,
:mod:`.quality`, :mod:`.decontam`, :mod:`.pipeline` (the resumable, parallel job),
:mod:`.report`, :mod:`.stages` (names they share).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path

from ..config import parse_bool
from .options import CleanOptions, option_help, option_types, options_from
from .pipeline import clean, removed_summary
from .stages import MANIFEST, REPORT_HTML, REPORT_JSON

log = logging.getLogger("qwen_cpt")

__all__ = [
    "MANIFEST",
    "REPORT_HTML",
    "REPORT_JSON",
    "CleanOptions",
    "add_clean_options",
    "add_clean_parser",
    "clean",
    "clean_for_prepare",
    "clean_source",
    "cleaned_inputs",
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
    add_clean_options(p)
    return p


def add_clean_options(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per :class:`CleanOptions` field but those in ``skip`` (``prepare`` has its
    own ``--workers``, ``--text-field`` ...)."""
    helps, types = option_help(), option_types()
    for f in dataclasses.fields(CleanOptions):
        if f.name in skip:
            continue
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


def run_clean(args: argparse.Namespace) -> int:
    report = clean(args.input, args.output, _options(args))
    t = report["totals"]
    removed = removed_summary(report)
    print(
        f"cleaned {args.output}: kept {t['documents_out']:,} of {t['documents_in']:,} documents "
        f"({t['bytes_out'] / 1e6:,.1f} of {t['bytes_in'] / 1e6:,.1f} MB) in {t['shards']} shards"
        f"{'; removed: ' + removed if removed else ''}; report: {args.output}/{REPORT_HTML}"
    )
    return 0


def _options(args: argparse.Namespace) -> CleanOptions:
    names = {f.name for f in dataclasses.fields(CleanOptions)}
    return CleanOptions(**{k: v for k, v in vars(args).items() if k in names})


def clean_for_prepare(args: argparse.Namespace) -> tuple[list[str], list[Path], Path]:
    """``prepare --clean true``: clean ``--input`` into ``<output>.clean`` (resumable, reused
    when a killed ``prepare`` runs again) and return what ``prepare`` then reads: the cleaned
    shards, the clean files it copies into the cache, and that folder (removed once the cache
    is written)."""
    out = Path(args.output).expanduser()
    if out.exists() and any(out.iterdir()):
        from ..data.types import DataError

        raise DataError(f"--output: {str(out)!r} exists and is not empty")
    target = out.with_name(out.name + ".clean")
    clean(args.input, target, _options(args), reuse=True, what="prepare --clean")
    shards = sorted(str(p) for p in target.glob("part-*.jsonl.zst"))
    if not shards:
        from ..data.types import DataError

        raise DataError(f"prepare --clean: every document was removed ({target / REPORT_HTML})")
    return shards, [target / MANIFEST, target / REPORT_JSON, target / REPORT_HTML], target


def clean_source(src: dict, index: int, cfg) -> list[Path]:
    """The cleaned shards of the training source ``src`` (``sources[index]``, which has a
    ``clean`` entry), cleaning it first when that was not done yet.

    The options default to the run's reading options, and decontamination to the run's own
    eval data (``eval_files``, the source's ``eval_files``, ``eval_tasks``). The output goes to
    ``clean_output`` (default ``<output_dir>/cleaned/<name>``); a finished output of the same job
    is reused (a resumed run cleans nothing), one of another job is refused. Under torchrun
    rank 0 cleans while the others wait for its manifest."""
    from ..data.sources import expand_paths

    where = f"sources[{index}] ({src['name']}).clean"
    listed = lambda v: v if isinstance(v, list) else [v]  # noqa: E731
    defaults = {
        "text_field": src.get("text_field", cfg.text_field),
        "txt_split": cfg.txt_split,
        "skip_bad_records": cfg.skip_bad_records,
        "eval_files": list(cfg.eval_files) + listed(src.get("eval_files", [])),
        "eval_tasks": list(cfg.eval_tasks),
    }
    opts = options_from(src["clean"], where, defaults)
    out = Path(src.get("clean_output") or Path(cfg.output_dir) / "cleaned" / src["name"])
    what = f"sources[{index}] ({src['name']}).files"
    files = [str(f) for f in expand_paths(listed(src["files"]), what, cfg.output_dir)]
    if os.environ.get("RANK", "0") == "0":
        clean(files, out, opts, reuse=True, what=f"{where} output")
    else:
        _wait_for(out / MANIFEST, 60.0 * getattr(cfg, "distributed_timeout_minutes", 30))
    shards = sorted(out.glob("part-*.jsonl.zst"))
    if not shards:
        from ..data.types import DataError

        raise DataError(f"{where}: every document was removed ({out / REPORT_HTML})")
    return shards


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for rank 0 to write {path}")
        time.sleep(1.0)


def cleaned_inputs(sources: dict) -> dict[str, dict]:
    """``{source name: what cleaned it}`` for the sources (``{name: source}`` with ``.files``)
    that read a ``qwen-cpt clean`` output or a cache prepared with ``--clean``: the output, its
    job and options digests, documents in and out, and the report. Saved in trainer_state.json
    and logged, so a run says which cleaning its data went through."""
    out = {}
    for name, source in sources.items():
        folders = []
        for f in getattr(source, "files", None) or []:
            if not isinstance(f, (str, os.PathLike)):  # in-memory texts have no files
                continue
            f = Path(f)
            for folder in (f, f.parent):
                if (folder / MANIFEST).is_file() and folder not in folders:
                    folders.append(folder)
        for folder in folders:
            try:
                m = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if m.get("kind") != "qwen-cpt clean output":
                continue
            options = json.dumps(m.get("options", {}), sort_keys=True).encode()
            out[name] = {
                "clean_output": str(folder),
                "job": m.get("job"),
                "options_digest": hashlib.sha256(options).hexdigest()[:16],
                "documents_in": m.get("documents_in"),
                "documents_out": m.get("documents_out"),
                "report": str(folder / REPORT_HTML),
            }
    return out
