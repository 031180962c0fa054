"""Destinations as sender plug-ins: kinds found by entry point, ``type`` absent meaning DIMSE,
unknown or uninstalled kinds refused at start, and delivery applying what a sender says."""

from __future__ import annotations

import sys
from datetime import timedelta
from collections.abc import Sequence
from importlib.metadata import EntryPoint, EntryPoints, entry_points

import pytest
import yaml
from click.testing import CliRunner

from dicom_node.audit import AuditTrail
from dicom_node.cli import main
from dicom_node.config import DimseDestination, Settings, load_settings
from dicom_node.db import Delivery, DeliveryStatus, Job, JobStatus, NodeDatabase, utcnow
from dicom_node.delivery import Deliverer
from dicom_node import entry_point
from dicom_node.errors import ConfigError
from dicom_node.senders import base
from dicom_node.senders.base import (
    GROUP, Disposition, SendObject, SendOutcome, installed_kinds, sender_type,
)
from dicom_node.senders.dimse import DimseSender
from tests.conftest import free_port
from tests.dicom_factory import write_cr

#: What :class:`RecordingSender` answers for each kind of object, and every call it got.
ANSWERS: dict[str, SendOutcome] = {}
CALLS: list[list[SendObject]] = []


class RecordingSender:
    """A sender of the tests: records what it is given and answers :data:`ANSWERS`."""

    def __init__(self, destination: DimseDestination, settings: Settings) -> None:
        self.remote = f"recorder:{destination.name}"

    def send(self, objects: Sequence[SendObject]) -> list[SendOutcome]:
        CALLS.append(list(objects))
        if "raise" in ANSWERS:
            raise ValueError("Doe^Jane could not be sent")  # a library's text quoting patient data
        return [ANSWERS[o.kind] for o in objects]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("DICOM_NODE_"):
            monkeypatch.delenv(key)


def senders_only(installed: EntryPoints):
    """Return an ``entry_points`` that answers ``installed`` for the senders' group, the real
    installation for any other (the pipelines)."""
    return lambda group: installed.select(group=group) if group == GROUP else entry_points(group=group)


@pytest.fixture
def recording_sender(monkeypatch):
    """Install :class:`RecordingSender` as the only sender, of the type ``dimse``."""
    installed = EntryPoints([EntryPoint("dimse", f"{__name__}:RecordingSender", GROUP)])
    monkeypatch.setattr(entry_point, "entry_points", senders_only(installed))
    ANSWERS.clear()
    CALLS.clear()
    yield
    ANSWERS.clear()
    CALLS.clear()


def config_file(tmp_path, **destination) -> str:
    """Return a configuration as written before destinations had types: no ``type`` key."""
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"),
        "audit": {"secret": "s"},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11113,
                          **destination}],
        "delivery": {"max_failures": 3, "timeout_s": 5},
    }))
    return str(path)


def test_the_dimse_sender_is_found_by_its_entry_point():
    [entry] = entry_points(group=GROUP).select(name="dimse")
    assert entry.value == "dicom_node.senders.dimse:DimseSender"
    assert "dimse" in installed_kinds()
    assert sender_type("dimse") is DimseSender


def test_a_sender_of_another_package_is_found_by_its_entry_point(tmp_path, monkeypatch):
    """A distribution on the path that declares a sender is found without the node knowing it."""
    (tmp_path / "site_sender.py").write_text(
        "class WebhookSender:\n"
        "    def __init__(self, destination, settings):\n"
        "        self.remote = 'https://results.example/hook'\n"
        "    def send(self, objects):\n"
        "        return []\n")
    info = tmp_path / "site_sender-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: site-sender\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\nwebhook = site_sender:WebhookSender\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "site_sender", raising=False)
    try:
        assert installed_kinds() >= {"dimse", "webhook"}
        assert sender_type("webhook").__name__ == "WebhookSender"
    finally:
        sys.modules.pop("site_sender", None)


def test_a_destination_without_type_is_dimse(tmp_path):
    settings = load_settings(config_file(tmp_path, calling_ae="NODE_SCU"))
    [destination] = settings.destinations
    assert isinstance(destination, DimseDestination) and destination.type == "dimse"
    assert (destination.ae_title, destination.port, destination.calling_ae) == ("PACS", 11113, "NODE_SCU")
    sender = base.build_sender(destination, settings)
    assert isinstance(sender, DimseSender) and sender.remote == "PACS@127.0.0.1:11113"
    assert (sender.calling_ae, sender.timeout_s) == ("NODE_SCU", 5)


def test_an_unknown_type_is_a_config_error_naming_it_and_the_known_kinds(tmp_path):
    with pytest.raises(ConfigError, match=r"destinations\.0: .*'stow-rs'.*expected tags: 'dimse'"):
        load_settings(config_file(tmp_path, type="stow-rs"))


@pytest.mark.timeout(60)  # were it not refused, serve would run until stopped
def test_a_type_without_an_installed_sender_is_refused_at_start(tmp_path, monkeypatch):
    monkeypatch.setattr(entry_point, "entry_points", senders_only(EntryPoints([])))
    config = config_file(tmp_path)
    with pytest.raises(ConfigError, match="destination 'pacs' is of type 'dimse', for which no "
                                          r"sender is installed \(installed: none\)"):
        load_settings(config)
    result = CliRunner().invoke(main, ["--config", config, "serve", "--port", str(free_port())])
    assert result.exit_code == 1
    assert "no sender is installed" in result.output
    assert not (tmp_path / "state").exists()  # refused before anything started
    with pytest.raises(ConfigError, match=r"no sender for destination type 'dimse' is installed"):
        sender_type("dimse")


def queue_job(settings: Settings, db: NodeDatabase, tmp_path) -> tuple[int, dict[str, SendObject]]:
    """Record a finished job with an SC, a SEG and an SR (real files) due for the destination,
    as the analysis leaves them; return the first delivery's id and the objects by kind."""
    objects = {}
    for kind in ("sc", "seg", "sr"):
        path = tmp_path / f"{kind}.dcm"
        objects[kind] = SendObject(path, str(write_cr(path).SOPInstanceUID), kind)
    [destination] = settings.destinations
    with db.session() as session:
        job = Job(study_instance_uid="1.2.3", status=JobStatus.DONE)
        session.add(job)
        session.flush()
        rows = [Delivery(job_id=job.id, source_sop_instance_uid="1.2.3.4", destination=destination.name,
                         kind=o.kind, sop_instance_uid=o.sop_instance_uid, path=str(o.path))
                for o in objects.values()]
        session.add_all(rows)
        session.flush()
        return rows[0].id, objects


def deliveries(db: NodeDatabase) -> dict[str, Delivery]:
    with db.session() as session:
        return {d.kind: d for d in session.query(Delivery)}


@pytest.fixture
def node_parts(tmp_path, recording_sender):
    settings = load_settings(config_file(tmp_path))
    db = NodeDatabase(settings.node_database_url)
    audit = AuditTrail.from_settings(settings)
    yield settings, db, Deliverer.from_settings(settings, db, audit, worker="test-worker")
    audit.close()
    db.dispose()


def test_a_registered_sender_receives_the_objects_of_a_job_and_its_outcomes_are_applied(
        tmp_path, node_parts):
    settings, db, deliverer = node_parts
    lead, objects = queue_job(settings, db, tmp_path)
    ANSWERS.update({
        "sc": SendOutcome(Disposition.DELIVERED, 0x0000),
        "seg": SendOutcome(Disposition.RETRY, None, "destination busy"),
        "sr": SendOutcome(Disposition.NOT_ACCEPTED, None, "SR not taken"),
    })
    assert deliverer.run(lead) is DeliveryStatus.DELIVERED
    assert CALLS == [list(objects.values())]  # the job's objects, in one call, paths, UIDs and kinds
    rows = deliveries(db)
    assert {kind: row.status for kind, row in rows.items()} == {
        "sc": DeliveryStatus.DELIVERED, "seg": DeliveryStatus.RETRYING, "sr": DeliveryStatus.DEAD}
    assert (rows["seg"].last_error, rows["sr"].last_error) == ("destination busy", "SR not taken")
    assert rows["seg"].next_attempt_at is not None and rows["sr"].next_attempt_at is None


def test_a_sender_that_raises_fails_its_objects_with_a_fixed_text(tmp_path, node_parts):
    settings, db, deliverer = node_parts
    lead, _ = queue_job(settings, db, tmp_path)
    ANSWERS["raise"] = SendOutcome(Disposition.GIVE_UP)
    assert deliverer.run(lead) is DeliveryStatus.RETRYING  # a failure, tried max_failures times
    for row in deliveries(db).values():
        assert row.status is DeliveryStatus.RETRYING and row.attempts == 1
        assert row.last_error == "sender failed: ValueError: message withheld"


def test_a_job_goes_together_when_its_named_delivery_is_due_and_not_before(tmp_path, node_parts):
    """A message for a delivery not yet due sends nothing, even when its siblings are due: the
    named delivery's own message sends the group later, all in one call."""
    settings, db, deliverer = node_parts
    lead, objects = queue_job(settings, db, tmp_path)
    with db.session() as session:
        session.get(Delivery, lead).next_attempt_at = utcnow() + timedelta(minutes=1)
    assert deliverer.run(lead) is None and CALLS == []
    with db.session() as session:
        session.get(Delivery, lead).next_attempt_at = utcnow()
    ANSWERS.update({kind: SendOutcome(Disposition.DELIVERED, 0x0000) for kind in objects})
    assert deliverer.run(lead) is DeliveryStatus.DELIVERED
    assert CALLS == [list(objects.values())]
