"""The lung-margin augmentation masks the unmasked lung box with a mask moved in or out by at most its margin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.chest_xray.lung_margin import RandLungMargind


def _box_and_keep() -> tuple[np.ndarray, np.ndarray]:
    """A (1, 64, 64) lung box of ramp values in (0, 1] and a (1, 64, 64) mask of two 'lungs'."""
    crop = np.linspace(0.1, 1.0, 64 * 64, dtype=np.float32).reshape(1, 64, 64)
    keep = np.zeros((1, 64, 64), dtype=np.float32)
    keep[0, 10:54, 8:28] = keep[0, 10:54, 36:56] = 1
    return crop, keep


@pytest.mark.parametrize("seed", range(12))
def test_the_edge_moves_by_at_most_the_margin_and_only_the_box_shows_inside_it(seed: int) -> None:
    crop, keep = _box_and_keep()
    transform = RandLungMargind("image", "keep", 3)
    transform.set_random_state(seed=seed)
    result = transform({"image": torch.from_numpy(crop), "keep": keep, "label": 1.0})
    assert set(result) == {"image", "label"} and isinstance(result["image"], torch.Tensor)
    image = result["image"].numpy()
    shown = image > 0
    assert np.array_equal(image[shown], crop[shown])  # inside the moved mask: the box as it was
    rows = np.flatnonzero(shown[0].any(axis=1))
    assert abs(rows[0] - 10) <= 3 and abs(rows[-1] - 53) <= 3
    assert abs(int(shown.sum()) - int(keep.sum())) <= 3 * 4 * 2 * (44 + 20)  # at most 3 px around both lungs


def test_both_ways_are_drawn_and_a_seed_repeats_the_draw() -> None:
    crop, keep = _box_and_keep()
    areas = []
    for seed in range(40):
        transform = RandLungMargind("image", "keep", 2)
        transform.set_random_state(seed=seed)
        areas.append(int((transform({"image": crop, "keep": keep})["image"] > 0).sum()))
    assert min(areas) < keep.sum() < max(areas) and keep.sum() in areas
    again = RandLungMargind("image", "keep", 2)
    again.set_random_state(seed=7)
    assert int((again({"image": crop, "keep": keep})["image"] > 0).sum()) == areas[7]
