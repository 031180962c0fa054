"""One `serve` per state folder and per port, and workers that tell each other apart."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from sqlalchemy import select

from dicom_node.analysis import Analyzer
from dicom_node.db import Job, JobStatus, NodeDatabase
from dicom_node.worker_identity import worker_is_gone, worker_name


def _serve(node, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_node", "--config", str(node.config), "serve"],
                          capture_output=True, text=True, timeout=timeout)


def test_a_second_serve_on_one_state_folder_is_refused_and_touches_nothing(node_factory):
    first = node_factory({"worker": {"embedded": False}}).start()
    upload = first.state_dir / "spool" / ".incoming" / "in-flight.partial"
    upload.write_bytes(b"an upload the first node is receiving")
    second = node_factory({"worker": {"embedded": False}, "state_dir": str(first.state_dir)}, name="second")
    refused = _serve(second)
    assert refused.returncode == 1
    assert f"state folder {first.state_dir} is in use by dicom-node serve pid {first.process.pid}" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert upload.read_bytes() == b"an upload the first node is receiving"
    assert first.stop() == 0
    # Once the first has stopped, the folder is free again.
    again = node_factory({"worker": {"embedded": False}, "state_dir": str(first.state_dir)}, name="third").start()
    assert again.stop() == 0


def test_a_port_in_use_is_said_in_one_line(node_factory):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node = node_factory({"worker": {"embedded": False}, "scp": {"port": port}})
        refused = _serve(node)
    assert refused.returncode == 1, refused.stderr
    assert "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"Error: port {port} on 127.0.0.1 is in use by another program (scp.port)")


def test_workers_are_named_by_host_and_pid_and_a_dead_ones_jobs_are_reclaimed(tmp_path):
    name = worker_name()
    assert name == f"dicom-node-{os.getpid()}@{socket.gethostname()}"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = f"dicom-node-{gone.pid}@{socket.gethostname()}"
    assert worker_is_gone(dead) and not worker_is_gone(name)
    assert not worker_is_gone(f"dicom-node-{gone.pid}@another-host") and not worker_is_gone(None)

    db = NodeDatabase(f"sqlite:///{tmp_path / 'node.db'}")
    with db.session() as session:
        session.add_all([Job(study_instance_uid="1.2.1", status=JobStatus.RUNNING, worker=dead),
                         Job(study_instance_uid="1.2.2", status=JobStatus.RUNNING, worker=name),
                         Job(study_instance_uid="1.2.3", status=JobStatus.RUNNING,
                             worker=f"dicom-node-{gone.pid}@another-host")])
    # A second worker of this host starting must not take the live one's job, only the dead one's.
    other = Analyzer.__new__(Analyzer)
    other.db, other.worker = db, f"dicom-node-{os.getpid() + 1}@{socket.gethostname()}"
    assert other.requeue_interrupted() == [1]
    with db.session() as session:
        assert [j.status for j in session.scalars(select(Job).order_by(Job.id))] == [
            JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.RUNNING]
    db.dispose()
