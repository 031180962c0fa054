"""A site model's manifest: one YAML file that says which TorchScript model or MONAI bundle to run,
on which images, how to feed it, what its outputs mean and how it was validated.

Reading it needs YAML and pydantic only (no torch): the node reads it before any model is built.
Every problem is a :class:`pipelines.errors.WeightsError` naming the manifest and the key.
See docs/site-model.md for the reference and a full example.
"""

from __future__ import annotations

import hashlib
import json
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydicom.sr.coding import Code

from pipelines.base import sha256_file
from pipelines.errors import WeightsError

SHA256 = re.compile(r"^[0-9a-f]{64}$")
Unit = Annotated[float, Field(ge=0, le=1)]
Colour = tuple[Annotated[int, Field(ge=0, le=255)], Annotated[int, Field(ge=0, le=255)],
               Annotated[int, Field(ge=0, le=255)]]
#: The files of a MONAI bundle the node reads, relative to its folder.
BUNDLE_MODEL = "models/model.ts"
BUNDLE_METADATA = "configs/metadata.json"
#: The segment of a classification model's results: the whole image, which the model reads.
ASSESSED = "assessed_area"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeSpec(Strict):
    """A coded concept: ``{value: "36118008", scheme: SCT, meaning: Pneumothorax}``."""

    value: str = Field(min_length=1, max_length=64)
    scheme: str = Field(min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)

    def code(self) -> Code:
        return Code(self.value, self.scheme, self.meaning)


class ModelFiles(Strict):
    """``torchscript: model.pt`` with its ``sha256``, or ``monai_bundle: <folder>`` with the sha256 of
    its ``models/model.ts`` and ``configs/metadata.json``; paths relative to the manifest."""

    torchscript: Path | None = None
    monai_bundle: Path | None = None
    sha256: str | dict[str, str]

    @field_validator("sha256", mode="before")
    @classmethod
    def _digests(cls, value: object) -> object:
        digests = value.values() if isinstance(value, dict) else [value]
        if not all(isinstance(d, str) and SHA256.match(d) for d in digests):
            raise ValueError("give a digest as a quoted string of 64 lower-case hex digits (sha256sum's output), "
                             "for a bundle a mapping of its files to their digests")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        if (self.torchscript is None) == (self.monai_bundle is None):
            raise ValueError("give exactly one of torchscript (a .pt file) or monai_bundle (a bundle folder)")
        if self.torchscript is not None and not isinstance(self.sha256, str):
            raise ValueError("sha256 of a torchscript model is the file's digest (64 hex digits)")
        if self.monai_bundle is not None:
            needed = {BUNDLE_MODEL, BUNDLE_METADATA}
            if not isinstance(self.sha256, dict) or set(self.sha256) != needed:
                raise ValueError(f"sha256 of a monai_bundle maps exactly {sorted(needed)} to their digests")
        return self

    def files(self, root: Path) -> dict[Path, str]:
        """Return each model file's path (``root``: the manifest's folder) and its recorded sha256."""
        if self.torchscript is not None:
            return {root / self.torchscript: str(self.sha256)}
        assert isinstance(self.sha256, dict) and self.monai_bundle is not None
        return {root / self.monai_bundle / name: digest for name, digest in self.sha256.items()}

    def model_path(self, root: Path) -> Path:
        """Return the TorchScript file to load."""
        return root / self.torchscript if self.torchscript is not None else root / self.monai_bundle / BUNDLE_MODEL


class Normalize(StrEnum):
    """How pixel values (after the Modality LUT) become the model's input: ``minmax`` to [0, 1] per
    image, ``zscore`` to mean 0 and deviation 1 per image, ``window`` a fixed window to [0, 1]."""

    MINMAX = "minmax"
    ZSCORE = "zscore"
    WINDOW = "window"


class Window(Strict):
    center: float
    width: float = Field(gt=0)


class InputSpec(Strict):
    """The images accepted (the tag gate) and how they are fed to the model.

    ``size`` (rows, columns) and ``channels`` may be left to a MONAI bundle's metadata.json;
    ``body_parts``, when given, lists the BodyPartExamined values accepted (a stated other
    value skips; a missing one does not). ``min_size`` is the smallest side, in pixels, of an
    image the model can read. MONOCHROME1 images are inverted to MONOCHROME2 unless
    ``invert_monochrome1`` is false.
    """

    sop_classes: list[str] = Field(min_length=1)
    modalities: list[str] = Field(min_length=1)
    body_parts: list[str] = []
    size: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] | None = None
    channels: Annotated[int, Field(ge=1, le=4)] | None = None
    normalize: Normalize = Normalize.MINMAX
    window: Window | None = None
    invert_monochrome1: bool = True
    min_size: int = Field(32, ge=1)

    @field_validator("modalities", "body_parts")
    @classmethod
    def _upper(cls, values: list[str]) -> list[str]:
        return [value.strip().upper() for value in values]

    @model_validator(mode="after")
    def _window_given(self) -> Self:
        if (self.normalize is Normalize.WINDOW) != (self.window is not None):
            raise ValueError("window (center, width) is given exactly when normalize is window")
        return self


class Activation(StrEnum):
    """What turns the model's raw output into a probability: ``sigmoid`` of the value, ``softmax``
    over all classes (or channels), or ``none`` (the model outputs probabilities already)."""

    SIGMOID = "sigmoid"
    SOFTMAX = "softmax"
    NONE = "none"


Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,47}$", description="lower-case identifier")]


class Head(Strict):
    """A classification head: the probability of ``index`` of the model's (N, K) output.
    ``region`` names a segmentation channel whose mask localizes the finding when flagged."""

    name: Name
    display_name: str = Field(min_length=1, max_length=64)
    code: CodeSpec
    index: int = Field(ge=0)
    activation: Activation = Activation.SIGMOID
    threshold: Unit
    experimental: bool = False
    region: str | None = None


class Channel(Strict):
    """A segmentation channel: ``channel`` of the model's (N, C, H, W) output, resized back to the
    source and thresholded; its SEG segment's label, codes and colour."""

    name: Name
    label: str = Field(min_length=1, max_length=64)
    category: CodeSpec
    property_type: CodeSpec
    colour: Colour
    channel: int = Field(ge=0)
    threshold: Unit = 0.5
    legend: str | None = Field(None, max_length=64, description="the overlay's line for it; default 'Tint: <label>'")


class Outputs(Strict):
    classification: list[Head] = []
    segmentation: list[Channel] = []
    #: The activation over the segmentation channels.
    segmentation_activation: Activation = Activation.SIGMOID

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if not self.classification and not self.segmentation:
            raise ValueError("give at least one classification head or segmentation channel")
        names = [item.name for item in [*self.classification, *self.segmentation]]
        if len(set(names)) != len(names) or ASSESSED in names:
            raise ValueError(f"head and channel names must be distinct and not {ASSESSED!r}, got {names}")
        channels = {channel.name for channel in self.segmentation}
        for head in self.classification:
            if head.region is not None and head.region not in channels:
                raise ValueError(f"head {head.name}: region {head.region!r} is not a segmentation channel "
                                 f"(they are {sorted(channels)})")
        return self


class Figure(Strict):
    """A measured figure and its 95 % confidence interval: ``{value: 0.93, ci95: [0.91, 0.95]}``."""

    value: Unit
    ci95: tuple[Unit, Unit]

    @model_validator(mode="after")
    def _inside(self) -> Self:
        if not self.ci95[0] <= self.value <= self.ci95[1]:
            raise ValueError(f"ci95 {list(self.ci95)} must contain the value {self.value}")
        return self

    def text(self) -> str:
        return f"{self.value:.2f} ({self.ci95[0]:.2f}-{self.ci95[1]:.2f})"


class Metrics(Strict):
    auroc: Figure | None = None
    sensitivity: Figure | None = None
    specificity: Figure | None = None
    dice: Figure | None = None


class Validation(Strict):
    """How the model was validated: on which images (``dataset``), how many (``n``), and the
    figures of each head or channel, by name."""

    dataset: str = Field(min_length=1)
    n: int = Field(ge=1)
    metrics: dict[str, Metrics] = {}


class Manifest(Strict):
    """A site model: its identity, files, input, outputs and validation."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
    version: str = Field(min_length=1, max_length=16)
    model: ModelFiles
    input: InputSpec
    outputs: Outputs
    procedure: CodeSpec
    finding_site: CodeSpec | None = None
    description_prefix: str | None = Field(None, min_length=1, max_length=24)
    validation: Validation | None = None

    @model_validator(mode="after")
    def _validated(self) -> Self:
        named = {item.name for item in [*self.outputs.classification, *self.outputs.segmentation]}
        metrics = self.validation.metrics if self.validation else {}
        if unknown := sorted(set(metrics) - named):
            raise ValueError(f"validation.metrics names {unknown}, which are not heads or channels")
        if self.model.torchscript is not None and (self.input.size is None or self.input.channels is None):
            raise ValueError("input.size and input.channels are required for a torchscript model")
        for head in self.outputs.classification:
            if not head.experimental and (head.name not in metrics or metrics[head.name].auroc is None):
                raise ValueError(f"head {head.name} is not experimental, so validation.metrics.{head.name}.auroc "
                                 "is required (an unvalidated head may only be experimental)")
        return self

    def validation_lines(self) -> list[str]:
        """Return the validation figures as short lines (at most 64 characters each)."""
        if self.validation is None:
            return []
        lines = [f"validated n={self.validation.n}: {self.validation.dataset}"[:64]]
        for name, metrics in self.validation.metrics.items():
            figures = [f"{label} {figure.text()}" for label, figure in
                       [("AUROC", metrics.auroc), ("sens", metrics.sensitivity), ("spec", metrics.specificity),
                        ("Dice", metrics.dice)] if figure is not None]
            lines.append(f"{name}: {', '.join(figures)}"[:64])
        return lines


def _problems(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(manifest)'}: {e['msg']}" for e in error.errors())


def read_manifest(path: Path) -> tuple[Manifest, str]:
    """Return the manifest at ``path`` and the sha256 of its bytes (part of the model's identity).

    Raises :class:`WeightsError` naming the file when it is missing or not YAML, or naming each
    key that is missing, unknown or invalid.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"site model manifest not found or unreadable: {path} ({type(exc).__name__})") from exc
    try:
        content = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise WeightsError(f"site model manifest {path} is not valid YAML") from exc
    if not isinstance(content, dict):
        raise WeightsError(f"site model manifest {path} must be a mapping of keys")
    try:
        return Manifest.model_validate(content), hashlib.sha256(data).hexdigest()
    except ValidationError as exc:
        raise WeightsError(f"site model manifest {path}: {_problems(exc)}") from exc


def verify_files(manifest: Manifest, root: Path) -> None:
    """Check each model file (``root``: the manifest's folder) against its sha256, loading nothing.

    Raises :class:`WeightsError` naming the file that is missing or altered.
    """
    for path, expected in manifest.model.files(root).items():
        if not path.is_file():
            raise WeightsError(f"site model file missing: {path}")
        if sha256_file(path) != expected:
            raise WeightsError(f"site model file altered: {path} does not match its sha256 in the manifest")


def model_input(manifest: Manifest, root: Path) -> tuple[tuple[int, int], int]:
    """Return the model's input size (rows, columns) and channels: the manifest's, else those of the
    MONAI bundle's metadata.json (``network_data_format.inputs``' first, its ``spatial_shape`` and
    ``num_channels``). Raises :class:`WeightsError` when they are missing or the two disagree."""
    size, channels = manifest.input.size, manifest.input.channels
    if manifest.model.monai_bundle is not None:
        metadata = root / manifest.model.monai_bundle / BUNDLE_METADATA
        try:
            inputs = json.loads(metadata.read_text())["network_data_format"]["inputs"]
            spec: dict[str, Any] = inputs.get("image") or next(iter(inputs.values()))
            bundle_size = tuple(int(v) for v in spec["spatial_shape"])
            bundle_channels = int(spec["num_channels"])
        except (OSError, ValueError, KeyError, TypeError, StopIteration, AttributeError) as exc:
            raise WeightsError(f"{metadata}: network_data_format.inputs needs spatial_shape and num_channels "
                               f"({type(exc).__name__})") from exc
        if len(bundle_size) != 2:
            raise WeightsError(f"{metadata}: spatial_shape {list(bundle_size)} is not 2-D")
        if (size is not None and tuple(size) != bundle_size) or (channels is not None and channels != bundle_channels):
            raise WeightsError(f"input.size / input.channels of the manifest disagree with {metadata}")
        size, channels = bundle_size, bundle_channels
    assert size is not None and channels is not None  # a torchscript manifest must give both
    return (int(size[0]), int(size[1])), int(channels)
