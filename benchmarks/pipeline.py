"""Time the chest X-ray pipeline stage by stage on CPU or GPU, on pydicom-data's RG1_UNCI.dcm (1955 × 1841 CR)
or another of its chest images (``--image RG1_J2KR.dcm``: the same image in lossless JPEG 2000).

    python benchmarks/pipeline.py [--device cpu|cuda] [--image RG1_UNCI.dcm] [--repeats 5] [--threads N] [--json]

Reports the median per-image time of decode (read + pixel data), preprocess
(Modality/VOI LUT, inversion), segmentation, the gate's content check, classification and Grad-CAM (all
findings), the end-to-end time per image, images/s at batch 1 and batch 8 (decode
included), and the process's peak resident memory. CPU target: ≤ 1.0 s per image.

Reference, measured in the same run: decode plus the networks' forward passes alone
(segmentation, the content check and every classifier, on inputs prepared beforehand), the least any node
running these models spends per image. The ratio end to end / reference is what
preprocessing, mask post-processing, lung cropping and Grad-CAM add; it moves less
with the machine's load than the absolute times do.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import torch
from pydicom.data import get_testdata_file

from pipelines.base import ImageInput
from pipelines.chest_xray.content import content_batch
from pipelines.chest_xray.pipeline import ChestXrayPipeline

TARGET_S = 1.0


def _median_s(action: Callable[[], Any], repeats: int) -> float:
    action()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()  # a GPU's work is timed to its end, not to its launch
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _decode(path: str) -> pydicom.Dataset:
    dataset = pydicom.dcmread(path)
    dataset.pixel_array  # noqa: B018  (decodes and caches the pixel data)
    return dataset


def measure(pipeline: ChestXrayPipeline, path: str, repeats: int) -> dict[str, Any]:
    """Return per-stage median seconds per image, throughput and peak memory."""
    dataset = _decode(path)
    image = pipeline.load(dataset)
    masks = pipeline.segmenter.masks([image.display])
    batches = {c.name: c.inputs([image.display], masks) for c in pipeline.classifiers}
    stages = {
        "decode": _median_s(lambda: _decode(path), repeats),
        "preprocess": _median_s(lambda: pipeline.load(dataset), repeats),
        "segmentation": _median_s(lambda: pipeline.segmenter.masks([image.display]), repeats),
        "content_check": _median_s(lambda: pipeline.content_check.verdicts([image.display], masks), repeats),
        "classification": _median_s(
            lambda: [c.probabilities(c.inputs([image.display], masks)[0]) for c in pipeline.classifiers], repeats
        ),
        "gradcam": _median_s(
            lambda: [c.gradcam.heatmaps(*batches[c.name], masks) for c in pipeline.classifiers], repeats
        ),
    }

    def end_to_end(size: int) -> list[ImageInput]:
        return pipeline.run([pipeline.load(_decode(path)) for _ in range(size)])

    segmenter_input = pipeline.segmenter.network_inputs([image.display])
    content_input = content_batch([image.display], pipeline.content_check.size)
    reference = _median_s(
        lambda: (_decode(path), pipeline.segmenter.probabilities(segmenter_input),
                 torch.sigmoid(pipeline.content_check.network(content_input)),
                 [c.probabilities(batches[c.name][0]) for c in pipeline.classifiers]),
        repeats,
    )
    per_image = {size: _median_s(lambda size=size: end_to_end(size), max(repeats // size, 2)) / size for size in (1, 8)}
    return {
        "image": Path(path).name,
        "device": str(pipeline.segmenter.device),
        "shape": list(image.display.shape),
        "threads": torch.get_num_threads(),
        "stages_s": {k: round(v, 4) for k, v in stages.items()},
        "end_to_end_s_per_image": round(per_image[1], 4),
        "reference_networks_only_s_per_image": round(reference, 4),
        "end_to_end_over_reference": round(per_image[1] / reference, 2),
        "images_per_s": {f"batch_{size}": round(1 / seconds, 2) for size, seconds in per_image.items()},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "target_s_per_image": TARGET_S,
        "meets_target": per_image[1] <= TARGET_S,
    }


def main() -> None:
    """Parse the command line, run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=Path("weights/manifest.yaml"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--image", default="RG1_UNCI.dcm", help="a pydicom-data file (default: RG1_UNCI.dcm)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "benchmarks/pipeline.py: --device cuda, but torch sees no CUDA device here\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipeline = ChestXrayPipeline.from_manifest(args.weights, device=args.device)
    path = get_testdata_file(args.image)
    if path is None:
        parser.exit(2, f"benchmarks/pipeline.py: pydicom-data has no {args.image}\n")
    report = measure(pipeline, path, args.repeats)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['image']} {report['shape'][0]}x{report['shape'][1]} on {report['device']}, "
          f"{report['threads']} CPU threads")
    for stage, seconds in report["stages_s"].items():
        print(f"  {stage:<15} {seconds * 1000:8.1f} ms")
    print(f"  {'end to end':<15} {report['end_to_end_s_per_image'] * 1000:8.1f} ms/image (target ≤ {TARGET_S:.1f} s)")
    print(f"  {'reference':<15} {report['reference_networks_only_s_per_image'] * 1000:8.1f} ms/image "
          "(decode + network forward passes only)")
    print(f"  {'ratio':<15} {report['end_to_end_over_reference']:8.2f} end to end / reference")
    for batch, rate in report["images_per_s"].items():
        print(f"  {batch:<15} {rate:8.2f} images/s")
    print(f"  {'peak RSS':<15} {report['peak_rss_mib']:8.1f} MiB")


if __name__ == "__main__":
    main()
