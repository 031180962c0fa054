"""Least exposure: secrets redacted where settings are shown, a private state folder whichever
command makes it, erasure that leaves no row or file naming the subject's images, and patient
IDs that never travel on the command line."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydicom import dcmread
from sqlalchemy import or_

from dicom_node.cli import main
from dicom_node.db import DeliveryStatus, Instance, JobStatus, OutboxMessage
from tests.conftest import dcmtk_tool, free_port, run_tool, sample_file, wait_for

SECRETS = ("S3cretRedis", "ssw0rd", "Qu3ryPass", "R3sultTok")
OPEN_UMASK = 0o022


def dicom_node(config: Path, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``dicom-node -c CONFIG ARGS`` as an administrator would, under a permissive umask."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    return subprocess.run([sys.executable, "-m", "dicom_node", "-c", str(config), *args],
                          input=input, capture_output=True, text=True, timeout=120, env=env,
                          umask=OPEN_UMASK)


def modes(folder: Path) -> dict[str, int]:
    """Return the permission bits of ``folder`` and of everything under it, by relative path."""
    found = {".": stat.S_IMODE(folder.stat().st_mode)}
    for path in folder.rglob("*"):
        found[str(path.relative_to(folder))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def assert_private(folder: Path) -> None:
    found = modes(folder)
    assert len(found) > 1, found
    for name, mode in found.items():
        expected = 0o700 if (folder / name).is_dir() else 0o600
        assert mode == expected, f"{name} is {mode:04o}, not {expected:04o}: {found}"


def test_config_check_shows_no_secret_of_any_url(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"),
        "database_url": "postgresql://node:p@ssw0rd@db.example/node",
        "broker": {"url": "redis://:S3cretRedis@h:6379/0",
                   "result_backend": "db+postgresql://u@h/results?sslmode=require&token=R3sultTok"},
        "audit": {"secret": "audit-key-material",
                  "database_url": "postgresql://audit@h/audit?password=Qu3ryPass"},
    }))
    result = CliRunner().invoke(main, ["--config", str(config), "config", "check"])
    assert result.exit_code == 0, result.output
    for secret in (*SECRETS, "audit-key-material"):
        assert secret not in result.output
    shown = yaml.safe_load(result.output)
    assert shown["database_url"] == "postgresql://node:***@db.example/node"
    assert shown["broker"]["url"] == "redis://:***@h:6379/0"
    assert shown["broker"]["result_backend"] == "db+postgresql://u@h/results?sslmode=require&token=***"
    assert shown["audit"]["database_url"] == "postgresql://audit@h/audit?password=***"
    assert shown["audit"]["secret"] == "***"


def test_status_before_the_first_serve_makes_a_private_state_folder(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(state)}))
    result = dicom_node(config, "status", "--format", "json")
    assert result.returncode == 0, result.stderr
    assert (state / "node.db").exists() and (state / "broker.db").exists()
    assert_private(state)


@pytest.mark.slow
def test_serve_tightens_an_open_state_folder(node_factory) -> None:
    node = node_factory({"worker": {"embedded": False}})
    node.state_dir.mkdir(mode=0o755)
    node.db().dispose()  # an earlier version's node.db
    (node.state_dir / "spool").mkdir(mode=0o755)
    for path, mode in ((node.state_dir, 0o755), (node.state_dir / "node.db", 0o644),
                       (node.state_dir / "spool", 0o755)):
        path.chmod(mode)
    node.start()
    assert_private(node.state_dir)
    log = node.log.read_text()
    assert f"{node.state_dir} was readable by others (mode 0755): now 0700" in log
    assert f"{node.state_dir / 'node.db'} was readable by others (mode 0644): now 0600" in log
    assert node.stop() == 0


def test_a_patient_id_on_the_command_line_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state")}))
    for command in (("audit", "list"), ("audit", "subject", "export"),
                    ("audit", "subject", "erase", "--yes")):
        result = CliRunner().invoke(main, ["-c", str(config), *command, "--patient-id", "PID-1"])
        assert result.exit_code == 2, result.output
        assert "a patient ID is not taken from the command line" in result.output
        assert "standard input" in result.output
    assert not (tmp_path / "state" / "audit.db").exists()  # refused before anything was opened


def test_the_patient_id_is_read_from_standard_input(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state")}))
    exported = dicom_node(config, "audit", "subject", "export", input="PID-1\n")
    assert exported.returncode == 0, exported.stderr
    assert yaml.safe_load(exported.stdout) == {"pseudonym": None, "events": [], "instances": []}
    empty = dicom_node(config, "audit", "subject", "export", input="")
    assert empty.returncode == 2 and "no patient ID given" in empty.stderr


@pytest.mark.slow
def test_erasure_leaves_no_row_or_file_naming_the_subjects_images(node_factory) -> None:
    node = node_factory({"destinations": [  # nothing listens: the deliveries wait to be retried
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}]})
    node.start()
    source = sample_file("RG1_UNCI.dcm")
    header = dcmread(source, stop_before_pixels=True)
    study, sop = str(header.StudyInstanceUID), str(header.SOPInstanceUID)
    sent = run_tool(dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "DICOM_NODE",
                    "127.0.0.1", str(node.port), str(source))
    assert sent.returncode == 0, sent.stderr
    job = wait_for(lambda: (jobs := node.jobs(study)) and jobs[-1].status.finished and jobs[-1],
                   300, "RG1's job to finish")
    assert job.status is JobStatus.DONE, job.reason
    wait_for(lambda: any(d.status is DeliveryStatus.RETRYING for d in node.deliveries(job.id)),
             60, "a delivery to fail once")
    deliveries = node.deliveries(job.id)
    [spooled] = [Path(i.path) for i in node.rows(Instance, Instance.sop_instance_uid == sop)]
    results = node.state_dir / "results" / study
    assert spooled.exists() and results.exists()
    named = [study, sop, *(d.sop_instance_uid for d in deliveries)]

    erased = dicom_node(node.config, "audit", "subject", "erase", "--yes",
                        input=f"{header.PatientID}\n")
    assert erased.returncode == 0, erased.stderr
    assert "deleted 1 instances, 1 spooled files, 1 result folders, 1 jobs, 3 deliveries" \
        in erased.stdout
    assert node.rows(Instance) == [] and node.jobs() == [] and node.deliveries() == []
    assert node.rows(OutboxMessage, or_(
        (OutboxMessage.task == "analyze") & (OutboxMessage.target_id == job.id),
        (OutboxMessage.task == "deliver")
        & OutboxMessage.target_id.in_([d.id for d in deliveries]))) == []
    assert not spooled.exists() and not results.exists()
    stored = b"".join(path.read_bytes() for path in node.state_dir.glob("node.db*"))
    for uid in named:  # secure delete: not even in free pages or the write-ahead log
        assert uid.encode() not in stored, uid
    assert node.stop() == 0


@pytest.mark.parametrize("settings, named", [
    ({"audit": {"enabled": False}}, "acknowledged_risks"),
    ({"scp": {"accept_any_peer": True}}, "acknowledged_risks"),
    ({"destinations": [{"name": "archive", "type": "stow", "url": "https://archive.example/dicom-web/studies",
                        "insecure_skip_tls_verify": True}]}, "'tls-unverified' to acknowledged_risks"),
    ({"scp": {"max_dataset_mb": 8192}}, "scp.max_dataset_mb"),
])
def test_risky_settings_are_refused_unless_confirmed(tmp_path: Path, settings: dict, named: str) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), **settings}))
    checked = dicom_node(config, "config", "check")
    assert checked.returncode == 1 and named in checked.stderr, checked.stderr


def test_serve_warns_of_a_confirmed_risk_at_every_start(node_factory) -> None:
    node = node_factory({"audit": {"enabled": False}, "acknowledged_risks": ["audit-disabled"]})
    node.start()
    assert node.stop() == 0
    node.start()
    assert node.stop() == 0
    warnings = [line for line in node.log.read_text().splitlines()
                if "Acknowledged risk in effect: audit.enabled: false" in line]
    assert len(warnings) == 1, "the log is rewritten at each start: one warning per start"


def test_every_dependency_is_pinned_with_hashes_and_no_old_openjpeg() -> None:
    """The install the README and .ci/run use: every runtime and test dependency of
    pyproject.toml (torch, installed alone first, aside) pinned to one version with hashes."""
    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    wanted = {canonicalize_name(Requirement(spec).name)
              for spec in project["dependencies"] + project["optional-dependencies"]["dev"]} - {"torch"}
    lock = (root / "requirements.lock").read_text()
    pins = {canonicalize_name(name): (version, block) for name, version, block in re.findall(
        r"^([A-Za-z0-9_.-]+)==(\S+) \\\n((?:\s+--hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", lock, re.M)}
    assert wanted <= set(pins), f"not pinned: {sorted(wanted - set(pins))}"
    entries = [line for line in lock.splitlines() if re.match(r"^[A-Za-z0-9]", line)]
    assert len(entries) == len(pins), "every entry is name==version with its hashes"
    assert "pylibjpeg-openjpeg" not in pins
    assert int(pins["pillow"][0].split(".")[0]) >= 12  # bundles OpenJPEG >= 2.5.3
    for install in ((root / ".ci" / "run").read_text(), (root / "README.md").read_text()):
        assert re.search(r"pip install (-q )?--require-hashes -r requirements\.lock", install)
