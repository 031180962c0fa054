"""The contract between the node and an analysis pipeline.

A pipeline gates a DICOM data set (``accepts``), turns an accepted one into an
:class:`ImageInput` (``load``) and analyses inputs into :class:`ImageResult`
objects (``run``). It imports no Celery, network or database code, so it can be
run and tested on a numpy array.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue


def pixel_spacing(dataset: Dataset) -> tuple[float, float] | None:
    """Return the data set's Pixel Spacing, or else its Imager Pixel Spacing, in mm, when usable:
    two finite values > 0. Anything else is no spacing (None): RG1's ``0\\0``, one value,
    a negative, NaN or infinite value, or one that is not a number (``a\\b``)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = dataset.get(keyword)
            values = [float(v) for v in value] if isinstance(value, MultiValue) else []
        except (TypeError, ValueError):  # not numbers: pydicom cannot convert the DS values
            continue
        if len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values):
            return values[0], values[1]
    return None


@dataclass(frozen=True)
class GateVerdict:
    """The quality gate's answer for one data set: accepted, or skipped with a reason.

    ``caveats`` are short phrases an accepted image's results must show (``age unknown``).
    """

    accepted: bool
    reason: str = ""
    caveats: tuple[str, ...] = ()

    @classmethod
    def accept(cls, caveats: tuple[str, ...] = ()) -> GateVerdict:
        return cls(True, "", tuple(caveats))

    @classmethod
    def skip(cls, reason: str) -> GateVerdict:
        return cls(False, reason)


@dataclass
class ImageInput:
    """One image ready for analysis.

    ``pixels`` is 2-D float32 at the source resolution, after the Modality LUT,
    oriented so that higher values are brighter (MONOCHROME2). ``display`` is the
    same image windowed to uint8 for overlays.
    """

    sop_instance_uid: str
    pixels: np.ndarray
    display: np.ndarray
    pixel_spacing_mm: tuple[float, float] | None = None


@dataclass
class Finding:
    """One finding's score for one image.

    ``heatmap`` is float32 in [0, 1] at the source resolution and zero outside the
    lungs; ``region`` is the localized boolean region (set when flagged).
    ``experimental`` heads report a score but are never flagged.
    """

    name: str
    display_name: str
    probability: float
    threshold: float
    flagged: bool
    experimental: bool
    heatmap: np.ndarray | None = None
    region: np.ndarray | None = None


@dataclass
class ImageResult:
    """Everything a pipeline says about one image.

    ``verdict`` is the image content check's: a skipped image has no findings and
    must yield no result objects.
    """

    sop_instance_uid: str
    lung_mask: np.ndarray
    findings: list[Finding] = field(default_factory=list)
    verdict: GateVerdict = field(default_factory=GateVerdict.accept)

    @property
    def flagged(self) -> list[Finding]:
        return [f for f in self.findings if f.flagged]


@runtime_checkable
class Pipeline(Protocol):
    """What the node needs of an analysis pipeline."""

    name: str
    version: str
    model_versions: str
    """Each model's identity (name, architecture, weights digest), ``; ``-separated."""

    def accepts(self, dataset: Dataset) -> GateVerdict:
        """Return whether ``dataset``'s attributes allow analysing it, and why not (the tag gate)."""
        ...

    def load(self, dataset: Dataset) -> ImageInput:
        """Decode and normalise an accepted data set into an :class:`ImageInput`."""
        ...

    def run(self, inputs: Sequence[ImageInput]) -> list[ImageResult]:
        """Analyse ``inputs``; one result per input, in order. An input whose pixels fail the
        content check gets a result whose verdict says why, and no findings."""
        ...
