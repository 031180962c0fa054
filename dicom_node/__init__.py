"""dicom-node: a DICOM node that analyses chest X-rays beside a PACS."""

__version__ = "0.1.0"
