"""Every PACS gets every object, as its administrator would see it.

The node offers each result in its own transfer syntax and in Explicit and Implicit VR
Little Endian, and sends it in what the peer accepted: the SEG (written RLE Lossless)
reaches DCMTK's storescp with its defaults (no ``+xa``: uncompressed syntaxes only, as
many older PACS) decoded, and Orthanc with its default configuration as written. A
peer that accepts an object in none of them dead-letters it at once, saying why.

Inputs that used to fail an instance with a traceback (a PixelSpacing ``a\\b``, a
SpecificCharacterSet ``ISO_IR 999``, a PatientBirthDate ``01.02.1970``) are analysed,
and their results pass dciodvfy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydicom import Dataset, dcmread
from pydicom.uid import (
    UID, CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless,
    MRImageStorage, RLELossless, generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.events import Event

from dicom_node.audit import AuditTrail
from dicom_node.config import load_settings
from dicom_node.db import Delivery, DeliveryStatus, Job, JobStatus, NodeDatabase
from dicom_node.delivery import Deliverer
from dicom_node.workflow import queue_deliveries
from tests.conftest import (
    OrthancInNamespace, dcmtk_tool, free_port, in_namespace, run_tool, sample_file, wait_for,
)
from tests.writers_fixtures import dciodvfy, put_raw

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
RESULT_CLASSES = sorted([SECONDARY_CAPTURE, SEGMENTATION, COMPREHENSIVE_3D_SR])
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: A patient name beyond ASCII, written in RG1's character set (ISO_IR 100, Latin-1).
LATIN_1_NAME = "Müller^Jörg"

#: The inputs that failed an instance with a traceback, as raw values written into a copy of RG1.
AWKWARD = {
    "spacing": ("PixelSpacing", "DS", b"a\\b"),
    "charset": ("SpecificCharacterSet", "CS", b"ISO_IR 999"),
    "birth-date": ("PatientBirthDate", "DA", b"01.02.1970"),
}


def rg1_copy(folder: Path, name: str, *awkward: tuple[str, str, bytes]) -> Dataset:
    """Write RG1 as a study of its own (UIDs derived from ``name``), with a valid Pixel Spacing
    (RG1's 0\\0 is none) and the ``awkward`` raw values; return its header."""
    source = dcmread(sample_file("RG1_UNCI.dcm"))
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(source, keyword, generate_uid(entropy_srcs=["test_delivery_syntaxes", name, keyword]))
    source.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
    source.PixelSpacing = [0.171, 0.171]
    for value in awkward:
        put_raw(source, *value)
    path = folder / f"{name}.dcm"
    source.save_as(path, enforce_file_format=True)
    return dcmread(path, stop_before_pixels=True)


def storescu(port: int, paths: list[Path], *prefix: str) -> None:
    sent = run_tool(*prefix, dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "DICOM_NODE",
                    "127.0.0.1", str(port), *map(str, paths))
    assert sent.returncode == 0, sent.stderr


def finished_job(node, study: str) -> Job | None:
    jobs = node.jobs(study)
    return jobs[-1] if jobs and jobs[-1].status.finished else None


def delivered(node, job_id: int) -> list[Delivery] | None:
    rows = node.deliveries(job_id)
    return rows if len(rows) == 3 and all(r.status is DeliveryStatus.DELIVERED for r in rows) else None


@pytest.mark.slow
def test_storescp_with_its_defaults_gets_sc_seg_and_sr_also_of_awkward_inputs(node_factory, storescp_factory,
                                                                              tmp_path):
    """One serve, four studies: a plain RG1 and the three awkward inputs. storescp without +xa
    refuses RLE Lossless: the SEG arrives decoded, pixel for pixel, under its own SOP Instance UID.
    (Offered in RLE Lossless only, the SEG was refused; sent again alone, its association was aborted
    for want of an accepted context, and it stayed 'retrying' for max_age_s, a day.)"""
    pacs = storescp_factory(accept_all=False).start()
    node = node_factory({"destinations": [
        {"name": "old-pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}]})
    node.start()
    sources = {"plain": rg1_copy(tmp_path, "plain")}
    sources |= {name: rg1_copy(tmp_path, name, value) for name, value in AWKWARD.items()}
    storescu(node.port, [tmp_path / f"{name}.dcm" for name in sources])

    for name, source in sources.items():
        job = wait_for(lambda: finished_job(node, source.StudyInstanceUID), 300, f"the {name} job to finish")
        assert job.status is JobStatus.DONE, (name, job.status, job.reason)
        rows = wait_for(lambda: delivered(node, job.id), 120, f"the {name} results to be delivered")
        classes = []
        for row in rows:
            received = pacs.received(row.sop_instance_uid)
            assert received is not None, (name, row.kind)
            dataset = dcmread(received)
            classes.append(dataset.SOPClassUID)
            assert dataset.SOPInstanceUID == row.sop_instance_uid
            assert dataset.StudyInstanceUID == source.StudyInstanceUID
            assert dataset.file_meta.TransferSyntaxUID in UNCOMPRESSED, (name, row.kind)
            assert dataset.SpecificCharacterSet == "ISO_IR 192"
            errors, _ = dciodvfy(received)
            assert errors == [], (name, row.kind, errors)
            if row.kind == "seg":  # sent decoded: the same frames as the node's RLE Lossless file
                ours = dcmread(row.path)
                assert ours.file_meta.TransferSyntaxUID == RLELossless
                np.testing.assert_array_equal(dataset.pixel_array, ours.pixel_array)
            if name == "birth-date":
                assert dataset.PatientBirthDate == ""  # invalid in the source: left empty (type 2)
            if name == "spacing":
                assert "PixelSpacing" not in dataset  # a\b is no spacing
        assert sorted(classes) == RESULT_CLASSES, name
    assert node.stop() == 0
    log = node.log.read_bytes()
    assert b"Traceback" not in log
    for path in [*node.state_dir.glob("audit.db*"), node.log]:
        assert b"01.02.1970" not in path.read_bytes(), path.name


@pytest.mark.slow
def test_orthanc_with_its_default_configuration_gets_sc_seg_and_sr(node_factory, namespace, tmp_path):
    """Orthanc (1.10) cannot listen on loopback only: it runs, with the node, in a namespace. A Latin-1
    patient name reads the same in Orthanc from our UTF-8 objects; the source's invalid birth date is
    empty there. (Orthanc's defaults accept RLE Lossless: its SEG arrives as written.)"""
    orthanc = OrthancInNamespace(namespace, tmp_path, {})
    node_port = free_port()
    node = node_factory({
        "scp": {"port": node_port},
        "destinations": [{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1",
                          "port": orthanc.dicom_port}],
    })
    node.command = in_namespace(namespace, *node.command)
    node.port = node_port
    source = rg1_copy(tmp_path, "latin-1", ("PatientName", "PN", LATIN_1_NAME.encode("latin-1")),
                      AWKWARD["birth-date"])
    orthanc.start()
    try:
        node.start()
        storescu(node.port, [tmp_path / "latin-1.dcm"], *in_namespace(namespace))
        job = wait_for(lambda: finished_job(node, source.StudyInstanceUID), 300, "the job to finish")
        assert job.status is JobStatus.DONE, job.reason
        rows = wait_for(lambda: delivered(node, job.id), 120, "SC, SEG and SR to be delivered")
        classes = []
        for row in rows:
            [found] = orthanc.post("/tools/lookup", row.sop_instance_uid.encode())
            tags = orthanc.get(f"/instances/{found['ID']}/simplified-tags")
            assert tags["SOPInstanceUID"] == row.sop_instance_uid
            assert tags["StudyInstanceUID"] == source.StudyInstanceUID
            assert (tags["PatientName"], tags["PatientBirthDate"]) == (LATIN_1_NAME, "")
            classes.append(tags["SOPClassUID"])
        assert sorted(classes) == RESULT_CLASSES
        assert node.stop() == 0
    finally:
        orthanc.stop()


class PickyPeer:
    """A pynetdicom storage SCP accepting the given SOP classes in the given transfer syntaxes only;
    keeps what it received (data set and the transfer syntax it came in)."""

    def __init__(self, syntaxes: dict[str, list[str]]) -> None:
        self.port = free_port()
        self.received: dict[str, tuple[Dataset, UID]] = {}
        self._lock = threading.Lock()
        ae = AE(ae_title="PICKY")
        for sop_class, accepted in syntaxes.items():
            ae.add_supported_context(sop_class, accepted)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event: Event) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        with self._lock:
            self.received[str(dataset.SOPInstanceUID)] = (dataset, UID(event.context.transfer_syntax))
        return 0x0000

    def stop(self) -> None:
        self._server.shutdown()


@pytest.fixture
def picky(tmp_path):
    """Make a PickyPeer and a Deliverer whose one destination it is; returns a function that queues
    one job's files (``{kind: path}``) and returns their delivery ids."""
    made: list[tuple[PickyPeer, NodeDatabase, AuditTrail]] = []

    def make(syntaxes: dict[str, list[str]]) -> tuple[PickyPeer, Deliverer, Callable[..., list[int]]]:
        peer = PickyPeer(syntaxes)
        config = tmp_path / "node.yaml"
        config.write_text(yaml.safe_dump({
            "state_dir": str(tmp_path / "state"), "audit": {"secret": "s"},
            "destinations": [{"name": "picky", "ae_title": "PICKY", "host": "127.0.0.1", "port": peer.port}],
            "delivery": {"first_retry_s": 0.2, "max_failures": 3, "timeout_s": 5},
        }))
        settings = load_settings(config)
        db = NodeDatabase(settings.node_database_url)
        audit = AuditTrail.from_settings(settings)
        made.append((peer, db, audit))

        def queue(files: dict[str, Path]) -> list[int]:
            with db.session() as session:
                job = Job(study_instance_uid="1.2.3", status=JobStatus.DONE)
                session.add(job)
                session.flush()
                outputs = [(kind, str(dcmread(path, stop_before_pixels=True).SOPInstanceUID), path)
                           for kind, path in files.items()]
                return queue_deliveries(session, job_id=job.id, source_sop_uid="1.2.3.4", outputs=outputs,
                                        destinations=settings.destinations)

        return peer, Deliverer.from_settings(settings, db, audit, worker="test-worker"), queue

    yield make
    for peer, db, audit in made:
        peer.stop()
        audit.close()
        db.dispose()


def _row(deliverer: Deliverer, delivery_id: int) -> Delivery:
    with deliverer.db.session() as session:
        return session.get(Delivery, delivery_id)


def test_a_compressed_object_goes_decoded_to_a_peer_that_takes_implicit_vr_only(picky):
    """RLE Lossless offered, Implicit VR Little Endian accepted: the object arrives decoded, same UID."""
    rle = sample_file("MR_small_RLE.dcm")
    peer, deliverer, queue = picky({MRImageStorage: [ImplicitVRLittleEndian]})
    [delivery_id] = queue({"seg": rle})
    assert deliverer.run(delivery_id) is DeliveryStatus.DELIVERED
    original = dcmread(rle)
    received, syntax = peer.received[original.SOPInstanceUID]
    assert syntax == ImplicitVRLittleEndian
    np.testing.assert_array_equal(received.pixel_array, original.pixel_array)


def test_an_object_the_peer_accepts_in_no_syntax_offered_is_dead_lettered_at_once(picky):
    """The peer takes CT (Explicit VR) and MR in JPEG 2000 only: the CT is delivered, the RLE MR is
    dead-lettered after one attempt, saying why; alone, no context at all is accepted: the same."""
    peer, deliverer, queue = picky({CTImageStorage: [ExplicitVRLittleEndian], MRImageStorage: [JPEG2000Lossless]})
    ct, mr = queue({"sc": sample_file("CT_small.dcm"), "seg": sample_file("MR_small_RLE.dcm")})
    assert deliverer.run(ct) is DeliveryStatus.DELIVERED
    row = _row(deliverer, mr)
    assert (row.status, row.attempts, row.next_attempt_at) == (DeliveryStatus.DEAD, 1, None)
    assert row.last_error == ("the peer accepts no presentation context for MR Image Storage (offered in "
                              "RLE Lossless, Explicit VR Little Endian, Implicit VR Little Endian)")
    assert list(peer.received) == [str(dcmread(sample_file("CT_small.dcm")).SOPInstanceUID)]

    [alone] = queue({"seg": sample_file("MR_small_RLE.dcm")})
    assert deliverer.run(alone) is DeliveryStatus.DEAD
    assert _row(deliverer, alone).last_error == row.last_error
