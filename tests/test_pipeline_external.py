"""A CheXNet-style torchvision DenseNet-121 state_dict, mapped onto MONAI's DenseNet121 and used from a manifest."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pydicom
import pytest
import torch
import yaml
from monai.networks.nets import DenseNet121
from pydicom.data import get_testdata_file

from pipelines.base import sha256_file
from pipelines.chest_xray.models import load_network, torchvision_densenet_to_monai
from pipelines.chest_xray.pipeline import ChestXrayPipeline
from pipelines.errors import WeightsError

MANIFEST = Path(os.environ.get("TEST_WEIGHTS_MANIFEST", Path(__file__).resolve().parents[1] / "weights" / "manifest.yaml"))
CHEXNET_LABELS = 14
PNEUMOTHORAX = 7


def torchvision_names(state: dict[str, torch.Tensor], *, old_style: bool = False, prefix: str = "") -> dict:
    """Rename a MONAI DenseNet121 state_dict to torchvision's naming (optionally the old ``norm.1`` style)."""
    renamed = {}
    for key, value in state.items():
        name = key.replace(".layers.", ".").replace("class_layers.out.", "classifier.")
        if old_style:
            name = re.sub(r"(denselayer\d+\.)(norm|relu|conv)(\d)", r"\1\2.\3", name)
        renamed[prefix + name] = value
    return renamed


@pytest.fixture(scope="module")
def reference() -> DenseNet121:
    torch.manual_seed(0)
    network = DenseNet121(spatial_dims=2, in_channels=3, out_channels=CHEXNET_LABELS).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, so that a wrong mapping shows
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return network


@pytest.mark.parametrize(("old_style", "prefix"), [(False, ""), (True, "module.")])
def test_mapping_reproduces_outputs(reference: DenseNet121, old_style: bool, prefix: str) -> None:
    state = torchvision_names(reference.state_dict(), old_style=old_style, prefix=prefix)
    assert any(k.endswith("denseblock1.denselayer1.norm1.weight") or "norm.1" in k for k in state)
    loaded = DenseNet121(spatial_dims=2, in_channels=3, out_channels=CHEXNET_LABELS).eval()
    loaded.load_state_dict(torchvision_densenet_to_monai(state))
    image = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(loaded(image), reference(image), atol=1e-5)


def test_foreign_keys_are_rejected(reference: DenseNet121) -> None:
    with pytest.raises(WeightsError, match="unexpected key"):
        torchvision_densenet_to_monai({"fc.weight": torch.zeros(1), **torchvision_names(reference.state_dict())})


@pytest.fixture(scope="module")
def external_manifest(reference: DenseNet121, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("site-weights")
    torch.save(torchvision_names(reference.state_dict()), root / "chexnet.pth")
    manifest = yaml.safe_load(MANIFEST.read_text())
    shutil.copy(MANIFEST.parent / manifest["lung"]["file"], root)
    shutil.copy(MANIFEST.parent / manifest["content_check"]["file"], root)
    manifest["findings"] = [
        {
            "name": "pneumothorax",
            "display_name": "Pneumothorax (site model)",
            "file": "chexnet.pth",
            "sha256": sha256_file(root / "chexnet.pth"),
            "format": "torchvision-densenet121",
            "architecture": {
                "name": "DenseNet121",
                "args": {"spatial_dims": 2, "in_channels": 3, "out_channels": CHEXNET_LABELS},
            },
            "input": {"size": 224, "region": "whole", "channels": 3, "normalize": "imagenet"},
            "output": {"activation": "sigmoid", "index": PNEUMOTHORAX},
            "threshold": 0.5,
            "gate": {"metric": "validation auroc", "minimum": 0.85},
            "validation": {"auroc": 0.9},
            "experimental": True,
            "flag_enabled": False,
        }
    ]
    (root / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    return root / "manifest.yaml"


def test_manifest_loads_external_checkpoint(reference: DenseNet121, external_manifest: Path) -> None:
    manifest = yaml.safe_load(external_manifest.read_text())
    network = load_network(manifest["findings"][0], external_manifest.parent, torch.device("cpu"))
    image = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(network(image), reference(image), atol=1e-5)


def test_pipeline_runs_external_checkpoint_and_site_enables_flag(external_manifest: Path) -> None:
    default = ChestXrayPipeline.from_manifest(external_manifest, device="cpu")
    enabled = ChestXrayPipeline.from_manifest(external_manifest, device="cpu", enable_flags={"pneumothorax"})
    assert not default.classifiers[0].flaggable and enabled.classifiers[0].flaggable
    image = default.load(pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm")))
    (result,) = enabled.run([image])
    (finding,) = result.findings
    assert finding.name == "pneumothorax" and not finding.experimental
    assert 0.0 <= finding.probability <= 1.0
    assert finding.flagged == (finding.probability >= 0.5)
    assert not finding.heatmap[~result.masks["lungs"]].any()
