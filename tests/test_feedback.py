"""Radiologists' feedback: verdicts from the CLI and the web page, stored, audited, exported as CSV.

The node state is real (SQLite files, results folders with findings.json and an overlay SC written by
the node's own SC writer from pydicom's RG1); the page is exercised through Starlette's TestClient and,
end to end, served by ``serve`` and driven in Debian's Chromium with playwright-core
(``tests/feedback_drive.js``; playwright-core comes from npm into the ignored ``.cache/viewer/`` as for
tests/test_viewer_ohif.py).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from PIL import Image
from pydicom import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select
from starlette.testclient import TestClient

from dicom_node.audit import AuditEvent, AuditTrail
from dicom_node.audit.query import EventFilter, read_events
from dicom_node.cli import main
from dicom_node.cli.common import os_user
from dicom_node.config import Settings, TlsSettings, load_settings
from dicom_node.db import Instance, InstanceVerdict, Job, JobStatus, NodeDatabase
from dicom_node.errors import ConfigError
from dicom_node.feedback.app import AddressGate, FeedbackServer, create_app
from dicom_node.db import Feedback
from dicom_node.results import result_dir, save_findings
from dicom_node.writers.sc import build_sc
from tests.audit_fixtures import PATIENT_ID, PATIENT_NAME, make_node
from tests.conftest import NodeProcess, free_port
from tests.test_viewer_ohif import CACHE, CHROMIUM, PLAYWRIGHT_VERSION
from tests.writers_fixtures import ALGORITHM, display_of, read_source, synthetic_result

HERE = Path(__file__).resolve().parent
PASSWORD = "correct horse battery"
LOCAL = ("127.0.0.1", 50000)


@dataclass(frozen=True)
class Analysed:
    """The source and the overlay SC of one analysed RG1, flagged or not, to copy into a node's state."""

    source: Dataset
    flagged: bool
    sc: Dataset


@pytest.fixture(scope="module")
def analysed() -> list[Analysed]:
    """RG1 under a named patient, analysed twice (COVID-19 flagged, and not), with its SC each."""
    made = []
    for flagged in (True, False):
        source = read_source("RG1_UNCI.dcm")
        source.PatientName, source.PatientID = PATIENT_NAME, PATIENT_ID
        source.StudyInstanceUID, source.SOPInstanceUID = generate_uid(), generate_uid()
        result = synthetic_result(source, flagged=flagged)
        made.append(Analysed(source, flagged, build_sc(source, result, display_of(source), ALGORITHM)))
    return made


def add_job(settings: Settings, item: Analysed) -> int:
    """Put ``item`` into the node's state as a finished job (spooled source, instance and job rows,
    findings.json and sc.dcm in its results folder); return the job id."""
    source = item.source
    spooled = settings.spool_dir / source.StudyInstanceUID / source.SOPInstanceUID
    spooled.parent.mkdir(parents=True, exist_ok=True)
    source.save_as(spooled)
    folder = result_dir(settings.results_dir, source.StudyInstanceUID, source.SOPInstanceUID, "chest_xray")
    save_findings(folder, synthetic_result(source, flagged=item.flagged), "test 1.0")
    item.sc.save_as(folder / "sc.dcm", enforce_file_format=True)
    db = NodeDatabase(settings.node_database_url)
    try:
        with db.session() as session:
            job = Job(study_instance_uid=source.StudyInstanceUID, status=JobStatus.DONE,
                      finished_at=datetime.now(UTC))
            session.add(job)
            session.flush()
            session.add(Instance(sop_instance_uid=source.SOPInstanceUID, sop_class_uid=source.SOPClassUID,
                                 study_instance_uid=source.StudyInstanceUID,
                                 series_instance_uid=source.SeriesInstanceUID,
                                 transfer_syntax_uid=source.file_meta.TransferSyntaxUID, path=str(spooled),
                                 size_bytes=spooled.stat().st_size, calling_ae="PACS", job_id=job.id,
                                 verdict=InstanceVerdict.ANALYSED))
            return job.id
    finally:
        db.dispose()


def verdicts(settings: Settings) -> list[Feedback]:
    db = NodeDatabase(settings.node_database_url)
    try:
        with db.session() as session:
            return list(session.scalars(select(Feedback).order_by(Feedback.id)))
    finally:
        db.dispose()


def audited(settings: Settings, event: AuditEvent, *columns: str) -> list[tuple[object, ...]]:
    """Return ``columns`` of the audit events of kind ``event``, oldest first."""
    trail = AuditTrail.from_settings(settings)
    try:
        return [tuple(row[c] for c in columns) for row in read_events(trail, EventFilter(events=(event,)))[1]]
    finally:
        trail.close()


def cli(config: Path, *args: str, input: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["-c", str(config), *args], input=input)
    return result.exit_code, result.output


def add_user(config: Path, name: str = "dr.house") -> str:
    code, output = cli(config, "feedback", "add-user", name, input=f"{PASSWORD}\n{PASSWORD}\n")
    assert code == 0, output
    return output


def assert_no_patient(text: str) -> None:
    for identifier in (PATIENT_NAME, PATIENT_ID, PATIENT_NAME.split("^")[0]):
        assert identifier not in text


def test_cli_records_verdicts_audits_and_exports_them_as_csv(tmp_path: Path, analysed: list[Analysed]) -> None:
    node = make_node(tmp_path)
    flagged_job, quiet_job = (add_job(node.settings, item) for item in analysed)

    assert cli(node.config, "feedback", "agree", str(flagged_job), "covid19")[0] == 0
    code, output = cli(node.config, "feedback", "disagree", str(quiet_job), "pneumothorax",
                       "--reason", "pleural line missed")
    assert code == 0, output
    code, output = cli(node.config, "feedback", "agree", "999", "covid19")
    assert code != 0 and "no job 999" in output
    code, output = cli(node.config, "feedback", "agree", str(flagged_job), "fracture")
    assert code != 0 and "has a finding 'fracture'" in output

    rows = verdicts(node.settings)
    assert [(r.job_id, r.sop_instance_uid, r.finding, r.verdict.value, r.reason, r.user) for r in rows] == [
        (flagged_job, analysed[0].source.SOPInstanceUID, "covid19", "agree", None, os_user()),
        (quiet_job, analysed[1].source.SOPInstanceUID, "pneumothorax", "disagree", "pleural line missed", os_user())]
    assert audited(node.settings, AuditEvent.FEEDBACK_RECORDED, "actor", "job_id", "sop_uid", "detail") == [
        (os_user(), flagged_job, analysed[0].source.SOPInstanceUID, "covid19: agree"),
        (os_user(), quiet_job, analysed[1].source.SOPInstanceUID, "pneumothorax: disagree with a reason")]

    out = tmp_path / "feedback.csv"
    code, output = cli(node.config, "feedback", "export", "--out", str(out))
    assert code == 0 and "2 verdicts written" in output, output
    text = out.read_text()
    assert_no_patient(text)
    exported = list(csv.DictReader(io.StringIO(text)))
    assert [(r["job_id"], r["finding"], r["verdict"], r["reason"], r["user"]) for r in exported] == [
        (str(flagged_job), "covid19", "agree", "", os_user()),
        (str(quiet_job), "pneumothorax", "disagree", "pleural line missed", os_user())]
    assert audited(node.settings, AuditEvent.FEEDBACK_EXPORTED, "actor", "detail") == [
        (os_user(), "2 verdicts exported as CSV")]


def test_add_user_stores_a_scrypt_hash_only(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    output = add_user(node.config)
    users = node.settings.state_dir / "feedback-users"
    assert "added to" in output and PASSWORD not in output
    content = users.read_text()
    assert content.startswith("dr.house:scrypt$") and PASSWORD not in content
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    code, output = cli(node.config, "feedback", "add-user", "dr.short", input="short\nshort\n")
    assert code != 0 and "at least 10 characters" in output
    assert audited(node.settings, AuditEvent.FEEDBACK_USER_SET, "actor", "detail") == [
        (os_user(), "feedback user dr.house added")]


@pytest.fixture
def page(tmp_path: Path, analysed: list[Analysed]) -> Iterator[tuple[TestClient, Settings, list[int]]]:
    """A TestClient of the page (from loopback) on a node with both jobs and user dr.house."""
    node = make_node(tmp_path)
    jobs = [add_job(node.settings, item) for item in analysed]
    add_user(node.config)
    db = NodeDatabase(node.settings.node_database_url)
    try:
        with TestClient(create_app(node.settings, db, node.trail), client=LOCAL,
                        follow_redirects=False) as client:
            yield client, node.settings, jobs
    finally:
        db.dispose()


def csrf(client: TestClient, path: str = "/login") -> str:
    html = client.get(path).text
    return html.split('name=csrf value="', 1)[1].split('"', 1)[0]


def log_in(client: TestClient, password: str = PASSWORD) -> int:
    return client.post("/login", data={"user": "dr.house", "password": password, "csrf": csrf(client)}).status_code


def test_login_refused_with_a_wrong_password_allowed_with_the_right_one(
        page: tuple[TestClient, Settings, list[int]]) -> None:
    client, settings, _ = page
    assert log_in(client, "not the password") == 401
    assert client.post("/login", data={"user": "hunter2-typed-as-name", "password": PASSWORD,
                                       "csrf": csrf(client)}).status_code == 401
    assert client.get("/").headers["location"] == "/login"
    assert log_in(client) == 303
    assert client.get("/").status_code == 200
    assert audited(settings, AuditEvent.FEEDBACK_LOGIN, "outcome", "actor", "remote", "detail") == [
        ("minor-failure", "dr.house", "127.0.0.1", "feedback page login refused: wrong password"),
        ("minor-failure", None, "127.0.0.1", "feedback page login refused: unknown user"),
        ("success", "dr.house", "127.0.0.1", "feedback page login")]


def test_nothing_is_reachable_without_a_login(page: tuple[TestClient, Settings, list[int]],
                                              analysed: list[Analysed]) -> None:
    client, settings, jobs = page
    sop = analysed[0].source.SOPInstanceUID
    assert client.get("/").headers["location"] == "/login"
    assert client.get(f"/overlay/{jobs[0]}/{sop}/chest_xray.png").status_code == 401
    token = csrf(client)  # a token of an anonymous session does not make it logged in
    posted = client.post("/feedback", data={"job": jobs[0], "instance": sop, "finding": "covid19",
                                            "verdict": "agree", "csrf": token})
    assert posted.headers["location"] == "/login"
    assert verdicts(settings) == []


def test_page_lists_jobs_and_records_agree_and_disagree_with_a_reason(
        page: tuple[TestClient, Settings, list[int]], analysed: list[Analysed]) -> None:
    client, settings, (flagged_job, quiet_job) = page
    log_in(client)
    html = client.get("/").text
    assert f"Job {flagged_job} · 2004-08-26 · CR" in html and f"Job {quiet_job} · 2004-08-26 · CR" in html
    assert html.count('class="job flagged"') == 1 and "COVID-19" in html and "0.93" in html
    assert_no_patient(html)
    assert f"Job {quiet_job}" not in client.get("/?flagged=1").text
    sop = analysed[0].source.SOPInstanceUID
    overlay = client.get(f"/overlay/{flagged_job}/{sop}/chest_xray.png")
    assert overlay.headers["content-type"] == "image/png"
    assert max(Image.open(io.BytesIO(overlay.content)).size) == 1024
    assert client.get(f"/overlay/{quiet_job}/{sop}/chest_xray.png").status_code == 404  # not that job's

    token = csrf(client, "/")
    agreed = client.post("/feedback", data={"job": flagged_job, "instance": sop, "finding": "covid19",
                                            "verdict": "agree", "reason": "", "csrf": token})
    assert agreed.status_code == 303 and agreed.headers["location"] == f"/#job-{flagged_job}"
    client.post("/feedback", data={"job": quiet_job, "instance": analysed[1].source.SOPInstanceUID,
                                   "finding": "covid19", "verdict": "disagree", "reason": "ground glass, left base",
                                   "csrf": token})
    forged = client.post("/feedback", data={"job": quiet_job, "instance": analysed[1].source.SOPInstanceUID,
                                            "finding": "covid19", "verdict": "agree", "csrf": "forged"})
    assert forged.status_code == 403

    assert [(r.job_id, r.finding, r.verdict.value, r.reason, r.user) for r in verdicts(settings)] == [
        (flagged_job, "covid19", "agree", None, "dr.house"),
        (quiet_job, "covid19", "disagree", "ground glass, left base", "dr.house")]
    assert audited(settings, AuditEvent.FEEDBACK_RECORDED, "actor", "remote", "job_id", "detail") == [
        ("dr.house", "127.0.0.1", flagged_job, "covid19: agree"),
        ("dr.house", "127.0.0.1", quiet_job, "covid19: disagree with a reason")]
    html = client.get("/").text
    assert "you: agree" in html and "you: disagree</span> <q>ground glass, left base</q>" in html


def test_logins_from_an_address_stop_after_repeated_failures(page: tuple[TestClient, Settings, list[int]]) -> None:
    client, settings, _ = page
    assert [log_in(client, f"guess {n}") for n in range(5)] == [401] * 5
    assert log_in(client) == 429  # the right password too, until the window has passed
    assert len(audited(settings, AuditEvent.FEEDBACK_LOGIN, "outcome")) == 5


def test_an_address_outside_the_allowed_networks_is_refused(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    db = NodeDatabase(node.settings.node_database_url)
    try:
        with TestClient(create_app(node.settings, db, node.trail), client=("10.1.2.3", 50000)) as client:
            assert client.get("/login").status_code == 403
    finally:
        db.dispose()
    from ipaddress import ip_network
    gate = AddressGate(lambda *_: None, [ip_network("10.20.0.0/16")])  # type: ignore[arg-type, return-value]
    assert [gate.admits(h) for h in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "10.20.3.4", "10.21.0.1",
                                     "192.168.1.5", "testclient", None)] == [
        True, True, True, True, False, False, False, False]


def test_the_page_stays_on_loopback_without_tls(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="allowed_networks beyond loopback need feedback.tls"):
        load_settings(None, feedback={"enabled": True, "allowed_networks": ["10.0.0.0/8"]})
    with pytest.raises(ConfigError, match="a host other than loopback needs feedback.tls"):
        load_settings(None, feedback={"enabled": True, "host": "0.0.0.0"})
    tls = {"certificate": str(tmp_path / "c.pem"), "private_key": str(tmp_path / "k.pem")}
    assert load_settings(None, feedback={"host": "0.0.0.0", "allowed_networks": ["10.0.0.0/8"],
                                         "tls": tls}).feedback.allowed_networks
    assert not load_settings(None).feedback.enabled


def test_the_page_over_tls_sends_secure_cookies_only(tmp_path: Path, certificate: TlsSettings) -> None:
    node = make_node(tmp_path)
    port = free_port()
    settings = load_settings(node.config, feedback={
        "enabled": True, "port": port, "allowed_networks": ["10.0.0.0/8"],
        "tls": {"certificate": str(certificate.certificate), "private_key": str(certificate.private_key)}})
    db = NodeDatabase(settings.node_database_url)
    server = FeedbackServer(settings, db, node.trail)
    server.start()
    try:
        answer = requests.get(f"https://127.0.0.1:{port}/login", verify=str(certificate.certificate), timeout=10)
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/login", timeout=10)
    finally:
        server.stop()
        db.dispose()
    cookie = answer.headers["set-cookie"].lower()
    assert answer.status_code == 200 and "secure" in cookie and "samesite=strict" in cookie and "httponly" in cookie


def test_serve_stops_when_the_page_cannot_listen(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node: NodeProcess = node_factory({"worker": {"embedded": False}, "feedback": {"enabled": True, "port": port}})
        with pytest.raises(pytest.fail.Exception, match="serve exited with 1"):
            node.start()
    log = node.log.read_text()
    assert f"the feedback page cannot listen on http://127.0.0.1:{port}" in log and "SCP DICOM_NODE listening" not in log


def playwright_core() -> Path:
    """Return the node_modules folder holding playwright-core, installed with npm when missing; skip
    without Chromium, node or npm."""
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed to drive Chromium (apt-get install nodejs npm)")
    modules = CACHE / "node_modules"
    if not (modules / "playwright-core").is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["npm", "install", "--prefix", str(CACHE), f"playwright-core@{PLAYWRIGHT_VERSION}"],
                              check=False, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            pytest.skip(f"npm install playwright-core failed: {done.stderr.strip()[-300:]}")
    return modules


def test_feedback_page_served_by_serve_in_chromium(node_factory, analysed: list[Analysed],  # type: ignore[no-untyped-def]
                                                   tmp_path: Path) -> None:
    modules = playwright_core()
    port = free_port()
    node: NodeProcess = node_factory({"worker": {"embedded": False},
                                      "feedback": {"enabled": True, "port": port}})
    settings = load_settings(node.config)
    flagged_job, quiet_job = (add_job(settings, item) for item in analysed)
    add_user(node.config)
    node.start()
    shot = tmp_path / "feedback.png"
    try:
        run = subprocess.run(
            ["node", str(HERE / "feedback_drive.js"), f"http://127.0.0.1:{port}/", "dr.house", PASSWORD, str(shot),
             f"{flagged_job}:covid19", f"{quiet_job}:covid19:ground glass, left base"],
            check=False, capture_output=True, text=True, timeout=120, env={**os.environ, "NODE_PATH": str(modules)})
    finally:
        assert node.stop() == 0
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    if folder := os.environ.get("TEST_ARTEFACTS_DIR"):
        shutil.copy(shot, Path(folder) / "feedback.png")

    assert report["loginShown"] and report["wrongRefused"] == "Wrong user name or password.", report
    assert report["jobs"] == [flagged_job, quiet_job] and report["flaggedJobs"] == [flagged_job], report
    assert report["overlaysLoaded"], report
    assert (report["agreeShown"], report["disagreeShown"]) == ("you: agree", "you: disagree ground glass, left base"), report
    assert (report["pageErrors"], report["consoleErrors"], report["httpErrors"]) == ([], [], []), report
    assert [(r.job_id, r.finding, r.verdict.value, r.reason, r.user) for r in verdicts(settings)] == [
        (flagged_job, "covid19", "agree", None, "dr.house"),
        (quiet_job, "covid19", "disagree", "ground glass, left base", "dr.house")]
    assert Image.open(shot).size == (1280, 860)
