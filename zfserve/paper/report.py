"""The paper's figures as files and one page: each section (one module of :mod:`zfserve.paper` per figure or
table) writes one PNG per figure (matplotlib, labelled axes), the numbers behind it as JSON (and CSV for tables
and curves) and ``section-<name>.json`` (title, figures, metrics) into the output directory; ``report.html``,
one offline page that shows every figure with a sentence on how to read it, is rebuilt from whatever section
files are there, so sections can be run one at a time (``zfserve report invariance ...``) or all together.

A new figure is one module (``TITLE``, ``section(model, data, out, settings)``, ``summary(metrics)``) plus one
entry in :data:`REGISTRY`. The modules are imported when their section runs, so that the CLI can build its
parser from :data:`SECTIONS` and :class:`Settings` without loading torch.
"""

from __future__ import annotations

import html
import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidArgumentError, ZFServeError
from .figures import jsonable, log, write_json, write_section

# The one registry: section name -> the module of zfserve.paper that computes and draws it, in page order.
REGISTRY = {"top9": "top9", "evolution": "evolution", "invariance": "invariance", "architecture": "architecture",
            "occlusion": "localization", "faithfulness": "faithfulness", "correspondence": "correspondence",
            "filters": "filters"}
SECTIONS = tuple(REGISTRY)
HTML_FILE = "report.html"


def section_module(name: str):
    """The module behind section ``name`` (imported on first use)."""
    if name not in REGISTRY:
        raise InvalidArgumentError(f"section: {name!r}; accepted: {', '.join(SECTIONS)}, all", field="section")
    return importlib.import_module(f"{__package__}.{REGISTRY[name]}")


@dataclass
class Settings:
    """How much each section computes. Defaults are the report's; tests shrink them."""

    n: int = 200                               # images of the analysis set (top-9 search, pointing game, energy)
    seed: int = 3                              # synthetic seed (held out from training)
    data: str = "synthetic"
    batch: int = 16
    top9_layers: tuple | None = None           # None: the paper's Fig. 2 layers (top9.figure_layers)
    maps_per_layer: int = 4
    k: int = 9
    invariance_images: int = 5                 # the paper's five
    amounts: dict = field(default_factory=dict)   # transform -> amounts (default: invariance.default_amounts)
    correspondence_images: int = 10
    occlusion_examples: int = 3
    window: int = 48                           # occluder side (pixels)
    stride: int = 16                           # occluder stride of the Fig. 7 examples
    pointing_stride: int = 32                  # occluder stride of the pointing game (every image: coarser)
    pointing_n: int | None = None              # images of the pointing game and deconv energy (None: n)
    arch_steps: int = 40
    arch_batch: int = 16
    arch_pool: int = 128                       # synthetic training images the architecture runs share
    arch_lr: float = 0.04                      # see architecture.architecture_runs
    map_seed: int = 0                          # which feature maps are shown
    faithfulness_images: int = 44              # faithfulness: pointing game, deletion / insertion (4 per class)
    sanity_images: int = 6                     # faithfulness: MPRT and RandomLogit (the first of those)
    faithfulness_stride: int = 24              # occluder stride of the faithfulness maps (side: window)
    deletion_steps: int = 16                   # deletion / insertion steps (1/16 of the pixels each)
    deconv_units: int = 9                      # last-conv units behind the deconvnet map (the paper's top-9)


# ------------------------------------------------------------------------------------------------- driver
def build(model, out, sections=SECTIONS, settings: Settings | None = None, *, strict: bool = True) -> dict:
    """Run ``sections`` into ``out`` and rebuild ``report.html``. With ``strict=False`` a section that cannot
    run on this model or data (say, no recorded evolution) is noted in the report instead of failing."""
    from .dataset import AnalysisData
    s = settings or Settings()
    modules = {name: section_module(name) for name in sections}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = AnalysisData(s.data, seed=s.seed, n=s.n)
    model.eval()
    timings = {}
    for name in sections:
        t0 = time.perf_counter()
        log(f"{name}: start ({data.describe()})")
        _run_section(name, modules[name], model, data, out, s, strict)
        timings[name] = round(time.perf_counter() - t0, 1)
        log(f"{name}: done in {timings[name]} s")
    meta = {"model": model.config.name, "data": data.describe(), "timings_s": timings,
            "settings": dict(vars(s))}
    previous = out / "report.json"
    if previous.is_file():
        old = json.loads(previous.read_text())
        meta["timings_s"] = old.get("timings_s", {}) | timings
    write_json(previous, meta)
    write_html(out, title=f"zfserve report: {model.config.name}", meta=meta)
    return meta


def _run_section(name: str, module, model, data, out: Path, s: Settings, strict: bool) -> None:
    """One section into ``out``. A section that applies to some architectures only (``module.ARCHITECTURES``:
    ZFNet's training record, its layer-1 comparison) is noted on the page for other members, never failed; with
    ``strict=False`` so is a section that cannot run on this model or data."""
    only = getattr(module, "ARCHITECTURES", None)
    if only is not None and model.config.architecture not in only:
        write_section(out, name, module.TITLE, [], {}, note=f"not produced: {module.ONLY_NOTE} ({model.config.name} "
                                                           f"is {model.config.architecture})")
        log(f"{name}: skipped: applies to {', '.join(only)} only")
        return
    try:
        module.section(model, data, out, s)
    except ZFServeError as exc:
        if strict:
            raise
        write_section(out, name, module.TITLE, [], {}, note=f"not produced: {exc}")
        log(f"{name}: skipped: {exc}")


def summary_rows(metrics: dict) -> list[tuple[str, str, str]]:
    """The headline numbers of the sections present (``metrics``: section name -> its metrics), in page order:
    (measure, value, what the paper or the project's acceptance expects)."""
    return [row for name in SECTIONS if name in metrics for row in section_module(name).summary(metrics[name])]


def write_html(out, *, title: str = "zfserve report", meta: dict | None = None) -> Path:
    """One offline page: every section's figures (relative links), captions, metrics and tables."""
    out = Path(out)
    esc = html.escape
    parts = [f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "img{max-width:100%;border:1px solid #ccc}figure{margin:1.5em 0}figcaption{margin-top:.4em}"
             "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:.2em .6em}"
             "pre{background:#f4f4f4;padding:.6em;overflow-x:auto;font-size:85%}.note{color:#a00}</style>"
             "</head><body>", f"<h1>{esc(title)}</h1>"]
    if meta:
        parts.append(f"<p>Model <b>{esc(str(meta.get('model')))}</b>, data {esc(str(meta.get('data')))}. "
                     f"Reproduces the analyses of Zeiler &amp; Fergus (2014), sections 3-4. Numbers behind every "
                     f"figure are in the JSON/CSV files linked under it.</p>")
    found = [(name, out / f"section-{name}.json") for name in SECTIONS if (out / f"section-{name}.json").is_file()]
    rows = summary_rows({name: json.loads(path.read_text()).get("metrics", {}) for name, path in found})
    if rows:
        parts.append("<h2 id='summary'>Summary</h2><table><tr><th>measure</th><th>value</th><th>expected "
                     "(paper / acceptance)</th></tr>"
                     + "".join(f"<tr><td>{esc(a)}</td><td>{esc(b)}</td><td>{esc(c)}</td></tr>" for a, b, c in rows)
                     + "</table>")
    parts.append("<ul>" + "".join(f"<li><a href='#{n}'>{esc(json.loads(p.read_text())['title'])}</a></li>"
                                  for n, p in found) + "</ul>")
    for name, path in found:
        sec = json.loads(path.read_text())
        parts.append(f"<h2 id='{esc(name)}'>{esc(sec['title'])}</h2>")
        if sec.get("note"):
            parts.append(f"<p class='note'>{esc(sec['note'])}</p>")
        for figure in sec["figures"]:
            parts.append(f"<figure><img src='{esc(figure['file'])}' alt='{esc(sec['title'])}'>"
                         f"<figcaption>{esc(figure['caption'])}")
            if figure.get("data"):
                parts.append(" Data: " + ", ".join(f"<a href='{esc(d)}'>{esc(d)}</a>" for d in figure["data"]))
            parts.append("</figcaption></figure>")
            table = figure.get("table")
            if table:
                parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in table["header"]) + "</tr>"
                             + "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>"
                                       for row in table["rows"]) + "</table>")
        if sec.get("metrics"):
            parts.append("<details><summary>metrics</summary><pre>"
                         + esc(json.dumps(sec["metrics"], indent=1, default=jsonable)) + "</pre></details>")
    parts.append("</body></html>\n")
    path = out / HTML_FILE
    path.write_text("".join(parts))
    return path
