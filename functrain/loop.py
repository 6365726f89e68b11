"""The loop driver: :func:`fit`, and :class:`Loop`, the progress and event machinery it is built from.

``fit`` is short on purpose: when a project outgrows it (a GAN's two steps, a meta-learning inner
loop, a VAE with an annealed KL weight), copy it and keep using :class:`Loop`, which owns what
every loop needs: counting steps and epochs, running means of the metrics kept on the device and
read back once per log, evaluation, the callback events, and saving and restoring progress.

Events, in order: ``on_fit_start``; per epoch ``on_epoch_start``, then per step ``on_log`` (every
``log_every`` steps), ``on_eval_end`` (every ``eval_every`` steps), ``on_step_end``; at the end of
an epoch ``on_log`` (the steps not logged yet), ``on_eval_end`` (when evaluating once per epoch),
``on_epoch_end``; finally ``on_log`` (any steps not logged yet), ``on_eval_end`` (when evaluating
once per epoch and ``max_steps`` ended the last epoch early) and ``on_fit_end``. When training raises
(an error, a KeyboardInterrupt), ``on_exception`` comes instead of the events still to come, then
the exception goes on to the caller.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from . import _tree, _validate, distributed
from .callbacks import Callback, Checkpoint, ProgressBar, StopOnNonFinite
from .checkpoint import (
    _is_checkpoint,
    _load,
    _moved_aside_note,
    latest_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .wrappers import hyperparams

History = dict[str, list[dict[str, Any]]]


def default_device() -> torch.device:
    """CUDA when a GPU is available, else the CPU. Pass ``device=`` to :func:`fit` to choose another."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_device(tree: Any, device: torch.device | str) -> Any:
    """Every tensor in ``tree`` on ``device`` (copies issued asynchronously where the source is pinned)."""
    return _tree.map(lambda x: x.to(device, non_blocking=True) if isinstance(x, Tensor) else x, tree)


class MeanMetrics:
    """Running means of 0-d metric tensors, summed on their device: adding never waits for the device.

    Example:
        >>> import torch, functrain as ft
        >>> meter = ft.MeanMetrics()
        >>> for loss in (1.0, 2.0, 6.0):
        ...     meter.add({"loss": torch.tensor(loss)})
        >>> to_host(meter.means())  # one host sync for every metric together
        {'loss': 3.0}
    """

    def __init__(self):
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict[str, Tensor]) -> None:
        for name, value in metrics.items():
            if not isinstance(value, Tensor) or value.ndim != 0:
                raise TypeError(f"MeanMetrics: metric {name!r} must be a 0-d tensor, got {value!r}")
            value = value.detach().to(torch.float32 if value.device.type == "mps" else torch.float64)
            self.sums[name] = self.sums[name] + value if name in self.sums else value
            self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, Tensor]:
        """The means so far, still on the device."""
        return {name: total / self.counts[name] for name, total in self.sums.items()}

    def __len__(self) -> int:
        return max(self.counts.values(), default=0)

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums, self.counts = dict(state["sums"]), dict(state["counts"])


def to_host(tensors: dict[str, Tensor]) -> dict[str, float]:
    """0-d tensors as Python floats, read in a single device-to-host transfer.

    In data-parallel training the values are first averaged over the ranks (one all-reduce), so
    every rank logs the same numbers and callbacks (best checkpoint, early stopping) decide alike.
    """
    if not tensors:
        return {}
    device = next(iter(tensors.values())).device
    stacked = torch.stack([t.detach().to(device, torch.float64 if device.type != "mps" else torch.float32)
                           for t in tensors.values()])  # fmt: skip
    return dict(zip(tensors, distributed.mean_of_floats(stacked).tolist()))


class Loop:
    """A training loop's progress, its callbacks and its events; :func:`fit` is one user of it.

    Every event method takes the current state and returns it, after each callback has had the
    chance to replace it (a callback returns a new state, e.g. with a changed learning rate, or
    ``None``). Callbacks read the progress from the loop: ``step`` (steps taken), ``epoch``
    (counted from 0), ``batch`` (steps taken in this epoch), ``state``, ``metrics`` (the last
    step's metrics, on the device: reading them every step would sync), ``last_batch`` (the
    batch the last step trained on, when the driver passes it to :meth:`step_end`: :func:`fit`
    does), ``logs`` and ``eval_logs`` (the last logged means, as floats) and ``history``; they call
    ``loop.stop(why)`` to end training. Callbacks that add entries to the logs
    (``provides_logs = True``, e.g. :class:`~functrain.callbacks.Throughput`) run first, so every
    other callback sees those entries; the others run in the order given. A loop of your own that
    catches an exception from training calls ``loop.fail(exception)`` before re-raising it, as
    :func:`fit` does, so that callbacks close what they opened (trackers end their runs failed).

    Args:
        callbacks: :class:`~functrain.callbacks.Callback` objects, called in order.
        log_every: read the running means back to the host (one sync) every this many steps.
        loader: the training loader, whose position checkpoints save.
        evaluate: ``evaluate(state) -> {name: 0-d tensor}`` (means over the evaluation set).
        eval_every: evaluate every this many steps; ``None``: at the end of every epoch.
        max_steps: :attr:`finished` turns true after this many steps in all.
        max_epochs: :attr:`finished` turns true after this many epochs in all.

    Example:
        A loop of your own (here, two models trained in turn), with the same callbacks:

        >>> import torch, torch.nn.functional as F, functrain as ft
        >>> enc, dec = torch.nn.Linear(4, 2), torch.nn.Linear(2, 4)
        >>> tx = ft.inject_hyperparams(ft.sgd)(lr=0.1)
        >>> step_enc = ft.make_train_step(enc, lambda m, x: dec(m(x)).sub(x).pow(2).mean(), tx)
        >>> step_dec = ft.make_train_step(dec, lambda m, z: m(z).pow(2).mean(), tx)
        >>> class Halve(ft.Callback):  # changes a hyperparameter by returning a new state
        ...     def on_epoch_end(self, loop):
        ...         return tuple(ft.set_hyperparams(s, lr=0.5 * loop.logs["0.opt_state.lr"]) for s in loop.state)
        >>> loop = ft.Loop([Halve(), ft.callbacks.EarlyStopping("loss", patience=5)], log_every=2)
        >>> states = loop.fit_start((ft.TrainState.create(enc, tx), ft.TrainState.create(dec, tx)))
        >>> for epoch in range(2):
        ...     states = loop.epoch_start(states)
        ...     for x in torch.randn(4, 8, 4):
        ...         s_enc, m_enc = step_enc(states[0], x)
        ...         s_dec, m_dec = step_dec(states[1], torch.randn(8, 2))
        ...         states = loop.step_end((s_enc, s_dec), {"loss": m_enc["loss"], "dec_loss": m_dec["loss"]})
        ...     states = loop.epoch_end(states)
        >>> states = loop.fit_end(states)
        >>> len(loop.history["train"]), loop.step, float(ft.hyperparams(states[0])["lr"])
        (4, 8, 0.025)
    """

    def __init__(
        self,
        callbacks: Iterable[Callback] = (),
        *,
        log_every: int = 50,
        loader: Any = None,
        evaluate: Callable[[Any], dict[str, Tensor]] | None = None,
        eval_every: int | None = None,
        max_steps: int | None = None,
        max_epochs: int | None = None,
    ):
        callbacks = list(callbacks)
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"Loop: callbacks must be functrain.Callback objects, got {type(cb).__name__}")
        # Those adding to loop.logs first (a stable sort), so loggers and the progress bar see their entries.
        self.callbacks = sorted(callbacks, key=lambda cb: not cb.provides_logs)
        self.log_every = _validate.integer("Loop", "log_every", log_every, 1)
        self.eval_every = None if eval_every is None else _validate.integer("Loop", "eval_every", eval_every, 1)
        self.loader, self.evaluate_fn, self.max_steps, self.max_epochs = loader, evaluate, max_steps, max_epochs
        try:
            self.steps_per_epoch: int | None = len(loader)
        except TypeError:
            self.steps_per_epoch = None
        self.state: Any = None
        self.step = self.epoch = self.batch = 0
        self.epoch_finished = False  # true between the last batch of an epoch and the next epoch's start
        self.metrics: dict[str, Tensor] = {}
        self.last_batch: Any = None
        self.logs: dict[str, Any] = {}
        self.eval_logs: dict[str, Any] = {}
        self.history: History = {"train": [], "eval": []}
        self.stop_reason: str | None = None
        self.exception: BaseException | None = None  # what training raised, for on_exception
        self.resumed = False
        self.meter = MeanMetrics()
        self._final_progress: dict | None = None

    # ------------------------------------------------------------------------- progress

    def stop(self, reason: str) -> None:
        """Asks the loop to end after the current event; ``reason`` lands in ``history["stop_reason"]``."""
        self.stop_reason = reason

    @property
    def finished(self) -> bool:
        """Stopped by a callback, or ``max_steps`` / ``max_epochs`` reached."""
        return (
            self.stop_reason is not None
            or (self.max_steps is not None and self.step >= self.max_steps)
            or (self.max_epochs is not None and self.epoch >= self.max_epochs)
        )

    # ------------------------------------------------------------------------- events

    def fit_start(self, state: Any) -> Any:
        self.state = state
        if not self.resumed and isinstance(getattr(state, "step", None), Tensor):
            self.step = int(state.step)  # one sync, before training
        return self._emit("on_fit_start")

    def epoch_start(self, state: Any) -> Any:
        self.state, self.epoch_finished = state, False
        return self._emit("on_epoch_start")

    def step_end(self, state: Any, metrics: dict[str, Tensor], batch: Any = None) -> Any:
        """Counts the step, adds its metrics to the running means; logs and evaluates when due.
        ``batch``, the batch the step trained on, is kept as ``last_batch`` for callbacks that count
        samples (:class:`~functrain.callbacks.Throughput`); nothing reads its values."""
        self.state, self.metrics, self.last_batch = state, metrics, batch
        self.step += 1
        self.batch += 1
        self.meter.add(metrics)
        if self.step % self.log_every == 0:
            self.log()
        if self.evaluate_fn is not None and self.eval_every is not None and self.step % self.eval_every == 0:
            self.evaluate()
        return self._emit("on_step_end")

    def epoch_end(self, state: Any) -> Any:
        self.state, self.epoch_finished = state, True
        self.log()
        if self._evaluates_per_epoch():
            self.evaluate()
        self._emit("on_epoch_end")
        self.epoch, self.batch, self.epoch_finished = self.epoch + 1, 0, False
        return self.state

    def fit_end(self, state: Any) -> Any:
        self.state = state
        # A checkpoint saved now resumes before the partial log and the final evaluation below: a run
        # continued to a larger step budget logs and evaluates as one that never stopped here.
        self._final_progress = self.progress()
        self.log()
        if self._evaluates_per_epoch() and self.batch > 0 and self._budget_spent():
            self.evaluate()  # the last epoch was cut short: its end, and evaluation, never came
        if self.stop_reason is not None:
            self.history["stop_reason"] = self.stop_reason  # type: ignore[assignment]
        return self._emit("on_fit_end")

    def _evaluates_per_epoch(self) -> bool:
        return self.evaluate_fn is not None and self.eval_every is None

    def _budget_spent(self) -> bool:
        return self.max_steps is not None and self.step >= self.max_steps

    def log(self) -> None:
        """Reads the running means (and the injected hyperparameters) back in one sync; calls ``on_log``."""
        if len(self.meter) == 0:
            return
        values = to_host({**self.meter.means(), **hyperparams(self.state)})
        self.logs = {"step": self.step, "epoch": self.epoch, **values}
        self.history["train"].append(self.logs)
        self.meter = MeanMetrics()
        self._emit("on_log")

    def evaluate(self) -> None:
        """Runs ``evaluate(state)``, reads its means back in one sync, calls ``on_eval_end``."""
        self.eval_logs = {"step": self.step, "epoch": self.epoch, **to_host(self.evaluate_fn(self.state))}
        self.history["eval"].append(self.eval_logs)
        self._emit("on_eval_end")

    def fail(self, exception: BaseException) -> None:
        """Training raised ``exception``: every callback's ``on_exception`` closes what it opened (a
        tracker marks its run failed), then the caller re-raises it. A callback that raises here too
        is noted on ``exception`` (shown under its traceback), and the callbacks after it still run."""
        self.exception = exception
        for callback in self._active_callbacks():
            try:
                callback.on_exception(self)
            except Exception as error:
                name = type(callback).__name__
                exception.add_note(f"{name}.on_exception raised too: {type(error).__name__}: {error}")

    def _active_callbacks(self) -> Iterator[Callback]:
        main = distributed.is_main_process()
        # Progress bars and logs: rank 0 speaks for every rank.
        return (c for c in self.callbacks if main or not c.main_process_only)

    def _emit(self, event: str) -> Any:
        for callback in self._active_callbacks():
            new_state = getattr(callback, event)(self)
            if new_state is not None:
                try:
                    _tree.check_same_structure(new_state, self.state, "the returned state", "the loop's state")
                except _tree.TreeMismatchError as error:
                    raise TypeError(
                        f"{type(callback).__name__}.{event} must return a new state or None: {error}"
                    ) from None
                self.state = new_state
        return self.state

    # ------------------------------------------------------------------------- checkpoints

    def progress(self) -> dict[str, Any]:
        """Everything about the loop a resume needs (not the state, loader or RNGs: see :meth:`save`)."""
        if self._final_progress is not None:
            return self._final_progress
        seen: dict[str, int] = {}
        callbacks = {}
        for cb in self.callbacks:
            name = type(cb).__name__
            seen[name] = seen.get(name, 0) + 1
            callbacks[f"{name}.{seen[name]}"] = cb.state_dict()
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch": self.batch,
            "epoch_finished": self.epoch_finished,
            "history": {k: [dict(r) for r in v] for k, v in self.history.items() if k != "stop_reason"},
            "meter": self.meter.state_dict(),
            "callbacks": callbacks,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Saves the state, the loader's position, the RNG states and :meth:`progress` to one file."""
        return save_checkpoint(path, self.state, loader=self.loader, progress=self.progress())

    def restore(self, path: str | os.PathLike, like: Any) -> Any:
        """Loads a checkpoint written by :meth:`save` (restoring loader, RNGs, progress); returns the state.

        A checkpoint saved by another number of ranks (4, resumed on 2) restores the state (resharded),
        the step, the epoch, the history and the callbacks exactly; the loader positions and generators
        it holds are per rank and cannot apply, so a warning says what is not exact (see
        :meth:`_resume_on_other_ranks`).

        Raises:
            ValueError: the checkpoint was saved mid-epoch and the loader can neither be put at its
                position (no ``load_state_dict``) nor replay the epoch's order to skip the batches taken.
        """
        state, progress, saved_by = _load(path, like, loader=self.loader, restore_rng=True)
        self.step, self.epoch, self.batch = progress["step"], progress["epoch"], progress["batch"]
        if progress["epoch_finished"]:  # saved in on_epoch_end: carry on with the next epoch
            self.epoch, self.batch = self.epoch + 1, 0
        if saved_by != distributed.world_size():
            self._resume_on_other_ranks(path, saved_by)
        self._check_the_loader_can_continue(path)
        self.history = progress["history"]
        self.meter.load_state_dict(progress["meter"])
        seen: dict[str, int] = {}
        for cb in self.callbacks:
            name = type(cb).__name__
            seen[name] = seen.get(name, 0) + 1
            if f"{name}.{seen[name]}" in progress["callbacks"]:
                cb.load_state_dict(progress["callbacks"][f"{name}.{seen[name]}"])
        self.resumed = True
        return state

    def _resume_on_other_ranks(self, path: str | os.PathLike, saved_by: int) -> None:
        """Continues a run saved by ``saved_by`` ranks on this run's number: from the saved step and epoch,
        the epoch restarted from its first batch.

        Each rank's loader position counts batches of that rank's share of the data, and the shares
        change with the number of ranks, so no position carries over; nor do the per-rank random streams.
        Restarting the epoch trains again on the part of it already taken, once; the alternative,
        refusing, would strand a run on the hardware it started on, which is what resharding is for.
        This is what Lightning does with a checkpoint it cannot resume mid-epoch (it warns and restarts
        the epoch's data), and torchtitan's data loaders refuse to reshard their state at all.
        A loader with ``set_epoch`` (``ft.data`` loaders, like a ``DistributedSampler``) is put at the
        saved epoch's order, this rank's share of it.
        """
        lost = f"the {self.batch} batches per rank it had taken in epoch {self.epoch} are trained on again, " if (
            self._mid_epoch()
        ) else ""  # fmt: skip
        self.batch = 0
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.epoch)
        if not distributed.is_main_process():
            return  # one warning per run, not one per rank
        warnings.warn(
            f"fit: '{path}' was saved by {saved_by} ranks and resumes on {distributed.world_size()}: the state "
            f"(resharded), step {self.step}, epoch {self.epoch}, the history and the callbacks carry over exactly, "
            f"but not the per-rank loader positions and random generators: epoch {self.epoch} restarts from its "
            f"first batch ({lost}with this number of ranks' shares of the data), and the batch order and random "
            f"draws (dropout, augmentation) differ from an uninterrupted run's. Resume on {saved_by} ranks for a "
            f"bitwise exact continuation",
            RuntimeWarning,
            stacklevel=3,
        )

    # ------------------------------------------------------------------------- the training batches

    def epoch_batches(self) -> Iterable:
        """The training loader's batches still to come in this epoch: the loader itself, except after a
        resume mid-epoch from a loader that cannot save its position, where it is an iterator past the
        batches taken (see :meth:`restore`)."""
        if self.batch == 0 or _saves_its_position(self.loader):
            return self.loader
        return _skip(self.loader, self.batch)

    def _mid_epoch(self) -> bool:
        return self.batch > 0 and (self.steps_per_epoch is None or self.batch < self.steps_per_epoch)

    def resumes_mid_epoch(self) -> bool:
        """Whether a checkpoint saved mid-epoch can be resumed from exactly: the train loader saves its
        position (``state_dict``/``load_state_dict``), or replays the same batches in the same order."""
        return self.loader is None or _saves_its_position(self.loader) or _replays_in_order(self.loader)

    def _check_the_loader_can_continue(self, path: str | os.PathLike) -> None:
        """A resume mid-epoch needs the epoch's remaining batches: a loader with ``load_state_dict`` was put
        at its saved position; one whose every pass yields the same batches in the same order can skip
        those taken. Any other (a shuffled DataLoader draws a new order on each pass) cannot, and
        restarting its epoch would train on some batches twice: refused, before any work."""
        if self.loader is None or not self._mid_epoch():
            return
        if self.resumes_mid_epoch():
            return
        raise ValueError(
            f"Loop.restore: '{path}' was saved mid-epoch (after batch {self.batch} of epoch {self.epoch}), and the "
            f"train loader ({type(self.loader).__name__}) can neither save its position nor replay the same order "
            f"(a shuffled DataLoader draws a new one on every pass): resuming would repeat or skip batches. Use "
            f"ft.data.make_loader(dataset, batch_size, ...), whose position checkpoints save, or resume from a "
            f"checkpoint saved at an epoch's end (Checkpoint(..., every_epochs=1) writes those)."
        )


def _saves_its_position(loader: Any) -> bool:
    return hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict")


def _replays_in_order(loader: Any) -> bool:
    """Whether every pass over ``loader`` yields the same batches in the same order: a sequence of batches, or a
    DataLoader over a map-style dataset in index order (no shuffle, no sampler of its own). A dataset that
    draws random augmentations in worker processes is seeded afresh on each pass; that one cannot tell."""
    if isinstance(loader, Sequence):
        return True
    if not isinstance(loader, DataLoader):
        return False
    if loader.batch_sampler is None:  # batch_size=None: the sampler hands out the batches themselves
        return type(loader.sampler) is SequentialSampler
    return type(loader.batch_sampler) is BatchSampler and type(loader.batch_sampler.sampler) is SequentialSampler


def _skip(loader: Iterable, taken: int) -> Iterator:
    """An iterator over ``loader`` past its first ``taken`` batches, with every random generator as before.

    Starting a pass over a DataLoader draws its workers' seed from torch's generator, which the
    interrupted run drew at the epoch's start, before the state the checkpoint restored: drawing it
    again would shift every later dropout mask and shuffle.
    """
    generators = rng_state()
    iterator = iter(loader)
    for index in range(taken):
        if next(iterator, _END) is _END:
            raise ValueError(
                f"fit: the train loader yields {index} batches per epoch, but the checkpoint was saved after batch "
                f"{taken}: resume with the loader the run was saved with"
            )
    set_rng_state(generators)
    return iterator


_END = object()


def fit(
    step: Callable[[Any, Any], tuple[Any, dict[str, Tensor]]],
    state: Any,
    train_loader: Iterable,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    eval_step: Callable[[Any, Any], dict[str, Tensor]] | None = None,
    eval_loader: Iterable | None = None,
    eval_every: int | None = None,
    callbacks: Sequence[Callback] | None = None,
    checkpoint: Checkpoint | str | os.PathLike | None = None,
    resume: bool | str | os.PathLike = False,
    log_every: int = 50,
    device: torch.device | str | None = None,
) -> tuple[Any, History]:
    """Trains with ``step(state, batch) -> (state, metrics)`` over ``train_loader``; returns ``(state, history)``.

    Args:
        step: a train step, e.g. from :func:`~functrain.make_train_step` (compiled or not).
        state: the initial state (moved to ``device``).
        train_loader: any iterable of batches; one pass over it is one epoch. When it has
            ``state_dict`` / ``load_state_dict`` (a ``functrain.data`` loader), checkpoints save its
            position and a resume continues mid-epoch exactly. The loader counts a batch as
            consumed when it hands it out, so its state after an epoch's last batch points at the
            start of the next epoch. A loader without a position resumes mid-epoch only when every
            pass yields the same batches in the same order (a list of batches, a DataLoader without
            shuffle): the batches already taken are skipped (read and discarded). Any other loader
            (a shuffled DataLoader) resumes from an epoch's end; from a mid-epoch checkpoint it
            raises ``ValueError`` before training.
        epochs: train this many epochs in all. Give exactly one of ``epochs`` and ``steps``.
        steps: train until the state has taken this many steps in all (a resumed run stops where an
            uninterrupted one would).
        eval_step: e.g. from :func:`~functrain.make_eval_step`; the means of its
            metrics over ``eval_loader`` are logged as ``history["eval"]``.
        eval_loader: the evaluation batches; give both or neither of ``eval_step`` and ``eval_loader``.
        eval_every: evaluate every this many steps; default: at the end of every epoch, and at the end
            of training when ``steps`` ends it mid-epoch (the final state is always evaluated).
        callbacks: :class:`~functrain.Callback` objects; default: a progress bar and
            :class:`~functrain.callbacks.StopOnNonFinite`. A list you pass replaces the defaults.
        checkpoint: a :class:`~functrain.callbacks.Checkpoint`, or a directory (a checkpoint at the
            end of every epoch, keeping the last 3). Checked for writability before training starts.
            What ``torch.compile`` built is saved beside the checkpoints (``compile-cache.bin``) and
            loaded before the first step, so a compiled step resumed in a new process, or run again
            on another machine with the same software stack, is not compiled again (see
            :func:`~functrain.save_compile_cache`; ``Checkpoint(..., compile_cache=False)`` turns it off).
        resume: ``True``: continue from the latest checkpoint in the directory of ``checkpoint`` (or of
            a ``Checkpoint`` among the callbacks) if there is one; or the path of a checkpoint (a file,
            or a sharded checkpoint's directory), or of a directory to take the latest checkpoint from.
            A run resumed on the number of ranks that saved it continues bit for bit; one resumed on
            another number (a sharded state saved on 4 ranks, resumed on 2) continues from the saved
            state, step and epoch, with the epoch restarted from its first batch and a warning saying
            what is not exact (the batch order and the random draws).
        log_every: read the running means of the metrics back from the device every this many steps
            (the only host syncs of the loop), and at the end of each epoch.
        device: where the state and batches live; default :func:`default_device`.

    Returns:
        The final state and the history: ``{"train": [{"step", "epoch", "loss", ..., "lr"}, ...],
        "eval": [...]}``, plus ``"stop_reason"`` when a callback stopped training.

    Example:
        >>> import torch, torch.nn.functional as F, functrain as ft
        >>> model = torch.nn.Linear(3, 1)
        >>> loss_fn = lambda m, b: F.mse_loss(m(b[0]), b[1])
        >>> tx = ft.inject_hyperparams(ft.sgd)(lr=0.1)
        >>> data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(4)]
        >>> state, history = ft.fit(ft.make_train_step(model, loss_fn, tx), ft.TrainState.create(model, tx), data,
        ...                         epochs=3, eval_step=ft.make_eval_step(model, loss_fn), eval_loader=data[:1],
        ...                         callbacks=[], device="cpu")
        >>> int(state.step), len(history["train"]), len(history["eval"]), history["train"][0]["lr"]
        (12, 3, 3, 0.1)
    """
    if (epochs is None) == (steps is None):
        raise ValueError(f"fit: give exactly one of epochs and steps, got epochs={epochs}, steps={steps}")
    _validate.integer("fit", "epochs" if steps is None else "steps", epochs if steps is None else steps, 1)
    if (eval_step is None) != (eval_loader is None):
        raise ValueError("fit: eval_step and eval_loader go together: give both or neither")
    device = default_device() if device is None else torch.device(device)
    callbacks = [StopOnNonFinite(), ProgressBar()] if callbacks is None else list(callbacks)
    if checkpoint is not None:
        checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
        callbacks.append(checkpoint)

    def evaluate(state):
        meter = MeanMetrics()
        for batch in eval_loader:
            meter.add(eval_step(state, to_device(batch, device)))
        return meter.means()

    loop = Loop(
        callbacks,
        log_every=log_every,
        loader=train_loader,
        evaluate=evaluate if eval_step is not None else None,
        eval_every=eval_every,
        max_steps=steps,
        max_epochs=epochs,
    )
    state = to_device(state, device)
    if resume is not False:
        path = _resume_path(resume, next((c for c in callbacks if isinstance(c, Checkpoint)), None))
        if path is not None:
            state = loop.restore(path, like=state)

    try:
        state = loop.fit_start(state)
        while not loop.finished:
            if loop.batch == 0:  # not again when resuming mid-epoch
                state = loop.epoch_start(state)
            if loop.steps_per_epoch is None or loop.batch < loop.steps_per_epoch:  # else: resumed after its last step
                for batch in loop.epoch_batches():  # after a resume mid-epoch: the rest of that epoch
                    batch = to_device(batch, device)
                    state, metrics = step(state, batch)
                    state = loop.step_end(state, metrics, batch)
                    if loop.finished:
                        break
            at_epoch_end = loop.steps_per_epoch is not None and loop.batch >= loop.steps_per_epoch
            if loop.finished and not at_epoch_end:
                break  # stopped mid-epoch; a run whose last step ends an epoch still ends that epoch (and evaluates)
            if loop.batch == 0:
                raise ValueError("fit: train_loader yielded no batches")
            state = loop.epoch_end(state)
        state = loop.fit_end(state)
    except BaseException as exception:  # KeyboardInterrupt too: trackers mark the run killed, bars close
        loop.fail(exception)
        raise
    return state, loop.history


def _resume_path(resume: bool | str | os.PathLike, checkpoint: Checkpoint | None) -> Path | None:
    if resume is True:
        if checkpoint is None:
            raise ValueError("fit: resume=True continues from the checkpoint directory: pass checkpoint= as well")
        return latest_checkpoint(checkpoint.directory)  # None: nothing saved yet, start afresh
    path = Path(resume)
    if _is_checkpoint(path):
        return path
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"fit: no step-<n>.pt checkpoint in the directory '{path}' to resume from")
        return found
    raise FileNotFoundError(f"fit: no checkpoint file at '{path}' to resume from{_moved_aside_note(path)}")
