"""The results of a ``vild-detect`` run over many images, kept in parts: resumable, and shared out under torchrun.

The inputs are cut into parts of ``part_size`` consecutive images. A part's file is written (atomically) once
every image in it has been detected and its annotated image written, so a re-run with the same settings skips
the parts that exist. Under ``torchrun`` rank r takes the parts p with p % world_size == r; rank 0 then waits
for every part and merges them, in input order, into one ``detections.json``. The parts live in a hidden folder
named by a hash of the run's settings: a run with other weights, vocabulary or inputs starts afresh.

A part file is one JSON line describing its images, then one line per detection (already JSON).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from .utils.atomic import atomic_open

PREFIX = ".vild-detect-"


def world() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them in the environment; (0, 1) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class PartStore:
    """Parts of a folder run under ``out_dir``.

    Args:
        out_dir: the run's output folder (shared by every rank: on several machines, a shared file system).
        settings: everything the results depend on (JSON-serialisable); its hash names the parts folder.
        num_inputs: how many images the run has.
        part_size: images per part; a crash costs at most this many images per process.
    """

    def __init__(self, out_dir: Path, settings: dict, num_inputs: int, part_size: int):
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        self.out_dir = Path(out_dir)
        self.dir = self.out_dir / f"{PREFIX}{digest}"
        self.num_inputs, self.part_size = num_inputs, part_size
        self.num_parts = -(-num_inputs // part_size)

    def _path(self, part: int) -> Path:
        return self.dir / f"part-{part:07d}.jsonl"

    def positions(self, part: int) -> range:
        """The input positions of a part."""
        return range(part * self.part_size, min((part + 1) * self.part_size, self.num_inputs))

    def done(self) -> set[int]:
        """The parts whose file exists."""
        if not self.dir.is_dir():
            return set()
        found = set()
        for p in self.dir.iterdir():
            if p.name.startswith("part-") and p.name.endswith(".jsonl"):
                found.add(int(p.name[5:-6]))
        return found

    def todo(self, rank: int, world_size: int) -> list[int]:
        """This rank's parts (p % world_size == rank) that no earlier run finished."""
        done = self.done()
        return [p for p in range(rank, self.num_parts, world_size) if p not in done]

    def remove_others(self) -> None:
        """Delete the parts folders of runs with other settings (rank 0, before any part of this run exists)."""
        for p in self.out_dir.glob(f"{PREFIX}*"):
            if p.is_dir() and p != self.dir:
                shutil.rmtree(p, ignore_errors=True)

    def write(self, part: int, summary: dict, detections: list[str]) -> None:
        """Store a finished part: ``summary`` (its tallies, JSON-serialisable) and its detections' JSON lines."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_open(self._path(part)) as f:
            f.write(json.dumps({"part": part, **summary}) + "\n")
            for line in detections:
                f.write(line + "\n")

    def wait_for_all(self, poll_s: float = 0.5) -> None:
        """Block until every part exists (rank 0, while the other ranks finish theirs)."""
        while len(self.done()) < self.num_parts:
            time.sleep(poll_s)

    def read(self) -> Iterator[tuple[dict, Iterator[str]]]:
        """Each part in input order: (its summary, its detections' JSON lines, read lazily)."""
        for part in range(self.num_parts):
            with open(self._path(part)) as f:
                yield json.loads(f.readline()), (line.rstrip("\n") for line in f)

    def remove(self) -> None:
        """Delete this run's parts (after the merge)."""
        shutil.rmtree(self.dir, ignore_errors=True)

