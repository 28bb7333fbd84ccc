"""Image classifiers written here in PyTorch (random weights, seeded) and exported to ONNX files, so the ONNX
model tests need nothing from the network: a torchvision-layout ResNet-18, a MobileNet-style net (depthwise
separable convs), a net taking 160 px inputs and one ending in softmax.

    model = build("resnet18")                   # eval mode, deterministic weights
    path = export(model, tmp_path / "r18.onnx")  # input "input" (N, 3, S, S), output "output" (N, C)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

OPSET = 17     # the opset zfserve's own export writes


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: conv3x3-bn-relu-conv3x3-bn, plus the (downsampled) identity."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """torchvision's resnet18 layout (conv1, bn1, layer1..layer4 of two BasicBlocks, avgpool, fc)."""

    def __init__(self, num_classes: int = 1000, widths=(64, 128, 256, 512)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes, layers = widths[0], []
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                         nn.ReLU6(inplace=True), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU6(inplace=True))


class MobileNetStyle(nn.Module):
    """MobileNet v1's pattern at a small width: a strided stem, depthwise-separable blocks, global pooling, fc."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(inplace=True),
                                      _separable(16, 32, 2), _separable(32, 64, 2), _separable(64, 64, 1),
                                      _separable(64, 96, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(96, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class SmallNet(nn.Module):
    """A plain conv net for any input side; ``softmax``: its graph ends in a Softmax (probabilities out)."""

    def __init__(self, num_classes: int = 7, softmax: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 5, 2, 2), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(16, 32, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 48, 3, 1, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.fc1 = nn.Linear(48 * 4, 64)
        self.fc2 = nn.Linear(64, num_classes)
        self.softmax = softmax

    def forward(self, x):
        logits = self.fc2(torch.relu(self.fc1(torch.flatten(self.body(x), 1))))
        return torch.softmax(logits, dim=1) if self.softmax else logits


@dataclass(frozen=True)
class Spec:
    """A test model: how to build it, its input side, its preprocessing (resize, crop) and output kind."""

    build: type
    kwargs: dict
    crop: int
    resize: int
    output: str = "logits"

    @property
    def num_classes(self) -> int:
        return self.kwargs.get("num_classes", 10)


SPECS = {
    "resnet18": Spec(ResNet18, {"num_classes": 1000}, 224, 256),
    "mobilenet": Spec(MobileNetStyle, {"num_classes": 10}, 224, 256),
    "small160": Spec(SmallNet, {"num_classes": 7}, 160, 182),
    "softmax": Spec(SmallNet, {"num_classes": 5, "softmax": True}, 96, 110, "probabilities"),
}


def build(name: str, seed: int = 0) -> nn.Module:
    """The named model with seeded random weights; BatchNorm statistics are random too (not the identity), so
    the exported graph's folded BatchNorm is exercised. Eval mode."""
    spec = SPECS[name]
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.build(**spec.kwargs)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(c, generator=generator) * 0.5 + 0.75)
            module.weight.data.copy_(torch.rand(c, generator=generator) * 0.5 + 0.75)
            module.bias.data.copy_(torch.randn(c, generator=generator) * 0.1)
    return _decisive(model.eval(), spec.crop, generator)


@torch.no_grad()
def _decisive(model: nn.Module, size: int, generator: torch.Generator, spread: float = 4.0) -> nn.Module:
    """Scale the last Linear so the logits of random images spread by about ``spread`` (standard deviation over
    the classes): random weights otherwise give near-uniform probabilities that barely move when part of the image
    is occluded, which would make the parity and occlusion checks weak."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    softmax = getattr(model, "softmax", False)
    model.softmax = False
    x = torch.randn(4, 3, size, size, generator=generator)
    scale = spread / float(model(x).std(dim=1).mean())
    last.weight.mul_(scale)
    last.bias.mul_(scale)
    if softmax:
        model.softmax = True
    return model


def export(model: nn.Module, path: str | Path, size: int, *, input_name: str = "input",
           output_name: str = "output") -> Path:
    """``model`` as an ONNX file with a dynamic batch dimension, exported by PyTorch's TorchScript exporter."""
    path = Path(path)
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=[input_name], output_names=[output_name],
                          dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}, opset_version=OPSET,
                          do_constant_folding=True, dynamo=False)
    return path


def export_named(name: str, directory: str | Path, seed: int = 0) -> tuple[nn.Module, Path]:
    """(the PyTorch model, its ONNX file ``directory/<name>.onnx``)."""
    model = build(name, seed)
    return model, export(model, Path(directory) / f"{name}.onnx", SPECS[name].crop)


def classes_file(directory: str | Path, count: int) -> Path:
    path = Path(directory) / f"classes-{count}.txt"
    path.write_text("".join(f"class{i}\n" for i in range(count)))
    return path
