"""Classification: ONNX Runtime (our Classifier) vs eager PyTorch (``eval()`` + ``inference_mode``), the paper
model (fc 4096, 1000 classes), same weights, same random inputs, batch 1, 8 and 32. Both return
probabilities (softmax included on both sides). Also measured in the same run: this machine's fp32 matmul
ceiling (2048 x 2048 product, torch and an ONNX Runtime MatMul graph, the faster counts), the model's
throughput as a fraction of it, and an ONNX Runtime profile of batch 32 (time per op type and per node).

    .venv/bin/pytest benchmarks/test_classify.py -q

The first run exports the paper model to the user cache (``~/.cache/zfserve``, ~250 MB; see
``zfserve.export.ensure_onnx``). On CUDA hosts the ``gpu`` cases compare ORT's CUDA provider with eager CUDA.
"""

from __future__ import annotations

import copy
import json
import time
from collections import defaultdict

import numpy as np
import onnxruntime as ort
import pytest
import torch

from zfserve.engine.classifier import Classifier
from zfserve.export import ort_session
from zfserve.weights import paper_model

BATCHES = (1, 8, 32)
ROUNDS = {1: 15, 8: 7, 32: 5}
MATMUL_N = 2048
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def model_flops(model) -> float:
    """Multiply-adds x 2 of the conv and fc layers for one image (bias, ReLU, pool, LRN, softmax not counted)."""
    sizes = model.spatial_sizes()
    convs = sum(getattr(model, name).weight.numel() * sizes[name] ** 2 for name in model.conv_layers)
    fcs = sum(getattr(model, name).weight.numel() for name in model.fc_layers)
    return 2.0 * (convs + fcs)


@pytest.fixture(scope="module")
def paper():
    model = paper_model().eval()
    inputs = {n: (np.random.default_rng(n).standard_normal((n, 3, 224, 224)) * 50).astype(np.float32)
              for n in BATCHES}
    return model, inputs


@pytest.fixture(scope="module")
def engines(paper):
    model, _ = paper
    made = {}

    def get(device):
        if device not in made:
            if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
                pytest.skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
            made[device] = Classifier(model, device=device, max_batch_size=64)
        return made[device]
    return get


def test_flop_count_is_the_papers(paper):
    assert abs(model_flops(paper[0]) / 1e9 - 2.34) < 0.01


def test_matmul_ceiling_torch(benchmark, bench_record):
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(MATMUL_N, MATMUL_N, generator=gen) for _ in range(2))
    benchmark.group = "matmul-2048-fp32"
    benchmark.pedantic(torch.mm, args=(a, b), rounds=10, warmup_rounds=2)
    bench_record("matmul-2048-fp32", "torch", benchmark)


def _ort_matmul(threads: int):
    """An ONNX Runtime session computing a @ B (B a 2048 x 2048 initializer, as a weight is) and an input a."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((MATMUL_N, MATMUL_N)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [MATMUL_N, MATMUL_N])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [MATMUL_N, MATMUL_N])],
        initializer=[numpy_helper.from_array(weight, "b")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort_session(proto.SerializeToString(), threads=threads)   # the classifier's session options
    return session, {"a": rng.standard_normal((MATMUL_N, MATMUL_N)).astype(np.float32)}


def test_matmul_ceiling_onnxruntime(benchmark, bench_record, engines):
    session, feed = _ort_matmul(engines("cpu").threads)  # the classifier's thread count
    benchmark.group = "matmul-2048-fp32"
    benchmark.pedantic(session.run, args=(None, feed), rounds=10, warmup_rounds=2)
    bench_record("matmul-2048-fp32", "onnxruntime", benchmark)


@pytest.mark.parametrize("engine", ["eager", "onnxruntime"])  # innermost: each pair runs back to back
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("device", DEVICES)
def test_classify(benchmark, bench_record, paper, engines, engine, batch, device):
    model, inputs = paper
    x = inputs[batch]
    group = f"classify-{device}-batch{batch}"
    benchmark.group = group
    if engine == "onnxruntime":
        classifier = engines(device)
        run = lambda: classifier.probabilities(x)  # noqa: E731
    else:
        eager = model if device == "cpu" else copy.deepcopy(model).to(device)

        def run():
            with torch.inference_mode():
                out = torch.softmax(eager(torch.from_numpy(x).to(device)), dim=1).cpu().numpy()
            return out
    probabilities = benchmark.pedantic(run, rounds=ROUNDS[batch], warmup_rounds=1)
    # Not timed: both engines must compute the same thing.
    with torch.inference_mode():
        reference = torch.softmax(model(torch.from_numpy(x[:2])), dim=1).numpy()
    np.testing.assert_allclose(probabilities[:2], reference, rtol=0, atol=1e-5)
    bench_record(group, engine, benchmark, baseline=engine == "eager")
    benchmark.extra_info.update(batch=batch, device=device, torch_threads=torch.get_num_threads())


def test_fraction_of_matmul_ceiling(paper, bench_results, bench_note, engines):
    results = bench_results()
    matmul = results.get("matmul-2048-fp32", {})
    if not matmul or not any(f"classify-cpu-batch{n}" in results for n in BATCHES):
        pytest.skip("run with the matmul and classify benchmarks (and without --benchmark-disable)")
    flops = model_flops(paper[0])
    gflops = {name: 2 * MATMUL_N ** 3 / median / 1e9 for name, median in matmul.items()}
    ceiling = max(gflops.values())
    bench_note(f"matmul ceiling (2048^2 fp32): " + ", ".join(f"{k} {v:.1f}" for k, v in gflops.items())
               + f" GFLOP/s; model {flops / 1e9:.2f} GFLOP per image; "
               f"threads: onnxruntime {engines('cpu').threads}, torch {torch.get_num_threads()}")
    for n in BATCHES:
        ours = results.get(f"classify-cpu-batch{n}", {}).get("onnxruntime")
        base = results.get(f"classify-cpu-batch{n}", {}).get("eager")
        if ours:
            line = (f"batch {n}: onnxruntime {n / ours:.1f} img/s, {n * flops / ours / 1e9:.1f} GFLOP/s = "
                    f"{n * flops / ours / 1e9 / ceiling:.0%} of the matmul ceiling")
            if base:
                line += f"; eager {n * flops / base / 1e9:.1f} GFLOP/s = {n * flops / base / 1e9 / ceiling:.0%}"
            bench_note(line)


INTERLEAVED_BATCHES = (8, 32)
INTERLEAVED_ROUNDS = 7  # the first is warm-up


def test_interleaved_speedup_and_ceiling(paper, engines, bench_note):
    """The acceptance figures, measured so that load from other processes on a shared machine falls on every
    contender alike: each round runs eager and ONNX Runtime at batch 8 and 32 and both 2048^2 matmuls, one
    after the other; medians over the rounds."""
    model, inputs = paper
    clf = engines("cpu")
    session, feed = _ort_matmul(clf.threads)
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(MATMUL_N, MATMUL_N, generator=gen) for _ in range(2))

    def eager(x):
        with torch.inference_mode():
            return torch.softmax(model(torch.from_numpy(x)), dim=1)

    steps = {"matmul torch": lambda: torch.mm(a, b), "matmul onnxruntime": lambda: session.run(None, feed)}
    for n in INTERLEAVED_BATCHES:
        steps[f"eager {n}"] = lambda x=inputs[n]: eager(x)
        steps[f"onnxruntime {n}"] = lambda x=inputs[n]: clf.probabilities(x)
    times = defaultdict(list)
    for round_ in range(INTERLEAVED_ROUNDS):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if round_:
                times[name].append(time.perf_counter() - start)
    median = {name: float(np.median(t)) for name, t in times.items()}
    matmul = {name: 2 * MATMUL_N ** 3 / median[f"matmul {name}"] / 1e9 for name in ("torch", "onnxruntime")}
    ceiling = max(matmul.values())
    flops = model_flops(model)
    bench_note(f"interleaved ({INTERLEAVED_ROUNDS - 1} rounds): matmul ceiling torch {matmul['torch']:.1f}, "
               f"onnxruntime {matmul['onnxruntime']:.1f} GFLOP/s")
    for n in INTERLEAVED_BATCHES:
        ours, base = median[f"onnxruntime {n}"], median[f"eager {n}"]
        achieved = n * flops / ours / 1e9
        bench_note(f"interleaved batch {n}: eager {base * 1e3:.0f} ms, onnxruntime {ours * 1e3:.0f} ms -> "
                   f"{base / ours:.2f}x; onnxruntime {achieved:.1f} GFLOP/s = {achieved / ceiling:.0%} of the "
                   f"ceiling")


def test_onnxruntime_profile(paper, engines, bench_note, tmp_path):
    """Where ONNX Runtime's time goes at batch 32 (its own profiler, summed over 3 runs)."""
    model, inputs = paper
    threads = engines("cpu").threads
    clf = Classifier(model, threads=threads, profile_prefix=str(tmp_path / "ort"))
    runs = 3
    for _ in range(runs):
        clf.probabilities(inputs[32])
    events = json.loads(open(clf.end_profiling()).read())
    by_op, by_node = defaultdict(float), defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"] / runs / 1e3
            by_node[event["name"][: -len("_kernel_time")]] += event["dur"] / runs / 1e3
    total = sum(by_op.values())
    assert total > 0
    bench_note(f"onnxruntime profile, batch 32, {threads} threads: {total:.0f} ms of kernel time per run")
    bench_note("  by op type: " + ", ".join(f"{op} {ms:.0f} ms ({ms / total:.0%})"
                                             for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:8]))
    bench_note("  top nodes:  " + ", ".join(f"{name} {ms:.0f} ms"
                                             for name, ms in sorted(by_node.items(), key=lambda kv: -kv[1])[:8]))
