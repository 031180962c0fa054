"""node.db locked by another process for 10 s while a PACS sends: the store waits, nothing is lost."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from sqlalchemy import select

from dicom_node.db import Instance, Job
from tests.conftest import dcmtk_tool, run_tool, wait_for
from tests.dicom_factory import write_cr

pytestmark = pytest.mark.slow

LOCKED_S = 10


def test_a_state_database_locked_for_ten_seconds_delays_but_loses_nothing(node_factory, tmp_path):
    node = node_factory().start()
    files = [tmp_path / f"{index}.dcm" for index in range(3)]
    for path in files:
        write_cr(path, body_part="ABDOMEN")  # skipped by the gate: cheap to decide
    locker = sqlite3.connect(node.state_dir / "node.db", timeout=30, check_same_thread=False)
    locker.execute("BEGIN EXCLUSIVE")
    released = threading.Timer(LOCKED_S, locker.rollback)
    released.start()
    started = time.monotonic()
    try:
        sent = run_tool(dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1",
                        str(node.port), *map(str, files), timeout=120)
    finally:
        released.join()
        locker.close()
    assert sent.returncode == 0, sent.stderr  # every C-STORE answered 0x0000, after the lock
    assert time.monotonic() - started >= LOCKED_S - 1

    def decided() -> bool:
        db = node.db()
        try:
            with db.session() as session:
                rows = session.scalars(select(Instance)).all()
                finished = {j.id for j in session.scalars(select(Job)) if j.status.finished}
            return len(rows) == 3 and all(r.job_id in finished and r.verdict is not None for r in rows)
        finally:
            db.dispose()

    wait_for(decided, 120, "the three instances to be stored and decided after the lock")
    assert node.stop() == 0
