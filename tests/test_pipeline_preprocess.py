"""Preprocessing, splits and metrics of the chest X-ray pipeline (no weights, no ../shared)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipelines.chest_xray.preprocess import (
    InputSpec,
    classifier_input,
    load_dataset,
    load_image_file,
    load_path,
    lung_box,
    network_image,
    smoothed,
)
from pipelines.errors import InputError, WeightsError
from training.chest_xray.datasets import hash_split
from training.chest_xray.metrics import binary_metrics, dice, with_ci

RAMP = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (64, 1))  # 64 × 64, 0..4032


def synthetic(stored: np.ndarray, photometric: str = "MONOCHROME2", **attributes: object) -> Dataset:
    """Return a minimal single-frame grayscale DICOM data set holding ``stored``."""
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPInstanceUID = generate_uid()
    dataset.Rows, dataset.Columns = stored.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated = stored.dtype.itemsize * 8
    dataset.BitsStored = 12 if stored.dtype == np.uint16 else 8
    dataset.HighBit = dataset.BitsStored - 1
    dataset.PixelRepresentation = 0
    dataset.PixelData = stored.tobytes()
    for key, value in attributes.items():
        setattr(dataset, key, value)
    return dataset


def test_modality_lut_and_linear_window() -> None:
    image = load_dataset(synthetic(RAMP, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=2000, WindowWidth=2000))
    assert image.pixels.dtype == np.float32
    assert image.pixels[0, 0] == -100 and image.pixels[0, -1] == 2 * 4032 - 100
    row = image.display[0].astype(int)
    values = image.pixels[0]
    assert (row[values <= 1000] == 0).all() and (row[values >= 3000] == 255).all()
    assert np.all(np.diff(row) >= 0) and 0 < row[values == 1948][0] < 255


def test_voi_lut_sequence_is_applied() -> None:
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    item.LUTData = (255 - np.arange(4096) // 16).astype(np.uint16).tolist()  # a decreasing 8-bit LUT
    image = load_dataset(synthetic(RAMP, VOILUTSequence=pydicom.Sequence([item])))
    assert image.display[0, 0] == 255 and image.display[0, -1] == 255 - 4032 // 16


def test_percentile_window_when_no_voi() -> None:
    image = load_dataset(synthetic(RAMP))
    assert image.display.min() == 0 and image.display.max() == 255


@pytest.mark.parametrize("center, width", [("abc", "400"), ("2000", "x1"), ("nan", "400"), ("2000", "inf")])
def test_an_unusable_window_falls_back_to_percentiles(center: str, width: str) -> None:
    dataset = synthetic(RAMP)
    dataset.add_new(0x00281050, "DS", None)
    dataset.add_new(0x00281051, "DS", None)
    dataset[0x00281050]._value, dataset[0x00281051]._value = center, width  # as a feed writes them, unchecked
    image = load_dataset(dataset)
    assert image.display.min() == 0 and image.display.max() == 255


def test_monochrome1_is_inverted() -> None:
    plain = load_dataset(synthetic(RAMP, WindowCenter=2048, WindowWidth=4096))
    inverted = load_dataset(synthetic(RAMP, "MONOCHROME1", WindowCenter=2048, WindowWidth=4096))
    assert np.array_equal(inverted.display, 255 - plain.display)
    assert inverted.pixels[0, 0] > inverted.pixels[0, -1]


def test_eight_bit_and_real_cr() -> None:
    image = load_dataset(synthetic((RAMP // 16).astype(np.uint8)))
    assert image.display.shape == (64, 64)
    cr = load_dataset(pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm")))
    assert cr.display.shape == (1955, 1841) and cr.display.dtype == np.uint8
    assert cr.pixel_spacing_mm is None  # its PixelSpacing is 0\0: unknown, not zero


def test_colour_and_undecodable_are_rejected() -> None:
    with pytest.raises(InputError, match="not grayscale"):
        load_dataset(synthetic(RAMP, "RGB"))
    broken = synthetic(RAMP)
    broken.PixelData = b"\0" * 10
    with pytest.raises(InputError, match="cannot decode"):
        load_dataset(broken)


def test_png_and_jpeg_files(tmp_path: Path) -> None:
    Image.fromarray((RAMP * 16).astype(np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(np.stack([(RAMP // 16).astype(np.uint8)] * 3, axis=-1)).save(tmp_path / "colour.jpg")
    deep = load_image_file(tmp_path / "deep.png")
    assert deep.display.dtype == np.uint8 and deep.display.max() == 255 and deep.sop_instance_uid == "deep"
    colour, verdict = load_path(tmp_path / "colour.jpg")
    assert verdict.accepted
    assert colour.display.shape == (64, 64)
    (tmp_path / "note.txt").write_text("not an image")
    with pytest.raises(InputError, match="neither"):
        load_path(tmp_path / "note.txt")


def test_network_and_classifier_inputs() -> None:
    display = (RAMP // 16).astype(np.uint8)
    whole = network_image(display, 32)
    assert whole.shape == (32, 32) and whole.min() == 0.0 and whole.max() == 1.0
    mask = np.zeros(display.shape, dtype=bool)
    mask[10:30, 5:25] = mask[10:30, 40:60] = True
    lung, box = classifier_input(display, mask, InputSpec(64, "lung"))
    assert lung.shape == (1, 64, 64) and box == (slice(9, 31), slice(2, 63))
    assert lung[0, :, 30:34].max() == 0.0  # the gap between the lungs is masked out
    rgb, whole_box = classifier_input(display, mask, InputSpec(64, "whole", 3, "imagenet"))
    assert rgb.shape == (3, 64, 64) and whole_box == (slice(0, 64), slice(0, 64))
    assert rgb[0].min() == pytest.approx(-0.485 / 0.229, abs=1e-3)
    with pytest.raises(InputError, match="no lungs"):
        lung_box(np.zeros((8, 8), dtype=bool))


def test_input_spec_is_validated() -> None:
    assert InputSpec.from_manifest({"size": [128, 128], "region": "lung"}) == InputSpec(128, "lung")
    assert "smooth" not in InputSpec(128).as_manifest()  # manifests without smoothing stay as they were
    assert InputSpec.from_manifest(InputSpec(128, smooth=1.0).as_manifest()) == InputSpec(128, smooth=1.0)
    for invalid in ({"size": 128, "region": "abdomen"}, {"size": 128, "smooth": -1}, {"size": 128, "smooth": "soft"}, {"size": 128, "smooth": True},
                    {"size": 64, "smooth": 9}):
        with pytest.raises(WeightsError, match="invalid input spec"):
            InputSpec.from_manifest(invalid)


def test_a_smoothed_lung_input_is_the_lung_input_blurred_within_its_mask() -> None:
    display = np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8)
    mask = np.zeros(display.shape, dtype=bool)
    mask[10:30, 5:25] = mask[10:30, 40:60] = True
    sharp, box = classifier_input(display, mask, InputSpec(64, "lung"))
    soft, soft_box = classifier_input(display, mask, InputSpec(64, "lung", smooth=1.0))
    assert soft_box == box and np.array_equal(soft == 0, sharp == 0)  # outside the lungs stays 0
    inside = sharp > 0
    assert soft[inside].std() < 0.7 * sharp[inside].std()  # the noise is blurred
    assert np.allclose(soft, smoothed(sharp, 1.0, masked=True))
    assert smoothed(sharp[None], 1.0, masked=True).shape == (1, 1, 64, 64)
    whole, _ = classifier_input(display, mask, InputSpec(64, "whole"))
    soft_whole, _ = classifier_input(display, mask, InputSpec(64, "whole", smooth=1.0))
    assert (soft_whole[whole == 0] > 0).any()  # without a mask, a pixel clipped to 0 is blurred like any other


def test_hash_split_is_stable_and_proportioned() -> None:
    splits = [hash_split(f"image-{i}") for i in range(3000)]
    assert hash_split("image-7") == splits[7]
    shares = {name: splits.count(name) / len(splits) for name in ("train", "val", "test")}
    assert shares["train"] == pytest.approx(0.70, abs=0.03) and shares["test"] == pytest.approx(0.15, abs=0.03)


def test_metrics() -> None:
    a = np.zeros((4, 4), dtype=bool)
    b = a.copy()
    a[:2] = True
    b[1:3] = True
    assert dice(a, b) == 0.5 and dice(a & False, b & False) == 1.0
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.6, 0.4, 0.9])
    assert binary_metrics(labels, scores, 0.5) == {"auroc": 0.75, "accuracy": 0.5, "sensitivity": 0.5, "specificity": 0.5}
    report = with_ci(np.repeat(labels, 25), np.repeat(scores, 25), 0.5, rounds=200)
    assert report["auroc"]["ci_low"] <= 0.75 <= report["auroc"]["ci_high"]
