"""The evaluate command's localization report, on a folder it builds from pydicom-data's chest CR."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from pipelines.chest_xray.pipeline import ChestXrayPipeline
from training.chest_xray.datasets import HELD_OUT, SPLITS, hash_split, masked_samples
from training.chest_xray.evaluate import main

from tests.conftest import stems_in_split
from tests.test_pipeline import MANIFEST


@pytest.fixture(scope="module")
def opacity_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``images/`` + ``masks-opacity/`` with one chest image whose 'opacity' is the image-left half."""
    root = tmp_path_factory.mktemp("covid-seg")
    pipeline = ChestXrayPipeline.from_manifest(MANIFEST, device="cpu")
    display = pipeline.load(pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))).display
    small = Image.fromarray(display).resize((display.shape[1] // 4, display.shape[0] // 4), Image.BOX)
    (root / "images").mkdir()
    (root / "masks-opacity").mkdir()
    small.save(root / "images" / "chest.png")
    opacity = np.zeros((small.height, small.width), dtype=np.uint8)
    opacity[:, : small.width // 2] = 255
    Image.fromarray(opacity).save(root / "masks-opacity" / "chest.png")
    return root


def test_localization_report(opacity_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["localization", "--data-dir", str(opacity_set), "--weights", str(MANIFEST), "--out", str(tmp_path),
          "--device", "cpu", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 1 and report["split"] == "all"
    assert report["pointing_game"]["value"] in (0.0, 1.0)
    assert report["anatomical_prior_pointing_game"]["value"] == 1.0  # the lower image-left lung lies in the mask
    assert 0.3 < report["chance_pointing_game"] < 0.7  # about half of the lung area is image-left
    assert (tmp_path / "localization-1.png").is_file()


def test_a_split_without_images_is_a_clear_error(opacity_set: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    other = next(split for split in SPLITS if split != hash_split("chest"))
    with pytest.raises(SystemExit) as exit_:
        main(["localization", "--data-dir", str(opacity_set), "--weights", str(MANIFEST), "--out", str(tmp_path),
              "--device", "cpu", "--split", other])
    assert exit_.value.code == 2
    assert f"no images with masks in {opacity_set / 'masks-opacity'} (split {other})" in capsys.readouterr().err


def test_held_out_is_validation_and_test_together(tmp_path: Path) -> None:
    for folder in ("images", "masks-opacity"):
        (tmp_path / folder).mkdir()
        for number in range(20):
            Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / folder / f"image-{number}.png")
    held_out = {sample.image.stem for sample in masked_samples(tmp_path, "masks-opacity", HELD_OUT)}
    expected = {f"image-{n}" for n in range(20) if hash_split(f"image-{n}") != "train"}
    assert held_out == expected and 0 < len(expected) < 20


def test_lung_scores_dicom_images_through_the_nodes_own_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``images/*.dcm`` + ``masks-lung/*.png``: read as the node reads what it receives (RG1 is
    MONOCHROME1 with a full-range window), so the node's own mask of it scores a Dice of 1."""
    root = tmp_path / "site"
    (root / "images").mkdir(parents=True)
    (root / "masks-lung").mkdir()
    dataset = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    dataset.save_as(root / "images" / "rg1.dcm")
    pipeline = ChestXrayPipeline.from_manifest(MANIFEST, device="cpu")
    [mask] = pipeline.segmenter.masks([pipeline.load(dataset).display])
    Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks-lung" / "rg1.png")
    main(["lung", "--data-dir", str(root), "--weights", str(MANIFEST), "--out", str(tmp_path / "out"),
          "--device", "cpu", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["pooled"]["images"] == 1
    assert report["sets"]["site"]["min"] == pytest.approx(1.0)


def test_sources_puts_each_heads_outside_source_figures_beside_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``evaluate sources`` on a data folder laid out like ``../shared/data`` (RG1 copies): every head
    reports in-source and outside-source figures with CIs, from the sets each never trained on."""
    pipeline = ChestXrayPipeline.from_manifest(MANIFEST, device="cpu")
    display = pipeline.load(pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))).display
    small = Image.fromarray(display).resize((display.shape[1] // 4, display.shape[0] // 4), Image.BOX)
    [lung] = pipeline.segmenter.masks([np.asarray(small)])
    lung_png = Image.fromarray(lung.astype(np.uint8) * 255)
    opacity = np.zeros_like(lung)
    opacity[lung.shape[0] // 2 :, : lung.shape[1] // 2] = True
    data = tmp_path / "data"

    def image(folder: Path, stem: str, **masks: Image.Image) -> None:
        for name, picture in {"images": small, **masks}.items():
            (folder / name).mkdir(parents=True, exist_ok=True)
            picture.save(folder / name / f"{stem}.png")

    for split in ("test", "val"):  # the val image chooses covid19's threshold: it is no outside-source figure
        image(data / "lung-seg" / "openist", stems_in_split("openist-", split)[0], **{"masks-lung": lung_png})
    for split in ("val", "train"):  # the train image trains the shipped UNet: no outside-source figure counts it
        image(data / "lung-seg" / "covid-seg", stems_in_split("seg-", split)[0],
              **{"masks-lung": lung_png, "masks-opacity": Image.fromarray(opacity.astype(np.uint8) * 255)})
    for folder in ("COVID", "Normal"):
        (data / "covid-radiography" / folder).mkdir(parents=True)
        small.save(data / "covid-radiography" / folder / f"{stems_in_split(folder + '-', 'test')[0]}.png")
    nih = data / "nih-cxr14"
    image(nih, "nih-0")
    image(nih, "nih-1")
    (nih / "labels.csv").write_text("image,official_split,Pneumothorax\nnih-0.png,test,0\nnih-1.png,test,1\n")
    main(["sources", "--data-dir", str(data), "--weights", str(MANIFEST), "--out", str(tmp_path / "out"),
          "--device", "cpu", "--json"])
    report = json.loads(capsys.readouterr().out)
    inside, outside = report["lung"]["in_source"]["pooled"], report["lung"]["outside_source"]["pooled"]
    assert inside["images"] == 1 and inside["dice"]["value"] == pytest.approx(1.0)  # the node's own mask
    assert inside["spill"]["value"] == pytest.approx(0.0) and inside["coverage"]["value"] == pytest.approx(1.0)
    assert outside["images"] == 1 and set(outside["dice"]) == {"value", "ci_low", "ci_high"}
    covid = report["covid19"]
    assert covid["in_source"]["images"] == 2 and covid["in_source"]["models"]["covid19"]["negatives"]["images"] == 2
    assert covid["outside_source"]["images"] == 2 and covid["outside_source"]["positives"] == 1  # covid-seg + openist
    assert report["pneumothorax"]["in_source"]["models"]["pneumothorax"]["negatives"]["images"] == 2  # all OpenIST
    assert report["localization"]["in_source"]["images"] == 1
    assert "never trained on" in report["outside_sources"]["covid19"]
