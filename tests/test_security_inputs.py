"""Bounded inputs against a real ``serve``: a deflate bomb and a pixel bomb are refused before they
cost memory, a legitimate deflated image is kept inflated, and the gate skips an image over the pixel
budget before anything decodes it. Each bomb's peak RSS (VmHWM) is asserted and printed.

    python -m tests.test_security_inputs OUT_DIR    # writes the bombs, to try them on any node
"""

from __future__ import annotations

import io
import json
import sqlite3
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import _config

from dicom_node.db import Instance
from pipelines.chest_xray.gate import check_chest_radiograph
from pipelines.chest_xray.preprocess import load_dataset
from tests.conftest import NodeProcess, dataset_bytes, store_as_is
from tests.dicom_factory import make_cr, write_rg1_study
from tests.test_pipeline import MANIFEST

MIB = 2**20
BOMB_INFLATED = 1024 * MIB
"""What the deflate bomb inflates to: 1 GiB of zeros, sent as about 1 MiB."""
SERVE_RSS_BOUND = 600 * MIB
ANALYZE_RSS_BOUND = 1536 * MIB
PIXEL_BOMB_SIDE = 12000


@pytest.fixture(autouse=True)
def send_files_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the test SCU put a file on the wire as it is: deflated, or with a lying J2K codestream."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def write_deflate_bomb(path: Path, inflated: int = BOMB_INFLATED) -> Dataset:
    """Write a deflated CR whose data set ends in a private OB element of ``inflated`` zero bytes;
    return the data set without that element. The deflate stream repeats one full-flushed block of
    16 MiB of zeros, so the file is written in a fraction of a second."""
    ds = make_cr(size=16)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    block = 16 * MIB
    blob = (b"\xe1\x7f\x10\x00LO\x04\x00BOMB"  # (7FE1,0010) private creator, then (7FE1,1000) OB
            + b"\xe1\x7f\x00\x10OB\x00\x00" + (inflated // block * block).to_bytes(4, "little"))
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    meta = DicomBytesIO()
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    zeros = deflater.compress(bytes(block)) + deflater.flush(zlib.Z_FULL_FLUSH)
    with path.open("wb") as fp:
        fp.write(b"\x00" * 128 + b"DICM" + meta.getvalue())
        fp.write(deflater.compress(body.getvalue() + blob) + deflater.flush(zlib.Z_FULL_FLUSH))
        fp.write(zeros * (inflated // block))
        fp.write(deflater.flush())
    return ds


def write_pixel_bomb(path: Path, side: int = PIXEL_BOMB_SIDE) -> Dataset:
    """Write a JPEG 2000 lossless chest CR of a few hundred bytes that declares (and whose codestream
    decodes to) ``side`` x ``side`` pixels: a 64 x 64 codestream whose SIZ marker is made to say so."""
    encoded = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint16)).save(encoded, "JPEG2000", no_jp2=True, irreversible=False)
    codestream = bytearray(encoded.getvalue())
    siz = codestream.find(b"\xff\x51")
    struct.pack_into(">6I", codestream, siz + 6, side, side, 0, 0, side, side)  # image and tile size
    ds = make_cr(size=64)
    ds.PatientAge = "045Y"
    ds.Rows = ds.Columns = side
    ds.PixelData = encapsulate([bytes(codestream)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.save_as(path, enforce_file_format=True)
    return ds


def store(node: NodeProcess, path: Path, transfer_syntax: str) -> int:
    """Send ``path`` as it is to ``node`` with ``transfer_syntax``; return the C-STORE status."""
    return store_as_is(node.port, path, transfer_syntax)


def peak_rss(pid: int) -> int:
    """Return the peak resident set (VmHWM) of process ``pid``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def receiving_node(node_factory, **scp: object) -> NodeProcess:
    """Start ``serve --no-worker``: these tests are about what the SCP does."""
    node = node_factory({"scp": scp} if scp else None)
    node.command.append("--no-worker")
    return node.start()


def spooled(node: NodeProcess) -> list[Path]:
    return [p for p in (node.state_dir / "spool").rglob("*") if p.is_file()]


def audited(node: NodeProcess, event: str) -> list[tuple[str, str]]:
    with sqlite3.connect(node.state_dir / "audit.db") as connection:
        return connection.execute("SELECT sop_uid, detail FROM audit_events WHERE event = ?", (event,)).fetchall()


def test_a_deflate_bomb_is_refused_before_it_is_inflated_in_memory(node_factory, tmp_path):
    node = receiving_node(node_factory)  # the default limit: 256 MiB inflated
    write_deflate_bomb(tmp_path / "bomb.dcm")
    assert (tmp_path / "bomb.dcm").stat().st_size < 2 * MIB
    assert store(node, tmp_path / "bomb.dcm", DeflatedExplicitVRLittleEndian) == 0xA700
    assert node.process is not None
    peak = peak_rss(node.process.pid)
    print(f"serve's peak RSS after a deflate bomb of {BOMB_INFLATED // MIB} MiB: {peak / MIB:.0f} MiB")
    assert peak < SERVE_RSS_BOUND
    assert spooled(node) == [] and node.rows(Instance) == []
    [(sop_uid, detail)] = audited(node, "instance-rejected")
    assert sop_uid is None and "scp.max_dataset_mb" in detail  # refused before its header was read
    write_rg1_study(tmp_path / "ok.dcm")
    assert store(node, tmp_path / "ok.dcm", ExplicitVRLittleEndian) == 0x0000


def test_a_deflated_image_is_kept_inflated_and_is_analysable(node_factory, tmp_path):
    node = receiving_node(node_factory)
    sent = write_rg1_study(tmp_path / "rg1.dcm")
    sent.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    sent.save_as(tmp_path / "deflated.dcm")
    assert store(node, tmp_path / "deflated.dcm", DeflatedExplicitVRLittleEndian) == 0x0000
    [instance] = node.rows(Instance)
    assert instance.transfer_syntax_uid == ExplicitVRLittleEndian
    kept = dcmread(instance.path)
    assert kept.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert dataset_bytes(Path(instance.path))[:2] == b"\x08\x00"  # the group length leads to the data set
    assert np.array_equal(kept.pixel_array, sent.pixel_array)
    assert Path(instance.path).stat().st_size == instance.size_bytes
    assert check_chest_radiograph(kept).accepted
    assert load_dataset(kept).display.shape == sent.pixel_array.shape
    assert not list((node.state_dir / "spool" / ".incoming").iterdir())


def test_a_pixel_bomb_is_refused_at_the_scp_and_audited(node_factory, tmp_path):
    node = receiving_node(node_factory)
    bomb = write_pixel_bomb(tmp_path / "pixel-bomb.dcm")
    assert (tmp_path / "pixel-bomb.dcm").stat().st_size < 2048
    assert store(node, tmp_path / "pixel-bomb.dcm", JPEG2000Lossless) == 0xA700
    assert spooled(node) == [] and node.rows(Instance) == []
    [(sop_uid, detail)] = audited(node, "instance-rejected")
    assert sop_uid == bomb.SOPInstanceUID
    assert "144.0 megapixels" in detail and "scp.max_image_megapixels" in detail
    assert node.process is not None and peak_rss(node.process.pid) < SERVE_RSS_BOUND
    # the budget is the setting's: raised, the same image is kept (the gate decides later)
    node.stop()
    raised = receiving_node(node_factory, max_image_megapixels=150)
    assert store(raised, tmp_path / "pixel-bomb.dcm", JPEG2000Lossless) == 0x0000


#: Runs its arguments as a Python command in a child it forks and prints that child's peak RSS (KiB).
#: A process started from the test process directly would report the test process's own peak: at
#: exec, Linux keeps the high-water mark of the memory the child was started with (vfork shares it).
PEAK_RSS_OF_CHILD = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def analyze(tmp_path: Path, path: Path) -> tuple[dict[str, object], int]:
    """Run ``dicom-node analyze PATH`` in a child process; return its JSON record and its peak RSS."""
    config = tmp_path / "analyze.yaml"
    config.write_text(json.dumps({"state_dir": str(tmp_path / "analyze-state")}))
    output = tmp_path / "analyze.json"
    with output.open("wb") as stdout:
        child = subprocess.run([sys.executable, "-c", PEAK_RSS_OF_CHILD, "-m", "dicom_node", "--config", str(config),
                                "analyze", str(path), "--out", str(tmp_path / "analyze-out"), "--format", "json",
                                "--weights", str(MANIFEST), "--device", "cpu"],
                               stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=600)
    assert child.returncode == 0, f"dicom-node analyze exited with {child.returncode}: {child.stderr[-2000:]}"
    [record] = json.loads(output.read_text())
    return record, int(child.stderr.split()[-1]) * 1024


def test_the_gate_skips_an_image_over_the_budget_before_decoding(tmp_path):
    """A file that reaches the pipeline without the SCP (``dicom-node analyze FILE``, a spool an older
    node wrote) is skipped by the tag gate, with the reason, and never decoded."""
    write_pixel_bomb(tmp_path / "pixel-bomb.dcm")
    record, peak = analyze(tmp_path, tmp_path / "pixel-bomb.dcm")
    print(f"dicom-node analyze's peak RSS on the pixel bomb: {peak / MIB:.0f} MiB")
    skipped = str(record.get("skipped"))
    assert "144.0 megapixels" in skipped and "scp.max_image_megapixels" in skipped and "not decoded" in skipped
    assert peak < ANALYZE_RSS_BOUND


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    write_deflate_bomb(out / "deflate-bomb.dcm")
    write_pixel_bomb(out / "pixel-bomb.dcm")
    print("\n".join(str(p) for p in sorted(out.iterdir())))


if __name__ == "__main__":
    main()
