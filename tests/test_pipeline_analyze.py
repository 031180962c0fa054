"""``dicom-node analyze`` on a DICOM file and a PNG, offline, through click's CliRunner."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
from click.testing import CliRunner
from PIL import Image
from pydicom.data import get_testdata_file

from dicom_node.cli.analyze import analyze

MANIFEST = Path(os.environ.get("TEST_WEIGHTS_MANIFEST", Path(__file__).resolve().parents[1] / "weights" / "manifest.yaml"))


def test_analyze_dicom_png_and_skipped(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(get_testdata_file("RG1_UNCR.dcm"), inputs / "cr.dcm")
    lateral = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    lateral.ViewPosition = "LL"
    lateral.save_as(inputs / "lateral.dcm")
    display = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm")).pixel_array
    Image.fromarray((255 - display[::4, ::4] // 128).astype(np.uint8)).save(inputs / "cr.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(analyze, [str(inputs), "--out", str(out), "--format", "json", "--weights", str(MANIFEST)])
    assert result.exit_code == 0, result.output
    records = {Path(r["file"]).name: r for r in json.loads(result.output)}
    assert "not frontal" in records["lateral.dcm"]["skipped"]
    for name in ("cr.dcm", "cr.png"):
        record = records[name]
        assert {f["name"] for f in record["findings"]} >= {"covid19", "pneumothorax"}
        assert 0.15 < record["mask_fractions"]["lungs"] < 0.6
        stem = record["output"]
        assert json.loads((out / f"{stem}.json").read_text()) == record
        overlay = np.asarray(Image.open(out / f"{stem}.overlay.png"))
        mask = np.asarray(Image.open(out / f"{stem}.mask-lungs.png"))
        # the SC's framing: every image column, text bands above and below the image's rows
        assert overlay.ndim == 3 and overlay.shape[1] == mask.shape[1] and overlay.shape[0] > mask.shape[0]
        assert (out / f"{stem}.heatmap-covid19.png").is_file()


def test_analyze_refuses_altered_weights(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    shutil.copytree(MANIFEST.parent, weights)
    (weights / "lung_unet.pt").write_bytes(b"altered")
    result = CliRunner().invoke(analyze, [get_testdata_file("RG1_UNCR.dcm"), "--out", str(tmp_path / "out"),
                                          "--weights", str(weights / "manifest.yaml")])
    assert result.exit_code != 0 and "weights file altered" in result.output
