"""DCMTK's echoscu/storescu against `dicom-node serve` started as a subprocess."""

from __future__ import annotations

import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicom_node.db import Instance
from tests.conftest import dataset_bytes, dcmtk_tool, free_port, run_tool, sample_file, wait_for
from tests.dicom_factory import write_cr

pytestmark = pytest.mark.slow

NO_WORKER = {"worker": {"embedded": False}}


def storescu(port: int, *files: Path, aet: str = "STORESCU", extra: tuple[str, ...] = ()):
    return run_tool(dcmtk_tool("storescu"), "-aet", aet, "-aec", "DICOM_NODE", *extra,
                    "127.0.0.1", str(port), *map(str, files))


def instances(node) -> dict[str, Instance]:
    db = node.db()
    try:
        with db.session() as session:
            return {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
    finally:
        db.dispose()


def test_echo_and_store_uncompressed_and_jpeg2000(node_factory, storescp_factory):
    node = node_factory(NO_WORKER).start()
    reference = storescp_factory().start()
    echo = run_tool(dcmtk_tool("echoscu"), "-aet", "ECHOSCU", "-aec", "DICOM_NODE",
                    "127.0.0.1", str(node.port))
    assert echo.returncode == 0, echo.stderr

    unci, j2kr = sample_file("RG1_UNCI.dcm"), sample_file("RG1_J2KR.dcm")
    # -xv proposes JPEG 2000 lossless first: the node must accept it as proposed,
    # not pick Explicit VR from its own list (storescu cannot decompress).
    for port in (node.port, reference.port):
        for source, extra in ((unci, ()), (j2kr, ("-xv",))):
            result = storescu(port, source, extra=extra)
            assert result.returncode == 0, result.stderr

    stored = instances(node)
    syntaxes = {unci: "1.2.840.10008.1.2.1", j2kr: "1.2.840.10008.1.2.4.90"}
    for source, syntax in syntaxes.items():
        sop_uid = dcmread(source, stop_before_pixels=True).SOPInstanceUID
        kept = Path(stored[sop_uid].path)
        assert kept.is_relative_to(node.state_dir / "spool")
        assert stored[sop_uid].transfer_syntax_uid == syntax
        assert oct(kept.stat().st_mode & 0o777) == "0o600"
        # What storescu put on the wire, as DCMTK's bit-preserving storescp wrote it.
        assert dataset_bytes(kept) == dataset_bytes(reference.received(sop_uid))
    assert node.stop() == 0


def test_structured_report_is_acknowledged_but_not_kept(node_factory):
    node = node_factory(NO_WORKER).start()
    report = sample_file("test-SR.dcm")
    result = storescu(node.port, report, extra=("-R",))
    assert result.returncode == 0, result.stderr
    assert instances(node) == {}
    assert not any(p.suffix == ".dcm" for p in (node.state_dir / "spool").rglob("*"))
    assert node.stop() == 0


def test_unknown_calling_ae_is_rejected(node_factory):
    node = node_factory(NO_WORKER).start()
    result = run_tool(dcmtk_tool("echoscu"), "-aet", "INTRUDER", "-aec", "DICOM_NODE",
                      "127.0.0.1", str(node.port))
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stderr + result.stdout
    wrong_called = run_tool(dcmtk_tool("echoscu"), "-aet", "ECHOSCU", "-aec", "OTHER_NODE",
                            "127.0.0.1", str(node.port))
    assert wrong_called.returncode != 0
    assert "Called AE Title Not Recognized" in wrong_called.stderr + wrong_called.stdout
    assert node.stop() == 0


def test_two_hundred_instances_over_four_associations(node_factory, tmp_path):
    node = node_factory(NO_WORKER).start()
    sources = []
    for batch in range(4):
        study = f"1.2.826.0.1.3680043.10.1001.{batch}"
        for index in range(50):
            path = tmp_path / "burst" / str(batch) / f"{index}.dcm"
            write_cr(path, study_uid=study, seed=batch * 100 + index)
            sources.append(path)
    senders = [
        subprocess.Popen([dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "DICOM_NODE",
                          "127.0.0.1", str(node.port), "+sd",
                          str(tmp_path / "burst" / str(batch))], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for batch in range(4)
    ]
    for sender in senders:
        output, _ = sender.communicate(timeout=300)
        assert sender.returncode == 0, output.decode()

    stored = instances(node)
    assert len(stored) == 200
    for source in sources:
        sop_uid = dcmread(source, stop_before_pixels=True).SOPInstanceUID
        assert dataset_bytes(Path(stored[sop_uid].path)) == dataset_bytes(source)
    wait_for(lambda: all(i.job_id is not None for i in instances(node).values()), 30,
             "every instance to get a job")
    assert node.stop() == 0


def test_sigterm_finishes_the_association_in_flight(node_factory, tmp_path):
    node = node_factory(NO_WORKER).start()
    folder = tmp_path / "inflight"
    for index in range(60):
        write_cr(folder / f"{index}.dcm", size=256, seed=index)
    sender = subprocess.Popen([dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "DICOM_NODE",
                               "+sd", "127.0.0.1", str(node.port), str(folder)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(lambda: len(instances(node)) >= 3, 60, "the first instances to arrive")
    node.process.send_signal(signal.SIGTERM)
    output, _ = sender.communicate(timeout=120)
    assert sender.returncode == 0, output.decode()
    assert node.process.wait(60) == 0
    assert len(instances(node)) == 60


def test_metrics_count_what_arrived(node_factory):
    metrics_port = free_port()
    node = node_factory({**NO_WORKER, "metrics": {"serve_port": metrics_port}}).start()
    assert storescu(node.port, sample_file("RG3_UNCI.dcm")).returncode == 0
    assert storescu(node.port, sample_file("test-SR.dcm"), extra=("-R",)).returncode == 0
    page = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
    text = page.decode()
    assert 'dicom_node_instances_total{outcome="received"} 1.0' in text
    assert 'dicom_node_instances_total{outcome="ignored"} 1.0' in text
    assert 'dicom_node_stage_seconds_count{stage="store"} 2.0' in text
    assert node.stop() == 0
