"""The image half of the quality gate: do the pixels look like a frontal chest radiograph?

Tags can be missing or wrong; after decoding, and before any finding is scored, each
image must also pass three checks, in this order:

1. it is not blank or near-constant (:func:`blank_reason`);
2. the lung network found lungs in it;
3. a small view / body-part network (``content_check`` in the manifest), trained to
   tell frontal chest radiographs from other anatomy, laterals, rotated, inverted and
   cropped chests and non-radiographs, scores it at or above its threshold.

Each failure is a skip with a reason an administrator can read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.base import GateVerdict
from pipelines.chest_xray.models import load_network
from pipelines.chest_xray.preprocess import network_image
from pipelines.errors import WeightsError

#: A display image with fewer grey levels than this, or a 1-99 % spread below MIN_SPREAD, is blank.
MIN_GREY_LEVELS = 16
MIN_SPREAD = 8.0


def blank_reason(display: np.ndarray) -> str | None:
    """Return why ``display`` (uint8) is blank or near-constant, or None when it has content."""
    counts = np.bincount(display.ravel(), minlength=256)
    levels = int(np.count_nonzero(counts))
    share = np.cumsum(counts) / display.size
    spread = float(np.searchsorted(share, 0.99) - np.searchsorted(share, 0.01))
    if levels < MIN_GREY_LEVELS or spread < MIN_SPREAD:
        return f"blank or near-constant image ({levels} grey levels, 1-99 % spread {spread:.0f} of 255)"
    return None


def content_batch(displays: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """Return the (N, 1, size, size) input of the view / body-part network for ``displays``."""
    return torch.from_numpy(np.stack([network_image(d, size) for d in displays])[:, None])


class ContentCheck:
    """The view / body-part network with its threshold: ``score`` ≥ ``threshold`` passes."""

    def __init__(self, network: nn.Module, size: int, threshold: float, device: torch.device) -> None:
        self.network = network
        self.size = size
        self.threshold = threshold
        self.device = device

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any], root: Path, device: torch.device) -> ContentCheck:
        """Return the check of the manifest's ``content_check`` entry, its weights verified.

        Raises :class:`WeightsError` when the entry is incomplete or its weights missing or altered.
        """
        missing = [key for key in ("file", "sha256", "architecture", "input", "threshold") if key not in entry]
        if missing:
            raise WeightsError(f"manifest content_check lacks {', '.join(missing)}")
        size = entry["input"].get("size")
        size = int(size[0] if isinstance(size, list) else size)
        return cls(load_network(entry, root, device), size, float(entry["threshold"]), device)

    @torch.no_grad()
    def scores(self, displays: Sequence[np.ndarray]) -> np.ndarray:
        """Return the probability that each display image is a frontal chest radiograph."""
        if not displays:
            return np.zeros(0, dtype=np.float32)
        batch = content_batch(displays, self.size).to(self.device)
        return torch.sigmoid(self.network(batch)[:, 0]).float().cpu().numpy()

    def verdicts(self, displays: Sequence[np.ndarray], lung_masks: Sequence[np.ndarray]) -> list[GateVerdict]:
        """Return the content verdict of each display image with its lung mask (see the module docstring)."""
        scores = self.scores(displays)
        verdicts = []
        for display, mask, score in zip(displays, lung_masks, scores, strict=True):
            if (blank := blank_reason(display)) is not None:
                verdicts.append(GateVerdict.skip(f"image content: {blank}"))
            elif not mask.any():
                verdicts.append(GateVerdict.skip("image content: no lungs found"))
            elif score < self.threshold:
                verdicts.append(GateVerdict.skip(
                    f"image content: does not look like a frontal chest radiograph "
                    f"(view check {score:.2f}, needs {self.threshold:.2f})"))
            else:
                verdicts.append(GateVerdict.accept())
        return verdicts
