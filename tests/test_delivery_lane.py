"""Delivery has its own lane: a destination that never answers does not hold up analysis."""

from __future__ import annotations

import socket
import time

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_node.db import DeliveryStatus
from tests.conftest import dcmtk_tool, run_tool, sample_file, wait_for

pytestmark = pytest.mark.slow






def test_a_destination_that_never_answers_does_not_hold_up_analysis(node_factory, tmp_path):
    with socket.socket() as silent:  # accepts connections, never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        node = node_factory({
            "destinations": [{"name": "silent", "ae_title": "SILENT", "host": "127.0.0.1",
                              "port": silent.getsockname()[1]}],
            "delivery": {"timeout_s": 30, "first_retry_s": 60},
        }).start()
        files = []
        for index in range(2):
            ds = dcmread(sample_file("RG1_UNCR.dcm"))
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid() for _ in range(3))
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            files.append(tmp_path / f"study-{index}.dcm")
            ds.save_as(files[-1])
        store = lambda path: run_tool(dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "DICOM_NODE",  # noqa: E731
                                      "127.0.0.1", str(node.port), str(path))
        assert store(files[0]).returncode == 0
        wait_for(lambda: (jobs := node.jobs()) and jobs[0].status.finished, 90, "the first job to be analysed")
        wait_for(lambda: len(node.deliveries()) == 3, 30, "its three deliveries to be queued")
        # Its three objects now go to a destination that holds each association for 30 s. In a
        # lane shared with analysis, the next image would wait behind them for a minute and more.
        started = time.monotonic()
        assert store(files[1]).returncode == 0
        wait_for(lambda: (jobs := node.jobs()) and len(jobs) == 2 and jobs[1].status.finished, 60,
                 "the second job to be analysed")
        assert time.monotonic() - started < 25
        assert [j.status.value for j in node.jobs()] == ["done", "done"]
        assert not any(d.status is DeliveryStatus.DELIVERED for d in node.deliveries())
        assert node.stop(timeout=120) == 0
