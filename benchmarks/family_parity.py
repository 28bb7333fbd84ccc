"""Logits of full-size imported AlexNet, VGG16 and VGG16-BN against the independent reference networks of
``tests/torchvision_reference.py`` (random He-scaled weights, random biases and BN statistics, 1000 classes),
in PyTorch and through the ONNX export (ONNX Runtime), on fresh random inputs in torchvision's units. The figure
is the largest absolute logit difference divided by the reference logits' largest magnitude (the acceptance
line: 1e-4). The tests check the same on narrow widths; this is the full-size measurement.

    python benchmarks/family_parity.py --json benchmarks/results/cpu-2core-DATE-family-parity.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))   # the tests' reference networks
from torchvision_reference import randomize, reference  # noqa: E402

ARCHS = ("alexnet", "vgg16", "vgg16_bn")


def measure(arch: str, root: Path, images: int) -> dict:
    import onnxruntime as ort

    from zfserve.export import ensure_onnx
    from zfserve.import_torchvision import import_torchvision
    from zfserve.weights import read_snapshot
    net = randomize(reference(arch, 1000), seed=len(arch))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / f"{arch}.safetensors"))
    (root / "classes.txt").write_text("".join(f"class {i}\n" for i in range(1000)))
    start = time.perf_counter()
    directory = import_torchvision(root / f"{arch}.safetensors", arch, root / "classes.txt", root / arch)
    import_s = time.perf_counter() - start
    snapshot = read_snapshot(directory)
    x = torch.randn(images, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = net(x).numpy()
        got = snapshot.model()(x).numpy()
    start = time.perf_counter()
    path = ensure_onnx(snapshot)
    export_s = time.perf_counter() - start
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(["logits"], {"image": x.numpy()})[0]
    scale = float(np.abs(want).max())
    return {"arch": arch, "parameters": int(sum(p.numel() for p in net.parameters())), "images": images,
            "logit_scale": scale, "pytorch_relative": float(np.abs(got - want).max()) / scale,
            "onnx_relative": float(np.abs(onnx_logits - want).max()) / scale,
            "same_top1_pytorch": bool((got.argmax(1) == want.argmax(1)).all()),
            "same_top1_onnx": bool((onnx_logits.argmax(1) == want.argmax(1)).all()),
            "import_s": import_s, "export_with_parity_check_s": export_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ZFSERVE_CACHE_DIR"] = str(Path(tmp) / "cache")
        for arch in ARCHS:
            rows.append(measure(arch, Path(tmp), args.images))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
