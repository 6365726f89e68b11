"""Experiment trackers (ft.callbacks.MLflow, ft.callbacks.WandB): what the real packages stored, read back through
them, equals what the loop logged; a resumed fit continues the same run; checkpoints become artifacts; bad
arguments and a missing package say what to do. MLflow writes to a SQLite store and wandb runs offline, both
under tmp_path: nothing reaches the network."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

import functrain as ft
from tests.test_loop import make_data, make_problem


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Telemetry off, wandb quiet, and wandb's caches and settings under tmp_path."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))


class Crash(ft.Callback):
    """Kills the fit after step 8: the interrupted run logged step 8 after its last checkpoint (step 6)."""

    def on_step_end(self, loop):
        if loop.step == 8:
            raise KeyboardInterrupt


def fit(tracker, checkpoint, *, crash=False, resume=False):
    """Two epochs of 5 steps, logged every 2 steps and at each epoch's end, evaluated at each epoch's end; a
    checkpoint every 3 steps and at each epoch's end, and best.pt on the evaluation loss."""
    _, step, evaluate, state, loader = make_problem()
    callbacks = [checkpoint, tracker, *([Crash()] if crash else [])]
    return ft.fit(
        step, state, loader, epochs=2, eval_step=evaluate, eval_loader=[make_data(n=8, seed=5)], log_every=2,
        callbacks=callbacks, resume=resume, device="cpu",
    )  # fmt: skip


def checkpoint_in(directory):
    return ft.callbacks.Checkpoint(directory, every_steps=3, keep=2, monitor="eval/loss")


# Every periodic file the fit writes (steps 3, 6, 9; epoch ends 5, 10), though the checkpoint keeps only 2.
WRITTEN = ["best.pt", "step-00000003.pt", "step-00000005.pt", "step-00000006.pt", "step-00000009.pt",
           "step-00000010.pt"]  # fmt: skip


def best_writes(history):
    """How many times best.pt was written: each evaluation that beat the best so far."""
    best, writes = math.inf, 0
    for record in history["eval"]:
        best, writes = (record["loss"], writes + 1) if record["loss"] < best else (best, writes)
    return writes


def metric_names(history):
    """``train/loss``, ..., ``train/lr`` and the other injected hyperparameters, ``eval/loss``, ..."""
    names = {f"{split}/{name}" for split in ("train", "eval") for record in history[split] for name in record}
    assert {"train/loss", "train/acc", "train/lr", "train/betas.0", "eval/loss", "eval/acc"} <= names
    return names - {"train/step", "train/epoch", "eval/step", "eval/epoch"}


def logged(history, split, name):
    return [(record["step"], record[name]) for record in history[split]]


# ----------------------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def mlruns(tmp_path_factory):
    """One MLflow store for this module's tests (creating one takes seconds); each test has its own experiment."""
    pytest.importorskip("mlflow")
    return tmp_path_factory.mktemp("mlruns")


def mlflow_client(directory):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{Path(directory).absolute() / 'mlflow.db'}")


def test_mlflow_run_holds_the_logged_metrics_params_and_checkpoints(tmp_path, mlruns):
    tracker = ft.callbacks.MLflow(
        mlruns, experiment="tiny", run_name="first", params={"lr": 1e-2, "opt": {"name": "adamw"}},
        tags={"team": "functrain"}, log_checkpoints=True,
    )  # fmt: skip
    _, history = fit(tracker, checkpoint_in(tmp_path / "ckpt"))

    client = mlflow_client(mlruns)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "first"
    assert client.get_experiment(run.info.experiment_id).name == "tiny"
    assert run.data.params == {"lr": "0.01", "opt.name": "adamw"}
    assert run.data.tags["team"] == "functrain"
    assert set(run.data.metrics) == metric_names(history)
    for split, name in [("train", "loss"), ("train", "lr"), ("train", "acc"), ("eval", "loss"), ("eval", "acc")]:
        points = [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, f"{split}/{name}")]
        assert sorted(points) == logged(history, split, name)  # exactly: MLflow stores float64

    artifacts = {Path(a.path).name: a for a in client.list_artifacts(tracker.run_id, "checkpoints")}
    assert sorted(artifacts) == WRITTEN
    stored = Path(run.info.artifact_uri.removeprefix("file://")) / "checkpoints"
    assert stored.is_relative_to(mlruns / "artifacts")  # all under the directory given
    for name in ("step-00000010.pt", "best.pt"):  # as last written
        assert (stored / name).read_bytes() == (tmp_path / "ckpt" / name).read_bytes()


def test_mlflow_a_resumed_fit_continues_the_same_run(tmp_path, mlruns):
    _, uninterrupted = fit(ft.callbacks.MLflow(mlruns, experiment="resume"), checkpoint_in(tmp_path / "a"))

    first = ft.callbacks.MLflow(mlruns, experiment="resume")
    with pytest.raises(KeyboardInterrupt):
        fit(first, checkpoint_in(tmp_path / "b"), crash=True)
    client = mlflow_client(mlruns)
    interrupted = client.get_run(first.run_id)
    assert interrupted.info.status == "KILLED" and interrupted.data.tags["functrain.exception"] == "KeyboardInterrupt: "

    second = ft.callbacks.MLflow(mlruns, experiment="resume")  # a new process: the run id comes from the checkpoint
    _, history = fit(second, checkpoint_in(tmp_path / "b"), resume=True)
    assert second.run_id == first.run_id
    assert history == uninterrupted
    assert client.get_run(first.run_id).info.status == "FINISHED"
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert len(runs) == 2  # the uninterrupted run and the resumed one
    points = [(m.step, m.value) for m in client.get_metric_history(first.run_id, "train/loss")]
    # Step 8 was logged by the interrupted run after its checkpoint (step 6), and again, equal, by the resumed one.
    again = [point for point in logged(history, "train", "loss") if point[0] == 8]
    assert sorted(points) == sorted(logged(history, "train", "loss") + again)


def test_mlflow_a_fit_that_fails_ends_its_run_failed_with_the_error_and_its_checkpoints(tmp_path, mlruns):
    from tests.test_loop import Raise

    tracker = ft.callbacks.MLflow(mlruns, experiment="failed", log_checkpoints=True)
    checkpoint = ft.callbacks.Checkpoint(tmp_path, every_steps=3)
    _, step, _, state, loader = make_problem()
    with pytest.raises(FloatingPointError):
        callbacks = [checkpoint, tracker, Raise(7, FloatingPointError("loss is nan"))]
        ft.fit(step, state, loader, epochs=2, callbacks=callbacks, device="cpu")
    run = mlflow_client(mlruns).get_run(tracker.run_id)
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert run.data.tags["functrain.exception"] == "FloatingPointError: loss is nan"
    logged_files = [Path(a.path).name for a in mlflow_client(mlruns).list_artifacts(tracker.run_id, "checkpoints")]
    assert logged_files == ["step-00000003.pt", "step-00000005.pt", "step-00000006.pt"]


def test_mlflow_resume_into_a_store_without_the_run_warns_and_starts_a_new_one(mlruns):
    tracker = ft.callbacks.MLflow(mlruns, experiment="lost")
    tracker.load_state_dict({"run_id": "0123456789abcdef0123456789abcdef"})
    _, step, _, state, loader = make_problem()
    state = state._replace(step=state.step + 5)  # a state of its own, past step 0: continues the run
    with pytest.warns(RuntimeWarning, match="not in the tracking store"):
        ft.fit(step, state, loader, epochs=1, callbacks=[tracker], device="cpu")
    assert tracker.run_id != "0123456789abcdef0123456789abcdef"
    assert mlflow_client(mlruns).get_run(tracker.run_id).info.status == "FINISHED"


# ----------------------------------------------------------------------------- WandB


def wandb_records(run_dir: Path) -> list:
    """The records of an offline run's ``run-<id>.wandb`` file: wandb's own log format (LevelDB's: 32 KiB blocks
    of chunks, each with a 7-byte header: checksum, length, type), each record a protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    position, records, pending = 7, [], b""
    while position + 7 <= len(data):
        if (left := 32768 - position % 32768) < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_records(run_dir: Path, timeout: float = 20.0) -> list:
    """The run's records once its exit record is on disk: wandb's service process writes the file, and
    ``run.finish()`` may return before it has flushed the last of it."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(run_dir)
        if any(record.HasField("exit") for record in records):
            return records
        assert time.monotonic() < deadline, f"{run_dir}: no exit record after {timeout} s"
        time.sleep(0.05)


def wandb_run(run_dir: Path) -> dict:
    """What an offline run holds: its id, config, metrics by name as [(step, value)], artifacts, summary, exit code."""
    run = {"history": defaultdict(list), "artifacts": []}
    for record in finished_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"] = record.run.run_id
            run["config"] = {i.key: json.loads(i.value_json) for i in record.run.config.update if i.key != "_wandb"}
            run["tags"] = list(record.run.tags)
        elif kind == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            for name, value in row.items():
                if not name.startswith("_"):
                    run["history"][name].append((row["_step"], value))
        elif kind == "artifact":
            files = [entry.path for entry in record.artifact.manifest.contents]
            run["artifacts"].append((record.artifact.name, files, list(record.artifact.aliases)))
        elif kind == "summary":
            run.setdefault("summary", {}).update({i.key: json.loads(i.value_json) for i in record.summary.update})
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def wandb_tracker(tmp_path, **kwargs):
    return ft.callbacks.WandB(
        "functrain-tests", directory=tmp_path / "wandb", mode="offline", settings={"console": "off"}, **kwargs
    )


def offline_runs(directory):
    return sorted((directory / "wandb").glob("offline-run-*"))


def test_wandb_run_holds_the_logged_metrics_config_and_checkpoints(tmp_path):
    pytest.importorskip("wandb")
    tracker = wandb_tracker(
        tmp_path, name="first", params={"lr": 1e-2, "opt": {"name": "adamw"}}, tags=["tiny"], log_checkpoints=True
    )
    _, history = fit(tracker, checkpoint_in(tmp_path / "ckpt"))
    assert tracker.run is None  # finished

    (run_dir,) = offline_runs(tmp_path / "wandb")
    run = wandb_run(run_dir)
    assert run["id"] == tracker.run_id and run["exit_code"] == 0
    assert run["config"] == {"lr": 1e-2, "opt": {"name": "adamw"}} and run["tags"] == ["tiny"]
    assert set(run["history"]) == metric_names(history)
    for split, name in [("train", "loss"), ("train", "lr"), ("train", "acc"), ("eval", "loss"), ("eval", "acc")]:
        assert run["history"][f"{split}/{name}"] == logged(history, split, name)  # JSON floats round-trip exactly

    # One version of the artifact per file written, in order: each save, and each new best.
    assert {name for name, _, _ in run["artifacts"]} == {f"checkpoints-{tracker.run_id}"}
    versions = [(file, sorted(aliases)) for _, (file,), aliases in run["artifacts"]]
    assert sorted(file for file, _ in versions) == sorted(WRITTEN[1:] + ["best.pt"] * best_writes(history))
    assert versions[-1] == ("step-00000010.pt", ["latest", "step-00000010"])  # wandb adds "latest"
    assert ("best.pt", ["best", "latest"]) in versions


def test_wandb_a_resumed_fit_continues_the_same_run(tmp_path):
    pytest.importorskip("wandb")
    _, uninterrupted = fit(ft.callbacks.Callback(), checkpoint_in(tmp_path / "a"))

    tracker = wandb_tracker(tmp_path, params={"lr": 1e-2})
    with pytest.raises(KeyboardInterrupt):
        fit(tracker, checkpoint_in(tmp_path / "b"), crash=True)
    run_id = tracker.run_id
    assert tracker.run is None  # finished, as interrupted
    # The same callback resumes (MLflow's test resumes with a new one, the id read from the checkpoint). Offline,
    # each part gets a directory named by its start time to the second, and the same id: the resumed part goes
    # elsewhere, so that both are kept however fast the fits are.
    tracker.directory = tmp_path / "resumed"
    _, history = fit(tracker, checkpoint_in(tmp_path / "b"), resume=True)
    assert tracker.run_id == run_id and history == uninterrupted
    interrupted, resumed = (wandb_run(d) for d in offline_runs(tmp_path / "wandb") + offline_runs(tmp_path / "resumed"))
    assert interrupted["id"] == resumed["id"] == run_id
    assert (interrupted["exit_code"], resumed["exit_code"]) == (130, 0)  # 130: interrupted
    assert interrupted["summary"]["exception"] == "KeyboardInterrupt: "
    assert interrupted["history"]["train/loss"] == [p for p in logged(history, "train", "loss") if p[0] <= 8]
    assert resumed["history"]["train/loss"] == [p for p in logged(history, "train", "loss") if p[0] > 6]
    assert resumed["history"]["eval/acc"] == logged(history, "eval", "acc")[1:]  # step 5's came before step 6


# ----------------------------------------------------------------------------- both: arguments, missing packages


@pytest.mark.parametrize("name", ["mlflow", "wandb"])
def test_a_missing_package_says_what_to_install(monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    tracker = {"mlflow": ft.callbacks.MLflow, "wandb": ft.callbacks.WandB}[name]
    with pytest.raises(ImportError, match=rf'pip install "functrain\[{name}\]"'):
        tracker()


def test_import_functrain_imports_neither_package():
    code = "import sys, functrain; assert not {'mlflow', 'wandb'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


@pytest.mark.parametrize(
    "name,kwargs,error,match",
    [
        ("MLflow", {"tracking_uri": 3}, TypeError, "MLflow: tracking_uri must be a directory, a tracking URI or None"),
        ("MLflow", {"experiment": ""}, ValueError, "MLflow: experiment must be a non-empty str"),
        ("MLflow", {"run_name": 1}, TypeError, "MLflow: run_name must be a str or None"),
        ("MLflow", {"params": [("lr", 1)]}, TypeError, "MLflow: params must be a dict with str keys"),
        ("MLflow", {"params": {1: 2}}, TypeError, "MLflow: params must be a dict with str keys"),
        ("MLflow", {"tags": ["a"]}, TypeError, "MLflow: tags must be a dict with str keys"),
        ("MLflow", {"log_checkpoints": 1}, TypeError, "MLflow: log_checkpoints must be a bool"),
        ("WandB", {"project": 1}, TypeError, "WandB: project must be a str or None"),
        ("WandB", {"mode": "offlien"}, ValueError, "WandB: mode must be one of"),
        ("WandB", {"tags": "tiny"}, TypeError, "WandB: tags must be a list of strings"),
        ("WandB", {"directory": 1}, TypeError, "WandB: directory must be a path or None"),
        ("WandB", {"params": {"lr": 1, 2: 3}}, TypeError, "WandB: params must be a dict with str keys"),
        ("WandB", {"settings": "offline"}, TypeError, "WandB: settings must be a wandb.Settings, a dict or None"),
        ("WandB", {"log_checkpoints": "yes"}, TypeError, "WandB: log_checkpoints must be a bool"),
    ],
)
def test_bad_arguments_are_refused_by_name(name, kwargs, error, match):
    pytest.importorskip(name.lower())
    with pytest.raises(error, match=match):
        getattr(ft.callbacks, name)(**kwargs)


def test_log_checkpoints_needs_a_checkpoint_before_the_tracker(tmp_path):
    """Checked before training and before any run is started."""
    pytest.importorskip("mlflow")
    _, step, _, state, loader = make_problem()
    tracker = ft.callbacks.MLflow(tmp_path / "mlruns", log_checkpoints=True)
    with pytest.raises(ValueError, match="this fit has none"):
        ft.fit(step, state, loader, epochs=1, callbacks=[tracker], device="cpu")
    with pytest.raises(ValueError, match=r"the Checkpoint must come before MLflow in the callbacks; fit\(checkpoint="):
        ft.fit(step, state, loader, epochs=1, callbacks=[tracker], checkpoint=tmp_path / "ckpt", device="cpu")
    assert tracker.run_id is None and not (tmp_path / "mlruns").exists()
