"""Per-image records kept as one byte buffer, so that forked data-loader workers share them instead of copying.

A Python object's reference count lives in the object, so merely reading a record in a forked worker writes to
its memory page and the kernel copies the page for that worker. Over an epoch every worker copies every record:
with LVIS v1 train (1.27M polygon annotations, several GB as Python objects) that is gigabytes per worker, times
the workers of every rank. One byte buffer and an offsets array are two objects: reading a record unpickles a
fresh copy and never writes to the shared pages. They are torch tensors so that workers started without fork
(spawn on macOS and Windows, forkserver, Python 3.14's default on Linux) share them too: torch pickles a tensor
sent to another process as a handle to shared memory, where plain bytes would be copied into every worker.
"""
from __future__ import annotations

import pickle
from typing import Any, Iterable, Sequence

import torch


class RecordList(Sequence):
    """A read-only list of picklable items stored pickled in one contiguous uint8 array."""

    def __init__(self, items: Iterable[Any]):
        joined, ends = bytearray(), [0]  # one growing buffer: no second copy of the pickles at any time
        for item in items:
            joined += pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
            ends.append(len(joined))
        self._offsets = torch.tensor(ends, dtype=torch.int64)
        self._buffer = torch.frombuffer(joined, dtype=torch.uint8) if joined else torch.zeros(0, dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        """A fresh copy of item ``i`` (negative indices count from the end)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range for {n} records")
        i %= n
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        return pickle.loads(memoryview(self._buffer[start:end].numpy()))

    @property
    def nbytes(self) -> int:
        """Memory held by the records (buffer and offsets)."""
        return int(self._buffer.numel() + self._offsets.numel() * self._offsets.element_size())
