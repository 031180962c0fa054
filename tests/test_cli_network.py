"""`dicom-node echo` and `dicom-node send` against a real SCP (the node's own, in process)."""

from __future__ import annotations

from click.testing import CliRunner

from dicom_node.cli import main
from tests.conftest import free_port, sample_file
from tests.receiving_scp import ReceivingSCP


def test_echo_and_send_to_a_peer(tmp_path):
    pacs = ReceivingSCP().start()
    try:
        runner = CliRunner()
        echoed = runner.invoke(main, ["echo", f"PACS@127.0.0.1:{pacs.port}"])
        assert echoed.exit_code == 0, echoed.output
        assert "0x0000" in echoed.output
        files = [str(sample_file("RG1_J2KR.dcm")), str(sample_file("RG3_UNCI.dcm"))]
        sent = runner.invoke(main, ["send", *files, "--to", f"PACS@127.0.0.1:{pacs.port}"])
        assert sent.exit_code == 0, sent.output
        assert len(pacs.stored) == 2
    finally:
        pacs.stop()


def test_send_reports_an_unreachable_peer_and_a_bad_address(tmp_path):
    runner = CliRunner()
    unreachable = runner.invoke(main, ["send", str(sample_file("RG3_UNCI.dcm")),
                                       "--to", f"PACS@127.0.0.1:{free_port()}"])
    assert unreachable.exit_code == 1
    assert "retry" in unreachable.output and "0 of 1 stored" in unreachable.output
    malformed = runner.invoke(main, ["echo", "no-port-here"])
    assert malformed.exit_code == 2
    assert "AE@HOST:PORT" in malformed.output
    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("not DICOM")
    bad_file = runner.invoke(main, ["send", str(not_dicom), "--to", "PACS@127.0.0.1:104"])
    assert bad_file.exit_code == 1 and "not a readable DICOM file" in bad_file.output
