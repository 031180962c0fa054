"""The hostile corpus (tests/hostile_corpus.py) against the SCP and then the pipeline.

Every case gets one of its expected statuses and an audit event saying what became of
it; what the SCP stores is then gated and analysed: only the controls are analysed,
everything else is skipped or failed with a reason. The node serves throughout.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicom_node.analysis import Analyzer
from dicom_node.db import Instance, Job, JobStatus
from dicom_node.routing import Router
from pipelines.chest_xray.pipeline import ChestXrayPipeline
from pipelines.chest_xray.plugin import ChestXrayPlugin
from tests.hostile_corpus import cases
from tests.test_pipeline import MANIFEST
from tests.test_scp_bad_input import send_files_as_they_are, still_serving, store  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.filterwarnings("ignore"),  # the corpus is made to provoke pydicom's warnings
              pytest.mark.usefixtures("send_files_as_they_are")]


def test_every_hostile_case_gets_a_status_then_a_verdict_and_the_node_keeps_serving(start_scp, tmp_path):
    corpus = cases()
    assert len(corpus) >= 60
    scp = start_scp(max_dataset_mb=10)
    statuses: dict[str, int] = {}
    sop_uids: dict[str, str] = {}
    for index, case in enumerate(corpus):
        path = tmp_path / f"{index:03d}.dcm"
        case.write(path)
        try:
            sop_uids[case.name] = str(dcmread(path, stop_before_pixels=True, force=True).get("SOPInstanceUID", ""))
        except Exception:
            sop_uids[case.name] = ""
        try:
            statuses[case.name] = store(scp, path)
        except Exception as exc:
            pytest.fail(f"the test SCU could not send {case.name!r}: {exc!r}")
        assert statuses[case.name] in case.statuses, (case.name, hex(statuses[case.name]))
    assert still_serving(scp)

    with scp.audit.connect() as connection:
        audited = connection.exec_driver_sql(
            "SELECT event, sop_uid, detail FROM audit_events WHERE event LIKE 'instance-%'").all()
    assert len(audited) == len(corpus)  # one event per C-STORE, whatever it was answered
    assert all(detail for event, _, detail in audited if event == "instance-rejected")

    with scp.db.session() as session:
        instances = session.scalars(select(Instance)).all()
        for instance in instances:
            job = Job(study_instance_uid=instance.study_instance_uid, status=JobStatus.QUEUED)
            session.add(job)
            session.flush()
            instance.job_id = job.id
    pipeline = ChestXrayPipeline.from_manifest(MANIFEST, device="cpu")
    analyzer = Analyzer(scp.db, scp.audit, {"chest_xray": (ChestXrayPlugin(), pipeline)}, Router([], "chest_xray", []),
                        tmp_path / "results", worker="test-worker")
    with scp.db.session() as session:
        job_ids = session.scalars(select(Job.id)).all()
    for job_id in job_ids:
        analyzer.run(job_id)
    with scp.db.session() as session:
        verdicts = {row.sop_instance_uid: (row.verdict.value, row.verdict_reason)
                    for row in session.scalars(select(Instance))}

    rows = []
    for case, (event, _, detail) in zip(corpus, audited, strict=True):  # one event per case, in order
        verdict, reason = verdicts.get(sop_uids[case.name], ("-", detail if event == "instance-rejected" else ""))
        rows.append(f"| {case.name} | 0x{statuses[case.name]:04X} | {verdict} | {reason or ''} |")
        if statuses[case.name] == 0x0000:
            assert verdict == ("analysed" if case.analysed else verdict) and reason, case.name
            assert (verdict == "analysed") == case.analysed, (case.name, verdict, reason)
    report = Path(tmp_path / "hostile-corpus.md")
    report.write_text("| case | status | verdict | reason (verdict, or the audited rejection) |\n|---|---|---|---|\n"
                      + "\n".join(rows) + "\n")
    print(report.read_text())
