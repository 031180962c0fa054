"""Train the chest X-ray models and record them in the weights manifest.

    python -m training.chest_xray.train lung --data-dir ../shared/data --out weights/
    python -m training.chest_xray.train classifier --data-dir ../shared/data --out weights/

Seeded; uses CUDA when present, else CPU. Decoded, resized images are cached as
numpy arrays under ``--cache-dir`` (git-ignored) so that epochs are cheap.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, replace
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.losses import DiceCELoss
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    Resize,
)
from monai.utils import set_determinism
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch.optim.swa_utils import AveragedModel, update_bn
from torch.utils.data import WeightedRandomSampler
from tqdm import tqdm

from pipelines.chest_xray.gradcam import GRADCAM_LAYER
from pipelines.chest_xray.models import build_network, load_network, read_manifest, save_weights, write_manifest
from pipelines.chest_xray.preprocess import (
    REGIONS,
    InputSpec,
    classifier_input,
    load_image_file,
    lung_keep,
    network_image,
    smoothed,
)
from pipelines.chest_xray.segmentation import LungSegmenter
from pipelines.errors import InputError, WeightsError
from training.chest_xray import datasets
from training.chest_xray.acquisition import (
    CLASSIFIER_DESCRIPTION,
    CLASSIFIER_KINDS,
    DESCRIPTION as ACQUISITION_AUGMENTATION,
    RandAcquisitiond,
)
from training.chest_xray.datasets import Sample
from training.chest_xray.guidance import GUIDED_LAYER, ActivationMap, pointing_loss
from training.chest_xray.lung_margin import RandLungMargind, margin_text
from training.chest_xray.metrics import binary_metrics, dice, worst_source_threshold, youden_threshold

logger = logging.getLogger(__name__)

LUNG_SIZE = 256
LUNG_SCALE = 0.3  # zoomed out to 0.7 over black: the body smaller in the frame, dark surroundings
LUNG_ARCHITECTURE = {
    "name": "UNet",
    "args": {
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": 2,
        "channels": [16, 32, 64, 128, 256],
        "strides": [2, 2, 2, 2],
        "num_res_units": 2,
    },
}
LUNG_SETS = {
    "openist": "lung-seg/openist: OpenIST Chest_x-ray (pi-null-mezon/OpenIST); no licence stated, research use, "
    "not redistributable",
    "covid-seg": "lung-seg/covid-seg: GeneralBlockchain covid-19-chest-xray-segmentations-dataset (ieee8023 images); "
    "CC BY 4.0 repo, per-image Apache-2.0 / CC BY / CC BY-NC-SA (non-commercial)",
}
#: What the lung mask is, for every use the node makes of it (the SC contour, the region Grad-CAM may
#: point into, the SEG's lung segment, the classifiers' lung box).
LUNG_CONVENTION = (
    "the lung fields visible on the frontal radiograph, apex to costophrenic angles: the heart, mediastinum, "
    "retrocardiac lung and the lung below the diaphragm's dome are outside"
)
#: Sets whose masks follow :data:`LUNG_CONVENTION` and train the UNet; the others are scored as outside sources.
LUNG_TRAIN_SETS = ("openist",)
#: Sets whose masks take in what :data:`LUNG_CONVENTION` leaves out: never trained on with their masks as
#: they are (``--partial-reference`` trains on their agreement with this convention only).
LUNG_OTHER_CONVENTION = {
    "covid-seg": "its masks take in the retrocardiac lung (behind the heart's silhouette)",
}


def pick_device() -> torch.device:
    """Return CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cached(path: Path, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Return the arrays stored at ``path``, building and saving them first when absent."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = build()
        np.savez(path, **arrays)
        logger.info("cached %s", path)
    with np.load(path) as stored:
        return dict(stored)


def _binary_mask(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as mask:
        return np.asarray(mask.convert("L").resize((size, size), Image.NEAREST)) > 127


def lung_arrays(samples: Sequence[Sample], size: int) -> dict[str, np.ndarray]:
    """Return uint8 images (network input × 255) and masks at ``size``², with their split."""
    images, masks = [], []
    for sample in tqdm(samples, desc="decode lung set"):
        images.append(np.round(network_image(load_image_file(sample.image).display, size) * 255).astype(np.uint8))
        masks.append(_binary_mask(sample.mask, size))
    return {
        "images": np.stack(images),
        "masks": np.stack(masks).astype(np.uint8),
        "split": np.array([datasets.hash_split(s.image.stem) for s in samples]),
    }


def augmentation_text(scale: float = 0.12) -> str:
    """Return what :func:`augmentations` does at ``scale``, for the manifest."""
    return (
        f"affine (rotation ±0.15 rad, scale ±{round(scale * 100)} %, shift 12 px), gamma 0.6-1.6, intensity ±15 %, "
        "Gaussian blur, Gaussian noise"
    )


def augmentations(
    keys: Sequence[str], modes: Sequence[str], flip: bool = False, acquisition: RandAcquisitiond | None = None,
    scale: float = 0.12,
) -> Compose:
    """Return the geometric and acquisition-like intensity augmentations used in training; with
    ``flip``, images are also flipped left-right half of the time; ``acquisition``
    (:mod:`training.chest_xray.acquisition`) changes the image first; ``scale`` is the affine's
    scale range (± that share, zoomed out over a black surround).
    """
    image = keys[0]
    flips = [RandFlipd(keys=keys, prob=0.5, spatial_axis=1)] if flip else []
    acquired = [acquisition] if acquisition is not None else []
    return Compose(
        [
            *acquired,
            *flips,
            RandAffined(
                keys=keys,
                prob=0.8,
                rotate_range=0.15,
                scale_range=scale,
                translate_range=(12, 12),
                mode=modes,
                padding_mode="zeros",
            ),
            RandAdjustContrastd(keys=image, prob=0.5, gamma=(0.6, 1.6)),
            RandScaleIntensityd(keys=image, prob=0.3, factors=0.15),
            RandGaussianSmoothd(keys=image, prob=0.2, sigma_x=(0.3, 1.2), sigma_y=(0.3, 1.2)),
            RandGaussianNoised(keys=image, prob=0.3, std=0.03),
        ]
    )


IGNORED = 2  # a lung label pixel the loss skips


def partial_dice_ce(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Return cross-entropy plus soft Dice of the lung channel over the pixels whose ``label`` (B, 1, H, W)
    is not :data:`IGNORED` (0 background, 1 lung)."""
    valid = (label[:, 0] != IGNORED).float()
    lung = (label[:, 0] == 1).float()
    log_p = logits.log_softmax(1)
    cross_entropy = -((log_p[:, 1] * lung + log_p[:, 0] * (1 - lung)) * valid).sum() / valid.sum().clamp(min=1)
    p = log_p[:, 1].exp() * valid
    overlap, total = (p * lung).sum((1, 2)), p.sum((1, 2)) + (lung * valid).sum((1, 2))
    return cross_entropy + (1 - (2 * overlap + 1e-5) / (total + 1e-5)).mean()


@torch.no_grad()
def partial_labels(arrays: dict[str, np.ndarray], reference: torch.nn.Module, device: torch.device) -> np.ndarray:
    """Return the masks of another convention's set with the lung pixels that the ``reference`` UNet (of
    :data:`LUNG_CONVENTION`) calls background set to :data:`IGNORED`: where the conventions disagree
    (the retrocardiac lung), the set teaches nothing."""
    reference.eval()
    images = torch.from_numpy(arrays["images"][:, None] / np.float32(255))
    called = torch.cat([reference(chunk.to(device)).argmax(1).cpu() for chunk in images.split(32)]).numpy() == 1
    labels = arrays["masks"].astype(np.uint8)
    labels[(labels == 1) & ~called] = IGNORED
    return labels


def train_lung(data_dir: Path, out: Path, cache_dir: Path, epochs: int, batch_size: int, workers: int = 0,
               partial_reference: Path | None = None) -> dict[str, Any]:
    """Train the lung UNet on the train split of :data:`LUNG_TRAIN_SETS`; return its manifest entry
    (weights written to ``out``). The epoch of best Dice on their val split is kept.

    With ``partial_reference`` (a manifest of a UNet of :data:`LUNG_CONVENTION`), the train split of
    :data:`LUNG_OTHER_CONVENTION`'s sets trains too, with :func:`partial_labels`.
    """
    device = pick_device()

    def lung_set(names: Sequence[str]) -> dict[str, np.ndarray]:
        roots = [data_dir / "lung-seg" / name for name in names]
        return cached(
            cache_dir / f"lung_{'+'.join(names)}_{LUNG_SIZE}.npz",
            lambda: lung_arrays([s for r in roots for s in datasets.masked_samples(r, "masks-lung")], LUNG_SIZE),
        )

    arrays = lung_set(LUNG_TRAIN_SETS)
    train = arrays["split"] == "train"
    val = arrays["split"] == "val"
    images, labels = [arrays["images"][train]], [arrays["masks"][train]]
    reference = read_manifest(partial_reference)["lung"] if partial_reference else None
    if reference:
        other = lung_set(tuple(LUNG_OTHER_CONVENTION))
        network = load_network(reference, partial_reference.parent, device)
        other_train = other["split"] == "train"
        images.append(other["images"][other_train])
        labels.append(partial_labels(other, network, device)[other_train])
    items = [
        {"image": image[None] / np.float32(255), "label": label[None].astype(np.float32)}
        for image, label in zip(np.concatenate(images), np.concatenate(labels), strict=True)
    ]
    loader = DataLoader(
        Dataset(items, augmentations(["image", "label"], ["bilinear", "nearest"], flip=True,
                                    acquisition=RandAcquisitiond("image"), scale=LUNG_SCALE)),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    val_images = torch.from_numpy(arrays["images"][val][:, None] / np.float32(255))
    val_masks = torch.from_numpy(arrays["masks"][val].astype(bool))
    network = build_network(LUNG_ARCHITECTURE).to(device)
    loss_fn = partial_dice_ce if reference else DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    best, best_state, started = -1.0, None, time.monotonic()
    progress = tqdm(range(epochs), desc="lung")
    for epoch in progress:
        network.train()
        for batch in loader:
            optimizer.zero_grad()
            loss = loss_fn(network(batch["image"].to(device)), batch["label"].to(device))
            loss.backward()
            optimizer.step()
        schedule.step()
        network.eval()
        with torch.no_grad():
            predicted = torch.cat(
                [network(chunk.to(device)).argmax(1).cpu().bool() for chunk in val_images.split(32)]
            )
        score = float(np.mean([dice(p, t) for p, t in zip(predicted.numpy(), val_masks.numpy(), strict=True)]))
        if score > best:
            best, best_state = score, {k: v.detach().clone() for k, v in network.state_dict().items()}
        progress.set_postfix(loss=f"{loss.item():.3f}", val_dice=f"{score:.4f}", best=f"{best:.4f}")
        logger.info("epoch %d loss %.4f val dice %.4f", epoch + 1, loss.item(), score)
    network.load_state_dict(best_state)
    path = out / "lung_unet.pt"
    return {
        "file": path.name,
        "sha256": save_weights(network.cpu(), path),
        "format": "monai",
        "architecture": LUNG_ARCHITECTURE,
        "input": {
            "size": [LUNG_SIZE, LUNG_SIZE],
            "region": "whole",
            "channels": 1,
            "intensity": "display image, area-resized, percentiles 0.5-99.5 scaled to [0, 1]",
        },
        "output": "softmax over (background, lung); lung where p > 0.5 at source resolution, "
        "two largest components kept, holes filled",
        "threshold": 0.5,
        "validation": {"dice_mean_at_256px": round(best, 4), "images": int(val.sum())},
        "training": {
            "epochs": epochs,
            "minutes": round((time.monotonic() - started) / 60, 1),
            "images": len(items),
            "loss": "Dice-CE over the pixels not ignored (partial labels)" if reference else "DiceCE",
            "optimizer": "Adam lr 1e-3, cosine decay",
            "split": datasets.SPLIT_RULE,
            "convention": LUNG_CONVENTION,
            "augmentation": f"left-right flips, {augmentation_text(LUNG_SCALE)}; {ACQUISITION_AUGMENTATION}",
            "data": [LUNG_SETS[name] for name in LUNG_TRAIN_SETS] + ([
                f"{LUNG_SETS[name]}: {why}; its train split trains with partial labels: its lung pixels that the "
                f"UNet {reference['sha256'][:12]} (this convention) calls background are ignored"
                for name, why in LUNG_OTHER_CONVENTION.items()] if reference else []),
            "not_trained_on": [
                f"{LUNG_SETS[name]}: {'its val and test splits' if reference else why}"
                for name, why in LUNG_OTHER_CONVENTION.items()],
        },
    }


CLASSIFIER_ARCHITECTURE = {
    "name": "DenseNet",
    "args": {
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": 1,
        "init_features": 32,
        "growth_rate": 16,
        "block_config": [4, 8, 12, 8],
    },
}
COVID_DATA = (
    "covid-radiography: COVID-19 Radiography Database (Qatar University / University of Dhaka; Chowdhury et al. "
    "2020, Rahman et al. 2021), 224 px copy from rtchanon/Machine-Learning-for-COVID-19-detection-from-chest-X-RAYS; "
    "research use with citation, sources carry their own licences; with the NIH ChestX-ray14 images of the official "
    "train and val splits as negatives (NIH Clinical Center, unrestricted use, cite Wang et al. CVPR 2017); "
    "the threshold is also chosen on lung-seg/openist's val hash split (43 normals, never trained on)"
)
NIH_DATA = (
    "nih-cxr14: NIH ChestX-ray14 subset (1,105 images, official CheXNet split; labels from arnoweng/CheXNet); "
    "NIH Clinical Center, unrestricted use, cite Wang et al. CVPR 2017"
)
GUIDE_SET = "lung-seg/covid-seg"
GUIDE_DATA = (
    "lung-seg/covid-seg masks-opacity, train hash split only (opacity guidance): GeneralBlockchain "
    "covid-19-chest-xray-segmentations-dataset (ieee8023 images); CC BY 4.0 repo, per-image Apache-2.0 / CC BY / "
    "CC BY-NC-SA (non-commercial)"
)
GUIDE_BATCH = 4
GUIDE_WEIGHT = 1.0
AVERAGE_KEPT = "mean of the weights at every epoch's end (SWA), batch-norm statistics recomputed on the training split"
BALANCED_SAMPLING = (
    "drawn with replacement, every source's negatives equally often in total, positives as often as shuffled"
)
THRESHOLD_RULE = "maximises Youden's J (sensitivity + specificity - 1) on the validation split"
SOURCES_THRESHOLD_RULE = (
    "maximises sensitivity + the lowest specificity of any source - 1 on the validation split "
    "(covid-radiography val, the negatives of NIH's official val split, and OpenIST's val hash split: normals "
    "of a source no classifier trains on)"
)


@dataclass(frozen=True)
class Head:
    """How one classifier is trained: its data, input, flagging policy and manifest text."""

    name: str
    display_name: str
    spec: InputSpec
    data: str
    gate: float
    experimental: bool
    epochs: int
    reference: bool = False
    gradcam_layer: str = GRADCAM_LAYER
    guided: bool = False  # trained with opacity guidance (training.chest_xray.guidance)


HEADS = {
    "covid19": Head(
        "covid19", "COVID-19 pattern", InputSpec(128, "lung"), COVID_DATA, 0.95, False, 20,
        gradcam_layer=GUIDED_LAYER, guided=True,
    ),
    "covid19-whole": Head(
        "covid19-whole", "COVID-19 pattern (whole image, source-bias reference)", InputSpec(128, "whole"),
        COVID_DATA, 0.95, True, 12, reference=True,
    ),
    "pneumothorax": Head("pneumothorax", "Pneumothorax", InputSpec(192, "lung-crop"), NIH_DATA, 0.9, True, 40),
}


def _lungs_or_whole(lung_mask: np.ndarray) -> np.ndarray:
    """Return ``lung_mask``, or all of the image when no lungs were found in it."""
    return lung_mask if lung_mask.any() else np.ones_like(lung_mask)


def _spec_key(spec: InputSpec) -> str:
    return f"{spec.region}-{spec.size}"


def _uint8(image: np.ndarray) -> np.ndarray:
    return np.round(image * 255).astype(np.uint8)


def cached_inputs(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Return cached uint8 inputs as the float32 inputs the node gives a classifier of ``spec`` (smoothed
    when it is)."""
    unit = images / np.float32(255)
    return smoothed(unit, spec.smooth, masked=spec.region == "lung") if spec.smooth else unit


def classifier_arrays(
    samples: Sequence[Sample], segmenter: LungSegmenter, specs: Sequence[InputSpec], splits: Sequence[str]
) -> dict[str, np.ndarray]:
    """Return uint8 inputs for each spec (key ``region-size``), labels and splits of ``samples``; a
    ``lung`` spec also gets its lung box unmasked (``…-crop``) and the mask it keeps (``…-keep``), for
    :class:`~training.chest_xray.lung_margin.RandLungMargind`.
    """
    keys = [_spec_key(s) for s in specs]
    keys += [f"{_spec_key(s)}-{part}" for s in specs if s.region == "lung" for part in ("crop", "keep")]
    inputs: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    for start in tqdm(range(0, len(samples), 32), desc="segment + crop"):
        chunk = samples[start : start + 32]
        displays = [load_image_file(s.image).display for s in chunk]
        for display, mask in zip(displays, map(_lungs_or_whole, segmenter.masks(displays)), strict=True):
            for spec in specs:
                image, box = classifier_input(display, mask, spec)
                inputs[_spec_key(spec)].append(_uint8(image[0]))
                if spec.region == "lung":
                    crop = classifier_input(display, mask, replace(spec, region="lung-crop"))[0][0]
                    inputs[f"{_spec_key(spec)}-crop"].append(_uint8(crop))
                    inputs[f"{_spec_key(spec)}-keep"].append(lung_keep(mask, box, spec.size).astype(np.uint8))
    return {
        **{key: np.stack(images) for key, images in inputs.items()},
        "label": np.array([s.label for s in samples], dtype=np.uint8),
        "split": np.array(list(splits)),
    }


def opacity_arrays(samples: Sequence[Sample], segmenter: LungSegmenter, spec: InputSpec) -> dict[str, np.ndarray]:
    """Return uint8 classifier inputs at ``spec`` with their opacity and lung masks cropped and
    resized the same way, and their split: the data of opacity guidance.
    """
    images, opacities, lungs = [], [], []
    for sample in tqdm(samples, desc="segment + crop opacity set"):
        display = load_image_file(sample.image).display
        lung = _lungs_or_whole(segmenter.masks([display])[0])
        image, box = classifier_input(display, lung, spec)
        images.append(np.round(image[0] * 255).astype(np.uint8))
        for masks, mask in ((opacities, datasets.read_mask(sample.mask, display.shape)), (lungs, lung)):
            resized = Resize((spec.size, spec.size), mode="nearest")(mask[box][None].astype(np.float32))
            masks.append(np.asarray(resized[0]) > 0.5)
    return {
        "images": np.stack(images),
        "opacity": np.stack(opacities).astype(np.uint8),
        "lung": np.stack(lungs).astype(np.uint8),
        "split": np.array([datasets.hash_split(s.image.stem) for s in samples]),
    }


def _forever(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the batches of ``loader`` epoch after epoch (reshuffled each time)."""
    while True:
        yield from loader


def _guide_batches(guide: dict[str, np.ndarray], workers: int, spec: InputSpec) -> Iterator[dict[str, torch.Tensor]]:
    """Return endless batches of the guidance set's train split (image, opacity and lung masks), augmented
    like the classification set and also flipped left-right half of the time: the guidance set is small.
    """
    train = np.flatnonzero(guide["split"] == "train")
    if train.size < GUIDE_BATCH:
        raise InputError(f"opacity guidance needs at least {GUIDE_BATCH} train-split images, found {train.size}")
    images = cached_inputs(guide["images"], spec)
    items = [
        {"image": images[i][None], **{key: guide[key][i][None].astype(np.float32) for key in ("opacity", "lung")}}
        for i in train
    ]
    loader = DataLoader(
        Dataset(items, augmentations(["image", "opacity", "lung"], ["bilinear", "nearest", "nearest"], flip=True)),
        batch_size=GUIDE_BATCH,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    return _forever(loader)


def source_balanced_weights(labels: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Return per-image sampling weights under which every source's negatives are drawn equally often
    in total; positives keep weight 1 and the weights sum to the number of images, so an epoch draws as
    many positives and negatives as without them (the loss's positive weight stays right).
    """
    negatives = np.asarray(labels) == 0
    sources = np.asarray(sources)
    names = np.unique(sources[negatives])
    weights = np.ones(len(negatives))
    for name in names:
        group = negatives & (sources == name)
        weights[group] = negatives.sum() / (len(names) * group.sum())
    return weights


def _best_kept(selectable: bool) -> str:
    """Return which weights a run without averaging keeps."""
    return "the epoch of best validation AUROC" if selectable else "the last epoch"


@torch.no_grad()
def predict(network: torch.nn.Module, images: torch.Tensor, device: torch.device) -> np.ndarray:
    """Return sigmoid scores of a (N, 1, H, W) tensor, in chunks."""
    network.eval()
    return torch.cat([torch.sigmoid(network(c.to(device))[:, 0]).cpu() for c in images.split(64)]).numpy()


def choose_threshold(head: Head, arrays: dict[str, np.ndarray], scores: np.ndarray) -> tuple[float, str, dict[str, Any]]:
    """Return the threshold chosen on the validation ``scores`` of ``arrays``, its rule, and the
    validation figures at it: those of the positives' source, then every other source's specificity.

    With more than one source the threshold is :func:`worst_source_threshold`'s, else Youden's.
    """
    val = np.flatnonzero(arrays["split"] == "val")
    labels = arrays["label"][val]
    sources = arrays["source"][val] if "source" in arrays else np.full(len(val), head.data.split(":")[0])
    source = sources[labels == 1][0]  # the positives' source: the in-source figures are of it alone
    if len(set(sources.tolist())) > 1:
        threshold, rule = worst_source_threshold(labels, scores, sources), SOURCES_THRESHOLD_RULE
    else:
        threshold, rule = youden_threshold(labels, scores), THRESHOLD_RULE
    threshold = round(threshold, 4)  # as the manifest holds it: the figures are those of the shipped threshold
    inside = sources == source
    validation: dict[str, Any] = {
        k: round(v, 4) for k, v in binary_metrics(labels[inside], scores[inside], threshold).items()
    }
    validation["images"] = int(inside.sum())  # the figures above are of the positives' source alone
    for other in sorted(set(sources.tolist()) - {source}):
        outside = sources == other
        validation[f"specificity_{other}"] = round(float((scores[outside] < threshold).mean()), 4)
        validation[f"images_{other}"] = int(outside.sum())
    return threshold, rule, validation


def rechoose_threshold(head: Head, arrays: dict[str, np.ndarray], out: Path) -> dict[str, Any]:
    """Return the manifest entry of ``head`` in ``out`` with its threshold chosen again on the validation
    split of ``arrays`` by today's rule (:func:`choose_threshold`); its weights are not changed.

    Raises :class:`InputError` when the validation split has one class only.
    """
    entry = _entry(out, head)
    labels, val = arrays["label"], np.flatnonzero(arrays["split"] == "val")
    if len(set(labels[val].tolist())) != 2:
        raise InputError(f"{head.name}: the validation split has one class only, there is no threshold to choose")
    device = pick_device()
    images = cached_inputs(arrays[_spec_key(head.spec)][val], head.spec)
    scores = predict(load_network(entry, out, device), torch.from_numpy(images[:, None]), device)
    threshold, rule, validation = choose_threshold(head, arrays, scores)
    logger.info("%s: threshold %.4f -> %.4f", head.name, entry["threshold"], threshold)
    return {
        **entry,
        "threshold": threshold,
        "threshold_rule": f"{rule}; chosen again without training, for the weights of the last run",
        "validation": {"images": int(len(val)), "positives": int(labels[val].sum()), **validation},
    }


def train_classifier(
    head: Head,
    arrays: dict[str, np.ndarray],
    out: Path,
    epochs: int,
    batch_size: int,
    lr: float = 1e-3,
    start: dict[str, Any] | None = None,
    workers: int = 0,
    max_minutes: float | None = None,
    guide: dict[str, np.ndarray] | None = None,
    average: bool = False,
    balance_sources: bool = False,
    margin: int = 0,
) -> dict[str, Any]:
    """Train one binary DenseNet head, from scratch or continuing from the manifest entry ``start``;
    return its manifest entry (weights written to ``out``).

    ``workers`` loader processes augment in parallel; with ``max_minutes`` training stops
    after the first epoch that ends past that time (the best epoch so far is kept). With
    ``guide`` (:func:`opacity_arrays`), every batch also carries :data:`GUIDE_BATCH` images of
    its train split, whose :func:`~training.chest_xray.guidance.pointing_loss` is added.
    With ``average``, the learning rate stays constant and the weights kept are the mean of
    those at the end of every epoch (stochastic weight averaging), with batch-norm statistics
    recomputed on the training split; otherwise the best validation epoch is kept. With
    ``balance_sources``, each epoch draws its images with replacement by
    :func:`source_balanced_weights` instead of shuffling them once each. With ``margin`` (px, ``lung``
    inputs only), each training image's lung mask edge moves by up to that much before masking
    (:class:`~training.chest_xray.lung_margin.RandLungMargind`).
    """
    device = pick_device()
    images = cached_inputs(arrays[_spec_key(head.spec)], head.spec)
    labels, split = arrays["label"], arrays["split"]
    train, val = np.flatnonzero(split == "train"), np.flatnonzero(split == "val")
    if margin and (head.spec.region != "lung" or head.spec.smooth):
        raise InputError(f"{head.name}: a lung margin needs an unsmoothed lung region as input")
    unmasked = {"image": arrays[f"{_spec_key(head.spec)}-crop"] / np.float32(255),
                "keep": arrays[f"{_spec_key(head.spec)}-keep"]} if margin else {"image": images}
    items = [{**{key: array[i][None] for key, array in unmasked.items()}, "label": np.float32(labels[i])}
             for i in train]
    sampler = None
    if balance_sources:
        if "source" not in arrays:
            raise InputError(f"{head.name}: its data set has one source only, there is nothing to balance")
        weights = source_balanced_weights(labels[train], arrays["source"][train])
        sampler = WeightedRandomSampler(torch.from_numpy(weights), num_samples=len(train), replacement=True)
    augment = augmentations(["image"], ["bilinear"], acquisition=RandAcquisitiond(
        "image", CLASSIFIER_KINDS, keep_background=True))
    loader = DataLoader(
        Dataset(items, Compose([RandLungMargind("image", "keep", margin), augment]) if margin else augment),
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    val_images = torch.from_numpy(images[val][:, None])
    network = load_network(start, out, device).train() if start else build_network(CLASSIFIER_ARCHITECTURE).to(device)
    positives = float(labels[train].sum())
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(train) - positives) / max(positives, 1.0)))
    optimizer = torch.optim.Adam(network.parameters(), lr=lr, weight_decay=1e-4)
    if average:
        schedule = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    else:
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    averaged = AveragedModel(network) if average else None
    selectable = len(set(labels[val].tolist())) == 2
    guides = _guide_batches(guide, workers, head.spec) if guide is not None else None
    activations = ActivationMap(network) if guide is not None else None
    best, best_state, started = -1.0, None, time.monotonic()
    progress = tqdm(range(epochs), desc=head.name)
    for epoch in progress:
        network.train()
        for batch in loader:
            optimizer.zero_grad()
            if guides is None:
                loss = loss_fn(network(batch["image"].to(device))[:, 0], batch["label"].to(device))
            else:
                extra = next(guides)
                logits = network(torch.cat([batch["image"], extra["image"]]).to(device))[:, 0]
                loss = loss_fn(logits[: len(batch["label"])], batch["label"].to(device))
                cam = activations.last(GUIDE_BATCH)
                loss = loss + GUIDE_WEIGHT * pointing_loss(cam, extra["opacity"].to(device), extra["lung"].to(device))
            loss.backward()
            optimizer.step()
        schedule.step()
        if averaged is not None:
            averaged.update_parameters(network)
        if selectable:
            auroc = float(roc_auc_score(labels[val], predict(network, val_images, device)))
            if auroc > best:
                best, best_state = auroc, {k: v.detach().clone() for k, v in network.state_dict().items()}
            progress.set_postfix(loss=f"{loss.item():.3f}", val_auroc=f"{auroc:.4f}", best=f"{best:.4f}")
        logger.info("%s epoch %d loss %.4f", head.name, epoch + 1, loss.item())
        run_epochs = epoch + 1
        if max_minutes is not None and time.monotonic() - started > max_minutes * 60:
            logger.warning("%s: stopped after %d of %d epochs (time limit %.0f min)", head.name, run_epochs, epochs, max_minutes)
            break
    if activations is not None:
        activations.close()
    if averaged is not None:
        update_bn((batch["image"] for batch in loader), averaged.module, device)
        network.load_state_dict(averaged.module.state_dict())
    elif selectable:
        network.load_state_dict(best_state)
    if selectable:
        threshold, rule, validation = choose_threshold(head, arrays, predict(network, val_images, device))
    else:
        threshold = 0.5
        validation = {"auroc": None, "note": "the validation split has one class only: no AUROC, gate not met"}
        rule = "fixed at 0.5: the validation split has no positives to choose it on"
    path = out / f"{head.name}_densenet.pt"
    history = list(start["training"].get("runs", [start["training"]])) if start else []
    return {
        "name": head.name,
        "display_name": head.display_name,
        "file": path.name,
        "sha256": save_weights(network.cpu(), path),
        "format": "monai",
        "architecture": CLASSIFIER_ARCHITECTURE,
        "input": head.spec.as_manifest(),
        "output": {"activation": "sigmoid", "index": 0},
        "threshold": threshold,
        "threshold_rule": rule,
        "gradcam_layer": head.gradcam_layer,
        "validation": {"images": int(len(val)), "positives": int(labels[val].sum()), **validation},
        "gate": {"metric": "validation auroc", "minimum": head.gate},
        "experimental": head.experimental,
        "flag_enabled": not head.experimental,
        "training": {
            "epochs": run_epochs + sum(run["epochs"] for run in history),
            "minutes": round((time.monotonic() - started) / 60 + sum(run["minutes"] for run in history), 1),
            "images": int(len(train)),
            "positives": int(positives),
            "loss": "BCE with logits, positive class weighted by the negative/positive ratio",
            "optimizer": "Adam, weight decay 1e-4",
            "runs": [*history, {"epochs": run_epochs, "lr": lr, "minutes": round((time.monotonic() - started) / 60, 1),
                                "continued_from": start["sha256"] if start else None, "guided": guide is not None,
                                "schedule": "constant" if average else "cosine decay",
                                "kept": AVERAGE_KEPT if average else _best_kept(selectable),
                                "sampling": BALANCED_SAMPLING if balance_sources else "each image once per epoch",
                                "augmentation": f"{augmentation_text()}; {CLASSIFIER_DESCRIPTION}"
                                + (f"; {margin_text(margin)}" if margin else "")}],
            "augmentation": f"{augmentation_text()}; each run since the acquisition augmentation also lists its own",
            "data": [head.data, *([GUIDE_DATA] if guide is not None else [])],
            **({"guidance": {
                "loss": f"{GUIDE_WEIGHT} × -log(share of the lung-restricted softmax of the class activation map "
                "on opacity), added to the classification loss",
                "layer": GUIDED_LAYER,
                "images": int((guide["split"] == "train").sum()),
                "per_batch": GUIDE_BATCH,
                "augmentation": "the training augmentation, plus left-right flips (p 0.5)",
            }} if guide is not None else {}),
        },
    }


def _segmenter(out: Path) -> LungSegmenter:
    """Return the lung segmenter of the manifest in ``out``."""
    manifest = read_manifest(out / "manifest.yaml")
    device = pick_device()
    return LungSegmenter(load_network(manifest["lung"], out, device), int(manifest["lung"]["input"]["size"][0]), device)


def guide_cache(head: Head, data_dir: Path, out: Path, cache_dir: Path) -> dict[str, np.ndarray]:
    """Return the cached opacity-guidance arrays (:func:`opacity_arrays`) at ``head``'s input spec."""
    try:
        samples = datasets.masked_samples(data_dir / GUIDE_SET, "masks-opacity")
    except InputError as exc:
        raise InputError(f"{exc}: opacity guidance needs {GUIDE_SET}, or train with --no-guidance") from exc
    spec = replace(head.spec, smooth=0.0)  # cached unsmoothed: cached_inputs smooths
    return cached(cache_dir / f"opacity_{_spec_key(spec)}.npz", lambda: opacity_arrays(samples, _segmenter(out), spec))


def classifier_cache(head: Head, data_dir: Path, out: Path, cache_dir: Path) -> dict[str, np.ndarray]:
    """Return the cached inputs of ``head``'s data set at its input spec, built with the trained lung model."""
    segmenter = _segmenter(out)
    spec = replace(head.spec, smooth=0.0)  # cached unsmoothed: cached_inputs smooths
    key = _spec_key(spec) + ("+keep" if spec.region == "lung" else "")  # "+keep": with -crop and -keep
    if head.name.startswith("covid19"):
        samples = datasets.covid_samples(data_dir / "covid-radiography")
        splits = [datasets.hash_split(s.image.stem) for s in samples]
        sources = ["covid-radiography"] * len(samples)
        negatives = [  # ChestX-ray14 predates COVID-19: every image is a negative
            (split, "nih-cxr14", datasets.labelled_samples(data_dir / "nih-cxr14", "Pneumothorax", split))
            for split in ("train", "val")
        ]
        try:
            negatives.append(("val", "openist", datasets.threshold_normals(data_dir)))
        except InputError as exc:
            raise InputError(f"{exc}: {head.name}'s threshold is chosen on {datasets.OUTSIDE_NORMALS}'s "
                             f"{datasets.THRESHOLD_SPLIT} split, outside normals it never trains on") from exc
        for split, source, chunk in negatives:
            samples = samples + [replace(s, label=0) for s in chunk]
            splits, sources = splits + [split] * len(chunk), sources + [source] * len(chunk)
        return cached(
            cache_dir / f"covid19+nih+openist-val_{key}.npz",
            lambda: {**classifier_arrays(samples, segmenter, [spec], splits), "source": np.array(sources)},
        )
    root = data_dir / "nih-cxr14"
    samples, splits = [], []
    for split in datasets.SPLITS:
        chunk = datasets.labelled_samples(root, "Pneumothorax", split)
        samples += chunk
        splits += [split] * len(chunk)
    return cached(cache_dir / f"nih_{key}.npz", lambda: classifier_arrays(samples, segmenter, [spec], splits))


def _entry(out: Path, head: Head) -> dict[str, Any]:
    """Return the manifest entry of ``head``; raises :class:`WeightsError` when it has none."""
    manifest = read_manifest(out / "manifest.yaml")
    for entry in manifest.get("references" if head.reference else "findings", []):
        if entry.get("name") == head.name:
            return entry
    raise WeightsError(f"no weights for {head.name} in {out / 'manifest.yaml'} to continue from")


def update_manifest(out: Path, section: str, entry: dict[str, Any]) -> None:
    """Set ``lung`` or ``content_check``, or replace the entry of the same name in ``findings`` or
    ``references``, in ``out/manifest.yaml`` (creating the manifest). References are models kept only
    for evaluation.
    """
    path = out / "manifest.yaml"
    try:
        manifest = read_manifest(path)
    except WeightsError:
        manifest = {"pipeline": "chest_xray", "version": "0.1.0", "lung": {}, "findings": []}
    if section in ("lung", "content_check"):
        manifest[section] = entry
    else:
        entries = manifest.get(section, [])
        names = [e.get("name") for e in entries]
        if entry["name"] in names:  # replaced where it stands: the order of findings is kept
            entries[names.index(entry["name"])] = entry
        else:
            entries.append(entry)
        manifest[section] = entries
    write_manifest(path, manifest)
    logger.info("updated %s: %s %s", path, section, entry.get("name", ""))


def _train(args: argparse.Namespace) -> None:
    """Train what the parsed command line ``args`` asks for and record it in the manifest."""
    if args.model == "lung":
        entry = train_lung(args.data_dir, args.out, args.cache_dir, args.epochs or 80, args.batch_size, args.workers,
                           args.partial_reference)
        update_manifest(args.out, "lung", entry)
        return
    for name in args.heads or list(HEADS):
        head = HEADS[name]
        set_determinism(seed=args.seed)
        if args.size or args.region or args.smooth:
            spec = replace(head.spec, size=args.size or head.spec.size, region=args.region or head.spec.region,
                           smooth=args.smooth or head.spec.smooth)
            head = replace(head, spec=spec)
        if args.threshold_only:
            head = replace(head, spec=InputSpec.from_manifest(_entry(args.out, head)["input"]))
            arrays = classifier_cache(head, args.data_dir, args.out, args.cache_dir)
            update_manifest(args.out, "references" if head.reference else "findings",
                            rechoose_threshold(head, arrays, args.out))
            continue
        guide = guide_cache(head, args.data_dir, args.out, args.cache_dir) if head.guided and args.guidance else None
        arrays = classifier_cache(head, args.data_dir, args.out, args.cache_dir)
        start = _entry(args.out, head) if args.resume else None
        entry = train_classifier(
            head, arrays, args.out, args.epochs or head.epochs, args.batch_size, args.lr, start, args.workers,
            args.max_minutes, guide, args.average, args.balance_sources, args.lung_margin,
        )
        update_manifest(args.out, "references" if head.reference else "findings", entry)


def _positive(text: str) -> int:
    """Return ``text`` as a positive int (argparse type)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _sigma(text: str) -> float:
    """Return ``text`` as a positive float (argparse type)."""
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from exc
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and train the chosen model(s)."""
    parser = argparse.ArgumentParser(prog="python -m training.chest_xray.train", description=__doc__)
    parser.add_argument("model", choices=["lung", "classifier"])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("weights"))
    parser.add_argument("--cache-dir", type=Path, default=Path(".train"))
    parser.add_argument("--epochs", type=_positive, default=None, help="default: 80 (lung), per head (classifier)")
    parser.add_argument("--heads", nargs="+", choices=list(HEADS), help="classifier heads to train (default: all)")
    parser.add_argument("--batch-size", type=_positive, default=16)
    parser.add_argument("--size", type=int, help="classifier: input size instead of the head's")
    parser.add_argument("--region", choices=REGIONS, help="classifier: input region instead of the head's")
    parser.add_argument("--workers", type=int, default=0, help="loader processes for augmentation")
    parser.add_argument("--max-minutes", type=float, help="classifier: stop after this many minutes of training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--partial-reference", type=Path, metavar="MANIFEST",
                        help="lung: also train on the sets of another convention, ignoring their lung pixels that "
                        "this manifest's UNet calls background")
    parser.add_argument("--lr", type=float, default=1e-3, help="classifier learning rate")
    parser.add_argument("--continue", dest="resume", action="store_true",
                        help="classifier: continue training each head from its weights in --out's manifest")
    parser.add_argument("--average", action="store_true",
                        help="classifier: keep the mean of every epoch's weights (SWA, constant learning rate) "
                        "instead of the best epoch")
    parser.add_argument("--balance-sources", action="store_true",
                        help="classifier: draw every source's negatives equally often in total (with replacement)")
    parser.add_argument("--smooth", type=_sigma, metavar="SIGMA",
                        help="classifier: blur the head's input by a Gaussian of SIGMA input pixels, in training "
                        "and in the node (recorded in the manifest's input)")
    parser.add_argument("--lung-margin", type=_positive, default=0, metavar="PX",
                        help="classifier, lung input: move each training image's lung mask edge in or out by up "
                        "to PX px at random before masking")
    parser.add_argument("--threshold-only", action="store_true",
                        help="classifier: choose each head's threshold again on its validation split, with its "
                        "weights in --out's manifest, without training")
    parser.add_argument("--no-guidance", dest="guidance", action="store_false",
                        help=f"classifier: train guided heads without opacity guidance (no {GUIDE_SET} needed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    set_determinism(seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        _train(args)
    except (InputError, WeightsError) as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
