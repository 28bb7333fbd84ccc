"""The synthetic dataset: determinism, masks that match the drawn object, face parts, the on-disk layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from zfserve.data import (CLASSES, NUM_CLASSES, PART_NAMES, SyntheticDataset, image_folder_arrays, render,
                          synthetic_arrays, write_synthetic)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def test_classes_and_labels():
    assert NUM_CLASSES >= 10 and "face" in CLASSES
    labels = [render(7, i).label for i in range(2 * NUM_CLASSES)]
    assert sorted(labels) == sorted(list(range(NUM_CLASSES)) * 2)


def test_deterministic_from_seed_and_index():
    a, b = render(11, 5), render(11, 5)
    assert a.image.dtype == np.uint8 and a.image.shape == (256, 256, 3) and a.mask.shape == (256, 256)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.parts == b.parts
    assert not np.array_equal(a.image, render(12, 5).image)
    assert not np.array_equal(a.image, render(11, 5 + NUM_CLASSES).image)   # same class, another sample


@pytest.mark.parametrize("index", range(NUM_CLASSES))
def test_mask_is_exactly_the_drawn_object(index):
    seed = 1000 + index
    sample = render(seed, index)
    empty = render(seed, index, draw_object=False)
    assert np.array_equal(sample.mask, empty.mask)
    area = sample.mask.mean()
    assert 0.005 < area < 0.5
    changed = np.abs(sample.image.astype(int) - empty.image.astype(int)).sum(axis=2) > 0
    # Inside the mask the object replaced the background; blur (sigma <= 1.2) reaches at most a few pixels out.
    assert changed[sample.mask].mean() > 0.97
    assert not changed[~_dilate(sample.mask, 5)].any()


def test_face_parts_lie_inside_the_head():
    face = CLASSES.index("face")
    for k in range(4):
        sample = render(3, face + k * NUM_CLASSES)
        assert set(sample.parts) == set(PART_NAMES)
        for name, (x0, y0, x1, y1) in sample.parts.items():
            assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256, name
            cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
            assert sample.mask[cy, cx], name            # each part's centre is on the head
        assert sample.parts["left_eye"][0] < sample.parts["right_eye"][0]
        assert sample.parts["nose"][1] < sample.parts["mouth"][1]
    assert render(3, 0).parts == {}


def test_dataset_and_arrays_match_render(tmp_path):
    ds = SyntheticDataset(seed=4, n=5)
    image, label = ds[3]
    assert np.array_equal(image.numpy(), render(4, 3).image) and label == render(4, 3).label
    images, labels = synthetic_arrays(4, 5, cache_dir=tmp_path)
    cached, _ = synthetic_arrays(4, 5, cache_dir=tmp_path)
    assert np.array_equal(images[3], render(4, 3).image) and np.array_equal(cached, images)
    assert list(labels) == [render(4, i).label for i in range(5)]


def test_write_synthetic_layout(tmp_path):
    out = write_synthetic(tmp_path / "synth", n=NUM_CLASSES + 1, seed=9)
    notes = json.loads((out / "annotations.json").read_text())
    assert len(notes) == NUM_CLASSES + 1
    for i, note in enumerate(notes):
        sample = render(9, i)
        assert note["label"] == sample.label and note["file"].startswith(CLASSES[sample.label] + "/")
        assert np.array_equal(np.asarray(Image.open(out / note["file"])), sample.image)
        mask = np.asarray(Image.open(out / note["mask"]))
        assert set(np.unique(mask)) <= {0, 255} and np.array_equal(mask == 255, sample.mask)
        assert note["parts"] == sample.parts
    images, labels, classes = image_folder_arrays(out)
    assert sorted(classes) == sorted(CLASSES) and len(images) == NUM_CLASSES + 1
    # The ImageFolder order is alphabetical: check each image's label names the class it was drawn as.
    by_image = {render(9, i).image.tobytes(): CLASSES[render(9, i).label] for i in range(NUM_CLASSES + 1)}
    assert all(by_image[img.tobytes()] == classes[lab] for img, lab in zip(images, labels))
