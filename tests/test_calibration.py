"""Site calibration on a synthetic site whose scores come from two known distributions: the
threshold ``calibrate`` picks on 200 held-in cases meets the target sensitivity on 200 held-out
cases; too few positives are refused; the written override is what the pipeline then runs with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file

from dicom_node.audit import AuditEvent
from dicom_node.calibration import assess
from dicom_node.cli.common import os_user
from dicom_node.config import load_settings
from dicom_node.db import Feedback, FeedbackVerdict, Instance, InstanceVerdict, NodeDatabase
from dicom_node.plugins import build_pipeline
from dicom_node.results import result_dir, save_findings
from dicom_node.writers import AlgorithmIdentity, OutputKind, write_results
from pipelines.base import Finding, ImageResult, Pipeline, PipelinePlugin
from pipelines.errors import WeightsError
from pipelines.site_override import read_override
from tests.audit_fixtures import Node, make_node
from tests.dicom_factory import make_cr

FINDING = "covid19"
TARGET = 0.9
#: Scores of positive and negative cases: Beta(4, 1.5) and Beta(1.5, 4).
POSITIVE, NEGATIVE = (4.0, 1.5), (1.5, 4.0)


def draw_site(seed: int, cases: int, prevalence: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """Return (scores, labels) of ``cases`` cases drawn from the two known distributions."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(cases) < prevalence).astype(int)
    scores = np.where(labels == 1, rng.beta(*POSITIVE, cases), rng.beta(*NEGATIVE, cases))
    return scores, labels


@pytest.fixture(scope="module")
def chest(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelinePlugin, Pipeline]:
    """The bundled chest pipeline as a node without a site override builds it."""
    settings = make_node(tmp_path_factory.mktemp("plain")).settings
    return build_pipeline(settings, device="cpu")


def analysed_site(node: Node, scores: np.ndarray, labels: np.ndarray, label: str, key: str) -> Path:
    """Record one analysed CR per case (spooled header with its accession number, instance row,
    findings.json of ``label``'s model); return the labels CSV keyed by ``key``."""
    db = NodeDatabase(node.settings.node_database_url)
    node.settings.spool_dir.mkdir(parents=True)
    rows = [f"{key},label"]
    try:
        with db.session() as session:
            for number, (score, positive) in enumerate(zip(scores, labels, strict=True)):
                ds = make_cr(size=8)
                ds.AccessionNumber = f"ACC{number:05d}"
                spooled = node.settings.spool_dir / f"{number}.dcm"
                ds.save_as(spooled, enforce_file_format=True)
                session.add(Instance(
                    sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                    study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
                    transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, path=str(spooled),
                    size_bytes=1, calling_ae="PACS", verdict=InstanceVerdict.ANALYSED))
                finding = Finding(FINDING, "COVID-19", float(score), 0.9146, bool(score >= 0.9146), False)
                save_findings(result_dir(node.settings.results_dir, ds.StudyInstanceUID, ds.SOPInstanceUID, "chest_xray"),
                            ImageResult(ds.SOPInstanceUID, {}, [finding]), label)
                rows.append(f"{ds.AccessionNumber if key == 'accession_number' else ds.SOPInstanceUID},{positive}")
    finally:
        db.dispose()
    labels_file = node.config.parent / "labels.csv"
    labels_file.write_text("\n".join(rows) + "\n")
    return labels_file


@dataclass
class Calibrated:
    node: Node
    output: str
    override: Path


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory, chest: tuple[PipelinePlugin, Pipeline]) -> Calibrated:
    """A site of 200 held-in cases calibrated through the CLI, keyed by accession number, written."""
    node = make_node(tmp_path_factory.mktemp("site"))
    labels_file = analysed_site(node, *draw_site(1, 200), AlgorithmIdentity.of(chest[1], chest[0]).label,
                                "accession_number")
    result = node.cli("calibrate", "--finding", FINDING, "--labels", str(labels_file),
                      "--target-sensitivity", str(TARGET), "--write")
    assert result.exit_code == 0, result.output
    return Calibrated(node, result.output, node.settings.state_dir / "site" / "chest_xray" / "override-v1.yaml")


def test_the_picked_threshold_meets_the_target_on_held_out_cases(calibrated: Calibrated) -> None:
    override = yaml.safe_load(calibrated.override.read_text())
    threshold = override["thresholds"][FINDING]
    figures = override["calibrations"][FINDING]
    assert figures["positives"] + figures["negatives"] == 200 and figures["positives"] >= 20
    assert figures["proposed"]["sensitivity"]["low"] >= TARGET
    assert "ACC0" not in calibrated.output and f"proposed threshold {threshold:g}" in calibrated.output

    held_out = assess(zip(*draw_site(2, 200), strict=True), target_sensitivity=TARGET, current_threshold=threshold)
    achieved = held_out.current
    assert achieved is not None
    true_sensitivity = float((np.random.default_rng(3).beta(*POSITIVE, 1_000_000) >= threshold).mean())
    print(f"\ncalibration: target sensitivity {TARGET}; threshold {threshold:g} picked on 200 held-in cases "
          f"(sensitivity there {figures['proposed']['sensitivity']['value']:.3f}, lower bound "
          f"{figures['proposed']['sensitivity']['low']:.3f}); held-out 200 cases ({held_out.positives} positive): "
          f"sensitivity {achieved.sensitivity}, specificity {achieved.specificity}; "
          f"population sensitivity {true_sensitivity:.3f}")
    assert achieved.sensitivity.high >= TARGET and true_sensitivity >= TARGET


def test_the_override_is_audited_with_the_os_user(calibrated: Calibrated) -> None:
    rows = calibrated.node.cli_json("audit", "list", "--event", AuditEvent.CALIBRATION_WRITTEN.value)
    threshold = read_override(calibrated.override).thresholds[FINDING]
    detail = f"chest_xray {FINDING}: threshold 0.9146 -> {threshold:g} (override-v1.yaml)"
    assert [(row["actor"], row["detail"]) for row in rows] == [(os_user(), detail)]
    figures = yaml.safe_load(calibrated.override.read_text())["calibrations"][FINDING]
    assert figures["written_by"] == os_user() and len(figures["labels_sha256"]) == 64


def test_too_few_positives_are_refused(tmp_path: Path, chest: tuple[PipelinePlugin, Pipeline]) -> None:
    node = make_node(tmp_path)
    scores, labels = draw_site(4, 60, prevalence=0.1)
    labels_file = analysed_site(node, scores, labels, AlgorithmIdentity.of(chest[1], chest[0]).label,
                                "sop_instance_uid")
    result = node.cli("calibrate", "--finding", FINDING, "--labels", str(labels_file),
                      "--target-sensitivity", "0.9", "--write")
    assert result.exit_code == 1
    assert f"too few cases to say anything: {labels.sum()} positive and {60 - labels.sum()} negative" in result.output
    assert not (node.settings.state_dir / "site").exists()


def test_the_pipeline_runs_with_the_override_and_its_results_get_new_uids(
        calibrated: Calibrated, chest: tuple[PipelinePlugin, Pipeline]) -> None:
    threshold = read_override(calibrated.override).thresholds[FINDING]
    plugin, site_pipeline = build_pipeline(load_settings(calibrated.node.config), device="cpu")
    assert {c.name: c.threshold for c in site_pipeline.classifiers}[FINDING] == threshold  # type: ignore[attr-defined]

    source = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    uids = {}
    for name, (built_plugin, pipeline) in {"manifest": chest, "site": (plugin, site_pipeline)}.items():
        image = pipeline.load(source)
        result = pipeline.run([image])[0]
        assert {f.name: f.threshold for f in result.findings}[FINDING] == (0.9146 if name == "manifest" else threshold)
        outputs = write_results(source, result, image.display, AlgorithmIdentity.of(pipeline, built_plugin))
        uids[name] = {kind: ds.SOPInstanceUID for kind, ds in outputs.items()}
    assert all(uids["site"][kind] != uids["manifest"][kind] for kind in (OutputKind.SC, OutputKind.SEG, OutputKind.SR))


def test_an_override_of_other_weights_stops_the_start(chest: tuple[PipelinePlugin, Pipeline], tmp_path: Path) -> None:
    other = tmp_path / "override-v1.yaml"
    other.write_text(yaml.safe_dump({"model_version": "chest_xray 1 (lung UNet 00000000)", "thresholds": {FINDING: 0.5}}))
    with pytest.raises(WeightsError, match="calibrated on other weights"):
        read_override(other).check_models(chest[1].model_versions)


def test_the_readers_feedback_labels_the_cases_as_a_labels_file_would(
        tmp_path: Path, chest: tuple[PipelinePlugin, Pipeline]) -> None:
    """Each reader's verdict turns the result's flag into a label (agree: as flagged, disagree: the other
    way); the newest verdict on an image counts. Calibrated from that feedback, the figures are those of
    the same labels given as a file."""
    node = make_node(tmp_path)
    scores, labels = draw_site(5, 120)
    labels_file = analysed_site(node, scores, labels, AlgorithmIdentity.of(chest[1], chest[0]).label,
                                "sop_instance_uid")
    truth = dict(line.split(",") for line in labels_file.read_text().split()[1:])
    db = NodeDatabase(node.settings.node_database_url)
    try:
        with db.session() as session:
            for (sop, label), score in zip(truth.items(), scores, strict=True):
                agrees = (score >= 0.9146) == (label == "1")
                newest = FeedbackVerdict.AGREE if agrees else FeedbackVerdict.DISAGREE
                older = FeedbackVerdict.DISAGREE if agrees else FeedbackVerdict.AGREE  # changed their mind
                session.add_all([Feedback(sop_instance_uid=sop, finding=FINDING, verdict=verdict, user="dr-a")
                                 for verdict in (older, newest)])
    finally:
        db.dispose()
    figures = {}
    for source in (["--labels", str(labels_file)], ["--from-feedback"]):
        result = node.cli("calibrate", "--finding", FINDING, *source, "--target-sensitivity", "0.9", "--format", "json")
        assert result.exit_code == 0, result.output
        figures[source[0]] = {key: value for key, value in yaml.safe_load(result.output).items()
                              if key in ("positives", "negatives", "auroc", "proposed")}
    assert figures["--from-feedback"] == figures["--labels"] and figures["--labels"]["positives"] == labels.sum()
    refused = node.cli("calibrate", "--finding", FINDING, "--target-sensitivity", "0.9")
    assert refused.exit_code == 2 and "give either --labels FILE or --from-feedback" in refused.output
