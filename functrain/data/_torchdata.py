"""Every read of torchdata's private internals, in one place, each with its fallback.

The pipeline is built from ``torchdata.nodes``' public nodes (``BaseNode``, ``ParallelMapper``,
``PinMemory``, ``Prefetcher``). Two things the loader needs have no public API in torchdata 0.11:

- stopping a pipeline whose stream has no end (``Loader.close``): the nodes stop their threads and
  worker processes only at the end of their stream, or when they are garbage-collected;
- noticing that a worker process died: a ``ParallelMapper`` then waits forever for its output.

A third, the loader's ``timeout``, needs the first: a batch that does not arrive in time is turned
into an error by stopping the readers the loader waits on (``interrupt``), so its wait ends.

For all three, this module reads the attributes that torchdata 0.11 sets on the nodes' running
iterators (listed in :data:`THREAD_ATTRIBUTES` and :data:`MAPPER_ATTRIBUTES`). It checks that all
of them are there before touching any, so a torchdata that keeps them elsewhere is detected rather
than crashed on, and the callers fall back:

- ``Loader.close`` ends the stream at its source and runs the pipeline out (public behaviour: each
  node stops its threads and processes at the end of its stream), with a ``RuntimeWarning``;
- a process-mode loader refuses to start, with an error that names the torchdata version and what
  to do (threads, or the supported torchdata), instead of risking a hang on a dead worker.
- a loader with a ``timeout`` warns that it cannot enforce it, and waits as torchdata does.

``pyproject.toml`` bounds torchdata to ``>=0.11,<0.12`` while these internals are read; the tests
in ``tests/test_private_apis.py`` check the attributes on a running pipeline and both fallbacks.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import warnings
from typing import Any

import torchdata

SUPPORTED = "torchdata>=0.11,<0.12"  # pyproject.toml's requirement: the versions these internals were read from
VERSION = getattr(torchdata, "__version__", "of unknown version")

# Prefetcher._it and PinMemory._it (torchdata 0.11: _SingleThreadedMapper): the one thread and its stop event.
THREAD_ATTRIBUTES = ("_stop_event", "_thread")
# ParallelMapper._it (_ParallelMapperImpl)._it (_ParallelMapperIter): the reader and sorter threads
# and their stop event, the workers (threads or processes), their stop event and their input queue.
MAPPER_ATTRIBUTES = ("_stop", "_mp_stop", "_read_thread", "_sort_thread", "_in_q", "_workers")


class _Unknown:
    """The internals are not where torchdata 0.11 keeps them."""

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Any = _Unknown()


def _running(owner: Any, attributes: tuple[str, ...]) -> Any:
    """``owner._it`` (a node's running iterator) if it has every one of ``attributes``; ``None`` when
    the node has not started; :data:`UNKNOWN` when the layout is not torchdata 0.11's."""
    if not hasattr(owner, "_it"):
        return UNKNOWN
    it = owner._it
    if it is None:
        return None
    return it if all(hasattr(it, name) for name in attributes) else UNKNOWN


def thread_iterator(node: Any) -> Any:
    """A ``Prefetcher``'s or ``PinMemory``'s running iterator, ``None`` or :data:`UNKNOWN`."""
    return _running(node, THREAD_ATTRIBUTES)


def mapper_iterator(mapper: Any) -> Any:
    """A ``ParallelMapper``'s (``num_workers > 0``) running iterator, ``None`` or :data:`UNKNOWN`."""
    impl = getattr(mapper, "_it", None)  # made in ParallelMapper.__init__: never None in 0.11
    return UNKNOWN if impl is None else _running(impl, MAPPER_ATTRIBUTES)


def stop(threaded: list[Any], mapper: Any | None, patience: float = 5.0) -> bool:
    """Stops the pipeline's threads and worker processes now, through torchdata 0.11's internals.

    ``threaded``: the ``Prefetcher`` / ``PinMemory`` nodes; ``mapper``: the ``ParallelMapper`` when
    it has workers, else ``None``. ``patience``: seconds each thread or worker may take to finish the
    item in hand; then a worker process is terminated (killed if it does not go: a stopped process
    leaves SIGTERM pending), and a thread, which cannot be killed, is left to end on its own (they are
    daemons). After a timeout the workers are stuck: the loader passes 0. Returns ``False``, having
    touched nothing, when the internals are not where torchdata 0.11 keeps them: the caller then falls
    back to running the stream out.
    """
    iterators = [thread_iterator(node) for node in threaded]
    mapper_it = None if mapper is None else mapper_iterator(mapper)
    if any(it is UNKNOWN for it in (*iterators, mapper_it)):
        return False
    for it in iterators:
        if it is not None:
            it._stop_event.set()
    if mapper_it is not None:
        # The threads reading from the workers stop first: a tensor from a worker process is
        # fetched from that process while it is unpickled, so the worker must outlive the reader.
        mapper_it._stop.set()
        for worker in mapper_it._workers:
            _resume(worker)
        for thread in (mapper_it._read_thread, mapper_it._sort_thread):
            if thread.is_alive():
                thread.join(timeout=1)
        if not _set_shared(mapper_it._mp_stop, seconds=1.0):
            patience = 0.0  # its lock is held for good: the workers are stuck on it as well
        _drain(mapper_it._in_q)  # workers leave once the stop is set and their input queue is empty
        for worker in mapper_it._workers:
            worker.join(timeout=patience)
            if worker.is_alive() and hasattr(worker, "terminate"):
                _end_process(worker)
        # A worker terminated while inside the stop event's is_set() (they poll it) leaves the event's
        # lock held for good, and torchdata's own shutdown (on reset or collection) sets the event
        # again: that set() would wait forever. It gets an event that is already set instead.
        mapper_it._mp_stop = _STOPPED
        _close_queue(mapper_it._in_q)
    for it in iterators:
        if it is not None and it._thread.is_alive():
            it._thread.join(timeout=patience)
    return True


_STOPPED = threading.Event()
_STOPPED.set()


def _set_shared(event: Any, seconds: float) -> bool:
    """``event.set()``, given up after ``seconds``; returns whether it was set. A ``multiprocessing``
    event guards its flag with a lock shared with the worker processes, and a process killed while
    holding it (terminated, or by the OOM killer, inside ``is_set()``) leaves it held for good: a
    plain ``set()`` would wait forever. The thread left waiting then is a daemon."""
    setter = threading.Thread(target=event.set, daemon=True, name="functrain-data-stop")
    setter.start()
    setter.join(seconds)
    return not setter.is_alive()


def _resume(worker: Any) -> None:
    """Continues a worker process that was stopped (SIGSTOP; a no-op for one that runs): the reader
    may be unpickling its last batch, which needs an answer from it, and killing it instead would
    raise in torchdata's reader thread. It is stopped for good right after."""
    if getattr(worker, "pid", None) is not None and hasattr(signal, "SIGCONT") and worker.is_alive():
        with contextlib.suppress(OSError):
            os.kill(worker.pid, signal.SIGCONT)


def _end_process(worker: Any) -> None:
    worker.terminate()
    worker.join(timeout=0.5)
    if worker.is_alive():  # stopped (SIGSTOP): SIGTERM waits for a SIGCONT, SIGKILL does not
        worker.kill()
        worker.join(timeout=1)


def interrupt(threaded: list[Any], mapper: Any | None) -> bool:
    """Stops the readers the loader waits on (each node's stop event: its ``next()`` then ends the
    stream), leaving the workers to :func:`stop`. Returns ``False``, having touched nothing, when the
    internals are not torchdata 0.11's."""
    if not interruptible(threaded, mapper):
        return False
    for node in threaded:
        it = thread_iterator(node)
        if it is not None:
            it._stop_event.set()
    mapper_it = None if mapper is None else mapper_iterator(mapper)
    if mapper_it is not None:
        mapper_it._stop.set()
    return True


def interruptible(threaded: list[Any], mapper: Any | None) -> bool:
    """Whether :func:`interrupt` can stop this pipeline's readers (its internals are torchdata 0.11's)."""
    iterators = [thread_iterator(node) for node in threaded]
    return not any(it is UNKNOWN for it in (*iterators, None if mapper is None else mapper_iterator(mapper)))


def workers(mapper: Any | None) -> list[Any]:
    """The running ``mapper``'s worker threads or processes; ``[]`` when there is none to see."""
    it = None if mapper is None else mapper_iterator(mapper)
    return [] if it is None or it is UNKNOWN else list(it._workers)


def dead_worker(mapper: Any) -> Any | None:
    """A worker of the running ``mapper`` that is no longer alive, after stopping the mapper's
    reader threads (its iterator then ends instead of waiting forever for that worker's output);
    ``None`` while every worker lives, or when nothing runs, the mapper is stopping, or its
    internals are not torchdata 0.11's (a process-mode loader then refuses to start)."""
    it = mapper_iterator(mapper)
    # (Not the workers' stop event, which is set after this one: its lock may be held for good by a
    # worker that died, see _set_shared.)
    if it is None or it is UNKNOWN or it._stop.is_set():
        return None
    for worker in it._workers:
        if not worker.is_alive():
            it._stop.set()
            return worker
    return None


def _close_queue(q: Any) -> None:
    """Closes the workers' input queue when it is a ``multiprocessing`` queue and waits (a second at
    most) for its feeder thread to end, as ``DataLoader`` closes its queues at shutdown: left to the
    queue's garbage collection, that thread would outlive ``close()``. The items it may still hold
    are a few lists of indices, which the pipe has room for; if it had not, the thread is left
    behind (a daemon, which interpreter exit does not wait for)."""
    if not hasattr(q, "cancel_join_thread"):  # a queue.Queue: worker threads
        return
    q.cancel_join_thread()
    q.close()  # the feeder thread writes what it holds, then ends
    feeder = getattr(q, "_thread", None)  # (the standard library's, started on the first put)
    if feeder is not None:
        feeder.join(timeout=1.0)


def _drain(q: Any) -> None:
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass
    except (OSError, ValueError):  # a multiprocessing queue already closed
        pass


def warn_ran_out() -> None:
    """The warning for ``Loader.close``'s fallback."""
    warnings.warn(
        f"functrain.data: torchdata {VERSION} does not keep its pipeline's threads where torchdata 0.11 did, so "
        "Loader.close() stopped the pipeline by running it to the end of its stream (the batches in flight were "
        f"loaded and dropped). functrain.data is tested with {SUPPORTED}: install that, or a functrain release "
        f"that supports torchdata {VERSION}.",
        RuntimeWarning,
        stacklevel=4,
    )


def warn_timeout_unenforced(timeout: float) -> None:
    """The warning for a loader whose ``timeout`` cannot stop a pipeline on this torchdata."""
    warnings.warn(
        f"functrain.data: make_loader's timeout={timeout:g} is not enforced: torchdata {VERSION} does not keep its "
        "pipeline's threads where torchdata 0.11 did, so a batch that never arrives cannot be turned into an error "
        f"and the loader waits for it. functrain.data is tested with {SUPPORTED}: install that, or pass timeout=None "
        "to silence this warning.",
        RuntimeWarning,
        stacklevel=4,
    )


def process_workers_unsupported() -> RuntimeError:
    """The error for a process-mode loader when the mapper's internals are not torchdata 0.11's."""
    return RuntimeError(
        "make_loader: worker_method='process' needs torchdata 0.11's ParallelMapper internals to notice a worker "
        f"process that dies (torchdata waits forever for its output), and torchdata {VERSION} keeps them "
        f"elsewhere. Use worker_method='thread', or install the torchdata functrain supports ({SUPPORTED})."
    )
