"""The dynamic batcher alone (standard library only): grouping, batch size and wait, the queue bound, failures."""
import threading
import time

import pytest

from vild.serve.batcher import DynamicBatcher, Overloaded


class Recorder:
    """A ``run_batch`` that records each call, can be held at its first call, and fails for group "bad"."""

    def __init__(self, hold_first: bool = False):
        self.calls: list[tuple] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        if not hold_first:
            self.gate.set()

    def __call__(self, group, items):
        self.entered.set()
        assert self.gate.wait(10)
        self.calls.append((group, list(items)))
        if group == "bad":
            raise ValueError("this batch fails")
        return [f"{group}:{x}" for x in items]


@pytest.fixture()
def make():
    made = []

    def build(run, **kw):
        made.append(DynamicBatcher(run, **kw))
        return made[-1]

    yield build
    for b in made:
        b.stop(timeout=5)


@pytest.fixture()
def busy(make):
    """A batcher whose worker is held inside its first batch (job "first" of group "A"): the rest queues."""

    def build(**kw):
        rec = Recorder(hold_first=True)
        b = make(rec, **kw)
        first = b.submit("first", "A")
        assert rec.entered.wait(5)
        return rec, b, first

    return build


def test_jobs_are_batched_by_group_in_arrival_order(busy):
    rec, b, first = busy(max_batch=8, max_wait=0.0)
    jobs = [(g, i, b.submit(i, g)) for i, g in enumerate("BABBACB")]
    rec.gate.set()
    assert first.result(5) == "A:first"
    for g, i, f in jobs:
        assert f.result(5) == f"{g}:{i}"
    assert rec.calls == [("A", ["first"]), ("B", [0, 2, 3, 6]), ("A", [1, 4]), ("C", [5])]


def test_max_batch_splits_a_group(busy):
    rec, b, _ = busy(max_batch=2, max_wait=0.0)
    futures = [b.submit(i, "A") for i in range(5)]
    rec.gate.set()
    assert [f.result(5) for f in futures] == [f"A:{i}" for i in range(5)]
    assert [items for _, items in rec.calls] == [["first"], [0, 1], [2, 3], [4]]


def test_a_job_waits_for_announced_company_up_to_max_wait_and_a_lone_job_not_at_all(make):
    rec = Recorder()
    b = make(rec, max_batch=8, max_wait=0.3)
    t0 = time.monotonic()
    assert b.submit(0, "A").result(5) == "A:0"
    assert time.monotonic() - t0 < 0.15, "nothing else on its way: no reason to wait"
    with b.incoming():  # one request being read: the next batch waits for it
        t0 = time.monotonic()
        f1 = b.submit(1, "A")
        time.sleep(0.05)
        with b.incoming():
            f2 = b.submit(2, "A")  # arrives within the wait: joins the batch
        assert f1.result(5) == "A:1" and f2.result(5) == "A:2"
        assert 0.25 <= time.monotonic() - t0 < 2.0, "an announced request that never comes is waited for max_wait"
    assert rec.calls == [("A", [0]), ("A", [1, 2])]


def test_past_the_queue_bound_submit_raises_overloaded_with_retry_after(busy):
    rec, b, running = busy(max_batch=1, max_wait=0.0, max_queue=2)
    queued = [b.submit(i, "A") for i in (1, 2)]
    assert (b.running, b.queued) == (1, 2)
    with pytest.raises(Overloaded, match="queue is full") as e:
        b.submit(3, "A")
    assert e.value.retry_after >= 1
    rec.gate.set()
    assert [f.result(5) for f in [running, *queued]] == ["A:first", "A:1", "A:2"]


def test_a_failing_batch_fails_only_its_jobs(busy):
    rec, b, _ = busy(max_batch=8, max_wait=0.0)
    bad, good = b.submit(1, "bad"), b.submit(2, "A")
    rec.gate.set()
    with pytest.raises(ValueError, match="this batch fails"):
        bad.result(5)
    assert good.result(5) == "A:2"
    assert b.submit(3, "A").result(5) == "A:3"  # the worker lives on


def test_cancelled_jobs_are_not_run_and_stop_refuses_the_waiting_ones(busy):
    rec, b, _ = busy(max_batch=1, max_wait=0.0)
    gone, left = b.submit(1, "A"), b.submit(2, "B")
    assert gone.cancel()
    threading.Timer(0.2, rec.gate.set).start()
    b.stop(timeout=5)  # finishes the running batch, refuses the queue
    with pytest.raises(Overloaded, match="shutting down"):
        left.result(5)
    assert rec.calls == [("A", ["first"])]
    with pytest.raises(Overloaded):
        b.submit(3, "A")
