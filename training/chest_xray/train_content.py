"""Train the gate's view / body-part network and record it as ``content_check`` in the manifest.

    python -m training.chest_xray.train_content --data-dir ../shared/data --out weights/

Positives: the frontal chest images of the train split of every chest set. Negatives,
made for each run from the same split and nothing of the evaluation corpus:

- each train chest image under one transform of :data:`gate_corpus.TRANSFORMS`
  (inverted, turned, upside down, cropped to one part);
- synthetic images with the seeds :data:`gate_corpus.TRAINING_SEEDS` (the corpus uses others);
- the photographs, micrographs and phantoms bundled with scikit-image, as they are,
  turned and inverted.

No radiograph of other anatomy is used in training: the pydicom-data images of the
corpus stay unseen. The threshold is the 0.5th percentile of the network's score on the
chest images of the validation split (the rule fixed before the first run), so about
one frontal chest in 200 is expected to be skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Resize
from monai.utils import set_determinism
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from pipelines.chest_xray.models import build_network, save_weights
from pipelines.chest_xray.preprocess import load_image_file, network_image, window
from pipelines.errors import InputError, WeightsError
from training.chest_xray import datasets, gate_corpus
from training.chest_xray.train import augmentations, cached, pick_device, update_manifest

logger = logging.getLogger(__name__)

SIZE = 64
THUMBNAIL = 128
ARCHITECTURE = {
    "name": "DenseNet",
    "args": {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "init_features": 16, "growth_rate": 8,
             "block_config": [3, 6, 6]},
}
#: covid-radiography has 20 times more images than the other sets: every n-th is used.
COVID_RADIOGRAPHY_STRIDE = 3
THRESHOLD_PERCENTILE = 0.5
THRESHOLD_RULE = f"{THRESHOLD_PERCENTILE} th percentile of the scores of the validation split's frontal chest images"


def thumbnail(display: np.ndarray, size: int = THUMBNAIL) -> np.ndarray:
    """Return ``display`` area-resized to ``size``² as uint8 (transforms are applied at this size)."""
    return np.round(np.asarray(Resize((size, size), mode="area")(display[None].astype(np.float32))[0])).astype(np.uint8)


def chest_thumbnails(data_dir: Path, split: str) -> list[np.ndarray]:
    """Return the thumbnails of the frontal chest images of ``split`` (covid-radiography thinned)."""
    images = []
    for name, samples in datasets.frontal_chest_samples(data_dir, split).items():
        chosen = samples[::COVID_RADIOGRAPHY_STRIDE] if name == "covid-radiography" else samples
        images += [thumbnail(load_image_file(s.image).display) for s in tqdm(chosen, desc=f"{name} {split}")]
    return images


def scikit_image_pictures() -> list[np.ndarray]:
    """Return the grey thumbnails of the images bundled with scikit-image (none is a radiograph)."""
    import skimage.data

    pictures = []
    for name in ("astronaut", "camera", "coins", "moon", "page", "horse", "clock", "coffee", "chelsea", "rocket",
                 "text", "grass", "gravel", "brick", "hubble_deep_field", "immunohistochemistry", "retina", "cat",
                 "logo", "microaneurysms", "binary_blobs", "cell", "colorwheel", "shepp_logan_phantom"):
        picture = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
        if picture.ndim == 3:
            picture = picture[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        pictures.append(thumbnail(window(picture, float(picture.min()), float(picture.max()))))
    return pictures


def negatives(chests: Sequence[np.ndarray], seeds: Sequence[int], rng: np.random.Generator) -> list[np.ndarray]:
    """Return the negatives made from ``chests`` (one random transform each), synthetic images of
    ``seeds``, and scikit-image's pictures as they are, turned and inverted."""
    kinds = list(gate_corpus.TRANSFORMS)
    made = [gate_corpus.TRANSFORMS[kinds[rng.integers(len(kinds))]](c) for c in chests]
    made += [thumbnail(image.display) for image in gate_corpus.synthetic_images(seeds, size=THUMBNAIL)]
    for picture in scikit_image_pictures():
        made += [picture, np.rot90(picture), picture[::-1], 255 - picture]
    return [network_image(np.ascontiguousarray(image), SIZE) for image in made]


def content_arrays(data_dir: Path, seed: int) -> dict[str, np.ndarray]:
    """Return the train and val inputs and labels of the view / body-part network."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, seeds in (("train", gate_corpus.TRAINING_SEEDS[:200]), ("val", gate_corpus.TRAINING_SEEDS[200:])):
        chests = chest_thumbnails(data_dir, split)
        positive = [network_image(c, SIZE) for c in chests]
        negative = negatives(chests, list(seeds), rng)
        arrays[f"{split}_images"] = np.stack(positive + negative).astype(np.float32)
        arrays[f"{split}_labels"] = np.array([1] * len(positive) + [0] * len(negative), dtype=np.float32)
    return arrays


def _scores(network: torch.nn.Module, images: np.ndarray, device: torch.device) -> np.ndarray:
    network.eval()
    with torch.no_grad():
        batches = torch.from_numpy(images[:, None]).split(256)
        return torch.cat([torch.sigmoid(network(b.to(device))[:, 0]).cpu() for b in batches]).numpy()


def train_content(data_dir: Path, out: Path, cache_dir: Path, epochs: int, batch_size: int, seed: int) -> dict[str, Any]:
    """Train the view / body-part network; return its manifest entry (weights written to ``out``)."""
    device = pick_device()
    folder = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:8]
    arrays = cached(cache_dir / f"content_{SIZE}_seed{seed}_{folder}.npz", lambda: content_arrays(data_dir, seed))
    labels = arrays["train_labels"]
    items = [{"image": image[None], "label": label[None]} for image, label in zip(arrays["train_images"], labels)]
    loader = DataLoader(Dataset(items, augmentations(["image"], ["bilinear"], flip=True)), batch_size=batch_size,
                        shuffle=True, num_workers=0)
    network = build_network(ARCHITECTURE).to(device)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([(labels == 0).sum() / max((labels == 1).sum(), 1)]))
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    started = time.monotonic()
    for epoch in tqdm(range(epochs), desc="content check"):
        network.train()
        for batch in loader:
            optimizer.zero_grad()
            loss = loss_fn(network(batch["image"].to(device))[:, 0], batch["label"][:, 0].to(device))
            loss.backward()
            optimizer.step()
        schedule.step()
        val_scores = _scores(network, arrays["val_images"], device)
        logger.info("epoch %d loss %.4f val AUROC %.4f", epoch + 1, loss.item(),
                    roc_auc_score(arrays["val_labels"], val_scores))
    val_labels = arrays["val_labels"].astype(bool)
    val_scores = _scores(network, arrays["val_images"], device)
    threshold = float(np.percentile(val_scores[val_labels], THRESHOLD_PERCENTILE))
    path = out / "content_check.pt"
    return {
        "file": path.name,
        "sha256": save_weights(network.cpu(), path),
        "format": "monai",
        "architecture": ARCHITECTURE,
        "input": {"size": [SIZE, SIZE], "region": "whole", "channels": 1,
                  "intensity": "display image, area-resized, percentiles 0.5-99.5 scaled to [0, 1]"},
        "output": "sigmoid: probability that the image is a frontal chest radiograph",
        "threshold": round(threshold, 4),
        "threshold_rule": THRESHOLD_RULE,
        "validation": {
            "auroc": round(float(roc_auc_score(val_labels, val_scores)), 5),
            "chest_images": int(val_labels.sum()),
            "negatives": int((~val_labels).sum()),
            "negatives_passed": round(float((val_scores[~val_labels] >= threshold).mean()), 4),
        },
        "training": {
            "epochs": epochs,
            "minutes": round((time.monotonic() - started) / 60, 1),
            "seed": seed,
            "images": int(labels.size),
            "chest_images": int(labels.sum()),
            "loss": "binary cross-entropy, positives weighted to balance",
            "optimizer": "Adam lr 1e-3, cosine decay; last epoch kept",
            "split": datasets.SPLIT_RULE + " (nih-cxr14: official split)",
            "data": [f"positives: train split of {', '.join(datasets.FRONTAL_CHEST_SETS)} "
                     f"(covid-radiography every {COVID_RADIOGRAPHY_STRIDE}th image)",
                     "negatives: those images inverted / turned / upside down / cropped, synthetic images "
                     "(seeds 100-399), scikit-image's bundled pictures; no radiograph of other anatomy"],
        },
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, train the view / body-part network, record it in the manifest."""
    parser = argparse.ArgumentParser(prog="python -m training.chest_xray.train_content", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("weights"))
    parser.add_argument("--cache-dir", type=Path, default=Path(".train"))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        parser.error("--epochs and --batch-size must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    set_determinism(seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        entry = train_content(args.data_dir, args.out, args.cache_dir, args.epochs, args.batch_size, args.seed)
        update_manifest(args.out, "content_check", entry)
    except (InputError, WeightsError) as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
