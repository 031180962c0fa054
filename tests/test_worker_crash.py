"""The analysis worker killed with SIGKILL mid-analysis: `serve` restarts it, and the new one
takes over the dead one's job (by its pid) at once; every image is decided exactly once."""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path

import pytest

from dicom_node.db import JobStatus
from tests.conftest import dcmtk_tool, run_tool, wait_for
from tests.dicom_factory import write_rg1_study

pytestmark = pytest.mark.slow

STUDIES = 4


def _analysis_worker(serve_pid: int) -> int | None:
    """Return the pid of serve's analysis worker (a child started by any of its threads)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        if parent == serve_pid and b"analysis" in command:
            return int(entry.name)
    return None




def test_a_killed_analysis_worker_is_replaced_and_its_job_taken_over(node_factory, tmp_path):
    node = node_factory().start()
    files = [tmp_path / f"{index}.dcm" for index in range(STUDIES)]
    for path in files:
        write_rg1_study(path)
    sent = run_tool(dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1",
                    str(node.port), *map(str, files))
    assert sent.returncode == 0, sent.stderr
    running = wait_for(lambda: next((j for j in node.jobs() if j.status is JobStatus.RUNNING), None), 120,
                       "a job to be running")
    victim = _analysis_worker(node.process.pid)
    assert victim is not None and running.worker == f"dicom-node-{victim}@{os.uname().nodename}"
    os.kill(victim, signal.SIGKILL)

    jobs = wait_for(lambda: (jobs := node.jobs()) and len(jobs) == STUDIES and all(j.status.finished for j in jobs)
                    and jobs, 300, "every job to finish after the kill")
    assert all(j.status is JobStatus.DONE for j in jobs), [(j.id, j.status, j.reason) for j in jobs]
    replacement = _analysis_worker(node.process.pid)
    assert replacement is not None and replacement != victim
    verdicts = Counter(e["sop_uid"] for e in json.loads(node.cli(
        "audit", "list", "--event", "job-completed", "--event", "job-skipped", "--event", "job-failed",
        "--format", "json")))
    assert sorted(verdicts.values()) == [1] * STUDIES  # each image decided exactly once
    assert node.stop() == 0
