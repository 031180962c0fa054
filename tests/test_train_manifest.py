"""Training records its models in the weights manifest without reordering what is there."""

from __future__ import annotations

from pathlib import Path

from pipelines.chest_xray.models import read_manifest, write_manifest
from pipelines.chest_xray.train import update_manifest


def test_a_retrained_finding_keeps_its_place(tmp_path: Path) -> None:
    write_manifest(tmp_path / "manifest.yaml", {
        "pipeline": "chest_xray", "version": "0.1.0", "lung": {},
        "findings": [{"name": "covid19", "threshold": 0.6}, {"name": "pneumothorax", "threshold": 0.5}],
    })
    update_manifest(tmp_path, "findings", {"name": "covid19", "threshold": 0.7})
    update_manifest(tmp_path, "findings", {"name": "effusion", "threshold": 0.4})
    findings = read_manifest(tmp_path / "manifest.yaml")["findings"]
    assert [(f["name"], f["threshold"]) for f in findings] == [
        ("covid19", 0.7), ("pneumothorax", 0.5), ("effusion", 0.4)]
