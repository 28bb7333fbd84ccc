"""The audit job: list the inputs, skip what a previous run finished, audit the rest in batches (here, or on
Ray Data with ``ray``), then write the summary and the page from every row.

Rows are written batch by batch (see :mod:`.store`), so an interrupted job leaves a readable results.parquet
and the same command finishes it: exactly one row per input.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from .. import _checks as checks
from ..errors import InvalidArgumentError, ZFServeError
from .defaults import DEFAULT_BATCH_SIZE, DEFAULT_LOW_CONFIDENCE, DEFAULT_OCCLUSION, DEFAULT_TOLERANCE
from .gallery import FLAGS, summarize, write_index, write_summary
from .records import HEATMAPS_DIR, AuditSettings, Auditor
from .sources import list_inputs
from .store import ResultStore


class AuditInterrupted(ZFServeError):
    """The job was stopped (Ctrl-C); what was written stays and the same command resumes it."""


def _check(settings: AuditSettings, batch_size: int, workers: int, limit) -> None:
    checks.integer(settings.top_k, "top_k", 1, 1000, label="--top-k")
    if settings.occlusion is not None:
        window, stride = settings.occlusion
        checks.integer(window, "occlusion", 1, 224, label="--occlusion WINDOW")
        checks.integer(stride, "occlusion", 1, 224, label="--occlusion STRIDE")
    checks.integer(batch_size, "batch_size", 1, 1024, label="--batch-size")
    checks.integer(workers, "workers", 1, 256, label="--workers")
    if limit is not None:
        checks.integer(limit, "limit", 1, label="--limit")
    if not 0.0 <= float(settings.low_confidence) <= 1.0:
        raise InvalidArgumentError(f"--low-confidence: {settings.low_confidence}; accepted 0..1",
                                   field="low_confidence")
    checks.integer(settings.tolerance, "tolerance", 0, 224, label="--tolerance")


def _check_consistent(store: ResultStore, model: str, version: str, settings: AuditSettings) -> None:
    """A resumed audit must continue with the same model and occlusion settings (else its rows would mix)."""
    table = store.read()
    if not len(table):
        return
    kept = {(m, v) for m, v in zip(table.column("model").to_pylist(), table.column("model_version").to_pylist())}
    if kept != {(model, version)}:
        raise InvalidArgumentError(f"out: {store.dir} holds rows of {sorted(kept)}; this run uses {model} {version}. "
                                   f"Choose another --out (or remove it) to audit with another model", field="out")
    windows = {(w, s) for w, s, st in zip(table.column("occlusion_window").to_pylist(),
                                          table.column("occlusion_stride").to_pylist(),
                                          table.column("status").to_pylist()) if st == "ok"}
    wanted = {tuple(settings.occlusion) if settings.occlusion else (None, None)}
    if windows and windows != wanted:
        raise InvalidArgumentError(f"out: {store.dir} holds rows swept with (window, stride) {sorted(windows)}; this "
                                   f"run asks for {sorted(wanted)}. Choose another --out", field="out")


def _progress_bar(total: int, skipped: int, quiet: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=0, unit="img", desc="audit", disable=quiet or None, dynamic_ncols=True,
                postfix={"skipped": skipped} if skipped else None)


def _run_local(auditor: Auditor, store: ResultStore, inputs, batch_size: int, workers: int, quiet: bool) -> int:
    """Audit ``inputs`` here: ``workers`` threads read, hash and check the next batches while the model runs on
    the current one. Returns the number of rows written."""
    batches = [inputs[i:i + batch_size] for i in range(0, len(inputs), batch_size)]
    written, counts = 0, {"failed": 0, "flagged": 0}
    bar = _progress_bar(len(inputs), 0, quiet)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="audit-read")
    try:
        ahead = deque(pool.submit(auditor.stage, b) for b in batches[:workers + 1])
        for index in range(len(batches)):
            staged, skipped, seconds = ahead.popleft().result()
            if index + workers + 1 < len(batches):
                ahead.append(pool.submit(auditor.stage, batches[index + workers + 1]))
            auditor.skipped += skipped
            auditor.times.add("read", seconds)
            rows = auditor.rows(staged)
            t0 = time.perf_counter()
            store.append(rows)
            auditor.times.add("write", time.perf_counter() - t0)
            written += len(rows)
            counts["failed"] += sum(r["failed"] for r in rows)
            counts["flagged"] += sum(any(r[f] for f in FLAGS[1:]) for r in rows)
            bar.update(len(staged) + skipped)
            bar.set_postfix(failed=counts["failed"], flagged=counts["flagged"], skipped=auditor.skipped, refresh=False)
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
        raise AuditInterrupted(f"interrupted: {written} rows written this run, kept in {store.dir}; run the same "
                               f"command again to finish the audit") from None
    pool.shutdown(wait=True)
    bar.close()
    return written


def run(source: str, out: str | Path, *, model: str | None = None, backend=None, top_k: int = 5,
        occlusion: tuple[int, int] | None = DEFAULT_OCCLUSION, batch_size: int = DEFAULT_BATCH_SIZE, workers: int = 1,
        limit: int | None = None, ray: bool | str | None = None, low_confidence: float = DEFAULT_LOW_CONFIDENCE,
        tolerance: int = DEFAULT_TOLERANCE, heatmaps: bool = True, device: str = "cpu", quiet: bool = False,
        exact: bool = False, candidates=None, gate: dict | None = None, log=None) -> dict:
    """Audit every input of ``source`` into ``out`` (results.parquet, heatmaps/, summary.json, index.html) and
    return the summary. ``backend``: where the model runs (default: :class:`~zfserve.audit.backends.LocalBackend`
    of ``model``; the CLI passes a server's for ``--server``). ``ray``: True for a local Ray instance, or a
    cluster address; ``workers`` is then the number of actors (one CPU each), else the reading threads.

    Occlusion runs in the fastest mode that passes the agreement gate (:mod:`.gate`; measured on first use for
    these settings), else exact; ``exact`` forces exact, ``candidates`` (OcclusionModes) limits the modes
    tried, ``gate`` holds GateSettings' other fields (``images``, ``data``, ``min_agreement``). ``log``: where
    the gate's lines and the chosen mode go (default: nowhere). A server backend uses its own stored gate."""
    settings = AuditSettings(top_k=top_k, occlusion=tuple(occlusion) if occlusion else None,
                             low_confidence=low_confidence, tolerance=tolerance, heatmaps=heatmaps)
    _check(settings, batch_size, workers, limit)
    gate_settings = _gate_settings(settings, gate or {}) if settings.occlusion else None
    if ray and backend is not None:
        raise InvalidArgumentError("--ray and --server: choose one (Ray actors load the model themselves)",
                                   field="ray")
    inputs, description = list_inputs(source, limit)
    out = Path(out)
    store = ResultStore(out)
    started = time.perf_counter()
    choice, setup = None, {}
    if ray:
        from .ray_runner import model_facts, run_on_ray
        name, version, classes = model_facts(model)
        checks.integer(top_k, "top_k", 1, classes, label="--top-k")
        _check_consistent(store, name, version, settings)
        if gate_settings is not None:
            choice, setup["gate"] = _choose(model, None, gate_settings, exact, candidates, device, log)
            settings.occlusion_mode = choice.mode.to_json()
        written, skipped, times = run_on_ray(ray, model, device, settings, inputs, store.done(), store,
                                             out / HEATMAPS_DIR, batch_size, workers, quiet)
    else:
        from .backends import LocalBackend
        t0 = time.perf_counter()
        local = backend is None
        backend = backend or LocalBackend(model, device=device, batch_size=batch_size)
        setup["load"] = time.perf_counter() - t0
        checks.integer(top_k, "top_k", 1, len(backend.class_names), label="--top-k")
        _check_consistent(store, backend.name, backend.version, settings)
        if gate_settings is not None and local:
            choice, setup["gate"] = _choose(model, backend, gate_settings, exact, candidates, device, log)
            backend.mode = choice.mode
            t0 = time.perf_counter()
            backend.engines.warm(choice.mode)
            setup["load"] += time.perf_counter() - t0
        elif gate_settings is not None and hasattr(backend, "gated"):
            backend.gated = not exact      # a server chooses by its own stored gate; rows say what it used
        auditor = Auditor(backend, settings, done=store.done(), heatmap_dir=out / HEATMAPS_DIR)
        t0 = time.perf_counter()
        written = _run_local(auditor, store, inputs, batch_size, workers, quiet)
        setup["run"] = time.perf_counter() - t0
        skipped, times = auditor.skipped, {k: round(v, 3) for k, v in auditor.times.seconds.items()}
    wall = time.perf_counter() - started
    store.compact()
    rows = store.read().to_pylist()
    paths = {r["path"] for r in rows}
    summary = summarize(rows, inputs=len(inputs), run={
        "source": description, "out": str(out), "missing": sum(i.path not in paths for i in inputs),
        "this_run": {"rows_written": written, "skipped_done": skipped, "wall_s": round(wall, 3),
                     "runner": f"ray ({ray})" if ray else "local", "workers": workers, "batch_size": batch_size},
        "images_per_second": written / wall if wall > 0 else 0.0, "wall_s": round(wall, 3), "seconds": times,
        "setup_s": {k: round(v, 3) for k, v in setup.items()},
        "occlusion_mode": _mode_summary(choice, rows, gate_settings),
        "settings": {"top_k": top_k, "occlusion": list(settings.occlusion) if settings.occlusion else None,
                     "low_confidence": low_confidence, "tolerance": tolerance}})
    write_summary(out, summary)
    write_index(out, rows, summary)
    return summary


def _gate_settings(settings: AuditSettings, gate: dict):
    from .gate import GateSettings
    unknown = set(gate) - {"images", "data", "min_agreement", "max_pointing_delta"}
    if unknown:
        raise InvalidArgumentError(f"gate: {sorted(unknown)} not accepted; accepted: images, data, min_agreement, "
                                   f"max_pointing_delta", field="gate")
    window, stride = settings.occlusion
    return GateSettings(window, stride, settings.tolerance, **gate)


def _choose(model, backend, gate_settings, exact: bool, candidates, device: str, log):
    """(the gate's choice of occlusion mode, seconds it took): exact when asked, else the fastest that passes."""
    from ..engine.occlusion_modes import EXACT_MODE, OcclusionEngines
    from ..weights import default_model_name, read_snapshot
    from .gate import GateChoice, choose
    t0 = time.perf_counter()
    if exact:
        choice = GateChoice(EXACT_MODE, "--exact")
    else:
        snapshot = backend.snapshot if backend is not None else read_snapshot(model or default_model_name())
        engines = backend.engines if backend is not None else OcclusionEngines(snapshot, device=device)
        choice = choose(snapshot, gate_settings, engines, modes=candidates, log=log)
    if log is not None:
        log(f"occlusion: {choice.note}")
    return choice, time.perf_counter() - t0


def _mode_summary(choice, rows: list[dict], gate_settings) -> dict | None:
    """The summary's word on the occlusion mode: the one chosen, the gate's settings and figures, and the modes
    the rows were drawn in (a resumed audit may hold rows of an earlier choice)."""
    if gate_settings is None:
        return None
    used: dict[str, int] = {}
    for r in rows:
        if r.get("occlusion_mode"):
            used[r["occlusion_mode"]] = used.get(r["occlusion_mode"], 0) + 1
    doc = {"rows_by_mode": used}
    if choice is not None:
        doc.update(mode=choice.mode.name, note=choice.note, gate=choice.figures, gate_settings=asdict(gate_settings))
    return doc


__all__ = ["AuditInterrupted", "run"]
