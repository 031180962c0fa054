"""The ``fhir`` destination: our SRs as a FHIR R4 transaction (DiagnosticReport + Observations)
POSTed to a FHIR server on loopback; every Bundle validated with fhir.resources; HTTP outcomes
retried or dead-lettered as delivery's rules say, end to end through ``serve``."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle
from pydicom import Dataset
from pydicom.sr.coding import Code

from dicom_node.config import FhirDestination, Settings
from dicom_node.db import DeliveryStatus
from dicom_node.senders.base import Disposition, SendObject, build_sender
from dicom_node.senders.fhir import FhirSender
from dicom_node.senders.fhir_report import coding
from dicom_node.writers import OutputKind, write_results
from tests.conftest import dcmtk_tool, free_port, run_tool, sample_file, wait_for
from tests.http_receiver import HttpReceiver, transaction_response
from tests.writers_fixtures import ALGORITHM, display_of, read_source, synthetic_result

SNOMED = "http://snomed.info/sct"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
#: The chest pipeline's codes without pneumothorax's: it is coded in the node's local scheme.
LOCALLY_CODED = dataclasses.replace(ALGORITHM, output=dataclasses.replace(
    ALGORITHM.output, finding_codes={"covid19": Code("840539006", "SCT", "COVID-19")}))


@pytest.fixture
def fhir_server():
    server = HttpReceiver(answer=transaction_response).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sr_file(tmp_path_factory) -> tuple[Path, Dataset]:
    source = read_source("RG1_UNCI.dcm")
    sr = write_results(source, synthetic_result(source), display_of(source), LOCALLY_CODED)[OutputKind.SR]
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path, source


def sender_to(url: str, tmp_path: Path, **destination: object) -> FhirSender:
    risks = ["tls-unverified"] if destination.get("insecure_skip_tls_verify") else []
    settings = Settings(state_dir=tmp_path / "state", audit={"secret": "s"}, delivery={"timeout_s": 5},
                        destinations=[{"name": "ris", "type": "fhir", "base_url": url, **destination}],
                        acknowledged_risks=risks)
    sender = build_sender(settings.destinations[0], settings)
    assert isinstance(sender, FhirSender)
    return sender


def observations(bundle: dict) -> dict[str, dict]:
    return {e["resource"]["code"]["coding"][0]["code"]: e["resource"] for e in bundle["entry"]
            if e["resource"]["resourceType"] == "Observation"}


def test_an_sr_becomes_a_valid_transaction_with_its_findings(fhir_server, sr_file, tmp_path, caplog):
    path, source = sr_file
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    sender = sender_to(fhir_server.url + "/r4/", tmp_path, auth={"type": "bearer", "token_file": str(token)})
    caplog.set_level(logging.DEBUG)
    [outcome] = sender.send([SendObject(path, "1.2.3", "sr")])
    assert outcome.disposition is Disposition.DELIVERED, outcome
    [request] = fhir_server.received
    assert request.path == "/r4"
    assert request.headers["Content-Type"] == "application/fhir+json"
    assert request.headers["Authorization"] == "Bearer s3cret-token"
    bundle = request.json()
    Bundle.model_validate(bundle)  # FHIR R4 (R4B models: the same DiagnosticReport and Observation)
    assert bundle["type"] == "transaction"
    assert all(e["request"]["method"] == "PUT" and "?identifier=urn%3Adicom%3Auid%7Curn%3Aoid%3A"
               in e["request"]["url"] for e in bundle["entry"])

    report = bundle["entry"][0]["resource"]
    assert report["resourceType"] == "DiagnosticReport" and report["status"] == "final"
    assert report["code"]["coding"] == [{"system": SNOMED, "code": "399208008", "display": "Plain chest X-ray"}]
    assert report["subject"]["identifier"]["value"] == source.PatientID
    assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{source.StudyInstanceUID}"
    assert report["conclusion"] == "AI result, not for diagnosis. Flagged: COVID-19 0.93 (threshold 0.5)."
    assert [r["reference"] for r in report["result"]] == [e["fullUrl"] for e in bundle["entry"][1:]]

    covid, pneumothorax = observations(bundle)["840539006"], observations(bundle)["pneumothorax"]
    assert covid["code"]["coding"][0]["system"] == SNOMED
    assert covid["valueQuantity"]["value"] == 0.93
    assert covid["interpretation"][0]["coding"][0]["code"] == "A"
    assert covid["referenceRange"][0]["high"]["value"] == 0.5
    assert pneumothorax["code"]["coding"][0]["system"] == "urn:dicom-node:scheme:99DCMNODE"
    assert pneumothorax["valueQuantity"]["value"] == 0.12
    assert "interpretation" not in pneumothorax and "Experimental" in pneumothorax["note"][0]["text"]
    assert coding(_code_item("122157", "DCM", "Probability"))["system"] == DCM

    # Sent again, the same resources under the same keys: the server replaces, never duplicates.
    sender.send([SendObject(path, "1.2.3", "sr")])
    assert fhir_server.received[1].json() == bundle
    assert source.PatientID not in caplog.text and "s3cret" not in caplog.text


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


@pytest.mark.parametrize(("status", "disposition"), [
    (500, Disposition.RETRY), (503, Disposition.RETRY), (429, Disposition.RETRY),
    (400, Disposition.GIVE_UP), (401, Disposition.GIVE_UP), (422, Disposition.GIVE_UP),
    (302, Disposition.GIVE_UP),
])
def test_http_answers_are_classified(fhir_server, sr_file, tmp_path, status, disposition):
    fhir_server.statuses = [status]
    [outcome] = sender_to(fhir_server.url, tmp_path).send([SendObject(sr_file[0], "1.2.3", "sr")])
    assert (outcome.disposition, outcome.status) == (disposition, status)
    assert str(status) in outcome.detail


def test_no_answer_is_retried_and_a_failed_entry_given_up(fhir_server, sr_file, tmp_path):
    [unreachable] = sender_to(f"http://127.0.0.1:{free_port()}", tmp_path).send(
        [SendObject(sr_file[0], "1.2.3", "sr")])
    assert unreachable.disposition is Disposition.RETRY and unreachable.status is None
    fhir_server.answer = lambda bundle: {**transaction_response(bundle), "entry": [
        {"response": {"status": "201 Created"}}, {"response": {"status": "412 Precondition Failed"}}]}
    [refused] = sender_to(fhir_server.url, tmp_path).send([SendObject(sr_file[0], "1.2.3", "sr")])
    assert refused.disposition is Disposition.GIVE_UP and "transaction-response" in refused.detail


def test_basic_auth_is_sent(fhir_server, sr_file, tmp_path):
    password = tmp_path / "fhir.password"
    password.write_text("fhir-Pa55\n")
    sender = sender_to(fhir_server.url, tmp_path,
                       auth={"type": "basic", "username": "node", "password_file": str(password)})
    [outcome] = sender.send([SendObject(sr_file[0], "1.2.3", "sr")])
    assert outcome.disposition is Disposition.DELIVERED
    assert fhir_server.received[0].headers["Authorization"] == "Basic bm9kZTpmaGlyLVBhNTU="  # node:fhir-Pa55


def test_the_server_certificate_is_verified_unless_told_not_to(certificate, sr_file, tmp_path, caplog):
    server = HttpReceiver(answer=transaction_response,
                          tls=(certificate.certificate, certificate.private_key)).start()
    try:
        objects = [SendObject(sr_file[0], "1.2.3", "sr")]
        [unverified] = sender_to(server.url, tmp_path).send(objects)
        assert (unverified.disposition, unverified.detail) == (
            Disposition.GIVE_UP, "TLS failed: certificate not trusted or no common protocol")
        assert server.received == []
        [verified] = sender_to(server.url, tmp_path, ca_certificates=str(certificate.certificate)).send(objects)
        assert verified.disposition is Disposition.DELIVERED
        [unchecked] = sender_to(server.url, tmp_path, insecure_skip_tls_verify=True).send(objects)
        assert unchecked.disposition is Disposition.DELIVERED
        assert "destination ris: the server's TLS certificate is NOT checked" in caplog.text
        assert len(server.received) == 2
    finally:
        server.stop()


def test_only_srs_are_sent_and_secrets_are_hidden(tmp_path):
    with pytest.raises(ValueError, match="outputs"):
        FhirDestination(name="ris", base_url="https://fhir.example/r4", outputs=["sc"])
    with pytest.raises(ValueError, match="give either token or token_file"):
        FhirDestination(name="ris", base_url="https://fhir.example/r4",
                        auth={"type": "bearer", "token": "a", "token_file": "b"})
    with pytest.raises(ValueError, match="credentials go in auth"):
        FhirDestination(name="ris", base_url="https://u:pw@fhir.example/r4")
    settings = Settings(state_dir=tmp_path, audit={"secret": "s"}, destinations=[
        {"name": "ris", "type": "fhir", "base_url": "https://fhir.example/r4?token=t",
         "auth": {"type": "bearer", "token": "t"}}])
    redacted = settings.redacted()["destinations"][0]
    assert (redacted["auth"]["token"], redacted["base_url"]) == ("***", "https://fhir.example/r4?token=***")


@pytest.mark.slow
def test_serve_sends_the_report_retries_a_500_and_dead_letters_a_400(node_factory, fhir_server):
    """RG1 through DCMTK storescu and `serve`: its SR goes to a FHIR server that first answers 500
    (retried, then delivered) and to one that answers 400 (dead-lettered at once, which the
    webhook hears of after a 503)."""
    refusing, webhook = HttpReceiver(status=400).start(), HttpReceiver().start()
    try:
        fhir_server.statuses, webhook.statuses = [500], [503]
        node = node_factory({"delivery": {"first_retry_s": 1, "max_failures": 1}, "destinations": [
            {"name": "ris", "type": "fhir", "base_url": fhir_server.url},
            {"name": "refusing", "type": "fhir", "base_url": refusing.url}],
            "notifications": {"webhook": {"url": webhook.url + "/hook", "events": ["delivery-dead-lettered"]}}})
        node.start()
        sent = run_tool(dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1",
                        str(node.port), str(sample_file("RG1_UNCI.dcm")))
        assert sent.returncode == 0, sent.stderr
        finished = lambda: (rows := node.deliveries()) and len(rows) == 2 and all(  # noqa: E731
            d.status.finished for d in rows) and rows
        rows = {d.destination: d for d in wait_for(finished, 300, "both deliveries to finish")}
        assert rows["ris"].status is DeliveryStatus.DELIVERED and rows["ris"].attempts == 2
        assert rows["refusing"].status is DeliveryStatus.DEAD and rows["refusing"].attempts == 1
        assert rows["refusing"].last_error == "HTTP 400: request refused"
        assert len(fhir_server.received) == 2 and len(refusing.received) == 1
        bundle = fhir_server.received[-1].json()
        Bundle.model_validate(bundle)
        assert fhir_server.received[0].json() == bundle
        assert {o["valueQuantity"]["value"] >= 0 for o in observations(bundle).values()} == {True}

        wait_for(lambda: len(webhook.received) == 2, 30, "the webhook's retry after its 503")
        first, second = (r.json() for r in webhook.received)
        assert first == second
        assert (second["event"], second["destination"], second["kind"], second["reason"]) == (
            "delivery-dead-lettered", "refusing", "sr", "HTTP 400: request refused")
        assert second["job_id"] == rows["refusing"].job_id
        assert node.stop() == 0
        for secret in (b"CompressedSamples", b"9RG1"):
            assert secret not in node.log.read_bytes()
            assert all(secret not in r.body for r in webhook.received)
    finally:
        refusing.stop()
        webhook.stop()
