"""The quality report and the drift gauges, on a node state with synthetic results: real SQLite
files, ``findings.json`` files written by the node's own :func:`~dicom_node.results.save_findings`,
and the bundled weights manifest (or a copy of it given a score histogram)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from prometheus_client import REGISTRY
from sqlalchemy import select

from dicom_node.cli import main
from dicom_node.config import Settings, load_settings
from dicom_node.db import (
    Delivery,
    DeliveryStatus,
    Instance,
    InstanceVerdict,
    Job,
    JobStatus,
    NodeDatabase,
    utcnow,
)
from dicom_node.quality import (
    DriftGauges,
    FindingFigures,
    ReaderAgreement,
    Score,
    bin_shares,
    collect,
    pipeline_references,
    psi,
    reference_of,
)
from dicom_node.report import SECTIONS, feedback_section
from dicom_node.results import result_dir, save_findings
from dicom_node.service import HOUSEKEEPING_INTERVAL_S, Node
from pipelines.base import Finding, ImageResult
from pipelines.chest_xray.plugin import DEFAULT_MANIFEST
from tests.conftest import free_port

STUDY = "1.2.826.0.1.3680043.8.498.3104"
ANALYSED = 60
COVID_THRESHOLD = 0.9146
SKIPS = {"modality MR is not CR or DX": 4,
         "patient younger than 18 years (by PatientAge or PatientBirthDate)": 2}


def bundled_finding(name: str) -> dict:
    return next(f for f in yaml.safe_load(DEFAULT_MANIFEST.read_text())["findings"] if f["name"] == name)


def at_reference(i: int) -> float:
    """A COVID-19 score: every third image above the threshold, near the validation split's share."""
    return 0.95 if i % 3 == 0 else 0.1 + 0.7 * (i % 7) / 7


def node_settings(tmp_path: Path, **extra: object) -> tuple[Path, Settings]:
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), **extra}))
    return config, load_settings(config)


def seed(settings: Settings, covid: Callable[[int], float]) -> None:
    """Write ANALYSED analysed images over the last three days (one more eight days ago, outside a
    week's window) with their findings and delivered results, and the skipped images of SKIPS.

    Image i arrives from ORTHANC when even, else from MODALITY_A; its last result is delivered
    20 + i seconds after it arrived.
    """
    now = utcnow()
    db = NodeDatabase(settings.node_database_url)
    with db.session() as session:
        job = Job(study_instance_uid=STUDY, status=JobStatus.DONE)
        session.add(job)
        session.flush()
        for i in range(-1, ANALYSED):
            sop = f"{STUDY}.{i + 2}"
            received = now - (timedelta(days=8) if i < 0 else timedelta(hours=72 * (i + 0.5) / ANALYSED))
            score = covid(max(i, 0))
            findings = [Finding("covid19", "COVID-19 pattern", score, COVID_THRESHOLD, score >= COVID_THRESHOLD, False),
                        Finding("pneumothorax", "Pneumothorax", 0.05 + 0.01 * (i % 10), 0.5, False, True)]
            save_findings(result_dir(settings.results_dir, STUDY, sop, "chest_xray"),
                        ImageResult(sop, {"lungs": np.zeros((4, 4), bool)}, findings), "chest_xray 0.1.0")
            session.add(instance(sop, received, "ORTHANC" if i % 2 == 0 else "MODALITY_A", job.id,
                                 InstanceVerdict.ANALYSED, "scores"))
            for kind, after in (("sc", 10 + i), ("seg", 20 + i)):
                session.add(Delivery(job_id=job.id, source_sop_instance_uid=sop, destination="pacs", kind=kind,
                                     sop_instance_uid=f"{sop}.{len(kind)}", path="-",
                                     status=DeliveryStatus.DELIVERED, delivered_at=received + timedelta(seconds=after)))
        number = 1000
        for reason, count in SKIPS.items():
            for _ in range(count):
                number += 1
                session.add(instance(f"{STUDY}.{number}", now - timedelta(hours=1), "ORTHANC", job.id,
                                     InstanceVerdict.SKIPPED, reason))
    db.dispose()


def instance(sop: str, received, calling_ae: str, job_id: int, verdict: InstanceVerdict, reason: str) -> Instance:
    return Instance(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.1", study_instance_uid=STUDY,
                    series_instance_uid=f"{STUDY}.1", transfer_syntax_uid="1.2.840.10008.1.2.1", path="-",
                    size_bytes=1, calling_ae=calling_ae, received_at=received, job_id=job_id, verdict=verdict,
                    verdict_reason=reason)


def test_psi_is_zero_for_the_reference_itself_and_major_for_a_shift():
    histogram = {"edges": [i / 10 for i in range(11)], "counts": [30, 20, 12, 9, 7, 6, 5, 4, 3, 4]}
    reference = reference_of({"name": "x", "threshold": 0.5, "validation": {"score_histogram": histogram}})
    assert reference is not None and reference.source == "validation score histogram (100 images)"
    same = [0.05 + i / 10 for i, count in enumerate(histogram["counts"]) for _ in range(count)]
    assert psi(bin_shares(same, reference.edges), reference.shares) == pytest.approx(0, abs=1e-12)
    shifted = [min(score + 0.3, 1.0) for score in same]
    assert psi(bin_shares(shifted, reference.edges), reference.shares) > 0.25
    # By hand: (0.5 - 0.8) ln(0.5 / 0.8) + (0.5 - 0.2) ln(0.5 / 0.2)
    assert psi([0.5, 0.5], [0.8, 0.2]) == pytest.approx(0.3 * math.log(1.6) + 0.3 * math.log(2.5))


def test_a_window_against_an_earlier_one():
    def window(scores: list[float]) -> FindingFigures:
        return FindingFigures("chest_xray", "covid19", "COVID-19 pattern",
                              [Score(utcnow(), p, 0.5, p >= 0.5, False) for p in scores])

    week = [0.05 + i / 100 for i in range(90)]
    assert window(week).psi_against(window(week)) == pytest.approx(0)
    assert window(week).psi_against(window([s + 0.1 for s in week])) > 0.25
    assert window(week).psi_against(window(week[:19])) is None  # too few to say anything
    assert window(week).psi_against(None) is None


def test_the_bundled_manifest_gives_a_two_bin_reference_where_its_figures_allow():
    reference = reference_of(bundled_finding("covid19"))
    assert reference is not None
    above = (0.7895 * 475 + (1 - 0.9708) * (1228 - 475)) / 1228
    assert reference.edges == (0.0, COVID_THRESHOLD, 1.0)
    assert reference.shares == pytest.approx((1 - above, above))
    assert reference_of(bundled_finding("pneumothorax")) is None  # no positives in its validation split


def test_report_shows_every_section_from_the_node_state(tmp_path: Path):
    config, settings = node_settings(tmp_path)
    seed(settings, at_reference)
    out = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["-c", str(config), "report", "--since", "7d", "--out", str(out)])
    assert result.exit_code == 0, result.output
    html = out.read_text()
    for key, title in SECTIONS.items():
        assert f'<section id="{key}"><h2>{title}</h2>' in html
    drift = section(html, "drift")
    # 20 of 60 above the threshold against the validation split's 32.3 %: next to no drift.
    assert re.search(r"COVID-19 pattern \(chest_xray\)</td><td>60</td>.*?<td>0\.00\d</td><td>stable</td><td>–</td>",
                     drift)  # the week before holds one image: too few to compare
    assert "Pneumothorax (chest_xray)</td><td>60</td>" in drift and "no reference" in drift
    assert "33.3 %" in drift and "32.3 %" in drift
    assert section(html, "scores").count("<svg") == 2
    assert section(html, "flag-rate").count("<svg") == 1
    skips = section(html, "skips")
    assert "analysed: 60, skipped: 6" in skips
    assert all(f'data-label="{reason}"' in skips for reason in SKIPS)
    latency = section(html, "latency")
    assert "<td>60</td><td>49.5 s</td>" in latency and "<td>79.0 s</td>" in latency  # 20..79 s
    volume = section(html, "volume")
    assert 'data-label="ORTHANC"' in volume and ">36<" in volume and ">30<" in volume
    assert "No feedback recorded" in section(html, "feedback")
    assert not re.search(r"(src|href)=|url\(|@import", html)  # nothing fetched from elsewhere


def test_a_manifest_score_histogram_is_the_reference_and_a_shift_shows(tmp_path: Path):
    manifest = yaml.safe_load(DEFAULT_MANIFEST.read_text())
    manifest["findings"][0]["validation"]["score_histogram"] = {
        "edges": [0, 0.25, 0.5, 0.75, 1], "counts": [700, 200, 100, 228]}
    copy = tmp_path / "manifest.yaml"
    copy.write_text(yaml.safe_dump(manifest))
    config, settings = node_settings(tmp_path, pipeline={"manifest": str(copy)})
    seed(settings, lambda i: 0.96)
    out = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["-c", str(config), "report", "--since", "7d", "--out", str(out)])
    assert result.exit_code == 0, result.output
    drift = section(out.read_text(), "drift")
    assert "validation score histogram (1228 images)" in drift
    expected = psi([0, 0, 0, 1], [700 / 1228, 200 / 1228, 100 / 1228, 228 / 1228])
    assert f"<td>{expected:.3f}</td><td>major shift</td>" in drift


def test_drift_gauges_follow_the_window(tmp_path: Path):
    _, settings = node_settings(tmp_path)
    seed(settings, lambda i: 0.96 if i % 2 else 0.2)
    db = NodeDatabase(settings.node_database_url)
    try:
        references = pipeline_references(settings)
        gauges = DriftGauges(db, settings.results_dir, references)
        gauges.update()
        covid = {"pipeline": "chest_xray", "finding": "covid19"}
        expected = collect(db, settings.results_dir, references, since=utcnow() - timedelta(days=7))
        assert REGISTRY.get_sample_value("dicom_node_score_psi", covid) == pytest.approx(
            expected.findings[("chest_xray", "covid19")].psi)
        assert REGISTRY.get_sample_value("dicom_node_flag_rate", covid) == pytest.approx(0.5)
        assert REGISTRY.get_sample_value("dicom_node_window_scores", covid) == ANALYSED
        pneumothorax = {"pipeline": "chest_xray", "finding": "pneumothorax"}
        assert REGISTRY.get_sample_value("dicom_node_flag_rate", pneumothorax) == 0
        assert REGISTRY.get_sample_value("dicom_node_score_psi", pneumothorax) is None  # no reference
        rerun(settings, db, score=0.96)  # the jobs run again, every image now flagged
        gauges.update()
        assert REGISTRY.get_sample_value("dicom_node_flag_rate", covid) == pytest.approx(1.0)
        gauges.window = timedelta(minutes=1)  # every analysed image is older: the series go
        gauges.update()
        assert REGISTRY.get_sample_value("dicom_node_flag_rate", covid) is None
        assert REGISTRY.get_sample_value("dicom_node_score_psi", covid) is None
    finally:
        db.dispose()


def test_serve_housekeeping_sets_the_drift_gauges(tmp_path: Path):
    _, settings = node_settings(tmp_path, metrics={"serve_port": free_port()}, scp={"port": free_port()})
    seed(settings, lambda i: 0.96 if i % 4 == 0 else 0.3)
    node = Node(settings, run_worker=False)
    try:
        node._last_housekeeping -= HOUSEKEEPING_INTERVAL_S  # as when a minute has passed
        node._housekeeping()
    finally:
        node.db.dispose()
        node.scp_db.dispose()
        node.audit.close()
        node.lock.release()
    covid = {"pipeline": "chest_xray", "finding": "covid19"}
    assert REGISTRY.get_sample_value("dicom_node_flag_rate", covid) == pytest.approx(0.25)
    assert REGISTRY.get_sample_value("dicom_node_score_psi", covid) > 0


def rerun(settings: Settings, db: NodeDatabase, *, score: float) -> None:
    """Write every analysed image's findings again with a COVID-19 ``score``, and its new verdict."""
    with db.session() as session:
        for row in session.scalars(select(Instance).where(Instance.verdict == InstanceVerdict.ANALYSED)):
            folder = result_dir(settings.results_dir, STUDY, row.sop_instance_uid, "chest_xray")
            findings = [Finding("covid19", "COVID-19 pattern", score, COVID_THRESHOLD, True, False)]
            save_findings(folder, ImageResult(row.sop_instance_uid, {"lungs": np.zeros((4, 4), bool)}, findings),
                        "chest_xray 0.1.0")
            row.verdict_reason = f"covid19={score:.2f} FLAGGED"


def test_unreadable_results_are_left_out_and_a_bad_out_path_is_refused(tmp_path: Path):
    config, settings = node_settings(tmp_path)
    seed(settings, at_reference)
    broken, incomplete = (result_dir(settings.results_dir, STUDY, f"{STUDY}.{n}", "chest_xray") for n in (2, 3))
    (broken / "findings.json").write_text("{")
    (incomplete / "findings.json").write_text('{"findings": [{"name": "covid19"}]}')
    out = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["-c", str(config), "report", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "COVID-19 pattern (chest_xray)</td><td>58</td>" in section(out.read_text(), "drift")
    result = CliRunner().invoke(main, ["-c", str(config), "report", "--out", str(tmp_path / "no" / "report.html")])
    assert result.exit_code == 1 and "cannot write" in result.output and "Traceback" not in result.output


def test_feedback_agreement_per_finding():
    rows = [ReaderAgreement("chest_xray", "covid19", True, True), ReaderAgreement("chest_xray", "covid19", True, False),
            ReaderAgreement("chest_xray", "covid19", False, True), ReaderAgreement("chest_xray", "covid19", False, True)]
    html = feedback_section(rows)
    assert "<td>covid19 (chest_xray)</td><td>4</td><td>75.0 %</td><td>50.0 %</td><td>100.0 %</td>" in html
    assert "No feedback recorded" in feedback_section([])


def section(html: str, key: str) -> str:
    return html.split(f'<section id="{key}">', 1)[1].split("</section>", 1)[0]


def test_the_report_shows_the_readers_newest_verdicts_from_the_feedback_records(tmp_path: Path):
    config, settings = node_settings(tmp_path)
    seed(settings, at_reference)  # image 0 scores 0.95 (flagged), image 1 0.2 (not)
    flagged, unflagged = f"{STUDY}.2", f"{STUDY}.3"
    for verdict, sop in (("disagree", flagged), ("agree", flagged), ("disagree", unflagged)):
        recorded = CliRunner().invoke(main, ["-c", str(config), "feedback", verdict, "1", "covid19", "--instance", sop])
        assert recorded.exit_code == 0, recorded.output
    out = tmp_path / "report.html"
    assert CliRunner().invoke(main, ["-c", str(config), "report", "--out", str(out)]).exit_code == 0
    # The reader's newest verdict on the flagged image (agree) counts, not the one it replaced.
    assert ("<td>covid19 (chest_xray)</td><td>2</td><td>50.0 %</td><td>100.0 %</td><td>0.0 %</td>"
            in section(out.read_text(), "feedback"))
