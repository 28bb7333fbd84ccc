"""Which features the out-of-distribution score reads, chosen from the model's own layer list, and how the
exported classification graph computes them (so that serving pays no second pass; see :mod:`.ood`).

- the **penultimate** layer: the last vector layer before the logits (ZFNet's and AlexNet's fc7), read as it is;
- a **low-level** layer: the first convolution after the first pooling (ZFNet's and AlexNet's conv2), read as its
  per-channel mean and standard deviation over the map, ``<layer>.channel_stats`` (N, 2C): what tells a
  photograph's texture from a rendering's. Computed inside the graph, so the map itself never leaves it;
- the ``logits``, which the graph gives anyway.

Layers are told apart by their facts (``model.layer_info()``): a vector layer has a 1-D shape; a spatial layer
with parameters is a convolution, one without is a pooling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

CHANNEL_STATS = "channel_stats"
LOGITS = "logits"      # the export's name for the last layer's output


@dataclass(frozen=True)
class FeatureSpec:
    """The layers the score reads, by their model's names."""

    penultimate: str
    low_level: str

    @property
    def low_level_output(self) -> str:
        return f"{self.low_level}.{CHANNEL_STATS}"

    @property
    def outputs(self) -> tuple[str, ...]:
        """The graph outputs the features travel in (besides ``logits``), in order."""
        return (self.penultimate, self.low_level_output)

    @property
    def layers(self) -> tuple[str, ...]:
        return (self.low_level, self.penultimate)


def feature_spec(model) -> FeatureSpec:
    """The penultimate and the low-level layer of ``model``, from its layer list (see the module's note)."""
    infos = model.layer_info()
    vectors = [info.name for info in infos if len(info.shape) == 1]
    spatial = [info for info in infos if len(info.shape) == 3]
    if len(vectors) < 2 or not spatial:
        raise ValueError(f"the out-of-distribution features need a vector layer before the logits and a "
                         f"convolution; this model's layers: {[info.name for info in infos]}")
    convs = [info.name for info in spatial if info.params > 0]
    first_pool = next((i for i, info in enumerate(spatial) if info.params == 0), None)
    after_pool = [info.name for info in spatial[first_pool + 1:] if info.params > 0] if first_pool is not None else []
    low = after_pool[0] if after_pool else convs[min(1, len(convs) - 1)]
    return FeatureSpec(penultimate=vectors[-2], low_level=low)


def channel_stats(activation: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, 2C): each channel's mean over the map, then its standard deviation."""
    mean = activation.mean(dim=(2, 3))
    centred = activation - mean[:, :, None, None]
    return torch.cat([mean, (centred * centred).mean(dim=(2, 3)).sqrt()], dim=1)


def feature_tensors(activations: dict, spec: FeatureSpec) -> list[torch.Tensor]:
    """The feature outputs of :attr:`FeatureSpec.outputs`, from a trace's activations."""
    return [activations[spec.penultimate], channel_stats(activations[spec.low_level])]


def head(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of the layer that makes the logits (the model's last Linear), for ViM."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no Linear layer making its logits")
    return linears[-1].weight.detach().float().cpu(), linears[-1].bias.detach().float().cpu()


__all__ = ["CHANNEL_STATS", "FeatureSpec", "channel_stats", "feature_spec", "feature_tensors", "head"]
