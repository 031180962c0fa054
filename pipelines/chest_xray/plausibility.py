"""Does the image itself look like a frontal chest radiograph? The content half of the gate.

The tags of a data set can be missing or wrong; the pixels cannot lie as easily. After
decoding, and before any finding is scored, the lung network's probability map at its
input size is measured (:func:`measure`): a blank image, an image without a plausible
pair of lungs (their share of the image, two components of similar size side by side
in the middle of the image, each taller than wide and compact), other anatomy, a
lateral or rotated view, or an inverted image (lungs brighter than the mediastinum)
fails one of the bounds of a :class:`ContentRule` (:meth:`ContentRule.verdict`).

The bounds are fitted on the train splits of the chest sets (``train --task gate``
writes them into the manifest); ``evaluate gate`` measures false skips on the test
splits and skips on a corpus of images that are not frontal chest radiographs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from scipy import ndimage

from pipelines.base import Verdict
from pipelines.errors import WeightsError

#: A display image with fewer grey levels than this, or this little spread, is blank.
MIN_GREY_LEVELS = 16
MIN_SPREAD = 8.0


@dataclass(frozen=True)
class LungEvidence:
    """What the lung probability map of one image says, each value in image-size units.

    ``lung_share``: lung pixels / image pixels; ``balance``: smaller lung / larger lung
    (0 with fewer than two); ``stray``: mask outside the two lungs / mask;
    ``gap``: horizontal distance of the two lungs' centroids / image width (negative
    when the image-left one is not left of the other, 0 with fewer than two);
    ``centre_row`` / ``centre_col``: the lungs' centroid / image height or width;
    ``aspect``: the lower of the two lungs' bounding-box height / width; ``fill``: the
    lower of the two lungs' area / bounding-box area; ``certainty``: the share of
    pixels above 0.1 probability that are above 0.9; ``contrast``: median display
    level of the mediastinum minus that of the lungs, over 255 (negative when inverted).
    """

    lung_share: float
    balance: float
    stray: float
    gap: float
    centre_row: float
    centre_col: float
    aspect: float
    fill: float
    certainty: float
    contrast: float

    def as_dict(self) -> dict[str, float]:
        return {key: round(value, 4) for key, value in asdict(self).items()}


EMPTY = LungEvidence(0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
MEASURES = tuple(f.name for f in fields(LungEvidence))

#: What an administrator reads when a measure is out of its bounds: (too low, too high).
REASONS: dict[str, tuple[str, str]] = {
    "lung_share": ("lungs too small for a frontal chest radiograph", "lung area too large for a frontal chest radiograph"),
    "balance": ("no pair of lungs of similar size", "no pair of lungs of similar size"),
    "stray": ("lung mask fragmented", "lung mask fragmented"),
    "gap": ("lungs not side by side", "lungs too far apart"),
    "centre_row": ("lungs too high in the image", "lungs too low in the image"),
    "centre_col": ("lungs off-centre", "lungs off-centre"),
    "aspect": ("lungs wider than tall (rotated or lateral view?)", "lungs implausibly narrow"),
    "fill": ("lung shape implausible", "lung shape implausible"),
    "certainty": ("lung network unsure of this image", "lung network unsure of this image"),
    "contrast": ("lungs not darker than the mediastinum (inverted polarity?)", "contrast implausible"),
}


def blank_reason(display: np.ndarray) -> str | None:
    """Return why ``display`` (uint8) is blank or near-constant, or None when it has content."""
    levels = np.unique(display).size
    spread = float(np.percentile(display, 99) - np.percentile(display, 1))
    if levels < MIN_GREY_LEVELS or spread < MIN_SPREAD:
        return f"blank or near-constant image ({levels} grey levels, 1-99 % spread {spread:.0f} of 255)"
    return None


def measure(probability: np.ndarray, display: np.ndarray) -> LungEvidence:
    """Return the :class:`LungEvidence` of a (H, W) lung probability map and the display image.

    ``display`` is resized to the map's size for the contrast measure.
    """
    mask = probability > 0.5
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return EMPTY
    sizes = ndimage.sum(mask, labels, range(1, count + 1))
    order = np.argsort(sizes)[::-1]
    lungs = [labels == 1 + int(i) for i in order[:2]]
    height, width = mask.shape
    kept = np.logical_or.reduce(lungs)
    rows, cols = np.nonzero(kept)
    boxes = [_box(lung) for lung in lungs]
    aspect = min((r1 - r0) / max(c1 - c0, 1) for r0, r1, c0, c1 in boxes)
    fill = min(float(lung.sum()) / max((r1 - r0) * (c1 - c0), 1) for lung, (r0, r1, c0, c1) in zip(lungs, boxes))
    confident = probability > 0.1
    if len(lungs) == 2:
        (a, b) = sorted(lungs, key=lambda lung: np.nonzero(lung)[1].mean())
        gap = (np.nonzero(b)[1].mean() - np.nonzero(a)[1].mean()) / width
        balance = float(min(sizes[order[:2]]) / max(sizes[order[:2]]))
        contrast = _mediastinum_contrast(display, probability.shape, a, b)
    else:
        gap, balance, contrast = 0.0, 0.0, 0.0
    return LungEvidence(
        lung_share=float(mask.mean()),
        balance=balance,
        stray=float(1.0 - kept.sum() / mask.sum()),
        gap=float(gap),
        centre_row=float(rows.mean() / height),
        centre_col=float(cols.mean() / width),
        aspect=float(aspect),
        fill=fill,
        certainty=float((probability > 0.9).sum() / max(int(confident.sum()), 1)),
        contrast=contrast,
    )


def _box(region: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(region)
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


def _mediastinum_contrast(display: np.ndarray, shape: tuple[int, ...], left: np.ndarray, right: np.ndarray) -> float:
    """Return (median of the band between the lungs - median of the lungs) / 255, at the map's size."""
    small = np.asarray(ndimage.zoom(display.astype(np.float32), (shape[0] / display.shape[0], shape[1] / display.shape[1]),
                                    order=1, grid_mode=True, mode="nearest"))[: shape[0], : shape[1]]
    lungs = left | right
    rows = np.flatnonzero(lungs.any(axis=1))
    left_edge = np.nonzero(left)[1].max()
    right_edge = np.nonzero(right)[1].min()
    if right_edge <= left_edge + 1:
        return 0.0
    band = small[rows[0] : rows[-1] + 1, left_edge + 1 : right_edge]
    return float((np.median(band) - np.median(small[lungs])) / 255.0)


@dataclass(frozen=True)
class ContentRule:
    """The bounds each measure of :class:`LungEvidence` must lie within: ``{measure: (low, high)}``."""

    bounds: Mapping[str, tuple[float, float]]

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any]) -> ContentRule:
        """Return the rule of a manifest ``gate`` entry; raises :class:`WeightsError` when malformed."""
        bounds = entry.get("bounds") if isinstance(entry, Mapping) else None
        if not isinstance(bounds, Mapping) or not bounds:
            raise WeightsError("the manifest's gate entry needs 'bounds': {measure: [low, high]}")
        parsed = {}
        for name, pair in bounds.items():
            if name not in MEASURES or not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise WeightsError(f"gate bound {name!r}: expected one of {MEASURES} with [low, high]")
            low, high = float(pair[0]), float(pair[1])
            if low > high:
                raise WeightsError(f"gate bound {name!r}: low {low} above high {high}")
            parsed[name] = (low, high)
        return cls(parsed)

    def as_manifest(self) -> dict[str, Any]:
        return {"bounds": {name: [round(low, 4), round(high, 4)] for name, (low, high) in self.bounds.items()}}

    def verdict(self, evidence: LungEvidence) -> Verdict:
        """Accept when every measure is within its bounds; else skip naming the first that is not."""
        if evidence.lung_share == 0.0:
            return Verdict.skip("image content: no lungs found")
        for name, (low, high) in self.bounds.items():
            value = getattr(evidence, name)
            if not low <= value <= high:
                why = REASONS[name][0 if value < low else 1]
                return Verdict.skip(f"image content: {why} ({name} {value:.2f} outside {low:.2f}-{high:.2f})")
        return Verdict.accept()
