"""What giving back ONNX Runtime's arena costs (``Classifier.release_memory``, which the server's batcher calls
once idle after batches of more than 4 images), in one process with the embedded model:

- RSS over a warm 1-image classifier: after a batch of 32, and after ``release_memory`` + glibc ``malloc_trim``
  (what the server does);
- latency, medians of alternating rounds: 1- and 32-image batches on a warm arena (every batch before the
  change, and every batch while work keeps coming after it), the same batches right after a release (the first
  batch after an idle spell pays for growing the arena again), the release itself, and for comparison the
  same batches on a session without an arena (``enable_cpu_mem_arena = False``, the other way to bound RSS:
  every batch would pay).

    python benchmarks/ort_release.py [--rounds 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024


def _ms(fn) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="zfnet-demo")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()

    import onnxruntime as ort

    from zfserve.engine.classifier import Classifier
    from zfserve.export import INPUT_NAME, PROBABILITIES
    from zfserve.server.decode import malloc_trim

    ours = Classifier(args.model, max_batch_size=32, ood=False)
    rng = np.random.default_rng(0)
    x = {n: (rng.standard_normal((n, 3, 224, 224)) * 50).astype(np.float32) for n in (1, 32)}

    def release():
        ours.release_memory()
        malloc_trim()

    # RSS: the warm 1-image arena, a batch of 32, the release.
    release()
    ours.probabilities(x[1])
    start = _rss_mb()
    ours.probabilities(x[32])
    grown = _rss_mb() - start
    release()
    kept = _rss_mb() - start

    # The alternative: the same graph on a session with the same options but no arena.
    options = ours.backend.session.get_session_options()
    options.enable_cpu_mem_arena = False
    bare = ort.InferenceSession(ours.onnx_path.read_bytes(), options, providers=["CPUExecutionProvider"])
    bare.run([PROBABILITIES], {INPUT_NAME: x[32]})

    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for n in (1, 32):
            ours.probabilities(x[n])
            times.setdefault(f"warm_b{n}_ms", []).append(_ms(lambda: ours.probabilities(x[n])))
            times.setdefault("release_ms", []).append(_ms(release))
            times.setdefault(f"after_release_b{n}_ms", []).append(_ms(lambda: ours.probabilities(x[n])))
            times.setdefault(f"no_arena_b{n}_ms", []).append(
                _ms(lambda: bare.run([PROBABILITIES], {INPUT_NAME: x[n]})))
    medians = {name: round(float(np.median(v)), 1) for name, v in times.items()}
    out = {"machine": os.uname().nodename, "cpus": os.cpu_count(), "load_before": load_before,
           "model": args.model, "rounds": args.rounds, "threads": ours.threads,
           "rss_over_warm_b1_mb": {"after_b32": round(grown), "after_release": round(kept)},
           "median_ms": medians, "load_after": os.getloadavg()}
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
