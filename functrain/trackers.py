"""Experiment-tracker callbacks: :class:`MLflow` and :class:`WandB`, optional extras.

Both log what the loop logs: ``loop.logs`` as ``train/<metric>`` and ``loop.eval_logs`` as
``eval/<metric>``, at the step the loop logged them (the injected hyperparameters, such as
``train/lr``, among them), plus the hyperparameters you pass as ``params``. The values are the floats
the loop already read back in its one sync per log, so a tracker adds no host sync.

They run on rank 0 only (``main_process_only``). The run's id is part of the callback's
``state_dict``, so a checkpoint carries it and a resumed fit (``fit(..., resume=True)``) continues
the same run. ``mlflow`` and ``wandb`` are imported when a tracker is built, never by
``import functrain``: ``pip install "functrain[mlflow]"`` or ``pip install "functrain[wandb]"``.

With ``log_checkpoints=True``, each file a :class:`~functrain.callbacks.Checkpoint` of the same fit
writes (``step-<n>.pt``, ``best.pt``) is logged as an artifact once written. The tracker notices a
save after the Checkpoint's event has run, so the Checkpoint must come before the tracker in the
callbacks (``fit(checkpoint=...)`` appends it last; pass it in ``callbacks=`` instead).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _validate
from .callbacks import Callback, Checkpoint
from .checkpoint import step_file_name

if TYPE_CHECKING:
    from .loop import Loop

_NOT_METRICS = ("step", "epoch")  # the x-axis, not values to plot (as in TensorBoard)


def _check_params(owner: str, params: Any) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
        raise TypeError(f"{owner}: params must be a dict with str keys (hyperparameters to record), got {params!r}")
    return dict(params)


def _flat(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"opt": {"lr": 0.1}}`` -> ``{"opt.lr": 0.1}``: MLflow's params are flat."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _optional_str(owner: str, name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{owner}: {name} must be a str or None, got {type(value).__name__}: {value!r}")
    return value


def _fingerprint(path: Path) -> tuple[int, int, int] | None:
    """Changes when ``path`` is written again (a sharded checkpoint's directory is replaced, a new inode)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


class _Tracker(Callback):
    """What both trackers share: the events, the run id in the state, and following a Checkpoint's files."""

    main_process_only = True
    _owner = "tracker"

    def __init__(self, params: Any, log_checkpoints: bool):
        self.params = _check_params(self._owner, params)
        self.log_checkpoints = _validate.boolean(self._owner, "log_checkpoints", log_checkpoints)
        self.run_id: str | None = None
        self._checkpoints: list[tuple[Checkpoint, Any, Any]] = []  # (callback, last saved step, files seen)

    # The subclasses' part.
    def _start(self, loop: Loop, continuing: bool) -> None: ...
    def _log(self, step: int, metrics: dict[str, float]) -> None: ...
    def _log_checkpoint(self, path: Path) -> None: ...
    def _finish(self, loop: Loop) -> None: ...
    def _open(self) -> bool: ...  # a run started and not finished
    def _fail(self, exception: BaseException) -> None: ...  # ends the open run as failed (killed: interrupted)

    def on_fit_start(self, loop: Loop) -> None:
        if self.log_checkpoints:
            self._follow_checkpoints(loop.callbacks)
        # The same run when resumed from a checkpoint that carries its id, or when this callback goes on
        # training a state of its own (a second fit to more steps); a fit from step 0 is a new run.
        self._start(loop, continuing=self.run_id is not None and loop.step > 0)

    def on_log(self, loop: Loop) -> None:
        self._write("train", loop.logs)
        self._check_checkpoints()

    def on_eval_end(self, loop: Loop) -> None:
        self._write("eval", loop.eval_logs)
        self._check_checkpoints()

    def on_step_end(self, loop: Loop) -> None:
        if self._checkpoints:
            self._check_checkpoints(look=False)

    def on_epoch_end(self, loop: Loop) -> None:
        self._check_checkpoints()

    def on_fit_end(self, loop: Loop) -> None:
        self._check_checkpoints()
        self._finish(loop)

    def on_exception(self, loop: Loop) -> None:
        if not self._open():
            return  # failed before the run started, or after it finished
        try:
            self._check_checkpoints()  # the files written before the failure are logged too
        finally:
            self._fail(loop.exception)

    def _write(self, split: str, logs: dict[str, Any]) -> None:
        metrics = {f"{split}/{name}": value for name, value in logs.items() if name not in _NOT_METRICS}
        if metrics:
            self._log(logs["step"], metrics)

    # ------------------------------------------------------------------------- checkpoints as artifacts

    def _follow_checkpoints(self, callbacks: Sequence[Callback]) -> None:
        mine = next(i for i, cb in enumerate(callbacks) if cb is self)
        if not any(isinstance(cb, Checkpoint) for cb in callbacks):
            raise ValueError(
                f"{self._owner}: log_checkpoints=True logs the files a ft.callbacks.Checkpoint writes, but this fit "
                f"has none: pass callbacks=[ft.callbacks.Checkpoint(directory, ...), ft.callbacks.{self._owner}(...)]"
            )
        if any(isinstance(cb, Checkpoint) for cb in callbacks[mine + 1 :]):
            raise ValueError(
                f"{self._owner}: log_checkpoints=True logs each checkpoint once its Checkpoint callback has written "
                f"it, so the Checkpoint must come before {self._owner} in the callbacks; fit(checkpoint=...) appends "
                f"it last. Pass callbacks=[ft.callbacks.Checkpoint(directory, ...), ft.callbacks.{self._owner}(...)] "
                f"instead (fit(resume=True) finds the Checkpoint there)"
            )
        self._checkpoints = [
            (cb, cb.last_saved_step, self._files(cb)) for cb in callbacks[:mine] if isinstance(cb, Checkpoint)
        ]

    @staticmethod
    def _files(checkpoint: Checkpoint) -> tuple[Any, Any]:
        """Fingerprints of the Checkpoint's last periodic file and of its best.pt."""
        step = checkpoint.last_saved_step
        periodic = None if step is None else _fingerprint(checkpoint.directory / step_file_name(step))
        return periodic, _fingerprint(checkpoint.directory / "best.pt")

    def _check_checkpoints(self, *, look: bool = True) -> None:
        """Logs the files the Checkpoints wrote since the last check: a new periodic one, one saved again at
        the same step (an epoch's end after a save by steps), a new best.pt. Without ``look`` (after each
        step) only a new step counts: no file is read."""
        for index, (checkpoint, saved_step, seen) in enumerate(self._checkpoints):
            if checkpoint.last_saved_step == saved_step and not look:
                continue
            files = self._files(checkpoint)
            if checkpoint.last_saved_step is not None and files[0] not in (None, seen[0]):
                self._log_checkpoint(checkpoint.directory / step_file_name(checkpoint.last_saved_step))
            if files[1] not in (None, seen[1]):
                self._log_checkpoint(checkpoint.directory / "best.pt")
            self._checkpoints[index] = (checkpoint, checkpoint.last_saved_step, files)

    # ------------------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id")


def _interrupted(exception: BaseException) -> bool:
    """Stopped from outside (Ctrl-C, a SystemExit from a signal handler) rather than failed."""
    return isinstance(exception, (KeyboardInterrupt, SystemExit))


def _describe(exception: BaseException) -> str:
    return f"{type(exception).__name__}: {exception}"[:5000]  # MLflow keeps tag values up to 8000 characters


def _is_uri(tracking_uri: str | os.PathLike) -> bool:
    return isinstance(tracking_uri, str) and ("://" in tracking_uri or tracking_uri.startswith("databricks"))


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class MLflow(_Tracker):
    """Logs the training and evaluation metrics, the hyperparameters and optionally the checkpoints to an
    MLflow run. Needs MLflow: ``pip install "functrain[mlflow]"``.

    The metrics are ``train/<metric>`` (each log; the injected hyperparameters, e.g. ``train/lr``, among
    them) and ``eval/<metric>`` (each evaluation), at the loop's step (MLflow stores an infinite value
    as +-1.8e308); ``params`` become the run's params (nested dicts flattened to ``outer.inner``). The
    run ends ``FINISHED`` when the fit ends, stopped early or not (a callback's reason is the tag
    ``functrain.stop_reason``). A fit ended by an exception ends it ``FAILED``, or ``KILLED`` when
    interrupted (KeyboardInterrupt, SystemExit), with the exception in the tag
    ``functrain.exception``; resuming from a checkpoint continues the run (``RUNNING`` again). A
    process killed outright (SIGKILL, out of memory) leaves it ``RUNNING``.

    The run's id is saved in checkpoints: a resumed fit continues the same run. MLflow keeps every point
    logged, so the steps the interrupted run logged after its last checkpoint appear twice, logged again
    by the resumed run (with the same values: a resume on the same number of ranks is exact). When the
    tracking store no longer holds the run, a warning says so and a new run starts.

    Args:
        tracking_uri: where runs are stored. A local directory (a path, the default ``"mlruns"``): a SQLite
            store ``<directory>/mlflow.db`` with the artifacts in ``<directory>/artifacts``, all offline;
            ``mlflow ui --backend-store-uri sqlite:///<directory>/mlflow.db`` (the full ``mlflow``
            package) shows them. A URI (``"http://host:5000"``, ``"sqlite:///runs.db"``,
            ``"databricks"``): that tracking server or store. ``None``: MLflow's own default
            (``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory).
        experiment: the experiment's name; created when missing.
        run_name: the run's name (``None``: one MLflow makes up).
        params: hyperparameters to record, ``{name: value}``.
        tags: the run's tags, ``{name: value}``.
        log_checkpoints: log each file a :class:`~functrain.callbacks.Checkpoint` earlier in the callbacks
            writes as an artifact under ``checkpoints/``. MLflow keeps them all: the Checkpoint's ``keep``
            prunes only its own directory.

    Example:
        >>> import functrain as ft
        >>> tracker = ft.callbacks.MLflow("runs/mlflow", params={"lr": 1e-3})  # doctest: +SKIP
        >>> # ft.fit(step, state, loader, steps=1000, callbacks=[tracker])
        >>> # then: mlflow ui --backend-store-uri sqlite:///runs/mlflow/mlflow.db
    """

    _owner = "MLflow"

    def __init__(
        self,
        tracking_uri: str | os.PathLike | None = "mlruns",
        *,
        experiment: str = "functrain",
        run_name: str | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        log_checkpoints: bool = False,
    ):
        try:
            import mlflow
            import mlflow.entities
            import mlflow.exceptions
            import mlflow.tracking
        except ImportError as error:
            raise ImportError(
                'MLflow callback: the mlflow package is not installed; pip install "functrain[mlflow]" '
                "(or pip install mlflow)"
            ) from error
        super().__init__(params, log_checkpoints)
        owner = self._owner
        if tracking_uri is not None and not isinstance(tracking_uri, (str, os.PathLike)):
            raise TypeError(
                f"{owner}: tracking_uri must be a directory, a tracking URI or None, got "
                f"{type(tracking_uri).__name__}: {tracking_uri!r}"
            )
        if not isinstance(experiment, str) or not experiment:
            raise ValueError(f"{owner}: experiment must be a non-empty str (the experiment's name), got {experiment!r}")
        if tags is not None and (not isinstance(tags, Mapping) or not all(isinstance(k, str) for k in tags)):
            raise TypeError(f"{owner}: tags must be a dict with str keys, got {tags!r}")
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.run_name = _optional_str(owner, "run_name", run_name)
        self.tags = {} if tags is None else {k: str(v) for k, v in tags.items()}
        self._mlflow = mlflow
        self.client = None

    def _store(self) -> tuple[str | None, str | None]:
        """The tracking URI to use, and where a new experiment keeps its artifacts (``None``: the store's choice)."""
        if self.tracking_uri is None or _is_uri(self.tracking_uri):
            return self.tracking_uri, None
        directory = Path(self.tracking_uri).absolute()
        directory.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{directory / 'mlflow.db'}", (directory / "artifacts").as_uri()

    def _start(self, loop: Loop, continuing: bool) -> None:
        mlflow = self._mlflow
        uri, artifacts = self._store()
        self.client = client = mlflow.tracking.MlflowClient(uri)
        if continuing:
            try:
                client.get_run(self.run_id)
            except mlflow.exceptions.MlflowException as error:
                if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                warnings.warn(
                    f"MLflow: the checkpoint's run {self.run_id} is not in the tracking store {client.tracking_uri}; "
                    f"starting a new run. Pass the tracking_uri the run was logged to, to continue it",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continuing = False
        if continuing:
            client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = client.get_experiment_by_name(self.experiment)
            experiment_id = (
                client.create_experiment(self.experiment, artifact_location=artifacts)
                if experiment is None
                else experiment.experiment_id
            )
            self.run_id = client.create_run(experiment_id, run_name=self.run_name).info.run_id
        entities = mlflow.entities
        params = [entities.Param(k, str(v)) for k, v in _flat(self.params).items()]
        tags = [entities.RunTag(k, v) for k, v in self.tags.items()]
        for chunk in _chunks(params, 100):  # MLflow takes at most 100 params per call
            client.log_batch(self.run_id, params=chunk)
        if tags:
            client.log_batch(self.run_id, tags=tags)

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        batch = [self._mlflow.entities.Metric(k, float(v), now, step) for k, v in metrics.items()]
        for chunk in _chunks(batch, 1000):  # MLflow takes at most 1000 metrics per call
            self.client.log_batch(self.run_id, metrics=chunk)

    def _log_checkpoint(self, path: Path) -> None:
        if path.is_dir():  # a sharded checkpoint
            self.client.log_artifacts(self.run_id, str(path), f"checkpoints/{path.name}")
        else:
            self.client.log_artifact(self.run_id, str(path), "checkpoints")

    def _finish(self, loop: Loop) -> None:
        if loop.stop_reason is not None:
            self.client.set_tag(self.run_id, "functrain.stop_reason", loop.stop_reason)
        self.client.set_terminated(self.run_id, "FINISHED")
        self.client = None  # the run is over: nothing more goes to it

    def _open(self) -> bool:
        return self.client is not None

    def _fail(self, exception: BaseException) -> None:
        self.client.set_tag(self.run_id, "functrain.exception", _describe(exception))
        self.client.set_terminated(self.run_id, "KILLED" if _interrupted(exception) else "FAILED")
        self.client = None


class WandB(_Tracker):
    """Logs the training and evaluation metrics, the hyperparameters and optionally the checkpoints to a
    Weights & Biases run. Needs wandb: ``pip install "functrain[wandb]"``.

    The metrics are ``train/<metric>`` (each log; the injected hyperparameters, e.g. ``train/lr``, among
    them) and ``eval/<metric>`` (each evaluation), logged at the loop's step (``run.log(..., step=)``);
    ``params`` become the run's config. The run finishes when the fit ends (a callback's reason for
    stopping is the summary's ``stop_reason``). The run is ``callback.run``, for logging values of
    your own (``callback.run.log({...})``); it is not made ``wandb.run`` (``reinit="create_new"``), so
    a run you started yourself is left alone.

    The run's id is saved in checkpoints: a resumed fit continues the same run
    (``wandb.init(id=..., resume="allow")``). Online, W&B keeps a run's steps increasing, so the steps
    the interrupted run logged after its last checkpoint keep their first values and the resumed run's
    logs of them are dropped (wandb warns). Offline, the resumed part is written to a directory of its
    own, under the same run id.

    A fit ended by an exception finishes the run with exit code 1 (130 when interrupted: a
    KeyboardInterrupt or SystemExit), the exception in its summary as ``exception``; resuming from a
    checkpoint continues the run.

    Args:
        project: the W&B project (``None``: ``WANDB_PROJECT``, else wandb's default).
        entity: the user or team the project belongs to (``None``: your default).
        name: the run's display name (``None``: one wandb makes up).
        directory: where wandb writes the run's files (``None``: ``WANDB_DIR``, else ``./wandb``).
        mode: ``"online"``, ``"offline"`` (sync later with ``wandb sync``), ``"disabled"``, ``"shared"``,
            or ``None`` (``WANDB_MODE``, else online).
        params: hyperparameters to record, ``{name: value}`` (the run's config; may be nested).
        tags: the run's tags, a list of strings.
        log_checkpoints: log each file a :class:`~functrain.callbacks.Checkpoint` earlier in the callbacks
            writes as a version of the ``model`` artifact ``checkpoints-<run id>``, aliased ``latest`` or
            ``best`` and by its file name. W&B keeps them all: the Checkpoint's ``keep`` prunes only its
            own directory.
        settings: a ``wandb.Settings`` (or a dict of settings) for ``wandb.init``, e.g.
            ``{"console": "off"}``.

    Example:
        >>> import functrain as ft
        >>> tracker = ft.callbacks.WandB("my-project", params={"lr": 1e-3}, mode="offline")  # doctest: +SKIP
        >>> # ft.fit(step, state, loader, steps=1000, callbacks=[tracker])
        >>> # then, online: wandb sync wandb/offline-run-*
    """

    _owner = "WandB"
    _MODES = (None, "online", "offline", "disabled", "shared")

    def __init__(
        self,
        project: str | None = None,
        *,
        entity: str | None = None,
        name: str | None = None,
        directory: str | os.PathLike | None = None,
        mode: str | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Sequence[str] = (),
        log_checkpoints: bool = False,
        settings: Any = None,
    ):
        try:
            import wandb
        except ImportError as error:
            raise ImportError(
                'WandB callback: the wandb package is not installed; pip install "functrain[wandb]" '
                "(or pip install wandb)"
            ) from error
        super().__init__(params, log_checkpoints)
        owner = self._owner
        self.project = _optional_str(owner, "project", project)
        self.entity = _optional_str(owner, "entity", entity)
        self.name = _optional_str(owner, "name", name)
        if directory is not None and not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"{owner}: directory must be a path or None, got {type(directory).__name__}: {directory!r}")
        self.directory = None if directory is None else Path(directory)
        _validate.one_of(owner, "mode", mode, self._MODES)
        self.mode = mode
        if isinstance(tags, str) or not all(isinstance(tag, str) for tag in tags):
            raise TypeError(f"{owner}: tags must be a list of strings, got {tags!r}")
        self.tags = list(tags)
        if settings is not None and not isinstance(settings, (Mapping, wandb.Settings)):
            raise TypeError(f"{owner}: settings must be a wandb.Settings, a dict or None, got {settings!r}")
        self.settings = settings
        self._wandb = wandb
        self.run = None

    def _start(self, loop: Loop, continuing: bool) -> None:
        if self.run is not None:  # left open by a loop of the user's that raised without calling Loop.fail
            self.run.finish(exit_code=1)
            self.run = None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.run = self._wandb.init(
            project=self.project,
            entity=self.entity,
            name=self.name,
            dir=None if self.directory is None else str(self.directory),
            mode=self.mode,
            config=self.params,
            tags=self.tags or None,
            id=self.run_id if continuing else None,
            resume="allow" if continuing else None,
            reinit="create_new",
            settings=self.settings,
        )
        self.run_id = self.run.id

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def _log_checkpoint(self, path: Path) -> None:
        artifact = self._wandb.Artifact(f"checkpoints-{self.run.id}", type="model")
        if path.is_dir():  # a sharded checkpoint
            artifact.add_dir(str(path), name=path.name)
        else:
            artifact.add_file(str(path), name=path.name)
        self.run.log_artifact(artifact, aliases=[path.name.removesuffix(".pt")])  # wandb adds "latest"

    def _finish(self, loop: Loop) -> None:
        if loop.stop_reason is not None:
            self.run.summary["stop_reason"] = loop.stop_reason
        self.run.finish()
        self.run = None

    def _open(self) -> bool:
        return self.run is not None

    def _fail(self, exception: BaseException) -> None:
        self.run.summary["exception"] = _describe(exception)
        # wandb marks a run with a non-zero exit code failed; 130 is a shell's code for an interrupt (SIGINT).
        self.run.finish(exit_code=130 if _interrupted(exception) else 1)
        self.run = None
