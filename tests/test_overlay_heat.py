"""Heat that means something: the overlay (the SC and ``dicom-node analyze``'s PNG) colours the
heat-maps of flagged findings only and says so in its legend; its banner lists experimental heads'
scores only where a site turns them on (``pipelines.chest_xray.show_experimental``)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image
from pydicom.data import get_testdata_file

from dicom_node.cli import main
from dicom_node.writers import AlgorithmIdentity, OutputKind, write_results
from dicom_node.writers.sc import banner_text
from pipelines.base import Finding, ImageResult
from pipelines.chest_xray.legend import LUNG_COLOUR, REGION_COLOUR
from pipelines.chest_xray.plugin import ChestXrayOptions, ChestXrayPlugin
from tests.test_pipeline import MANIFEST
from tests.writers_fixtures import ALGORITHM, HOT_SPOT, display_of, read_source, synthetic_result

pytestmark = pytest.mark.filterwarnings("ignore:The string \"ward\":UserWarning")
SHOWN = replace(ALGORITHM, output=replace(ALGORITHM.output, show_experimental=True))


def image_part(rgb: np.ndarray, lungs: np.ndarray) -> np.ndarray:
    """Return the rows of ``rgb`` (an overlay between text bands) that hold the image, found by the
    lung contour: the only pure green, drawn along the lungs' top row."""
    contour_rows = np.nonzero((rgb == LUNG_COLOUR).all(axis=-1).any(axis=1))[0]
    top = int(contour_rows[0]) - int(np.nonzero(lungs.any(axis=1))[0][0])
    return rgb[top:top + lungs.shape[0]]


def heat_pixels(image: np.ndarray, lungs: np.ndarray) -> np.ndarray:
    """Return where the lungs of ``image`` are coloured by something other than a contour: heat."""
    grey = (image == image[..., :1]).all(axis=-1)
    contour = (image == LUNG_COLOUR).all(axis=-1) | (image == REGION_COLOUR).all(axis=-1)
    return lungs & ~grey & ~contour


def sc_of(source: pydicom.Dataset, result: ImageResult, algorithm: AlgorithmIdentity = ALGORITHM) -> pydicom.Dataset:
    """Return the SC the writers make of ``result``."""
    return write_results(source, result, display_of(source), algorithm)[OutputKind.SC]


@pytest.fixture(scope="module")
def rg1() -> pydicom.Dataset:
    return read_source("RG1_UNCI.dcm")


def test_an_unflagged_finding_leaves_no_heat_colour_in_the_sc(rg1: pydicom.Dataset) -> None:
    result = synthetic_result(rg1, flagged=False)  # COVID-19 0.21 with a full-scale heat-map, not flagged
    lungs = result.masks["lungs"]
    assert not heat_pixels(image_part(sc_of(rg1, result).pixel_array, lungs), lungs).any()
    assert "No colour: Grad-CAM is shown for flagged findings only" in banner_text(result, ALGORITHM).footer


def test_only_the_flagged_findings_heat_is_coloured(rg1: pydicom.Dataset) -> None:
    result = synthetic_result(rg1, flagged=True)  # COVID-19's heat in the left of the image
    covid = result.findings[0]
    # an unflagged pneumonia, its heat-map as hot as COVID-19's but mirrored into the right of the image
    result.findings.append(Finding("pneumonia", "Pneumonia", 0.30, 0.5, False, False,
                                   heatmap=covid.heatmap[:, ::-1].copy()))
    lungs = result.masks["lungs"]
    image = image_part(sc_of(rg1, result).pixel_array, lungs)
    heat = heat_pixels(image, lungs)
    r, c, _ = HOT_SPOT
    assert heat[r, c] and not heat[:, lungs.shape[1] // 2:].any()
    red, green, blue = (int(v) for v in image[r, c])
    assert red > green + 60 and red > blue + 60
    assert "Colour: Grad-CAM of flagged findings only" in banner_text(result, ALGORITHM).footer


def test_experimental_scores_leave_the_banner_unless_a_site_shows_them(rg1: pydicom.Dataset) -> None:
    result = synthetic_result(rg1)  # with an experimental pneumothorax head at 0.12
    hidden, shown = banner_text(result, ALGORITHM), banner_text(result, SHOWN)
    assert not any("Pneumothorax" in item for item in hidden.items)
    assert "Pneumothorax 0.12: experimental, never flagged" in shown.items
    assert hidden.items == [item for item in shown.items if "Pneumothorax" not in item]
    # the burned-in banner differs, and so do the SC's UIDs (content-true); the SR keeps the score
    off, on = sc_of(rg1, result), sc_of(rg1, result, SHOWN)
    assert off.pixel_array.shape != on.pixel_array.shape or not np.array_equal(off.pixel_array, on.pixel_array)
    assert off.SOPInstanceUID != on.SOPInstanceUID and off.SeriesInstanceUID != on.SeriesInstanceUID
    sr = write_results(rg1, result, display_of(rg1), ALGORITHM)[OutputKind.SR]
    assert "Pneumothorax" in str(sr.ContentSequence)


def test_the_chest_option_reaches_the_output_description() -> None:
    plugin = ChestXrayPlugin()
    assert plugin.options({}).show_experimental is False
    plugin.configure(plugin.options({"pipelines": {"chest_xray": {"show_experimental": True}}}))
    assert plugin.output.show_experimental and not ChestXrayPlugin.output.show_experimental
    plugin.configure(ChestXrayOptions())
    assert not plugin.output.show_experimental


def _analyze(tmp_path: Path, name: str, covid_threshold: float, show_experimental: bool,
             image: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """Run ``dicom-node analyze`` on ``image`` with the bundled weights, COVID-19's threshold set to
    ``covid_threshold``; return the image's record, overlay PNG and lung mask."""
    weights = tmp_path / f"weights-{name}"
    shutil.copytree(MANIFEST.parent, weights)
    manifest = yaml.safe_load((weights / "manifest.yaml").read_text())
    next(f for f in manifest["findings"] if f["name"] == "covid19")["threshold"] = covid_threshold
    (weights / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "pipelines": {"chest_xray": {
        "manifest": str(weights / "manifest.yaml"), "show_experimental": show_experimental}}}))
    out = tmp_path / name
    result = CliRunner().invoke(main, ["--config", str(config), "analyze", str(image), "--out", str(out),
                                       "--format", "json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)[0]
    stem = record["output"]
    lungs = np.asarray(Image.open(out / f"{stem}.mask-lungs.png")) > 0
    return record, np.asarray(Image.open(out / f"{stem}.overlay.png")), lungs


def test_analyze_pngs_show_heat_and_experimental_scores_as_the_sc(tmp_path: Path) -> None:
    image = tmp_path / "cr.png"  # a quarter-size RG1: quick on a CPU
    Image.fromarray(display_of(pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm")))[::4, ::4]).save(image)
    quiet, quiet_png, lungs = _analyze(tmp_path, "quiet", 0.9999, False, image)
    assert not any(f["flagged"] for f in quiet["findings"])
    assert not heat_pixels(image_part(quiet_png, lungs), lungs).any()

    flagged, flagged_png, _ = _analyze(tmp_path, "flagged", 0.0001, False, image)
    assert flagged["flagged"] == ["covid19"]
    assert heat_pixels(image_part(flagged_png, lungs), lungs).sum() > 0.01 * lungs.sum()

    shown, shown_png, _ = _analyze(tmp_path, "shown", 0.9999, True, image)
    assert [f["probability"] for f in shown["findings"]] == [f["probability"] for f in quiet["findings"]]
    assert any(f["experimental"] for f in quiet["findings"])  # always in the results
    # the same image, with the experimental score added to the banner
    assert np.array_equal(image_part(shown_png, lungs), image_part(quiet_png, lungs))
    assert shown_png.shape != quiet_png.shape or not np.array_equal(shown_png, quiet_png)
