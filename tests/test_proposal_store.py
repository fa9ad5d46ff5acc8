"""The CLIP proposal store: round trip, commit-after-flush, crash + resume, concurrent shard writers."""
from __future__ import annotations

import inspect
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from vild.data.proposal_store import ProposalStore, ProposalStoreWriter

STORE_PY = Path(__file__).resolve().parent.parent / "vild" / "data" / "proposal_store.py"
IDS = [7, 3, 100, 42, 5, 9, 11]
TEACHER = {"model": "tiny", "pretrained": "x", "sha256": "abc"}


def _record(image_id: int, m: int = 6, d: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic proposals for an image: n = image_id % m + 1 boxes."""
    rng = np.random.default_rng(image_id)
    n = image_id % m + 1
    xy = rng.uniform(0, 100, (n, 2))
    e = rng.normal(size=(n, d))
    return np.concatenate([xy, xy + rng.uniform(1, 50, (n, 2))], 1).astype(np.float32), e / np.linalg.norm(e, axis=1, keepdims=True)


def _check(store: ProposalStore, image_id: int) -> None:
    boxes, embeds = store.get(image_id)
    b, e = _record(image_id)
    assert boxes.dtype == np.float32 and embeds.dtype == np.float16
    np.testing.assert_array_equal(boxes, b)
    np.testing.assert_allclose(embeds, e, atol=1e-3)


# the writer subprocess loads the module file directly (no torch import: starts in a fraction of a second)
_WRITER = textwrap.dedent("""
    import importlib.util, time
    import numpy as np
    spec = importlib.util.spec_from_file_location("ps", {store_py!r})
    ps = importlib.util.module_from_spec(spec); spec.loader.exec_module(ps)
    w = ps.ProposalStoreWriter({root!r}, {shard}, {num_shards}, {ids!r}, 6, 8)
    for i in w.pending():
        w.put(i, *_record(i))
        print(i, flush=True)
        time.sleep({sleep})
""")


def _spawn(root: Path, shard: int, num_shards: int, ids: list[int], sleep: float = 0.0) -> subprocess.Popen:
    code = "import numpy as np\n" + inspect.getsource(_record) + _WRITER.format(store_py=str(STORE_PY), root=str(root), shard=shard,
                                                       num_shards=num_shards, ids=ids, sleep=sleep)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_write_read_round_trip(tmp_path):
    for shard in range(3):
        with ProposalStoreWriter(tmp_path, shard, 3, IDS, 6, 8, teacher=TEACHER, crop_scales=[1.0, 1.5]) as w:
            assert w.image_ids == IDS[shard::3]
            for i in w.image_ids[:-1]:  # leave the last of each shard out
                w.put(i, *_record(i))
    store = ProposalStore(tmp_path, teacher=TEACHER)
    assert (store.embed_dim, store.max_proposals, store.teacher) == (8, 6, TEACHER)
    assert store.meta["crop_scales"] == [1.0, 1.5]
    written = [i for s in range(3) for i in IDS[s::3][:-1]]
    assert len(store) == len(written) == 4
    for i in written:
        assert i in store
        _check(store, i)
    for i in set(IDS) - set(written) | {12345}:
        assert i not in store and store.get(i) is None
    clone = pickle.loads(pickle.dumps(store))  # data-loader workers get a copy without the memmaps
    assert len(pickle.dumps(store)) < 10_000
    _check(clone, written[0])
    with pytest.raises(ValueError, match="teacher"):
        ProposalStore(tmp_path, teacher={**TEACHER, "sha256": "other"})


def test_writer_validates(tmp_path):
    w = ProposalStoreWriter(tmp_path, 0, 2, IDS, 6, 8)
    with pytest.raises(KeyError, match="shard 0"):
        w.put(IDS[1], *_record(IDS[1]))
    with pytest.raises(ValueError, match="max_proposals"):
        w.put(IDS[0], np.zeros((7, 4)), np.zeros((7, 8)))
    with pytest.raises(ValueError, match="dim"):
        w.put(IDS[0], np.zeros((2, 4)), np.zeros((2, 5)))
    with pytest.raises(ValueError, match="embed_dim"):
        ProposalStoreWriter(tmp_path, 1, 2, IDS, 6, 16)  # same store, other settings
    w.put(IDS[0], np.zeros((0, 4)), np.zeros((0, 8)))  # an image without proposals is a valid record
    boxes, embeds = ProposalStore(tmp_path).get(IDS[0])
    assert boxes.shape == (0, 4) and embeds.shape == (0, 8)


def test_uncommitted_record_reads_absent_and_resume_fills_it(tmp_path):
    w = ProposalStoreWriter(tmp_path, 0, 1, IDS, 6, 8)
    w.put(IDS[0], *_record(IDS[0]))
    # a crash between writing the data and setting the commit flag
    w._write_record(1, *_record(IDS[1]))
    w.close()
    store = ProposalStore(tmp_path)
    assert IDS[1] not in store and store.get(IDS[1]) is None and len(store) == 1
    # overwriting a committed record un-commits it until the new data is down
    w = ProposalStoreWriter(tmp_path, 0, 1, IDS, 6, 8)
    assert w.pending() == IDS[1:]
    w._set_flags([0], False)
    assert IDS[0] not in store
    for i in w.pending():
        w.put(i, *_record(i))
    assert w.pending() == [] and len(store) == len(IDS)  # the open reader sees the commits
    for i in IDS:
        _check(store, i)


def test_put_many_commits_a_batch_and_checks_every_record(tmp_path):
    w = ProposalStoreWriter(tmp_path, 0, 1, IDS, 6, 8)
    w.put_many([(i, *_record(i)) for i in IDS[:3]])
    store = ProposalStore(tmp_path)
    assert len(store) == 3 and w.pending() == IDS[3:]
    for i in IDS[:3]:
        _check(store, i)
    with pytest.raises(ValueError, match="max_proposals"):  # a bad record stops the batch before any write
        w.put_many([(IDS[3], *_record(IDS[3])), (IDS[4], np.zeros((7, 4)), np.zeros((7, 8)))])
    assert w.pending() == IDS[3:]
    w.put_many([(i, *_record(i)) for i in IDS])  # overwrites and new records together
    assert w.pending() == [] and len(store) == len(IDS)
    for i in IDS:
        _check(store, i)


def test_killed_writer_resumes(tmp_path):
    ids = list(range(1, 41))
    proc = _spawn(tmp_path, 0, 1, ids, sleep=0.02)
    for _ in range(5):
        proc.stdout.readline()  # at least five records committed
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = ProposalStore(tmp_path)
    done = [i for i in ids if i in store]
    assert 5 <= len(done) < len(ids)
    for i in done:
        _check(store, i)
    w = ProposalStoreWriter(tmp_path, 0, 1, ids, 6, 8)
    assert w.pending() == [i for i in ids if i not in done]
    for i in w.pending():
        w.put(i, *_record(i))
    assert len(ProposalStore(tmp_path)) == len(ids)


def test_concurrent_writers_on_different_shards(tmp_path):
    ids = list(range(100, 160))
    t0 = time.time()
    procs = [_spawn(tmp_path, s, 2, ids) for s in range(2)]
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(int(i) for o in outs for i in o) == ids
    store = ProposalStore(tmp_path)
    assert len(store) == len(ids)
    for i in ids:
        _check(store, i)
    assert time.time() - t0 < 30
