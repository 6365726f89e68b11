"""fit under hostile conditions: resuming mid-epoch with loaders that cannot save their position, kills between
a log and its checkpoint, torn log files, and step budgets that end mid-epoch."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import functrain as ft
from tests.harness import Indices
from tests.test_loop import assert_bitwise_equal, classification, make_data, make_problem

EVAL_DATA = [make_data(n=8, seed=5)]


class Crash(ft.Callback):
    """Raises KeyboardInterrupt at the end of step ``at`` (after the checkpoints placed before it have saved)."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, loop):
        if loop.step == self.at:
            raise KeyboardInterrupt(f"simulated crash after step {self.at}")


class CrashAtEpochEnd(ft.Callback):
    """Placed before the Checkpoint: at step ``at``'s epoch end the epoch's log and evaluation are written, then
    the process dies before the end-of-epoch save, as a kill between the two would."""

    def __init__(self, at: int):
        self.at = at

    def on_epoch_end(self, loop):
        if loop.step == self.at:
            raise KeyboardInterrupt(f"simulated crash between the log and the save of step {self.at}")


def train(loader, directory=None, *, resume=False, callbacks=(), every_steps=3, every_epochs=None, **until):
    """The test_loop problem (dropout, BatchNorm, AdamW) on ``loader``, evaluated each epoch, logging every 2 steps."""
    _, step, evaluate, state, _ = make_problem()
    checkpoint = None
    if directory is not None:
        checkpoint = ft.callbacks.Checkpoint(directory, every_steps=every_steps, every_epochs=every_epochs, keep=10)
    until = until or {"epochs": 4}
    return ft.fit(
        step, state, loader, **until, eval_step=evaluate, eval_loader=EVAL_DATA, log_every=2,
        callbacks=list(callbacks), checkpoint=checkpoint, resume=directory if resume else False, device="cpu",
    )  # fmt: skip


# ----------------------------------------------------------------------------- 1. loaders without a position


def batch_list():
    x, y = make_data()
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)]  # 5 batches per epoch


def data_loader(shuffle: bool):
    return DataLoader(TensorDataset(*make_data()), batch_size=8, shuffle=shuffle)


class Replayed:
    """A re-iterable without len or state: whether its passes repeat one order, functrain cannot know."""

    def __iter__(self):
        yield from batch_list()


REPLAYABLE = {"a list of batches": batch_list, "a DataLoader without shuffle": lambda: data_loader(False)}


@pytest.mark.parametrize("kind", REPLAYABLE)
def test_a_mid_epoch_resume_skips_exactly_the_batches_taken_when_the_order_replays(tmp_path, kind):
    """Killed after step 7 (checkpoint at step 6, batch 1 of epoch 1): the resumed run skips that epoch's first
    batch and ends with 20 steps, bitwise equal to an uninterrupted run with the same history. Before, it
    restarted the epoch at batch 0 on top of the batch already taken (21 steps); for the DataLoader, creating
    its iterator also drew from torch's generator, so the dropout masks after the resume differed."""
    make = REPLAYABLE[kind]
    expected_state, expected_history = train(make())
    with pytest.raises(KeyboardInterrupt):
        train(make(), tmp_path, callbacks=[Crash(7)])
    assert ft.latest_checkpoint(tmp_path).name == "step-00000006.pt"
    torch.manual_seed(1234)  # the checkpoint restores the generators
    state, history = train(make(), tmp_path, resume=True)
    assert int(state.step) == 20 == int(expected_state.step)
    assert_bitwise_equal(state, expected_state)
    assert history == expected_history


@pytest.mark.parametrize("kind", ["a shuffled DataLoader", "an iterable without a position"])
def test_a_mid_epoch_resume_is_refused_before_training_when_the_order_cannot_be_replayed(tmp_path, kind):
    """A shuffled DataLoader draws a new order on every pass, so no skip finds the saved position: the resume is
    refused before any step, saying what to use instead; nothing in the checkpoint directory changes."""
    make = (lambda: data_loader(True)) if kind == "a shuffled DataLoader" else Replayed
    with pytest.raises(KeyboardInterrupt), pytest.warns(RuntimeWarning, match="cannot be resumed from"):
        train(make(), tmp_path, callbacks=[Crash(7)])  # warned at fit start, before the work
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=r"mid-epoch.*ft\.data\.make_loader") as error:
        train(make(), tmp_path, resume=True)
    assert "step-00000006.pt" in str(error.value) and "every_epochs" in str(error.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_shuffled_data_loader_resumes_from_an_epoch_end_bitwise(tmp_path):
    """The refusal is only for mid-epoch checkpoints: one saved at an epoch's end needs no position."""
    expected_state, expected_history = train(data_loader(True))
    with pytest.raises(KeyboardInterrupt):
        train(data_loader(True), tmp_path, callbacks=[Crash(7)], every_steps=None, every_epochs=1)
    state, history = train(data_loader(True), tmp_path, resume=True, every_steps=None, every_epochs=1)
    assert_bitwise_equal(state, expected_state)
    assert history == expected_history


# ----------------------------------------------------------------------------- 2. logs after a kill


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(s.step, s.value) for s in events.Scalars(tag)]


def killed_between_log_and_save(tmp_path, log_every):
    """Trains 3 epochs of 5 steps with a JSONL log and TensorBoard, saving every 5 steps and at each epoch end, and
    killed at step 10's epoch end after its log and evaluation but before its end-of-epoch save; then resumes.
    Returns the logger files of the resumed run and of an uninterrupted one, and the resumed history."""
    pytest.importorskip("tensorboard")
    runs = {}
    for name in ("uninterrupted", "killed", "resumed"):
        _, step, evaluate, state, loader = make_problem()
        run_dir = tmp_path / ("uninterrupted" if name == "uninterrupted" else "run")
        board = ft.callbacks.TensorBoard(run_dir / "tb")
        callbacks = [ft.callbacks.JSONLogger(run_dir / "log.jsonl"), board]
        callbacks += [CrashAtEpochEnd(10)] if name == "killed" else []
        checkpoint = ft.callbacks.Checkpoint(run_dir / "ckpt", every_steps=5, every_epochs=1, keep=10)
        try:
            runs[name] = ft.fit(
                step, state, loader, epochs=3, eval_step=evaluate, eval_loader=EVAL_DATA, log_every=log_every,
                callbacks=callbacks, checkpoint=checkpoint, resume=name == "resumed", device="cpu",
            )[1]  # fmt: skip
        except KeyboardInterrupt:
            assert board.writer is None  # closed by on_exception: its events on disk, as after a kill
    return tmp_path / "run", tmp_path / "uninterrupted", runs["resumed"]


@pytest.mark.parametrize("log_every", [3, 5], ids=["logged after the save", "logged before the save"])
def test_a_kill_between_a_log_and_its_save_leaves_each_step_logged_once(tmp_path, log_every):
    """log_every=3: step 10's log is the epoch's last, partial interval, written at the epoch end after step 10's
    checkpoint: the resumed run writes it again. log_every=5: step 10 is logged before its checkpoint and the
    resumed run does not log it again, but evaluates at step 10 again. Either way the JSONL file and the
    TensorBoard scalars read as the uninterrupted run's, each step once (before, step 10 was there twice)."""
    run, uninterrupted, history = killed_between_log_and_save(tmp_path, log_every)
    assert read_jsonl(run / "log.jsonl") == read_jsonl(uninterrupted / "log.jsonl")
    for split in ("train", "eval"):
        expected = scalars(uninterrupted / "tb", f"{split}/loss")
        assert [s for s, _ in expected] == [r["step"] for r in history[split]]
        assert scalars(run / "tb", f"{split}/loss") == expected


def test_tensorboard_events_are_on_disk_once_logged(tmp_path, monkeypatch):
    """Events are flushed when logged, so those written before a checkpoint are not lost when the process dies
    right after (before, they could wait in the writer's queue: a resume does not log them again). A slow disk
    (each record takes 20 ms to write) makes the window wide enough to see."""
    pytest.importorskip("tensorboard")
    import time

    from tensorboard.summary.writer.record_writer import RecordWriter

    write = RecordWriter.write
    monkeypatch.setattr(RecordWriter, "write", lambda self, data: (time.sleep(0.02), write(self, data))[1])
    _, step, _, state, loader = make_problem()
    with pytest.raises(KeyboardInterrupt):
        ft.fit(step, state, loader, epochs=2, log_every=2, callbacks=[ft.callbacks.TensorBoard(tmp_path), Crash(7)],
               device="cpu")  # fmt: skip
    assert [s for s, _ in scalars(tmp_path, "train/loss")] == [2, 4, 5, 6]


def crash_then_tear(tmp_path, tail: bytes):
    """A run logging to ``log.jsonl`` crashes after step 8 (checkpoint at step 6); ``tail`` is appended to the log."""
    with pytest.raises(KeyboardInterrupt):
        train(batch_list(), tmp_path / "ckpt", callbacks=[ft.callbacks.JSONLogger(tmp_path / "log.jsonl"), Crash(8)])
    with (tmp_path / "log.jsonl").open("ab") as file:
        file.write(tail)


def test_a_torn_last_jsonl_line_is_dropped_with_a_warning_and_the_resume_goes_on(tmp_path):
    """A write cut short (no newline) at the end of the log made every resume fail with a bare JSONDecodeError;
    now the torn tail is truncated, a warning names the file and the bytes dropped, and the log reads as one run."""
    _, expected = train(batch_list(), callbacks=[ft.callbacks.JSONLogger(tmp_path / "expected.jsonl")])
    torn = b'{"split": "train", "step": 10, "epo'
    crash_then_tear(tmp_path, torn)
    with pytest.warns(RuntimeWarning, match=rf"log\.jsonl.*{len(torn)} bytes"):
        _, history = train(batch_list(), tmp_path / "ckpt", resume=True,
                           callbacks=[ft.callbacks.JSONLogger(tmp_path / "log.jsonl")])  # fmt: skip
    assert history == expected
    assert read_jsonl(tmp_path / "log.jsonl") == read_jsonl(tmp_path / "expected.jsonl")


def test_a_corrupt_line_inside_the_jsonl_log_is_a_clear_error_and_the_file_is_kept(tmp_path):
    """Garbage before the last line is not a torn write: the resume stops and names the file and line, and the
    file is left as it was (it is the user's record of the run)."""
    crash_then_tear(tmp_path, b"not json\n")
    before = (tmp_path / "log.jsonl").read_bytes()
    line = before.decode().splitlines().index("not json") + 1
    with pytest.raises(ValueError, match=rf"line {line} of .*log\.jsonl"):
        train(batch_list(), tmp_path / "ckpt", resume=True, callbacks=[ft.callbacks.JSONLogger(tmp_path / "log.jsonl")])
    assert (tmp_path / "log.jsonl").read_bytes() == before


# ----------------------------------------------------------------------------- 3. the final evaluation


@pytest.mark.parametrize(("steps", "evaluated_at"), [(3, [3]), (7, [5, 7]), (10, [5, 10])])
def test_a_step_budget_that_ends_mid_epoch_still_evaluates_the_final_state(steps, evaluated_at):
    """Evaluating once per epoch, ``steps=`` ending mid-epoch skipped the last evaluation (``steps=3``: none at
    all); now the final state is evaluated, and at an epoch boundary only once."""
    state, history = train(batch_list(), steps=steps)
    assert [r["step"] for r in history["eval"]] == evaluated_at
    final = ft.make_eval_step(make_problem()[0], classification)(state, EVAL_DATA[0])
    assert history["eval"][-1]["loss"] == pytest.approx(float(final["loss"]), rel=1e-12)


def test_eval_every_keeps_its_schedule_at_a_step_budget():
    """With ``eval_every`` the evaluations follow that schedule alone (steps 3 and 6 of 7), as documented."""
    _, step, evaluate, state, _ = make_problem()
    _, history = ft.fit(step, state, batch_list(), steps=7, eval_step=evaluate, eval_loader=EVAL_DATA, eval_every=3,
                        callbacks=[], device="cpu")  # fmt: skip
    assert [r["step"] for r in history["eval"]] == [3, 6]


def test_the_final_evaluation_does_not_leak_into_a_continued_run(tmp_path):
    """fit(steps=7) saves at its end, then fit(steps=12, resume=True) continues: the history equals one run of 12
    steps (evaluated at 5, 10 and its final step 12), without the evaluation that ended the first run."""
    _, expected = train(batch_list(), steps=12)
    _, first = train(batch_list(), tmp_path, steps=7)
    assert [r["step"] for r in first["eval"]] == [5, 7]
    state, history = train(batch_list(), tmp_path, resume=True, steps=12)
    assert int(state.step) == 12
    assert [r["step"] for r in history["eval"]] == [5, 10, 12]
    assert history == expected


def test_checkpoints_by_steps_with_a_loader_that_cannot_resume_mid_epoch_warn_at_fit_start(tmp_path):
    """Said before training, not after hours of it when the resume refuses the mid-epoch checkpoint."""
    model = torch.nn.Linear(1, 1)
    tx = ft.sgd(lr=0.1)
    step = ft.make_train_step(model, lambda m, b: (m(b.float().unsqueeze(1)) ** 2).mean(), tx)
    shuffled = torch.utils.data.DataLoader(Indices(8), batch_size=2, shuffle=True)
    checkpoint = ft.callbacks.Checkpoint(tmp_path, every_steps=3)
    with pytest.warns(RuntimeWarning, match=r"every_steps=3.*DataLoader.*cannot be resumed from"):
        ft.fit(step, ft.TrainState.create(model, tx), shuffled, epochs=1, checkpoint=checkpoint, callbacks=[])
    in_order = torch.utils.data.DataLoader(Indices(8), batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an in-order loader replays: no warning
        ft.fit(step, ft.TrainState.create(model, tx), in_order, epochs=1, checkpoint=ft.callbacks.Checkpoint(
            tmp_path / "b", every_steps=3), callbacks=[])  # fmt: skip
