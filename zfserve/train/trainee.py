"""What a run trains: the plain ZFNet, or :class:`TrainingNet`, the ZFNet plus structure that exists only while
training and folds away exactly when the model is saved (``--batchnorm``, ``--tied-fc6``)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..model import ZFNet, build, fold_batchnorm_


class TrainingNet(nn.Module):
    """ZFNet plus structure that exists only while training and folds away exactly when the model is saved
    (``--batchnorm``, ``--tied-fc6``; documented deviations that make short runs learn, see the README).

    * ``batchnorm``: a BatchNorm2d after each conv, before its ReLU. In eval mode BN is affine per channel, so
      :meth:`export` folds it into the conv: ``w' = w * g / s``, ``b' = (b - mu) * g / s + beta`` with
      ``s = sqrt(running_var + eps)``.
    * ``tied_fc6``: fc6 sees the mean of pool5 over its positions, i.e. one weight per (unit, channel) shared
      by all 6 x 6 positions, so the classifier need not learn each position separately. :meth:`export`
      writes the full fc6 whose weight for input ``c * P + p`` (flatten order) is ``W[:, c] / P``.

    The exported network is the plain paper ZFNet, equal in eval mode to this one (up to float rounding).
    """

    def __init__(self, model: ZFNet, *, batchnorm: bool, tied_fc6: bool):
        super().__init__()
        self.model = model
        self.bn = nn.ModuleDict({name: nn.BatchNorm2d(getattr(model, name).out_channels)
                                 for name in model.conv_layers}) if batchnorm else None
        self.fc6 = nn.Linear(model.conv5.out_channels, model.fc6.out_features) if tied_fc6 else None

    def trained_parameters(self):
        """Everything the optimizer updates: with a tied fc6, the model's own fc6 is only written by export."""
        skip = {id(p) for p in self.model.fc6.parameters()} if self.fc6 is not None else set()
        return [p for p in self.parameters() if id(p) not in skip]

    def _conv(self, name: str, x: torch.Tensor) -> torch.Tensor:
        x = getattr(self.model, name)(x)
        return self.bn[name](x) if self.bn is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.norm1(m.pool1(m.relu1(self._conv("conv1", x))))
        x = m.norm2(m.pool2(m.relu2(self._conv("conv2", x))))
        x = m.relu3(self._conv("conv3", x))
        x = m.relu4(self._conv("conv4", x))
        x = m.pool5(m.relu5(self._conv("conv5", x)))
        x = self.fc6(x.mean(dim=(2, 3))) if self.fc6 is not None else m.fc6(torch.flatten(x, 1))
        x = m.drop6(m.relu6(x))
        x = m.drop7(m.relu7(m.fc7(x)))
        return m.fc8(x)

    @torch.no_grad()
    def export(self) -> ZFNet:
        """A plain ZFNet (float32, CPU, eval mode, sharing ``model.config``) with BN and the tied fc6 folded in."""
        out = build(self.model.config)
        out.load_state_dict({k: v.detach().float().cpu().contiguous() for k, v in self.model.state_dict().items()})
        if self.bn is not None:
            for name in out.conv_layers:
                bn = self.bn[name]
                fold_batchnorm_(getattr(out, name), bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        if self.fc6 is not None:
            positions = out.fc6.in_features // out.conv5.out_channels
            out.fc6.weight.copy_(self.fc6.weight.float().cpu().repeat_interleave(positions, dim=1) / positions)
            out.fc6.bias.copy_(self.fc6.bias.float().cpu())
        out.config = self.model.config
        return out.eval()


# Images whose centre crops set the BatchNorm statistics after each epoch (see recalibrate_batchnorm).
BN_CALIBRATION_IMAGES = 1024


@torch.no_grad()
def recalibrate_batchnorm(net: nn.Module, batches) -> None:
    """Set every BatchNorm's running statistics to the exact average over ``batches`` (float32, no autocast).

    The running averages kept during training trail weights that move at every step (and are accumulated under
    bf16 autocast when ``amp`` is on); at a high learning rate they made eval-mode accuracy 13 points lower than
    batch statistics gave. Recomputing them on the final weights makes the folded model match what was trained.
    """
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:
        return
    was_training = net.training
    net.eval()
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None          # cumulative average over the batches
        bn.train()
    for x in batches:
        net(x)
    for bn in norms:
        bn.momentum = 0.1
    net.train(was_training)


def exported(trainee: nn.Module) -> ZFNet:
    """The plain ZFNet a trainee stands for (itself, or a :class:`TrainingNet` folded)."""
    return trainee.export() if isinstance(trainee, TrainingNet) else trainee


def trained_parameters(trainee: nn.Module) -> list:
    """What the optimizer updates: a plain model's parameters, or :meth:`TrainingNet.trained_parameters`."""
    return trainee.trained_parameters() if isinstance(trainee, TrainingNet) else list(trainee.parameters())
