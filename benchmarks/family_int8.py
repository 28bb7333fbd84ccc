"""int8 on a member of ZFNet's family with real decisions: a narrow VGG11-BN in torchvision's layout (the
reference network of ``tests/torchvision_reference.py``, conv widths / 8, fc 128, 11 classes) trained briefly on
the synthetic set (seed 11, never used for calibration or the gate), saved as a torchvision state dict,
imported with ``zfserve import torchvision`` (BatchNorm folded), exported, then quantized the way ``zfserve
export --precision int8`` does: calibrated on 256 held-out images (synthetic seed 5), gated on 1,000 others
(seed 3). Reported: the fp32 model's held-out top-1, int8's, their top-1 agreement on the 1,000 gate images
(ONNX Runtime int8; and OpenVINO int8 when installed, quantized the same way), and the probability differences.

Random weights would not do: their logits are near ties, where "agreement" measures rounding noise.

    python benchmarks/family_int8.py --json benchmarks/results/cpu-2core-DATE-family-int8.json [--minutes 12]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))   # the tests' reference networks
from torchvision_reference import reference  # noqa: E402

from zfserve.config import TORCHVISION_MEAN, TORCHVISION_STD  # noqa: E402
from zfserve.data import CLASSES, synthetic_arrays  # noqa: E402

TRAIN_SEED, TRAIN_N = 11, 8000
ARCH, SHRINK, FC = "vgg11_bn", 8, 128


def batches(images: np.ndarray, labels: np.ndarray, batch: int, rng: np.random.Generator):
    """Random 224 crops of the 256 images, random flips, torchvision's normalization."""
    mean = torch.tensor(TORCHVISION_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(TORCHVISION_STD).view(1, 3, 1, 1)
    order = rng.permutation(len(images))
    for start in range(0, len(order) - batch + 1, batch):
        idx = np.sort(order[start:start + batch])
        y, x = rng.integers(0, 33, 2)
        crop = torch.from_numpy(np.ascontiguousarray(images[idx, y:y + 224, x:x + 224])).permute(0, 3, 1, 2)
        crop = crop.float() / 255.0
        if rng.random() < 0.5:
            crop = crop.flip(3)
        yield (crop - mean) / std, torch.from_numpy(labels[idx])


def train(minutes: float, log) -> torch.nn.Module:
    torch.manual_seed(0)
    net = reference(ARCH, len(CLASSES), shrink=SHRINK, fc=FC)
    images, labels = synthetic_arrays(TRAIN_SEED, TRAIN_N, workers=2)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    deadline, epoch, steps = time.monotonic() + minutes * 60, 0, 0
    while time.monotonic() < deadline:
        epoch += 1
        net.train()
        correct = seen = 0
        for x, y in batches(images, labels, 64, rng):
            loss = F.cross_entropy(logits := net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            steps += 1
            if time.monotonic() > deadline:
                break
        log(f"epoch {epoch}: {steps} steps, training top-1 {correct / max(seen, 1):.3f}")
    return net.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=12.0, help="training budget (default 12)")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    log = lambda text: print(text, file=sys.stderr, flush=True)   # noqa: E731
    torch.set_num_threads(2)
    started = time.perf_counter()
    net = train(args.minutes, log)
    train_s = time.perf_counter() - started

    from zfserve.engine.quantize import (META_ACCURACY, Int8Settings, agreement_report, ensure_int8,
                                         held_out_data)
    from zfserve.export import ensure_onnx, read_metadata
    from zfserve.import_torchvision import import_torchvision
    from zfserve.weights import read_snapshot
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / f"{ARCH}.safetensors"))
        (tmp / "classes.txt").write_text("\n".join(CLASSES) + "\n")
        directory = import_torchvision(tmp / f"{ARCH}.safetensors", ARCH, tmp / "classes.txt", tmp / "model")
        snapshot = read_snapshot(directory)
        settings = Int8Settings(calibration="synthetic", calibration_images=256, accuracy_images=1000,
                                max_accuracy_drop=100.0)   # measure, do not refuse: the figures are the point
        fp32 = ensure_onnx(snapshot)
        t0 = time.perf_counter()
        int8 = ensure_int8(fp32, snapshot.config, settings)
        quantize_s = time.perf_counter() - t0
        report = {"ort_int8": json.loads(read_metadata(int8)[META_ACCURACY])}
        _, gate = held_out_data(settings, snapshot.config)
        with torch.no_grad():   # the imported model against the trained network itself, on the gate images
            x = np.concatenate(list(gate.inputs))
            imported = torch.softmax(snapshot.model()(torch.from_numpy(x)), 1).numpy()
            trained = torch.softmax(net(torch.from_numpy(x)), 1).numpy()
        report["import_max_probability_difference"] = float(np.abs(imported - trained).max())
        try:
            from zfserve.engine.classifier import Classifier
            clf = Classifier(directory, precision="int8", engine="openvino", warmup=False, int8=settings)
            report["openvino_int8"] = agreement_report(imported.astype(np.float64), clf.probabilities(x),
                                                       gate.labels)
        except ImportError as exc:
            report["openvino_int8"] = f"not measured: {exc}"
    doc = {"model": f"{ARCH} (torchvision layout, widths / {SHRINK}, fc {FC}, {len(CLASSES)} classes), trained "
                    f"{train_s / 60:.1f} min on synthetic seed {TRAIN_SEED} ({TRAIN_N} images), imported",
           "calibration": "synthetic seed 5, 256 images", "gate": "synthetic seed 3, 1000 images",
           "train_s": train_s, "quantize_s": quantize_s, **report}
    print(json.dumps(doc, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
