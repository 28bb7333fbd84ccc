"""Triton's statistics extension (``ModelStatistics``): request counts and durations per OIP model and version.

Each runtime (one snapshot, so one version) keeps one :class:`InferenceStatistics` per OIP model (``NAME`` for
the FP32 tensor, ``NAME-bytes`` for encoded images, ``NAME-occlusion[-bytes]`` and ``NAME-deconv[-bytes]``). Every
request of the model counts, ModelInfer and zfserve's own Classify, OcclusionSweep[Stream] and DeconvProject
alike. What each duration covers, per request:

  compute_input   reading the input: checking the tensor, or decoding the encoded images
  queue           waiting in the dynamic batcher's queue (explanations: for a worker of the heavy-work pool)
  compute_infer   the engine call of the batch the request was in (as Triton counts it: the batch's duration;
                  explanations: the sweep or projection, a call of its own)
  compute_output  building the response
  success         the whole request, from the handler's start to its response
  fail            requests that ended in an error after their model was found (whole duration)

perf_analyzer subtracts these from its client-side latency to show the server's share. Everything runs on the
event loop, so the counters need no lock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .._proto.inference import grpc_service_pb2 as pb


# The batch_id of a request that ran alone, outside the dynamic batcher (an explanation on the heavy-work pool):
# one engine call of its own.
OWN_EXECUTION = -1


@dataclass
class BatchTiming:
    """What the dynamic batcher reports back for one request: filled in before its result is set."""

    batch_id: int = 0          # the batcher's running count of engine calls (1, 2, ...); OWN_EXECUTION: none
    batch_size: int = 0        # images in that engine call
    queue_ns: int = 0          # queued -> the batch started
    compute_ns: int = 0        # the engine call


class _Duration:
    __slots__ = ("count", "ns")

    def __init__(self):
        self.count = 0
        self.ns = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += max(0, int(ns))

    def proto(self) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=self.count, ns=self.ns)


STAGES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


class InferenceStatistics:
    """The counters of one OIP model at one version."""

    def __init__(self):
        self.durations = {stage: _Duration() for stage in STAGES}
        self.inference_count = 0      # images classified
        self.execution_count = 0      # engine calls holding at least one of this model's requests
        self.last_inference_ms = 0
        self.batches: dict[int, _Duration] = {}   # batch size -> engine calls and their compute time
        self._last_batch_id = 0

    def measure(self) -> "Measurement":
        return Measurement(self)

    def _success(self, m: "Measurement", ended: int) -> None:
        d, t = self.durations, m.batch
        d["success"].add(ended - m.started)
        d["compute_input"].add(m.inputs_ready - m.started)
        d["queue"].add(t.queue_ns)
        d["compute_infer"].add(t.compute_ns)
        d["compute_output"].add(ended - m.computed)
        self.inference_count += m.images
        # The requests of one batch resolve one after another, batches in order: count each engine call once.
        if t.batch_id == OWN_EXECUTION or t.batch_id > self._last_batch_id:
            self._last_batch_id = max(self._last_batch_id, t.batch_id)
            self.execution_count += 1
            self.batches.setdefault(t.batch_size, _Duration()).add(t.compute_ns)
        self.last_inference_ms = time.time_ns() // 1_000_000

    def proto(self, name: str, version: str) -> pb.ModelStatistics:
        d = {stage: duration.proto() for stage, duration in self.durations.items()}
        return pb.ModelStatistics(
            name=name, version=version, last_inference=self.last_inference_ms,
            inference_count=self.inference_count, execution_count=self.execution_count,
            inference_stats=pb.InferStatistics(**d),
            batch_stats=[pb.InferBatchStatistics(batch_size=size, compute_infer=self.batches[size].proto())
                         for size in sorted(self.batches)])


class Measurement:
    """One request's clock, used as ``with stats.measure() as m:``: call :meth:`inputs_done` once the input is
    read, pass ``m.batch`` to the batcher, and call :meth:`outputs_start` once it answered. A request that
    leaves the block with an exception counts as failed; a cancelled one (client gone) is not counted."""

    def __init__(self, stats: InferenceStatistics):
        self.stats = stats
        self.batch = BatchTiming()
        self.images = 0
        self.started = self.inputs_ready = self.computed = 0

    def __enter__(self) -> "Measurement":
        self.started = self.inputs_ready = self.computed = time.perf_counter_ns()
        return self

    def inputs_done(self, images: int) -> None:
        self.images = images
        self.inputs_ready = time.perf_counter_ns()

    def outputs_start(self) -> None:
        self.computed = time.perf_counter_ns()

    def __exit__(self, kind, exc, tb) -> bool:
        ended = time.perf_counter_ns()
        if kind is None:
            self.stats._success(self, ended)
        elif issubclass(kind, Exception):
            self.stats.durations["fail"].add(ended - self.started)
        return False


__all__ = ["OWN_EXECUTION", "BatchTiming", "InferenceStatistics", "Measurement"]
