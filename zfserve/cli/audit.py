"""``zfserve audit``: a corpus audit (see :mod:`zfserve.audit`), locally, on a server or on Ray."""

from __future__ import annotations

import sys

from ..engine.results import DEFAULT_TOP_K
from .common import (CommandError, add_occlusion_mode_options, model_help, occlusion_mode_arguments,
                     remote_client)

EXIT_INTERRUPTED = 130


def _window_stride(text: str) -> tuple[int, int]:
    try:
        window, stride = (int(v) for v in text.split(","))
    except ValueError:
        raise CommandError(f"--occlusion: {text!r} is not WINDOW,STRIDE (e.g. 48,32)", field="occlusion") from None
    return window, stride


def add_audit(sub) -> None:
    from ..audit.defaults import DEFAULT_BATCH_SIZE, DEFAULT_LOW_CONFIDENCE, DEFAULT_OCCLUSION, DEFAULT_TOLERANCE
    p = sub.add_parser("audit", help="audit a corpus: predictions, occlusion evidence and flags for every image",
                       description=cmd_audit.__doc__)
    p.add_argument("source", metavar="SOURCE",
                   help="a folder (recursive; root/<class>/... gives labels), a .csv/.parquet manifest (path, "
                        "label, mask_path) or synthetic:N")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (results.parquet, heatmaps/, "
                   "summary.json, index.html); the same DIR resumes an unfinished audit")
    p.add_argument("--model", default=None, help=model_help())
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help=f"classes per image (default {DEFAULT_TOP_K})")
    w, s = DEFAULT_OCCLUSION
    p.add_argument("--occlusion", default=f"{w},{s}", metavar="WINDOW,STRIDE",
                   help=f"occluder side and stride in pixels (default {w},{s}, the report's pointing game)")
    p.add_argument("--no-occlusion", action="store_true", help="predictions only (no evidence, no heatmaps)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"images per batch and per written part (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--workers", type=int, default=1,
                   help="threads reading the next batches ahead (with --ray: actors, one CPU each); default 1")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="the first N inputs only")
    p.add_argument("--low-confidence", type=float, default=DEFAULT_LOW_CONFIDENCE,
                   help=f"flag images whose top-1 probability is below this (default {DEFAULT_LOW_CONFIDENCE})")
    p.add_argument("--tolerance", type=int, default=DEFAULT_TOLERANCE,
                   help=f"pointing-game tolerance in pixels (default {DEFAULT_TOLERANCE})")
    p.add_argument("--no-heatmaps", action="store_true", help="write no heatmap PNGs")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="engine device (default cpu)")
    p.add_argument("--server", default=None, metavar="HOST:PORT",
                   help="run the model on a zfserve server instead of loading it here (token from $ZFSERVE_TOKEN)")
    p.add_argument("--ray", nargs="?", const=True, default=None, metavar="ADDRESS",
                   help="run on Ray Data: a local Ray instance, or the cluster at ADDRESS (needs zfserve[ray])")
    p.add_argument("--quiet", action="store_true", help="no progress bar (nor the gate's progress lines)")
    p.add_argument("--exact", action="store_true", help="exact occlusion (fp32, every position), whatever the "
                   "agreement gate says")
    add_occlusion_mode_options(p, "None given: the fastest mode that passes the agreement gate (measured on first "
                               "use for the model and settings), else exact. Given: that mode alone is gated")
    add_gate_options(p)
    p.set_defaults(func=cmd_audit)


def add_gate_options(p) -> None:
    from ..audit.defaults import DEFAULT_GATE_IMAGES, DEFAULT_MIN_AGREEMENT
    g = p.add_argument_group("agreement gate (fast occlusion modes against exact)")
    g.add_argument("--gate-images", type=int, default=DEFAULT_GATE_IMAGES,
                   help=f"held-out images it compares on (default {DEFAULT_GATE_IMAGES})")
    g.add_argument("--gate-data", default="auto", help="held-out images: auto (default: the synthetic set, seed 4, "
                   "for models of its classes, else the folder the model's int8 graph was calibrated on, less the "
                   "images calibration used), synthetic[:SEED], or a folder (ImageFolder, or annotations.json for "
                   "masks)")
    g.add_argument("--gate-min-agreement", type=float, default=DEFAULT_MIN_AGREEMENT,
                   help=f"the share of images on which a mode's evidence location, pointing hit and flag must agree "
                        f"with exact (default {DEFAULT_MIN_AGREEMENT})")


def _gate(args) -> dict:
    return {"images": args.gate_images, "data": args.gate_data, "min_agreement": args.gate_min_agreement}


def _candidates(args, model):
    """The modes the gate may choose from: the one the mode options name, or None (every candidate)."""
    given = occlusion_mode_arguments(args)
    if not any(v is not None for v in given.values()):
        return None
    from ..engine.occlusion_modes import mode_from
    from ..weights import read_snapshot
    config = read_snapshot(model).config
    return [mode_from(**given, defaults=(config.engine, config.precision))]


def cmd_audit(args) -> int:
    """Audit every image of SOURCE: one row per input in DIR/results.parquet (failures with their reason), heatmaps
    of flagged images, DIR/summary.json and an offline DIR/index.html. Ctrl-C keeps what is written; the same
    command resumes. Exit 0 when the audit is complete (failed images are rows, not errors), 130 when interrupted."""
    from ..audit import AuditInterrupted, run
    occlusion = None if args.no_occlusion else _window_stride(args.occlusion)
    if args.exact and any(v is not None for v in occlusion_mode_arguments(args).values()):
        raise CommandError("--exact and the mode options (--engine, --precision, --approximation, ...): choose one",
                           field="exact")
    options = dict(model=args.model, top_k=args.top_k, occlusion=occlusion, batch_size=args.batch_size,
                   workers=args.workers, limit=args.limit, ray=args.ray, low_confidence=args.low_confidence,
                   tolerance=args.tolerance, heatmaps=not args.no_heatmaps, device=args.device, quiet=args.quiet,
                   exact=args.exact, gate=_gate(args),
                   log=None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True)))
    if not args.server and occlusion is not None:
        options["candidates"] = _candidates(args, args.model)
    try:
        if args.server:
            from ..client import RemoteAuditBackend
            with remote_client(args) as client:
                summary = run(args.source, args.out, backend=RemoteAuditBackend(client, args.model or ""), **options)
        else:
            summary = run(args.source, args.out, **options)
    except AuditInterrupted as exc:
        print(f"zfserve audit: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    _print_summary(summary)
    return 0


def _print_summary(s: dict) -> None:
    from ..audit.gallery import accuracy_text, ood_text, unknown_labels_text
    flags = ", ".join(f"{k} {v}" for k, v in s["flags"].items())
    pg = s["pointing_game"]
    lines = [f"audit: {s['rows']} rows for {s['inputs']} inputs: {s['status']['ok']} ok, {s['status']['failed']} "
             f"failed; flags: {flags}",
             f"accuracy: {accuracy_text(s)}",
             *([f"labels: {unknown_labels_text(s['labels'])}"] if s["labels"]["unknown"] else []),
             f"out of distribution: {ood_text(s['out_of_distribution'])}",
             f"pointing game: {'-' if pg['hit_rate'] is None else format(pg['hit_rate'], '.1%')} "
             f"({pg['images']} with masks)",
             f"this run: {s['this_run']['rows_written']} images in {s['wall_s']:.1f} s "
             f"({s['images_per_second']:.2f}/s), {s['this_run']['skipped_done']} already done",
             *([f"occlusion: {mode['note']}"] if (mode := s.get("occlusion_mode")) and mode.get("note") else []),
             f"results: {s['out']}/results.parquet; summary.json; index.html"]
    print("\n".join(lines))


# ---------------------------------------------------------------------------------------------------- occlusion-gate
def add_occlusion_gate(sub) -> None:
    from ..audit.defaults import DEFAULT_OCCLUSION, DEFAULT_TOLERANCE
    p = sub.add_parser("occlusion-gate", help="measure fast occlusion modes against exact on held-out images (the "
                       "audit's and the explorer's agreement gate)", description=cmd_occlusion_gate.__doc__)
    p.add_argument("--model", default=None, help=model_help())
    w, s = DEFAULT_OCCLUSION
    p.add_argument("--occlusion", default=f"{w},{s}", metavar="WINDOW,STRIDE",
                   help=f"occluder side and stride (default {w},{s}, the audit's; the explorer's default map is 32,8)")
    p.add_argument("--tolerance", type=int, default=DEFAULT_TOLERANCE,
                   help=f"pointing-game tolerance in pixels (default {DEFAULT_TOLERANCE})")
    p.add_argument("--precisions", default="int8,bf16,fp32",
                   help="the candidates' precisions, comma-separated (default int8,bf16,fp32; int8 is made on first "
                        "use, a few minutes)")
    p.add_argument("--all", action="store_true", help="measure every candidate (default: stop at the first, fastest "
                   "first, that passes)")
    p.add_argument("--json", action="store_true", help="print the stored figures as JSON")
    add_gate_options(p)
    p.set_defaults(func=cmd_occlusion_gate)


def cmd_occlusion_gate(args) -> int:
    """Compare fast occlusion modes (batched on ONNX Runtime / OpenVINO, fp32 / int8 / bf16, every position or an
    approximation) with exact occlusion on held-out images: per image, where the largest drop is, the
    pointing-game hit and the evidence flag; store the figures beside the model (occlusion-gate.json) and print
    them with the mode the audit will use (the fastest that passes)."""
    import json

    from ..audit.gate import GateSettings, candidates, choose, gate_path, measure, verdict
    from ..config import PRECISIONS
    from ..engine.occlusion_modes import OcclusionEngines
    from ..weights import read_snapshot
    window, stride = _window_stride(args.occlusion)
    precisions = [p for p in args.precisions.split(",") if p]
    if not precisions or any(p not in PRECISIONS for p in precisions):
        raise CommandError(f"--precisions: {args.precisions!r}; accepted: a comma-separated subset of "
                           f"{','.join(PRECISIONS)}", field="precisions")
    settings = GateSettings(window, stride, args.tolerance, **_gate(args))
    snapshot = read_snapshot(args.model)
    engines = OcclusionEngines(snapshot)
    modes = candidates(tuple(precisions))
    log = (lambda line: print(line, file=sys.stderr, flush=True))
    entry = measure(snapshot, settings, engines, modes, every=args.all, log=log)
    choice = choose(snapshot, settings, engines, modes=modes, measure_missing=False)
    if args.json:
        print(json.dumps({"stored": str(gate_path(snapshot)), "chosen": choice.to_json(), "entry": {
            k: v for k, v in entry.items() if k != "exact"}}, indent=2))
        return 0
    exact = entry["exact"]
    print(f"{snapshot.name} {snapshot.version}, window {window}, stride {stride}, tolerance {args.tolerance} px, "
          f"{exact['data']}: exact {exact['cpu_seconds_per_image'] * 1e3:.0f} CPU-ms/image "
          f"({exact['seconds_per_image'] * 1e3:.0f} ms wall)")
    print(f"{'mode':<52} {'CPU-ms':>7} {'x exact':>7} {'fwd/img':>7} {'location':>8} {'hit':>6} {'pointing':>13}  "
          f"verdict")
    for name, record in sorted(entry["modes"].items(), key=lambda kv: kv[1]["figures"]["cpu_seconds_per_image"]):
        f = record["figures"]
        pg = f["pointing_game"]
        reasons = verdict(f, settings)
        hit = "-" if f["hit_agreement"] is None else f"{f['hit_agreement']:.1%}"
        points = "-" if pg["exact"] is None else f"{pg['mode']:.1f} vs {pg['exact']:.1f}"
        print(f"{name:<52} {f['cpu_seconds_per_image'] * 1e3:>7.1f} {f['speedup_vs_exact']:>7.1f} "
              f"{f['forwards_per_image']:>7.1f} {f['location_agreement']:>8.1%} {hit:>6} {points:>13}  "
              f"{'passes' if not reasons else 'refused: ' + '; '.join(reasons)}")
    print(f"chosen: {choice.note}")
    print(f"stored in {gate_path(snapshot)}")
    return 0