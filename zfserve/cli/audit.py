"""``zfserve audit``: a corpus audit (see :mod:`zfserve.audit`), locally, on a server or on Ray."""

from __future__ import annotations

import sys

from ..engine.results import DEFAULT_TOP_K
from .common import CommandError, model_help, remote_client

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
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_audit)


def cmd_audit(args) -> int:
    """Audit every image of SOURCE: one row per input in DIR/results.parquet (failures with their reason), heatmaps
    of flagged images, DIR/summary.json and an offline DIR/index.html. Ctrl-C keeps what is written; the same
    command resumes. Exit 0 when the audit is complete (failed images are rows, not errors), 130 when interrupted."""
    from ..audit import AuditInterrupted, run
    occlusion = None if args.no_occlusion else _window_stride(args.occlusion)
    options = dict(model=args.model, top_k=args.top_k, occlusion=occlusion, batch_size=args.batch_size,
                   workers=args.workers, limit=args.limit, ray=args.ray, low_confidence=args.low_confidence,
                   tolerance=args.tolerance, heatmaps=not args.no_heatmaps, device=args.device, quiet=args.quiet)
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
             f"results: {s['out']}/results.parquet; summary.json; index.html"]
    print("\n".join(lines))
