"""Training records its models in the weights manifest without reordering what is there."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.optim.swa_utils import AveragedModel

from pipelines.chest_xray.models import load_network, read_manifest, write_manifest
from pipelines.chest_xray.preprocess import InputSpec, smoothed
from training.chest_xray.datasets import hash_split
from training.chest_xray.metrics import worst_source_threshold
from training.chest_xray.train import (
    BALANCED_SAMPLING,
    HEADS,
    IGNORED,
    classifier_cache,
    main,
    partial_dice_ce,
    partial_labels,
    source_balanced_weights,
    update_manifest,
)
from tests.conftest import stems_in_split


def test_a_retrained_finding_keeps_its_place(tmp_path: Path) -> None:
    write_manifest(tmp_path / "manifest.yaml", {
        "pipeline": "chest_xray", "version": "0.1.0", "lung": {},
        "findings": [{"name": "covid19", "threshold": 0.6}, {"name": "pneumothorax", "threshold": 0.5}],
    })
    update_manifest(tmp_path, "findings", {"name": "covid19", "threshold": 0.7})
    update_manifest(tmp_path, "findings", {"name": "effusion", "threshold": 0.4})
    findings = read_manifest(tmp_path / "manifest.yaml")["findings"]
    assert [(f["name"], f["threshold"]) for f in findings] == [
        ("covid19", 0.7), ("pneumothorax", 0.5), ("effusion", 0.4)]


def _covid_set(data: Path, rng: np.random.Generator, count: int = 12) -> None:
    """Write a ``count`` + ``count`` image COVID-19 Radiography-like set of noise under ``data``, an
    NIH-like set of 7 (4 official train, 2 val, 1 test that must stay out of training), and an OpenIST-like
    set of 3 (2 in the val hash split, the threshold's outside normals; 1 in train, never used)."""
    for folder in ("COVID", "Normal"):
        (data / "covid-radiography" / folder).mkdir(parents=True)
        for number in range(count):
            pixels = rng.integers(0, 255, (96, 96), dtype=np.uint8)
            Image.fromarray(pixels).save(data / "covid-radiography" / folder / f"{folder}-{number}.png")
    nih = data / "nih-cxr14"
    (nih / "images").mkdir(parents=True)
    rows = ["image,official_split,Pneumothorax"]
    for number, split in enumerate(["train"] * 4 + ["val"] * 2 + ["test"]):
        Image.fromarray(rng.integers(0, 255, (128, 128), dtype=np.uint8)).save(nih / "images" / f"nih-{number}.png")
        rows.append(f"nih-{number}.png,{split},{number % 2}")
    (nih / "labels.csv").write_text("\n".join(rows) + "\n")
    openist = data / "lung-seg" / "openist"
    for folder in ("images", "masks-lung"):
        (openist / folder).mkdir(parents=True)
    for stem in stems_in_split("openist-", "val", 2) + stems_in_split("openist-", "train"):
        Image.fromarray(rng.integers(0, 255, (96, 96), dtype=np.uint8)).save(openist / "images" / f"{stem}.png")
        Image.fromarray(np.full((96, 96), 255, dtype=np.uint8)).save(openist / "masks-lung" / f"{stem}.png")


def _weights(tmp_path: Path) -> Path:
    out = tmp_path / "weights"
    shutil.copytree(Path(__file__).parents[1] / "weights", out)
    return out


def test_classifier_input_override_and_time_limit(tmp_path: Path) -> None:
    """``--size/--region`` set the trained head's input spec and its caches; ``--max-minutes``
    stops after the first epoch that ends past the limit, and the manifest says so; the covid19
    head is guided by the train split of the opacity set."""
    rng = np.random.default_rng(0)
    _covid_set(tmp_path / "data", rng)
    opacity_set = tmp_path / "data" / "lung-seg" / "covid-seg"
    for folder in ("images", "masks-opacity"):
        (opacity_set / folder).mkdir(parents=True)
    for number in range(12):
        Image.fromarray(rng.integers(0, 255, (96, 96), dtype=np.uint8)).save(opacity_set / "images" / f"seg-{number}.png")
        opacity = np.zeros((96, 96), dtype=np.uint8)
        opacity[48:, :48] = 255
        Image.fromarray(opacity).save(opacity_set / "masks-opacity" / f"seg-{number}.png")
    out = _weights(tmp_path)
    main(["classifier", "--heads", "covid19", "--data-dir", str(tmp_path / "data"), "--out", str(out),
          "--cache-dir", str(tmp_path / "cache"), "--size", "64", "--region", "lung-crop",
          "--epochs", "3", "--max-minutes", "0"])
    entry = next(f for f in read_manifest(out / "manifest.yaml")["findings"] if f["name"] == "covid19")
    assert entry["input"]["size"] == 64 and entry["input"]["region"] == "lung-crop"
    assert entry["gradcam_layer"] == "class_layers.relu"  # the layer opacity guidance trains
    assert entry["training"]["guidance"]["images"] == 10  # the train split of the opacity set only
    assert entry["training"]["runs"][-1]["epochs"] == 1 and entry["training"]["runs"][-1]["guided"]
    assert (tmp_path / "cache" / "covid19+nih+openist-val_lung-crop-64.npz").is_file()
    assert (tmp_path / "cache" / "opacity_lung-crop-64.npz").is_file()


def test_no_guidance_trains_without_the_opacity_set(tmp_path: Path) -> None:
    """``--no-guidance`` trains the covid19 head on its own set (there is no covid-seg here) and records so."""
    _covid_set(tmp_path / "data", np.random.default_rng(1))
    out = _weights(tmp_path)
    main(["classifier", "--heads", "covid19", "--no-guidance", "--data-dir", str(tmp_path / "data"), "--out", str(out),
          "--cache-dir", str(tmp_path / "cache"), "--size", "64", "--epochs", "1"])
    entry = next(f for f in read_manifest(out / "manifest.yaml")["findings"] if f["name"] == "covid19")
    assert "guidance" not in entry["training"] and not entry["training"]["runs"][-1]["guided"]
    assert len(entry["training"]["data"]) == 1  # the opacity set is not listed


def test_covid19_trains_with_nih_negatives_and_a_threshold_fair_to_every_source(tmp_path: Path) -> None:
    """NIH's official train and val images join covid19's negatives (its test image does not); the
    threshold is chosen for the worst source's specificity, and the manifest gives NIH's apart."""
    _covid_set(tmp_path / "data", np.random.default_rng(4), count=14)  # COVID-12 is in the val split
    out = _weights(tmp_path)
    main(["classifier", "--heads", "covid19", "--no-guidance", "--data-dir", str(tmp_path / "data"), "--out", str(out),
          "--cache-dir", str(tmp_path / "cache"), "--size", "64", "--epochs", "1"])
    entry = next(f for f in read_manifest(out / "manifest.yaml")["findings"] if f["name"] == "covid19")
    with np.load(tmp_path / "cache" / "covid19+nih+openist-val_lung-64+keep.npz") as arrays:
        nih = arrays["source"] == "nih-cxr14"
        assert sorted(arrays["split"][nih].tolist()) == ["train"] * 4 + ["val"] * 2
        assert not arrays["label"][nih].any()  # every NIH image is a COVID-19 negative, whatever its labels
        openist = arrays["source"] == "openist"
        assert arrays["split"][openist].tolist() == ["val", "val"] and not arrays["label"][openist].any()
    assert "lowest specificity of any source" in entry["threshold_rule"]
    for source in ("nih-cxr14", "openist"):
        assert entry["validation"][f"images_{source}"] == 2 and 0 <= entry["validation"][f"specificity_{source}"] <= 1
    assert entry["validation"]["images"] == sum(1 for name in ("COVID", "Normal") for n in range(14)
                                                    if hash_split(f"{name}-{n}") == "val")


def test_threshold_only_chooses_the_threshold_again_and_keeps_the_weights(tmp_path: Path) -> None:
    """``--threshold-only`` scores the validation split with the manifest's weights and sets the threshold
    the worst-source rule chooses on it, now with OpenIST's val normals; the weights and training record
    stay as they were."""
    _covid_set(tmp_path / "data", np.random.default_rng(6), count=14)
    out = _weights(tmp_path)
    before = next(f for f in read_manifest(out / "manifest.yaml")["findings"] if f["name"] == "covid19")
    weights = (out / before["file"]).read_bytes()
    main(["classifier", "--heads", "covid19", "--threshold-only", "--data-dir", str(tmp_path / "data"),
          "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    after = next(f for f in read_manifest(out / "manifest.yaml")["findings"] if f["name"] == "covid19")
    assert (out / before["file"]).read_bytes() == weights and after["sha256"] == before["sha256"]
    assert after["training"] == before["training"] and after["input"] == before["input"]
    assert "chosen again without training" in after["threshold_rule"]
    assert after["validation"]["images_openist"] == 2  # this set's two, not the shipped 43
    with np.load(tmp_path / "cache" / "covid19+nih+openist-val_lung-128+keep.npz") as arrays:
        val = arrays["split"] == "val"
        labels, sources, images = arrays["label"][val], arrays["source"][val], arrays["lung-128"][val]
    network = load_network(before, out, torch.device("cpu"))
    with torch.no_grad():
        scores = torch.sigmoid(network(torch.from_numpy(images[:, None] / np.float32(255)))[:, 0]).numpy()
    assert after["threshold"] == pytest.approx(worst_source_threshold(labels, scores, sources), abs=1e-4)


def test_covid19_without_its_outside_normals_is_a_clear_error_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _covid_set(tmp_path / "data", np.random.default_rng(7))
    shutil.rmtree(tmp_path / "data" / "lung-seg" / "openist")
    with pytest.raises(SystemExit):
        main(["classifier", "--heads", "covid19", "--threshold-only", "--data-dir", str(tmp_path / "data"),
              "--out", str(_weights(tmp_path)), "--cache-dir", str(tmp_path / "cache")])
    assert "threshold is chosen on lung-seg/openist's val split" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_every_source_s_negatives_weigh_the_same_and_an_epoch_keeps_its_size() -> None:
    """Source-balanced sampling: each source's negatives together weigh the same, positives weigh 1, and
    the weights sum to the number of images."""
    labels = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    sources = np.array(["a", "a", "a", "a", "a", "a", "a", "b", "b", "a"])
    weights = source_balanced_weights(labels, sources)
    negatives = labels == 0
    assert weights[labels == 1].tolist() == [1.0, 1.0]
    assert weights[negatives & (sources == "a")].sum() == pytest.approx(weights[negatives & (sources == "b")].sum())
    assert weights.sum() == pytest.approx(len(labels))
    assert weights[7] == pytest.approx(2.0) and weights[2] == pytest.approx(4 / 6)


def test_balanced_sampling_draws_the_small_source_more_and_says_so(tmp_path: Path) -> None:
    """``--balance-sources`` draws each epoch by the source-balanced weights of the train split (NIH's four
    train negatives weigh as much in total as the covid set's normals), and the manifest records it."""
    _covid_set(tmp_path / "data", np.random.default_rng(5))
    out = _weights(tmp_path)
    drawn: list[tuple[np.ndarray, list[int]]] = []
    keep = torch.utils.data.WeightedRandomSampler.__iter__

    def record(sampler: torch.utils.data.WeightedRandomSampler):  # type: ignore[no-untyped-def]
        indices = list(keep(sampler))
        drawn.append((sampler.weights.numpy(), indices))
        return iter(indices)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.utils.data.WeightedRandomSampler, "__iter__", record)
        main(["classifier", "--heads", "covid19", "--no-guidance", "--balance-sources", "--data-dir",
              str(tmp_path / "data"), "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--size", "64",
              "--epochs", "1"])
    entry = next(f for f in read_manifest(out / "manifest.yaml")["findings"] if f["name"] == "covid19")
    assert entry["training"]["runs"][-1]["sampling"] == BALANCED_SAMPLING
    with np.load(tmp_path / "cache" / "covid19+nih+openist-val_lung-64+keep.npz") as arrays:
        train = np.flatnonzero(arrays["split"] == "train")
        labels, sources = arrays["label"][train], arrays["source"][train]
    [(weights, indices)] = drawn
    nih = sources == "nih-cxr14"
    assert np.allclose(weights, source_balanced_weights(labels, sources))
    assert weights[nih].sum() == pytest.approx(weights[(labels == 0) & ~nih].sum())
    assert len(indices) == len(train) and set(indices) <= set(range(len(train)))


def test_guidance_without_the_opacity_set_is_a_clear_error_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing covid-seg set stops guided training at once, naming the way out, before any image is cached."""
    _covid_set(tmp_path / "data", np.random.default_rng(2))
    with pytest.raises(SystemExit) as stopped:
        main(["classifier", "--heads", "covid19", "--data-dir", str(tmp_path / "data"), "--out", str(_weights(tmp_path)),
              "--cache-dir", str(tmp_path / "cache"), "--size", "64", "--epochs", "1"])
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and "lung-seg/covid-seg" in error and "--no-guidance" in error
    assert not (tmp_path / "cache").exists()


def test_averaging_keeps_the_mean_of_the_weights_at_every_epoch_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--average`` saves the mean of the weights the network had at the end of each epoch, and says so."""
    ends: list[dict[str, torch.Tensor]] = []
    keep = AveragedModel.update_parameters

    def record(averaged: AveragedModel, network: torch.nn.Module) -> None:
        ends.append({k: v.detach().clone() for k, v in network.named_parameters()})
        keep(averaged, network)

    monkeypatch.setattr(AveragedModel, "update_parameters", record)
    _covid_set(tmp_path / "data", np.random.default_rng(3))
    out = _weights(tmp_path)
    main(["classifier", "--heads", "covid19", "--no-guidance", "--average", "--data-dir", str(tmp_path / "data"),
          "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--size", "64", "--epochs", "3", "--lr", "0.01"])
    entry = next(f for f in read_manifest(out / "manifest.yaml")["findings"] if f["name"] == "covid19")
    run = entry["training"]["runs"][-1]
    assert run["schedule"] == "constant" and "SWA" in run["kept"]
    saved = torch.load(out / entry["file"], map_location="cpu")
    assert len(ends) == 3
    for name in ("features.conv0.weight", "class_layers.out.weight"):
        mean = torch.stack([end[name] for end in ends]).mean(0)
        assert torch.allclose(saved[name].float(), mean, rtol=2e-3, atol=1e-5)  # stored as float16
        assert not torch.allclose(saved[name].float(), ends[-1][name], rtol=2e-3, atol=1e-5)  # not the last epoch


@pytest.mark.parametrize("option", ["--epochs", "--batch-size"])
def test_a_count_below_one_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["classifier", "--data-dir", str(tmp_path), "--out", str(tmp_path / "weights"), option, "-1"])
    assert stopped.value.code == 2 and f"{option}: must be at least 1, got -1" in capsys.readouterr().err


def test_ignored_lung_pixels_teach_nothing() -> None:
    """The partial Dice-CE has no gradient on IGNORED pixels, and partial_labels ignores exactly the
    reference's disagreement: lung in the set's mask, background for the reference."""
    logits = torch.randn(1, 2, 8, 8, requires_grad=True)
    label = torch.zeros(1, 1, 8, 8)
    label[..., :4] = 1
    label[..., 6:] = IGNORED
    partial_dice_ce(logits, label).backward()
    assert logits.grad[..., 6:].abs().max() == 0 and logits.grad[..., :6].abs().max() > 0

    class HalfLung(torch.nn.Module):  # calls the left half of every image lung
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(len(images), 2, *images.shape[2:])
            out[:, 1, :, : images.shape[3] // 2] = 1
            return out

    masks = np.zeros((1, 8, 8), dtype=np.uint8)
    masks[:, 2:6, 2:8] = 1
    labels = partial_labels({"images": np.zeros((1, 8, 8), dtype=np.uint8), "masks": masks}, HalfLung(), torch.device("cpu"))
    assert (labels[0, 2:6, 2:4] == 1).all() and (labels[0, 2:6, 4:8] == IGNORED).all() and not labels[0, :2].any()


def test_lung_training_records_its_convention_and_what_it_never_trained_on(tmp_path: Path) -> None:
    """One epoch on tiny sets: OpenIST-like masks train; covid-seg-like masks train only with a partial
    reference, and the manifest says which sets (and splits) the UNet never saw."""
    rng = np.random.default_rng(5)
    for name, count in (("openist", 8), ("covid-seg", 6)):
        for folder in ("images", "masks-lung"):
            (tmp_path / "data" / "lung-seg" / name / folder).mkdir(parents=True)
        for number in range(count):
            Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(
                tmp_path / "data" / "lung-seg" / name / "images" / f"{name}-{number}.png")
            mask = np.zeros((64, 64), dtype=np.uint8)
            mask[16:48, 8:28] = mask[16:48, 36:56] = 255
            Image.fromarray(mask).save(tmp_path / "data" / "lung-seg" / name / "masks-lung" / f"{name}-{number}.png")
    out = _weights(tmp_path)
    main(["lung", "--data-dir", str(tmp_path / "data"), "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
          "--epochs", "1", "--partial-reference", str(Path(__file__).parents[1] / "weights" / "manifest.yaml")])
    training = read_manifest(out / "manifest.yaml")["lung"]["training"]
    assert "heart" in training["convention"] and "retrocardiac" in training["convention"]
    assert any("partial labels" in data and "covid-seg" in data for data in training["data"])
    assert len(training["not_trained_on"]) == 1
    assert "its val and test splits" in training["not_trained_on"][0]
    assert training["images"] == sum(1 for name, count in (("openist", 8), ("covid-seg", 6)) for n in range(count)
                                     if hash_split(f"{name}-{n}") == "train")


def test_lung_margin_trains_on_the_unmasked_box_and_its_mask_and_records_so(tmp_path: Path) -> None:
    """A ``lung`` cache holds each input's unmasked lung box and the mask it keeps (together they make the
    input); ``--lung-margin`` trains from them and the run's augmentation says so; asked of another region,
    it is a clear error."""
    _covid_set(tmp_path / "data", np.random.default_rng(8))
    out = _weights(tmp_path)
    common = ["classifier", "--heads", "covid19", "--no-guidance", "--data-dir", str(tmp_path / "data"),
              "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--size", "64", "--epochs", "1"]
    main([*common, "--lung-margin", "3"])
    entry = next(f for f in read_manifest(out / "manifest.yaml")["findings"] if f["name"] == "covid19")
    assert "lung mask edge moved in or out by 0-3 px" in entry["training"]["runs"][-1]["augmentation"]
    with np.load(tmp_path / "cache" / "covid19+nih+openist-val_lung-64+keep.npz") as arrays:
        masked, crop, keep = arrays["lung-64"], arrays["lung-64-crop"], arrays["lung-64-keep"]
    assert crop.shape == keep.shape == masked.shape and set(np.unique(keep)) <= {0, 1}
    assert np.array_equal(masked, crop * keep) and 0 < keep.mean() < 1
    with pytest.raises(SystemExit):
        main([*common, "--lung-margin", "3", "--region", "lung-crop"])


def test_a_smoothed_head_records_its_blur_and_its_threshold_is_chosen_on_blurred_inputs(tmp_path: Path) -> None:
    """``--smooth`` puts the blur in the trained head's input spec (the node applies it from there), and
    ``--threshold-only`` scores the validation split blurred the same way."""
    _covid_set(tmp_path / "data", np.random.default_rng(9), count=14)
    out = _weights(tmp_path)
    common = ["classifier", "--heads", "covid19", "--no-guidance", "--data-dir", str(tmp_path / "data"),
              "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--size", "64"]
    for invalid in ("-1", "0", "soft"):
        with pytest.raises(SystemExit):
            main([*common, "--epochs", "1", "--smooth", invalid])
    main([*common, "--epochs", "1", "--smooth", "1.0"])
    main([*common, "--threshold-only"])
    entry = next(f for f in read_manifest(out / "manifest.yaml")["findings"] if f["name"] == "covid19")
    assert entry["input"]["smooth"] == 1.0 and "chosen again" in entry["threshold_rule"]
    with np.load(tmp_path / "cache" / "covid19+nih+openist-val_lung-64+keep.npz") as arrays:
        val = arrays["split"] == "val"
        labels, sources, images = arrays["label"][val], arrays["source"][val], arrays["lung-64"][val]
    sharp = classifier_cache(HEADS["covid19"], tmp_path / "data", out, tmp_path / "unsmoothed")  # 128 px, unsmoothed
    soft = classifier_cache(replace(HEADS["covid19"], spec=InputSpec(128, smooth=1.0)), tmp_path / "data", out,
                            tmp_path / "cache")
    assert np.array_equal(sharp["lung-128"], soft["lung-128"])  # caches hold inputs unsmoothed, whatever the head
    blurred = smoothed(images / np.float32(255), 1.0, masked=True)
    with torch.no_grad():
        scores = torch.sigmoid(load_network(entry, out, torch.device("cpu"))(torch.from_numpy(blurred[:, None]))[:, 0])
    assert entry["threshold"] == pytest.approx(worst_source_threshold(labels, scores.numpy(), sources), abs=1e-4)
