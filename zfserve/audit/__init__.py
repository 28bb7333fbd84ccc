"""Corpus audits: ``zfserve audit SOURCE --out DIR`` / :func:`run`.

For every image of a corpus (a folder, a CSV/Parquet manifest or the synthetic set): what the model says, whether
the occlusion evidence sits on the object, and which images a person should look at first. One row per input in
``DIR/results.parquet`` (failures included, with the decoder's reason), heatmaps of the flagged images,
``DIR/summary.json`` and an offline ``DIR/index.html``. Interrupted jobs resume; the same job runs on Ray Data.

    from zfserve import audit
    summary = audit.run("photos/", "audit-out", occlusion=(48, 32))

Modules: :mod:`.sources` (inputs and their bytes), :mod:`.records` (the one record function), :mod:`.backends`
(where the model runs), :mod:`.store` (the Parquet folder, resuming), :mod:`.gallery` (summary and page),
:mod:`.job` (the local runner and :func:`run`), :mod:`.ray_runner` (Ray Data).
"""

__all__ = ["AuditInterrupted", "run"]


def __getattr__(name):   # lazy, so that the CLI's parser (which reads .defaults) does not load torch
    if name in __all__:
        from . import job
        return getattr(job, name)
    raise AttributeError(f"module 'zfserve.audit' has no attribute {name!r}")
