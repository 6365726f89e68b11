"""``make_loader``: a map-style dataset as a resumable, sharded, augmenting ``torchdata.nodes`` pipeline.

.. code-block:: text

    _BatchIndices   this rank's share of epoch e's permutation (DistributedSampler's), cut into
                    batches of indices per epoch (drop_last by default: static shapes for compiled
                    steps), epoch after epoch, from the loader's cursor
    ParallelMapper  _LoadBatch in num_workers processes (forked, the default on Linux) or threads:
                    for each sample, dataset[index], HWC uint8 -> CHW, transform, under a random
                    stream seeded by (seed, epoch, index);
                    then collate (default_collate); (CPU target) then _Finish: uint8 images ->
                    dtype, channels_last, batch_transform. Holds up to 2 * num_workers batches ahead.
    PinMemory       (CUDA target) page-locked batches, so the copies below can be asynchronous
    Prefetcher      ``prefetch`` batches ready ahead: after PinMemory, or with num_workers=0 (the
                    loading then runs in its thread); with workers on the CPU the mapper's queues
                    are the prefetch buffer already, and one more thread hop would only cost
    Loader          cuts the endless stream into epochs; (CUDA target) the next batch's non-blocking
                    copy and _Finish run on a side stream while the current batch is being used

Batching happens before the parallel map (each work item is a batch of indices, collated in the
worker), as ``DataLoader`` does and as torchdata recommends for small items: one queue hop per batch
instead of per sample. The stream runs across epoch boundaries, so workers start once, not per
epoch, and the next epoch's first batches are prefetched while this one ends.

Workers: ``worker_method="auto"`` (the default) runs them as processes where these start by fork
(Linux), threads elsewhere. Per-sample augmentation is mostly Python (torchvision's v2 transforms
spend more time dispatching than computing on small images), which holds the GIL: worker threads
take turns at it, worker processes run side by side, as ``DataLoader``'s do. A process reseeds its
own global generator per sample (exact, no per-op cost); a thread needs a ``TorchFunctionMode`` that
routes every torch call of the transform through Python (``_rng.sample_rng``). Forked workers
inherit the dataset and transform: nothing is pickled, and starting them takes milliseconds.

Resuming: the loader's state is a cursor, ``(epoch, batch)``, plus a fingerprint of the pipeline.
Every sample's augmentation is a pure function of (seed, epoch, index) and every batch transform's of
(seed, epoch, rank, batch), so restarting the pipeline at the cursor replays nothing and reproduces
the uninterrupted run exactly. (``torchdata.nodes.Loader`` instead snapshots every node and replays
the items produced since; its end-of-epoch case needs a look-ahead and a restart. Here the cursor
rolls over to ``(epoch + 1, 0)`` the moment an epoch's last batch is handed out, so a state saved at
the boundary resumes at the next epoch: neither skipped nor replayed.)

Failing instead of hanging: a watchdog thread beside the running pipeline (``_watch.Watchdog``) turns a
worker process that died, or a batch that does not arrive within ``timeout`` seconds, into an error;
the workers record which sample of which batch they are on (``_watch.Progress``) so that the error
can name it. A batch that cannot be collated is diagnosed after the fact (nothing is checked on the
way of a good batch): the error names the samples that differ and how.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import multiprocessing
import pickle
import queue
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torchdata.nodes as tn
from torch import Tensor
from torch.utils.data import DistributedSampler, default_collate

from .. import _validate
from . import _torchdata
from ._collate import uncollatable
from ._layout import _map, _tensors, to_chw
from ._rng import derive_seed, derive_seeds, sample_rng
from ._watch import COLLATING, SENT, Progress, Watchdog, describe_death

_OWNER = "make_loader"
DEFAULT_TIMEOUT = 600.0  # seconds a loader waits for one batch (see make_loader's timeout)


class SampleError(RuntimeError):
    """Loading or transforming one sample failed; the message names the sample's index and epoch."""


class WorkerError(RuntimeError):
    """A worker of the pipeline failed to deliver: a worker process died (killed, crashed, or exited)
    before its epoch ended, or (:class:`LoaderTimeout`) a batch did not arrive in time."""


class LoaderTimeout(WorkerError, TimeoutError):
    """A batch did not arrive within the loader's ``timeout``; the message names the batch, the worker
    and the sample it was on, and what every worker was doing. The cursor stays on that batch: the
    next ``iter()`` restarts the workers there, and ``state_dict()`` resumes there."""


# ----------------------------------------------------------------------------- nodes and stages


class _BatchIndices(tn.BaseNode):
    """This rank's batches of indices, epoch after epoch without end: ``(epoch, number, indices)``.

    Epoch ``e``'s order is ``DistributedSampler``'s (permutation seeded by seed + e, this rank's
    share), cut into ``batch_size`` pieces per epoch (so no batch spans two epochs; with
    ``drop_last`` the short tail is dropped). The stream never ends: the loader cuts it into epochs
    by count, so workers and prefetched batches carry over from one epoch to the next. The loader
    sets ``epoch`` and ``number`` (where to start) before a ``reset()``; setting ``ended`` ends the
    stream (the way to stop a pipeline without torchdata's internals, see ``_run_out``).
    """

    def __init__(self, sampler: DistributedSampler, batch_size: int, n_batches: int):
        super().__init__()
        self.sampler, self.batch_size, self.n_batches = sampler, batch_size, n_batches
        self.epoch, self.number = 0, 0
        self.ended = False

    def reset(self, initial_state: dict | None = None):
        super().reset(initial_state)
        if initial_state is not None:
            self.epoch, self.number = initial_state["epoch"], initial_state["batch"]
        self._start_epoch(self.epoch)
        self._number = self.number
        self.ended = False

    def _start_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self._epoch, self._order = epoch, list(self.sampler)

    def next(self) -> tuple[int, int, list[int]]:
        if self.ended:
            raise StopIteration
        if self._number == self.n_batches:
            self._start_epoch(self._epoch + 1)
            self._number = 0
        number, start = self._number, self._number * self.batch_size
        self._number += 1
        return self._epoch, number, self._order[start : start + self.batch_size]

    def get_state(self) -> dict:
        return {"epoch": self._epoch, "batch": self._number}


class _Batch(NamedTuple):
    epoch: int
    number: int  # the batch's number within its epoch on this rank
    data: Any


class _Pipeline(NamedTuple):
    root: tn.BaseNode  # the node the loader pulls batches from
    threaded: list  # its Prefetcher / PinMemory nodes (threads to stop)
    mapper: tn.ParallelMapper | None  # the ParallelMapper when it has workers
    watch_deaths: bool  # its workers are processes: the watchdog looks for dead ones


class _LoadBatch:
    """Loads, converts and transforms each sample of a batch of indices, then collates them.

    Runs in the worker threads (or processes). Each sample draws its random numbers from a stream
    seeded by ``(seed, epoch, index)``: the same augmentation whichever worker runs it, when. The
    worker records in ``progress`` which sample it is on, for the loader's timeout error.
    """

    def __init__(
        self,
        dataset,
        transform,
        seed: int,
        collate: Callable,
        finish: Callable | None,
        progress: Progress,
        in_process: bool,
    ):
        self.dataset, self.transform, self.seed, self.collate = dataset, transform, seed, collate
        self.finish = finish  # the batch's CPU end (_Finish) when batches stay on the CPU
        self.progress = progress
        self.in_process = in_process  # runs in worker processes (else in threads of the loader's process)

    def __call__(self, item: tuple[int, int, list[int]]) -> _Batch:
        epoch, number, indices = item
        row = self.progress.claim(epoch, number)
        # In a worker process nothing else draws from the global CPU generator: reseeding it per
        # sample is exact and free. In a thread, a thread-local mode redirects the draws instead.
        rng = None if self.in_process else sample_rng(0)
        samples: list[Any] = []
        none_from: dict[int, str] = {}  # sample index -> what returned None: named if collate fails on it
        reseed = torch.default_generator.manual_seed if rng is None else rng.reseed
        with rng if rng is not None else contextlib.nullcontext():
            for index, seed in zip(indices, derive_seeds((self.seed, epoch), indices)):
                self.progress.mark(row, index)
                reseed(seed)
                samples.append(self._sample(index, epoch, none_from))
        self.progress.mark(row, COLLATING)
        try:
            data = self.collate(samples)
        except Exception as error:
            raise SampleError(uncollatable(samples, indices, epoch, number, none_from, error)) from error
        batch = _Batch(epoch, number, data)
        batch = batch if self.finish is None else self.finish(batch)
        self.progress.mark(row, SENT)
        return batch

    def _sample(self, index: int, epoch: int, none_from: dict[int, str]) -> Any:
        """``transform(to_chw(dataset[index]))``, an error in either named by the sample. ``None`` is
        let through (a custom collate may drop such samples) and its origin noted in ``none_from``."""
        try:
            sample = self.dataset[index]
            if sample is None:
                none_from[index] = f"dataset[{index}] returned None"
            sample = to_chw(sample)
            if self.transform is not None:
                sample = self.transform(sample)
                if sample is None and index not in none_from:
                    none_from[index] = "transform returned None"
        except Exception as error:
            raise SampleError(
                f"functrain.data: sample {index} (epoch {epoch}) failed: {type(error).__name__}: {error}"
            ) from error
        return sample


class _Finish:
    """The per-batch end of the pipeline: optional move to ``device``, uint8 images (4-d uint8
    tensors) to ``dtype`` scaled to [0, 1] (as ``v2.ToDtype(dtype, scale=True)``), channels_last for
    4-d floating tensors, then ``batch_transform`` under a stream seeded by (seed, epoch, rank, batch)."""

    def __init__(self, device, dtype, channels_last: bool, batch_transform, seed: int, rank: int):
        self.device, self.dtype, self.channels_last = device, dtype, channels_last
        self.batch_transform, self.seed, self.rank = batch_transform, seed, rank

    def _leaf(self, x: Any) -> Any:
        if not isinstance(x, Tensor):
            return x
        if self.device is not None:
            x = x.to(self.device, non_blocking=True)
        if self.dtype is not None and x.dtype == torch.uint8 and x.ndim == 4:
            x = _to_dtype(x, self.dtype)
        if self.channels_last and x.ndim == 4 and x.is_floating_point():
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def __call__(self, batch: _Batch) -> _Batch:
        data = _map(self._leaf, batch.data)
        if self.batch_transform is not None:
            with sample_rng(derive_seed(self.seed, batch.epoch, self.rank, batch.number, 0xBA7C)):
                data = self.batch_transform(data)
        return batch._replace(data=data)


# ----------------------------------------------------------------------------- the loader


class Loader:
    """An epoch-aware, resumable iterable of batches; build one with :func:`make_loader`.

    The contract a training loop relies on:

    - ``for batch in loader`` yields the rest of the current epoch, then stops; iterating again yields
      the next epoch, shuffled by ``seed + epoch``. Breaking out leaves the cursor where it stopped:
      the next ``iter()`` continues that epoch (``set_epoch(e)`` jumps to the start of epoch ``e``).
    - ``len(loader)`` is the number of batches per epoch on this rank (the same on every rank).
    - ``loader.epoch`` / ``loader.batch`` is the cursor: the next batch to come is number ``batch``
      of epoch ``epoch``. A batch counts as consumed once handed out, so after the last batch of an
      epoch the cursor reads ``(epoch + 1, 0)``, before and after the ``for`` loop ends.
    - ``loader.state_dict()`` (a dict of ints, safe for ``torch.save`` / ``weights_only`` loading),
      taken anywhere, loaded with ``load_state_dict`` into a freshly built loader of the same
      pipeline, makes the new loader yield exactly the batches the old one would have yielded next,
      augmentation included. A state_dict of another pipeline (dataset length, batch size, seed,
      shuffle, drop_last, rank or world size differ) raises ``ValueError``.
    - One iteration at a time: starting a second ``iter()`` invalidates the first.
    - A batch that does not arrive within ``timeout`` seconds raises :class:`LoaderTimeout` (the
      cursor stays on it); a worker process that dies raises :class:`WorkerError`.

    The workers start on the first ``iter()`` and live as long as the loader; a loaded state or
    ``set_epoch`` restarts them at the new cursor, an error restarts them on the next ``iter()``.
    """

    def __init__(
        self,
        *,
        batches,
        pipeline: _Pipeline,
        threads_instead: Callable[[], _Pipeline] | None,
        finish,
        n_batches,
        fingerprint,
        device,
        timeout,
        progress,
    ):
        self._batches, self._finish = batches, finish
        self._root, self._threaded, self._mapper, self._watch_deaths = pipeline
        # worker_method="auto" chose processes: the threaded pipeline to use instead if this torchdata
        # does not let the loader watch worker processes (see _epoch).
        self._threads_instead = threads_instead
        self._n_batches, self._fingerprint, self._device = n_batches, fingerprint, device
        self._timeout, self._progress = timeout, progress
        self._watchdog: Watchdog | None = None  # watches the running pipeline (see _start_watchdog)
        self._warned_unenforced = False
        self.epoch, self.batch = 0, 0
        self._stream: tuple[int, int] | None = None  # the next (epoch, batch) the pipeline will give
        self._generation = 0
        _LIVE.add(self)
        _REAPER.start()

    def __len__(self) -> int:
        return self._n_batches

    @property
    def worker_method(self) -> str | None:
        """What loads the batches: ``"process"`` (worker processes), ``"thread"`` (worker threads), or
        ``None`` with ``num_workers=0`` (the loading runs in the prefetching thread). With
        ``make_loader(worker_method="auto")`` (the default) it tells which the loader chose."""
        if self._mapper is None:
            return None
        return "process" if self._watch_deaths else "thread"

    @property
    def timeout(self) -> float | None:
        """Seconds the loader waits for a batch before raising :class:`LoaderTimeout` (None: forever)."""
        return self._timeout

    def set_epoch(self, epoch: int) -> None:
        """Moves the cursor to the first batch of ``epoch``."""
        self.epoch, self.batch = _validate.integer("Loader.set_epoch", "epoch", epoch, 0), 0

    def state_dict(self) -> dict[str, Any]:
        """The cursor and the pipeline's fingerprint, as a dict of ints and bools."""
        return {"epoch": self.epoch, "batch": self.batch, "fingerprint": dict(self._fingerprint)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Moves the cursor to a state saved by :meth:`state_dict`, after checking it came from a pipeline
        built the same way."""
        if not isinstance(state_dict, dict) or not {"epoch", "batch", "fingerprint"} <= state_dict.keys():
            raise ValueError(
                "Loader.load_state_dict: expected a dict from Loader.state_dict() (epoch, batch, fingerprint)"
            )
        theirs = state_dict["fingerprint"]
        for key, ours in self._fingerprint.items():
            if theirs.get(key) != ours:
                raise ValueError(
                    f"Loader.load_state_dict: the state_dict is from another pipeline: {key} is {theirs.get(key)!r} "
                    f"in the state_dict but {ours!r} in this loader"
                )
        epoch, batch = int(state_dict["epoch"]), int(state_dict["batch"])
        if not 0 <= batch <= self._n_batches:
            raise ValueError(f"Loader.load_state_dict: batch {batch} is outside this epoch's {self._n_batches} batches")
        self.epoch, self.batch = (epoch + 1, 0) if batch == self._n_batches else (epoch, batch)
        self._generation += 1  # an iteration in progress must not go on from the old cursor

    def __iter__(self) -> Iterator[Any]:
        self._generation += 1
        return self._epoch(self._generation)

    def __del__(self) -> None:
        # An orderly stop (readers before worker processes) rather than torchdata's own on collection,
        # handed to the reaper thread: a loader in a reference cycle (an exception kept with its
        # traceback is enough) is finalised by the cyclic collector in whichever thread allocates,
        # maybe the one waiting on another loader's batch or that loader's reader, and stopping
        # waits for threads and processes (up to seconds): its batch would come late.
        try:
            watchdog, running = self._watchdog, self._stream is not None
            if watchdog is not None or running:
                pipeline = (self._batches, self._root, self._threaded, self._mapper)
                _REAPER.submit(lambda: _halt(watchdog, pipeline if running else None, patience=5.0))
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass

    def close(self) -> None:
        """Stops the pipeline's threads and worker processes now (the next ``iter()`` starts them
        again at the cursor). Called for every live loader when the interpreter exits: a daemon
        thread still inside a torch op at exit would abort the process.

        torchdata's nodes stop on their own only at the end of their stream, and this one has no
        end: the threads are stopped through torchdata 0.11's internals (``_torchdata.stop``). If a
        torchdata keeps them elsewhere, the stream is ended at its source and run out instead
        (slower: the batches in flight are loaded), with a ``RuntimeWarning``.
        """
        self._stop_pipeline(patience=5.0)

    def _stop_pipeline(self, patience: float) -> None:
        """``close()``, giving each worker ``patience`` seconds to finish the batch in hand before a
        worker process is terminated (after a timeout the workers are stuck: no patience)."""
        self._generation += 1
        watchdog, self._watchdog = self._watchdog, None
        # (Nothing started since the last stop: a stuck thread is not waited for twice.)
        running, self._stream = self._stream is not None, None
        pipeline = (self._batches, self._root, self._threaded, self._mapper)
        _halt(watchdog, pipeline if running else None, patience)

    def _epoch(self, generation: int) -> Iterator[Any]:
        epoch, start = self.epoch, self.batch
        if self._stream != (epoch, start):  # first use, a loaded state, set_epoch, an error: restart there
            self._restart(epoch, start)
            if self._watch_deaths and _torchdata.mapper_iterator(self._mapper) is _torchdata.UNKNOWN:
                # No way to see a worker process die: refuse rather than risk hanging on one (asked
                # for processes), or use threads (the default chose them).
                self._stream = None
                _run_out(self._batches, self._root)
                if self._threads_instead is None:
                    raise _torchdata.process_workers_unsupported()
                self._root, self._threaded, self._mapper, self._watch_deaths = self._threads_instead()
                self._threads_instead = None
                self._restart(epoch, start)
            self._watchdog = self._start_watchdog()
        cuda = self._device is not None and self._device.type == "cuda"
        stream = torch.cuda.Stream(self._device) if cuda else None
        try:
            # On CUDA the next batch is pulled, copied and finished on the side stream one batch
            # ahead, so its copy overlaps the current batch's compute; elsewhere no lookahead (an
            # error then surfaces at the batch it belongs to).
            pending = self._pull(stream) if stream is not None else None
            for number in range(start, self._n_batches):
                if generation != self._generation:
                    raise RuntimeError("Loader: another iteration of this loader started (or a state was loaded)")
                if stream is None:
                    batch, _ = self._pull(stream)
                else:
                    batch, ready = pending
                    if number + 1 < self._n_batches:
                        pending = self._pull(stream)
                    current = torch.cuda.current_stream(self._device)
                    current.wait_event(ready)
                    for t in _tensors(batch):
                        t.record_stream(current)  # made on the side stream, used on this one
                self.epoch, self.batch = (epoch + 1, 0) if number + 1 == self._n_batches else (epoch, number + 1)
                yield batch
        except Exception as error:
            if generation == self._generation:  # (a superseded iteration leaves the pipeline alone)
                # The pipeline broke or is out of step: stop it; the next iter() restarts it. After a
                # timeout its workers are stuck: they are not given time to finish.
                self._stop_pipeline(patience=0.0 if isinstance(error, LoaderTimeout) else 5.0)
            raise

    def _restart(self, epoch: int, start: int) -> None:
        """(Re)starts the pipeline at batch ``start`` of ``epoch``. A pipeline still running (a loaded
        state, ``set_epoch``) is stopped first, readers before worker processes (torchdata's own
        shutdown stops both at once, and a reader then fails to fetch a batch from a worker that left)."""
        self._stop_watchdog()
        if self._stream is not None:
            self._stream = None
            # (On a torchdata of unknown layout this touches nothing: reset() shuts the pipeline down.)
            _torchdata.stop(self._threaded, self._mapper, 5.0)
        self._batches.epoch, self._batches.number = epoch, start
        self._root.reset()
        self._stream = (epoch, start)

    def _start_watchdog(self) -> Watchdog | None:
        """A watchdog for the pipeline just (re)started, when there is something to watch: worker
        processes that may die, or a timeout. It lives as long as the pipeline (a thread per epoch
        would only churn). A timeout needs torchdata 0.11's internals to stop the wait: without them
        it warns (once) and is not enforced."""
        self._stop_watchdog()
        timeout = self._timeout
        if timeout is not None and not _torchdata.interruptible(self._threaded, self._mapper):
            if not self._warned_unenforced:
                _torchdata.warn_timeout_unenforced(timeout)
                self._warned_unenforced = True
            timeout = None
        if not self._watch_deaths and timeout is None:
            return None
        return Watchdog(
            threaded=self._threaded,
            mapper=self._mapper,
            watch_deaths=self._watch_deaths,
            timeout=timeout,
            progress=self._progress,
        )

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None

    def _next_item(self) -> _Batch:
        """The pipeline's next item, or the watchdog's error: a dead worker, a batch too late."""
        epoch, number = self._stream
        watchdog = self._watchdog
        if watchdog is not None:
            watchdog.waiting(epoch, number)
        try:
            item = next(self._root)
        except StopIteration:
            item = None
        finally:
            if watchdog is not None:
                watchdog.arrived()
        if watchdog is not None and watchdog.dead is not None:
            raise WorkerError(describe_death(watchdog.dead))
        if watchdog is not None and watchdog.late is not None:
            raise LoaderTimeout(watchdog.late)
        if item is None:
            raise RuntimeError(f"Loader: the pipeline stopped before batch {number} of epoch {epoch}")
        return item

    def _pull(self, stream) -> tuple[Any, Any]:
        """The pipeline's next batch, checked to be the one expected; on CUDA, copied and finished on
        ``stream``, with the event that marks it ready."""
        epoch, number = self._stream
        item = self._next_item()
        if (item.epoch, item.number) != (epoch, number):  # ParallelMapper keeps order: a bug if not
            raise RuntimeError(f"Loader: expected batch {number} of epoch {epoch}, got {item.number} of {item.epoch}")
        self._stream = (epoch + 1, 0) if number + 1 == self._n_batches else (epoch, number + 1)
        if self._device is None:  # finished in the worker already
            return item.data, None
        if stream is None:  # a device without streams here: finish in line
            return self._finish(item).data, None
        with torch.cuda.stream(stream):
            item = self._finish(item)
            ready = torch.cuda.Event()
            ready.record(stream)
        return item.data, ready


def _to_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``v2.ToDtype(dtype, scale=True)`` of a uint8 image batch (torchvision imported on first use, so
    ``import functrain`` stays light)."""
    from torchvision.transforms.v2.functional import to_dtype

    return to_dtype(x, dtype, scale=True)


def _halt(watchdog: Watchdog | None, pipeline: tuple | None, patience: float) -> None:
    """Stops a loader's ``watchdog`` and its running ``pipeline`` (``(batches, root, threaded,
    mapper)``; ``None``: nothing runs): readers before worker processes, through torchdata 0.11's
    internals (``_torchdata.stop``), else with a ``RuntimeWarning`` by running the stream out."""
    if watchdog is not None:
        watchdog.stop()
    if pipeline is None:
        return
    batches, root, threaded, mapper = pipeline
    if not _torchdata.stop(threaded, mapper, patience):
        _torchdata.warn_ran_out()
        _run_out(batches, root)


def _run_out(batches: _BatchIndices, root: tn.BaseNode) -> None:
    """Ends the stream at its source and pulls the pipeline's remaining batches until it ends: each
    node then stops its threads and worker processes itself. Public behaviour only."""
    batches.ended = True
    while True:
        try:
            next(root)
        except StopIteration:
            return
        except Exception as error:  # noqa: BLE001 - a batch that failed: the ones behind it must still come out
            # torch's ExceptionWrapper.reraise keeps the error in a local of its frame: a cycle
            # through the traceback that would keep the pipeline (its queues' threads) alive until
            # a garbage collection. Without the traceback, it goes now.
            error.__traceback__ = None
            continue


class _Reaper:
    """Stops the pipelines of garbage-collected loaders in a daemon thread of its own, so that a
    finaliser never waits (see ``Loader.__del__``). Started with the first loader, not inside a
    finaliser; a process forked from this one starts its own when it needs one."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # its put() is safe inside a finaliser
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        # (Two threads racing here may start two reapers: both take jobs from the one queue, harmless.)
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, daemon=True, name="functrain-data-reaper")
            self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)
        self.start()

    def wait(self, timeout: float) -> bool:
        """Waits, ``timeout`` seconds at most, until the jobs submitted so far are done."""
        if self._thread is None or not self._thread.is_alive():
            return True
        done = threading.Event()
        self._jobs.put(done.set)
        return done.wait(timeout)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except Exception:  # noqa: BLE001 - its loader is gone: there is no one to tell
                pass


_REAPER = _Reaper()
_LIVE: weakref.WeakSet[Loader] = weakref.WeakSet()


@atexit.register
def _close_live_loaders() -> None:
    # A daemon thread still inside a torch op at exit would abort the process: every pipeline stops
    # first, a collected loader's included (a stuck thread is waited for up to its patience).
    for loader in list(_LIVE):
        loader.close()
    _REAPER.wait(timeout=30.0)


# ----------------------------------------------------------------------------- the builder


def make_loader(
    dataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = True,
    transform: Callable | None = None,
    batch_transform: Callable | None = None,
    num_workers: int = 2,
    worker_method: str = "auto",
    multiprocessing_context: str | None = None,
    prefetch: int = 2,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = torch.float32,
    channels_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    collate: Callable = default_collate,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> Loader:
    """A map-style dataset as a shuffled, augmented, batched, resumable :class:`Loader`.

    Per sample (in ``num_workers`` worker processes, or threads: see ``worker_method``):
    ``dataset[index]``, images to CHW uint8 tensors (:func:`to_chw`), ``transform(sample)``. Per
    batch: ``collate`` (``default_collate``), the move to ``device`` (non-blocking from pinned
    memory, one batch ahead, on a side CUDA stream), 4-d uint8 tensors to ``dtype`` scaled to [0, 1]
    (after the copy: a quarter of the bytes cross the bus), ``channels_last``, then
    ``batch_transform(batch)`` (e.g. ``v2.CutMix``), on the device.

    Random augmentation is reproducible: a sample's random draws (torch's sampling functions, in
    ``dataset[index]`` and ``transform``) come from a stream seeded by (seed, epoch, index), and a
    batch transform's from one seeded by (seed, epoch, rank, batch), whatever the number of workers or
    their scheduling, and without touching torch's global generator.

    Args:
        dataset: anything with ``__getitem__`` and ``__len__`` (torchvision datasets, :func:`digits`).
        batch_size: samples per batch.
        shuffle: a new permutation each epoch, seeded by ``seed + epoch`` (``DistributedSampler``'s).
        seed: seeds the permutations and every random augmentation.
        drop_last: drop each epoch's incomplete last batch (static shapes for compiled steps).
        transform: applied to each sample, e.g. a ``torchvision.transforms.v2`` pipeline (which
            transforms the image of an ``(image, label)`` tuple and passes the label through).
        batch_transform: applied to each collated batch on the device, e.g. ``v2.MixUp``.
        num_workers: worker processes (or threads), each loading whole batches; up to
            ``2 * num_workers`` batches are in flight. 0 loads in the prefetching thread.
        worker_method: ``"auto"`` (default): worker processes where they start by fork (Linux,
            unless the program chose another start method), as ``DataLoader``'s workers; worker
            threads where processes would be spawned (macOS, Windows: the dataset and transform
            pickled, the script's top level guarded by ``if __name__ == "__main__"``). Processes,
            because a per-sample transform is mostly Python, which holds the GIL: threads take turns
            at it. With 2 workers on 2 cores (``benchmarks/bench_data.py``, median of 9 runs on a
            shared VM, where runs differ by 10-30%) the default matches ``DataLoader``'s throughput
            with the same workers: 0.98x on 28x28 digits, 1.04x on JPEG decoding with
            RandomResizedCrop; worker threads reach 0.58x and 0.86x. Forked workers pickle nothing
            (a lambda transform is fine) but cannot use CUDA. ``"process"``: processes
            started by ``multiprocessing_context``; unless forked they receive the dataset,
            ``transform``, ``collate`` (and a CPU ``batch_transform``) pickled, and ``make_loader``
            raises :class:`TypeError` naming the one that does not pickle. ``"thread"``: nothing
            pickled, nothing to start, the transform may use CUDA; fast only when the work releases
            the GIL (decoding and resizing large images); the thread-local random streams route
            every torch call of the transform through a Python hook (~2 us each).
            ``loader.worker_method`` tells which one the loader uses.
        multiprocessing_context: ``"fork"``, ``"spawn"`` or ``"forkserver"``: how worker processes
            start (naming one makes ``"auto"`` use processes). Default: the program's choice
            (``multiprocessing.set_start_method``) if it made one, else fork on Linux and spawn
            elsewhere.
        prefetch: batches the Prefetcher keeps ready (used on CUDA and with ``num_workers=0``).
        device: where batches are delivered; ``None`` keeps them on the CPU.
        dtype: what 4-d uint8 tensors (image batches) become; ``None`` keeps uint8.
        channels_last: give 4-d floating tensors the channels_last memory format.
        rank: this process's rank in data-parallel runs: every rank sees a disjoint
            ``1/world_size`` of each epoch's permutation and the same number of batches
            (``DistributedSampler``'s split: with ``drop_last=False`` a few samples repeat to even
            the ranks out).
        world_size: the number of ranks sharing each epoch.
        collate: turns a list of samples into a batch. When it fails, :class:`SampleError` names
            the batch's samples that are (or hold) None or differ in structure or shape.
        timeout: seconds to wait for each batch (as ``DataLoader(timeout=)``; the first batch's wait
            includes starting the workers), then raise :class:`LoaderTimeout`, naming the worker and
            the sample it is stuck on, instead of hanging on a ``__getitem__`` that never returns or
            a stopped worker. The default, 600 (10 minutes), is far beyond any healthy batch and
            bounds what a stuck job wastes; ``None`` waits forever (``DataLoader``'s default).

    Returns:
        A :class:`Loader`: ``for batch in loader`` is one epoch, ``len(loader)`` its batches.

    Raises:
        ValueError: a bad argument, or ``drop_last`` with ``batch_size`` larger than the samples a
            rank sees per epoch (every epoch would be empty).
        TypeError: a bad argument, or worker processes that would be spawned and a dataset,
            transform or collate that cannot be pickled (the message names it and what to do).
        SampleError: (while iterating) a sample failed to load or transform, or a batch's samples
            cannot be collated; the message names the sample indices.
        LoaderTimeout: (while iterating) a batch did not arrive within ``timeout``.
        WorkerError: (while iterating) a worker process died.

    Example:
        >>> import torch, functrain as ft
        >>> data = torch.utils.data.TensorDataset(torch.arange(10.0), torch.arange(10))
        >>> loader = ft.data.make_loader(data, batch_size=4, seed=0)
        >>> len(loader), [y.tolist() for _, y in loader]
        (2, [[4, 1, 7, 5], [3, 9, 0, 8]])
        >>> state = loader.state_dict()                       # epoch 1, batch 0
        >>> first = next(iter(loader))[1].tolist()
        >>> resumed = ft.data.make_loader(data, batch_size=4, seed=0)
        >>> resumed.load_state_dict(state)
        >>> next(iter(resumed))[1].tolist() == first
        True
    """
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise TypeError(f"{_OWNER}: dataset must be map-style (__getitem__ and __len__), got {type(dataset).__name__}")
    batch_size = _validate.integer(_OWNER, "batch_size", batch_size, 1)
    seed = _validate.integer(_OWNER, "seed", seed, 0)
    num_workers = _validate.integer(_OWNER, "num_workers", num_workers, 0)
    prefetch = _validate.integer(_OWNER, "prefetch", prefetch, 1)
    world_size = _validate.integer(_OWNER, "world_size", world_size, 1)
    rank = _validate.integer(_OWNER, "rank", rank, 0, world_size - 1)
    _validate.one_of(_OWNER, "worker_method", worker_method, ("auto", "process", "thread"))
    if multiprocessing_context is not None:
        _validate.one_of(
            _OWNER, "multiprocessing_context", multiprocessing_context, tuple(multiprocessing.get_all_start_methods())
        )
    timeout = _validate.seconds(_OWNER, "timeout", timeout)
    for name, value in (("transform", transform), ("batch_transform", batch_transform), ("collate", collate)):
        if value is not None and not callable(value):
            raise TypeError(f"{_OWNER}: {name} must be callable, got {type(value).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{_OWNER}: dtype must be a floating torch.dtype or None, got {dtype!r}")
    device = None if device is None else torch.device(device)
    if device is not None and device.type == "cpu":
        device = None  # batches are made on the CPU: nothing to move

    n = len(dataset)
    if n == 0:
        raise ValueError(f"{_OWNER}: the dataset is empty")
    sampler = DistributedSampler(
        range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    per_rank = sampler.num_samples
    n_batches = per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)
    if n_batches == 0:
        raise ValueError(
            f"{_OWNER}: batch_size {batch_size} is larger than the {per_rank} samples each of the {world_size} "
            f"rank(s) sees per epoch (dataset of {n}): with drop_last=True every epoch would be empty; "
            "lower batch_size or pass drop_last=False"
        )

    batches = _BatchIndices(sampler, batch_size, n_batches)
    finish = _Finish(device, dtype, channels_last, batch_transform, seed, rank)
    # More rows than batches the queues can hold in flight (2 * num_workers in the mapper, prefetch
    # in each thread node), so the batches being loaded never share a row.
    progress = Progress(slots=2 * num_workers + 2 * prefetch + 4, n_batches=n_batches)
    method, start_method = _workers(worker_method, multiprocessing_context, num_workers)

    def build(method: str, start_method: str | None) -> _Pipeline:
        # Batches that stay on the CPU are finished in the worker, right after collation.
        load = _LoadBatch(
            dataset, transform, seed, collate, finish if device is None else None, progress, method == "process"
        )
        if method == "process" and start_method != "fork":
            _check_picklable(start_method, worker_method, dataset=dataset, transform=transform, collate=collate,
                             batch_transform=batch_transform if device is None else None)  # fmt: skip
        mapper = tn.ParallelMapper(
            batches,
            load,
            num_workers=num_workers,
            method=method,
            multiprocessing_context=start_method,
            in_order=True,  # (the default) the loader checks each batch is the one expected
            snapshot_frequency=0,  # the loader's state is its cursor: no per-item snapshots needed
        )
        node: tn.BaseNode = mapper
        threaded = []
        if device is not None and device.type == "cuda":
            node = tn.PinMemory(node, snapshot_frequency=0)
            threaded.append(node)
        if num_workers == 0 or threaded:
            # With workers, the ParallelMapper's queues already hold up to 2 * num_workers batches
            # ahead; a Prefetcher on top would only add a thread hop per batch. It is needed when the
            # loading runs inline (it then runs in the Prefetcher's thread) and after PinMemory.
            node = tn.Prefetcher(node, prefetch_factor=prefetch, snapshot_frequency=0)
            threaded.insert(0, node)
        # With no workers the mapping runs inline: nothing to stop or watch.
        return _Pipeline(node, threaded, mapper if num_workers > 0 else None, method == "process")

    fingerprint = {
        "dataset_length": n,
        "batch_size": batch_size,
        "seed": seed,
        "shuffle": bool(shuffle),
        "drop_last": bool(drop_last),
        "rank": rank,
        "world_size": world_size,
    }
    return Loader(
        batches=batches,
        pipeline=build(method, start_method),
        threads_instead=(lambda: build("thread", None)) if worker_method == "auto" and method == "process" else None,
        finish=finish,
        n_batches=n_batches,
        fingerprint=fingerprint,
        device=device,
        timeout=timeout,
        progress=progress,
    )


# ----------------------------------------------------------------------------- workers


def _default_start_method() -> str:
    """The start method of worker processes when make_loader is not given one: the program's own
    choice (``multiprocessing.set_start_method``) if it made one, else ``fork`` on Linux (nothing is
    pickled, workers start in milliseconds: what ``DataLoader`` does there), else ``spawn`` (the
    default of macOS and Windows)."""
    chosen = multiprocessing.get_start_method(allow_none=True)
    if chosen is not None:
        return chosen
    return "fork" if sys.platform.startswith("linux") else "spawn"


def _workers(worker_method: str, multiprocessing_context: str | None, num_workers: int) -> tuple[str, str | None]:
    """(method, start method) of the workers: ``"auto"`` is processes when they start by fork (or
    a start method is named), threads otherwise: spawned workers need a picklable dataset and
    transform and a script whose top level is guarded by ``if __name__ == "__main__"``."""
    if num_workers == 0 or worker_method == "thread":
        return "thread", None
    start_method = multiprocessing_context or _default_start_method()
    if worker_method == "auto" and multiprocessing_context is None and start_method != "fork":
        return "thread", None
    return "process", start_method


class _Discard:
    def write(self, data) -> int:
        return len(data)


class _ShapePickler(pickle.Pickler):
    """Pickles an object's structure without its tensors' and arrays' bytes: what fails to pickle
    (a lambda, a local class, a lock, an open file) fails here too, in time proportional to the
    number of Python objects, not to the data."""

    def persistent_id(self, obj):
        if isinstance(obj, Tensor | torch.UntypedStorage | torch.TypedStorage):
            return "tensor"
        if type(obj).__module__ == "numpy" and type(obj).__name__ == "ndarray":
            return "array"
        return None


def _check_picklable(start_method: str, worker_method: str, **parts) -> None:
    """Worker processes started by spawn or forkserver receive the dataset, transform and collate
    pickled: a part that cannot be pickled is named now, with what to do, rather than failing in
    ``multiprocessing`` at the first ``iter()``."""
    for name, part in parts.items():
        if part is None:
            continue
        try:
            _ShapePickler(_Discard(), protocol=pickle.HIGHEST_PROTOCOL).dump(part)
        except Exception as error:  # noqa: BLE001 - pickle raises PicklingError, AttributeError, TypeError...
            raise TypeError(
                f"{_OWNER}: worker_method={worker_method!r} with the {start_method!r} start method sends the "
                f"{name} to each worker process pickled, and it cannot be pickled ({type(error).__name__}: "
                f"{error}). Define it at module level (not a lambda, nor a function or class defined inside a "
                "function), or pass worker_method='thread' (worker threads pickle nothing)"
                + (", or multiprocessing_context='fork'" if "fork" in multiprocessing.get_all_start_methods() else "")
                + "."
            ) from error
