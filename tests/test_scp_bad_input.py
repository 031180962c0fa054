"""Bad input gets the right DICOM status, leaves nothing half-written, and the SCP keeps serving."""

from __future__ import annotations

import itertools
import shutil
import sqlite3
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from pynetdicom import AE, _config, evt
from pynetdicom.events import Event
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import select

from dicom_node.db import Instance
from dicom_node.scp import StorageSCP
from tests.conftest import dataset_bytes, dcmtk_tool, store_as_is, wait_for
from tests.dicom_factory import write_cr

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")


@pytest.fixture(autouse=True)
def send_files_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the test SCU put a file on the wire without decoding (and repairing) it."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    monkeypatch.setattr(_config, "ENFORCE_UID_CONFORMANCE", False)


def store(scp: StorageSCP, path: Path) -> int:
    return store_as_is(scp.port, path)


def still_serving(scp: StorageSCP) -> bool:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="DICOM_NODE")
    try:
        return assoc.is_established and int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()


def nothing_kept(scp: StorageSCP) -> bool:
    leftovers = [p for p in scp.spool.root.rglob("*") if p.is_file()]
    with scp.db.session() as session:
        rows = session.scalars(select(Instance)).all()
    return leftovers == [] and rows == []


def test_a_good_instance_is_stored(start_scp, tmp_path):
    scp = start_scp()
    write_cr(tmp_path / "ok.dcm")
    assert store(scp, tmp_path / "ok.dcm") == 0x0000
    assert not nothing_kept(scp)


def test_truncated_data_set(start_scp, tmp_path):
    scp = start_scp()
    path = tmp_path / "truncated.dcm"
    write_cr(path)
    path.write_bytes(path.read_bytes()[:-3000])
    assert store(scp, path) == 0xC210
    assert nothing_kept(scp)
    assert still_serving(scp)


@pytest.mark.parametrize("into_header", [2, 6, 10])
def test_data_set_cut_inside_the_pixel_data_header(start_scp, tmp_path, into_header):
    """Cut 2, 6 or 10 bytes into the (7FE0,0010) element header: no complete element is missing."""
    scp = start_scp()
    path = tmp_path / "cut.dcm"
    write_cr(path)
    data = path.read_bytes()
    path.write_bytes(data[: data.rfind(b"\xe0\x7f\x10\x00") + into_header])
    assert store(scp, path) == 0xC210
    assert nothing_kept(scp)
    assert still_serving(scp)


def test_missing_sop_instance_uid(start_scp, tmp_path):
    scp = start_scp()
    path = tmp_path / "no-uid.dcm"
    ds = write_cr(path)
    del ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=False)
    assert store(scp, path) == 0xC210
    assert nothing_kept(scp)
    assert still_serving(scp)


@pytest.mark.parametrize("attribute", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
@pytest.mark.parametrize("bad_uid", ["1.2.3/../../../escaped", "1.2.abc", "1.2.03"])
def test_uid_that_is_not_a_uid(start_scp, tmp_path, attribute, bad_uid):
    scp = start_scp()
    path = tmp_path / "bad-uid.dcm"
    ds = write_cr(path)
    setattr(ds, attribute, bad_uid)
    if attribute == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = bad_uid
    ds.save_as(path, enforce_file_format=False)
    assert store(scp, path) == 0xC210
    assert nothing_kept(scp)
    assert not list(tmp_path.glob("**/escaped*"))
    assert still_serving(scp)


def test_sop_class_differs_from_request(start_scp, tmp_path):
    scp = start_scp()
    path = tmp_path / "mismatch.dcm"
    ds = write_cr(path)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture, sent as CR
    ds.save_as(path, enforce_file_format=False)
    assert store(scp, path) == 0xA900
    assert nothing_kept(scp)


def test_data_set_over_the_size_limit(start_scp, tmp_path):
    scp = start_scp(max_dataset_mb=0.01)
    path = tmp_path / "large.dcm"
    write_cr(path, size=128)  # 32 KiB of pixels
    assert store(scp, path) == 0xA700
    assert nothing_kept(scp)
    assert still_serving(scp)


def test_free_disk_below_the_limit(start_scp, tmp_path):
    scp = start_scp(min_free_disk_mb=2**40)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    refused = ae.associate("127.0.0.1", scp.port, ae_title="DICOM_NODE")
    assert refused.is_rejected
    assert (refused.acceptor.primitive.result, refused.acceptor.primitive.diagnostic) == (0x02, 0x02)  # transient
    audit_db = scp.spool.root.parent / "audit.db"
    events = wait_for(lambda: list(sqlite3.connect(audit_db).execute("SELECT event, detail FROM audit_events")),
                      10, "the rejection to be audited")
    assert events == [("association-rejected", "the spool's disk is below its free-space minimum")]
    # During an association, a store is answered 0xA700 (here: the disk fell below the minimum).
    scp.spool.min_free_bytes = 0
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="DICOM_NODE")
    assert assoc.is_established
    scp.spool.min_free_bytes = 2**60
    write_cr(tmp_path / "any.dcm")
    assert int(assoc.send_c_store(tmp_path / "any.dcm").Status) == 0xA700
    assoc.release()
    assert nothing_kept(scp)
    scp.spool.min_free_bytes = 0
    assert still_serving(scp)


def _incoming(scp: StorageSCP) -> list[Path]:
    return [p for p in scp.spool.incoming.iterdir() if p.is_file()]


def _abort_after(pdus: int) -> Callable[[Event], None]:
    """An EVT_PDU_SENT handler that sends an A-ABORT right after the ``pdus``-th PDU and closes
    the connection. ``Association.abort()`` would queue the A-ABORT behind every fragment already
    encoded, so the whole data set could arrive before it."""
    sent = itertools.count(1)
    abort = A_ABORT_RQ()
    abort.source, abort.reason_diagnostic = 0x00, 0x00  # by the service user, no reason given

    def handler(event: Event) -> None:
        if next(sent) == pdus:
            event.assoc.dul.socket.send(abort.encode())
            event.assoc.dul.socket.close()

    return handler


def test_an_aborted_transfer_leaves_no_partial_file(start_scp, tmp_path):
    scp = start_scp(max_pdu_bytes=16384)
    path = tmp_path / "large.dcm"
    write_cr(path, size=2500)  # 12 MB: hundreds of PDUs
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    ae.maximum_pdu_size = 16384
    # PDU 1 is the A-ASSOCIATE-RQ, 2 the C-STORE command: abort inside the data set.
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="DICOM_NODE",
                         evt_handlers=[(evt.EVT_PDU_SENT, _abort_after(20))])
    assert assoc.is_established
    try:
        assoc.send_c_store(path)
    except Exception:  # the abort cuts it short: that is the point
        pass
    wait_for(lambda: not _incoming(scp), 30, "the partial file to be removed")
    assert nothing_kept(scp)
    assert still_serving(scp)


def test_a_killed_sender_leaves_no_partial_file(start_scp, tmp_path):
    scp = start_scp(max_pdu_bytes=16384)
    path = tmp_path / "large.dcm"
    write_cr(path, size=2500)
    sender = subprocess.Popen([dcmtk_tool("storescu"), "-aet", "TESTSCU", "-aec", "DICOM_NODE", "--max-pdu", "16384",
                               "127.0.0.1", str(scp.port), str(path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _incoming(scp), 30, "the data set to start arriving", interval=0.01)
    finally:
        sender.kill()
        sender.wait()
    wait_for(lambda: not _incoming(scp), 30, "the partial file to be removed")
    assert still_serving(scp)


def test_one_sop_instance_uid_in_a_second_study_is_refused(start_scp, tmp_path):
    scp = start_scp()
    first = write_cr(tmp_path / "first.dcm")
    write_cr(tmp_path / "second.dcm", sop_uid=first.SOPInstanceUID, seed=1)  # another study, another image
    assert store(scp, tmp_path / "first.dcm") == 0x0000
    assert store(scp, tmp_path / "second.dcm") == 0x0111
    with scp.db.session() as session:
        [row] = session.scalars(select(Instance)).all()
    assert row.study_instance_uid == first.StudyInstanceUID
    assert [p.parent.parent.name for p in scp.spool.root.rglob("*.dcm")] == [first.StudyInstanceUID]
    assert store(scp, tmp_path / "first.dcm") == 0x0000  # the same instance again is welcome
    assert still_serving(scp)


def test_a_locked_state_database_leaves_no_spooled_file_without_its_row(start_scp, tmp_path):
    scp = start_scp(db_busy_timeout_s=1)
    write_cr(tmp_path / "ok.dcm")
    locker = sqlite3.connect(scp.db.url.removeprefix("sqlite:///"))
    try:
        locker.execute("BEGIN EXCLUSIVE")
        assert store(scp, tmp_path / "ok.dcm") == 0xA700
        assert not [p for p in scp.spool.root.rglob("*.dcm")]
    finally:
        locker.rollback()
        locker.close()
    assert store(scp, tmp_path / "ok.dcm") == 0x0000
    assert not nothing_kept(scp)


@pytest.fixture
def small_state_disk(tmp_path, mount_tmpfs):
    """A 60 MiB tmpfs where start_scp keeps its state (set up first: unmounted after the SCP stops)."""
    return mount_tmpfs(tmp_path / "state", "60m")


def test_a_data_set_larger_than_the_free_disk_is_answered_a700_and_the_node_keeps_auditing(
        small_state_disk, start_scp, tmp_path):
    scp = start_scp(min_free_disk_mb=10)
    large = tmp_path / "large.dcm"
    write_cr(large, size=7200)  # 99 MiB into a 60 MiB disk
    assert store(scp, large) == 0xA700
    assert not _incoming(scp) and nothing_kept(scp)
    assert shutil.disk_usage(small_state_disk).free > 40 * 2**20  # what arrived was not kept
    write_cr(tmp_path / "small.dcm")
    assert store(scp, tmp_path / "small.dcm") == 0x0000
    events = [row[0] for row in sqlite3.connect(small_state_disk / "audit.db").execute(
        "SELECT event FROM audit_events ORDER BY id")]
    assert events.count("instance-rejected") == 1 and events[-1] == "instance-received"


def test_an_association_that_cannot_be_audited_is_refused(small_state_disk, start_scp, tmp_path):
    scp = start_scp(min_free_disk_mb=0)
    assert still_serving(scp)
    filler = small_state_disk / "filler"
    with filler.open("wb") as stream:  # fill the disk the audit trail is on
        try:
            while True:
                stream.write(b"\0" * 2**20)
                stream.flush()
        except OSError:
            pass
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        refused = ae.associate("127.0.0.1", scp.port, ae_title="DICOM_NODE")
        assert refused.is_rejected and refused.acceptor.primitive.diagnostic == 0x02
    finally:
        filler.unlink()
    assert still_serving(scp)  # audited again once there is room


def _element(tag: int, value: bytes) -> bytes:
    """One implicit-VR little-endian element, as a command set is encoded."""
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _raw_c_store_request(context_id: int, sop_class: str, sop_instance: str, dataset: bytes) -> bytes:
    """One P-DATA-TF PDU holding a C-STORE-RQ command and its data set, encoded by hand: no
    encoder in a library would write a UID over 64 characters."""
    elements = (_element(0x00000002, sop_class.encode()) + _element(0x00000100, struct.pack("<H", 0x0001))
                + _element(0x00000110, struct.pack("<H", 1)) + _element(0x00000700, struct.pack("<H", 0))
                + _element(0x00000800, struct.pack("<H", 0x0001)) + _element(0x00001000, sop_instance.encode()))
    command = _element(0x00000000, struct.pack("<I", len(elements))) + elements
    pdvs = b"".join(struct.pack(">IBB", len(body) + 2, context_id, header) + body
                    for header, body in ((0x03, command), (0x02, dataset)))
    return struct.pack(">BBI", 0x04, 0, len(pdvs)) + pdvs


@pytest.mark.filterwarnings("ignore:The value length")
def test_a_request_with_a_65_character_sop_uid_is_aborted_audited_and_leaves_nothing(start_scp, tmp_path):
    scp = start_scp()
    path = tmp_path / "long-uid.dcm"
    sop_uid = "1." + "2" * 63  # 65 characters
    write_cr(path, sop_uid=sop_uid)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="DICOM_NODE")
    assert assoc.is_established
    context = assoc.accepted_contexts[0].context_id
    assoc.dul.socket.socket.sendall(_raw_c_store_request(
        context, ComputedRadiographyImageStorage, sop_uid, dataset_bytes(path)))
    wait_for(lambda: assoc.is_aborted or not assoc.is_alive(), 30, "the node to abort the association")
    with scp.audit.connect() as connection:
        rejected = wait_for(lambda: connection.exec_driver_sql(
            "SELECT actor, detail FROM audit_events WHERE event = 'instance-rejected'").all(), 10,
            "the request to be audited")
    [(actor, detail)] = rejected
    assert actor == "TESTSCU" and detail.startswith("invalid C-STORE-RQ, association aborted"), detail
    wait_for(lambda: not _incoming(scp), 10, "no partial file left")
    assert nothing_kept(scp)
    assert still_serving(scp)
