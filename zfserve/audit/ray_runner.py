"""The audit on Ray Data: the inputs become a Ray dataset, an actor pool runs the same :class:`Auditor` as the
local runner (``map_batches`` with a callable class: each actor loads the model once), and Ray writes the rows
as Parquet parts into the same results.parquet folder. So with and without Ray the rows are the same.

Every node needs zfserve (and the model, unless it is the embedded one) installed at the same version, and read
access to the inputs; heatmaps are written by the actors under ``DIR/heatmaps``, so ``--out`` must be a folder
every node can write (a shared filesystem) when the cluster has more than one machine.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path

from .records import AuditSettings, Auditor, schema
from .sources import AuditInput


def model_facts(model: str | None) -> tuple[str, str, int]:
    """(name, version, number of classes) of the model the actors will load, read here without building it."""
    from ..weights import default_model_name, read_snapshot
    snapshot = read_snapshot(model or default_model_name())
    return snapshot.config.name, snapshot.version, snapshot.config.num_classes


class RayAuditor:
    """One actor of the pool: a local backend and an Auditor, called on batches of inputs (pyarrow tables)."""

    def __init__(self, model, device, settings: dict, done: dict, heatmap_dir: str):
        from ..engine.occlusion_modes import OcclusionMode
        from .backends import LocalBackend
        occlusion = settings.get("occlusion")
        settings = AuditSettings(**{**settings, "occlusion": tuple(occlusion) if occlusion else None})
        # The driver's gate chose the occlusion mode: every actor sweeps in it, on the same engines as locally.
        mode = OcclusionMode.from_json(settings.occlusion_mode) if settings.occlusion_mode else None
        # One thread: the actor holds one CPU (num_cpus=1), so its engines run single-threaded.
        self.auditor = Auditor(LocalBackend(model, device=device, mode=mode, threads=1), settings, done=done,
                               heatmap_dir=heatmap_dir)

    def __call__(self, batch):
        import pyarrow as pa
        inputs = [AuditInput(**row) for row in batch.to_pylist()]
        return pa.Table.from_pylist(self.auditor.audit(inputs), schema=schema())


def _init(address, quiet: bool) -> None:
    import ray
    if quiet:   # Ray Data's INFO lines and the C++ core's warnings, on the driver
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if ray.is_initialized():
        return
    kwargs = dict(include_dashboard=False, logging_level=logging.ERROR if quiet else logging.WARNING,
                  ignore_reinit_error=True)
    if address is True or address in ("", "local"):
        ray.init(**kwargs)
    else:
        ray.init(address=str(address), **kwargs)


def run_on_ray(address, model, device, settings: AuditSettings, inputs: list[AuditInput], done: dict, store,
               heatmap_dir: Path, batch_size: int, workers: int, quiet: bool) -> tuple[int, int, dict]:
    """Audit ``inputs`` on Ray (``address``: True for a local instance, else a cluster's address). Returns
    (rows written, inputs skipped as done, stage times: {} — the actors' own times are not gathered)."""
    try:
        import ray
        import ray.data
    except ImportError:
        from ..errors import ZFServeError
        raise ZFServeError("--ray: Ray is not installed; install it with pip install 'zfserve[ray]'",
                           field="ray") from None
    _init(address, quiet)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = not quiet
    before = len(store.read())
    rows = ray.data.from_items([item.to_row() for item in inputs])
    rows = rows.map_batches(
        RayAuditor, fn_constructor_kwargs={"model": model, "device": device, "settings": asdict(settings),
                                           "done": done, "heatmap_dir": str(heatmap_dir)},
        batch_size=batch_size, batch_format="pyarrow", concurrency=workers, num_cpus=1)
    rows.write_parquet(str(store.dir), min_rows_per_file=batch_size)
    written = len(store.read()) - before
    return written, len(inputs) - written, {}


__all__ = ["RayAuditor", "model_facts", "run_on_ray"]
