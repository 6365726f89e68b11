"""Watching a running pipeline, so that it fails with a precise error instead of hanging.

- :class:`Progress`: which worker is loading which sample of which batch, a small table in shared
  memory that the workers (threads or processes) write and the loader reads when a batch is late.
- :class:`Watchdog`: a thread beside the loader's running pipeline that notices a worker process
  that died (torchdata 0.11 then waits forever for its output) and a batch that does not arrive
  within the loader's ``timeout``; either way it stops the readers the loader waits on, so its wait
  ends, and leaves what happened for the loader to raise.
"""

from __future__ import annotations

import os
import threading
import time
from multiprocessing.sharedctypes import RawArray
from typing import Any, NamedTuple

from . import _torchdata

# A row of the table: the batch's sequence number + 1 (0: an empty row), the worker's pid and
# thread id, the sample it is on (or COLLATING, or SENT) and since when (time.monotonic_ns, one clock
# for every process of the machine).
_SEQ, _PID, _TID, _AT, _SINCE = range(5)
_COLUMNS = 5
COLLATING, SENT = -1, -2

_POLL_S = 0.05  # how often the watchdog looks: a 20 Hz wake-up costs microseconds


class Row(NamedTuple):
    seq: int
    pid: int
    tid: int
    at: int
    since_ns: int


class Progress:
    """Which worker is on which sample of which batch: one row per batch in flight.

    A ``RawArray`` of int64 in shared memory: worker processes (forked, spawned or forkserver-ed,
    it travels with the map function) write into the same table the loader reads, and an element
    write costs tens of nanoseconds, with no torch op (a thread's random-stream mode would see one).
    Batch ``seq`` (its epoch times the batches per epoch, plus its number) uses row ``seq % slots``;
    ``slots`` exceeds the batches the pipeline can hold in flight, so the rows of the batches being
    loaded never collide. Rows are diagnostics only: a torn read at worst names the wrong sample.
    """

    def __init__(self, slots: int, n_batches: int):
        self.slots, self.n_batches = slots, n_batches
        self.table = RawArray("q", slots * _COLUMNS)

    def seq(self, epoch: int, number: int) -> int:
        return epoch * self.n_batches + number

    def claim(self, epoch: int, number: int) -> int:
        """Marks batch (epoch, number) as this thread's; returns its row's offset (worker side)."""
        seq = self.seq(epoch, number)
        row = (seq % self.slots) * _COLUMNS
        table = self.table
        table[row + _PID], table[row + _TID] = os.getpid(), threading.get_native_id()
        table[row + _AT], table[row + _SINCE] = COLLATING, time.monotonic_ns()
        table[row + _SEQ] = seq + 1  # last: the row is whole before it names its batch
        return row

    def mark(self, row: int, at: int) -> None:
        """The worker of ``row`` is now on sample ``at`` (or COLLATING, SENT)."""
        self.table[row + _AT], self.table[row + _SINCE] = at, time.monotonic_ns()

    def rows(self) -> list[Row]:
        """The rows in use, oldest batch first (loader side)."""
        values = self.table[:]
        rows = [Row(values[i] - 1, *values[i + 1 : i + _COLUMNS]) for i in range(0, len(values), _COLUMNS)]
        return sorted(row for row in rows if row.seq >= 0)

    def batch(self, seq: int) -> tuple[int, int]:
        return divmod(seq, self.n_batches)


# ----------------------------------------------------------------------------- describing workers


def _process_state(pid: int) -> str | None:
    """What the kernel says a process is doing, when it is something a user should hear (Linux's
    /proc; None elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return None
    return {
        "T": "stopped",
        "t": "stopped by a debugger",
        "Z": "exited",
        "D": "blocked in uninterruptible I/O",
    }.get(state)


def _name(pid: int, tid: int) -> str:
    """A worker as a user can find it: a process by its pid (and its state), a thread by its name."""
    if pid != os.getpid():
        state = _process_state(pid)
        return f"worker process {pid}" + (f" ({state})" if state else "")
    thread = next((t for t in threading.enumerate() if t.native_id == tid), None)
    return f"thread {thread.name!r}" if thread is not None else f"thread {tid}"


def _doing(row: Row, progress: Progress, now_ns: int, waited: int) -> str:
    """What the worker of ``row`` does, the batch named unless it is the one waited for."""
    epoch, number = progress.batch(row.seq)
    of = "" if row.seq == waited else f" of batch {number} (epoch {epoch})"
    seconds = (now_ns - row.since_ns) / 1e9
    if row.at >= 0:
        return f"has been loading sample {row.at}{of} for {seconds:.1f} s"
    if row.at == COLLATING:
        return f"has been collating the samples{of} for {seconds:.1f} s"
    if row.seq == waited:
        return f"finished it {seconds:.1f} s ago, and it has not arrived since (stopped while sending it?)"
    return f"finished batch {number} (epoch {epoch}) {seconds:.1f} s ago"


def describe_late(progress: Progress, epoch: int, number: int, timeout: float, workers: list[Any]) -> str:
    """The timeout error's message: the batch, who is on it and on which sample, what the other
    workers are doing, and what to do."""
    now, seq = time.monotonic_ns(), progress.seq(epoch, number)
    rows = progress.rows()
    lines = [f"Loader: batch {number} of epoch {epoch} did not arrive within {timeout:g} s (make_loader's timeout=)."]
    mine = next((row for row in rows if row.seq == seq), None)
    if mine is None:
        lines.append("No worker had started it.")
    else:
        lines.append(f"Its {_name(mine.pid, mine.tid)} {_doing(mine, progress, now, seq)}.")
    latest = {(row.pid, row.tid): row for row in rows}  # a worker's newest row is what it is on now
    others = []
    for worker in workers:
        # A worker process runs the map function in its main thread, whose thread id is its pid.
        key = (worker.pid, worker.pid) if hasattr(worker, "pid") else (os.getpid(), worker.native_id)
        row = latest.get(key)
        if mine is None or key != (mine.pid, mine.tid):
            others.append(
                f"{_name(*key)} " + ("has loaded nothing" if row is None else _doing(row, progress, now, seq))
            )
    if others:
        lines.append(("Other workers: " if mine is not None else "Workers: ") + "; ".join(others) + ".")
    lines.append(
        "A __getitem__ or transform that never returns (a lock, a network or file-system read) or a stopped "
        "worker (SIGSTOP, a debugger) does this. The loader stopped its workers; the next iter() restarts them "
        "at this batch, and state_dict() resumes there. If a batch legitimately takes longer, pass a larger "
        "timeout= to make_loader, or timeout=None to wait forever."
    )
    return " ".join(lines)


def describe_death(worker: Any) -> str:
    code = worker.exitcode
    how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
    return (
        f"Loader: worker process {worker.pid} {how} before its epoch ended "
        "(out of memory? a crash in native code? os._exit in the dataset?)"
    )


# ----------------------------------------------------------------------------- the watchdog


class Watchdog(threading.Thread):
    """Watches a loader's running pipeline: when a worker process dies (``watch_deaths``) or the batch
    the loader waits for is more than ``timeout`` seconds late, it records why (``dead`` /
    ``late``) and stops the pipeline's readers, so that the loader's ``next()`` ends and it raises.

    The loader brackets each wait with :meth:`waiting` and :meth:`arrived`; the lock makes a batch
    that arrives just as the deadline passes either count as arrived or as late, never both.
    """

    def __init__(self, *, threaded, mapper, watch_deaths: bool, timeout: float | None, progress: Progress):
        super().__init__(daemon=True, name="functrain-data-watchdog")
        self.threaded, self.mapper, self.progress = threaded, mapper, progress
        self.watch_deaths, self.timeout = watch_deaths, timeout
        self.dead: Any = None  # the worker process that died
        self.late: str | None = None  # the timeout's message
        self._waiting: tuple[float, int, int] | None = None  # (since, epoch, number)
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self.start()

    def waiting(self, epoch: int, number: int) -> None:
        with self._lock:
            self._waiting = (time.monotonic(), epoch, number)

    def arrived(self) -> None:
        with self._lock:
            self._waiting = None

    def run(self) -> None:
        while not self._stop_event.wait(_POLL_S):
            if self.watch_deaths:
                # Stops the mapper's readers when a worker died (its iterator then ends); the loader's
                # close() then stops the other workers, after the readers, so no read is cut off midway.
                self.dead = _torchdata.dead_worker(self.mapper)
                if self.dead is not None:
                    return
            if self.timeout is not None and self._overdue():
                return

    def _overdue(self) -> bool:
        with self._lock:
            if self._waiting is None or time.monotonic() - self._waiting[0] <= self.timeout:
                return False
            _, epoch, number = self._waiting
            # Described before anything is stopped: the workers' states are the ones that caused it.
            self.late = describe_late(self.progress, epoch, number, self.timeout, _torchdata.workers(self.mapper))
            _torchdata.interrupt(self.threaded, self.mapper)
            return True

    def stop(self) -> None:
        """Ends the thread (within one poll; not waited for from the thread itself)."""
        self._stop_event.set()
        if self is not threading.current_thread():
            self.join(timeout=1)
