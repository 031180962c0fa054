"""`serve` killed with SIGKILL during a burst: what was acknowledged survives and is processed once."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage
from sqlalchemy import select

from dicom_node.db import Instance, Job
from tests.conftest import dataset_bytes, wait_for
from tests.dicom_factory import write_cr

pytestmark = pytest.mark.slow

BURST = 200


def send_burst(port: int, files: list[Path], acknowledged: list[Path], stop: threading.Event) -> None:
    """Send files one by one on fresh associations; note each one answered 0x0000."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    for path in files:
        if stop.is_set():
            return
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
        if not assoc.is_established:
            return
        try:
            status = assoc.send_c_store(path)
            if "Status" in status and status.Status == 0x0000:
                acknowledged.append(path)
        finally:
            if assoc.is_established:
                assoc.release()


def test_acknowledged_instances_survive_sigkill_and_are_processed_once(node_factory, tmp_path):
    node = node_factory({"scheduler": {"study_quiet_seconds": 0.5}})
    node.start()
    files = []
    for index in range(BURST):
        path = tmp_path / "burst" / f"{index}.dcm"
        # Gate-skipped images (not chest) keep the work cheap: this is about the node.
        write_cr(path, study_uid=f"1.2.826.0.1.3680043.10.1002.{index // 4}",
                 body_part="ABDOMEN", seed=index)
        files.append(path)
    acknowledged: list[Path] = []
    stop = threading.Event()
    sender = threading.Thread(target=send_burst, args=(node.port, files, acknowledged, stop))
    sender.start()
    wait_for(lambda: len(acknowledged) >= BURST // 3, 180, "a third of the burst")
    node.kill()
    stop.set()
    sender.join(60)
    assert BURST // 3 <= len(acknowledged) < BURST

    node.start()
    by_uid = {path: dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in acknowledged}

    def all_processed() -> bool:
        db = node.db()
        try:
            with db.session() as session:
                rows = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
                finished = {j.id for j in session.scalars(select(Job)) if j.status.finished}
            return all(uid in rows and rows[uid].job_id in finished for uid in by_uid.values())
        finally:
            db.dispose()

    wait_for(all_processed, 240, "every acknowledged instance to be processed")
    db = node.db()
    with db.session() as session:
        rows = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
    db.dispose()
    for path, uid in by_uid.items():
        assert dataset_bytes(Path(rows[uid].path)) == dataset_bytes(path), f"{uid} damaged"
    assert not any((node.state_dir / "spool" / ".incoming").iterdir())

    # Each instance got exactly one verdict in the audit trail, even if its job was
    # interrupted by the kill and queued again.
    verdicts = Counter(
        event["sop_uid"] for event in json.loads(subprocess.run(
            [sys.executable, "-m", "dicom_node", "--config", str(node.config), "audit", "list",
             "--event", "job-skipped", "--event", "job-completed", "--event", "job-failed",
             "--format", "json"], capture_output=True, text=True, check=True).stdout))
    assert all(verdicts[uid] == 1 for uid in by_uid.values()), verdicts
    assert node.stop() == 0
