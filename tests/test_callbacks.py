"""Built-in callbacks: checkpoints (periodic, last K, best), early stopping, stop on a non-finite loss, JSONL log,
TensorBoard scalars, progress bar, profiler traces."""

from __future__ import annotations

import json
import math

import pytest
import torch

import functrain as ft
from tests.test_loop import ShuffledLoader, assert_bitwise_equal, classification, make_data, make_problem


def fit(step, state, loader, **kwargs):
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("log_every", 2)
    return ft.fit(step, state, loader, **kwargs)


def scripted_eval(values):
    """An eval step whose loss follows ``values``, one per evaluation (one eval batch)."""
    values = iter(values)

    def evaluate(state, batch):
        return {"loss": torch.tensor(next(values))}

    return evaluate


# ----------------------------------------------------------------------------- Checkpoint


def test_checkpoint_keeps_the_last_k_periodic_files_and_the_best_one(tmp_path):
    _, step, evaluate, state, loader = make_problem()
    checkpoint = ft.callbacks.Checkpoint(tmp_path, every_steps=2, every_epochs=None, keep=2, monitor="eval/loss")
    state, history = fit(
        step, state, loader, steps=9, eval_step=evaluate, eval_loader=[make_data(n=8, seed=5)], eval_every=1,
        checkpoint=checkpoint, callbacks=[],
    )  # fmt: skip
    # every 2 steps, and at the end of fit (step 9): the last two kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "step-00000008.pt", "step-00000009.pt"]
    best_step = min(history["eval"], key=lambda r: r["loss"])["step"]
    best, progress = ft.load_checkpoint(tmp_path / "best.pt", like=state)
    assert progress["step"] == best_step and int(best.step) == best_step
    last, progress = ft.load_checkpoint(tmp_path / "step-00000009.pt", like=state)
    assert progress["step"] == 9 and torch.equal(last.params["0.weight"], state.params["0.weight"])


def test_a_directory_as_checkpoint_saves_every_epoch_and_keeps_three(tmp_path):
    _, step, _, state, loader = make_problem()
    fit(step, state, loader, epochs=5, checkpoint=tmp_path, callbacks=[])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000015.pt", "step-00000020.pt", "step-00000025.pt"]


def test_the_best_value_survives_a_resume(tmp_path):
    """best.pt is replaced after a resume only by a better value than the interrupted run's best."""
    _, step, _, state, loader = make_problem()
    checkpoint = ft.callbacks.Checkpoint(tmp_path, every_steps=1, every_epochs=None, monitor="eval/loss")
    fit(step, state, loader, steps=2, eval_step=scripted_eval([1.0, 2.0]), eval_loader=[None], eval_every=1,
        checkpoint=checkpoint, callbacks=[])  # fmt: skip
    _, step, _, state, loader = make_problem()
    checkpoint = ft.callbacks.Checkpoint(tmp_path, every_steps=1, every_epochs=None, monitor="eval/loss")
    fit(step, state, loader, steps=4, eval_step=scripted_eval([1.5, 1.2]), eval_loader=[None], eval_every=1,
        checkpoint=checkpoint, resume=True, callbacks=[])  # fmt: skip
    assert ft.load_checkpoint(tmp_path / "best.pt", like=state)[1]["step"] == 1


# ----------------------------------------------------------------------------- stopping


@pytest.mark.parametrize(
    "values,mode,min_delta,patience,stop_step",
    [
        ([3.0, 2.0, 2.5, 2.4, 2.6, 1.0, 1.0], "min", 0.0, 2, 5),  # 3 evaluations without a new minimum
        ([3.0, 2.0, 1.9, 1.85, 1.0, 1.0, 1.0], "min", 0.15, 1, 4),  # steps under 0.15 are not improvements
        ([1.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0], "max", 0.0, 1, 6),
    ],
)
def test_early_stopping_stops_after_patience_evaluations_without_improvement(
    values, mode, min_delta, patience, stop_step
):
    _, step, _, state, loader = make_problem()
    stopper = ft.callbacks.EarlyStopping("eval/loss", mode=mode, patience=patience, min_delta=min_delta)
    state, history = fit(
        step, state, loader, epochs=3, eval_step=scripted_eval(values), eval_loader=[None], eval_every=1,
        callbacks=[stopper],
    )  # fmt: skip
    assert int(state.step) == stop_step and len(history["eval"]) == stop_step
    assert history["stop_reason"].startswith("EarlyStopping: eval/loss has not improved")


def test_early_stopping_arguments_are_checked():
    with pytest.raises(ValueError, match="patience"):
        ft.callbacks.EarlyStopping(patience=-1)
    with pytest.raises(ValueError, match="mode"):
        ft.callbacks.EarlyStopping(mode="lowest")
    with pytest.raises(ValueError, match="split"):
        ft.callbacks.EarlyStopping("test/loss")
    _, step, _, state, loader = make_problem()
    with pytest.raises(KeyError, match="train/accuracy is not logged; train logs have"):
        fit(step, state, loader, epochs=1, callbacks=[ft.callbacks.EarlyStopping("accuracy")])


@pytest.mark.parametrize("log_every,stop_step", [(1, 3), (4, 4)])
def test_a_non_finite_loss_stops_training_with_a_message_and_is_never_checkpointed(tmp_path, log_every, stop_step):
    """Batch 3 holds a NaN: the loss and then the params turn NaN. Training stops at the first log that sees it;
    no checkpoint of a NaN state is written, so the latest checkpoint is the last good step."""
    x, y = make_data(n=40)
    x[16:24] = float("nan")  # the third batch, with shuffling off

    _, step, _, state, _ = make_problem()
    checkpoint = ft.callbacks.Checkpoint(tmp_path, every_steps=1, every_epochs=None, keep=10)
    with pytest.warns(RuntimeWarning) as caught:
        state, history = fit(
            step, state, ShuffledLoader(x, y, 8, shuffle=False), epochs=2, log_every=log_every,
            callbacks=[ft.callbacks.StopOnNonFinite(), checkpoint],
        )  # fmt: skip
    messages = [str(w.message) for w in caught]
    stop = f"StopOnNonFinite: the loss is nan in the {log_every} steps up to step {stop_step}; training stopped."
    assert [m for m in messages if m.startswith("StopOnNonFinite")] == [stop + history["stop_reason"][len(stop) :]]
    assert "Checkpoint: not saving step 3: the state holds NaN or inf" in messages  # the first NaN state
    assert int(state.step) == stop_step and "lower learning rate" in history["stop_reason"]
    assert ft.latest_checkpoint(tmp_path).name == "step-00000002.pt"


# ----------------------------------------------------------------------------- loggers


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_log_holds_the_history_and_a_resumed_run_reads_as_one_run(tmp_path):
    _, step, evaluate, state, loader = make_problem()
    eval_args = {"eval_step": evaluate, "eval_loader": [make_data(n=8, seed=5)]}
    torch.manual_seed(0)
    logger = ft.callbacks.JSONLogger(tmp_path / "a.jsonl")
    _, history = fit(step, state, loader, epochs=2, callbacks=[logger], **eval_args)
    records = read_jsonl(tmp_path / "a.jsonl")
    assert [r for r in records if r.pop("split") == "train"] == history["train"]
    assert [r for r in read_jsonl(tmp_path / "a.jsonl") if r.pop("split") == "eval"] == history["eval"]

    class Crash(ft.Callback):
        def on_step_end(self, loop):
            if loop.step == 8:
                raise KeyboardInterrupt

    def callbacks():  # the interrupted run logs steps 7-8 after its last checkpoint (step 6)
        checkpoint = ft.callbacks.Checkpoint(tmp_path / "ckpt", every_steps=3)
        return [checkpoint, ft.callbacks.JSONLogger(tmp_path / "b.jsonl")]

    _, step, evaluate, state, loader = make_problem()
    eval_args["eval_step"] = evaluate
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        fit(step, state, loader, epochs=2, callbacks=[*callbacks(), Crash()], **eval_args)
    assert read_jsonl(tmp_path / "b.jsonl")[-1]["step"] == 8
    _, step, evaluate, state, loader = make_problem()
    eval_args["eval_step"] = evaluate
    fit(step, state, loader, epochs=2, callbacks=callbacks(), resume=tmp_path / "ckpt", **eval_args)
    assert read_jsonl(tmp_path / "b.jsonl") == read_jsonl(tmp_path / "a.jsonl")


def test_jsonl_writes_non_finite_values_as_strings(tmp_path):
    logger = ft.callbacks.JSONLogger(tmp_path / "x.jsonl")
    logger._write({"step": 1, "loss": math.nan, "g": -math.inf, "acc": 0.5})
    assert read_jsonl(tmp_path / "x.jsonl") == [{"step": 1, "loss": "nan", "g": "-inf", "acc": 0.5}]


def test_tensorboard_scalars_equal_the_history(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, step, evaluate, state, loader = make_problem()
    _, history = fit(
        step, state, loader, epochs=2, eval_step=evaluate, eval_loader=[make_data(n=8, seed=5)],
        callbacks=[ft.callbacks.TensorBoard(tmp_path)],
    )  # fmt: skip
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert {"train/loss", "train/acc", "train/lr", "train/weight_decay", "eval/loss", "eval/acc"} <= set(
        events.Tags()["scalars"]
    )
    for split, name in [("train", "loss"), ("train", "lr"), ("eval", "acc")]:
        scalars = events.Scalars(f"{split}/{name}")
        assert [s.step for s in scalars] == [r["step"] for r in history[split]]
        assert [s.value for s in scalars] == pytest.approx([r[name] for r in history[split]], rel=1e-6)


def test_tensorboard_without_the_package_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ImportError, match=r"pip install 'functrain\[tensorboard\]'"):
        ft.callbacks.TensorBoard("runs")


def test_progress_bar_shows_rate_loss_and_lr_and_is_quiet_when_not_a_tty(capsys):
    pytest.importorskip("tqdm")
    _, step, _, state, loader = make_problem()
    fit(step, state, loader, epochs=2, callbacks=[ft.callbacks.ProgressBar()])
    assert capsys.readouterr().err == ""  # pytest's captured stderr is not a terminal
    _, step, _, state, loader = make_problem()
    fit(step, state, loader, epochs=2, callbacks=[ft.callbacks.ProgressBar(disable=False)])
    err = capsys.readouterr().err
    assert "10/10" in err and "step/s" in err and "loss=" in err and "lr=0.01" in err and "epoch 1" in err


# ----------------------------------------------------------------------------- Profiler


def _traces(folder):
    return sorted(folder.glob("*.pt.trace.json"))


def _profiled_steps(trace) -> list[int]:
    events = json.loads(trace.read_text())["traceEvents"]
    return sorted(int(e["name"].split("#")[1]) for e in events if e.get("name", "").startswith("ProfilerStep#"))


def test_profiler_writes_one_chrome_trace_per_window_of_the_scheduled_steps(tmp_path):
    """wait 2, warmup 1, active 2, twice, over 10 steps: two traces, steps 3-4 and 8-9, each with the
    step's ops (the model's matrix products) and their memory, in the JSON Perfetto and TensorBoard read."""
    profiler = ft.callbacks.Profiler(tmp_path / "profile", wait=2, warmup=1, active=2, repeat=2)
    runs = []
    for callbacks in ([], [profiler]):
        _, step, _, state, loader = make_problem()  # a loader of its own: it keeps its cursor
        torch.manual_seed(0)  # dropout
        runs.append(fit(step, state, loader, epochs=2, callbacks=callbacks)[0])
    plain, profiled = runs
    traces = _traces(tmp_path / "profile")
    assert [_profiled_steps(t) for t in traces] == [[3, 4], [8, 9]]
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"aten::addmm", "aten::mm"} & names, sorted(n for n in names if n and n.startswith("aten::"))[:20]
    assert any(e.get("name") == "[memory]" for e in events), "profile_memory recorded no allocations"
    for a, b in zip(ft._tree.leaves(plain.params), ft._tree.leaves(profiled.params)):
        assert torch.equal(a, b), "profiling changed the training"


def test_profiler_writes_a_window_training_ends_inside(tmp_path):
    _, step, _, state, loader = make_problem()
    profiler = ft.callbacks.Profiler(tmp_path, wait=0, warmup=1, active=100)
    fit(step, state, loader, steps=4, callbacks=[profiler])
    (trace,) = _traces(tmp_path)
    # steps 1-3 recorded; #4 is the range the last step's end opened, empty: training ended there
    assert _profiled_steps(trace) == [1, 2, 3, 4]


def test_an_exception_closes_the_profiler_the_progress_bar_and_tensorboard(tmp_path):
    """What they opened is closed where training failed: the profiler's open window is written (a trace of the
    steps before the failure, the one thing a user wants from a crashed run) and it stops, so a later profile in
    the process can start; the bar and the event file close."""
    from tests.test_loop import Raise

    pytest.importorskip("tensorboard")
    pytest.importorskip("tqdm")
    _, step, _, state, loader = make_problem()
    profiler = ft.callbacks.Profiler(tmp_path / "profile", wait=0, warmup=1, active=100)
    bar, board = ft.callbacks.ProgressBar(disable=True), ft.callbacks.TensorBoard(tmp_path / "tb")
    with pytest.raises(MemoryError):
        fit(step, state, loader, steps=8, log_every=1, callbacks=[profiler, bar, board, Raise(3, MemoryError())])
    (trace,) = _traces(tmp_path / "profile")
    assert _profiled_steps(trace) == [1, 2, 3]  # step 3's range opened at step 2's end; step 3 ended in the error
    assert profiler.profiler is None and bar.bar is None and board.writer is None
    assert torch.autograd.profiler._is_profiler_enabled is False
    fit(step, state, loader, steps=2, callbacks=[ft.callbacks.Profiler(tmp_path / "again", wait=0, active=1)])
    assert len(_traces(tmp_path / "again")) == 1


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"active": 0}, ValueError, "Profiler: active must be an int >= 1"),
        ({"wait": -1}, ValueError, "Profiler: wait must be an int >= 0"),
        ({"repeat": 1.5}, TypeError, "Profiler: repeat must be an int >= 0"),
        ({"with_stack": 1}, TypeError, "Profiler: with_stack must be a bool"),
        *(
            [({"memory_snapshot": True}, ValueError, "memory_snapshot records the CUDA caching allocator")]
            if not torch.cuda.is_available()
            else []
        ),
    ],
)
def test_profiler_arguments_are_checked(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        ft.callbacks.Profiler(tmp_path, **kwargs)


# ----------------------------------------------------------------------------- Throughput


def _flops_of_make_model(batch_size: int) -> int:
    """make_model's matrix products for one step: Linear(6, 16) forward and weight gradient (the
    inputs need no gradient), Linear(16, 3) forward, weight and input gradients."""
    return 2 * batch_size * (2 * 6 * 16 + 3 * 16 * 3)


class FakeClock:
    """Stands in for time.perf_counter in functrain.callbacks: each training step takes ``step_s``,
    each evaluation ``eval_s``, so the rates have exact expected values."""

    def __init__(self, step_s: float = 0.5, eval_s: float = 10.0):
        self.now, self.step_s, self.eval_s = 100.0, step_s, eval_s

    def __call__(self) -> float:
        return self.now

    def timed(self, fn, seconds_attr):
        def run(*args):
            self.now += getattr(self, seconds_attr)
            return fn(*args)

        return run


@pytest.mark.parametrize("inplace", [False, True])
def test_count_flops_counts_the_matrix_products_and_leaves_training_unchanged(inplace):
    """The count equals make_model's products; the extra step it runs touches neither the state (an
    in-place step included) nor the random stream (dropout): training with Throughput(step=) is bitwise the
    training without it."""
    runs = []
    for with_throughput in (False, True):
        model, _, _, state, loader = make_problem()
        tx = ft.inject_hyperparams(ft.adamw)(lr=1e-2, weight_decay=0.1)
        step = ft.make_train_step(model, classification, tx, inplace=inplace)
        callbacks = [ft.callbacks.Throughput(step=step)] if with_throughput else []
        torch.manual_seed(0)
        runs.append(fit(step, state, loader, epochs=2, callbacks=callbacks))
    (plain, _), (measured, history) = runs
    assert_bitwise_equal(plain, measured)
    # 8 samples per step, FLOPs per step as counted by hand: the achieved FLOP/s is that many per sample
    for record in history["train"]:
        assert record["flops_per_s"] / record["samples_per_s"] == pytest.approx(_flops_of_make_model(8) / 8)


def test_throughput_rates_come_from_the_time_between_logs(monkeypatch):
    """With each step taking 0.5 s: 8 samples / 0.5 s, 6 tokens a sample, FLOPs and MFU exactly; the first
    step (compilation) and the evaluations' time are not counted."""
    clock = FakeClock()
    monkeypatch.setattr(ft.callbacks.time, "perf_counter", clock)
    _, step, evaluate, state, loader = make_problem()
    peak = 1e5
    throughput = ft.callbacks.Throughput(
        tokens=lambda batch: batch[0].numel(), flops_per_step=_flops_of_make_model(8), peak_flops=peak
    )
    _, history = fit(
        clock.timed(step, "step_s"), state, loader, epochs=2, log_every=2, callbacks=[throughput],
        eval_step=clock.timed(evaluate, "eval_s"), eval_loader=[make_data(n=8, seed=5)], eval_every=3,
    )  # fmt: skip
    # logs at steps 2, 4, 5 (epoch end), 6, 8, 10: step 1 is the warm-up; evaluations at 3, 5 (epoch end), 6, 9, 10
    assert [r["step"] for r in history["train"]] == [2, 4, 5, 6, 8, 10]
    for record in history["train"]:
        assert record["samples_per_s"] == pytest.approx(8 / 0.5)
        assert record["tokens_per_s"] == pytest.approx(8 * 6 / 0.5)
        assert record["flops_per_s"] == pytest.approx(_flops_of_make_model(8) / 0.5)
        assert record["mfu"] == pytest.approx(_flops_of_make_model(8) / 0.5 / peak)
        assert record["max_rss_gib"] > 0


def test_throughput_entries_reach_the_loggers_and_the_progress_bar_in_any_order(tmp_path, capsys):
    """Listed after the JSONL logger and the progress bar, Throughput still runs first at each log."""
    pytest.importorskip("tqdm")
    _, step, _, state, loader = make_problem()
    callbacks = [ft.callbacks.JSONLogger(tmp_path / "log.jsonl"), ft.callbacks.ProgressBar(disable=False)]
    _, history = fit(step, state, loader, epochs=2, callbacks=[*callbacks, ft.callbacks.Throughput()])
    records = [r for r in read_jsonl(tmp_path / "log.jsonl") if r["split"] == "train"]
    assert [r["samples_per_s"] for r in records[1:]] == [r["samples_per_s"] for r in history["train"][1:]]
    assert "samples_per_s=" in capsys.readouterr().err


def test_throughput_needs_the_batch_from_a_loop_of_your_own():
    _, step, _, state, loader = make_problem()
    loop = ft.Loop([ft.callbacks.Throughput()], log_every=2)
    state = loop.fit_start(state)
    for batch in loader:
        state, metrics = step(state, batch)
        if loop.step == 1:
            with pytest.raises(ValueError, match=r"loop.step_end\(state, metrics, batch\)"):
                loop.step_end(state, metrics)
            break


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"samples": 8}, TypeError, "Throughput: samples must be a function or None"),
        ({"step": lambda s, b: (s, {}), "flops_per_step": 10}, ValueError, "give step= .* or flops_per_step="),
        ({"flops_per_step": 0}, ValueError, "Throughput: flops_per_step must be an int >= 1"),
        ({"flops_per_step": 10, "peak_flops": 0.0}, ValueError, "Throughput: peak_flops must be > 0"),
        ({"peak_flops": 1e12}, ValueError, "peak_flops= gives MFU .* pass step= or flops_per_step="),
    ],
)
def test_throughput_arguments_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        ft.callbacks.Throughput(**kwargs)


@pytest.mark.slow
def test_count_flops_counts_a_compiled_step_as_its_eager_twin():
    """FlopCounterMode sees only eager ops: a compiled step is counted under set_stance("force_eager")."""
    model, _, _, state, loader = make_problem()
    tx = ft.inject_hyperparams(ft.adamw)(lr=1e-2, weight_decay=0.1)
    step = ft.make_train_step(model, classification, tx, compile=True)
    batch = next(iter(loader))
    state, _ = step(state, batch)  # compiled here, as in a fit
    assert ft.callbacks.count_flops(step, state, batch) == _flops_of_make_model(8)
