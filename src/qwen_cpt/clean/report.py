"""The cleaning report: ``clean_report.json`` and ``clean_report.html`` beside the shards.

Everything in it is a function of the input and the options (no times, no paths of the output),
so a rerun of a killed job writes the same report as an uninterrupted job.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from .options import CleanOptions
from .stages import CODE, KEPT, STAGES, library_versions

_DESCRIPTION = {
    "language": "language not kept (or its probability below min_language_score)",
    "quality": "failed a Gopher / FineWeb quality rule",
    "decontamination": "shares an n-gram window with an eval set",
    "exact_dedup": "same normalized text as an earlier document",
    "near_dedup": "estimated Jaccard similarity >= threshold with an earlier kept document",
}


def _stage_table(stage: np.ndarray, nbytes: np.ndarray) -> list[dict]:
    rows = []
    alive = np.ones(len(stage), dtype=bool)
    for name in STAGES:
        removed = stage == CODE[name]
        rows.append(
            {
                "stage": name,
                "documents_in": int(alive.sum()),
                "bytes_in": int(nbytes[alive].sum()),
                "documents_removed": int(removed.sum()),
                "bytes_removed": int(nbytes[removed].sum()),
                "documents_out": int((alive & ~removed).sum()),
                "bytes_out": int(nbytes[alive & ~removed].sum()),
            }
        )
        alive &= ~removed
    return rows


def build_report(
    files, origin, opts: CleanOptions, eval_stats, scans, resolved, writes, work: Path
):
    names = [str(f) for f in files]
    snippets = {(i, int(d)): s for i, w in enumerate(writes) for d, s in w["snippets"].items()}
    all_stage, all_bytes, all_lang = [], [], []
    per_source: dict[str, dict] = {}
    per_file = []
    for i in range(len(files)):
        z = np.load(work / f"scan-{i:05d}.npz")
        stage = np.load(work / f"keep-{i:05d}.npy")
        nbytes, lang = z["bytes"], z["lang"]
        all_stage.append(stage)
        all_bytes.append(nbytes)
        all_lang.append(lang)
        src = per_source.setdefault(origin[i], {"stage": [], "bytes": []})
        src["stage"].append(stage)
        src["bytes"].append(nbytes)
        per_file.append(
            {
                "file": names[i],
                "source": origin[i],
                "documents_in": int(len(stage)),
                "bytes_in": int(nbytes.sum()),
                "documents_out": int(np.count_nonzero(stage == KEPT)),
                "bytes_out": int(nbytes[stage == KEPT].sum()),
                "shard": writes[i]["shard"],
                "skipped_records": scans[i]["skipped_records"],
            }
        )
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dtype=dt)  # noqa: E731
    stage, nbytes, lang = cat(all_stage, np.uint8), cat(all_bytes, np.uint64), cat(all_lang, "U8")

    mix_in: Counter = Counter()
    mix_out: Counter = Counter()
    bytes_in: Counter = Counter()
    for code, b, kept in zip(lang.tolist(), nbytes.tolist(), (stage == KEPT).tolist()):
        mix_in[code] += 1
        bytes_in[code] += b
        if kept:
            mix_out[code] += 1
    languages = [
        {
            "language": code,
            "documents_in": n,
            "bytes_in": bytes_in[code],
            "documents_out": mix_out[code],
        }
        for code, n in sorted(mix_in.items(), key=lambda kv: (-kv[1], kv[0]))
    ]

    rules: dict[str, dict] = {}
    for i, scan in enumerate(scans):
        for rule, count in scan["rules"].items():
            r = rules.setdefault(rule, {"rule": rule, "documents": 0, "samples": []})
            r["documents"] += count
            for s in scan["samples"].get(rule, []):
                if len(r["samples"]) < opts.samples_per_rule:
                    r["samples"].append({"file": names[i], **s})
    for kind, listed in resolved["dedup_samples"].items():
        if not listed:
            continue
        r = rules.setdefault(kind, {"rule": kind, "documents": 0, "samples": []})
        r["documents"] = int(np.count_nonzero(stage == CODE[kind]))
        for s in listed:
            f, d = s["doc"]
            kf, kd = s["kept"]
            r["samples"].append(
                {
                    "file": names[f],
                    "doc": d,
                    "snippet": snippets.get((f, d), ""),
                    "duplicate_of": {
                        "file": names[kf],
                        "doc": kd,
                        "snippet": snippets.get((kf, kd), ""),
                    },
                    "similarity": s["similarity"],
                }
            )

    clusters = []
    for c in resolved["clusters"]:
        kf, kd = c["kept"]
        clusters.append(
            {
                "kind": c["kind"],
                "size": c["size"],
                "kept": {"file": names[kf], "doc": kd, "snippet": snippets.get((kf, kd), "")},
                "removed": [
                    {
                        "file": names[f],
                        "doc": d,
                        "similarity": s,
                        "snippet": snippets.get((f, d), ""),
                    }
                    for f, d, s in c["removed"]
                ],
            }
        )

    contamination = {name: {"documents": 0, "windows": 0, "samples": []} for name in eval_stats}
    for i, scan in enumerate(scans):
        for name, c in scan["contamination"].items():
            t = contamination.setdefault(name, {"documents": 0, "windows": 0, "samples": []})
            t["documents"] += c["documents"]
            t["windows"] += c["windows"]
            for s in c["samples"]:
                if len(t["samples"]) < opts.samples_per_rule:
                    t["samples"].append({"file": names[i], **s})
    for name, t in contamination.items():
        t["action"] = opts.decontaminate
        t["eval_set"] = eval_stats.get(name, {})

    sources = []
    for entry, s in per_source.items():
        st, by = np.concatenate(s["stage"]), np.concatenate(s["bytes"])
        sources.append({"source": entry, "stages": _stage_table(st, by)})
    kept = stage == KEPT
    return {
        "totals": {
            "files": len(files),
            "documents_in": int(len(stage)),
            "bytes_in": int(nbytes.sum()),
            "documents_out": int(kept.sum()),
            "bytes_out": int(nbytes[kept].sum()),
            "skipped_records": sum(s["skipped_records"] for s in scans),
            "shards": sum(1 for w in writes if w["shard"]),
        },
        "stages": _stage_table(stage, nbytes),
        "stage_descriptions": _DESCRIPTION,
        "sources": sources,
        "files": per_file,
        "languages": languages,
        "rules": sorted(
            rules.values(), key=lambda r: (STAGES.index(r["rule"].split(":")[0]), r["rule"])
        ),
        "clusters": clusters,
        "cluster_count": resolved["cluster_count"],
        "contamination": contamination,
        "options": opts.output_options(),
        "library_versions": library_versions(),
    }


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qwen-cpt clean report</title>
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;max-width:1150px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;vertical-align:top}
th{background:#f4f4f4;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.snip{font-family:ui-monospace,monospace;font-size:12px;color:#444;max-width:760px}
.bar{background:#4a7fd0;height:10px;display:inline-block}
.muted{color:#777}
</style></head><body>
<h1>qwen-cpt clean report</h1>
<p>{{ "{:,}".format(t.documents_in) }} documents ({{ mb(t.bytes_in) }}) in {{ t.files }} files;
<b>{{ "{:,}".format(t.documents_out) }} kept</b> ({{ mb(t.bytes_out) }},
{{ pct(t.documents_out, t.documents_in) }} of documents) in {{ t.shards }} shards.
{% if t.skipped_records %}{{ t.skipped_records }} malformed records skipped.{% endif %}</p>

<h2>Stages</h2>
<table><tr><th>stage</th><th>what it removes</th><th>docs in</th><th>removed</th><th>docs out</th><th>MB in</th><th>MB removed</th><th>MB out</th></tr>
{% for s in r.stages %}<tr><td>{{ s.stage }}</td><td>{{ r.stage_descriptions[s.stage] }}</td>
<td class="n">{{ "{:,}".format(s.documents_in) }}</td><td class="n">{{ "{:,}".format(s.documents_removed) }} ({{ pct(s.documents_removed, s.documents_in) }})</td>
<td class="n">{{ "{:,}".format(s.documents_out) }}</td><td class="n">{{ mb(s.bytes_in) }}</td><td class="n">{{ mb(s.bytes_removed) }}</td><td class="n">{{ mb(s.bytes_out) }}</td></tr>{% endfor %}
</table>

<h2>Per source</h2>
<table><tr><th>source</th>{% for s in r.stages %}<th>{{ s.stage }} removed</th>{% endfor %}<th>docs in</th><th>docs out</th></tr>
{% for src in r.sources %}<tr><td>{{ src.source }}</td>{% for s in src.stages %}<td class="n">{{ "{:,}".format(s.documents_removed) }}</td>{% endfor %}
<td class="n">{{ "{:,}".format(src.stages[0].documents_in) }}</td><td class="n">{{ "{:,}".format(src.stages[-1].documents_out) }}</td></tr>{% endfor %}
</table>

<h2>Languages</h2>
<table><tr><th>language</th><th>docs in</th><th>share</th><th>MB in</th><th>docs kept</th></tr>
{% for l in r.languages %}<tr><td>{{ l.language }}</td><td class="n">{{ "{:,}".format(l.documents_in) }}</td>
<td><span class="bar" style="width:{{ (200 * l.documents_in / [t.documents_in, 1]|max)|round(1) }}px"></span> {{ pct(l.documents_in, t.documents_in) }}</td>
<td class="n">{{ mb(l.bytes_in) }}</td><td class="n">{{ "{:,}".format(l.documents_out) }}</td></tr>{% endfor %}
</table>

<h2>Contamination</h2>
{% if r.contamination %}<table><tr><th>eval set</th><th>eval docs</th><th>training docs hit</th><th>windows matched</th><th>action</th><th>example window</th></tr>
{% for name, c in r.contamination.items() %}<tr><td>{{ name }}</td><td class="n">{{ c.eval_set.get("documents", "") }}</td><td class="n">{{ c.documents }}</td>
<td class="n">{{ c.windows }}</td><td>{{ c.action }}</td><td class="snip">{{ c.samples[0].window if c.samples else "" }}{% if c.samples %}<br><span class="muted">in {{ c.samples[0].file }} #{{ c.samples[0].doc }}</span>{% endif %}</td></tr>{% endfor %}
</table>{% else %}<p class="muted">No eval files given (--eval-files).</p>{% endif %}

<h2>What each rule removed</h2>
{% for rule in r.rules %}<h3>{{ rule.rule }} — {{ "{:,}".format(rule.documents) }} documents</h3>
<table><tr><th>file #doc</th><th>start of the document</th></tr>
{% for s in rule.samples %}<tr><td>{{ s.file }} #{{ s.doc }}{% if s.get("similarity") %}<br>J≈{{ "%.2f"|format(s.similarity) }}{% endif %}</td>
<td class="snip">{{ s.snippet }}{% if s.get("duplicate_of") %}<br><span class="muted">duplicate of {{ s.duplicate_of.file }} #{{ s.duplicate_of.doc }}: {{ s.duplicate_of.snippet }}</span>{% endif %}</td></tr>{% endfor %}
</table>{% else %}<p class="muted">Nothing was removed.</p>{% endfor %}

<h2>Largest duplicate clusters</h2>
{% if r.clusters %}<table><tr><th>kind</th><th>size</th><th>kept</th><th>some removed members</th></tr>
{% for c in r.clusters %}<tr><td>{{ c.kind }}</td><td class="n">{{ c.size }}</td><td class="snip">{{ c.kept.file }} #{{ c.kept.doc }}<br>{{ c.kept.snippet[:160] }}</td>
<td class="snip">{% for m in c.removed %}{{ m.file }} #{{ m.doc }}{% if m.similarity %} (J≈{{ "%.2f"|format(m.similarity) }}){% endif %}<br>{% endfor %}</td></tr>{% endfor %}
</table>{% else %}<p class="muted">No duplicates.</p>{% endif %}

<h2>Options and versions</h2>
<table>{% for k, v in r.options.items() %}<tr><td>{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}
{% for k, v in r.library_versions.items() %}<tr><td>{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}</table>
</body></html>
"""


def render_html(report: dict) -> str:
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)

    def mb(b) -> str:
        return f"{b / 1e6:,.2f} MB"

    def pct(a, b) -> str:
        return f"{100 * a / b:.1f}%" if b else "–"

    return env.from_string(_TEMPLATE).render(r=report, t=report["totals"], mb=mb, pct=pct)
