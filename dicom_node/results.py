"""Where an analysed instance's results live: ``results/<study>/<sop>/<pipeline>/``.

``findings.json`` (scores, thresholds, flags; no patient data) and, once written, one DICOM file
per output kind: the masks and regions are in the SEG, the heat-maps in the SC.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.base import ImageResult


def result_dir(results_root: Path, study_uid: str, sop_uid: str, pipeline: str | None = None) -> Path:
    """Return the folder of one instance's results, or of one pipeline's results of it (UIDs are
    validated by the spool, pipeline names by the settings)."""
    folder = results_root / study_uid / sop_uid
    return folder / pipeline if pipeline else folder


def findings_summary(result: ImageResult) -> list[dict[str, object]]:
    """Return the findings as plain data: name, probability, threshold, flagged, experimental."""
    return [
        {"name": f.name, "display_name": f.display_name, "probability": round(f.probability, 4),
         "threshold": f.threshold, "flagged": f.flagged, "experimental": f.experimental}
        for f in result.findings
    ]


def save_findings(folder: Path, result: ImageResult, model_version: str) -> None:
    """Write the findings of ``result`` into ``folder`` (created, replaced when it exists)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    summary = {"sop_instance_uid": result.sop_instance_uid, "model_version": model_version,
               "findings": findings_summary(result)}
    (folder / "findings.json").write_text(json.dumps(summary, indent=2))
