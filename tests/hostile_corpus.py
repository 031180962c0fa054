"""A corpus of hostile and broken C-STORE inputs, written by the tests themselves.

Each :class:`HostileCase` writes one file (sent as it is, not repaired by the SCU) and
names the statuses the SCP may answer. Cases the SCP stores go on to the quality gate
and the pipeline, which must skip them or fail them with a reason (only the controls,
frontal adult chests, are analysed).

    python -m tests.hostile_corpus OUT_DIR    # writes the files and prints the list
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from tests.conftest import sample_file
from tests.dicom_factory import make_cr

STORED = frozenset({0x0000})
NOT_UNDERSTOOD = frozenset({0xC210})


@dataclass(frozen=True)
class HostileCase:
    """One input: a name, how to write its file, and the statuses the SCP may answer."""

    name: str
    write: Callable[[Path], None]
    statuses: frozenset[int]
    analysed: bool = False  # a control: a frontal adult chest the pipeline must analyse


def _saved(change: Callable[[Dataset], None], *, base: Callable[[], Dataset] | None = None,
           enforce: bool = False) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        ds = base() if base else make_cr(size=128)
        change(ds)
        ds.save_as(path, enforce_file_format=enforce)
    return write


def _rg1() -> Dataset:
    ds = dcmread(sample_file("RG1_UNCR.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid() for _ in range(3))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _cut(keep: Callable[[bytes], int]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        make_cr(size=128).save_as(path, enforce_file_format=True)
        data = path.read_bytes()
        path.write_bytes(data[: keep(data)])
    return write


def _pixel_header(data: bytes) -> int:
    return data.rfind(b"\xe0\x7f\x10\x00")


def _set(**values: object) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for keyword, value in values.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
    return change


def _pixels(shape: tuple[int, ...], dtype: type, **attributes: object) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        array = np.random.default_rng(0).integers(0, 200, shape).astype(dtype)
        ds.PixelData = array.tobytes()
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
    return change


def _lut(ds: Dataset) -> None:
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "OW", np.arange(4096, dtype=np.uint16).tobytes())  # LUT Data
    ds.VOILUTSequence = [item]


def _broken_lut(ds: Dataset) -> None:
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    ds.VOILUTSequence = [item]  # no LUTData


def _private_blob(size: int) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        ds.add_new(0x00110010, "LO", "HOSTILE")
        ds.add_new(0x00111001, "OB", b"\x00" * size)
    return change


def _deep(depth: int) -> Callable[[Path], None]:
    """Write a CR with a private sequence nested ``depth`` deep, as raw undefined-length items
    (pydicom's writer takes exponential time on such nesting)."""
    def element(tag: int, vr: bytes, value: bytes) -> bytes:
        return tag.to_bytes(4, "little")[2:] + tag.to_bytes(4, "little")[:2] + vr + len(value).to_bytes(2, "little") + value

    def write(path: Path) -> None:
        make_cr(size=128).save_as(path, enforce_file_format=True)
        sequence_start = b"\x11\x00\x01\x10SQ\x00\x00\xff\xff\xff\xff"
        item_start, item_end = b"\xfe\xff\x00\xe0\xff\xff\xff\xff", b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
        sequence_end = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
        creator = element(0x00110010, b"LO", b"HOSTILE ")
        nested = element(0x00111010, b"LO", b"leaf")
        for _ in range(depth):
            nested = creator + sequence_start + item_start + nested + item_end + sequence_end
        data = path.read_bytes()
        at = data.index(b"\x20\x00\x0d\x00")  # before (0020,000D): tags stay in ascending order
        path.write_bytes(data[:at] + nested + data[at:])
    return write


def _view_code(value: str, meaning: str) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SCT", meaning
        ds.ViewCodeSequence = [item]
        del ds.ViewPosition
    return change


def cases() -> list[HostileCase]:
    """Return every case of the corpus (more than 60)."""
    made = [
        HostileCase("control: RG1 frontal adult chest", _saved(lambda ds: None, base=_rg1), STORED, analysed=True),
        HostileCase("control: RG1 without birth date", _saved(_set(PatientBirthDate=None, PatientAge="060Y"), base=_rg1),
                    STORED, analysed=True),
    ]
    # Truncations (a sender can only send what has a readable file meta): the data set, every part
    # of the pixel data element.
    for name, keep in {
        "cut in the first third": lambda d: len(d) // 3,
        "cut in the middle": lambda d: len(d) // 2, "cut at two thirds": lambda d: 2 * len(d) // 3,
        "cut at the pixel data value": lambda d: _pixel_header(d) + 12, "cut 2 bytes into the pixel header": lambda d: _pixel_header(d) + 2,
        "cut 6 bytes into the pixel header": lambda d: _pixel_header(d) + 6,
        "cut 10 bytes into the pixel header": lambda d: _pixel_header(d) + 10,
        "cut in the pixel data": lambda d: len(d) - 1000, "cut one byte short": lambda d: len(d) - 1,
    }.items():
        made.append(HostileCase(f"truncated: {name}", _cut(keep), NOT_UNDERSTOOD))
    # File meta and UIDs (the request's SOP Instance UID comes from the file meta).
    made += [
        HostileCase("meta says another SOP instance", _saved(
            lambda ds: setattr(ds.file_meta, "MediaStorageSOPInstanceUID", generate_uid())), NOT_UNDERSTOOD),
        HostileCase("no SOP Instance UID", _saved(_set(SOPInstanceUID=None)), NOT_UNDERSTOOD),
        HostileCase("no Study Instance UID", _saved(_set(StudyInstanceUID=None)), NOT_UNDERSTOOD),
        HostileCase("no Series Instance UID", _saved(_set(SeriesInstanceUID=None)), NOT_UNDERSTOOD),
    ]
    for attribute in ("StudyInstanceUID", "SeriesInstanceUID"):
        for label, uid in {"path characters": "1.2.3/../../etc", "letters": "1.2.abc", "leading zero": "1.2.03",
                           "65 characters": "1." + "2" * 63, "empty components": "1..2"}.items():
            made.append(HostileCase(f"{attribute} with {label}", _saved(_set(**{attribute: uid})), NOT_UNDERSTOOD))
    # Wrong or absurd attributes: stored (a valid data set), then skipped or failed with a reason.
    for name, change in {
        "Modality CT": _set(Modality="CT"), "Modality missing": _set(Modality=None),
        "body part HAND": _set(BodyPartExamined="HAND"), "view LL": _set(ViewPosition="LL"),
        "lateral by view code": _view_code("399198007", "right lateral"),
        "child by age 7Y": _set(PatientAge="7Y", PatientBirthDate=""),
        "child by birth date": _set(PatientBirthDate="20200101"),
        "age malformed 00010M": _set(PatientAge="00010M", PatientBirthDate=""),
        "birth date nonsense": _set(PatientBirthDate="19991399"),
        "PatientAge not an age": _set(PatientAge="old"),
        "Rows 0": _set(Rows=0), "Columns 0": _set(Columns=0), "Rows 65535": _set(Rows=65535),
        "BitsAllocated 7": _set(BitsAllocated=7), "BitsStored 40": _set(BitsStored=40),
        "HighBit 30": _set(HighBit=30), "PixelRepresentation 5": _set(PixelRepresentation=5),
        "SamplesPerPixel 3 on gray data": _set(SamplesPerPixel=3),
        "photometric RGB": _pixels((128, 128, 3), np.uint8, PhotometricInterpretation="RGB", SamplesPerPixel=3,
                                   BitsAllocated=8, BitsStored=8, HighBit=7, PlanarConfiguration=0),
        "photometric PALETTE COLOR": _set(PhotometricInterpretation="PALETTE COLOR"),
        "photometric missing": _set(PhotometricInterpretation=None),
        "1-bit pixels": _pixels((128 * 128 // 8,), np.uint8, BitsAllocated=1, BitsStored=1, HighBit=0),
        "multi-frame": _pixels((3, 128, 128), np.uint16, NumberOfFrames=3),
        "NumberOfFrames 0": _set(NumberOfFrames=0),
        "pixel data empty": _set(PixelData=b""), "pixel data missing": _set(PixelData=None),
        "pixel data too short": _set(PixelData=b"\x00" * 100),
        "pixel data all zero": _set(PixelData=b"\x00" * 128 * 128 * 2),
        "RescaleSlope 0": _set(RescaleSlope=0, RescaleIntercept=100),
        "window width 0": _set(WindowCenter=100, WindowWidth=0),
        "VOI LUT sequence": _lut, "VOI LUT without data": _broken_lut,
        "character set unknown": _set(SpecificCharacterSet="ISO_IR 999"),
        "character set Latin-1 name": _set(SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Jürgen"),
        "private element of 1 MiB": _private_blob(2**20),
        "noise image that says chest": lambda ds: None,
    }.items():
        made.append(HostileCase(f"stored, then not analysed: {name}", _saved(change), STORED))
    made.append(HostileCase("private sequences nested 300 deep", _deep(300), NOT_UNDERSTOOD))
    made.append(HostileCase("stored, then not analysed: private sequences nested 20 deep", _deep(20), STORED))
    made.append(HostileCase("over the size limit (private element of 12 MiB)", _saved(_private_blob(12 * 2**20)),
                            frozenset({0xA700})))
    made.append(HostileCase("SOP class differs from the request", _saved(_set(SOPClassUID="1.2.840.10008.5.1.4.1.1.7")),
                            frozenset({0xA900})))
    return made


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for index, case in enumerate(cases()):
        case.write(out / f"{index:03d}.dcm")
        print(f"{index:03d} {case.name}")


if __name__ == "__main__":
    main()
