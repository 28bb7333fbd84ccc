"""Reference AlexNet and VGG in torchvision's layout, written here from the published layer tables, independent
of zfserve's code (torchvision's wheel does not load with this machine's CPU torch build).

AlexNet (torchvision's "one weird trick" variant, Krizhevsky 2014): features = Conv(3,64,11,s4,p2) ReLU
MaxPool(3,2) Conv(64,192,5,p2) ReLU MaxPool(3,2) Conv(192,384,3,p1) ReLU Conv(384,256,3,p1) ReLU
Conv(256,256,3,p1) ReLU MaxPool(3,2); avgpool = AdaptiveAvgPool2d(6); classifier = Dropout Linear(9216,4096)
ReLU Dropout Linear(4096,4096) ReLU Linear(4096,C).

VGG (Simonyan & Zisserman 2015, Table 1, configurations A/B/D/E): 3x3 convs with padding 1 and 2x2/2 max-pools
("M"), each conv followed by ReLU (BatchNorm2d between them in the _bn variants); avgpool =
AdaptiveAvgPool2d(7); classifier = Linear(25088,4096) ReLU Dropout Linear(4096,4096) ReLU Dropout
Linear(4096,C).

Widths can be divided by a factor (``shrink``) so tests run fast; the layer structure, and so the key layout
(``features.N.*``, ``classifier.N.*``), stays torchvision's.
"""

from __future__ import annotations

import torch
import torch.nn as nn

VGG_TABLES = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512,
              "M"],
}
# Published parameter counts at 1000 classes (torchvision's model documentation).
PARAMETERS = {"alexnet": 61_100_840, "vgg11": 132_863_336, "vgg13": 133_047_848, "vgg16": 138_357_544,
              "vgg19": 143_667_240, "vgg16_bn": 138_365_992}


class AlexNet(nn.Module):
    def __init__(self, num_classes: int = 1000, shrink: int = 1, fc: int = 4096):
        super().__init__()
        w = [max(1, c // shrink) for c in (64, 192, 384, 256, 256)]
        self.features = nn.Sequential(
            nn.Conv2d(3, w[0], kernel_size=11, stride=4, padding=2), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(w[0], w[1], kernel_size=5, padding=2), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(w[1], w[2], kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(w[2], w[3], kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(w[3], w[4], kernel_size=3, padding=1), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(w[4] * 6 * 6, fc), nn.ReLU(),
            nn.Dropout(0.5), nn.Linear(fc, fc), nn.ReLU(),
            nn.Linear(fc, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class VGG(nn.Module):
    def __init__(self, name: str = "vgg16", batch_norm: bool = False, num_classes: int = 1000, shrink: int = 1,
                 fc: int = 4096):
        super().__init__()
        layers, channels = [], 3
        for v in VGG_TABLES[name]:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            width = max(1, v // shrink)
            layers.append(nn.Conv2d(channels, width, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU())
            channels = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(channels * 7 * 7, fc), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(fc, fc), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(fc, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def reference(arch: str, num_classes: int = 10, shrink: int = 1, fc: int = 4096) -> nn.Module:
    """A torchvision-layout network by torchvision's name (``alexnet``, ``vgg16``, ``vgg16_bn``, ...)."""
    if arch == "alexnet":
        return AlexNet(num_classes, shrink, fc)
    return VGG(arch.removesuffix("_bn"), arch.endswith("_bn"), num_classes, shrink, fc)


@torch.no_grad()
def randomize(net: nn.Module, seed: int = 0, spread: float = 3.0) -> nn.Module:
    """He-scaled random weights, random biases and (BN variants) random running statistics and affine
    parameters, so that BN folding is really exercised; the last layer scaled so the logits spread over about
    ``spread`` units (probabilities neither uniform nor one-hot). Returns the net in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=gen)
            module.bias.normal_(0.0, 0.05, generator=gen)
        elif isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.2, generator=gen)
            module.running_var.uniform_(0.5, 2.0, generator=gen)
            module.weight.uniform_(0.5, 1.5, generator=gen)
            module.bias.normal_(0.0, 0.1, generator=gen)
    net.eval()
    last = net.classifier[-1]
    logits = net(torch.randn(2, 3, 224, 224, generator=gen))
    last.weight.mul_(spread / max(float(logits.std()), 1e-6))
    return net


# ---------------------------------------------------------------------------------------------- layer names
def named_slots(net: nn.Module) -> dict[str, int]:
    """zfserve's documented layer names -> the index in ``net.features`` whose output is that layer's activation
    (a conv's ReLU, or a pool). AlexNet: conv1..conv5, pool1, pool2, pool5; VGG: conv{block}_{i}, pool{block}."""
    slots, block, conv_in_block, convs = {}, 1, 0, 0
    alexnet = isinstance(net, AlexNet)
    pools = 0
    for index, layer in enumerate(net.features):
        if isinstance(layer, nn.Conv2d):
            convs += 1
            conv_in_block += 1
        elif isinstance(layer, nn.ReLU):
            slots[f"conv{convs}" if alexnet else f"conv{block}_{conv_in_block}"] = index
        elif isinstance(layer, nn.MaxPool2d):
            pools += 1
            slots[("pool1", "pool2", "pool5")[pools - 1] if alexnet else f"pool{block}"] = index
            block, conv_in_block = block + 1, 0
    return slots


# ---------------------------------------------------------------------------------------------- deconvnet
class DeconvReLU(torch.autograd.Function):
    """ReLU forward; the deconvnet's rule backward: relu(grad_output), whatever the forward input was."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=0)


def deconv_reference(net: nn.Module, images: torch.Tensor, slot: int, units) -> tuple[torch.Tensor, torch.Tensor]:
    """Autograd's deconvnet projections of ``units`` [(image, c, y, x)] of the activation after
    ``net.features[slot]``: one image copy per unit, ReLUs with the deconvnet backward, max-pool and BatchNorm
    differentiated normally (max-pool's backward sums where windows share a position). Seeded with 1 at the unit;
    returns (projections (K, 3, H, W), the units' activations)."""
    index = torch.tensor([u[0] for u in units])
    x = images[index].clone().requires_grad_(True)
    h = x
    for layer in list(net.features)[:slot + 1]:
        h = DeconvReLU.apply(h) if isinstance(layer, nn.ReLU) else layer(h)
    k = torch.arange(len(units))
    chosen = h[k, [u[1] for u in units], [u[2] for u in units], [u[3] for u in units]]
    chosen.sum().backward()
    return x.grad.detach(), chosen.detach()


def feature_maps(net: nn.Module, images: torch.Tensor, slot: int) -> torch.Tensor:
    """The activation after ``net.features[slot]`` (plain forward)."""
    h = images
    for layer in list(net.features)[:slot + 1]:
        h = layer(h)
    return h
