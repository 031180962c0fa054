"""Synthetic but realistic pipeline results on pydicom's RG1 chest radiographs, for the writer tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from dicom_node.writers import AlgorithmIdentity
from pipelines.base import Finding, ImageResult
from pipelines.chest_xray.plugin import ChestXrayPlugin

ALGORITHM = AlgorithmIdentity(name="chest-xray", version="1.0", model_versions="lung-unet 1.0; covid19-densenet 1.0",
                              output=ChestXrayPlugin.output, modalities=ChestXrayPlugin.modalities)

#: (centre row, centre column, semi-axis rows, semi-axis columns) of the two lungs in RG1 (1955 x 1841).
LUNGS = ((860, 450, 620, 280), (860, 1330, 620, 280))
#: Centre (row, column) and sigma in pixels of the Grad-CAM blob.
HOT_SPOT = (1100, 470, 190)


def read_source(name: str) -> pydicom.Dataset:
    """Return the pydicom test file ``name`` (RG1_UNCI.dcm, RG1_J2KR.dcm), pixel data included."""
    return pydicom.dcmread(get_testdata_file(name))


def put_raw(dataset: pydicom.Dataset, keyword: str, vr: str, value: bytes) -> None:
    """Put ``value`` into ``dataset`` as if read from a file: pydicom neither checks nor converts it
    until it is used (``a\\b`` as a Pixel Spacing, ``01.02.1970`` as a date)."""
    tag = Tag(keyword)
    value += b" " * (len(value) % 2)
    dataset[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def display_of(source: pydicom.Dataset) -> np.ndarray:
    """Return the image windowed to uint8 (1st-99th percentile), MONOCHROME1 inverted: what ImageInput.display holds."""
    pixels = source.pixel_array.astype(np.float32)
    low, high = np.percentile(pixels, [1, 99])
    scaled = np.clip((pixels - low) / (high - low), 0.0, 1.0)
    if source.PhotometricInterpretation == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.round(scaled * 255).astype(np.uint8)


def lung_mask(shape: tuple[int, int]) -> np.ndarray:
    """Return two elliptical lungs."""
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, bool)
    for r, c, a, b in LUNGS:
        mask |= ((rows - r) / a) ** 2 + ((cols - c) / b) ** 2 <= 1.0
    return mask


def heatmap(lungs: np.ndarray) -> np.ndarray:
    """Return a Gaussian Grad-CAM blob in [0, 1], zero outside the lungs."""
    r, c, sigma = HOT_SPOT
    rows, cols = np.ogrid[: lungs.shape[0], : lungs.shape[1]]
    blob = np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * sigma**2)).astype(np.float32)
    return np.where(lungs, blob, 0.0).astype(np.float32)


def synthetic_result(source: pydicom.Dataset, flagged: bool = True) -> ImageResult:
    """Return a result with COVID-19 (0.93, flagged with a region when ``flagged``, else 0.21) and an
    experimental pneumothorax head (0.12)."""
    shape = (int(source.Rows), int(source.Columns))
    lungs = lung_mask(shape)
    heat = heatmap(lungs)
    covid = Finding(
        name="covid19", display_name="COVID-19", probability=0.93 if flagged else 0.21, threshold=0.5,
        flagged=flagged, experimental=False, heatmap=heat, region=(heat > 0.5) if flagged else None,
    )
    pneumothorax = Finding(
        name="pneumothorax", display_name="Pneumothorax", probability=0.12, threshold=0.5,
        flagged=False, experimental=True, heatmap=heat[::-1].copy() * lungs,
    )
    return ImageResult(sop_instance_uid=source.SOPInstanceUID, masks={"lungs": lungs}, findings=[covid, pneumothorax])


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """Return (errors, warnings): the lines dciodvfy prints for ``path`` that begin with Error / Warning.

    Skips the test when dciodvfy is not installed, as the DCMTK tests do.
    """
    program = shutil.which("dciodvfy")
    if program is None:
        pytest.skip("dciodvfy is not installed (dicom3tools)")
    run = subprocess.run([program, str(path)], capture_output=True, text=True, timeout=120, check=False)
    lines = (run.stdout + run.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


#: SOP classes of the three results of an analysed image.
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
#: dciodvfy's warning about codes of the node's private scheme.
LOCAL_SCHEME_WARNING = "Unrecognized defined term <99DCMNODE>"


def received_results(folder: Path, stored: dict[str, str]) -> dict[str, pydicom.Dataset]:
    """Return the SC, SEG and SR a test destination stored under ``folder`` (``stored``: SOP Instance UID
    to SOP Class UID), by SOP class, asserting there are exactly those three and that dciodvfy finds no
    error and no warning but :data:`LOCAL_SCHEME_WARNING` in any."""
    assert sorted(stored.values()) == sorted([SECONDARY_CAPTURE, SEGMENTATION, COMPREHENSIVE_3D_SR])
    for uid in stored:
        errors, warnings = dciodvfy(folder / f"{uid}.dcm")
        assert errors == [], uid
        assert [line for line in warnings if LOCAL_SCHEME_WARNING not in line] == [], uid
    return {sop_class: pydicom.dcmread(folder / f"{uid}.dcm") for uid, sop_class in stored.items()}
