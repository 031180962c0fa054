"""Settings: YAML → environment → flags, errors that name the key, `config check`."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from dicom_node.cli import main
from dicom_node.config import WorkerSettings, load_settings
from dicom_node.errors import ConfigError
from dicom_node.plugins import configured_plugins, plugin_options


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("DICOM_NODE_"):
            monkeypatch.delenv(key)


def write(tmp_path, data) -> str:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_without_a_file():
    settings = load_settings()
    assert settings.scp.ae_title == "DICOM_NODE" and settings.scp.port == 11112
    assert settings.broker_url.startswith("sqla+sqlite:///")
    assert settings.pipeline.name == "chest_xray"
    [plugin] = configured_plugins(settings)
    options = plugin_options(plugin, settings)
    assert options.manifest_path.name == "manifest.yaml" and options.manifest_path.is_file()
    assert (options.min_patient_age_years, options.unknown_age) == (18, "analyse")


def test_the_gate_and_manifest_settings_are_the_chest_pipelines_options(tmp_path):
    config = write(tmp_path, {"gate": {"min_patient_age_years": 16, "unknown_age": "skip"},
                              "pipeline": {"manifest": str(tmp_path / "m.yaml")},
                              "pipelines": {"chest_xray": {"enable_flags": ["pneumothorax"]}}})
    settings = load_settings(config)
    options = plugin_options(*configured_plugins(settings), settings)
    assert (options.min_patient_age_years, options.unknown_age) == (16, "skip")
    assert options.manifest_path == tmp_path / "m.yaml" and options.enable_flags == ("pneumothorax",)


def test_an_unknown_pipeline_or_option_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"no pipeline 'bone_age' is installed \(installed: .*chest_xray"):
        load_settings(write(tmp_path, {"pipeline": {"name": "bone_age"}}))
    with pytest.raises(ConfigError, match=r"invalid options of the pipeline 'chest_xray': enable_flag: Extra"):
        load_settings(write(tmp_path, {"pipelines": {"chest_xray": {"enable_flag": ["x"]}}}))


def test_file_then_environment_then_flags(tmp_path, monkeypatch):
    config = write(tmp_path, {"scp": {"port": 104, "ae_title": "FROM_FILE"}})
    assert load_settings(config).scp.port == 104
    monkeypatch.setenv("DICOM_NODE_SCP__PORT", "105")
    settings = load_settings(config)
    assert (settings.scp.port, settings.scp.ae_title) == (105, "FROM_FILE")
    assert load_settings(config, scp={"port": 106}).scp.port == 106


@pytest.mark.parametrize("data, named", [
    ({"scp": {"prot": 104}}, "scp.prot"),
    ({"scp": {"port": 70000}}, "scp.port"),
    ({"scp": {"ae_title": "A_TITLE_FAR_TOO_LONG"}}, "scp.ae_title"),
    ({"scheduler": {"study_quiet_seconds": -1}}, "scheduler.study_quiet_seconds"),
    ({"worker": {"pool": "prefork"}}, "worker.pool"),
    ({"gate": {"unknown_age": "maybe"}}, "gate.unknown_age"),
    ({"nonsense": 1}, "nonsense"),
])
def test_a_wrong_key_or_value_is_named(tmp_path, data, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_settings(write(tmp_path, data))


def test_unknown_environment_setting_is_named(monkeypatch):
    monkeypatch.setenv("DICOM_NODE_SCPP__PORT", "1")
    with pytest.raises(ConfigError, match="DICOM_NODE_SCPP__PORT"):
        load_settings()


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("scp: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)


def test_config_check_prints_settings_with_secrets_redacted(tmp_path):
    config = write(tmp_path, {
        "audit": {"secret": "very-secret-key"},
        "broker": {"url": "amqp://node:hunter2@rabbit:5672//"},
    })
    result = CliRunner().invoke(main, ["--config", config, "config", "check"])
    assert result.exit_code == 0, result.output
    assert "very-secret-key" not in result.output and "hunter2" not in result.output
    printed = yaml.safe_load(result.output)
    assert printed["audit"]["secret"] == "***"
    assert printed["broker"]["url"] == "amqp://node:***@rabbit:5672//"


def test_config_check_fails_with_the_key_named(tmp_path):
    config = write(tmp_path, {"scp": {"port": "not-a-port"}})
    result = CliRunner().invoke(main, ["--config", config, "config", "check"])
    assert result.exit_code == 1
    assert "scp.port" in result.output


@pytest.mark.parametrize(("worker", "cores", "expected"), [
    ({}, 1, (1, 1)),   # one core: torch on it, one job at a time
    ({}, 2, (1, 2)),
    ({}, 16, (8, 3)),  # half the cores to torch, three jobs overlapped
    ({"torch_threads": 4, "concurrency": 8}, 2, (4, 8)),  # what is set is kept
])
def test_an_analysis_workers_threads_follow_its_cores_unless_set(worker, cores, expected):
    assert WorkerSettings(**worker).threads_for(cores) == expected
