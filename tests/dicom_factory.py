"""Small, valid DICOM files made by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    DigitalMammographyXRayImageStorageForPresentation, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID,
    generate_uid,
)

from tests.conftest import sample_file

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
TEST_PATIENT_NAME = "Testperson^Erika"
TEST_PATIENT_ID = "PID-4711-SECRET"


def make_cr(*, study_uid: str | None = None, series_uid: str | None = None,
            sop_uid: str | None = None, size: int = 64, body_part: str = "CHEST",
            patient_id: str = TEST_PATIENT_ID, patient_name: str = TEST_PATIENT_NAME,
            seed: int = 0) -> Dataset:
    """Return a small 12-bit MONOCHROME2 CR image with distinct UIDs."""
    ds = Dataset()
    ds.preamble = b"\x00" * 128
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = "CR"
    ds.Manufacturer = "dicom-node tests"
    ds.PatientOrientation = ["A", "F"]
    ds.BodyPartExamined = body_part
    ds.ViewPosition = "PA"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    pixels = np.random.default_rng(seed).integers(0, 4096, (size, size), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    return ds


def write_cr(path: Path, **kwargs: object) -> Dataset:
    """Write :func:`make_cr` to ``path`` as a DICOM file and return the data set."""
    ds = make_cr(**kwargs)  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def write_rg1_study(path: Path, **attributes: object) -> Dataset:
    """Write pydicom-data's chest CR RG1 (lossless) as a new one-image study (new Study, Series and
    SOP Instance UIDs), with ``attributes`` set (e.g. ``PixelSpacing``); return the data set."""
    ds = dcmread(sample_file("RG1_UNCR.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid() for _ in range(3))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return ds


def write_mg(path: Path, study_uid: str) -> Dataset:
    """Write a 128 x 128 MG image (the test pipeline ``bright``'s): a ramp from dark (left) to bright (right)."""
    ds = make_cr(study_uid=study_uid, size=128, body_part="BREAST")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DigitalMammographyXRayImageStorageForPresentation
    ds.Modality = "MG"
    ds.ImagerPixelSpacing = [0.1, 0.1]
    ds.Laterality = "L"
    del ds.ViewPosition
    ds.PixelData = np.tile(np.linspace(0, 4095, 128).astype(np.uint16), (128, 1)).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds
