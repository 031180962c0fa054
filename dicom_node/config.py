"""One validated settings object: YAML file → ``DICOM_NODE_*`` environment → CLI flags.

Later sources win. Nested keys are reached in the environment with ``__``
(``DICOM_NODE_SCP__PORT=104``). A wrong key or value raises :class:`ConfigError`
naming it.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote_plus

import yaml
from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, ValidationError, field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from dicom_node.errors import ConfigError
from dicom_node.plugins import configured_plugins
from dicom_node.routing import PIPELINE_NAME, Route, check_references
from dicom_node.senders.base import installed_kinds
from dicom_node.tls_subject import parse_subject

ENV_PREFIX = "DICOM_NODE_"
CONFIG_FILE_ENV = "DICOM_NODE_CONFIG"
AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_ae_title(value: str) -> str:
    if not AE_TITLE.match(value) or not value.strip():
        raise ValueError("an AE title is 1 to 16 printable characters, no backslash")
    return value.strip()


class AllowedPeer(Section):
    """A calling AE the SCP accepts, optionally only from one host and, over TLS, only with
    a client certificate of one subject."""

    ae_title: str
    host: str | None = None
    certificate_subject: str | None = Field(
        None, description="RFC 4514 subject its TLS client certificate must carry, e.g. "
        "'CN=PACS1,O=Hospital'; needs scp.tls with ca_certificates")

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("certificate_subject")
    @classmethod
    def _subject(cls, value: str | None) -> str | None:
        if value is not None:
            parse_subject(value)
        return value


class TlsSettings(Section):
    """DICOM TLS: certificate and key of this node, CA bundle of its peers.

    On the SCP a CA bundle makes client certificates required (signed by that CA)."""

    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None


class ScpSettings(Section):
    ae_title: str = "DICOM_NODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    allowed_peers: list[AllowedPeer] = Field(
        default_factory=list,
        description="calling AEs accepted; empty: loopback peers only (unless accept_any_peer)")
    accept_any_peer: bool = Field(
        False, description="with no allowed_peers, accept every calling AE from every host; "
        "needs 'scp-open' in acknowledged_risks")
    check_called_ae: bool = True
    max_associations: int = Field(10, ge=1)
    max_associations_per_peer: int = Field(5, ge=1, description="per calling AE and per host")
    max_pending_per_host: int | None = Field(
        None, ge=1, description="connections from one host not yet through TLS and association "
        "negotiation; more are closed at accept. Default: max_associations_per_peer")
    max_pdu_bytes: int = Field(1_048_576, ge=0, description="0: no limit")
    max_dataset_mb: float = Field(256, gt=0, le=4096)
    max_image_megapixels: float = Field(
        25, gt=0, description="Rows x Columns x frames, in millions, of an image the node keeps "
        "and decodes; larger ones are refused (0xA700) and skipped by the gate. At 25 the analysis "
        "worker peaks near 1.4 GiB; each megapixel more costs it about 35 MiB")
    min_free_disk_mb: float = Field(1024, ge=0)
    acse_timeout_s: float = Field(
        10, gt=0, description="from connection to a decided association request, TLS handshake included")
    dimse_timeout_s: float = Field(60, gt=0)
    network_timeout_s: float = Field(60, gt=0)
    state_wait_s: float = Field(
        20, gt=0, description="longest wait for a locked state database before a C-STORE is answered "
        "0xA700; at most half the shorter of the network and DIMSE timeouts")
    tls: TlsSettings | None = None

    _ae = field_validator("ae_title")(_check_ae_title)

    @model_validator(mode="after")
    def _subjects_need_a_ca(self) -> ScpSettings:
        if any(p.certificate_subject for p in self.allowed_peers) and not (
                self.tls and self.tls.ca_certificates):
            raise ValueError("allowed_peers.certificate_subject needs scp.tls.ca_certificates "
                             "(client certificates are checked only against a CA)")
        return self

    @property
    def pending_limit_per_host(self) -> int:
        """``max_pending_per_host``, or by default as many as one peer may hold associations."""
        return self.max_pending_per_host or self.max_associations_per_peer

    @property
    def state_wait_limit_s(self) -> float:
        """``state_wait_s``, cut so that a C-STORE is answered before a timeout aborts it."""
        return min(self.state_wait_s, min(self.network_timeout_s, self.dimse_timeout_s) / 2)


class DestinationBase(Section):
    """What every kind of destination has: its name, and which results it takes."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    outputs: list[Literal["sc", "seg", "sr", "not-analysed"]] = Field(
        default_factory=lambda: ["sc", "seg", "sr", "not-analysed"])


class DimseDestination(DestinationBase):
    """A DICOM peer the results are sent to with C-STORE."""

    type: Literal["dimse"] = "dimse"
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae: str | None = Field(None, description="default: scp.ae_title")
    tls: TlsSettings | None = None
    storage_commitment: bool = Field(
        False, description="ask the peer to commit each stored group (see docs/storage-commitment.md)")
    commitment_timeout_s: float = Field(3600, gt=0, description="a commitment not answered this long is asked again")
    commitment_requests: int = Field(3, ge=1, description="commitment requests per object before it is dead-lettered")

    _ae = field_validator("ae_title")(_check_ae_title)


#: An HL7 name (HD namespace id): no HL7 delimiter, at most 20 characters.
HL7_NAME = r"^[^|^~\\&\r\n]{0,20}$"


class Hl7Destination(DestinationBase):
    """A RIS the findings are sent to as one HL7 v2.5 ORU^R01 per study over MLLP (see
    :mod:`dicom_node.senders.hl7`); it reads the structured reports only. TLS verifies the RIS's
    certificate and host name (against ``ca_certificates``, default: the system's trust store) and
    presents ``certificate`` and ``private_key`` when given."""

    type: Literal["hl7"]
    outputs: list[Literal["sr"]] = Field(default_factory=lambda: ["sr"])
    host: str
    port: int = Field(ge=1, le=65535)
    sending_application: str | None = Field(None, pattern=HL7_NAME, description="default: scp.ae_title")
    sending_facility: str = Field("", pattern=HL7_NAME)
    receiving_application: str = Field("", pattern=HL7_NAME)
    receiving_facility: str = Field("", pattern=HL7_NAME)
    ack_timeout_s: float = Field(30, gt=0, description="connecting, sending, and waiting for the ACK")
    tls: bool = False
    ca_certificates: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None

    @model_validator(mode="after")
    def _client_certificate(self) -> Hl7Destination:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        if not self.tls and (self.ca_certificates or self.certificate):
            raise ValueError("ca_certificates, certificate and private_key need tls: true")
        return self


class BearerAuth(Section):
    """An ``Authorization: Bearer`` token, given here or read from a file at each send (so that
    a token another process renews is used at once)."""

    type: Literal["bearer"]
    token: SecretStr | None = None
    token_file: Path | None = Field(None, description="file holding the token, kept out of this file")

    @model_validator(mode="after")
    def _one_source(self) -> BearerAuth:
        _one_secret(self.token, self.token_file, "token")
        return self


class BasicAuth(Section):
    """HTTP basic authentication: a user name and a password given here or read from a file."""

    type: Literal["basic"]
    username: str = Field(min_length=1, pattern=r"^[^:]+$")
    password: SecretStr | None = None
    password_file: Path | None = Field(None, description="file holding the password, kept out of this file")

    @model_validator(mode="after")
    def _one_source(self) -> BasicAuth:
        _one_secret(self.password, self.password_file, "password")
        return self


def _one_secret(value: SecretStr | None, file: Path | None, name: str) -> None:
    if (value is None) == (file is None):
        raise ValueError(f"give either {name} or {name}_file, not both or neither")


#: Where an endpoint's Authorization header comes from: a bearer token or basic auth.
HttpAuth = Annotated[BearerAuth | BasicAuth, Field(discriminator="type")]


def _check_http_url(value: str) -> str:
    """Return ``value`` when it is an http(s) URL with a host and no credentials in it."""
    scheme, _, rest = value.partition("://")
    host = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if scheme.lower() not in ("http", "https") or not host:
        raise ValueError("expected an http:// or https:// URL")
    if "@" in host:
        raise ValueError("credentials go in auth (a token_file or password_file), not in the URL")
    return value


class HttpEndpoint(Section):
    """How the node talks to an HTTPS (or HTTP) service it posts to (see
    :mod:`dicom_node.http_client`): its authentication, and how its certificate is checked."""

    auth: HttpAuth | None = Field(None, description="none when absent")
    ca_certificates: Path | None = Field(
        None, description="CA bundle the server's certificate is checked against; default: the system's")
    insecure_skip_tls_verify: bool = Field(
        False, description="send without checking the server's certificate: anyone on the path "
        "can read and alter what is sent")


class StowDestination(DestinationBase, HttpEndpoint):
    """A DICOMweb archive the results are sent to with STOW-RS (see :mod:`dicom_node.senders.stow`)."""

    type: Literal["stow"]
    url: str = Field(description="the archive's /studies endpoint, https:// (or http://)")

    _url = field_validator("url")(_check_http_url)


class FhirDestination(DestinationBase, HttpEndpoint):
    """A FHIR R4 server the SRs are sent to, a study's as one transaction Bundle of a
    DiagnosticReport and its Observations (see :mod:`dicom_node.senders.fhir`)."""

    type: Literal["fhir"] = "fhir"
    base_url: str = Field(description="the server's base, e.g. https://fhir.example/r4")
    outputs: list[Literal["sr"]] = Field(default_factory=lambda: ["sr"])

    _url = field_validator("base_url")(_check_http_url)


def _dimse_by_default(value: Any) -> Any:
    """Return a destination's settings with ``type: dimse`` where they name no type."""
    if isinstance(value, dict) and "type" not in value:
        return {**value, "type": "dimse"}
    return value


#: A destination, of the kind its ``type`` names (``dimse`` where absent); each kind is
#: sent by the sender installed under that name (see :mod:`dicom_node.senders`).
Destination = Annotated[DimseDestination | StowDestination | Hl7Destination | FhirDestination, Field(discriminator="type"),
                        BeforeValidator(_dimse_by_default)]


class DeliverySettings(Section):
    """Retry policy of result delivery."""

    first_retry_s: float = Field(10, gt=0)
    max_retry_interval_s: float = Field(3600, gt=0)
    max_age_s: float = Field(86400, gt=0, description="transient failures retried this long")
    max_failures: int = Field(3, ge=1, description="other failures tried this often")
    jitter: float = Field(0.2, ge=0, le=1, description="random fraction added to each wait")
    timeout_s: float = Field(60, gt=0)
    threads: int = Field(4, ge=1, description="sends at once in the delivery lane")


NotificationEvent = Literal["finding-flagged", "delivery-dead-lettered"]


class WebhookSettings(HttpEndpoint):
    """Where notifications are posted as JSON (see :mod:`dicom_node.notifications`)."""

    url: str
    events: list[NotificationEvent] = Field(
        default_factory=lambda: ["finding-flagged", "delivery-dead-lettered"])
    timeout_s: float = Field(10, gt=0)
    max_age_s: float = Field(86400, gt=0, description="a notification is retried this long, with "
                             "the back-off of delivery")

    _url = field_validator("url")(_check_http_url)


class NotificationSettings(Section):
    webhook: WebhookSettings | None = None


class OutputSettings(Section):
    not_analysed_note: bool = Field(
        False, description="send a 'not analysed: reason' Secondary Capture for skipped chest images")


class SchedulerSettings(Section):
    """When a study is complete and becomes a job (see dicom_node.scheduler)."""

    release_grace_s: float | None = Field(
        0.3, ge=0, description="a study is complete this long after the association that brought it "
        "was released, unless more of it arrives; null: wait for the quiet period only")
    study_quiet_seconds: float = Field(
        5, ge=0, description="a study with no new instance this long is complete (PACS that send a study "
        "over many associations)")
    force_complete_s: float | None = Field(
        600, gt=0, description="a study is complete this long after its first unassigned instance, "
        "even while instances keep arriving; null: never forced")
    poll_seconds: float = Field(0.5, gt=0)
    lost_message_after_s: float = Field(
        30, gt=0, description="work queued this long while the broker holds none of its messages is queued "
        "again: a broker restarted without persistence lost it, or a worker host died holding it")


class GateSettings(Section):
    min_patient_age_years: float = Field(18, ge=0)
    unknown_age: Literal["analyse", "skip"] = Field(
        "analyse", description="an image whose age cannot be told: analysed and marked 'age unknown', or skipped")


class PipelineSettings(Section):
    name: str = Field("chest_xray", pattern=PIPELINE_NAME, description="the pipeline that runs when no routes are configured, and "
                      "`analyze`'s default (see dicom_node.plugins)")
    manifest: Path | None = Field(None, description="chest_xray's weights manifest; default: the bundled one")


class BrokerSettings(Section):
    url: str | None = Field(None, description="default: SQLite file in the state folder")
    result_backend: str | None = None
    polling_interval_s: float = Field(0.1, gt=0)


class WorkerSettings(Section):
    embedded: bool = Field(True, description="serve starts and supervises an analysis and a delivery worker")
    pool: Literal["solo", "threads"] = Field(
        "threads", description="the analysis lane's: threads runs `concurrency` jobs at once, their reading, "
        "decoding and writing overlapping the model's runs; solo one job at a time. Never a forking pool: "
        "torch is loaded")
    concurrency: int | None = Field(
        None, ge=1, description="jobs an analysis worker runs at once (threads pool); null: three, or as many as "
        "the cores it may use when fewer (on one core, overlapping jobs only adds switching)")
    batch_size: int = Field(
        4, ge=1, le=256, description="images per model call, gathered across the jobs a worker runs at once "
        "and read ahead within a job; 1: one image at a time")
    batch_wait_ms: float = Field(
        5, ge=0, le=1000, description="how long the first image of a model call waits for others to join it")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int | None = Field(
        None, ge=1, description="torch's CPU threads in an analysis worker; null: half the cores this process "
        "may use (at least one), the other half left to reading, decoding and writing; several workers on "
        "one host each take their share")
    job_lease_s: float = Field(
        30, ge=3, description="a running job's lease, renewed by its worker every third of it; a job "
        "whose lease lapsed (its worker died, on any host) is queued again and taken over")

    def threads_for(self, cores: int) -> tuple[int, int]:
        """Return (torch's threads, jobs at once) of an analysis worker that may use ``cores`` cores:
        the settings, or by default half the cores for torch and up to three jobs, no more than the cores."""
        return self.torch_threads or max(1, cores // 2), self.concurrency or min(3, cores)


class MetricsSettings(Section):
    """Prometheus endpoints; a port of null serves none."""

    host: str = "127.0.0.1"
    serve_port: int | None = Field(None, ge=1, le=65535)
    worker_port: int | None = Field(
        None, ge=1, le=65535, description="an analysis (or both-lanes) worker's; a second worker on the same "
        "host takes another, e.g. DICOM_NODE_METRICS__WORKER_PORT in its environment")
    delivery_port: int | None = Field(None, ge=1, le=65535, description="a delivery-lane worker's")


class SyslogSettings(Section):
    """Export of every audit event to the hospital's audit repository: DICOM PS3.15 A.5 audit
    messages over syslog (RFC 5424), octet-counted over TCP (RFC 6587) or TLS (RFC 5425)."""

    enabled: bool = False
    host: str | None = Field(None, description="the audit repository; required when enabled")
    port: int = Field(6514, ge=1, le=65535, description="6514 is syslog over TLS's port")
    transport: Literal["tls", "tcp"] = Field("tls", description="tcp sends the messages in clear")
    ca_certificates: Path | None = Field(
        None, description="CA bundle the repository's certificate is checked against; default: "
        "the system's CAs")
    certificate: Path | None = Field(None, description="this node's client certificate (TLS)")
    private_key: Path | None = Field(None, description="its private key")
    audit_source_id: str | None = Field(
        None, min_length=1, description="AuditSourceID of the messages; default: scp.ae_title")
    timeout_s: float = Field(10, gt=0, description="connecting, and waiting for the repository to "
                             "take what was sent")
    settle_s: float = Field(
        2, ge=0, description="a message counts as taken once the repository acknowledged it and "
        "did not reset the connection this long after; one it reset sooner is sent again")
    first_retry_s: float = Field(0.5, gt=0, description="wait before the first reconnection")
    max_retry_interval_s: float = Field(30, gt=0, description="longest wait between reconnections")

    @model_validator(mode="after")
    def _complete(self) -> SyslogSettings:
        if self.enabled and not self.host:
            raise ValueError("audit.syslog.enabled needs audit.syslog.host")
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("audit.syslog.certificate and private_key go together")
        if self.transport == "tcp" and (self.certificate or self.ca_certificates):
            raise ValueError("audit.syslog certificates need transport: tls")
        return self


class AuditSettings(Section):
    enabled: bool = Field(True, description="false needs 'audit-disabled' in acknowledged_risks")
    database_url: str | None = Field(None, description="default: SQLite file in the state folder")
    secret: SecretStr | None = Field(
        None, description="key of the pseudonym hash and the chain; default: read from key_file"
    )
    key_file: Path | None = Field(
        None, description="file holding that key, best outside the state folder; default: "
        "state_dir/audit.key, generated once")
    syslog: SyslogSettings = Field(default_factory=SyslogSettings)


class RetentionSettings(Section):
    data_days: float | None = Field(
        30, gt=0, description="delete spooled images and results this long after their job "
                              "finished; null keeps them"
    )
    audit_days: float | None = Field(
        3650, gt=0, description="delete audit events older than this; null keeps them"
    )


class CalibrationSettings(Section):
    """What ``dicom-node calibrate`` needs before it proposes a threshold (see dicom_node.calibration)."""

    min_positives: int = Field(20, ge=1, description="fewer labelled positive cases: refused")
    min_negatives: int = Field(20, ge=1, description="fewer labelled negative cases: refused")
    resamples: int = Field(2000, ge=200, description="bootstrap resamples of each 95 % confidence interval")
class FeedbackTls(Section):
    """HTTPS for the feedback page: this node's certificate and private key (PEM)."""

    certificate: Path
    private_key: Path


class FeedbackSettings(Section):
    """Radiologists' feedback web page (see :mod:`dicom_node.feedback`): off by default; when on,
    reachable from loopback only unless ``allowed_networks`` lists more, and then only over TLS."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(8480, ge=1, le=65535)
    allowed_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
        default_factory=list, description="CIDRs of the clients admitted besides loopback; any but loopback "
        "needs tls (passwords and session cookies would otherwise cross the network in clear)")
    users_file: Path | None = Field(
        None, description="user name -> scrypt password hash, written by `dicom-node feedback add-user`; "
        "default: state_dir/feedback-users")
    session_key_file: Path | None = Field(
        None, description="key that signs the session cookies; default: state_dir/feedback.key, generated once")
    session_hours: float = Field(8, gt=0, le=24 * 7, description="a login lasts this long")
    recent_jobs: int = Field(50, ge=1, le=1000, description="finished jobs the page lists, newest first")
    tls: FeedbackTls | None = None

    @model_validator(mode="after")
    def _clear_text_stays_local(self) -> FeedbackSettings:
        if self.tls is None and any(not network.is_loopback for network in self.allowed_networks):
            raise ValueError("allowed_networks beyond loopback need feedback.tls: without it passwords and "
                             "session cookies cross the network in clear")
        if self.tls is None and not _is_loopback_host(self.host):
            raise ValueError("a host other than loopback needs feedback.tls: without it passwords and "
                             "session cookies cross the network in clear")
        return self


def _is_loopback_host(host: str) -> bool:
    """Return whether ``host`` names this machine's loopback only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


Risk = Literal["scp-open", "audit-disabled", "tls-unverified"]
RISKY_SETTINGS: dict[str, str] = {
    "scp-open": "scp.accept_any_peer: true admits every calling AE from every host",
    "audit-disabled": "audit.enabled: false records no audit trail and no pseudonyms",
    "tls-unverified": "insecure_skip_tls_verify: true sends to an HTTPS peer whose certificate is not checked: "
                      "anyone on the path can read and alter what is sent",
}


class Settings(BaseSettings):
    """The node's whole configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    state_dir: Path = Path("dicom-node-state")
    database_url: str | None = Field(None, description="default: SQLite file in the state folder")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    scp: ScpSettings = Field(default_factory=ScpSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    pipelines: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="each pipeline plug-in's options, by its name")
    outputs: OutputSettings = Field(default_factory=OutputSettings)
    destinations: list[Destination] = Field(default_factory=list)
    routes: list[Route] = Field(
        default_factory=list, description="routing rules, tried in order (see dicom_node.routing); "
        "none: every instance to pipeline.name and every destination")
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    notifications: NotificationSettings = Field(default_factory=NotificationSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings)
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    acknowledged_risks: list[Risk] = Field(
        default_factory=list, description="settings that weaken the node, confirmed on purpose")

    def _risks_on(self) -> set[str]:
        """Return the risks the settings take, confirmed or not."""
        endpoints = [d for d in self.destinations if isinstance(d, HttpEndpoint)]
        endpoints += [self.notifications.webhook] if self.notifications.webhook else []
        on = {"scp-open": self.scp.accept_any_peer and not self.scp.allowed_peers,
              "audit-disabled": not self.audit.enabled,
              "tls-unverified": any(e.insecure_skip_tls_verify for e in endpoints)}
        return {risk for risk, taken in on.items() if taken}

    @model_validator(mode="after")
    def _risks_confirmed(self) -> Settings:
        taken = sorted(self._risks_on() - set(self.acknowledged_risks))
        if taken:
            raise ValueError("; ".join(
                f"{RISKY_SETTINGS[risk]}: confirm it by adding '{risk}' to acknowledged_risks"
                for risk in taken))
        return self

    @model_validator(mode="after")
    def _routes_and_pipelines(self) -> Settings:
        problems = check_references(self.routes, self.destinations)
        if problems:
            raise ValueError("; ".join(problems))
        try:
            configured_plugins(self)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        return self

    @model_validator(mode="after")
    def _senders_installed(self) -> Settings:
        installed = installed_kinds()
        missing = [d for d in self.destinations if d.type not in installed]
        if missing:
            raise ValueError("; ".join(
                f"destination '{d.name}' is of type '{d.type}', for which no sender is installed "
                f"(installed: {', '.join(sorted(installed)) or 'none'}); install the package that "
                f"provides it" for d in missing))
        return self

    def risks_taken(self) -> list[str]:
        """Return, for a warning at every start, what each acknowledged risk leaves open."""
        return [RISKY_SETTINGS[risk] for risk in self.acknowledged_risks if risk in self._risks_on()]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls)

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"

    @property
    def results_dir(self) -> Path:
        return self.state_dir / "results"

    @property
    def node_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.state_dir / 'node.db').resolve()}"

    @property
    def audit_database_url(self) -> str:
        return self.audit.database_url or f"sqlite:///{(self.state_dir / 'audit.db').resolve()}"

    @property
    def broker_url(self) -> str:
        return self.broker.url or f"sqla+sqlite:///{(self.state_dir / 'broker.db').resolve()}"

    def redacted(self) -> dict[str, Any]:
        """Return the settings as plain data with secrets hidden: every secret field, and the
        password and secret query parameters of every URL-valued string (see :func:`redact_url`)."""
        return _redact_values(self.model_dump(mode="json"), self)


SECRET_QUERY_KEY = re.compile(r"pass|pwd|secret|token|key", re.IGNORECASE)
URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
HIDDEN = "***"


def redact_url(value: str) -> str:
    """Return ``value`` with a URL's password and the values of query parameters named like
    password, pwd, secret, token or key replaced by ``***``; a string that is no URL unchanged.

    The user information ends at the last ``@``, not where :func:`urllib.parse.urlsplit` ends
    the authority (at the first ``/``, ``?`` or ``#``), so no character of a password survives.
    """
    scheme, separator, rest = value.partition("://")
    if not separator or not URL_SCHEME.fullmatch(scheme):
        return value
    userinfo, at, location = rest.rpartition("@")
    if ":" in userinfo:
        userinfo = f"{userinfo.split(':', 1)[0]}:{HIDDEN}"
    location, hash_mark, fragment = location.partition("#")
    location, question_mark, query = location.partition("?")
    query = "&".join(
        f"{name}={HIDDEN}" if equals and SECRET_QUERY_KEY.search(unquote_plus(name))
        else f"{name}{equals}{text}"
        for name, equals, text in (item.partition("=") for item in query.split("&")))
    return f"{scheme}://{userinfo}{at}{location}{question_mark}{query}{hash_mark}{fragment}"


def _redact_values(data: Any, model: Any) -> Any:
    """Return ``data`` (a model's JSON dump) with secret fields as ``***`` and URLs redacted."""
    if isinstance(data, dict):
        return {key: HIDDEN if value is not None and isinstance(getattr(model, key, None), SecretStr)
                else _redact_values(value, getattr(model, key, None)) for key, value in data.items()}
    if isinstance(data, list):
        items = model if isinstance(model, list) else [None] * len(data)
        return [_redact_values(value, item) for value, item in zip(data, items, strict=True)]
    return redact_url(data) if isinstance(data, str) else data


def _unknown_environment_keys() -> list[str]:
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | {CONFIG_FILE_ENV}
    return sorted(
        key for key in os.environ
        if key.startswith(ENV_PREFIX) and key.split("__")[0] not in known
    )


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"{where}: {item['msg']}")
    return "; ".join(lines)


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the effective settings from a YAML file, the environment and ``overrides``.

    ``config_file`` defaults to ``$DICOM_NODE_CONFIG``; with neither, the built-in
    defaults apply. ``overrides`` (from CLI flags) are nested dicts and win over
    everything. Raises :class:`ConfigError` naming each bad key or value.
    """
    path = config_file or os.environ.get(CONFIG_FILE_ENV)
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            content = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if content is not None and not isinstance(content, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys")
    unknown = _unknown_environment_keys()
    if unknown:
        raise ConfigError(f"unknown environment setting(s): {', '.join(unknown)}")
    settings_cls = type(
        "Settings", (Settings,),
        {"model_config": SettingsConfigDict(**{**Settings.model_config, "yaml_file": path})},
    )
    try:
        return settings_cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        source = f" (from {path})" if path else ""
        raise ConfigError(f"invalid configuration{source}: {_describe(exc)}") from exc
