"""Batched inference: one thread per pipeline runs its model on the images analysis threads hand it.

An analysis worker runs several jobs at once (the threads pool). Each job's thread reads, gates and
decodes its images and writes their results itself; it hands the decoded images to the pipeline's
:class:`InferenceBatcher`, whose one thread gathers what waits — up to ``batch_size`` images, the
first waiting at most ``batch_wait_s`` for others — and runs the model on them together. Decoding and
writing of some images thus overlap inference of others, the model is loaded once per process, and
on a GPU the images of different jobs share one forward pass.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from dicom_node.metrics import INFERENCE_BATCH_IMAGES, STAGE_SECONDS
from pipelines.base import ImageInput, ImageResult, Pipeline

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    image: ImageInput
    result: Future[ImageResult] = field(default_factory=Future)
    submitted: float = field(default_factory=time.monotonic)


class InferenceBatcher:
    """Runs ``pipeline.run`` on one thread, on batches of the images submitted from any thread.

    A batch whose run raises is run again image by image, so that one bad image fails only its own
    result (and a batch too large for the GPU's memory still gets through).
    """

    def __init__(self, pipeline: Pipeline, *, name: str, batch_size: int = 1, batch_wait_s: float = 0.0) -> None:
        if batch_size < 1 or batch_wait_s < 0:
            raise ValueError("batch_size must be at least 1 and batch_wait_s not negative")
        self.pipeline = pipeline
        self.name = name
        self.batch_size = batch_size
        self.batch_wait_s = batch_wait_s
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, image: ImageInput) -> Future[ImageResult]:
        """Queue ``image`` for inference; return the future of its result."""
        self._ensure_started()
        request = _Request(image)
        self._requests.put(request)
        return request.result

    def _ensure_started(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=f"inference-{self.name}", daemon=True)
                self._thread.start()

    def _serve(self) -> None:
        while True:
            self._run(self._next_batch())

    def _next_batch(self) -> list[_Request]:
        """Wait for a request; return it with those that arrive within ``batch_wait_s``, up to ``batch_size``."""
        batch = [self._requests.get()]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.batch_size:
            try:
                batch.append(self._requests.get(timeout=max(deadline - time.monotonic(), 0.0)))
            except queue.Empty:
                break
        return batch

    def _run(self, batch: list[_Request]) -> None:
        started = time.monotonic()
        for request in batch:
            STAGE_SECONDS.labels("inference_wait").observe(started - request.submitted)
        INFERENCE_BATCH_IMAGES.labels(self.name).observe(len(batch))
        try:
            with STAGE_SECONDS.labels("pipeline").time():
                results = self.pipeline.run([request.image for request in batch])
            answered = list(zip(batch, results, strict=True))
        except Exception as exc:
            if len(batch) == 1:
                batch[0].result.set_exception(exc)
                return
            logger.warning("Pipeline %s: a batch of %d images failed (%s); running them one by one",
                           self.name, len(batch), type(exc).__name__)
            for request in batch:
                self._run([request])
            return
        for request, result in answered:
            request.result.set_result(result)
