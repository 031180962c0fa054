"""Load: ten DCMTK senders at once, 50 instances each, twice, while the worker analyses.

Nothing acknowledged is lost, every instance gets its verdict, and the node's memory stays
flat from the first round to the second. Peak resident memory of `serve` and its workers
is printed (run with -s to see it).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from dicom_node.db import Instance, Job
from tests.conftest import dcmtk_tool, wait_for
from tests.dicom_factory import write_cr

pytestmark = pytest.mark.slow

SENDERS, PER_SENDER = 10, 50


def _memory_kib(pid: int, field: str) -> int:
    """Return VmRSS or VmHWM (peak) of ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _tree(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(p for child in children for p in _tree(int(child)))]


def _counts(node) -> tuple[int, int]:
    db = node.db()
    try:
        with db.session() as session:
            decided = session.scalar(select(func.count()).select_from(Instance).where(Instance.verdict.is_not(None)))
            return session.scalar(select(func.count()).select_from(Instance)), decided
    finally:
        db.dispose()


def _round(node, folder: Path) -> None:
    batches = []
    for sender in range(SENDERS):
        study = generate_uid()
        batch = folder / f"sender-{sender}"
        for index in range(PER_SENDER):
            write_cr(batch / f"{index}.dcm", study_uid=study, seed=index)
        batches.append(batch)
    senders = [subprocess.Popen([dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "DICOM_NODE", "+sd",
                                 "127.0.0.1", str(node.port), str(batch)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for batch in batches]
    for sender in senders:
        assert sender.wait(300) == 0, sender.stderr.read()


def test_ten_senders_lose_nothing_and_memory_stays_flat(node_factory, tmp_path):
    # A quiet period long enough that a sender slowed by the load does not split its study in two jobs.
    node = node_factory({"scp": {"max_associations": 10, "max_associations_per_peer": 10},
                         "scheduler": {"study_quiet_seconds": 10}}).start()
    serve = node.process.pid
    _round(node, tmp_path / "first")
    wait_for(lambda: _counts(node) == (500, 500), 600, "the first 500 instances to be stored and decided")
    after_first = _memory_kib(serve, "VmRSS")
    _round(node, tmp_path / "second")
    wait_for(lambda: _counts(node) == (1000, 1000), 600, "all 1000 instances to be stored and decided")
    after_second = _memory_kib(serve, "VmRSS")
    peaks = {pid: _memory_kib(pid, "VmHWM") for pid in _tree(serve)}
    print(f"serve RSS after 500 instances {after_first // 1024} MiB, after 1000 {after_second // 1024} MiB; "
          f"peak RSS by process (MiB): {[peak // 1024 for peak in peaks.values()]}")
    assert after_second - after_first < 64 * 1024  # flat: not growing with the instances received
    db = node.db()
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 2 * SENDERS  # one job per study
    db.dispose()
    assert node.stop() == 0
