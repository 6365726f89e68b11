"""Checkpoints: exact resume (bitwise params, same history) when stopped mid-epoch, at an epoch boundary, by an
exception, and by SIGKILL of a training process (also while it is saving); atomic writes; safe loading; bad input."""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import functrain as ft
from functrain.checkpoint import FORMAT, atomic_save
from tests.test_loop import ShuffledLoader, assert_bitwise_equal, make_data, make_problem

REPO = Path(__file__).resolve().parent.parent
EVAL_DATA = [make_data(n=8, seed=5)]


def train(directory=None, *, resume=False, every_steps=None, every_epochs=None, callbacks=(), **stop):
    """The problem of test_loop (dropout, BatchNorm, shuffling, AdamW with injected lr), evaluated each epoch."""
    _, step, evaluate, state, loader = make_problem()
    if directory is not None:  # first, so that it saves before a Crash callback raises
        checkpoint = ft.callbacks.Checkpoint(directory, every_steps=every_steps, every_epochs=every_epochs, keep=2)
        callbacks = [checkpoint, *callbacks]
    return ft.fit(
        step, state, loader, **stop, eval_step=evaluate, eval_loader=EVAL_DATA, log_every=2,
        callbacks=list(callbacks), resume=directory if resume else False, device="cpu",
    )  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted():
    torch.manual_seed(0)
    return train(epochs=3)  # 5 batches per epoch: 15 steps


class Crash(ft.Callback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_step_end(self, loop):
        if loop.step == self.at_step:
            raise KeyboardInterrupt("simulated crash")


def scramble_rngs():
    torch.manual_seed(12345)
    random.seed(12345)
    np.random.seed(12345)


@pytest.mark.parametrize(
    "how",
    ["steps=7 (mid-epoch)", "epochs=1 (epoch end)", "crash after step 5 (last batch, before epoch end)",
     "crash after step 8 (mid-epoch, mid log interval)"],
)  # fmt: skip
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, uninterrupted, how):
    """Params, buffers, optimiser state and step bitwise equal, and the same history (train logs, eval logs), with
    dropout and shuffling on. The RNGs are scrambled before resuming: the checkpoint must restore them."""
    torch.manual_seed(0)
    if how.startswith("steps"):
        train(tmp_path, steps=7)  # saved at the end of fit
    elif how.startswith("epochs"):
        train(tmp_path, epochs=1, every_epochs=1)  # saved in on_epoch_end
    else:
        at = 5 if "step 5" in how else 8
        with pytest.raises(KeyboardInterrupt):
            train(tmp_path, epochs=3, every_steps=at, callbacks=[Crash(at)])
    saved = ft.latest_checkpoint(tmp_path)
    assert saved is not None
    scramble_rngs()
    resumed, history = train(tmp_path, epochs=3, resume=True)
    state, expected = uninterrupted
    assert_bitwise_equal(resumed, state)
    assert history == expected


def test_round_trip_restores_the_loader_position_and_every_rng(tmp_path):
    _, _, _, state, loader = make_problem()
    iterator = iter(loader)
    next(iterator), next(iterator)
    ft.save_checkpoint(tmp_path / "c.pt", state, loader=loader, progress={"note": "x"})
    after = (next(iterator), torch.rand(3), random.random(), np.random.rand(3))
    scramble_rngs()
    fresh = ShuffledLoader(*make_data(), 8)
    restored, progress = ft.load_checkpoint(tmp_path / "c.pt", like=state, loader=fresh)
    again = (next(iter(fresh)), torch.rand(3), random.random(), np.random.rand(3))
    assert progress == {"note": "x"}
    assert_bitwise_equal(restored, state)
    assert torch.equal(after[0][0], again[0][0]) and torch.equal(after[1], again[1])
    assert after[2] == again[2] and np.array_equal(after[3], again[3])


# ----------------------------------------------------------------------------- SIGKILL


SCRIPT = """
import io, os, sys, time
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
import functrain as ft
from tests.test_loop import make_data, make_problem

directory, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
saves = 0
real_save, real_replace = torch.save, os.replace


def hang(message):
    print(message, flush=True)
    time.sleep(600)


def save(obj, file, *args, **kwargs):  # mode mid-write: the 3rd checkpoint hangs half written
    global saves
    saves += 1
    if mode == "mid-write" and saves == 3:
        buffer = io.BytesIO()
        real_save(obj, buffer)
        file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        file.flush()
        hang("HANG")
    real_save(obj, file, *args, **kwargs)


def replace(src, dst):  # mode before-rename: the 3rd checkpoint is complete on disk under its temporary name
    if mode == "before-rename" and saves == 3:
        hang("HANG")
    real_replace(src, dst)


torch.save, os.replace = save, replace


class Announce(ft.Callback):
    def on_fit_start(self, loop):
        print(f"START {{loop.step}}", flush=True)

    def on_step_end(self, loop):
        print(f"STEP {{loop.step}}", flush=True)
        if mode == "mid-step" and loop.step == 7:
            hang("HANG")


_, step, evaluate, state, loader = make_problem()
torch.manual_seed(0)
checkpoint = ft.callbacks.Checkpoint(directory, every_steps=3, every_epochs=None, keep=2)
state, history = ft.fit(
    step, state, loader, epochs=3, eval_step=evaluate, eval_loader=[make_data(n=8, seed=5)], log_every=2,
    callbacks=[Announce()], checkpoint=checkpoint, resume=True, device="cpu",
)
real_save({{"state": state, "history": history}}, out)
print("DONE", flush=True)
"""


def run_script(tmp_path: Path, directory: Path, mode: str, kill_on: str | None = None) -> list[str]:
    """Runs the training script; with ``kill_on``, SIGKILLs it as soon as it prints that line."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT.format(repo=str(REPO))))
    stderr = (tmp_path / f"stderr-{mode}.txt").open("w")
    process = subprocess.Popen(
        [sys.executable, str(script), str(directory), str(tmp_path / f"out-{mode}.pt"), mode],
        stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO,
    )  # fmt: skip
    lines = []
    try:
        for line in process.stdout:
            lines.append(line.strip())
            if line.strip() == kill_on:
                os.kill(process.pid, signal.SIGKILL)
                break
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        stderr.close()
    errors = (tmp_path / f"stderr-{mode}.txt").read_text()
    assert code == (-signal.SIGKILL if kill_on else 0), f"exit {code}; stderr:\n{errors}"
    return lines


@pytest.fixture(scope="module")
def script_reference(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("reference")
    lines = run_script(tmp_path, tmp_path / "ckpt", "full")
    assert lines[0] == "START 0" and lines[-1] == "DONE"
    return torch.load(tmp_path / "out-full.pt", weights_only=True)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
@pytest.mark.parametrize("mode", ["mid-step", "mid-write", "before-rename"])
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, script_reference, mode):
    """A training process is killed with SIGKILL: between steps ("mid-step", after step 7), while the temporary
    file of its third checkpoint is half written ("mid-write"), or with that file complete but not yet renamed
    ("before-rename"). The directory still holds the last good checkpoint (step 6); rerunning the same script
    resumes from it and ends bitwise equal to an uninterrupted run in another process, with the same history."""
    directory = tmp_path / "ckpt"
    lines = run_script(tmp_path, directory, mode, kill_on="HANG")
    assert lines[0] == "START 0"
    names = sorted(p.name for p in directory.iterdir())
    assert [n for n in names if not n.startswith(".")] == ["step-00000003.pt", "step-00000006.pt"]
    temporary = [directory / n for n in names if n.startswith(".step-00000009.pt.")]
    if mode == "mid-step":
        assert not temporary
    else:  # the kill came during the save of step 9
        assert len(temporary) == 1 and temporary[0].stat().st_size > 0
        if mode == "mid-write":
            with pytest.raises(Exception):  # noqa: B017 - a torn file: whatever torch raises
                torch.load(temporary[0], weights_only=True)
        else:
            assert torch.load(temporary[0], weights_only=True)["progress"]["step"] == 9

    lines = run_script(tmp_path, directory, "resume")
    assert lines[0] == "START 6" and lines[1] == "STEP 7" and lines[-1] == "DONE"
    assert not any(p.name.endswith(".tmp") for p in directory.iterdir())  # swept at fit start
    result = torch.load(tmp_path / "out-resume.pt", weights_only=True)
    assert_bitwise_equal(result["state"], script_reference["state"])
    assert result["history"] == script_reference["history"]


# ----------------------------------------------------------------------------- atomic writes


def test_a_failure_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    state = ft.TrainState.create(nn.Linear(3, 2), ft.adam(lr=0.1))
    path = tmp_path / "step-00000001.pt"
    ft.save_checkpoint(path, state, progress={"step": 1})
    good = path.read_bytes()
    real_save = torch.save

    def failing_save(obj, file, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        file.write(buffer.getvalue()[:100])
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ft.save_checkpoint(path, state, progress={"step": 2})
    assert path.read_bytes() == good and os.listdir(tmp_path) == [path.name]
    assert ft.load_checkpoint(path, like=state)[1] == {"step": 1}


def test_save_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}"))),
                                                  real_fsync(fd)))  # fmt: skip
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("replace", str(b))), real_replace(a, b)))
    atomic_save({"x": torch.ones(2)}, tmp_path / "a.pt")
    assert [c[0] for c in calls] == ["fsync", "replace", "fsync"]
    assert Path(calls[0][1]).parent == tmp_path and Path(calls[0][1]).name.startswith(".a.pt.")
    assert calls[1][1] == str(tmp_path / "a.pt") and calls[2][1] == str(tmp_path)


def test_latest_checkpoint_orders_by_step_and_ignores_other_files(tmp_path):
    assert ft.latest_checkpoint(tmp_path) is None and ft.latest_checkpoint(tmp_path / "absent") is None
    for name in ["step-00000002.pt", "step-00000010.pt", "best.pt", ".step-00000011.pt.x.tmp", "step-9.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert ft.latest_checkpoint(tmp_path) == tmp_path / "step-00000010.pt"


# ----------------------------------------------------------------------------- safe loading and bad input


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    state = ft.TrainState.create(nn.Linear(3, 2), ft.sgd(lr=0.1))
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "state": state, "progress": {"x": RunsCode(marker)}, "loader": None, "rng": {}}, path)
    with pytest.raises(ValueError, match="refused to load .*evil.pt.*could run code"):
        ft.load_checkpoint(path, like=state)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file is really dangerous: the unsafe loader runs the command
    assert marker.exists()


def test_missing_corrupt_and_foreign_files_are_clear_errors(tmp_path):
    _, step, _, state, loader = make_problem()
    missing = tmp_path / "nope" / "step-00000001.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ft.load_checkpoint(missing, like=state)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ft.fit(step, state, loader, epochs=1, resume=missing, callbacks=[])
    with pytest.raises(FileNotFoundError, match="no step-<n>.pt checkpoint in the directory"):
        ft.fit(step, state, loader, epochs=1, resume=tmp_path, callbacks=[])
    good = ft.save_checkpoint(tmp_path / "good.pt", state)
    (tmp_path / "torn.pt").write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="torn.pt' is not a readable checkpoint"):
        ft.load_checkpoint(tmp_path / "torn.pt", like=state)
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a functrain checkpoint"):
        ft.load_checkpoint(tmp_path / "other.pt", like=state)


def test_a_checkpoint_of_another_model_or_optimiser_names_the_first_mismatch(tmp_path):
    _, _, _, state, _ = make_problem()
    path = ft.save_checkpoint(tmp_path / "c.pt", state)
    wider = nn.Sequential(nn.Linear(6, 17), nn.BatchNorm1d(17), nn.Tanh(), nn.Dropout(0.3), nn.Linear(17, 3))
    other_model = ft.TrainState.create(wider, ft.inject_hyperparams(ft.adamw)(lr=1e-2, weight_decay=0.1))
    with pytest.raises(ValueError, match=r"another model or optimiser: 'params.0.weight' is \(16, 6\) torch.float32 "
                                         r"in the checkpoint but \(17, 6\)"):  # fmt: skip
        ft.load_checkpoint(path, like=other_model)
    other_optimiser = state._replace(opt_state=ft.sgd(lr=0.1, momentum=0.9).init(state.params))
    named = r"another model or optimiser: .*different types at \.opt_state: an InjectHyperparamsState vs ft\.sgd's"
    with pytest.raises(ValueError, match=named):
        ft.load_checkpoint(path, like=other_optimiser)
    renamed = state._replace(params={("x" + k): v for k, v in state.params.items()})
    with pytest.raises(ValueError, match="first differing key: .*0.weight"):
        ft.load_checkpoint(path, like=renamed)


def test_an_unwritable_checkpoint_directory_fails_before_training(tmp_path):
    calls = []
    _, step, _, state, loader = make_problem()

    def counting_step(state, batch):
        calls.append(1)
        return step(state, batch)

    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(PermissionError, match="cannot write checkpoints to .*file/ckpt"):
        ft.fit(counting_step, state, loader, epochs=1, checkpoint=tmp_path / "file" / "ckpt", callbacks=[])
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(PermissionError, match="cannot write checkpoints"):
            ft.fit(counting_step, state, loader, epochs=1, checkpoint=locked, callbacks=[])
    assert calls == []


# ----------------------------------------------------------------------------- safetensors weights


def test_weights_round_trip_through_safetensors_and_other_readers_see_named_tensors(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    _, _, _, state, _ = make_problem()
    trained = state._replace(params={k: v + 1 for k, v in state.params.items()})
    path = ft.save_weights(tmp_path / "w.safetensors", trained)
    plain = st.load_file(path)
    assert set(plain) == {f"params.{k}" for k in state.params} | {f"buffers.{k}" for k in state.buffers}
    assert torch.equal(plain["params.0.weight"], trained.params["0.weight"])
    loaded = ft.load_weights(path, like=state)
    assert_bitwise_equal(loaded.params, trained.params)
    assert_bitwise_equal(loaded.buffers, state.buffers)
    assert loaded.opt_state is state.opt_state and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_weights_of_another_model_name_the_first_mismatch(tmp_path):
    pytest.importorskip("safetensors")
    _, _, _, state, _ = make_problem()
    path = ft.save_weights(tmp_path / "w.safetensors", state)
    other = ft.TrainState.create(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)), ft.sgd(lr=0.1))
    with pytest.raises(ValueError, match="'params.2.weight' is missing from the file"):
        ft.load_weights(path, like=other)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        ft.load_weights(tmp_path / "nope.safetensors", like=state)
