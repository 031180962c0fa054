"""Batched inference: images handed over together share one model call and get what they get alone.

The chest pipeline runs on a batch of RG1, a mirrored copy and a blank image exactly as on each
alone; the :class:`~dicom_node.inference.InferenceBatcher` gathers images submitted from several
threads into one call, and an image that breaks its batch fails alone. Through `serve`, a burst of
one-image studies runs as overlapping jobs whose images share model calls, each analysed once and
its results delivered.
"""

from __future__ import annotations

import os
import subprocess
import threading
import urllib.request
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dicom_node.db import DeliveryStatus, JobStatus
from dicom_node.inference import InferenceBatcher
from pipelines.base import ImageInput, ImageResult
from pipelines.chest_xray.pipeline import ChestXrayPipeline
from tests.conftest import DcmtkStoreSCP, dcmtk_tool, free_port, sample_file, wait_for
from tests.dicom_factory import write_rg1_study

MANIFEST = Path(os.environ.get("TEST_WEIGHTS_MANIFEST", Path(__file__).resolve().parents[1] / "weights" / "manifest.yaml"))


class CountedPipeline:
    """The chest pipeline, recording how many images each of its model calls took."""

    def __init__(self, pipeline: ChestXrayPipeline) -> None:
        self.pipeline = pipeline
        self.calls: list[int] = []

    def run(self, inputs: Sequence[ImageInput]) -> list[ImageResult]:
        self.calls.append(len(inputs))
        return self.pipeline.run(inputs)


@pytest.fixture(scope="module")
def pipeline() -> ChestXrayPipeline:
    return ChestXrayPipeline.from_manifest(MANIFEST, device="cpu")


@pytest.fixture(scope="module")
def images(pipeline: ChestXrayPipeline) -> list[ImageInput]:
    rg1 = pipeline.load(dcmread(sample_file("RG1_UNCR.dcm")))
    mirrored = ImageInput("1.2.826.0.1.3680043.10.1.1", np.ascontiguousarray(rg1.pixels[:, ::-1]),
                          np.ascontiguousarray(rg1.display[:, ::-1]), rg1.pixel_spacing_mm)
    blank = ImageInput("1.2.826.0.1.3680043.10.1.2", np.zeros((512, 512), np.float32), np.zeros((512, 512), np.uint8))
    return [rg1, mirrored, blank]


@pytest.fixture(scope="module")
def alone(pipeline: ChestXrayPipeline, images: list[ImageInput]) -> list[ImageResult]:
    return [pipeline.run([image])[0] for image in images]


def assert_same_result(got: ImageResult, expected: ImageResult) -> None:
    assert got.sop_instance_uid == expected.sop_instance_uid
    assert got.verdict == expected.verdict
    assert got.masks.keys() == expected.masks.keys()
    for name, mask in expected.masks.items():
        assert np.array_equal(got.masks[name], mask), name
    assert [(f.name, f.flagged) for f in got.findings] == [(f.name, f.flagged) for f in expected.findings]
    for finding, reference in zip(got.findings, expected.findings, strict=True):
        assert finding.probability == pytest.approx(reference.probability, abs=1e-5)
        assert np.allclose(finding.heatmap, reference.heatmap, atol=1e-4)


def test_a_batch_gives_each_image_what_it_gets_alone(pipeline, images, alone):
    together = pipeline.run(images)
    assert [r.verdict.accepted for r in together] == [True, True, False]  # the blank one fails the content check
    for got, expected in zip(together, alone, strict=True):
        assert_same_result(got, expected)


def test_images_handed_over_together_share_one_model_call(pipeline, images, alone):
    counted = CountedPipeline(pipeline)
    batcher = InferenceBatcher(counted, name="chest_xray", batch_size=len(images), batch_wait_s=60)
    everyone_ready = threading.Barrier(len(images))
    futures: list[Future[ImageResult] | None] = [None] * len(images)

    def submit(index: int) -> None:
        everyone_ready.wait()
        futures[index] = batcher.submit(images[index])

    threads = [threading.Thread(target=submit, args=(index,)) for index in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results = [future.result(timeout=300) for future in futures if future is not None]
    assert counted.calls == [len(images)]  # the batch closed when full, not after its wait
    for got, expected in zip(results, alone, strict=True):
        assert_same_result(got, expected)


def test_an_image_that_breaks_its_batch_fails_alone(pipeline, images, alone):
    counted = CountedPipeline(pipeline)
    batcher = InferenceBatcher(counted, name="chest_xray", batch_size=3, batch_wait_s=60)
    broken = ImageInput("1.2.826.0.1.3680043.10.1.3", np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 4), np.uint8))
    futures = [batcher.submit(image) for image in (images[0], broken, images[1])]
    assert isinstance(futures[1].exception(timeout=300), ValueError)
    assert_same_result(futures[0].result(), alone[0])
    assert_same_result(futures[2].result(), alone[1])
    assert counted.calls == [3, 1, 1, 1]  # the batch, then each image on its own
    assert batcher.submit(images[0]).result(timeout=300).verdict.accepted  # the batcher still serves


def _model_calls(metrics_port: int) -> tuple[float, float]:
    """Return (model calls, images) of the chest pipeline from a worker's metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in lines if line.startswith("dicom_node_inference")}
    return (values.get('dicom_node_inference_batch_images_count{pipeline="chest_xray"}', 0.0),
            values.get('dicom_node_inference_batch_images_sum{pipeline="chest_xray"}', 0.0))


@pytest.mark.slow
def test_a_burst_runs_as_overlapping_jobs_sharing_model_calls(node_factory, tmp_path):
    studies = 3
    destination = DcmtkStoreSCP(tmp_path, ae_title="PACS").start()
    worker_port = free_port()
    node = node_factory({
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": destination.port}],
        "worker": {"pool": "threads", "concurrency": studies, "batch_size": studies, "batch_wait_ms": 1000},
        "metrics": {"worker_port": worker_port},
    }).start()
    try:
        paths = [tmp_path / "burst" / f"{index}.dcm" for index in range(studies)]
        uids = [str(write_rg1_study(path).StudyInstanceUID) for path in paths]
        sent = subprocess.run([dcmtk_tool("storescu"), "-aec", "DICOM_NODE", "127.0.0.1", str(node.port),
                               *map(str, paths)], capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr
        jobs = wait_for(lambda: (found := [job for uid in uids for job in node.jobs(uid)])
                        and len(found) == studies and all(job.status.finished for job in found) and found,
                        600, "the burst's jobs to finish")
        assert [job.status for job in jobs] == [JobStatus.DONE] * studies, [job.reason for job in jobs]
        first_end = min(job.finished_at for job in jobs)
        assert sum(job.started_at < first_end for job in jobs) >= 2  # jobs ran at once, not one after another
        calls, analysed = _model_calls(worker_port)
        assert analysed == studies  # each image through the model once
        assert calls < studies  # images of different jobs shared a model call
        for job in jobs:
            wait_for(lambda job=job: len(rows := node.deliveries(job.id)) == 3
                     and all(d.status is DeliveryStatus.DELIVERED for d in rows), 120, "the results' delivery")
        received = [dcmread(path, stop_before_pixels=True) for path in destination.folder.rglob("*") if path.is_file()]
        assert sorted(str(ds.StudyInstanceUID) for ds in received) == sorted(uids * 3)  # SC, SEG, SR each, once
        assert len({str(ds.SOPInstanceUID) for ds in received}) == 3 * studies
        assert node.stop() == 0
    finally:
        destination.stop()
