"""DICOM TLS: the SCP and the SCU with a certificate made by the test (openssl)."""

from __future__ import annotations

import pytest

from dicom_node.errors import PeerError
from dicom_node.scu import Peer, echo, store_files
from tests.dicom_factory import write_cr


def test_store_and_echo_over_tls(start_scp, tmp_path, certificate):
    scp = start_scp(tls=certificate.model_dump())
    secure = Peer("DICOM_NODE", "127.0.0.1", scp.port, certificate)
    assert echo(secure, calling_ae="TLSSCU") == 0
    write_cr(tmp_path / "cr.dcm")
    [outcome] = store_files([tmp_path / "cr.dcm"], secure, calling_ae="TLSSCU")
    assert outcome.status == 0
    with pytest.raises(PeerError):  # a plain-TCP peer gets no association
        echo(Peer("DICOM_NODE", "127.0.0.1", scp.port), calling_ae="PLAIN", timeout_s=5)
