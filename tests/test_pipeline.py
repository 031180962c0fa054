"""The chest X-ray pipeline end to end on real CR images from pydicom-data (no ../shared needed)."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file
from skimage.measure import label

from pipelines.base import ImageInput, ImageResult, Pipeline
from pipelines.chest_xray.gradcam import peak
from pipelines.chest_xray.pipeline import ChestXrayPipeline
from pipelines.errors import WeightsError
from training.chest_xray.metrics import dice

MANIFEST = Path(os.environ.get("TEST_WEIGHTS_MANIFEST", Path(__file__).resolve().parents[1] / "weights" / "manifest.yaml"))


def _read(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file(name))


def monochrome2_copy(dataset: pydicom.Dataset) -> pydicom.Dataset:
    """Return a MONOCHROME2 copy of a MONOCHROME1 data set: stored values and window mirrored."""
    mirrored = copy.deepcopy(dataset)
    top = 2**dataset.BitsStored - 1
    mirrored.PixelData = (top - dataset.pixel_array).astype(dataset.pixel_array.dtype).tobytes()
    mirrored.PhotometricInterpretation = "MONOCHROME2"
    # The DICOM linear window maps x to ((x - (c - 0.5)) / (w - 1) + 0.5); its mirror under x -> top - x
    # has centre top - c + 1.
    mirrored.WindowCenter = top - float(dataset.WindowCenter) + 1
    return mirrored


@pytest.fixture(scope="module")
def pipeline() -> ChestXrayPipeline:
    return ChestXrayPipeline.from_manifest(MANIFEST, device="cpu")


@pytest.fixture(scope="module")
def results(pipeline: ChestXrayPipeline) -> dict[str, ImageResult]:
    datasets = {name: _read(f"RG1_{name}.dcm") for name in ("UNCI", "UNCR", "J2KR")}
    datasets["MONO2"] = monochrome2_copy(datasets["UNCR"])
    inputs = [pipeline.load(ds) for ds in datasets.values()]
    return dict(zip(datasets, pipeline.run(inputs), strict=True))


def _probabilities(result: ImageResult) -> dict[str, float]:
    return {f.name: f.probability for f in result.findings}


def test_is_a_pipeline(pipeline: ChestXrayPipeline) -> None:
    assert isinstance(pipeline, Pipeline)
    assert pipeline.name == "chest_xray" and pipeline.version
    assert {c.name for c in pipeline.classifiers} >= {"covid19", "pneumothorax"}


def test_gate_uses_min_age(pipeline: ChestXrayPipeline) -> None:
    dataset = _read("RG1_UNCI.dcm")
    assert pipeline.accepts(dataset).accepted
    dataset.PatientAge = "012Y"
    assert not pipeline.accepts(dataset).accepted
    younger = ChestXrayPipeline(pipeline.segmenter, pipeline.content_check, pipeline.classifiers,
                                version=pipeline.version, min_age_years=10)
    assert younger.accepts(dataset).accepted


def test_rg1_passes_the_content_check_in_every_encoding(results: dict[str, ImageResult]) -> None:
    for name, result in results.items():
        assert result.verdict.accepted, (name, result.verdict.reason)


def _content_reason(pipeline: ChestXrayPipeline, display: np.ndarray) -> str:
    image = ImageInput("1.2.3", display.astype(np.float32), np.ascontiguousarray(display))
    [result] = pipeline.run([image])
    assert result.findings == [] and not result.verdict.accepted
    return result.verdict.reason


def test_what_is_not_a_frontal_chest_radiograph_is_skipped_before_scoring(pipeline: ChestXrayPipeline) -> None:
    rg1 = pipeline.load(_read("RG1_UNCR.dcm")).display
    hand = pipeline.load(_read("RG3_UNCR.dcm")).display
    for name, display in {"hand": hand, "RG1 rotated 90": np.rot90(rg1), "RG1 inverted": 255 - rg1,
                          "RG1 upside down": rg1[::-1], "RG1 left half": rg1[:, :900],
                          "noise": np.random.default_rng(0).integers(0, 256, (512, 512))}.items():
        assert "does not look like a frontal chest radiograph" in _content_reason(pipeline, display), name
    assert "blank or near-constant" in _content_reason(pipeline, np.zeros((512, 512), np.uint8))
    assert "blank or near-constant" in _content_reason(pipeline, np.full((512, 512), 77, np.uint8))


def test_a_manifest_without_content_check_stops_the_start(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    shutil.copytree(MANIFEST.parent, weights)
    manifest = yaml.safe_load((weights / "manifest.yaml").read_text())
    del manifest["content_check"]
    (weights / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(WeightsError, match="no content_check entry"):
        ChestXrayPipeline.from_manifest(weights / "manifest.yaml", device="cpu")


def test_two_lungs_of_plausible_size(results: dict[str, ImageResult]) -> None:
    for name, result in results.items():
        mask = result.masks["lungs"]
        assert mask.shape == (1955, 1841), name
        components = label(mask)
        sizes = np.bincount(components.ravel())[1:] / mask.size
        assert len(sizes) == 2, name
        assert sizes.min() > 0.05, name
        assert 0.15 < mask.mean() < 0.6, name


def test_lossless_jpeg2000_equals_uncompressed(results: dict[str, ImageResult]) -> None:
    assert np.array_equal(results["J2KR"].masks["lungs"], results["UNCR"].masks["lungs"])
    for name, probability in _probabilities(results["UNCR"]).items():
        assert _probabilities(results["J2KR"])[name] == pytest.approx(probability, abs=1e-5)


def test_lossy_round_trip_close_to_lossless(results: dict[str, ImageResult]) -> None:
    # RG1_UNCI holds pixels that went through lossy compression: close, not identical. Measured with
    # the committed weights: lung Dice > 0.99, probabilities within 0.055 (the 128-192 px classifiers
    # are that sensitive to lossy artefacts); the tolerance leaves room for other CPUs' arithmetic.
    assert dice(results["UNCI"].masks["lungs"], results["UNCR"].masks["lungs"]) > 0.98
    for name, probability in _probabilities(results["UNCR"]).items():
        assert _probabilities(results["UNCI"])[name] == pytest.approx(probability, abs=0.1)


def test_monochrome2_copy_gives_same_result(results: dict[str, ImageResult]) -> None:
    assert dice(results["MONO2"].masks["lungs"], results["UNCR"].masks["lungs"]) > 0.999
    for name, probability in _probabilities(results["UNCR"]).items():
        assert _probabilities(results["MONO2"])[name] == pytest.approx(probability, abs=1e-3)


def test_probabilities_and_heatmaps(results: dict[str, ImageResult]) -> None:
    for result in results.values():
        for finding in result.findings:
            assert 0.0 <= finding.probability <= 1.0
            assert 0.0 < finding.threshold < 1.0
            heat = finding.heatmap
            assert heat.shape == result.masks["lungs"].shape and heat.dtype == np.float32
            assert heat.min() >= 0.0 and heat.max() <= 1.0
            assert not heat[~result.masks["lungs"]].any()
            assert heat.max() in (0.0, 1.0)  # scaled to a peak of 1 inside the lungs, or no activation at all
            if finding.flagged:
                assert finding.region is not None and finding.region.any()
                assert not finding.region[~result.masks["lungs"]].any()
            else:
                assert finding.region is None


def test_peak_of_a_border_plateau_lies_inside_it() -> None:
    """A constant band along the left lung border (as upsampling makes it) points at its middle, not its first pixel."""
    heat = np.zeros((60, 80), dtype=np.float32)
    heat[10:50, 5:15] = 1.0  # the plateau
    heat[30:34, 40:44] = 0.9  # a weaker spot elsewhere
    assert peak(heat) == (30, 10)


def test_peak_follows_the_strongest_region_and_stays_on_it() -> None:
    heat = np.zeros((60, 80), dtype=np.float32)
    heat[5:15, 5:75] = 0.7  # large but below the peak level used here
    heat[40:45, 10:12] = 1.0
    ring = np.zeros((60, 80), dtype=bool)
    ring[20:40, 50:70] = True
    ring[24:36, 54:66] = False
    heat[ring] = 0.95  # strongest by summed heat; its centroid is off the ring
    row, column = peak(heat, level=0.8)
    assert ring[row, column]


def test_pneumothorax_is_experimental(results: dict[str, ImageResult]) -> None:
    pneumothorax = next(f for f in results["UNCR"].findings if f.name == "pneumothorax")
    assert pneumothorax.experimental and not pneumothorax.flagged


def _copy_weights(tmp_path: Path) -> Path:
    target = tmp_path / "weights"
    shutil.copytree(MANIFEST.parent, target, ignore=shutil.ignore_patterns("*.md"))
    return target / "manifest.yaml"


def test_altered_weights_file_stops_start_up(tmp_path: Path) -> None:
    manifest = _copy_weights(tmp_path)
    weights = manifest.parent / "covid19_densenet.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"weights file altered: .*covid19_densenet\.pt"):
        ChestXrayPipeline.from_manifest(manifest, device="cpu")


def test_missing_weights_file_stops_start_up(tmp_path: Path) -> None:
    manifest = _copy_weights(tmp_path)
    (manifest.parent / "lung_unet.pt").unlink()
    with pytest.raises(WeightsError, match=r"weights file missing: .*lung_unet\.pt"):
        ChestXrayPipeline.from_manifest(manifest, device="cpu")


def test_missing_manifest_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="manifest not found"):
        ChestXrayPipeline.from_manifest(tmp_path / "manifest.yaml", device="cpu")
