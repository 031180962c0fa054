"""``evaluate gate`` and ``train_content`` on a small data folder made from pydicom-data's chest CR."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from PIL import Image
from pydicom.data import get_testdata_file

from pipelines.chest_xray.pipeline import ChestXrayPipeline
from pipelines.chest_xray.preprocess import load_dataset
from training.chest_xray import train_content
from training.chest_xray.datasets import hash_split
from training.chest_xray.evaluate import main as evaluate
from tests.conftest import stems_in_split
from tests.test_pipeline import MANIFEST


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder shaped like ``../shared/data``: each chest set holds RG1 at a few sizes and crops, in
    the train and val splits; covid-radiography's Normal/ also holds one blank image."""
    root = tmp_path_factory.mktemp("data")
    display = load_dataset(pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))).display
    variants = [Image.fromarray(display).resize((size, int(size * 1955 / 1841)), Image.BOX) for size in (224, 320, 512)]
    stems = stems_in_split("t", "train", 3) + stems_in_split("v", "val", 3)
    images = [variants[i % 3] for i in range(len(stems))]

    def save(folder: Path) -> None:
        folder.mkdir(parents=True)
        for stem, image in zip(stems, images, strict=True):
            image.save(folder / f"{stem}.png")

    for name in ("openist", "covid-seg"):
        save(root / "lung-seg" / name / "images")
        shutil.copytree(root / "lung-seg" / name / "images", root / "lung-seg" / name / "masks-lung")
    save(root / "covid-radiography" / "COVID")
    save(root / "covid-radiography" / "Normal")
    Image.fromarray(np.full((224, 224), 90, np.uint8)).save(root / "covid-radiography" / "Normal" / "blank.png")
    save(root / "nih-cxr14" / "images")
    with (root / "nih-cxr14" / "labels.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image", "official_split", "Pneumothorax"])
        writer.writerows([f"{stem}.png", hash_split(stem), 0] for stem in stems)
    return root


def test_evaluate_gate_reports_false_skips_and_the_corpus(data_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    evaluate(["gate", "--data-dir", str(data_dir), "--weights", str(MANIFEST), "--out", str(tmp_path),
              "--device", "cpu", "--json"])
    report = json.loads(capsys.readouterr().out)
    normal = report["chest"]["covid-radiography"]
    assert normal["images"] == 13 and normal["by_check"].get("blank") == 1
    assert normal["false_skips"] == 1 + normal["by_check"].get("view check", 0)
    pooled = report["chest_pooled"]
    assert pooled["images"] == 31 and pooled["false_skip_rate"]["ci_high"] > pooled["false_skip_rate"]["value"]
    corpus = report["corpus"]
    assert set(corpus) == {"anatomy", "synthetic", "chest-transformed"}
    assert corpus["anatomy"]["images"] == 65  # 13 pydicom-data images as they are, turned and inverted
    assert corpus["chest-transformed"]["images"] == 7 * (1 + 31)  # RG1 and every chest image here, 7 transforms
    assert report["corpus_pooled"]["skipped"] == sum(group["skipped"] for group in corpus.values())
    for group in corpus.values():
        assert group["skipped"] + len(group["passed"]) == group["images"]
    assert (tmp_path / "gate-false-skips" / "covid-radiography-blank.png").is_file()


def test_train_content_writes_an_entry_the_pipeline_loads(data_dir: Path, tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    shutil.copytree(MANIFEST.parent, weights)
    train_content.main(["--data-dir", str(data_dir), "--out", str(weights), "--cache-dir", str(tmp_path / "cache"),
                        "--epochs", "1"])
    entry = yaml.safe_load((weights / "manifest.yaml").read_text())["content_check"]
    assert entry["threshold_rule"] == train_content.THRESHOLD_RULE and entry["training"]["epochs"] == 1
    # three val images in each set; covid-radiography has six (COVID/ and Normal/), of which every 3rd is used
    assert entry["validation"]["chest_images"] == 3 * 3 + 2
    assert 0.0 <= entry["threshold"] <= 1.0
    pipeline = ChestXrayPipeline.from_manifest(weights / "manifest.yaml", device="cpu")
    assert pipeline.content_check.threshold == entry["threshold"]
    assert (weights / entry["file"]).is_file()


def test_train_content_refuses_a_missing_data_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        train_content.main(["--data-dir", str(tmp_path / "absent"), "--out", str(tmp_path / "w"),
                            "--cache-dir", str(tmp_path / "cache")])
    assert exit_.value.code == 2 and "folder not found" in capsys.readouterr().err
