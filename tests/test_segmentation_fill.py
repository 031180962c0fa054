"""Hole filling of the lung masks: the result of MONAI's ``FillHoles``, computed faster."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import FillHoles

from pipelines.chest_xray.segmentation import fill_holes


def test_enclosed_background_is_filled_and_open_background_is_not() -> None:
    mask = np.zeros((12, 12), dtype=bool)
    mask[2:10, 2:10] = True
    mask[5:7, 6:8] = False  # an enclosed hole
    mask[6:8, 0:3] = False  # a notch open to the left border
    mask[2, 2] = mask[3, 3] = False  # (3, 3) reaches the outside only diagonally: open at 8-connectivity
    filled = fill_holes(mask)
    assert filled[5:7, 6:8].all()
    assert not filled[6:8, 2].any() and not filled[3, 3]
    assert filled[mask].all()


@pytest.mark.parametrize("seed", range(5))
def test_same_result_as_monai_fill_holes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random((64, 80)) < 0.55  # many small holes and pockets, some only diagonally connected
    expected = np.asarray(FillHoles()(torch.from_numpy(mask[None].astype(np.uint8)))[0], dtype=bool)
    assert (fill_holes(mask) == expected).all()
    assert (fill_holes(mask) != mask).any()  # the case has holes to fill
