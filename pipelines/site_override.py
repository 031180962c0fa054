"""A site's own finding thresholds for one pipeline: versioned files
``<state_dir>/site/<pipeline>/override-vN.yaml`` that ``dicom-node calibrate --write``
writes and a plug-in reads when it builds its pipeline (the newest one, unless its
``site_override`` option names another file or null).

An override names the model whose scores it was calibrated on (``model_version``):
thresholds fitted to one model's scores mean nothing for another's, so a plug-in
refuses to start with an override of other weights.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipelines.errors import WeightsError

#: The name of an override file; N counts up from 1 per pipeline.
OVERRIDE_NAME = re.compile(r"^override-v([1-9][0-9]*)\.yaml$")


@dataclass(frozen=True)
class SiteOverride:
    """One override file: its path and version, the thresholds by finding name, and the
    ``model_version`` (the results' ``model_version``) it was calibrated on."""

    path: Path
    version: int
    thresholds: dict[str, float]
    model_version: str

    def check_models(self, model_versions: str) -> None:
        """Raise :class:`WeightsError` unless the override was calibrated on the models
        ``model_versions`` (a pipeline's, each with its weights digest)."""
        if model_versions not in self.model_version:
            raise WeightsError(
                f"site override {self.path} was calibrated on other weights ({self.model_version}): "
                "calibrate again, or set the pipeline's site_override option to null")


def override_folder(state_dir: Path, pipeline: str) -> Path:
    """Return the folder of ``pipeline``'s overrides in the state folder ``state_dir``."""
    return Path(state_dir) / "site" / pipeline


def override_versions(folder: Path) -> dict[int, Path]:
    """Return the override files in ``folder`` by version (empty when there is none)."""
    if not folder.is_dir():
        return {}
    found = {path: OVERRIDE_NAME.match(path.name) for path in folder.iterdir()}
    return {int(match.group(1)): path for path, match in found.items() if match}


def newest_override(folder: Path) -> Path | None:
    """Return the override of the highest version in ``folder``, or None."""
    versions = override_versions(folder)
    return versions[max(versions)] if versions else None


def read_override(path: Path) -> SiteOverride:
    """Return the override at ``path``.

    Raises :class:`WeightsError` when it is missing, not named ``override-vN.yaml``, or
    lacks a model version or thresholds in [0, 1] by finding name.
    """
    match = OVERRIDE_NAME.match(path.name)
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise WeightsError(f"site override {path} cannot be read: {type(exc).__name__}") from exc
    thresholds = content.get("thresholds") if isinstance(content, dict) else None
    model_version = content.get("model_version") if isinstance(content, dict) else None
    valid = (isinstance(model_version, str) and isinstance(thresholds, dict) and thresholds
             and all(isinstance(name, str) and isinstance(value, int | float) and not isinstance(value, bool)
                     and math.isfinite(value) and 0 <= value <= 1 for name, value in thresholds.items()))
    if match is None or not valid:
        raise WeightsError(f"site override {path} is not an override-vN.yaml with a model_version and "
                           "thresholds in [0, 1] by finding name")
    return SiteOverride(path, int(match.group(1)), {str(k): float(v) for k, v in thresholds.items()},  # type: ignore[union-attr]
                        str(model_version))
