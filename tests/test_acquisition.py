"""The other-acquisition augmentations change the image only, stay in range, and are seeded."""

from __future__ import annotations

import numpy as np
import pytest

from training.chest_xray.acquisition import CLASSIFIER_KINDS, KINDS, RandAcquisitiond
from training.chest_xray.metrics import worst_source_threshold, youden_threshold


def _chest_like() -> np.ndarray:
    """A smooth 1 × 96 × 96 image in [0, 1] with two dark 'lungs'."""
    ys, xs = np.mgrid[0:96, 0:96] / 96.0
    image = 0.8 - 0.5 * (np.exp(-((xs - 0.3) ** 2 + (ys - 0.5) ** 2) / 0.03) + np.exp(-((xs - 0.7) ** 2 + (ys - 0.5) ** 2) / 0.03))
    return image[None].astype(np.float32)


@pytest.mark.parametrize("kind", [kind for kind, _ in KINDS + CLASSIFIER_KINDS], ids=lambda k: getattr(k, "__name__", "partial"))
def test_each_kind_changes_the_image_within_range(kind) -> None:
    image = _chest_like()[0]
    changed = np.clip(kind(image, np.random.RandomState(0)), 0, 1)
    assert changed.shape == image.shape
    assert not np.allclose(changed, image, atol=1e-3)


def test_the_mask_is_never_changed_and_a_seed_repeats_the_draw() -> None:
    mask = (_chest_like() < 0.6).astype(np.float32)
    transform = RandAcquisitiond("image", tuple((kind, 1.0) for kind, _ in KINDS))
    transform.set_random_state(seed=3)
    first = transform({"image": _chest_like(), "label": mask.copy()})
    transform.set_random_state(seed=3)
    second = transform({"image": _chest_like(), "label": mask.copy()})
    assert np.array_equal(first["label"], mask)
    assert np.array_equal(np.asarray(first["image"]), np.asarray(second["image"]))
    assert 0.0 <= float(np.min(first["image"])) and float(np.max(first["image"])) <= 1.0


def test_the_classifiers_background_stays_zero() -> None:
    image = _chest_like()
    image[:, :, :20] = 0.0  # outside the lungs, as the classifier input has it
    transform = RandAcquisitiond("image", tuple((kind, 1.0) for kind, _ in CLASSIFIER_KINDS), keep_background=True)
    transform.set_random_state(seed=0)
    changed = np.asarray(transform({"image": image})["image"])
    assert not changed[:, :, :20].any()
    assert not np.allclose(changed[:, :, 20:], image[:, :, 20:], atol=1e-3)


def test_the_threshold_is_fair_to_the_worst_source() -> None:
    """Source A's negatives score low, source B's high: Youden's J over the pooled negatives sacrifices B
    (few of them), the worst-source rule does not."""
    labels = np.array([1] * 10 + [0] * 40 + [0] * 5)
    scores = np.concatenate([np.linspace(0.6, 0.95, 10), np.linspace(0.0, 0.3, 40), np.linspace(0.6, 0.7, 5)])
    sources = np.array(["a"] * 50 + ["b"] * 5)
    pooled = youden_threshold(labels, scores)
    fair = worst_source_threshold(labels, scores, sources)
    assert (scores[sources == "b"] < pooled).mean() < 0.5  # pooled: most of B flagged
    assert (scores[sources == "b"] < fair).mean() == 1.0 and (scores[labels == 1] >= fair).mean() >= 0.7
