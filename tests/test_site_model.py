"""A site's own model run from a manifest (:mod:`pipelines.site_model`): a tiny TorchScript model and
a MONAI bundle built here, whose outputs are known (the score is the mean intensity, the masks a
threshold), the manifest's validation errors, and the plug-in end to end through `serve`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
import yaml
from pydicom.uid import generate_uid
from torch import nn

from dicom_node.config import load_settings
from dicom_node.db import DeliveryStatus, Instance, JobStatus
from dicom_node.plugins import build_pipeline, kept_sop_classes, pipeline_plugin
from dicom_node.writers import AlgorithmIdentity, write_results
from pipelines.base import Runtime
from pipelines.errors import WeightsError
from pipelines.site_model.pipeline import SiteModelPipeline
from pipelines.site_model.plugin import SiteModelOptions, SiteModelPlugin
from tests.conftest import dcmtk_tool, run_tool, wait_for
from tests.dicom_factory import CR_IMAGE_STORAGE, make_cr
from tests.receiving_scp import ReceivingSCP
from tests.writers_fixtures import COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE, SEGMENTATION, received_results

ROOT = Path(__file__).resolve().parent.parent
PNEUMOTHORAX = "36118008"
#: The test image: 128 x 128, zero but for a bright 64 x 32 block (an eighth of the image).
BLOCK = (slice(32, 96), slice(16, 48))
MEAN = 1 / 8


class TinyModel(nn.Module):
    """Class 0's logit is that of the input's mean (so its sigmoid is the mean), class 1's its
    negative; map 0 is positive where the input exceeds 0.5 (bright), map 1 where it does not (dark)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = x.mean(dim=(1, 2, 3)).clamp(1e-4, 1 - 1e-4)
        logit = torch.log(mean / (1 - mean))
        bright = (x[:, :1] - 0.5) * 20
        return torch.stack([logit, -logit], dim=1), torch.cat([bright, -bright], dim=1)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def code(value: str, meaning: str) -> dict[str, str]:
    return {"value": value, "scheme": "SCT", "meaning": meaning}


def manifest_of(model: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """Return the tiny model's manifest (``model``: its model entry), with top-level ``changes``."""
    tissue = code("85756007", "Tissue")
    return {
        "name": "tiny-ptx", "version": "1.0", "model": model,
        "input": {"sop_classes": [CR_IMAGE_STORAGE], "modalities": ["CR"], "body_parts": ["CHEST"],
                  "size": [64, 64], "channels": 1, "normalize": "minmax"},
        "outputs": {
            "classification": [
                {"name": "pneumothorax", "display_name": "Pneumothorax", "code": code(PNEUMOTHORAX, "Pneumothorax"),
                 "index": 0, "activation": "sigmoid", "threshold": 0.1, "region": "bright"},
                {"name": "dark_share", "display_name": "Dark share",
                 "code": code("309825002", "Spatial and Relational Concept"), "index": 1, "activation": "softmax",
                 "threshold": 0.5, "experimental": True},
            ],
            "segmentation": [
                {"name": "bright", "label": "Bright", "category": tissue, "property_type": tissue,
                 "colour": [255, 160, 0], "channel": 0},
                {"name": "dark", "label": "Dark", "category": tissue, "property_type": tissue,
                 "colour": [0, 200, 80], "channel": 1},
            ],
        },
        "procedure": code("399208008", "Plain chest X-ray"),
        "validation": {"dataset": "synthetic block images", "n": 200,
                       "metrics": {"pneumothorax": {"auroc": {"value": 0.91, "ci95": [0.87, 0.95]},
                                                    "sensitivity": {"value": 0.8, "ci95": [0.7, 0.88]}}}},
        **changes,
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


@pytest.fixture
def torchscript_manifest(tmp_path: Path) -> Path:
    """A TorchScript model.pt of :class:`TinyModel` and its manifest, in ``tmp_path/model``."""
    folder = tmp_path / "model"
    folder.mkdir()
    torch.jit.save(torch.jit.script(TinyModel()), folder / "model.pt")
    return write_manifest(folder, manifest_of({"torchscript": "model.pt", "sha256": sha256(folder / "model.pt")}))


@pytest.fixture
def bundle_manifest(tmp_path: Path) -> Path:
    """A MONAI bundle of :class:`TinyModel` (metadata.json giving its input, models/model.ts) and a
    manifest that leaves the input size and channels to the bundle."""
    bundle = tmp_path / "bundle_model" / "tiny_bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "metadata.json").write_text(json.dumps({
        "version": "1.0", "network_data_format": {
            "inputs": {"image": {"type": "image", "num_channels": 1, "spatial_shape": [64, 64], "dtype": "float32"}},
            "outputs": {"pred": {"type": "probabilities", "num_channels": 2, "spatial_shape": [64, 64]}}}}))
    torch.jit.save(torch.jit.script(TinyModel()), bundle / "models" / "model.ts")
    manifest = manifest_of({"monai_bundle": "tiny_bundle", "sha256": {
        name: sha256(bundle / name) for name in ("models/model.ts", "configs/metadata.json")}})
    for key in ("size", "channels"):
        del manifest["input"][key]
    return write_manifest(bundle.parent, manifest)


def block_cr(photometric: str = "MONOCHROME2", **kwargs: Any) -> pydicom.Dataset:
    """Return a 128 x 128 CR: 0 but for :data:`BLOCK` at 4000 (stored inverted when MONOCHROME1)."""
    ds = make_cr(size=128, **kwargs)
    pixels = np.zeros((128, 128), np.uint16)
    pixels[BLOCK] = 4000
    ds.PhotometricInterpretation = photometric
    ds.PixelData = (4000 - pixels if photometric == "MONOCHROME1" else pixels).astype(np.uint16).tobytes()
    return ds


def block_mask() -> np.ndarray:
    mask = np.zeros((128, 128), bool)
    mask[BLOCK] = True
    return mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def built(manifest: Path) -> tuple[SiteModelPlugin, SiteModelPipeline]:
    plugin = SiteModelPlugin()
    options = SiteModelOptions(manifest=manifest)
    plugin.configure(options)
    plugin.verify_weights(options)
    return plugin, plugin.build(options, Runtime(device="cpu"))


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("kind", ["torchscript", "bundle"])
def test_the_results_are_what_the_model_computes(kind, photometric, request):
    plugin, pipeline = built(request.getfixturevalue(f"{kind}_manifest"))
    dataset = block_cr(photometric)
    assert pipeline.accepts(dataset).accepted
    [result] = pipeline.run([pipeline.load(dataset)])

    assert result.verdict.accepted
    assert list(result.masks) == plugin.output.segment_names() == ["assessed_area", "bright", "dark"]
    assert result.masks["assessed_area"].all()
    assert result.masks["bright"].shape == (128, 128)  # back at the source's resolution
    assert iou(result.masks["bright"], block_mask()) > 0.9
    assert iou(result.masks["dark"], ~block_mask()) > 0.9
    pneumothorax, dark = result.findings
    assert pneumothorax.probability == pytest.approx(MEAN, abs=0.01)  # sigmoid of class 0: the mean
    assert pneumothorax.flagged and not pneumothorax.experimental
    np.testing.assert_array_equal(pneumothorax.region, result.masks["bright"])
    ratio = (MEAN / (1 - MEAN)) ** 2  # softmax of (logit, -logit), class 1
    assert dark.probability == pytest.approx(1 / (1 + ratio), abs=0.01)
    assert dark.experimental and not dark.flagged and dark.region is None  # above its threshold, never flagged


def test_a_channel_that_finds_nothing_still_yields_results(torchscript_manifest):
    plugin, pipeline = built(torchscript_manifest)
    dataset = block_cr()
    pixels = np.zeros((128, 128), np.uint16)
    pixels[64, 64] = 4000  # too small to be bright at the model's resolution
    dataset.PixelData = pixels.tobytes()
    image = pipeline.load(dataset)
    [result] = pipeline.run([image])
    assert result.verdict.accepted and not result.masks["bright"].any()
    objects = write_results(dataset, result, image.display, AlgorithmIdentity.of(pipeline, plugin))
    assert len(objects) == 3


def test_the_identity_holds_the_manifest_digest_and_the_validation_figures(torchscript_manifest):
    _, pipeline = built(torchscript_manifest)
    manifest_digest = sha256(torchscript_manifest)[:12]
    assert (pipeline.name, pipeline.version) == ("tiny-ptx", "1.0")
    assert pipeline.model_versions.split("; ") == [
        f"tiny-ptx 1.0 TorchScript {sha256(torchscript_manifest.parent / 'model.pt')[:12]} manifest {manifest_digest}",
        "validated n=200: synthetic block images",
        "pneumothorax: AUROC 0.91 (0.87-0.95), sens 0.80 (0.70-0.88)",
    ]
    manifest = yaml.safe_load(torchscript_manifest.read_text())
    manifest["outputs"]["classification"][0]["threshold"] = 0.2
    write_manifest(torchscript_manifest.parent, manifest)
    assert built(torchscript_manifest)[1].model_versions != pipeline.model_versions  # new results, new UIDs


@pytest.mark.parametrize(("pixels", "reason"), [
    (np.full((128, 128), 700, np.uint16), "every pixel has the same value"),
    (np.arange(16 * 128, dtype=np.uint16).reshape(16, 128), "16 x 128 pixels, the model needs 32 or more a side"),
])
def test_an_image_the_model_cannot_read_is_skipped_with_the_reason(torchscript_manifest, pixels, reason):
    _, pipeline = built(torchscript_manifest)
    dataset = make_cr(size=128)
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.PixelData = pixels.tobytes()
    good = block_cr()
    skipped, analysed = pipeline.run([pipeline.load(dataset), pipeline.load(good)])
    assert not skipped.verdict.accepted and skipped.verdict.reason == f"image content: {reason}"
    assert skipped.findings == [] and analysed.verdict.accepted and analysed.findings


def test_the_tag_gate_is_the_manifests(torchscript_manifest):
    _, pipeline = built(torchscript_manifest)
    assert pipeline.accepts(block_cr(body_part="KNEE")).reason == "body part KNEE is not one of CHEST"
    assert pipeline.accepts(block_cr(body_part="")).accepted  # a missing body part proves nothing
    other = block_cr()
    other.Modality = "DX"
    assert pipeline.accepts(other).reason == "modality DX is not one of CR"
    big = block_cr()
    big.Rows = big.Columns = 6000
    assert "exceeds the pixel budget of 25 megapixels" in pipeline.accepts(big).reason


def test_a_bad_or_missing_weights_file_is_named(torchscript_manifest, bundle_manifest):
    plugin = SiteModelPlugin()
    model = torchscript_manifest.parent / "model.pt"
    model.write_bytes(model.read_bytes() + b"\0")
    with pytest.raises(WeightsError, match=f"site model file altered: {model}"):
        plugin.verify_weights(SiteModelOptions(manifest=torchscript_manifest))
    with pytest.raises(WeightsError, match="site model file altered"):
        plugin.build(SiteModelOptions(manifest=torchscript_manifest), Runtime(device="cpu"))
    metadata = bundle_manifest.parent / "tiny_bundle" / "configs" / "metadata.json"
    metadata.unlink()
    with pytest.raises(WeightsError, match=f"site model file missing: {metadata}"):
        plugin.verify_weights(SiteModelOptions(manifest=bundle_manifest))


def edited(manifest: Path, edit: Callable[[dict[str, Any]], object]) -> Path:
    data = yaml.safe_load(manifest.read_text())
    edit(data)
    return write_manifest(manifest.parent, data)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m["outputs"]["segmentation"][0].update(color=[1, 2, 3]),
     "outputs.segmentation.0.color: Extra inputs are not permitted"),
    (lambda m: m["model"].update(sha256="abc"), "model.sha256: Value error, give a digest as a quoted string of 64"),
    (lambda m: m["outputs"]["classification"][0].pop("code"), "outputs.classification.0.code: Field required"),
    (lambda m: m.update(outputs={}), "give at least one classification head or segmentation channel"),
    (lambda m: m["outputs"]["classification"][0].update(region="lungs"),
     "head pneumothorax: region 'lungs' is not a segmentation channel"),
    (lambda m: m["validation"]["metrics"].update(effusion={}), r"validation.metrics names \['effusion'\]"),
    (lambda m: m["validation"]["metrics"].pop("pneumothorax"),
     "head pneumothorax is not experimental, so validation.metrics.pneumothorax.auroc is required"),
    (lambda m: m["input"].update(normalize="window"),
     "window .center, width. is given exactly when normalize is window"),
])
def test_manifest_errors_name_the_key(torchscript_manifest, edit, message):
    path = edited(torchscript_manifest, edit)
    with pytest.raises(WeightsError, match=message) as raised:
        SiteModelPlugin().configure(SiteModelOptions(manifest=path))
    assert str(path) in str(raised.value)


def test_the_example_manifest_is_valid():
    plugin = SiteModelPlugin()
    plugin.configure(SiteModelOptions(manifest=ROOT / "examples" / "site_model" / "manifest.yaml"))
    assert plugin.modalities == {"CR", "DX"} and plugin.output.segment_names() == ["assessed_area", "pneumothorax_area"]


def test_a_head_the_model_has_no_output_for_fails_at_build(torchscript_manifest):
    path = edited(torchscript_manifest, lambda m: m["outputs"]["classification"][0].update(index=5))
    with pytest.raises(WeightsError, match="head pneumothorax reads class 5, but the model returns 2 classes"):
        built(path)


def test_the_node_takes_the_manifests_sop_classes(torchscript_manifest, tmp_path):
    settings = load_settings(None, state_dir=tmp_path / "state", audit={"secret": "s"},
                             pipeline={"name": "site_model"},
                             pipelines={"site_model": {"manifest": str(torchscript_manifest)}})
    assert kept_sop_classes(settings) == {CR_IMAGE_STORAGE}
    plugin, pipeline = build_pipeline(settings, device="cpu")
    assert isinstance(plugin, SiteModelPlugin) and plugin.output.description_prefix == "AI TINY-PTX: "
    assert pipeline.name == "tiny-ptx" and pipeline_plugin("site_model").name == "site_model"


@pytest.mark.timeout(300)
def test_a_site_model_runs_end_to_end_through_serve(bundle_manifest, node_factory, tmp_path):
    pacs = ReceivingSCP(folder=tmp_path / "pacs").start()
    try:
        node = node_factory({"pipeline": {"name": "site_model"},
                             "pipelines": {"site_model": {"manifest": str(bundle_manifest)}},
                             "destinations": [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                                               "port": pacs.port}]})
        node.start()
        study = str(generate_uid())
        source = block_cr(study_uid=study)
        source.save_as(tmp_path / "cr.dcm", enforce_file_format=True)
        sent = run_tool(dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1",
                        str(node.port), str(tmp_path / "cr.dcm"))
        assert sent.returncode == 0, sent.stderr
        job = wait_for(lambda: (jobs := node.jobs(study)) and jobs[-1].status.finished and jobs[-1], 120,
                       "the job to finish")
        assert job.status is JobStatus.DONE, job.reason
        [instance] = node.rows(Instance)
        assert instance.verdict_reason.startswith("pneumothorax=0.1")
        wait_for(lambda: len(rows := node.deliveries(job.id)) == 3
                 and all(d.status is DeliveryStatus.DELIVERED for d in rows), 60, "SC, SEG and SR delivered")
    finally:
        pacs.stop()
    received = received_results(pacs.folder, pacs.stored)

    sc = received[SECONDARY_CAPTURE]
    assert sc.SeriesDescription.startswith("AI TINY-PTX: SUSPECTED PNEUMOTHORAX (0.1")
    assert "manifest " + sha256(bundle_manifest)[:12] in " ".join(
        sc.SoftwareVersions)

    seg = hd.seg.segread(pacs.folder / f"{received[SEGMENTATION].SOPInstanceUID}.dcm")
    assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == [
        "Assessed area", "Bright", "Dark", "Pneumothorax"]
    masks = seg.get_pixels_by_source_instance([source.SOPInstanceUID], combine_segments=False)[0] > 0.5
    assert masks[..., 0].all() and iou(masks[..., 1], block_mask()) > 0.9
    np.testing.assert_array_equal(masks[..., 3], masks[..., 1])  # the flagged finding's region: its channel

    sr = hd.sr.srread(pacs.folder / f"{received[COMPREHENSIVE_3D_SR].SOPInstanceUID}.dcm")
    groups = {g.tracking_identifier: g for g in sr.content.get_planar_roi_measurement_groups()}
    assert groups["pneumothorax"].finding_type.value == PNEUMOTHORAX
    values = {m.name.meaning: m.value for m in groups["pneumothorax"].get_measurements()}
    assert values == {"Probability": pytest.approx(MEAN, abs=0.01), "Threshold Value": pytest.approx(0.1)}
