"""The hl7 destination: one ORU^R01 per study to a RIS over MLLP, the ACK deciding what happens next.

The RIS is hl7apy's MLLP server on a loopback port; every message it receives is parsed and
validated by hl7apy against HL7 2.5 (strict), and answered as each test scripts it: AA, AE,
AR, or closing without an ACK.
"""

from __future__ import annotations

import json
import ssl
import threading
from pathlib import Path

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message

from dicom_node.config import Hl7Destination, Settings
from dicom_node.db import DeliveryStatus
from dicom_node.senders.base import Disposition, SendObject
from dicom_node.senders.hl7 import Hl7Sender
from dicom_node.writers import AI_DISCLAIMER, OutputKind, write_results
from pipelines.chest_xray.plugin import FINDING_CODES
from tests.conftest import dcmtk_tool, free_port, run_tool, wait_for
from tests.dicom_factory import TEST_PATIENT_ID, write_cr, write_rg1_study
from tests.writers_fixtures import ALGORITHM, display_of, read_source, synthetic_result

STRICT = VALIDATION_LEVEL.STRICT
ACCESSION = "ACC-2026-17"
#: A name with HL7's delimiters and a non-ASCII letter: escaped on the way.
AWKWARD_NAME = "O|Brien&Sons^Zo\u00eb~Ann"


class Ris:
    """A RIS on loopback: hl7apy's MLLP server, optionally behind TLS, that validates each ORU^R01
    against HL7 2.5 and answers the next of ``answers`` (the last one again once they run out):
    an MSA-1 code, or "close" to hang up without an ACK."""

    def __init__(self, answers: list[str], tls: ssl.SSLContext | None = None) -> None:
        self.answers = answers
        self.messages: list[Message] = []
        ris = self

        class Handler(AbstractHandler):
            def reply(self) -> str:
                return ris.answer(self.incoming_message)

        class Server(MLLPServer):
            def get_request(self):
                connection, address = super().get_request()
                return (tls.wrap_socket(connection, server_side=True) if tls else connection), address

        self.server = Server("127.0.0.1", 0, {"ORU^R01^ORU_R01": (Handler,)}, timeout=10)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, er7: str) -> str:
        message = parse_message(er7, validation_level=STRICT)
        message.validate()  # raises on any violation of HL7 2.5: the sender then gets no ACK
        self.messages.append(message)
        code = self.answers[min(len(self.messages), len(self.answers)) - 1]
        if code == "close":
            raise ConnectionAbortedError("scripted: no ACK")
        ack = Message("ACK", version="2.5", validation_level=STRICT)
        ack.msh.msh_3, ack.msh.msh_5 = "RIS", message.msh.msh_3.value
        ack.msh.msh_9 = "ACK^R01^ACK"
        ack.msh.msh_10 = f"ACK{len(self.messages)}"
        ack.msh.msh_11, ack.msh.msh_12 = "P", "2.5"
        ack.msa.msa_1, ack.msa.msa_2 = code, message.msh.msh_10.value
        return ack.to_mllp()

    def __enter__(self) -> Ris:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def sender_to(port: int, **settings: object) -> Hl7Sender:
    destination = Hl7Destination(name="ris", type="hl7", host="127.0.0.1", port=port, ack_timeout_s=5,
                                 sending_facility="RADIOLOGY", receiving_application="RIS", **settings)
    return Hl7Sender(destination, Settings(_env_file=None))


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, SendObject]:
    """SRs written by the node's writers for RG1 with synthetic results: "flagged" (COVID-19 flagged,
    an experimental pneumothorax head) and "clear" (nothing flagged), the patient named awkwardly."""
    folder = tmp_path_factory.mktemp("sr")
    objects = {}
    for label, flagged in (("flagged", True), ("clear", False)):
        source = read_source("RG1_UNCI.dcm")
        source.AccessionNumber, source.PatientName = ACCESSION, AWKWARD_NAME
        sr = write_results(source, synthetic_result(source, flagged), display_of(source), ALGORITHM)[OutputKind.SR]
        sr.save_as(folder / f"{label}.dcm")
        objects[label] = SendObject(folder / f"{label}.dcm", sr.SOPInstanceUID, "sr")
    return objects


def observations(message: Message) -> list[tuple[str, str, str, str, str]]:
    """Return (code, system, score, reference range, abnormal flag) of each OBX."""
    order = message.oru_r01_patient_result.oru_r01_order_observation
    return [(o.obx.obx_3.ce_1.value, o.obx.obx_3.ce_3.value, o.obx.obx_5.value, o.obx.obx_7.value,
             o.obx.obx_8.value) for o in order.oru_r01_observation]


def priority(message: Message) -> tuple[str, str, str]:
    """Return the priority as ORC-7.6, OBR-27.6 and TQ1-9 carry it."""
    order = message.oru_r01_patient_result.oru_r01_order_observation
    return (order.orc.orc_7.tq_6.value, order.obr.obr_27.tq_6.value,
            order.oru_r01_timing_qty.tq1.tq1_9.cwe_1.value)


def test_a_flagged_study_is_one_valid_oru_sorted_first(reports):
    with Ris(["AA"]) as ris:
        [outcome] = sender_to(ris.port).send([reports["flagged"]])
    assert (outcome.disposition, outcome.detail) == (Disposition.DELIVERED, "ACK AA: accepted")
    [message] = ris.messages
    assert message.msh.msh_9.to_er7() == "ORU^R01^ORU_R01" and message.msh.msh_12.to_er7() == "2.5"
    assert message.msh.msh_4.to_er7() == "RADIOLOGY" and message.msh.msh_5.to_er7() == "RIS"
    pid = message.oru_r01_patient_result.oru_r01_patient.pid
    assert pid.pid_3.cx_1.value == "9RG1"
    assert pid.pid_5.to_er7() == "O\\F\\Brien\\T\\Sons^Zo\u00eb\\R\\Ann"  # | & ~ escaped
    order = message.oru_r01_patient_result.oru_r01_order_observation
    assert order.orc.orc_2.ei_1.value == order.obr.obr_3.ei_1.value == ACCESSION
    assert order.obr.obr_4.to_er7() == "399208008^Plain chest X-ray^SCT"
    assert order.obr.obr_25.value == "F"
    assert [n.nte_3.value for n in order.nte] == [AI_DISCLAIMER]
    assert observations(message) == [("840539006", "SCT", "0.9300", "<0.5", "A"),
                                     ("36118008", "SCT", "0.1200", "<0.5", "")]
    assert order.oru_r01_observation[1].nte.nte_3.value.startswith("Experimental model")
    assert priority(message) == ("S", "S", "S")


def test_a_study_with_nothing_flagged_is_routine(reports):
    with Ris(["AA"]) as ris:
        [outcome] = sender_to(ris.port).send([reports["clear"]])
    assert outcome.disposition is Disposition.DELIVERED
    [message] = ris.messages
    assert [flag for *_, flag in observations(message)] == ["", ""]
    assert observations(message)[0][:3] == ("840539006", "SCT", "0.2100")
    assert priority(message) == ("R", "R", "R")


def test_ae_is_retried_and_the_retry_carries_the_same_control_id(reports):
    with Ris(["AE", "AA"]) as ris:
        sender = sender_to(ris.port)
        first, second = sender.send([reports["flagged"]]), sender.send([reports["flagged"]])
    assert [(o.disposition, o.detail) for o in first + second] == [
        (Disposition.RETRY, "ACK AE: application error"), (Disposition.DELIVERED, "ACK AA: accepted")]
    assert len({m.msh.msh_10.value for m in ris.messages}) == 1


def test_ar_is_given_up(reports):
    with Ris(["AR"]) as ris:
        [outcome] = sender_to(ris.port).send([reports["flagged"]])
    assert (outcome.disposition, outcome.detail) == (Disposition.GIVE_UP, "ACK AR: rejected")


def test_no_ack_or_no_ris_is_retried(reports):
    with Ris(["close"]) as ris:
        [closed] = sender_to(ris.port).send([reports["flagged"]])
    assert len(ris.messages) == 1
    assert (closed.disposition, closed.detail) == (Disposition.RETRY, "connection closed without ACK")
    [refused] = sender_to(free_port()).send([reports["flagged"]])
    assert (refused.disposition, refused.detail) == (Disposition.RETRY, "connection refused")


def test_what_is_not_our_sr_is_given_up_alone(reports, tmp_path):
    write_cr(tmp_path / "cr.dcm")
    with Ris(["AA"]) as ris:
        outcomes = sender_to(ris.port).send([SendObject(tmp_path / "cr.dcm", "1.2.3", "sr"),
                                             reports["clear"]])
    assert [(o.disposition, o.detail) for o in outcomes] == [
        (Disposition.GIVE_UP, "not a structured report of the node"),
        (Disposition.DELIVERED, "ACK AA: accepted")]
    assert len(ris.messages) == 1


def test_tls_verifies_the_ris(reports, certificate):
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(certificate.certificate, certificate.private_key)
    with Ris(["AA"], tls=server) as ris:
        [trusted] = sender_to(ris.port, tls=True, ca_certificates=certificate.certificate).send(
            [reports["flagged"]])
        [untrusted] = sender_to(ris.port, tls=True).send([reports["flagged"]])
    assert trusted.disposition is Disposition.DELIVERED
    assert (untrusted.disposition, untrusted.detail) == (Disposition.RETRY,
                                                         "TLS failed (certificate or handshake)")
    assert len(ris.messages) == 1


def test_settings_of_an_hl7_destination():
    with pytest.raises(ValueError, match="sr"):
        Hl7Destination(name="ris", type="hl7", host="ris", port=2575, outputs=["sc"])
    with pytest.raises(ValueError, match="tls"):
        Hl7Destination(name="ris", type="hl7", host="ris", port=2575, ca_certificates="/ca.crt")
    with pytest.raises(ValueError, match="pattern"):
        Hl7Destination(name="ris", type="hl7", host="ris", port=2575, sending_facility="A|B")


@pytest.mark.slow
def test_serve_sends_one_oru_per_analysed_study(node_factory, tmp_path):
    write_rg1_study(tmp_path / "rg1.dcm", AccessionNumber=ACCESSION, PatientID=TEST_PATIENT_ID)
    with Ris(["AA"]) as ris:
        node = node_factory({"destinations": [
            {"name": "ris", "type": "hl7", "host": "127.0.0.1", "port": ris.port}]}).start()
        sent = run_tool(dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "DICOM_NODE",
                        "127.0.0.1", str(node.port), str(tmp_path / "rg1.dcm"))
        assert sent.returncode == 0, sent.stderr
        [delivery] = wait_for(lambda: [d for d in node.deliveries() if d.status is DeliveryStatus.DELIVERED],
                              300, "the SR to reach the RIS")
        assert node.stop() == 0
    assert delivery.kind == "sr" and len(node.deliveries()) == 1
    [message] = ris.messages
    patient = message.oru_r01_patient_result.oru_r01_patient.pid
    assert patient.pid_3.cx_1.value == TEST_PATIENT_ID
    order = message.oru_r01_patient_result.oru_r01_order_observation
    assert order.obr.obr_2.ei_1.value == ACCESSION
    findings = json.loads((Path(delivery.path).parent / "findings.json").read_text())["findings"]
    assert observations(message) == [
        (FINDING_CODES[f["name"]].value, "SCT", f"{f['probability']:.4f}", f"<{f['threshold']:g}",
         "A" if f["flagged"] else "") for f in findings]
    assert priority(message) == (("S",) * 3 if any(f["flagged"] for f in findings) else ("R",) * 3)
    for path in [*node.state_dir.glob("audit.db*"), node.log]:
        assert TEST_PATIENT_ID.encode() not in path.read_bytes(), path.name
