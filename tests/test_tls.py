"""DICOM TLS: the SCP and the SCU with a certificate made by the test (openssl)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from dicom_node.config import TlsSettings
from dicom_node.errors import PeerError
from dicom_node.scu import Peer, echo, store_files
from tests.dicom_factory import write_cr


@pytest.fixture
def certificate(tmp_path) -> TlsSettings:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "node.crt", tmp_path / "node.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=dicom-node-test", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return TlsSettings(certificate=cert, private_key=key, ca_certificates=cert)


def test_store_and_echo_over_tls(start_scp, tmp_path, certificate):
    scp = start_scp(tls=certificate.model_dump())
    secure = Peer("DICOM_NODE", "127.0.0.1", scp.port, certificate)
    assert echo(secure, calling_ae="TLSSCU") == 0
    write_cr(tmp_path / "cr.dcm")
    [outcome] = store_files([tmp_path / "cr.dcm"], secure, calling_ae="TLSSCU")
    assert outcome.status == 0
    with pytest.raises(PeerError):  # a plain-TCP peer gets no association
        echo(Peer("DICOM_NODE", "127.0.0.1", scp.port), calling_ae="PLAIN", timeout_s=5)
