"""The destination is down when the results are ready and comes up two minutes later."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from dicom_node.db import Delivery, DeliveryStatus
from tests.conftest import dcmtk_tool, free_port, run_tool, sample_file, wait_for
from tests.receiving_scp import ReceivingSCP

pytestmark = pytest.mark.slow

OUTAGE_S = 120


def delivery_states(node) -> list[DeliveryStatus]:
    db = node.db()
    try:
        with db.session() as session:
            return [d.status for d in session.scalars(select(Delivery))]
    finally:
        db.dispose()


def test_everything_arrives_once_after_a_two_minute_outage(node_factory, tmp_path):
    pacs = ReceivingSCP(port=free_port())
    node = node_factory({
        "destinations": [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                          "port": pacs.port}],
        "delivery": {"first_retry_s": 10, "max_retry_interval_s": 30},
    }).start()
    sent = run_tool(dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "DICOM_NODE",
                    "127.0.0.1", str(node.port), str(sample_file("RG1_UNCI.dcm")))
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: len(delivery_states(node)) == 3
             and all(s is DeliveryStatus.RETRYING for s in delivery_states(node)), 300,
             "the results to be ready and their first delivery to fail")
    time.sleep(OUTAGE_S)
    pacs.start()
    try:
        wait_for(lambda: all(s is DeliveryStatus.DELIVERED for s in delivery_states(node)), 120,
                 "every result to be delivered after the outage")
        assert len(pacs.received) == 3 and set(pacs.received.values()) == {1}
        assert node.stop() == 0
    finally:
        pacs.stop()
