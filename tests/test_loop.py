"""fit and Loop: equal to a hand-written loop, metrics means, host syncs per log, events, callbacks that change
the state, custom loops with the same callbacks, device selection, bad arguments.

The small loader and problem defined here are shared by test_checkpoint.py and test_callbacks.py (and by the
training script that test_checkpoint.py runs in a subprocess)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft
from functrain import _tree

# ----------------------------------------------------------------------------- shared fixtures


class ShuffledLoader:
    """The functrain.data loader contract in miniature: one pass is one epoch, reshuffled each epoch from
    ``seed + epoch``; ``len`` is batches per epoch; ``state_dict`` is the cursor ``(epoch, index)`` of the next
    batch. A batch counts as consumed when it is handed out, so after an epoch's last batch the cursor reads
    ``(epoch + 1, 0)``; breaking out of the loop leaves it where it stopped."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0, shuffle: bool = True):
        self.x, self.y, self.batch_size, self.seed, self.shuffle = x, y, batch_size, seed, shuffle
        self.epoch, self.index = 0, 0

    def __len__(self) -> int:
        return len(self.x) // self.batch_size

    def __iter__(self):
        epoch, start = self.epoch, self.index
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.x), generator=g) if self.shuffle else torch.arange(len(self.x))
        for i in range(start, len(self)):
            rows = order[i * self.batch_size : (i + 1) * self.batch_size]
            self.epoch, self.index = (epoch + 1, 0) if i + 1 == len(self) else (epoch, i + 1)
            yield self.x[rows], self.y[rows]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]


def classification(model, batch):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}


def make_model(seed: int = 0, dropout: float = 0.3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 3))


def make_data(n: int = 40, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def make_problem(batch_size: int = 8, seed: int = 0, lr: float = 1e-2, dropout: float = 0.3):
    """model, train step, eval step, initial state, loader: 5 batches per epoch, dropout and shuffling on."""
    model = make_model(seed, dropout)
    tx = ft.inject_hyperparams(ft.adamw)(lr=lr, weight_decay=0.1)
    step = ft.make_train_step(model, classification, tx)
    evaluate = ft.make_eval_step(model, classification)
    return model, step, evaluate, ft.TrainState.create(model, tx), ShuffledLoader(*make_data(), batch_size)


def assert_bitwise_equal(a, b):
    _tree.check_same_structure(a, b, "a", "b")
    for (name, x), (_, y) in zip(_tree.named_leaves(a), _tree.named_leaves(b)):
        assert torch.equal(x, y), f"{name} differs"


# ----------------------------------------------------------------------------- fit is the loop you would write


def test_fit_equals_a_hand_written_loop_and_logs_the_means_of_each_interval():
    """Params bitwise equal to ``for batch in loader: state, m = step(state, batch)``; each logged value is the
    mean (in float64) of that interval's per-step metrics; eval logs are the means over the eval batches."""
    _, step, evaluate, state, loader = make_problem()
    eval_data = [tuple(t[:8] for t in make_data(seed=7))] * 2
    torch.manual_seed(123)
    fitted, history = ft.fit(
        step, state, loader, epochs=2, log_every=2, eval_step=evaluate, eval_loader=eval_data, callbacks=[],
        device="cpu",
    )  # fmt: skip

    _, step, evaluate, state, loader = make_problem()
    torch.manual_seed(123)
    per_step, expected_eval = [], []
    for _ in range(2):
        for batch in loader:
            state, metrics = step(state, batch)
            per_step.append({k: v.double() for k, v in metrics.items()})
        expected_eval.append(evaluate(state, eval_data[0]))
    assert_bitwise_equal(fitted, state)

    # 5 steps per epoch, log_every=2: logs after steps 2, 4, 5 (epoch end), 6, 8, 10
    intervals = [(0, 2), (2, 4), (4, 5), (5, 6), (6, 8), (8, 10)]
    assert [r["step"] for r in history["train"]] == [end for _, end in intervals]
    assert [r["epoch"] for r in history["train"]] == [0, 0, 0, 1, 1, 1]
    for record, (start, end) in zip(history["train"], intervals):
        for name in ("loss", "acc"):
            expected = torch.stack([m[name] for m in per_step[start:end]]).mean().item()
            assert math.isclose(record[name], expected, rel_tol=1e-12), (name, start, end)
        assert record["lr"] == 1e-2 and record["weight_decay"] == pytest.approx(0.1)
    assert [r["step"] for r in history["eval"]] == [5, 10]
    for record, expected in zip(history["eval"], expected_eval):
        assert record["loss"] == pytest.approx(expected["loss"].item(), rel=1e-6)
        assert record["acc"] == pytest.approx(expected["acc"].item(), rel=1e-6)


def test_steps_counts_the_states_steps_in_all_and_eval_every_counts_steps():
    _, step, evaluate, state, loader = make_problem()
    state, history = ft.fit(
        step, state, loader, steps=7, eval_step=evaluate, eval_loader=[next(iter(ShuffledLoader(*make_data(), 8)))],
        eval_every=3, log_every=100, callbacks=[], device="cpu",
    )  # fmt: skip
    assert int(state.step) == 7
    assert [r["step"] for r in history["eval"]] == [3, 6]
    assert [r["step"] for r in history["train"]] == [5, 7]  # epoch end, then fit end
    more, history = ft.fit(step, state, loader, steps=9, callbacks=[], device="cpu")
    assert int(more.step) == 9 and history["train"][-1]["step"] == 9


class Recorder(ft.Callback):
    """Records each event with the loop's counters."""

    def __init__(self):
        self.events = []

    def _record(self, name, loop):
        self.events.append((name, loop.step, loop.epoch, loop.batch))

    def on_fit_start(self, loop):
        self._record("fit_start", loop)

    def on_epoch_start(self, loop):
        self._record("epoch_start", loop)

    def on_log(self, loop):
        self._record("log", loop)

    def on_eval_end(self, loop):
        self._record("eval_end", loop)

    def on_step_end(self, loop):
        self._record("step_end", loop)

    def on_epoch_end(self, loop):
        self._record("epoch_end", loop)

    def on_fit_end(self, loop):
        self._record("fit_end", loop)

    def on_exception(self, loop):
        self._record(f"exception {type(loop.exception).__name__}", loop)


def test_events_come_in_the_documented_order():
    _, step, evaluate, state, _ = make_problem()
    loader = ShuffledLoader(*make_data(n=16), batch_size=8)  # 2 batches per epoch
    recorder = Recorder()
    ft.fit(
        step, state, loader, epochs=2, eval_step=evaluate, eval_loader=[make_data(n=8)], log_every=2,
        callbacks=[recorder], device="cpu",
    )  # fmt: skip
    assert recorder.events == [
        ("fit_start", 0, 0, 0),
        ("epoch_start", 0, 0, 0),
        ("step_end", 1, 0, 1),
        ("log", 2, 0, 2),
        ("step_end", 2, 0, 2),
        ("eval_end", 2, 0, 2),  # once per epoch: after the epoch's last step
        ("epoch_end", 2, 0, 2),
        ("epoch_start", 2, 1, 0),
        ("step_end", 3, 1, 1),
        ("log", 4, 1, 2),
        ("step_end", 4, 1, 2),
        ("eval_end", 4, 1, 2),
        ("epoch_end", 4, 1, 2),
        ("fit_end", 4, 2, 0),
    ]


class Raise(ft.Callback):
    def __init__(self, at_step, error):
        self.at_step, self.error = at_step, error

    def on_step_end(self, loop):
        if loop.step == self.at_step:
            raise self.error


class Broken(ft.Callback):
    def on_exception(self, loop):
        raise OSError("disk full")


@pytest.mark.parametrize("error", [ValueError("loss went the wrong way"), KeyboardInterrupt()], ids=["error", "stop"])
def test_an_exception_ends_the_events_with_on_exception_and_reaches_the_caller(error):
    """on_exception comes in place of the events still to come, on every callback, even after one raising in
    it (noted on the exception); the exception reaches the caller as it was raised."""
    _, step, _, state, _ = make_problem()
    loader = ShuffledLoader(*make_data(n=16), batch_size=8)  # 2 batches per epoch
    first, last = Recorder(), Recorder()
    with pytest.raises(type(error)) as raised:
        callbacks = [first, Raise(3, error), Broken(), last]
        ft.fit(step, state, loader, epochs=2, log_every=2, callbacks=callbacks, device="cpu")
    assert raised.value is error
    name = type(error).__name__
    assert first.events[-3:] == [("epoch_start", 2, 1, 0), ("step_end", 3, 1, 1), (f"exception {name}", 3, 1, 1)]
    assert last.events[-2:] == [("epoch_start", 2, 1, 0), (f"exception {name}", 3, 1, 1)]  # its step_end never came
    assert error.__notes__ == ["Broken.on_exception raised too: OSError: disk full"]


def test_a_step_that_raises_reaches_on_exception_before_the_caller():
    _, step, _, state, loader = make_problem()

    def failing(state, batch):
        raise RuntimeError("CUDA out of memory")  # what a step raises: not a callback's own error

    recorder = Recorder()
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        ft.fit(failing, state, loader, epochs=1, callbacks=[recorder], device="cpu")
    assert recorder.events == [("fit_start", 0, 0, 0), ("epoch_start", 0, 0, 0), ("exception RuntimeError", 0, 0, 0)]


# ----------------------------------------------------------------------------- host syncs


_SYNCING = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "__format__")
_SYNCING += ("__array__",)


class SyncCounter(ft.Callback):
    """Counts the calls of every Tensor method that reads a value back to the host, and records the count
    at each event (it must not sync itself: it reads only Python counters)."""

    def __init__(self, monkeypatch):
        self.count, self.at = 0, []
        # Factories check CPU tensor hyperparameters by reading them (free on the CPU); inject_hyperparams rebuilds
        # the optimiser each step, and on a GPU those tensors are not read. Count as a GPU would.
        monkeypatch.setattr(ft._validate, "_readable", lambda value: False)
        for name in _SYNCING:
            original = getattr(torch.Tensor, name)

            def counting(*args, _original=original, **kwargs):
                self.count += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counting)

    def on_fit_start(self, loop):
        self.at.append(("fit_start", loop.step, self.count))

    def on_step_end(self, loop):
        self.at.append(("step", loop.step, self.count))

    def on_epoch_end(self, loop):
        self.at.append(("epoch_end", loop.step, self.count))


@pytest.mark.parametrize("log_every", [1, 5])
def test_one_host_sync_per_logged_interval_with_every_built_in_callback(monkeypatch, tmp_path, log_every):
    """Between two logs the loop (train step, metric means, progress bar, JSONL, early stopping, non-finite check,
    TensorBoard) reads nothing back from the device; each log is exactly one read (all means and the learning
    rate together), each evaluation one more. A loop that read the loss every step would fail this."""
    _, step, evaluate, state, _ = make_problem()
    loader = ShuffledLoader(*make_data(n=80), batch_size=8)  # 10 batches per epoch
    counter = SyncCounter(monkeypatch)
    callbacks = [
        ft.callbacks.StopOnNonFinite(),
        ft.callbacks.ProgressBar(disable=False),
        ft.callbacks.JSONLogger(tmp_path / "log.jsonl"),
        ft.callbacks.EarlyStopping("loss", patience=100),
        ft.callbacks.EarlyStopping("eval/acc", mode="max", patience=100),
    ]
    try:
        callbacks.append(ft.callbacks.TensorBoard(tmp_path / "tb"))
    except ImportError:
        pass
    eval_batch = next(iter(ShuffledLoader(*make_data(), 8)))
    ft.fit(
        step, state, loader, epochs=2, log_every=log_every, eval_step=evaluate, eval_loader=[eval_batch],
        callbacks=[*callbacks, counter], device="cpu",
    )  # fmt: skip
    assert counter.at[0] == ("fit_start", 0, 1)  # before training: reading state.step once
    syncs = [(event, at, count - before) for (event, at, count), (*_, before) in zip(counter.at[1:], counter.at)]
    expected = []
    for s in range(1, 21):
        expected.append(("step", s, 1 if s % log_every == 0 else 0))
        if s % 10 == 0:
            expected.append(("epoch_end", s, 1))  # the evaluation (the epoch's log already happened)
    assert syncs == expected


# ----------------------------------------------------------------------------- callbacks change the state


class DivideLrAfterEpoch(ft.Callback):
    def __init__(self, epoch, factor):
        self.epoch, self.factor = epoch, factor

    def on_epoch_end(self, loop):
        if loop.epoch == self.epoch:
            return ft.set_hyperparams(loop.state, lr=loop.logs["lr"] / self.factor)


def test_a_callback_changes_the_injected_learning_rate_by_returning_a_new_state():
    """Equal, bit for bit, to a hand-written loop that replaces opt_state.hyperparams["lr"] after epoch 0; the
    history shows the new rate; and a run without the callback differs (the change took effect)."""
    _, step, _, state, loader = make_problem()
    torch.manual_seed(0)
    fitted, history = ft.fit(
        step, state, loader, epochs=2, log_every=5, callbacks=[DivideLrAfterEpoch(0, 10)], device="cpu"
    )
    assert [r["lr"] for r in history["train"]] == [1e-2, pytest.approx(1e-3)]

    _, step, _, state, loader = make_problem()
    torch.manual_seed(0)
    for epoch in range(2):
        for batch in loader:
            state, _ = step(state, batch)
        if epoch == 0:
            opt = state.opt_state
            lr = opt.hyperparams["lr"]
            state = state._replace(opt_state=opt._replace(hyperparams={**opt.hyperparams, "lr": lr / 10}))
    assert_bitwise_equal(fitted, state)

    _, step, _, state, loader = make_problem()
    torch.manual_seed(0)
    unchanged, _ = ft.fit(step, state, loader, epochs=2, callbacks=[], device="cpu")
    assert not torch.equal(unchanged.params["4.weight"], fitted.params["4.weight"])


def test_hyperparams_reads_every_injected_value_with_dotted_names_for_tuples_and_several_states():
    state = ft.TrainState.create(nn.Linear(2, 1), ft.sgd(lr=0.1))
    assert ft.hyperparams(state) == {}
    state = ft.TrainState.create(nn.Linear(2, 1), ft.inject_hyperparams(ft.adam)(lr=0.1, betas=(0.9, 0.99)))
    values = ft.hyperparams(state)
    assert {"lr", "betas.0", "betas.1"} <= set(values)
    assert values["lr"] is state.opt_state.hyperparams["lr"]  # no copy, no host read
    assert values["betas.1"] is state.opt_state.hyperparams["betas"][1]
    both = ft.hyperparams((state, state))
    assert both["1.opt_state.lr"] is state.opt_state.hyperparams["lr"] and "lr" not in both


# ----------------------------------------------------------------------------- custom loops


def test_a_custom_two_model_loop_uses_the_same_callbacks_without_fit(tmp_path):
    """A GAN-shaped loop (two states, two steps per batch) driven through Loop: running means of both losses,
    the JSONL log, a learning-rate callback on the tuple state, and early stopping that ends the loop."""
    gen, disc = nn.Linear(4, 6), nn.Linear(6, 1)
    tx = ft.inject_hyperparams(ft.sgd)(lr=0.05)
    g_step = ft.make_train_step(gen, lambda m, z: -disc(m(z)).mean(), tx)
    d_step = ft.make_train_step(disc, lambda m, b: F.softplus(-m(b[0])).mean() + F.softplus(m(b[1])).mean(), tx)

    class HalveBoth(ft.Callback):
        def on_epoch_end(self, loop):
            lrs = [loop.logs[f"{i}.opt_state.lr"] for i in range(2)]
            return tuple(ft.set_hyperparams(s, lr=lr / 2) for s, lr in zip(loop.state, lrs))

    class StopAfter(ft.Callback):
        def on_step_end(self, loop):
            if loop.step == 7:
                loop.stop("enough")

    loop = ft.Loop([HalveBoth(), ft.callbacks.JSONLogger(tmp_path / "gan.jsonl"), StopAfter()], log_every=2)
    states = loop.fit_start((ft.TrainState.create(gen, tx), ft.TrainState.create(disc, tx)))
    torch.manual_seed(0)
    d_losses = []
    for _ in range(3):
        if loop.finished:
            break
        states = loop.epoch_start(states)
        for real in torch.randn(4, 8, 6):
            fake = torch.func.functional_call(gen, states[0].params, (torch.randn(8, 4),)).detach()
            d_state, d_metrics = d_step(states[1], (real, fake))
            g_state, g_metrics = g_step(states[0], torch.randn(8, 4))
            d_losses.append(d_metrics["loss"].double())
            states = loop.step_end((g_state, d_state), {"g_loss": g_metrics["loss"], "d_loss": d_metrics["loss"]})
            if loop.finished:
                break
        else:
            states = loop.epoch_end(states)
    states = loop.fit_end(states)

    assert loop.step == 7 and loop.history["stop_reason"] == "enough"
    assert [r["step"] for r in loop.history["train"]] == [2, 4, 6, 7]
    assert loop.history["train"][2]["d_loss"] == pytest.approx(torch.stack(d_losses[4:6]).mean().item(), rel=1e-12)
    assert [r["0.opt_state.lr"] for r in loop.history["train"]] == [0.05, 0.05, 0.025, 0.025]
    assert float(ft.hyperparams(states[1])["lr"]) == 0.025
    logged = (tmp_path / "gan.jsonl").read_text().splitlines()
    assert [__import__("json").loads(line)["step"] for line in logged] == [2, 4, 6, 7]


# ----------------------------------------------------------------------------- devices and bad input


def test_default_device_is_cuda_when_available_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ft.default_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ft.default_device() == torch.device("cpu")


def test_fit_moves_state_and_batches_to_the_device(monkeypatch):
    """``device=None`` uses default_device(); the step sees the state and each batch there."""
    seen = []

    def step(state, batch):
        seen.append((state.step.device, batch[0].device))
        return state._replace(step=state.step + 1), {"loss": batch[0].sum()}

    model = nn.Linear(6, 3)
    state = ft.TrainState.create(model, ft.sgd(lr=0.1))
    monkeypatch.setattr(ft.loop, "default_device", lambda: torch.device("cpu"))
    _, history = ft.fit(step, state, ShuffledLoader(*make_data(n=16), 8), epochs=1, callbacks=[])
    assert seen == [(torch.device("cpu"), torch.device("cpu"))] * 2 and len(history["train"]) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("throughput", [False, True])
def test_fit_on_cuda_from_a_cpu_state_syncs_once_per_log(throughput):
    """On a GPU: the state moves to CUDA, the result matches the CPU run, and torch's sync debug mode sees at
    most one synchronising call per log (and the evaluation) beyond the first step's, with Throughput (its
    FLOP count, rates and peak memory) too."""
    _, step, _, state, loader = make_problem(dropout=0.0)
    cpu, _ = ft.fit(step, state, loader, epochs=2, callbacks=[], device="cpu")
    _, step, _, state, loader = make_problem(dropout=0.0)
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            callbacks = [ft.callbacks.Throughput(step=step)] if throughput else []
            gpu, history = ft.fit(step, state, loader, epochs=2, log_every=5, callbacks=callbacks, device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert gpu.params["0.weight"].is_cuda
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1 + len(history["train"]), [str(w.message) for w in syncs]
    if throughput:
        assert all(r["max_memory_gib"] > 0 and r["flops_per_s"] > 0 for r in history["train"][1:])
    for name in cpu.params:
        torch.testing.assert_close(gpu.params[name].cpu(), cpu.params[name], rtol=1e-4, atol=1e-5)


def test_bad_arguments():
    _, step, evaluate, state, loader = make_problem()
    with pytest.raises(ValueError, match="exactly one of epochs and steps"):
        ft.fit(step, state, loader, callbacks=[])
    with pytest.raises(ValueError, match="exactly one of epochs and steps"):
        ft.fit(step, state, loader, epochs=1, steps=3, callbacks=[])
    with pytest.raises(ValueError, match="epochs"):
        ft.fit(step, state, loader, epochs=0, callbacks=[])
    with pytest.raises(ValueError, match="eval_step and eval_loader"):
        ft.fit(step, state, loader, epochs=1, eval_step=evaluate, callbacks=[])
    with pytest.raises(ValueError, match="log_every"):
        ft.fit(step, state, loader, epochs=1, log_every=0, callbacks=[])
    with pytest.raises(TypeError, match="Callback"):
        ft.fit(step, state, loader, epochs=1, callbacks=[print])
    with pytest.raises(ValueError, match="no batches"):
        ft.fit(step, state, [], epochs=1, callbacks=[])
    with pytest.raises(ValueError, match="pass checkpoint= as well"):
        ft.fit(step, state, loader, epochs=1, callbacks=[], resume=True)


def test_steps_that_end_an_epoch_still_end_it_and_evaluate():
    """``steps=`` landing on an epoch boundary runs the epoch's end (evaluation, callbacks) as ``epochs=`` would."""
    x, y = make_data(n=8, seed=9)
    runs = []
    for until in ({"steps": 10}, {"epochs": 2}):  # 5 batches per epoch
        _, step, evaluate, state, loader = make_problem()
        runs.append(ft.fit(step, state, loader, eval_step=evaluate, eval_loader=[(x, y)], callbacks=[], device="cpu",
                           **until)[1])  # fmt: skip
    assert len(runs[0]["eval"]) == 2
    assert runs[0] == runs[1]
