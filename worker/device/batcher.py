"""Dynamic batcher: groups items submitted from many threads into batches of at most
``max_batch``, waiting at most ``max_wait`` after the first item, and runs one function
on each batch in a single thread. The model therefore sees full batches even when every
request carries one image, and one model instance serves every caller.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)

_STOP = object()


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: Future[R]
    submitted: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class BatchInfo:
    """What the batch function learns about each item besides the item itself."""

    size: int
    waited_s: list[float]


class DynamicBatcher(Generic[T, R]):
    def __init__(
        self,
        fn: Callable[[Sequence[T], BatchInfo], Sequence[R]],
        max_batch: int,
        max_wait_s: float,
        name: str = "batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: queue.SimpleQueue[_Pending[T, R] | object] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self.batches_run = 0
        self.items_run = 0

    def submit(self, item: T) -> Future[R]:
        if self._closed:
            raise RuntimeError("batcher is closed")
        future: Future[R] = Future()
        self._queue.put(_Pending(item, future))
        return future

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float | None = None) -> None:
        """Run what is queued, then stop the batch thread."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)

    def _collect(self, first: _Pending[T, R]) -> tuple[list[_Pending[T, R]], bool]:
        batch = [first]
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                return batch, True
            batch.append(nxt)  # type: ignore[arg-type]
        return batch, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            batch, stopping = self._collect(first)  # type: ignore[arg-type]
            self._execute(batch)
        # Drain anything that raced with close(): nobody is left waiting forever.
        leftovers: list[_Pending[T, R]] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                leftovers.append(item)  # type: ignore[arg-type]
        for i in range(0, len(leftovers), self.max_batch):
            self._execute(leftovers[i : i + self.max_batch])

    def _execute(self, batch: list[_Pending[T, R]]) -> None:
        start = time.perf_counter()
        info = BatchInfo(size=len(batch), waited_s=[start - p.submitted for p in batch])
        try:
            results = self._fn([p.item for p in batch], info)
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
        except Exception as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            # Isolate the item that broke the batch: its neighbours must not fail with it.
            log.warning("batch of %d failed (%s); retrying items one by one", len(batch), exc)
            for pending in batch:
                self._execute([pending])
            return
        self.batches_run += 1
        self.items_run += len(batch)
        for pending, result in zip(batch, results, strict=True):
            pending.future.set_result(result)
