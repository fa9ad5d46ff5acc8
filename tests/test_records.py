"""Records in one byte buffer: round trip, and forked loader workers that read them copy no memory."""
from __future__ import annotations

import gc
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from vild.data import DetectionDataset
from vild.data.loader import _worker_init
from vild.data.records import RecordList


def _records(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [({"id": i, "file_name": f"{i:06d}.jpg", "height": 480, "width": 640},
             [{"bbox": [rng.uniform(0, 500), rng.uniform(0, 300), 50.0, 40.0], "category_id": rng.randint(1, 1203),
               "segmentation": [[rng.uniform(0, 600) for _ in range(32)]]} for _ in range(10)])
            for i in range(n)]


def test_record_list_round_trips_and_indexes_like_a_list():
    items = _records(50) + [None, {"x": (1, 2.5, "é")}, []]
    rl = RecordList(items)
    assert len(rl) == len(items)
    assert [rl[i] for i in range(len(rl))] == items
    assert rl[-1] == items[-1] and rl[-len(items)] == items[0]
    assert list(rl) == items  # iteration through Sequence stops at IndexError
    with pytest.raises(IndexError):
        rl[len(items)]
    first = rl[0]
    first[1].clear()  # a caller mutating its copy changes nothing stored
    assert rl[0] == items[0]
    assert len(RecordList([])) == 0 and list(RecordList([])) == []
    assert 0 < rl.nbytes


def _private_dirty_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1])
    raise RuntimeError("no Private_Dirty in smaps_rollup")


def _child_growth_kib(read, store) -> int:
    """Private memory a forked child gains by reading every item of ``store`` (as a loader worker does)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            _worker_init(0)
            before = _private_dirty_kib()
            for i in range(len(store)):
                read(store[i])
            gc.collect()
            os.write(w, str(_private_dirty_kib() - before).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return int(out)


@pytest.mark.skipif(not sys.platform.startswith("linux") or not Path("/proc/self/smaps_rollup").exists(),
                    reason="measures private memory through /proc/self/smaps_rollup (Linux)")
def test_forked_worker_reading_every_record_copies_no_pages():
    """The same 40k annotations as Python objects make a reading child copy tens of MiB; as a RecordList, none."""
    items = _records(4000)

    def read(rec):
        for a in rec[1]:
            a["bbox"], a["segmentation"][0][0]

    gc.collect()
    as_objects = _child_growth_kib(read, items)
    rl = RecordList(items)
    del items
    gc.collect()
    as_buffer = _child_growth_kib(read, rl)
    # the control shows the measurement sees copied pages: 40k dicts and 1.3M floats are ~60 MiB of objects
    assert as_objects > 16 * 1024, as_objects
    assert as_buffer < 4 * 1024, as_buffer


def test_training_set_keeps_records_only_and_rereads_the_api_on_demand(world):
    train = DetectionDataset(world["lvis_train"], world["images_train"], "lvis", "lvis", train=True)
    test = DetectionDataset(world["lvis_val"], world["images_val"], "lvis", "lvis", train=False)
    assert isinstance(train._records, RecordList) and train._api is None
    assert test._api is not None  # the evaluators score against it
    # records keep what targets need, and nothing of the json's other fields
    img, anns = train._records[0]
    assert set(img) <= {"id", "file_name", "coco_url", "height", "width"}
    assert all(set(a) <= {"bbox", "category_id", "segmentation"} for a in anns)
    api = train.api  # re-read on first use
    assert train.api is api and set(api.imgs) >= set(train.image_ids)
    t = train.target(0)
    assert t["image_id"] == train.image_ids[0] and len(t["boxes"]) == len(t["labels"]) == len(t["masks"])
    assert torch.equal(t["labels"], torch.tensor([train._label[a["category_id"]] for a in anns]))


_TRIM_SCRIPT = """
import gc, json
from vild.utils.memory import release_freed_memory
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20
start = rss()
garbage = [{f"k{i}": i for i in range(40)} for _ in range(100_000)]  # dict tables over 512 B: glibc's heap
survivors = [bytearray(600) for _ in range(10)]  # allocated after them: the heap's top stays in use
allocated = rss()
del garbage
gc.collect()
freed = rss()
print(json.dumps([release_freed_memory(), start, allocated, freed, rss()]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's; /proc/self/statm")
def test_release_freed_memory_gives_the_heap_back():
    """~300 MiB of freed dicts under a live allocation: glibc keeps ~80 MiB of it resident until trimmed."""
    import json
    import subprocess
    out = subprocess.run([sys.executable, "-c", _TRIM_SCRIPT], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    ok, start, allocated, freed, trimmed = json.loads(out)
    assert ok and allocated - start > 200
    assert trimmed <= freed and trimmed - start < 40, (start, allocated, freed, trimmed)


def test_workers_started_without_fork_share_the_records_and_skip_the_api(world, tmp_path):
    """spawn (macOS, Windows) and forkserver (Python 3.14 on Linux) pickle the dataset into each worker: the
    records travel as a handle to shared memory, the json's API object not at all."""
    import io
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's sharing reductions, as DataLoader does)

    from vild.data import trivial_collate
    big = RecordList(_records(2000))
    buf = io.BytesIO()
    ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(big)
    assert big.nbytes > 5 * 2 ** 20 and len(buf.getvalue()) < 4096  # a handle, not the 7 MB of records
    test = DetectionDataset(world["lvis_val"], world["images_val"], "lvis", "lvis", train=False)
    assert test._api is not None and pickle.loads(pickle.dumps(test))._api is None
    loader = torch.utils.data.DataLoader(test, batch_size=2, num_workers=1, multiprocessing_context="spawn",
                                         collate_fn=trivial_collate)
    images, targets = next(iter(loader))
    for k, (image, t) in enumerate(zip(images, targets)):
        want = test.target(k)
        assert t["image_id"] == want["image_id"] and torch.equal(t["boxes"], want["boxes"])
        assert image.dtype == torch.uint8 and image.shape[0] == 3
