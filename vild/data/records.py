"""Per-image records kept as one byte buffer, so that forked data-loader workers share them instead of copying.

A Python object's reference count lives in the object, so merely reading a record in a forked worker writes to
its memory page and the kernel copies the page for that worker. Over an epoch every worker copies every record:
with LVIS v1 train (1.27M polygon annotations, several GB as Python objects) that is gigabytes per worker, times
the workers of every rank. One numpy byte buffer and an offsets array are two objects: reading a record unpickles
a fresh copy and never writes to the shared pages.
"""
from __future__ import annotations

import pickle
from typing import Any, Iterable, Sequence

import numpy as np


class RecordList(Sequence):
    """A read-only list of picklable items stored pickled in one contiguous uint8 array."""

    def __init__(self, items: Iterable[Any]):
        blobs = [pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL) for item in items]
        self._offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8) if blobs else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        """A fresh copy of item ``i`` (negative indices count from the end)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range for {n} records")
        i %= n
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        return pickle.loads(self._buffer[start:end].data)

    @property
    def nbytes(self) -> int:
        """Memory held by the records (buffer and offsets)."""
        return int(self._buffer.nbytes + self._offsets.nbytes)
