"""The chest X-ray pipeline: quality gate → lung segmentation → classification → Grad-CAM."""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from pathlib import Path

import torch
from pydicom import Dataset

from pipelines.base import Finding, GateVerdict, ImageInput, ImageResult, resolve_device
from pipelines.chest_xray.classification import FindingClassifier
from pipelines.chest_xray.content import ContentCheck
from pipelines.chest_xray.gate import DEFAULT_MAX_MEGAPIXELS, UnknownAge, check_chest_radiograph
from pipelines.chest_xray.gradcam import region
from pipelines.chest_xray.models import load_network, read_manifest
from pipelines.chest_xray.legend import LUNGS
from pipelines.chest_xray.preprocess import load_dataset
from pipelines.chest_xray.segmentation import LungSegmenter
from pipelines.errors import WeightsError

logger = logging.getLogger(__name__)


class ChestXrayPipeline:
    """Tag gate, lung segmentation, image content check, per-finding probability/threshold/flag,
    and lung-restricted Grad-CAM.

    Implements :class:`pipelines.base.Pipeline`. Build it with :meth:`from_manifest`,
    which checks every weights file's sha256 before anything is loaded.
    """

    name = "chest_xray"

    def __init__(
        self,
        segmenter: LungSegmenter,
        content_check: ContentCheck,
        classifiers: Sequence[FindingClassifier],
        *,
        version: str,
        model_versions: str = "",
        min_age_years: float = 18.0,
        unknown_age: UnknownAge | str = UnknownAge.ANALYSE,
        max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
    ) -> None:
        self.segmenter = segmenter
        self.content_check = content_check
        self.classifiers = list(classifiers)
        self.version = version
        self.model_versions = model_versions
        self.min_age_years = min_age_years
        self.unknown_age = UnknownAge(unknown_age)
        self.max_megapixels = max_megapixels

    @classmethod
    def from_manifest(
        cls,
        path: str | Path = "weights/manifest.yaml",
        *,
        device: str | torch.device = "auto",
        min_age_years: float = 18.0,
        unknown_age: UnknownAge | str = UnknownAge.ANALYSE,
        enable_flags: Collection[str] = (),
        max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
    ) -> ChestXrayPipeline:
        """Return the pipeline described by the manifest at ``path``.

        ``enable_flags`` names findings a site has validated and allows to be flagged
        although the manifest marks them experimental (the validation-AUROC gate still
        applies); the gate skips images over ``max_megapixels`` before decoding. Raises :class:`pipelines.errors.WeightsError` when the manifest is
        missing or malformed (a manifest without ``content_check`` included: the gate
        cannot run without it), or any weights file is missing or altered.
        """
        path = Path(path)
        manifest = read_manifest(path)
        root = path.parent
        torch_device = resolve_device(device)
        lung = manifest["lung"]
        segmenter = LungSegmenter(load_network(lung, root, torch_device), int(lung["input"]["size"][0]), torch_device)
        if not isinstance(manifest.get("content_check"), dict):
            raise WeightsError(f"weights manifest {path} has no content_check entry: the quality gate needs it")
        content_check = ContentCheck.from_manifest(manifest["content_check"], root, torch_device)
        classifiers = [
            FindingClassifier.from_manifest(entry, root, torch_device, enable_flags) for entry in manifest["findings"]
        ]
        logger.info("chest_xray %s on %s: findings %s", manifest.get("version"), torch_device, [c.name for c in classifiers])
        models = "; ".join(
            f"{entry.get('name', 'lung')} {entry['architecture']['name']} {str(entry['sha256'])[:8]}"
            for entry in [lung, {"name": "content_check", **manifest["content_check"]}, *manifest["findings"]]
        )
        return cls(segmenter, content_check, classifiers, version=str(manifest.get("version", "0")),
                   model_versions=models, min_age_years=min_age_years, unknown_age=unknown_age,
                   max_megapixels=max_megapixels)

    def accepts(self, dataset: Dataset) -> GateVerdict:
        """Return the tag gate's verdict for ``dataset`` (frontal adult chest CR/DX within the pixel budget)."""
        return check_chest_radiograph(dataset, min_age_years=self.min_age_years, unknown_age=self.unknown_age,
                                      max_megapixels=self.max_megapixels)

    def load(self, dataset: Dataset) -> ImageInput:
        """Return the :class:`ImageInput` of ``dataset``; raises :class:`InputError` when undecodable."""
        return load_dataset(dataset)

    def run(self, inputs: Sequence[ImageInput]) -> list[ImageResult]:
        """Return one :class:`ImageResult` per input, in order.

        The lungs are segmented, then the content check decides; findings are scored
        only for the images it accepts, the others' results carry its skip verdict.
        """
        if not inputs:
            return []
        masks = self.segmenter.masks([image.display for image in inputs])
        verdicts = self.content_check.verdicts([image.display for image in inputs], masks)
        results = [ImageResult(image.sop_instance_uid, {LUNGS: mask}, verdict=verdict)
                   for image, mask, verdict in zip(inputs, masks, verdicts, strict=True)]
        for result, verdict in zip(results, verdicts, strict=True):
            if not verdict.accepted:
                logger.info("image %s skipped: %s", result.sop_instance_uid, verdict.reason)
        analysed = [(image, result) for image, result in zip(inputs, results, strict=True) if result.verdict.accepted]
        if not analysed:
            return results
        displays = [image.display for image, _ in analysed]
        accepted_masks = [result.masks[LUNGS] for _, result in analysed]
        for classifier in self.classifiers:
            batch, boxes = classifier.inputs(displays, accepted_masks)
            probabilities = classifier.probabilities(batch)
            heatmaps = classifier.gradcam.heatmaps(batch, boxes, accepted_masks)
            for (_, result), probability, heatmap in zip(analysed, probabilities, heatmaps, strict=True):
                flagged = classifier.flaggable and float(probability) >= classifier.threshold
                result.findings.append(
                    Finding(
                        name=classifier.name,
                        display_name=classifier.display_name,
                        probability=float(probability),
                        threshold=classifier.threshold,
                        flagged=flagged,
                        experimental=not classifier.flaggable,
                        heatmap=heatmap,
                        region=region(heatmap) if flagged else None,
                    )
                )
        return results
