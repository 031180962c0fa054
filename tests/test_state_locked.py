"""node.db locked by another process while a PACS sends: for 10 s the store waits; for 90 s (longer
than ``scp.state_wait_s``, 20 s) images are answered 0xA700 before any timeout, leave nothing
behind, the association stays up, the PACS sends them again, and nothing is lost or stored twice."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from dicom_node.db import Instance
from tests.conftest import dcmtk_tool, run_tool, wait_for
from tests.dicom_factory import write_cr

pytestmark = pytest.mark.slow

IMAGES = 3


def send_while_locked(node, tmp_path, locked_s: float) -> tuple[list[Path], str, float]:
    """Send three images while another process holds node.db for ``locked_s``; return the files,
    storescu's verbose output and the seconds it took."""
    files = [tmp_path / f"{index}.dcm" for index in range(IMAGES)]
    for path in files:
        write_cr(path, body_part="ABDOMEN")  # skipped by the gate: cheap to decide
    locker = sqlite3.connect(node.state_dir / "node.db", timeout=30, check_same_thread=False)
    locker.execute("BEGIN EXCLUSIVE")
    released = threading.Timer(locked_s, locker.rollback)
    released.start()
    started = time.monotonic()
    try:
        sent = store(node, files)
    finally:
        released.join()
        locker.close()
    return files, sent.stdout + sent.stderr, time.monotonic() - started


def store(node, files: list[Path]):
    return run_tool(dcmtk_tool("storescu"), "-v", "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1",
                    str(node.port), *map(str, files), timeout=300)


def wait_decided(node) -> list[Instance]:
    def decided() -> list[Instance] | None:
        rows = node.rows(Instance)
        finished = {j.id for j in node.jobs() if j.status.finished}
        return rows if len(rows) == IMAGES and all(
            r.job_id in finished and r.verdict is not None for r in rows) else None

    return wait_for(decided, 120, "the three instances to be stored and decided after the lock")


def test_a_state_database_locked_for_ten_seconds_delays_but_loses_nothing(node_factory, tmp_path):
    node = node_factory().start()
    _, output, took = send_while_locked(node, tmp_path, 10)
    assert output.count("(Success)") == IMAGES, output  # every C-STORE answered 0x0000, after the lock
    assert took >= 9
    wait_decided(node)
    assert node.stop() == 0


def test_a_state_database_locked_for_ninety_seconds_refuses_then_takes_the_resend(node_factory, tmp_path):
    node = node_factory().start()
    files, output, _ = send_while_locked(node, tmp_path, 90)
    # storescu, like a PACS, stops at the refusal; the association is released, not aborted.
    assert "Refused: OutOfResources" in output and "(Success)" not in output, output
    assert "Releasing Association" in output and "Release Failed" not in output, output
    assert not list((node.state_dir / "spool").rglob("*.dcm")), "a refused image left a file"
    resent = store(node, files)  # the PACS sends what was refused (and, here, the rest) again
    assert resent.stdout.count("(Success)") + resent.stderr.count("(Success)") == IMAGES
    rows = wait_decided(node)
    assert sorted(r.sop_instance_uid for r in rows) == sorted({r.sop_instance_uid for r in rows})  # once each
    assert len(list((node.state_dir / "spool").rglob("*.dcm"))) == IMAGES
    assert node.stop() == 0
