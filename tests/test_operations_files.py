"""What docs/operations.md ships and prescribes: the systemd units pass ``systemd-analyze verify``
and keep their hardening, the Grafana dashboard queries only metrics the node exposes, and the
documented backup, taken while ``serve`` runs, restores a node whose audit chain verifies."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from dicom_node import metrics
from dicom_node.db import Instance
from dicom_node.scp import StorageSCP
from dicom_node.service import WorkerSupervisor
from tests.conftest import store_as_is
from tests.dicom_factory import write_cr

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "examples" / "systemd"
DASHBOARD = ROOT / "examples" / "grafana" / "dicom-node.json"
OPERATIONS = ROOT / "docs" / "operations.md"
#: Where the units expect the installed script; the tests put the one installed here instead.
UNIT_EXECUTABLE = "/opt/dicom-node/venv/bin/dicom-node"
#: The units, each with the name ``systemd-analyze`` checks it under (a template as an instance).
UNITS = {"dicom-node.service": "dicom-node.service",
         "dicom-node-worker@.service": "dicom-node-worker@analysis.service"}
STATE_FOLDER = "/var/lib/dicom-node"
HARDENING = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
             "ProtectHome": "yes", "Restart": "on-failure", "KillSignal": "SIGTERM",
             "KillMode": "mixed", "User": "dicom-node", "StateDirectory": "dicom-node",
             "ReadWritePaths": STATE_FOLDER, "UMask": "0077"}
#: Labels Prometheus adds to every series it scrapes, and the histogram bucket label.
SCRAPE_LABELS = {"job", "instance", "le"}
#: The series a metric of each type is exposed as.
SERIES_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
                   "histogram": ("_bucket", "_sum", "_count", "_created")}


def installed_script() -> Path:
    """Return the ``dicom-node`` script of the Python running the tests (skip when not installed)."""
    found = shutil.which("dicom-node", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if found is None:
        pytest.skip("the dicom-node script is not installed (pip install --no-deps -e .)")
    return Path(found)


def systemd_tool(name: str) -> str:
    tool = shutil.which(name)
    if tool is None:
        pytest.skip(f"{name} is not installed (it comes with systemd)")
    return tool


def unit_settings(text: str) -> dict[str, str]:
    """Return a unit file's ``Key=value`` lines (the last of a repeated key)."""
    return dict(line.split("=", 1) for line in text.splitlines()
                if "=" in line and not line.startswith(("#", ";")))


@pytest.fixture
def units(tmp_path: Path) -> dict[str, Path]:
    """Copies of the units whose ExecStart runs the installed script, by the name to check them under."""
    script = str(installed_script())
    copies = {}
    for name, checked_as in UNITS.items():
        text = (SYSTEMD / name).read_text()
        assert UNIT_EXECUTABLE in text, name
        (tmp_path / name).write_text(text.replace(UNIT_EXECUTABLE, script))
        copies[checked_as] = tmp_path / checked_as
    return copies


def test_the_units_pass_systemd_analyze_verify(units):
    analyze = systemd_tool("systemd-analyze")
    result = subprocess.run([analyze, "verify", *map(str, units.values())], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    unit_lines = [line for line in result.stderr.splitlines() if "dicom-node" in line]
    assert unit_lines == [], "systemd-analyze warns about the units:\n" + result.stderr


def test_a_unit_whose_executable_is_missing_fails_verify(tmp_path):
    analyze = systemd_tool("systemd-analyze")
    unit = tmp_path / "dicom-node.service"
    shutil.copy(SYSTEMD / "dicom-node.service", unit)
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode != 0 and "is not executable" in result.stderr


@pytest.mark.parametrize("name", UNITS)
def test_the_units_are_hardened_and_wait_for_the_graceful_stop(name):
    settings = unit_settings((SYSTEMD / name).read_text())
    assert {key: settings.get(key) for key in HARDENING} == HARDENING
    assert settings["CapabilityBoundingSet"] == ""
    if name == "dicom-node.service":
        # serve lets associations finish, then stops its two lanes' workers in turn (see Node.stop).
        grace = inspect.signature(StorageSCP.stop).parameters["grace_seconds"].default
        worker = inspect.signature(WorkerSupervisor.stop).parameters["timeout"].default
        assert int(settings["TimeoutStopSec"]) > grace + 2 * worker
    else:
        assert settings["ExecStart"].endswith("worker --lane %i")


def test_the_units_expose_little_by_systemds_own_measure(units):
    analyze = systemd_tool("systemd-analyze")
    for unit in units.values():
        result = subprocess.run([analyze, "security", "--offline=true", str(unit)], capture_output=True,
                                text=True, timeout=60, check=False)
        level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
        if level is None:
            pytest.skip(f"this systemd-analyze cannot rate a unit file offline: {result.stderr.strip()}")
        assert float(level[1]) <= 3.0, result.stdout


def test_sysusers_creates_the_units_user(tmp_path):
    sysusers = systemd_tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    subprocess.run([sysusers, f"--root={tmp_path}", str(SYSTEMD / "dicom-node.sysusers")],
                   check=True, capture_output=True, timeout=60)
    user = unit_settings((SYSTEMD / "dicom-node.service").read_text())["User"]
    entry = next(line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()
                 if line.startswith(f"{user}:"))
    assert entry[5] == STATE_FOLDER and entry[6].endswith("nologin")


# -- the Grafana dashboard ----------------------------------------------------------------

def exposed_metrics() -> dict[str, set[str]]:
    """Return every series name a node process exposes, with its label names: those of
    :mod:`dicom_node.metrics` (also before anything is counted) and of prometheus-client's
    default process, platform and GC collectors."""
    names: dict[str, set[str]] = {}
    for family in REGISTRY.collect():
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            [family] = metric.describe()
            for suffix in SERIES_SUFFIXES[family.type]:
                names[family.name + suffix] = set(metric._labelnames)  # no public accessor
    return names


#: What in a PromQL expression is not a metric name: strings, durations and label groupings.
NOT_NAMES = re.compile(r'"[^"]*"|\[[^\]]*\]|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)')
IDENTIFIER = re.compile(r"(?<![\w$.])([A-Za-z_:][\w:]*)\b(?!\s*\()")
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless"}


def promql_names(expression: str) -> tuple[set[str], set[str]]:
    """Return the metric names and the label names used in ``expression``."""
    labels = set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", "".join(re.findall(r"\{[^}]*\}", expression))))
    for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expression):
        labels |= {label.strip() for label in grouping.split(",") if label.strip()}
    bare = NOT_NAMES.sub(" ", re.sub(r"\{[^}]*\}", " ", expression))
    return {name for name in IDENTIFIER.findall(bare) if name not in KEYWORDS}, labels


def dashboard_queries(dashboard: dict) -> list[str]:
    """Return every PromQL expression of the dashboard's panels and template variables."""
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query).groups()
        queries.append(f"{metric}{{{label}!=\"\"}}")
    return queries


def test_promql_names_are_told_apart():
    names, labels = promql_names('histogram_quantile(0.95, sum by (le, stage) (rate(a_bucket{job=~"$job"}[5m])))'
                                 ' / on(stage) b_total')
    assert (names, labels) == ({"a_bucket", "b_total"}, {"le", "stage", "job"})


def test_the_dashboard_queries_only_metrics_the_node_exposes():
    dashboard = json.loads(DASHBOARD.read_text())
    exposed = exposed_metrics()
    queries = dashboard_queries(dashboard)
    used = set()
    for query in queries:
        names, labels = promql_names(query)
        assert names, query
        for name in names:
            assert name in exposed, f"{name} (in {query}) is neither a dicom_node.metrics metric nor a default one"
            assert labels <= exposed[name] | SCRAPE_LABELS, f"{query}: labels {labels - exposed[name]} of {name}"
        used |= names
    node_metrics = {name for name in exposed if name.startswith("dicom_node_") and not name.endswith("_created")}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in used}
    assert {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in node_metrics} <= shown, \
        "every metric of dicom_node.metrics has a panel"


# -- backup and restore ------------------------------------------------------------------

def documented_procedure(name: str) -> str:
    """Return the shell block of docs/operations.md marked ``<!-- procedure: NAME -->``."""
    match = re.search(rf"<!-- procedure: {name} -->\s*```sh\n(.*?)```", OPERATIONS.read_text(), re.DOTALL)
    assert match, f"docs/operations.md has no '{name}' procedure"
    return match[1]


def run_procedure(name: str, **variables: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    env["PATH"] = f"{installed_script().parent}{os.pathsep}{env['PATH']}"
    env.update((key, str(value)) for key, value in variables.items())
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", documented_procedure(name)], env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"{name}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_the_documented_backup_restores_a_node_whose_audit_chain_verifies(node_factory, tmp_path):
    if shutil.which("sqlite3") is None:
        pytest.skip("the sqlite3 shell is not installed (apt-get install sqlite3)")
    node = node_factory({"audit": {"secret": None}, "worker": {"embedded": False}}).start()
    state = node.state_dir
    variables = {"STATE": state, "KEY": state / "audit.key", "CONFIG": node.config, "BACKUP": tmp_path / "backup"}
    source = write_cr(tmp_path / "cr.dcm")
    assert store_as_is(node.port, tmp_path / "cr.dcm") == 0x0000
    run_procedure("backup", **variables)  # online: serve keeps running, and auditing
    assert node.stop() == 0
    shutil.rmtree(state)  # the disk is lost

    verified = run_procedure("restore", **variables)
    assert "audit trail intact" in verified, verified
    [instance] = node.rows(Instance)
    assert instance.sop_instance_uid == source.SOPInstanceUID and Path(instance.path).is_file()
    node.start()  # the restored node runs, and extends the restored chain under the restored key
    assert node.stop() == 0
    node.cli("audit", "verify")
    assert "node-stopped" in node.cli("audit", "list", "--event", "node-stopped")
