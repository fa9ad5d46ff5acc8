"""Dynamic batching: requests that arrive close together go through the model in one forward pass."""
from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator, Optional, Sequence

logger = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue is full (or the batcher has stopped): try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Job:
    """One request's work: an input, the group it may share a batch with, and where its answer goes."""

    item: Any
    group: Hashable
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    """A worker thread that runs ``run_batch(group, items) -> results`` over queued jobs of one group.

    Args:
        run_batch: called with a group key and up to ``max_batch`` items of that group; returns one
            result per item, in order. It runs on the worker thread only, so it may keep state (a model's
            current vocabulary) between calls.
        max_batch: the most items per call.
        max_wait: seconds the oldest waiting job may wait for others of its group to join its batch; it waits
            only while requests are announced (``incoming``): a lone request leaves at once.
        max_queue: the most jobs waiting (the batch being run does not count); ``submit`` past it raises
            ``Overloaded``.

    Jobs leave in arrival order of their batch's oldest job: the oldest waiting job always leads the next
    batch, which takes the next jobs of its group; jobs of other groups wait for a batch of their own.
    """

    def __init__(self, run_batch: Callable[[Hashable, list], Sequence], max_batch: int = 8, max_wait: float = 0.01,
                 max_queue: int = 64):
        if max_batch < 1 or max_queue < 1 or max_wait < 0:
            raise ValueError(f"max_batch ({max_batch}) and max_queue ({max_queue}) must be at least 1 and "
                             f"max_wait ({max_wait}) at least 0")
        self.run_batch = run_batch
        self.max_batch, self.max_wait, self.max_queue = int(max_batch), float(max_wait), int(max_queue)
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._running = 0  # jobs in the batch being run
        self._incoming = 0  # requests being read and decoded: the next batch may wait for them
        self._batch_seconds = 0.0  # running mean of a batch's time, for Retry-After
        self.batches = 0
        self.items = 0

    @property
    def queued(self) -> int:
        """Jobs waiting for a batch."""
        with self._cond:
            return len(self._pending)

    @property
    def running(self) -> int:
        """Jobs in the batch on the model now."""
        with self._cond:
            return self._running

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Announce a request on its way (being read and decoded; ``submit`` it inside the block)."""
        with self._cond:
            self._incoming += 1
        try:
            yield
        finally:
            with self._cond:
                self._incoming -= 1
                self._cond.notify_all()

    def start(self) -> None:
        """Start the worker thread (``submit`` does this too)."""
        with self._cond:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._work, name="vild-batcher", daemon=True)
                self._thread.start()

    def submit(self, item: Any, group: Hashable) -> Future:
        """Queue one item; the future gets its result (or the exception ``run_batch`` raised)."""
        self.start()
        with self._cond:
            if self._closed:
                raise Overloaded("the server is shutting down", retry_after=5)
            if len(self._pending) >= self.max_queue:
                raise Overloaded(f"the queue is full ({self.max_queue} requests waiting)", self._retry_after())
            job = Job(item, group)
            self._pending.append(job)
            self._cond.notify()
        return job.future

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch being run, refuse the jobs still waiting (``Overloaded``), end the thread."""
        with self._cond:
            self._closed = True
            left = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in left:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(Overloaded("the server is shutting down", retry_after=5))
        if self._thread is not None:
            self._thread.join(timeout)

    def _retry_after(self) -> int:
        """Seconds until the queue has likely drained: the batches ahead of a new job times a batch's time."""
        batches_ahead = math.ceil((len(self._pending) + self._running) / self.max_batch)
        return max(1, math.ceil(batches_ahead * self._batch_seconds))

    def _next_batch(self) -> Optional[list[Job]]:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if not self._pending:
                return None
            head = self._pending[0]
            deadline = head.arrived + self.max_wait
            while True:
                same = [j for j in self._pending if j.group == head.group][:self.max_batch]
                wait = deadline - time.monotonic()
                if len(same) >= self.max_batch or wait <= 0 or self._closed or not self._incoming:
                    break
                self._cond.wait(wait)
            taken = set(map(id, same))
            self._pending = deque(j for j in self._pending if id(j) not in taken)
            # a job whose caller gave up (cancelled its future) is dropped here, unrun
            batch = [j for j in same if j.future.set_running_or_notify_cancel()]
            self._running = len(batch)
            return batch

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:
                continue
            start = time.monotonic()
            error: Optional[Exception] = None
            try:
                results = list(self.run_batch(batch[0].group, [j.item for j in batch]))
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
            except Exception as e:  # the worker must outlive any failing batch
                logger.exception("a batch of %d failed", len(batch))
                error = e
            elapsed = time.monotonic() - start
            with self._cond:  # counted before any answer leaves: a client that got one sees it counted
                self._running = 0
                self.batches += 1
                self.items += len(batch)
                self._batch_seconds = elapsed if self.batches == 1 else 0.8 * self._batch_seconds + 0.2 * elapsed
            for i, j in enumerate(batch):
                if error is not None:
                    j.future.set_exception(error)
                else:
                    j.future.set_result(results[i])
