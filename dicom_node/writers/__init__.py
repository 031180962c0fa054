"""The DICOM objects the node sends back for one analysed image, one new series
each, in the source's study: a Secondary Capture overlay (``sc``), a DICOM SEG
(``seg``) and a TID 1500 structured report (``sr``); and, for images the gate
skipped, an optional "not analysed" note.

UIDs and series numbers are deterministic (see :mod:`dicom_node.writers.common`):
writing the same result again gives the same objects, which replace the earlier
ones in the PACS.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from pydicom import Dataset

from dicom_node.writers.common import AI_DISCLAIMER, AlgorithmIdentity, OutputKind, check_result
from dicom_node.writers.sc import build_not_analysed, build_sc
from dicom_node.writers.seg import build_seg
from dicom_node.writers.sr import build_sr
from pipelines.base import ImageResult

__all__ = ["AI_DISCLAIMER", "AlgorithmIdentity", "OutputKind", "write_not_analysed", "write_results"]

logger = logging.getLogger(__name__)


def write_results(source: Dataset, result: ImageResult, display: np.ndarray,
                  algorithm: AlgorithmIdentity, caveats: Sequence[str] = ()) -> dict[OutputKind, Dataset]:
    """Return the SC, SEG and SR of ``result`` for ``source``, keyed by kind.

    ``caveats`` (the gate's, e.g. "age unknown") are shown in the SC banner and written into the SR.

    ``source`` is the analysed data set (its pixel data is not used, and may be
    compressed or absent); ``display`` is the windowed uint8 image at the source
    geometry (``ImageInput.display``). Raises ValueError when ``result`` or
    ``display`` does not fit ``source`` or the pipeline's output description
    (``algorithm.output``: other image, other Rows/Columns, other masks than its segments, scores
    outside [0, 1], duplicate finding names, flagged experimental finding, an image the
    content check skipped).
    """
    check_result(source, result, algorithm.output, display)
    seg = build_seg(source, result, algorithm)
    outputs: dict[OutputKind, Dataset] = {
        OutputKind.SC: build_sc(source, result, display, algorithm, caveats),
        OutputKind.SEG: seg,
        OutputKind.SR: build_sr(source, result, seg, algorithm, caveats),
    }
    logger.info("results for %s: %s", source.SOPInstanceUID,
                ", ".join(f"{kind}={ds.SOPInstanceUID}" for kind, ds in outputs.items()))
    return outputs


def write_not_analysed(source: Dataset, reason: str, algorithm: AlgorithmIdentity) -> Dataset:
    """Return a Secondary Capture note saying that ``source`` was not analysed, and why.

    Raises ValueError if ``reason`` is empty or ``source`` lacks the UIDs or Rows/Columns it must reference.
    """
    return build_not_analysed(source, reason, algorithm)
