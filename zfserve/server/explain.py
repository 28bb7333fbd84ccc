"""The explanations' engine calls, shared by zfserve.v1 (OcclusionSweep[Stream], DeconvProject) and the Open
Inference Protocol's explanation models (NAME-occlusion, NAME-deconv: :mod:`.oip_explain`), so both run the same
code on the same heavy-work pool, under the same limits, deadlines and cancellation, and count in the same
statistics (the OIP model of the request's task and input kind).
"""

from __future__ import annotations

import time

from ..errors import InvalidArgumentError
from ..engine.results import DEFAULT_DECONV_TOP_K
from .handlers import deadline_of, peer_of
from .occlusion import resolve_mode
from .statistics import OWN_EXECUTION

# Most occluder positions one sweep may take (64 x 64; the default 32/8 sweep is 25 x 25).
DEFAULT_MAX_OCCLUSION_POSITIONS = 4096
# Most units one deconv request may project (each is a 3 x 224 x 224 float32 map, 0.6 MB): bounds memory and
# keeps a response with the projections under the message limit.
MAX_DECONV_UNITS = 96


def sweep(model, image, job, *, asked: dict, gated: bool, **args):
    """One occlusion sweep of the preprocessed ``image`` on ``model`` (a runtime) in the mode asked for (or the
    gate's), stopped by ``job`` (cancellation, deadline) at its next check: between the exact engine's stages."""
    mode, note = resolve_mode(model, asked, gated, args["window"], args["stride"])
    engines = model.occlusion_engines()
    job.check()
    result = engines.sweep(image, mode, progress=job.progress, check=job.check, **args)
    result.gate = note
    return result


def check_deconv_size(images: int, args: dict) -> None:
    """Refuse a deconv request of more than MAX_DECONV_UNITS projections, naming the field that asks for them."""
    units, maps = args["units"], args["maps"]
    default_k = DEFAULT_DECONV_TOP_K if units is None and maps is None else 0
    per_image = (args["top_k"] or default_k) + len(units or ()) + len(maps or ())
    if per_image * images > MAX_DECONV_UNITS:
        what = "units" if units else "maps" if maps else "top_k"
        raise InvalidArgumentError(f"{what}: {images} images x {per_image} units = {per_image * images} "
                                   f"projections; at most {MAX_DECONV_UNITS} per request", field=what)


def project(model, images, layer: str, job, **args):
    """The deconv projections of ``layer``'s units chosen by ``args`` (DeconvEngine.project's) on ``model``."""
    engine = model.deconv_engine()
    job.check()
    return engine.project(images, layer, **args)


async def run_measured(state, work, context, measured, *, on_progress=None, timeout_us: int | None = None):
    """``work(job)`` on the heavy-work pool for the call of ``context`` (its deadline, lowered by ``timeout_us``;
    its peer's fair share); ``measured`` (a statistics Measurement whose inputs are read) gets the wait for a
    worker as its queue time and the work as one engine call of its own."""
    _, deadline_mono = deadline_of(context)
    if timeout_us:
        own = time.monotonic() + timeout_us / 1e6
        deadline_mono = own if deadline_mono is None else min(deadline_mono, own)
    submitted = time.perf_counter_ns()
    marks: list[int] = []

    def timed(job):
        marks.append(time.perf_counter_ns())
        try:
            return work(job)
        finally:
            marks.append(time.perf_counter_ns())

    result = await state.heavy.run(timed, deadline_mono=deadline_mono, on_progress=on_progress,
                                   client=peer_of(context))
    timing = measured.batch
    timing.batch_id, timing.batch_size = OWN_EXECUTION, measured.images
    timing.queue_ns, timing.compute_ns = marks[0] - submitted, marks[1] - marks[0]
    measured.outputs_start()
    return result


__all__ = ["DEFAULT_MAX_OCCLUSION_POSITIONS", "MAX_DECONV_UNITS", "check_deconv_size", "project", "run_measured",
           "sweep"]
