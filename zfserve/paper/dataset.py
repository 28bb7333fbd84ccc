"""The image set the analyses run over: the synthetic set (rendered on demand, with exact object masks and
face-part boxes) or a directory (an ImageFolder tree, with masks and parts when it holds the
``annotations.json`` that ``zfserve data synth`` writes), plus the feature extraction they share."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .. import _checks as checks
from ..data import CLASSES, label_of, read_mask, render, scan
from ..model import ZFNet
from ..preprocess import decode_image, to_input


@dataclass
class Item:
    """One image of an analysis set: raw uint8 (H, W, 3), label, object mask (bool (H, W)) and part boxes."""

    image: np.ndarray
    label: int
    mask: np.ndarray | None = None
    parts: dict = field(default_factory=dict)


class AnalysisData:
    """An indexable image set with labels and, where known, object masks and face-part boxes.

    ``source``: ``"synthetic"`` (images ``0..n-1`` of synthetic seed ``seed``, rendered on demand) or a
    directory (:func:`zfserve.data.scan`: annotations.json when present, else the ImageFolder tree); at most
    ``n`` images.
    """

    def __init__(self, source: str = "synthetic", *, seed: int = 3, n: int = 200):
        checks.integer(n, "n", 1)
        self.source, self.seed = str(source), int(seed)
        if self.source == "synthetic":
            checks.integer(seed, "seed", 0)
            self.classes = list(CLASSES)
            self._files = None
            self.n = int(n)
            return
        self._files, self.classes = scan(self.source)
        self.n = min(int(n), len(self._files))

    def __len__(self) -> int:
        return self.n

    @property
    def has_masks(self) -> bool:
        return self._files is None or any(f.mask is not None for f in self._files[:self.n])

    def describe(self) -> str:
        return f"synthetic seed {self.seed}, {self.n} images" if self._files is None else \
            f"{self.source}, {self.n} images"

    def item(self, index: int) -> Item:
        if not 0 <= index < self.n:
            raise IndexError(index)
        if self._files is None:
            sample = render(self.seed, index)
            return Item(sample.image, sample.label, sample.mask, dict(sample.parts))
        entry = self._files[index]
        image = decode_image(entry.path, field=f"data {entry.path}")
        mask = read_mask(entry.mask) if entry.mask is not None else None
        return Item(image, entry.label, mask, dict(entry.parts))

    def labels(self) -> np.ndarray:
        if self._files is None:
            return np.array([label_of(i) for i in range(self.n)], dtype=np.int64)
        return np.array([f.label for f in self._files[:self.n]], dtype=np.int64)

    def inputs(self, indices, config) -> np.ndarray:
        """Network inputs float32 (B, 3, crop, crop) through the model's own preprocessing."""
        return np.stack([to_input(self.item(int(i)).image, config) for i in indices])

    def indices_of(self, label: int) -> list[int]:
        return [i for i, lab in enumerate(self.labels().tolist()) if lab == label]


def labels_match(model: ZFNet, data: AnalysisData) -> bool:
    """Whether the data's class list is the model's (so a label indexes the model's outputs)."""
    return list(model.config.class_names) == list(data.classes)


@torch.no_grad()
def features(model: ZFNet, x: np.ndarray | torch.Tensor, layers, batch: int = 16) -> dict[str, np.ndarray]:
    """Flattened activations of ``layers`` (N, D) plus ``"prob"`` (N, C) softmax, in eval mode."""
    model.eval()
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    out = {name: [] for name in (*layers, "prob")}
    for start in range(0, len(x), batch):
        trace = model.trace(x[start:start + batch], layers=tuple(layers))
        for name in layers:
            out[name].append(trace.activations[name].flatten(1).double().numpy())
        out["prob"].append(torch.softmax(trace.logits.double(), dim=1).numpy())
    return {name: np.concatenate(v) for name, v in out.items()}
