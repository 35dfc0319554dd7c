"""``ModelWorker``: the one thread that runs the model, with admission control and batching.

Every model call (predictions, explanations, the warm-up) runs on this thread, in order, so
the network is never used by two threads at once. Predictions that are waiting together are
run as one batch (up to ``max_batch`` images): on a CPU one forward pass of 16 images costs
far less than 16 passes of one, so a busy server answers more requests, not fewer.

Admission: at most ``max_queue`` requests are inside (waiting or running); ``submit`` returns
None beyond that, and the server answers 503. A request keeps its place until its work has
really finished, even after its caller timed out, so slow work can never pile up.

Memory: images are decoded one at a time and each is closed as soon as it is the model's
small input, so a request of 16 large images holds one decoded image at a time, not 16; after
a batch that decoded many pixels, the C heap's free pages go back to the system
(``malloc_trim``: glibc keeps them otherwise, and the process stayed 1.4 GB after one request).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from cnnkit.serve.model import BatchResult, ServedModel

__all__ = ["ModelWorker", "give_memory_back"]

TRIM_AFTER_PIXELS = 4_000_000  # decoded in one batch: then it is worth a malloc_trim


def _load_malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None (another C library, another system)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def give_memory_back() -> None:
    """Return the C heap's free pages to the system, where the C library can."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@dataclass
class _Job:
    future: Future
    call: Callable[[], Any] | None = None  # a plain call, or
    images: list[Image.Image] = field(default_factory=list)  # images to predict (batchable)


class ModelWorker:
    """Runs ``served``'s work on one thread; see the module docstring."""

    def __init__(self, served: ServedModel, max_queue: int, max_batch: int = 64) -> None:
        self.served = served
        self.max_queue = max_queue
        self.max_batch = max_batch
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._busy = 0
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> int:
        """Requests admitted and not finished."""
        return self._busy

    def submit(self, call: Callable[[], Any]) -> Future | None:
        """Run ``call()``; None when ``max_queue`` requests are already inside."""
        return self._admit(_Job(Future(), call=call))

    def predict(self, images: list[Image.Image]) -> Future | None:
        """Decode and classify opened images (a ``BatchResult``), batched with others waiting."""
        return self._admit(_Job(Future(), images=images))

    def _admit(self, job: _Job) -> Future | None:
        with self._lock:
            if self._busy >= self.max_queue:
                return None
            self._busy += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="cnnkit-model", daemon=True)
                self._thread.start()
        job.future.add_done_callback(self._release)
        self._jobs.put(job)
        return job.future

    def _release(self, _: Future) -> None:
        with self._lock:
            self._busy -= 1

    def close(self) -> None:
        """Stop the thread after the job it is running; cancel the ones still waiting."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            thread.join(timeout=5)
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.future.cancel()

    # ------------------------------------------------------------------------ the thread

    def _loop(self) -> None:
        pending: list[_Job | None] = []  # a job taken while filling a batch: it runs next
        while True:
            job = pending.pop() if pending else self._jobs.get()
            if job is None:  # close()
                return
            if job.call is not None:
                self._run_call(job)
                continue
            batch, images = [job], len(job.images)
            while images < self.max_batch:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None or more.call is not None:
                    pending.append(more)
                    break
                batch.append(more)
                images += len(more.images)
            self._run_predictions(batch)

    @staticmethod
    def _run_call(job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return  # its caller gave up while it waited
        try:
            job.future.set_result(job.call())  # type: ignore[misc]
        except Exception as exc:  # handed to the request that asked
            job.future.set_exception(exc)

    def _decode(self, images: list[Image.Image]) -> np.ndarray:
        """The model's input for each image, ``(n, S, S, C)``; each image is closed as soon as
        it is decoded, so only one full-size image is in memory at a time."""
        rows = []
        try:
            for image in images:
                rows.append(self.served.decode([image]))
                image.close()
        finally:
            for image in images:
                image.close()
        return np.concatenate(rows)

    def _run_predictions(self, jobs: list[_Job]) -> None:
        """Decode each job's images (errors stay with their job), then one forward pass."""
        decoded = []
        pixels_decoded = 0
        for job in jobs:
            if not job.future.set_running_or_notify_cancel():
                for image in job.images:
                    image.close()
                continue
            start = time.perf_counter()
            pixels_decoded += sum(image.size[0] * image.size[1] for image in job.images)
            try:
                pixels = self._decode(job.images)  # (n, S, S, C)
            except Exception as exc:
                job.future.set_exception(exc)
                continue
            decoded.append((job, pixels, 1000 * (time.perf_counter() - start)))
        if pixels_decoded >= TRIM_AFTER_PIXELS:
            give_memory_back()
        if not decoded:
            return
        start = time.perf_counter()
        try:
            probs = self.served.infer(np.concatenate([pixels for _, pixels, _ in decoded]))
        except Exception as exc:
            for job, _, _ in decoded:
                job.future.set_exception(exc)
            return
        inference_ms = 1000 * (time.perf_counter() - start)
        row = 0
        for job, pixels, decode_ms in decoded:
            part = probs[row : row + len(pixels)]
            row += len(pixels)
            job.future.set_result(BatchResult(part, decode_ms, inference_ms, len(probs)))
