"""Callbacks: the loop's extension points, and the built-in ones.

A callback subclasses :class:`Callback` and overrides the events it cares about. Each event method
receives the :class:`~functrain.Loop` (progress, state, logs, history) and returns ``None`` or a new
state, which replaces the loop's state from then on: a callback changes training by returning a
value, not by mutating tensors. ``loop.stop(reason)`` ends training after the current event.

Callbacks run without host syncs of their own: per-step events see only counters, and metric
values reach callbacks in ``on_log`` / ``on_eval_end``, already read back by the loop in one sync.

Built-ins: :class:`ProgressBar` (tqdm), :class:`TensorBoard`, :class:`JSONLogger`,
:class:`Checkpoint` (periodic and best, keeping the last K), :class:`EarlyStopping`,
:class:`StopOnNonFinite`, :class:`Throughput` (samples/s, tokens/s, MFU, peak memory),
:class:`Profiler` (torch.profiler traces).
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import _tree, _validate, distributed
from .checkpoint import (
    _atomic_write,
    _create_temporary,
    _is_checkpoint,
    _remove,
    _sweep_temporaries,
    step_file_name,
    step_of_file,
)
from .compile_cache import COMPILE_CACHE, _compiled_so_far, load_compile_cache, save_compile_cache

if TYPE_CHECKING:
    from .loop import Loop


class Callback:
    """Base class: every event does nothing. Override the ones you need.

    Each event receives the loop and may return a new state (``None`` keeps the current one).
    A callback with progress of its own (a best value, a patience counter) returns it from
    ``state_dict`` so checkpoints carry it across a resume.

    Example:
        Halve an injected learning rate every 10 epochs:

        >>> import functrain as ft
        >>> class StepDecay(ft.Callback):
        ...     def on_epoch_end(self, loop):
        ...         if (loop.epoch + 1) % 10 == 0:
        ...             return ft.set_hyperparams(loop.state, lr=loop.logs["lr"] / 2)
    """

    #: Run only on rank 0 in data-parallel training (progress bars, logs); the loop skips it elsewhere.
    main_process_only: bool = False
    #: Adds entries to ``loop.logs`` in ``on_log``: the loop runs such callbacks before the others.
    provides_logs: bool = False

    def on_fit_start(self, loop: Loop) -> Any: ...

    def on_epoch_start(self, loop: Loop) -> Any: ...

    def on_log(self, loop: Loop) -> Any:
        """``loop.logs`` holds the running means since the last log, as floats."""

    def on_eval_end(self, loop: Loop) -> Any:
        """``loop.eval_logs`` holds the means over the evaluation set, as floats."""

    def on_step_end(self, loop: Loop) -> Any: ...

    def on_epoch_end(self, loop: Loop) -> Any: ...

    def on_fit_end(self, loop: Loop) -> Any: ...

    def on_exception(self, loop: Loop) -> None:
        """Training raised ``loop.exception`` (a KeyboardInterrupt too); it goes on to the caller after
        this event, in place of the events still to come. Close what the callback opened (a file, a
        progress bar, a tracker's run, a profiler); the state may be half-updated, so save nothing."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


# ----------------------------------------------------------------------------- monitoring a metric


def _monitored(owner: str, monitor: str) -> tuple[str, str]:
    """``"eval/loss"`` -> ("eval", "loss"); ``"loss"`` or ``"train/loss"`` -> ("train", "loss")."""
    split, _, name = monitor.rpartition("/")
    split = split or "train"
    _validate.one_of(owner, "monitor's split", split, ("train", "eval"))
    return split, name


def _value(owner: str, loop: Loop, split: str, name: str) -> float:
    logs = loop.eval_logs if split == "eval" else loop.logs
    if name not in logs:
        raise KeyError(f"{owner}: monitored metric {split}/{name} is not logged; {split} logs have {sorted(logs)}")
    return logs[name]


class _Best:
    """The best value of a monitored metric so far."""

    def __init__(self, owner: str, monitor: str, mode: str, min_delta: float = 0.0):
        _validate.one_of(owner, "mode", mode, ("min", "max"))
        self.owner, self.split, self.name = owner, *_monitored(owner, monitor)
        self.sign, self.min_delta, self.best = (1.0 if mode == "min" else -1.0), min_delta, math.inf

    def require_evaluation(self, loop: Loop, otherwise: str) -> None:
        """An ``eval/...`` monitor needs an evaluation in the fit; without one the callback would
        never act, silently: refuse before the first step, saying what to pass."""
        if self.split == "eval" and loop.evaluate_fn is None:
            raise ValueError(
                f"{self.owner}: monitor='eval/{self.name}' needs an evaluation, but this fit has none, so "
                f"{otherwise}: pass eval_step= and eval_loader= to fit (evaluate= to Loop), or monitor a "
                f"training metric such as 'loss'"
            )

    def improved(self, loop: Loop) -> bool:
        """Reads the monitored value and records it if it beats the best by more than ``min_delta``."""
        value = self.sign * _value(self.owner, loop, self.split, self.name)
        if value < self.best - self.min_delta:
            self.best = value
            return True
        return False


# ----------------------------------------------------------------------------- built-in callbacks


class StopOnNonFinite(Callback):
    """Stops training with a message when a logged loss is NaN or infinite.

    It reads the logged running means, so it costs no sync; a NaN anywhere in a log interval makes
    the mean NaN, and training stops at most ``log_every`` steps after the first bad step (pass
    ``log_every=1`` to stop at once). Every logged metric with ``loss`` in its name is checked.
    """

    def on_log(self, loop: Loop) -> None:
        bad = {k: v for k, v in loop.logs.items() if "loss" in k and not math.isfinite(v)}
        if bad:
            name, value = next(iter(bad.items()))
            reason = (
                f"StopOnNonFinite: the {name} is {value} in the {loop.log_every} steps up to step {loop.step}; "
                f"training stopped. Try a lower learning rate, gradient clipping (ft.clip_by_global_norm) or "
                f"ft.apply_if_finite to skip bad steps."
            )
            warnings.warn(reason, RuntimeWarning, stacklevel=2)
            loop.stop(reason)


class EarlyStopping(Callback):
    """Stops when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` checks.

    Args:
        monitor: ``"eval/<metric>"`` (checked after each evaluation) or ``"<metric>"`` /
            ``"train/<metric>"`` (checked at each log).
        mode: ``"min"`` or ``"max"``.
        patience: how many checks without improvement to allow.
        min_delta: the smallest change that counts as an improvement.
    """

    def __init__(self, monitor: str = "eval/loss", mode: str = "min", patience: int = 5, min_delta: float = 0.0):
        self.patience = _validate.integer("EarlyStopping", "patience", patience, 0)
        _validate.in_range("EarlyStopping", "min_delta", min_delta, 0.0, math.inf)
        self.tracker = _Best("EarlyStopping", monitor, mode, min_delta)
        self.waited = 0

    def on_fit_start(self, loop: Loop) -> None:
        self.tracker.require_evaluation(loop, "it would never stop training")

    def on_log(self, loop: Loop) -> None:
        if self.tracker.split == "train":
            self._check(loop)

    def on_eval_end(self, loop: Loop) -> None:
        if self.tracker.split == "eval":
            self._check(loop)

    def _check(self, loop: Loop) -> None:
        self.waited = 0 if self.tracker.improved(loop) else self.waited + 1
        if self.waited > self.patience:
            t = self.tracker
            best = t.sign * t.best
            loop.stop(f"EarlyStopping: {t.split}/{t.name} has not improved for {self.waited} checks (best {best:.6g})")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.tracker.best, "waited": self.waited}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.best, self.waited = state["best"], state["waited"]


class Checkpoint(Callback):
    """Saves checkpoints: periodic ones (``step-<n>.pt``, the last ``keep`` kept) and the best one (``best.pt``).

    Each file holds everything a resume needs (see :mod:`functrain.checkpoint`); pass
    ``resume=True`` to :func:`~functrain.fit` to continue from the latest. Before training starts
    the directory is created and test-written, so a bad path fails at once rather than after hours,
    and a ``monitor`` on ``eval/...`` without an evaluation in the fit is an error.
    A state with a NaN or infinite parameter is not saved (a warning says so), so the last
    checkpoint is always one worth resuming from.

    With ``compile_cache=True`` (the default), once the fit has compiled its step (or found it in a
    cache), each save first writes what ``torch.compile`` built so far to ``compile-cache.bin`` in the
    directory, when something was compiled since it was last written
    (:func:`~functrain.save_compile_cache`: one file, replaced atomically, never pruned; an eager fit
    writes none), and when training starts the file is loaded (:func:`~functrain.load_compile_cache`)
    before the first step: a resumed run, or the same script run again in another process or on
    another machine with the same software stack, finds its compiled step there instead of
    compiling it (the benchmark MLP's first step in 5 s instead of 21 s on 2 CPU cores). The numbers
    are the same either way. Rank 0 writes the file and every rank loads it: data-parallel ranks
    compile the same graphs (a sharded rank whose shards have other shapes than rank 0's compiles
    its own, as without the file). **The file is code** (compiled libraries that torch loads):
    resume from a directory someone else wrote with ``compile_cache=False``, or delete its
    ``compile-cache.bin``.

    A sharded state (``TrainState.create(model, tx, mesh=mesh)``) is saved sharded: each checkpoint
    is then a directory of the same name (``step-00000120.pt/``), in which every rank writes its own
    shards (see :func:`~functrain.save_checkpoint`); the rules below hold for those directories too.

    The directory may hold other files, and other runs may save there. Checkpoint deletes only:

    - periodic checkpoints beyond ``keep``, oldest step first, named exactly as it names them,
      ``step-`` and the step in 8 or more digits, zero-padded (``step-00000002.pt``; not
      ``step-2.pt`` or ``step-00000002-known-good.pt``), and, for a directory of that name, only one
      holding a sharded checkpoint's ``functrain.pt``;
    - at the start of training, the temporary files of a save (``.step-00000009.pt.functrain-<host>-
      <pid>-<random>.tmp``, and the same for ``best.pt``) whose process was killed: written on this
      host by a process id that no running process has. A save in flight in another live process
      is left alone; so is a temporary written on another host, which is named in a warning since
      it cannot be checked from here. A previous sharded checkpoint that an interrupted save had
      moved aside (``.best.pt.functrain-<host>-<pid>-<random>.old``) is removed only once a new one
      carries its name; until then a warning names it.

    Args:
        directory: where the files go.
        every_steps: save every this many steps (``None``: not by steps).
        every_epochs: save at the end of every this many epochs (``None``: not by epochs).
        keep: how many periodic checkpoints to keep (the oldest are deleted).
        monitor: save ``best.pt`` whenever this metric improves (``"eval/loss"``, ``"acc"``...).
        mode: ``"min"`` or ``"max"`` for ``monitor``.
        save_on_fit_end: also save when training ends (stopped early or at ``steps``).
        compile_cache: save the compiled steps beside the checkpoints and load them when training
            starts (see above).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        every_steps: int | None = None,
        every_epochs: int | None = 1,
        keep: int = 3,
        monitor: str | None = None,
        mode: str = "min",
        save_on_fit_end: bool = True,
        compile_cache: bool = True,
    ):
        self.directory = Path(directory)
        for name, value in (("every_steps", every_steps), ("every_epochs", every_epochs)):
            if value is not None:
                _validate.integer("Checkpoint", name, value, 1)
        self.every_steps, self.every_epochs = every_steps, every_epochs
        self.keep = _validate.integer("Checkpoint", "keep", keep, 1)
        self.best = None if monitor is None else _Best("Checkpoint", monitor, mode)
        self.save_on_fit_end = save_on_fit_end
        self.compile_cache = _validate.boolean("Checkpoint", "compile_cache", compile_cache)
        self._compiled_at_start: Any = None  # what the process had compiled when training started
        self.last_saved_step: int | None = None

    def on_fit_start(self, loop: Loop) -> None:
        if self.best is not None:
            self.best.require_evaluation(loop, "best.pt would never be written")
        if self.every_steps is not None and not loop.resumes_mid_epoch():
            # Said now, not after hours of training when the resume refuses the mid-epoch checkpoint.
            warnings.warn(
                f"Checkpoint(every_steps={self.every_steps}): the train loader ({type(loop.loader).__name__}) can "
                "neither save its position nor replay its order (a shuffled DataLoader draws a new one each pass), "
                "so a checkpoint saved mid-epoch cannot be resumed from: fit(resume=True) will refuse it. Use "
                "ft.data.make_loader(dataset, batch_size, ...), or save at epoch ends only (every_epochs=)",
                RuntimeWarning,
                stacklevel=3,
            )
        if self.compile_cache:  # on every rank, before the first step compiles
            load_compile_cache(self.directory / COMPILE_CACHE)
            self._compiled_at_start = _compiled_so_far() if distributed.is_main_process() else None
        if not distributed.is_main_process():
            return  # rank 0 writes; every rank takes part in each save (see save_checkpoint)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, probe = _create_temporary(self.directory / self._PROBE)
            os.close(fd)
            os.unlink(probe)
        except OSError as error:
            raise PermissionError(f"Checkpoint: cannot write checkpoints to '{self.directory}': {error}") from error
        _sweep_temporaries(self.directory, owns=self._owns)  # left by a process killed while saving

    def on_step_end(self, loop: Loop) -> None:
        if self.every_steps is not None and loop.step % self.every_steps == 0:
            self._save_periodic(loop)

    def on_epoch_end(self, loop: Loop) -> None:
        if self.every_epochs is not None and (loop.epoch + 1) % self.every_epochs == 0:
            self._save_periodic(loop)

    def on_fit_end(self, loop: Loop) -> None:
        if self.save_on_fit_end and self.last_saved_step != loop.step:
            self._save_periodic(loop)

    def on_log(self, loop: Loop) -> None:
        if self.best is not None and self.best.split == "train":
            self._save_if_best(loop)

    def on_eval_end(self, loop: Loop) -> None:
        if self.best is not None and self.best.split == "eval":
            self._save_if_best(loop)

    def _save_if_best(self, loop: Loop) -> None:
        if self.best.improved(loop) and self._finite(loop):
            self._save_compile_cache()
            loop.save(self.directory / "best.pt")

    def _save_periodic(self, loop: Loop) -> None:
        if not self._finite(loop):
            return
        self._save_compile_cache()
        loop.save(self.directory / step_file_name(loop.step))
        self.last_saved_step = loop.step
        if distributed.is_main_process():
            self._prune()

    def _save_compile_cache(self) -> None:
        """Writes the compile cache before the checkpoint, so that a checkpoint always finds the graphs
        compiled before it beside it. Only rank 0 writes; a failed write costs a warm start, not the run.

        Only once this fit has compiled something (or found it in a cache): an eager fit writes no compile
        cache, even in a process that compiled other things before it (a notebook, a test suite)."""
        if not (self.compile_cache and distributed.is_main_process()):
            return
        if self._compiled_at_start is not None:
            if _compiled_so_far() == self._compiled_at_start:
                return
            self._compiled_at_start = None  # from now on, something was: no need to look again
        try:
            save_compile_cache(self.directory / COMPILE_CACHE)
        except OSError as error:
            warnings.warn(
                f"Checkpoint: the compile cache was not saved ({error}); a resumed run will compile its step again",
                RuntimeWarning,
                stacklevel=4,
            )

    # The only names Checkpoint writes, and so the only files it ever deletes: anything else in the
    # directory (a backup named step-00000002-known-good.pt, an editor's .notes.tmp) is the user's.
    # It deletes the compile cache's temporaries of killed saves, never the compile cache itself.
    _PROBE = "probe"

    @classmethod
    def _owns(cls, name: str) -> bool:
        return name in ("best.pt", cls._PROBE, COMPILE_CACHE) or step_of_file(name) is not None

    def _prune(self) -> None:
        """Deletes the oldest periodic checkpoints beyond ``keep`` (in step order: past step 99999999 the
        names grow a digit, so name order is not step order)."""
        periodic = sorted(
            (step, path)
            for path in self.directory.iterdir()
            if (step := step_of_file(path.name)) is not None and _is_checkpoint(path)
        )
        for _, old in periodic[: -self.keep]:
            _remove(old)  # a file, or a sharded checkpoint's directory

    @staticmethod
    def _finite(loop: Loop) -> bool:
        floats = [t for t in _tree.leaves(loop.state) if isinstance(t, Tensor) and t.is_floating_point()]
        if floats and not bool(_tree.all_finite(floats)):  # a sync, but saving syncs anyway
            warnings.warn(
                f"Checkpoint: not saving step {loop.step}: the state holds NaN or inf", RuntimeWarning, stacklevel=3
            )
            return False
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"best": None if self.best is None else self.best.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.best is not None and state.get("best") is not None:
            self.best.best = state["best"]


def _logged_by_the_checkpoint(loop: Loop) -> list[tuple[str, dict[str, Any]]]:
    """The ``(split, logs)`` a resumed run's checkpoint recorded at its own step, train before eval.

    The interrupted run may have written records at that step after saving it (a kill between an
    epoch's last log and its end-of-epoch save); the resumed run writes those again. The ones written
    before the save are in the checkpoint's history, and only they are, so a log rebuilt from "before
    the checkpoint's step" plus these holds each record once.
    """
    return [(split, logs) for split in ("train", "eval") for logs in loop.history[split] if logs["step"] == loop.step]


class JSONLogger(Callback):
    """Appends one JSON object per log and per evaluation to ``path``: ``{"split": "train", "step": ..., "loss": ...}``.

    The file belongs to one run: a fresh run (step 0) starts it afresh, and a resumed run keeps the
    records its checkpoint had seen written and drops those the interrupted run wrote after saving it
    (past the checkpoint's step, or at that step after the save), so the file reads as one
    uninterrupted run, each record once. A last line cut short by a kill while writing it (no
    newline, not JSON) is dropped with a warning; a line that is not a record before the last one is
    an error naming it, and the file is left as it is. Non-finite values are written as the strings
    ``"nan"``, ``"inf"``, ``"-inf"`` (JSON has no such numbers).
    """

    main_process_only = True

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def on_fit_start(self, loop: Loop) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            return
        kept = self._kept(self._records(), loop) if loop.step > 0 else []
        text = "".join(_json_line(record) for record in kept)
        _atomic_write(self.path, lambda file: file.write(text.encode()))  # a kill now keeps the old log whole

    @staticmethod
    def _kept(records: list[dict[str, Any]], loop: Loop) -> list[dict[str, Any]]:
        if not loop.resumed:  # continuing from a state of its own: the records so far are this run's
            return [record for record in records if record["step"] <= loop.step]
        before = [record for record in records if record["step"] < loop.step]
        return before + [{"split": split, **logs} for split, logs in _logged_by_the_checkpoint(loop)]

    def _records(self) -> list[dict[str, Any]]:
        """The file's records; a torn last line is dropped, with a warning naming the bytes dropped."""
        *lines, tail = self.path.read_bytes().split(b"\n")  # tail: b"" when the file ends with a newline
        records = []
        for number, line in enumerate(lines, 1):
            record = _parse_record(line)
            if record is None:
                raise ValueError(
                    f"JSONLogger: line {number} of '{self.path}' is not a JSONLogger record ({line[:80]!r}): it was "
                    f"edited or written by another program. Move the file aside or fix that line, then resume."
                )
            records.append(record)
        torn = _parse_record(tail) if tail.strip() else {}
        if torn is None:
            warnings.warn(
                f"JSONLogger: '{self.path}' ends in a line cut short (a kill while writing it): dropping its "
                f"{len(tail)} bytes",
                RuntimeWarning,
                stacklevel=2,
            )
        elif torn:
            records.append(torn)  # complete but for its newline
        return records

    def on_log(self, loop: Loop) -> None:
        self._write({"split": "train", **loop.logs})

    def on_eval_end(self, loop: Loop) -> None:
        self._write({"split": "eval", **loop.eval_logs})

    def _write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as file:
            file.write(_json_line(record))


def _json_line(record: dict[str, Any]) -> str:
    record = {k: v if not isinstance(v, float) or math.isfinite(v) else str(v) for k, v in record.items()}
    return json.dumps(record) + "\n"


def _parse_record(line: bytes) -> dict[str, Any] | None:
    """A JSONLogger record (an object with a ``step``), or ``None`` when ``line`` is not one."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


class TensorBoard(Callback):
    """Writes the logged scalars (``train/<metric>``, ``eval/<metric>``, and the injected hyperparameters
    such as ``train/lr``) with ``torch.utils.tensorboard``. Needs the ``tensorboard`` package:
    ``pip install 'functrain[tensorboard]'``.

    On a resumed run, the events the interrupted run wrote after its checkpoint are hidden (TensorBoard's
    ``purge_step``), so the scalars read as one uninterrupted run, each step once. Events are flushed
    as they are logged: those written before a checkpoint survive a kill.
    """

    main_process_only = True

    def __init__(self, log_dir: str | os.PathLike):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError(
                "TensorBoard callback: the tensorboard package is not installed; "
                "pip install 'functrain[tensorboard]' (or pip install tensorboard)"
            ) from error
        self.log_dir, self._writer_cls, self.writer = str(log_dir), SummaryWriter, None

    def on_fit_start(self, loop: Loop) -> None:
        if not loop.resumed:  # continuing from a state of its own: its events so far are this run's
            self.writer = self._writer_cls(self.log_dir, purge_step=loop.step + 1 if loop.step else None)
            return
        # TensorBoard hides the earlier events at or past purge_step: those after the checkpoint, and those at
        # its step, which may have come after the save; the ones that came before it are written again.
        self.writer = self._writer_cls(self.log_dir, purge_step=loop.step)
        for split, logs in _logged_by_the_checkpoint(loop):
            self._write(split, logs)

    def on_log(self, loop: Loop) -> None:
        self._write("train", loop.logs)

    def on_eval_end(self, loop: Loop) -> None:
        self._write("eval", loop.eval_logs)

    def _write(self, split: str, logs: dict[str, Any]) -> None:
        for name, value in logs.items():
            if name not in ("step", "epoch"):
                self.writer.add_scalar(f"{split}/{name}", value, logs["step"])
        self.writer.flush()  # else queued for up to two minutes: a kill would lose events a checkpoint has seen

    def on_fit_end(self, loop: Loop) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    on_exception = on_fit_end  # what was written stays: the events are flushed at each log


class ProgressBar(Callback):
    """A tqdm progress bar: steps/s, ETA, and the last logged loss and learning rate.

    Quiet when stderr is not a terminal (tqdm's ``disable=None``), e.g. in CI logs; pass
    ``disable=False`` to force it on.
    """

    main_process_only = True

    def __init__(self, disable: bool | None = None):
        self.disable, self.bar = disable, None

    def on_fit_start(self, loop: Loop) -> None:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            warnings.warn("ProgressBar: tqdm is not installed (pip install tqdm); no progress bar", stacklevel=2)
            return
        total = loop.max_steps
        if total is None and loop.max_epochs is not None and loop.steps_per_epoch is not None:
            total = loop.max_epochs * loop.steps_per_epoch
        self.bar = tqdm(total=total, initial=loop.step, unit="step", dynamic_ncols=True, disable=self.disable)
        self.bar.set_description(f"epoch {loop.epoch}", refresh=False)

    def on_step_end(self, loop: Loop) -> None:
        if self.bar is not None:
            self.bar.update(1)  # host counters only: no sync

    def on_log(self, loop: Loop) -> None:
        if self.bar is not None:
            shown = {k: v for k, v in loop.logs.items() if k == "lr" or "loss" in k or k in _RATES}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def on_epoch_start(self, loop: Loop) -> None:
        if self.bar is not None:
            self.bar.set_description(f"epoch {loop.epoch}", refresh=False)

    def on_fit_end(self, loop: Loop) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    on_exception = on_fit_end  # the bar closes where training stopped


_RATES = ("samples_per_s", "tokens_per_s", "mfu")  # Throughput's entries the progress bar shows


def count_flops(step: Callable[[Any, Any], Any], state: Any, batch: Any) -> int:
    """The floating-point operations of one ``step(state, batch)``, counted by
    ``torch.utils.flop_counter.FlopCounterMode``: matrix products, convolutions and attention,
    forward and backward (what MFU counts; elementwise work, the optimiser's included, counts 0).

    The step runs once more for the count, eagerly (a compiled step under
    ``torch.compiler.set_stance("force_eager")``, as the counter sees only eager ops), on a copy of
    the state, so an in-place step leaves ``state`` untouched, and with the random number generators
    restored afterwards, so the training that follows is unchanged. Under ``torch.distributed``
    every rank must call it: the step's collectives run too.

    Args:
        step: a train step, e.g. from :func:`~functrain.make_train_step` (compiled or not).
        state: a state the step accepts.
        batch: a batch the step accepts; its shapes decide the count.

    Example:
        >>> import torch, torch.nn.functional as F, functrain as ft
        >>> model = torch.nn.Linear(32, 10, bias=False)
        >>> step = ft.make_train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), ft.sgd(0.1))
        >>> batch = (torch.randn(16, 32), torch.randn(16, 10))
        >>> state = ft.TrainState.create(model, ft.sgd(0.1))
        >>> ft.callbacks.count_flops(step, state, batch)  # 2*16*32*10 forward, as many for the weight's gradient
        20480
    """
    from torch.utils.flop_counter import FlopCounterMode

    copy = _tree.map(lambda leaf: leaf.clone() if isinstance(leaf, Tensor) else leaf, state)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices), torch.compiler.set_stance("force_eager"):
        with FlopCounterMode(display=False) as counter:
            step(copy, batch)
    return int(counter.get_total_flops())


def _leading_size(batch: Any) -> int:
    """The samples in a batch: the size of its first tensor's first dimension."""
    for leaf in _tree.leaves(batch):
        if isinstance(leaf, Tensor) and leaf.ndim > 0:
            return leaf.shape[0]
    raise ValueError(
        "Throughput: cannot tell how many samples the batch holds (it has no tensor with a dimension); "
        "pass samples=lambda batch: <its batch size>"
    )


class Throughput(Callback):
    """Samples/s, tokens/s, achieved FLOP/s, MFU and peak memory, added to each log.

    Rates are measured between logs: each log already waits for the device (it reads the running
    means back), so the time from one log to the next is the device's time for those steps, with no
    sync of its own. Every entry lands in ``loop.logs`` (so in ``history``, the progress bar, JSONL
    and TensorBoard): ``samples_per_s``, ``tokens_per_s`` (with ``tokens=``), ``flops_per_s`` and
    ``mfu`` (with ``step=`` or ``flops_per_step=``; ``mfu`` with ``peak_flops=`` too), and the peak
    memory: ``max_memory_gib`` (the CUDA caching allocator's peak since the last log) or, on the
    CPU, ``max_rss_gib`` (the process's peak resident memory so far).

    The first step of a fit (compilation, warm-up) is not counted, and an interval with an
    evaluation in it restarts at the evaluation's end. Under ``torch.distributed`` the samples,
    tokens and FLOP/s are the whole job's (each rank's times the world size: ranks train equal
    batches), ``mfu`` is per device; the callback runs on every rank (``count_flops`` runs the step's
    collectives), rank 0's progress bar and loggers show it.

    Args:
        samples: ``samples(batch) -> int``; default: the size of the batch's first tensor's first
            dimension. It should read shapes only: reading values would sync every step.
        tokens: ``tokens(batch) -> int``, e.g. ``lambda batch: batch[0].numel()`` for a language
            model's ``(inputs, targets)`` of shape (batch, sequence); default: no ``tokens_per_s``.
        step: the train step, whose FLOPs :func:`count_flops` counts once, at the first step.
        flops_per_step: the FLOPs of one step, if known (give it or ``step``, not both).
        peak_flops: the device's peak FLOP/s for the precision trained in (e.g. 989e12 for an H100
            SXM in bf16, dense); ``mfu`` is the achieved FLOP/s over it.

    Example:
        >>> import torch, torch.nn.functional as F, functrain as ft
        >>> model = torch.nn.Linear(8, 1)
        >>> step = ft.make_train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), ft.sgd(0.1))
        >>> data = [(torch.randn(32, 8), torch.randn(32, 1))] * 10
        >>> _, history = ft.fit(step, ft.TrainState.create(model, ft.sgd(0.1)), data, epochs=1, log_every=5,
        ...                     callbacks=[ft.callbacks.Throughput(step=step)], device="cpu")
        >>> sorted(k for k in history["train"][0] if "_per_s" in k)
        ['flops_per_s', 'samples_per_s']
    """

    provides_logs = True

    def __init__(
        self,
        *,
        samples: Callable[[Any], int] | None = None,
        tokens: Callable[[Any], int] | None = None,
        step: Callable[[Any, Any], Any] | None = None,
        flops_per_step: int | None = None,
        peak_flops: float | None = None,
    ):
        owner = "Throughput"
        for name, value in (("samples", samples), ("tokens", tokens), ("step", step)):
            if value is not None and not callable(value):
                raise TypeError(f"{owner}: {name} must be a function or None, got {type(value).__name__}: {value!r}")
        if step is not None and flops_per_step is not None:
            raise ValueError(f"{owner}: give step= (its FLOPs counted once) or flops_per_step=, not both")
        if flops_per_step is not None:
            _validate.integer(owner, "flops_per_step", flops_per_step, 1)
        if peak_flops is not None:
            _validate.in_range(owner, "peak_flops", peak_flops, low=0.0, low_open=True)
            if step is None and flops_per_step is None:
                raise ValueError(
                    f"{owner}: peak_flops= gives MFU from the FLOPs of a step: pass step= or flops_per_step="
                )
        self.samples, self.tokens, self.step = samples or _leading_size, tokens, step
        self.flops_per_step, self.peak_flops = flops_per_step, peak_flops

    def on_fit_start(self, loop: Loop) -> None:
        self._clock: float | None = None  # starts at the end of the fit's first step
        self._counted = loop.step  # the last step whose batch is counted
        self._steps = self._samples = self._tokens = 0
        if torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()

    def _count(self, loop: Loop) -> None:
        """Counts the steps since the last count; called from every event (a log comes before the
        step's ``on_step_end``). Host counters and shapes only."""
        if loop.step == self._counted:
            return
        self._counted = loop.step
        if self._clock is None:  # the fit's first step: compilation and warm-up, not counted
            if self.step is not None and self.flops_per_step is None:
                self.flops_per_step = count_flops(self.step, loop.state, self._batch(loop))
            self._clock = time.perf_counter()
            return
        batch = self._batch(loop)
        self._steps += 1
        self._samples += self.samples(batch)
        if self.tokens is not None:
            self._tokens += self.tokens(batch)

    @staticmethod
    def _batch(loop: Loop) -> Any:
        if loop.last_batch is None:
            raise ValueError(
                "Throughput: the loop was not given the step's batch; ft.fit passes it, a loop of your own "
                "passes it too: loop.step_end(state, metrics, batch)"
            )
        return loop.last_batch

    def on_step_end(self, loop: Loop) -> None:
        self._count(loop)

    def on_log(self, loop: Loop) -> None:
        self._count(loop)
        if self._steps == 0:
            return  # only the warm-up step since the last log
        now = time.perf_counter()
        seconds, world = now - self._clock, distributed.world_size()
        rates = {"samples_per_s": world * self._samples / seconds}
        if self.tokens is not None:
            rates["tokens_per_s"] = world * self._tokens / seconds
        if self.flops_per_step is not None:
            per_device = self.flops_per_step * self._steps / seconds
            rates["flops_per_s"] = world * per_device
            if self.peak_flops is not None:
                rates["mfu"] = per_device / self.peak_flops
        loop.logs.update({**rates, **_peak_memory()})
        self._restart(now)

    def on_eval_end(self, loop: Loop) -> None:
        self._count(loop)
        if self._clock is not None:
            self._restart(time.perf_counter())  # the evaluation's time is not training time

    def _restart(self, now: float) -> None:
        self._clock, self._steps, self._samples, self._tokens = now, 0, 0, 0


def _peak_memory() -> dict[str, float]:
    """The CUDA allocator's peak since the last call (then reset), or else the process's peak RSS."""
    if torch.cuda.is_initialized():
        peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        return {"max_memory_gib": peak}
    try:
        import resource
    except ImportError:  # Windows
        return {}
    # ru_maxrss: kibibytes on Linux, bytes on macOS.
    scale = 2**30 if os.uname().sysname == "Darwin" else 2**20
    return {"max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale}


class Profiler(Callback):
    """Records training steps with ``torch.profiler`` on its usual schedule and writes each recorded
    window as a trace that TensorBoard's profiler plugin and Perfetto (ui.perfetto.dev) open.

    The first ``wait`` steps run unrecorded, the next ``warmup`` steps are recorded and thrown away
    (the profiler's own start-up cost), and the ``active`` steps after them are kept; that cycle runs
    ``repeat`` times (0: until training ends). Each kept window becomes one Chrome-trace file
    ``<worker>.<time>.pt.trace.json`` in ``trace_dir``, with one ``ProfilerStep#N`` range per step
    (``N`` counts the steps since the fit started). The worker name holds the host, the process and,
    under ``torch.distributed``, the rank, so every rank writes its own file.

    Profiling costs time only in the recorded steps. Step boundaries are marked from host
    counters, so nothing syncs with the device.

    Args:
        trace_dir: the folder the traces are written to (created if missing).
        wait: steps run unrecorded before each window (an int >= 0).
        warmup: steps then recorded and discarded, the profiler's start-up (an int >= 0).
        active: steps kept in each window (an int >= 1).
        repeat: windows to record (an int >= 0; 0 records until the end).
        record_shapes: record each op's input shapes.
        profile_memory: record tensor allocations and frees (memory per op, and the memory view).
        with_stack: record the Python stack of each op (slower; shows source lines in the trace).
        memory_snapshot: on a CUDA device, also record the caching allocator's history (every
            allocation and free, with its stack) and write it at the end of each kept window as
            ``<worker>.step<N>.memory.pickle``, which https://pytorch.org/memory_viz opens; needs CUDA.

    Example:
        >>> import functrain as ft
        >>> profiler = ft.callbacks.Profiler("runs/profile", wait=5, warmup=1, active=3)
        >>> # ft.fit(step, state, loader, steps=100, callbacks=[profiler])
        >>> # then: tensorboard --logdir runs/profile, or open the .pt.trace.json file in Perfetto
    """

    def __init__(
        self,
        trace_dir: str | os.PathLike,
        *,
        wait: int = 1,
        warmup: int = 1,
        active: int = 3,
        repeat: int = 1,
        record_shapes: bool = True,
        profile_memory: bool = True,
        with_stack: bool = False,
        memory_snapshot: bool = False,
    ):
        owner = "Profiler"
        self.trace_dir = Path(trace_dir)
        self.wait = _validate.integer(owner, "wait", wait, 0)
        self.warmup = _validate.integer(owner, "warmup", warmup, 0)
        self.active = _validate.integer(owner, "active", active, 1)
        self.repeat = _validate.integer(owner, "repeat", repeat, 0)
        self.options = {
            "record_shapes": _validate.boolean(owner, "record_shapes", record_shapes),
            "profile_memory": _validate.boolean(owner, "profile_memory", profile_memory),
            "with_stack": _validate.boolean(owner, "with_stack", with_stack),
        }
        self.memory_snapshot = _validate.boolean(owner, "memory_snapshot", memory_snapshot)
        if self.memory_snapshot and not torch.cuda.is_available():
            raise ValueError(
                "Profiler: memory_snapshot records the CUDA caching allocator, and there is no CUDA device; "
                "profile_memory=True records the CPU's allocations in the trace"
            )
        self.profiler = None

    def on_fit_start(self, loop: Loop) -> None:
        import torch.profiler as tp

        self.trace_dir.mkdir(parents=True, exist_ok=True)
        activities = [tp.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(tp.ProfilerActivity.CUDA)
        rank = f".rank{distributed.rank()}" if distributed.world_size() > 1 else ""
        worker = f"{socket.gethostname()}.{os.getpid()}{rank}"
        write_trace = tp.tensorboard_trace_handler(str(self.trace_dir), worker_name=worker)

        def on_trace_ready(profiler) -> None:
            write_trace(profiler)
            if self.memory_snapshot:
                path = self.trace_dir / f"{worker}.step{profiler.step_num}.memory.pickle"
                torch.cuda.memory._dump_snapshot(str(path))

        if self.memory_snapshot:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self.profiler = tp.profile(
            activities=activities,
            schedule=tp.schedule(wait=self.wait, warmup=self.warmup, active=self.active, repeat=self.repeat),
            on_trace_ready=on_trace_ready,
            **self.options,
        )
        self.profiler.start()

    def on_step_end(self, loop: Loop) -> None:
        if self.profiler is not None:
            with warnings.catch_warnings():
                # torch's note that each window's events are cleared at its end: here each is written first.
                warnings.filterwarnings("ignore", message="Warning: Profiler clears events", category=UserWarning)
                self.profiler.step()  # a host counter: no sync

    def on_fit_end(self, loop: Loop) -> None:
        if self.profiler is not None:
            # Writes a window still open (training ended inside it, or an exception did); its last
            # ProfilerStep range, opened at the last step's end, is empty.
            self.profiler.stop()
            self.profiler = None
            if self.memory_snapshot:
                torch.cuda.memory._record_memory_history(enabled=None)  # stop recording

    on_exception = on_fit_end  # stop profiling (and recording) where training stopped: what ran is written


from .trackers import MLflow as MLflow, WandB as WandB  # noqa: E402  (optional extras: imported lazily inside)
