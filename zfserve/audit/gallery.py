"""``DIR/summary.json`` and ``DIR/index.html``, both computed from every row in results.parquet (so a resumed
audit summarises the whole corpus, not the last run).

summary.json: inputs and rows, counts per status and flag, accuracy over the images whose label the model
knows and how many rows that is (``labels``: rows with a label, those whose label is one of the model's classes,
and the labels that match no class, with their counts), the out-of-distribution score (images scored and flagged,
the threshold; or that the model has no statistics), the pointing-game rate over the images with a mask (plain hit
rate, the report's figure, and the mean over classes), images per second and wall time of the run, the time per
stage, the model and version, the settings. index.html: an offline page (no script, no network) with that summary, a gallery of the worst
offenders (the image beside its evidence overlay, the prediction, why it was flagged) and the failures with
their reasons.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

SUMMARY_FILE = "summary.json"
INDEX_FILE = "index.html"
FLAGS = ("failed", "misclassified", "low_confidence", "evidence_off_object", "out_of_distribution")
GALLERY_LIMIT = 100        # worst offenders shown on the page (all of them are in results.parquet)


def _rate(values) -> float | None:
    values = [bool(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def label_coverage(ok: list[dict]) -> dict:
    """Of the readable rows: how many carry a label, how many of those labels are the model's classes (what the
    accuracy covers), and the labels that are not, with their counts."""
    labelled = [r for r in ok if r.get("label") is not None]
    unknown: dict[str, int] = {}
    for r in labelled:
        if r.get("correct") is None:
            unknown[r["label"]] = unknown.get(r["label"], 0) + 1
    return {"rows_with_label": len(labelled), "matching_a_class": len(labelled) - sum(unknown.values()),
            "unknown": dict(sorted(unknown.items()))}


def ood_summary(ok: list[dict]) -> dict:
    """How many readable images were scored and flagged out of distribution, and the threshold(s) used."""
    scored = [r for r in ok if r.get("ood_score") is not None]
    return {"scored": len(scored), "flagged": sum(bool(r.get("out_of_distribution")) for r in scored),
            "thresholds": sorted({round(float(r["ood_threshold"]), 6) for r in scored}),
            "note": "" if scored or not ok else "not scored: the model has no out-of-distribution statistics"}


def summarize(rows: list[dict], *, inputs: int, run: dict) -> dict:
    """The summary of ``rows`` (every row of the audit); ``run``: this run's timings and settings."""
    ok = [r for r in rows if r["status"] == "ok"]
    with_mask = [r for r in ok if r.get("pointing_hit") is not None]
    per_class: dict[str, list[bool]] = {}
    for r in with_mask:
        per_class.setdefault(r["target"], []).append(bool(r["pointing_hit"]))
    versions = sorted({r["model_version"] for r in rows if r.get("model_version")})
    return {
        "inputs": inputs, "rows": len(rows),
        "status": {"ok": len(ok), "failed": len(rows) - len(ok)},
        "flags": {flag: sum(bool(r.get(flag)) for r in rows) for flag in FLAGS},
        "accuracy": _rate(r.get("correct") for r in ok),
        "labelled": sum(r.get("correct") is not None for r in ok),
        "labels": label_coverage(ok),
        "out_of_distribution": ood_summary(ok),
        "pointing_game": {"hit_rate": _rate(r["pointing_hit"] for r in with_mask), "images": len(with_mask),
                          "class_mean": (sum(sum(v) / len(v) for v in per_class.values()) / len(per_class))
                          if per_class else None,
                          "tolerance_px": run["settings"]["tolerance"]},
        "model": rows[0]["model"] if rows else None, "model_versions": versions, **run,
    }


def write_summary(out: Path, summary: dict) -> Path:
    path = Path(out) / SUMMARY_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(path)
    return path


def severity(row: dict) -> tuple:
    """Sort key of the gallery, worst first: images outside the model's world (any answer is noise there), then
    confident mistakes, then evidence off the object, then doubt."""
    return (not row.get("out_of_distribution"), not row.get("misclassified"), not row.get("evidence_off_object"),
            -(row.get("probability") or 0.0) if row.get("misclassified") else (row.get("probability") or 0.0),
            row["path"])


def _why(row: dict) -> str:
    reasons = []
    if row.get("out_of_distribution"):
        reasons.append(f"out of distribution: unlike the model's data (score {row['ood_score']:.2f} > threshold "
                       f"{row['ood_threshold']:.2f}); the prediction means little")
    if row.get("misclassified"):
        reasons.append(f"misclassified: label {row['label']}")
    if row.get("evidence_off_object"):
        reasons.append(f"evidence off the object ({row['pointing_distance']:.0f} px away)"
                       if row.get("pointing_distance") is not None else "evidence off the object")
    if row.get("low_confidence"):
        reasons.append(f"low confidence ({row['probability']:.2f})")
    return "; ".join(reasons)


def accuracy_text(summary: dict) -> str:
    labels = summary["labels"]
    if summary["accuracy"] is None:
        return f"- (none of {summary['rows']} rows has a label that is one of the model's classes)"
    return (f"{summary['accuracy']:.1%} over {summary['labelled']} of {summary['rows']} rows (those whose label is one "
            f"of the model's classes; {labels['rows_with_label']} have a label)")


def unknown_labels_text(labels: dict) -> str:
    unknown = labels["unknown"]
    if not unknown:
        return "none"
    return (f"{len(unknown)} label(s) on {sum(unknown.values())} rows match no class of the model, so the accuracy "
            f"leaves them out: " + ", ".join(f"{name} ({count})" for name, count in unknown.items()))


def ood_text(ood: dict) -> str:
    if not ood["scored"]:
        return ood["note"] or "-"
    return (f"{ood['flagged']} of {ood['scored']} images are unlike the model's data (score above "
            f"{', '.join(f'{t:g}' for t in ood['thresholds'])}); their predictions mean little")


def write_index(out: Path, rows: list[dict], summary: dict) -> Path:
    e = html.escape
    flagged = sorted((r for r in rows if r["status"] == "ok" and any(r.get(f) for f in FLAGS)), key=severity)
    failed = sorted((r for r in rows if r["status"] == "failed"), key=lambda r: r["path"])
    pg = summary["pointing_game"]
    facts = [("images", summary["rows"]), ("ok", summary["status"]["ok"]), ("failed", summary["status"]["failed"]),
             *((f"flag: {k}", v) for k, v in summary["flags"].items()),
             ("accuracy", accuracy_text(summary)),
             ("labels matching no class", unknown_labels_text(summary["labels"])),
             ("out of distribution", ood_text(summary["out_of_distribution"])),
             ("pointing game", "-" if pg["hit_rate"] is None else f"{pg['hit_rate']:.1%} of {pg['images']} with "
              f"masks ({pg['tolerance_px']} px)"),
             ("model", f"{summary['model']} {', '.join(summary['model_versions'])}"),
             ("images per second", f"{summary['images_per_second']:.2f}")]
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>zfserve audit</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
             ".card{display:inline-block;vertical-align:top;width:470px;margin:6px;font-size:13px}"
             ".card img{width:460px;image-rendering:auto}</style></head><body>",
             f"<h1>Audit of {e(str(summary.get('source', '')))}</h1>", "<table id='summary'>"]
    parts += [f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in facts]
    parts.append("</table>")
    shown = flagged[:GALLERY_LIMIT]
    limited = f", the worst {len(shown)} shown" if len(flagged) > len(shown) else ""
    parts.append(f"<h2>Flagged images ({len(flagged)}{limited})</h2>"
                 "<p>Each card: the image as the model sees it (centre crop) and the occlusion evidence for the "
                 "target class over it (red: hiding that region lowers the target's probability).</p>"
                 "<div id='gallery'>")
    for r in shown:
        picture = f"<img src='{e(r['heatmap'])}' alt='evidence'>" if r.get("heatmap") else "<p>(no heatmap)</p>"
        top = ", ".join(f"{c} {p:.2f}" for c, p in zip(r["top_k_classes"][:3], r["top_k_probabilities"][:3]))
        parts.append(f"<div class='card'>{picture}<div><b>{e(r['path'])}</b></div><div>predicted: {e(top)}</div>"
                     f"<div>why: {e(_why(r))}</div></div>")
    parts.append("</div>")
    parts.append(f"<h2>Failed ({len(failed)})</h2><table id='failed'><tr><th>path</th><th>reason</th></tr>")
    parts += [f"<tr><td>{e(r['path'])}</td><td>{e(r['error'] or '')}</td></tr>" for r in failed]
    parts.append("</table></body></html>\n")
    path = Path(out) / INDEX_FILE
    path.write_text("".join(parts))
    return path


__all__ = ["FLAGS", "INDEX_FILE", "SUMMARY_FILE", "accuracy_text", "label_coverage", "ood_summary", "ood_text",
           "severity", "summarize", "unknown_labels_text", "write_index", "write_summary"]
