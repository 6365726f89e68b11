"""ft.data.make_loader against hostile datasets and workers: a sample that never returns, worker
processes that are stopped (SIGSTOP), a sample that is None, samples of different shapes in one
batch. Each must end in seconds with an error that names the sample(s) and what to do, and the
loader must stay resumable exactly."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import threading
import time

import pytest
import torch

import functrain as ft

from .harness import Indices
from .test_data import within
from .test_private_apis import wait_until, without_internals

FORK = "fork" in multiprocessing.get_all_start_methods()


# ----------------------------------------------------------------------------- a sample that never returns


class HangsAt(Indices):
    """dataset[i] == i, except that dataset[bad] blocks until ``release`` is set (never, unless the
    test sets it at the end: threads cannot be killed, and a released thread leaves)."""

    def __init__(self, n: int, bad: int):
        super().__init__(n)
        self.bad, self.release = bad, threading.Event()

    def __getitem__(self, i):
        if i == self.bad:
            self.release.wait()
        return i


# Long enough that a loaded CI machine (two xdist workers, one compiling) never misses a batch sent
# in time; short enough that the timeout tests stay quick.
TIMEOUT = 3.0


@pytest.mark.parametrize(
    "num_workers, worker_method",
    [
        (0, "thread"),
        (2, "thread"),
        pytest.param(2, "process", marks=[pytest.mark.slow, pytest.mark.skipif(not FORK, reason="uses fork")]),
    ],
)
def test_a_sample_that_never_returns_times_out_naming_the_worker_and_the_sample(num_workers, worker_method):
    data = HangsAt(40, bad=21)
    context = "fork" if worker_method == "process" else None
    kwargs = dict(shuffle=False, num_workers=num_workers, worker_method=worker_method, timeout=TIMEOUT)
    loader = ft.data.make_loader(data, 4, multiprocessing_context=context, **kwargs)
    got = []
    try:
        start = time.monotonic()
        kind, error = within(15, lambda: [got.append(b.tolist()) for b in loader])
        elapsed = time.monotonic() - start
    finally:
        data.release.set()  # frees a stuck thread once the test is over
    assert kind == "error" and isinstance(error, ft.data.LoaderTimeout), error
    assert isinstance(error, ft.data.WorkerError) and isinstance(error, TimeoutError)
    message = str(error)
    assert "batch 5 of epoch 0" in message and f"{TIMEOUT:g} s" in message and "timeout=" in message
    assert "sample 21" in message, message
    assert ("worker process" if worker_method == "process" else "thread") in message, message
    assert elapsed < TIMEOUT + 5, f"took {elapsed:.1f} s to time out after {TIMEOUT} s"
    # The batches before it came through; the cursor stays on the batch that did not arrive.
    assert got == [[4 * b + k for k in range(4)] for b in range(5)]
    assert (loader.epoch, loader.batch) == (0, 5)
    # Exact resume: a fresh loader from the state yields what an uninterrupted run would have.
    state = loader.state_dict()
    fresh = ft.data.make_loader(Indices(40), 4, multiprocessing_context=context, **dict(kwargs, timeout=None))
    fresh.load_state_dict(state)
    assert [b.tolist() for b in fresh] == [[4 * b + k for k in range(4)] for b in range(5, 10)]
    # And the loader itself restarts at its cursor once the sample loads again.
    assert [b.tolist() for b in loader] == [[4 * b + k for k in range(4)] for b in range(5, 10)]


def test_a_collected_loader_is_stopped_by_the_reaper_not_in_the_collecting_thread():
    # A loader in a reference cycle is finalised by the cyclic collector in whichever thread
    # allocates: maybe the one waiting on another loader's batch. Stopping this one in line would
    # wait PATIENCE seconds for its worker stuck in __getitem__, and that other batch would come late
    # (CI once saw a 1 s timeout fire on a batch sent in time, while its reader collected ten loaders).
    data = HangsAt(40, bad=5)
    before = set(threading.enumerate())
    loader = ft.data.make_loader(data, 4, shuffle=False, num_workers=2, worker_method="thread", timeout=None)
    it = iter(loader)
    assert next(it).tolist() == [0, 1, 2, 3]
    # Its workers, readers and prefetcher (the reaper, started with the first loader, lives on).
    threads = [t for t in set(threading.enumerate()) - before if t.name != "functrain-data-reaper"]
    cycle = [loader, it]
    cycle.append(cycle)
    del loader, it, cycle
    try:
        start = time.monotonic()
        gc.collect()
        took = time.monotonic() - start
        assert took < PATIENCE / 2, f"collecting the loader took {took:.1f} s: its finaliser waited for the workers"
        assert ft.data.pipeline._REAPER.wait(timeout=3 * PATIENCE), "the reaper did not stop the pipeline"
    finally:
        data.release.set()
    # The reaper stopped it: the stuck worker leaves once its sample returns, and so does every thread.
    assert wait_until(lambda: not any(t.is_alive() for t in threads)), [t.name for t in threads if t.is_alive()]


PATIENCE = 5.0  # seconds Loader.close gives a worker to finish the batch in hand


@pytest.mark.slow
@pytest.mark.skipif(not FORK, reason="uses fork")
def test_stopped_worker_processes_time_out_and_are_cleaned_up():
    before = set(multiprocessing.active_children())
    loader = ft.data.make_loader(
        Indices(400), 4, shuffle=False, worker_method="process", multiprocessing_context="fork", timeout=TIMEOUT
    )
    it = iter(loader)
    assert next(it).tolist() == [0, 1, 2, 3]
    workers = [p for p in multiprocessing.active_children() if p not in before]
    assert len(workers) == 2
    try:
        for worker in workers:
            os.kill(worker.pid, signal.SIGSTOP)
        start = time.monotonic()
        kind, error = within(20, lambda: list(it))
        elapsed = time.monotonic() - start
        assert kind == "error" and isinstance(error, ft.data.LoaderTimeout), error
        message = str(error)
        assert any(f"worker process {w.pid} (stopped)" in message for w in workers), message
        assert elapsed < TIMEOUT + 8, f"took {elapsed:.1f} s"
        # The stopped workers were killed, not left behind.
        assert wait_until(lambda: not any(w.is_alive() for w in workers), 10)
    finally:
        for worker in workers:
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGKILL)
    cursor = loader.state_dict()
    assert 1 <= cursor["batch"] < len(loader)
    fresh = ft.data.make_loader(Indices(400), 4, shuffle=False, num_workers=0)
    fresh.load_state_dict(cursor)
    assert next(iter(fresh)).tolist() == [4 * cursor["batch"] + k for k in range(4)]
    # The loader restarts its workers at the cursor.
    assert next(iter(loader)).tolist() == [4 * cursor["batch"] + k for k in range(4)]
    loader.close()


def _hold_and_exit(event) -> None:
    event._cond.acquire()  # the multiprocessing.Event's lock, never released: this process leaves
    os._exit(0)


@pytest.mark.slow
@pytest.mark.skipif(not FORK, reason="uses fork")
def test_a_worker_that_died_holding_the_stop_events_lock_hangs_nothing():
    # torchdata's worker processes poll a shared multiprocessing.Event; one killed inside is_set()
    # (terminated after a timeout, or by the OOM killer) leaves the event's lock held for good, and
    # set() on it then waits forever. CI hung so: after a timeout, the restart's shutdown of the old
    # pipeline set it. Here a process holds the lock and exits, as such a worker would.
    loader = ft.data.make_loader(
        Indices(400), 4, shuffle=False, worker_method="process", multiprocessing_context="fork", timeout=30.0
    )
    assert next(iter(loader)).tolist() == [0, 1, 2, 3]
    workers = ft.data._torchdata.workers(loader._mapper)
    event = ft.data._torchdata.mapper_iterator(loader._mapper)._mp_stop
    holder = multiprocessing.get_context("fork").Process(target=_hold_and_exit, args=(event,))
    holder.start()
    holder.join(10)
    assert holder.exitcode == 0
    # The workers are stuck on the lock too: close() gives up on the event and terminates them.
    kind, _ = within(20, loader.close)
    assert kind == "value"
    assert not any(w.is_alive() for w in workers)
    # The restart shuts the old pipeline down (torchdata sets its stop event again) and goes on.
    kind, batches = within(30, lambda: [b.tolist() for b in loader])
    assert kind == "value", batches
    assert batches == [[4 * b + k for k in range(4)] for b in range(1, 100)]
    loader.close()


def test_a_slow_but_steady_pipeline_does_not_time_out():
    class Slow(Indices):
        def __getitem__(self, i):
            time.sleep(0.05)
            return i

    # Each batch takes ~0.2 s, the epoch ~4 s: the timeout bounds the wait for one batch, not an epoch.
    loader = ft.data.make_loader(Slow(80), 4, shuffle=False, num_workers=1, timeout=1.5)
    assert [b.tolist() for b in loader] == [[4 * b + k for k in range(4)] for b in range(20)]


def test_the_default_timeout_is_finite_and_none_waits_forever():
    default = ft.data.make_loader(Indices(8), 2)
    assert default.timeout == 600.0
    assert ft.data.make_loader(Indices(8), 2, timeout=None).timeout is None


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan"), float("inf")])
def test_a_bad_timeout_is_named(timeout):
    with pytest.raises(ValueError, match=r"timeout.*(> 0|None)"):
        ft.data.make_loader(Indices(8), 2, timeout=timeout)


def test_a_timeout_that_cannot_be_enforced_warns_once_and_the_loader_still_loads(monkeypatch):
    without_internals(monkeypatch)  # a torchdata that keeps its threads elsewhere
    loader = ft.data.make_loader(Indices(20), 4, shuffle=False, num_workers=2, timeout=5)
    with pytest.warns(RuntimeWarning, match="timeout=5 is not enforced") as caught:
        got = [b.tolist() for _ in range(2) for b in loader]
    assert got == [[4 * b + k for k in range(4)] for b in range(5)] * 2
    assert sum("not enforced" in str(w.message) for w in caught) == 1
    with pytest.warns(RuntimeWarning, match="running it to the end of its stream"):
        loader.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_sample_that_never_returns_times_out_on_a_cuda_loader():
    data = HangsAt(40, bad=21)
    loader = ft.data.make_loader(data, 4, shuffle=False, device="cuda", timeout=TIMEOUT)
    got = []
    try:
        kind, error = within(15, lambda: [got.append(b.tolist()) for b in loader])
    finally:
        data.release.set()
    assert kind == "error" and isinstance(error, ft.data.LoaderTimeout), error
    assert "sample 21" in str(error)
    # The next batch is pulled one ahead on CUDA: the error may come while batch 4 is handed out.
    cursor = loader.batch
    assert got == [[4 * b + k for k in range(4)] for b in range(cursor)] and cursor in (4, 5)
    assert [b.tolist() for b in loader] == [[4 * b + k for k in range(4)] for b in range(cursor, 10)]


@pytest.mark.parametrize("timeout", ["10", True])
def test_a_timeout_of_the_wrong_type_is_named(timeout):
    with pytest.raises(TypeError, match="timeout must be a number of seconds"):
        ft.data.make_loader(Indices(8), 2, timeout=timeout)


# ----------------------------------------------------------------------------- samples that cannot be batched


class Returns(Indices):
    """dataset[i] == tensor of i's, shape (3,); dataset[bad] is ``value`` instead."""

    def __init__(self, n: int, bad: int, value):
        super().__init__(n)
        self.bad, self.value = bad, value

    def __getitem__(self, i):
        image = torch.full((3,), i)
        if i == self.bad:
            return self.value
        return image, i


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_none_sample_names_its_index(num_workers):
    loader = ft.data.make_loader(Returns(12, bad=6, value=None), 4, shuffle=False, num_workers=num_workers)
    kind, error = within(20, lambda: list(loader))
    assert kind == "error" and isinstance(error, ft.data.SampleError), error
    message = str(error)
    assert "sample 6" in message and "None" in message and "return" in message, message
    assert "tensor" in message  # says what a sample may be
    assert (loader.epoch, loader.batch) == (0, 1)

    # None is not refused before collate: a collate that drops bad samples still works.
    def drop_none(samples):
        return torch.utils.data.default_collate([s for s in samples if s is not None])

    kept = ft.data.make_loader(Returns(12, bad=6, value=None), 4, shuffle=False, collate=drop_none)
    assert [len(y) for _, y in kept] == [4, 3, 4]


def test_a_transform_that_returns_none_names_the_sample():
    loader = ft.data.make_loader(Indices(12), 4, shuffle=False, transform=lambda s: None if s == 9 else s)
    kind, error = within(20, lambda: list(loader))
    assert kind == "error" and isinstance(error, ft.data.SampleError), error
    assert "sample 9" in str(error) and "transform returned None" in str(error), str(error)


def test_a_none_inside_a_sample_names_the_field():
    loader = ft.data.make_loader(Returns(12, bad=5, value=(torch.zeros(3), None)), 4, shuffle=False)
    kind, error = within(20, lambda: list(loader))
    assert kind == "error" and isinstance(error, ft.data.SampleError), error
    message = str(error)
    assert "sample 5" in message and "[1] is None" in message, message


@pytest.mark.parametrize("num_workers", [0, 2])
def test_samples_of_different_shapes_in_one_batch_name_both_indices_and_shapes(num_workers):
    loader = ft.data.make_loader(
        Returns(12, bad=6, value=(torch.zeros(4), 6)), 4, shuffle=False, num_workers=num_workers
    )
    kind, error = within(20, lambda: list(loader))
    assert kind == "error" and isinstance(error, ft.data.SampleError), error
    message = str(error)
    assert "batch 1 of epoch 0" in message, message
    assert "sample 4" in message and "sample 6" in message, message
    assert "(3,)" in message and "(4,)" in message and "[0]" in message, message
    assert "collate=" in message and "transform" in message  # what to do

    # Shapes are not checked before collate: a collate that pads ragged samples still works.
    def pad(samples):
        width = max(image.numel() for image, _ in samples)
        images = [torch.nn.functional.pad(image, (0, width - image.numel())) for image, _ in samples]
        return torch.stack(images), torch.tensor([label for _, label in samples])

    padded = ft.data.make_loader(Returns(12, bad=6, value=(torch.zeros(4), 6)), 4, shuffle=False, collate=pad)
    assert [tuple(x.shape) for x, _ in padded] == [(4, 3), (4, 4), (4, 3)]


def test_samples_of_different_structure_in_one_batch_are_named():
    loader = ft.data.make_loader(Returns(12, bad=2, value=(torch.zeros(3), 2, "extra")), 4, shuffle=False)
    kind, error = within(20, lambda: list(loader))
    assert kind == "error" and isinstance(error, ft.data.SampleError), error
    message = str(error)
    assert "sample 0" in message and "sample 2" in message and "2 elements" in message and "3" in message, message


def test_a_custom_collate_that_fails_names_the_batch_and_its_samples():
    def collate(samples):
        raise RuntimeError("my collate broke")

    loader = ft.data.make_loader(Indices(12), 4, shuffle=False, collate=collate)
    kind, error = within(20, lambda: list(loader))
    assert kind == "error" and isinstance(error, ft.data.SampleError), error
    message = str(error)
    assert "batch 0 of epoch 0" in message and "[0, 1, 2, 3]" in message and "my collate broke" in message, message
