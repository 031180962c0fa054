"""The contract between the node and an analysis pipeline.

A pipeline gates a DICOM data set (``accepts``), turns an accepted one into an
:class:`ImageInput` (``load``) and analyses inputs into :class:`ImageResult`
objects (``run``). It imports no Celery, network or database code, so it can be
run and tested on a numpy array.

A pipeline reaches the node as a :class:`PipelinePlugin`, found by its entry point
in the group :data:`GROUP`: its name, options, weights check, accepted SOP classes
and modalities, and the :class:`OutputDescription` the node's writers draw and code
its results with. The node and its writers import this module only::

    [project.entry-points."dicom_node.pipelines"]
    chest_xray = "pipelines.chest_xray.plugin:ChestXrayPlugin"
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import pydicom
from pydantic import BaseModel, ConfigDict
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.coding import Code

from pipelines.errors import InputError, SkippedByGate

#: The entry point group pipelines are found in.
GROUP = "dicom_node.pipelines"


def pixel_spacing(dataset: Dataset) -> tuple[float, float] | None:
    """Return the data set's Pixel Spacing, or else its Imager Pixel Spacing, in mm, when usable:
    two finite values > 0. Anything else is no spacing (None): RG1's ``0\\0``, one value,
    a negative, NaN or infinite value, or one that is not a number (``a\\b``)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = dataset.get(keyword)
            values = [float(v) for v in value] if isinstance(value, MultiValue) else []
        except (TypeError, ValueError):  # not numbers: pydicom cannot convert the DS values
            continue
        if len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values):
            return values[0], values[1]
    return None


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of the file at ``path`` (a weights file checked against its manifest)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_device(device: str | Any) -> Any:
    """Return the torch device for ``auto`` (CUDA when present, else CPU) or a named one (``cuda:1``)."""
    import torch  # only where a pipeline is built

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class GateVerdict:
    """The quality gate's answer for one data set: accepted, or skipped with a reason.

    ``caveats`` are short phrases an accepted image's results must show (``age unknown``).
    """

    accepted: bool
    reason: str = ""
    caveats: tuple[str, ...] = ()

    @classmethod
    def accept(cls, caveats: tuple[str, ...] = ()) -> GateVerdict:
        return cls(True, "", tuple(caveats))

    @classmethod
    def skip(cls, reason: str) -> GateVerdict:
        return cls(False, reason)


@dataclass
class ImageInput:
    """One image ready for analysis.

    ``pixels`` is 2-D float32 at the source resolution, after the Modality LUT,
    oriented so that higher values are brighter (MONOCHROME2). ``display`` is the
    same image windowed to uint8 for overlays.
    """

    sop_instance_uid: str
    pixels: np.ndarray
    display: np.ndarray
    pixel_spacing_mm: tuple[float, float] | None = None


@dataclass
class Finding:
    """One finding's score for one image.

    ``heatmap`` is float32 in [0, 1] at the source resolution and zero outside the
    region assessed; ``region`` is the localized boolean region (set when flagged).
    ``experimental`` heads report a score but are never flagged.
    """

    name: str
    display_name: str
    probability: float
    threshold: float
    flagged: bool
    experimental: bool
    heatmap: np.ndarray | None = None
    region: np.ndarray | None = None


@dataclass
class ImageResult:
    """Everything a pipeline says about one image.

    ``masks`` are boolean masks at the source resolution, keyed by the names of the
    pipeline's :attr:`OutputDescription.segments` (in that order in the SEG). ``verdict``
    is the image content check's: a skipped image has no findings and must yield no
    result objects.
    """

    sop_instance_uid: str
    masks: dict[str, np.ndarray]
    findings: list[Finding] = field(default_factory=list)
    verdict: GateVerdict = field(default_factory=GateVerdict.accept)

    @property
    def flagged(self) -> list[Finding]:
        return [f for f in self.findings if f.flagged]


@runtime_checkable
class Pipeline(Protocol):
    """What the node needs of an analysis pipeline."""

    name: str
    version: str
    model_versions: str
    """Each model's identity (name, architecture, weights digest), ``; ``-separated."""

    def accepts(self, dataset: Dataset) -> GateVerdict:
        """Return whether ``dataset``'s attributes allow analysing it, and why not (the tag gate)."""
        ...

    def load(self, dataset: Dataset) -> ImageInput:
        """Decode and normalise an accepted data set into an :class:`ImageInput`."""
        ...

    def run(self, inputs: Sequence[ImageInput]) -> list[ImageResult]:
        """Analyse ``inputs``; one result per input, in order. An input whose pixels fail the
        content check gets a result whose verdict says why, and no findings."""
        ...


@dataclass(frozen=True)
class Segment:
    """One mask a pipeline outputs for every analysed image: ``name`` its key in
    :attr:`ImageResult.masks` and its Tracking ID; ``label`` the SEG's Segment Label; its
    category and property type codes; its colour in the overlay and the SEG; ``legend``
    the overlay's line for it (``Green: lungs``)."""

    name: str
    label: str
    category: Code
    property_type: Code
    colour: tuple[int, int, int]
    legend: str


#: Draws a result over its image: (display uint8 H x W, masks by segment name, heat-map in [0, 1] or
#: None, flagged findings' regions) to an RGB uint8 H x W x 3 image. The writers frame it with the banner.
OverlayRenderer = Callable[[np.ndarray, Mapping[str, np.ndarray], "np.ndarray | None", Sequence[np.ndarray]],
                           np.ndarray]


@dataclass(frozen=True)
class OutputDescription:
    """How the writers show and code a pipeline's results.

    The first of ``segments`` is the region the findings were assessed in: an unflagged
    finding is outlined around it in the SR. ``finding_codes`` codes findings by name
    (others get a code of the node's local scheme); ``finding_site`` is where findings
    are (the SR's finding site, the SEG's anatomic region of a finding's segment), if
    anywhere in particular. A flagged finding's region is a segment of
    ``region_type`` drawn in ``region_colour``. ``heatmap_name`` names the heat-maps in
    the banner (``Grad-CAM``). ``caveat_notices`` gives the banner wording of the gate's caveats.
    ``show_experimental`` puts experimental heads' scores on the overlay's banner too (a site's
    choice); by default they are in the SR and the results only.
    """

    description_prefix: str
    content_label: str
    procedure: Code
    segments: tuple[Segment, ...]
    finding_codes: Mapping[str, Code]
    region_category: Code
    region_type: Code
    region_colour: tuple[int, int, int]
    region_legend: str
    heatmap_name: str
    render: OverlayRenderer
    finding_site: Code | None = None
    caveat_notices: Mapping[str, str] = field(default_factory=dict)
    show_experimental: bool = False

    def __post_init__(self) -> None:
        names = self.segment_names()
        if not names or len(set(names)) != len(names):
            raise ValueError(f"an output description needs one or more segments of distinct names, got {names}")

    def segment_names(self) -> list[str]:
        """Return the names of the segments, in SEG order."""
        return [segment.name for segment in self.segments]


class PipelineOptions(BaseModel):
    """A plug-in's options, read from the node's settings. ``manifest`` is its weights manifest
    (None: the plug-in's bundled one, or none needed); a plug-in's own options subclass this."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest: Path | None = None


@dataclass(frozen=True)
class Runtime:
    """Where and under what limits the node runs a pipeline: the torch device (``auto``, ``cpu``,
    ``cuda``) and the pixel budget of the tag gate (``scp.max_image_megapixels``)."""

    device: str = "auto"
    max_megapixels: float = 25.0


class PipelinePlugin(ABC):
    """A pipeline as the node sees it before loading anything heavy.

    A subclass sets the class attributes and implements :meth:`verify_weights` and
    :meth:`build`; importing its module must stay light (no torch), as the SCP reads
    :attr:`sop_classes` and the configuration validates :attr:`options_model`.
    """

    name: ClassVar[str]
    #: The pydantic model of its options (:meth:`options`).
    options_model: ClassVar[type[PipelineOptions]] = PipelineOptions
    #: SOP Class UIDs of the images it analyses: the SCP keeps these.
    sop_classes: ClassVar[frozenset[str]]
    #: Modalities it analyses; its SC overlay carries the source's modality when it is one of these.
    modalities: ClassVar[frozenset[str]]
    output: ClassVar[OutputDescription]

    def options(self, settings: Mapping[str, Any]) -> PipelineOptions:
        """Return the options from the node's settings (as plain data): ``pipelines.<name>``
        but its ``plugin`` key (see :meth:`own_settings`).

        Raises pydantic's ValidationError when they do not fit :attr:`options_model`.
        """
        return self.options_model.model_validate(self.own_settings(settings))

    def own_settings(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """Return ``pipelines.<name>`` of the node's settings (plain data) without the ``plugin``
        key, which names the plug-in a configured name runs (see :mod:`dicom_node.plugins`)."""
        own = (settings.get("pipelines") or {}).get(self.name) or {}
        return {key: value for key, value in own.items() if key != "plugin"}

    def configure(self, options: PipelineOptions) -> None:
        """Take from ``options`` what the node reads before a pipeline is built, loading nothing
        heavy: a plug-in whose SOP classes, modalities or output description come from a manifest
        sets them here on itself. By default there is nothing to take.

        Raises :class:`pipelines.errors.WeightsError` when its manifest cannot be read.
        """

    @abstractmethod
    def verify_weights(self, options: PipelineOptions) -> None:
        """Check every weights file against its recorded digest, loading nothing; raises
        :class:`pipelines.errors.WeightsError` naming what is missing or altered."""

    @abstractmethod
    def build(self, options: PipelineOptions, runtime: Runtime) -> Pipeline:
        """Return the pipeline, weights loaded; raises :class:`pipelines.errors.WeightsError`."""

    def addresses(self, dataset: Dataset) -> bool:
        """Return whether ``dataset`` says it is an image this pipeline is meant for, so that a
        skip is worth a "not analysed" note: by default, one of its modalities."""
        return str(dataset.get("Modality", "") or "").strip().upper() in self.modalities

    def load_path(self, pipeline: Pipeline, path: Path) -> tuple[ImageInput, GateVerdict]:
        """Return the input of a local file and the gate's verdict (``dicom-node analyze``).

        Raises :class:`SkippedByGate` when the gate skips it, :class:`InputError` when it
        is not a readable DICOM file or cannot be decoded.
        """
        try:
            dataset = pydicom.dcmread(path)
        except Exception as exc:
            raise InputError(f"{path.name} is not a readable DICOM file: {exc}") from exc
        verdict = pipeline.accepts(dataset)
        if not verdict.accepted:
            raise SkippedByGate(verdict.reason)
        return pipeline.load(dataset), verdict
