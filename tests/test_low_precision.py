"""ft.low_precision_state: an optimiser's state kept in bfloat16 with stochastic rounding.

The registry runs ``low_precision_state(adamw, dtype=torch.float64)`` (nothing narrowed: AdamW exactly)
through the common battery (tests/specs_wrappers.py). Here: the bfloat16 behaviour. Stochastic rounding
is unbiased and lands on a neighbour; over 2,000 steps a bf16-state AdamW with it stays near the fp32-state
run while round-to-nearest drifts; state dtypes; checkpoint resume and compiled steps draw the same bits.
"""

from __future__ import annotations

import io
import re

import pytest
import torch

import functrain as ft
from functrain import _tree
from functrain.wrappers._low_precision import _step_key, _stream, stochastic_round_to_bf16

from .harness import gradient, make_params, relative_error, run_functrain

# ----------------------------------------------------------------------------- the rounding itself


def neighbours(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The two values of ``dtype`` around ``x`` (towards zero, away from zero), found by nextafter."""
    nearest = x.to(dtype)
    overshot = nearest.to(x.dtype).abs() > x.abs()
    toward = torch.where(overshot, torch.nextafter(nearest, torch.zeros_like(nearest)), nearest)
    away = torch.nextafter(toward, torch.where(x < 0, -torch.inf, torch.inf).to(dtype))
    return toward, away


@pytest.mark.parametrize("wide", [torch.float32, torch.float64], ids=str)
def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour(wide):
    """Mean of N independent roundings equals x within 5 standard errors, ulp * sqrt(p (1 - p) / N)."""
    narrow = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, generator=g, dtype=torch.float64) * torch.logspace(-4, 4, 64, dtype=torch.float64)).to(wide)
    n = 20_000
    repeated = x.expand(n, -1).contiguous()
    rounded = stochastic_round_to_bf16(repeated, _stream(_step_key(torch.tensor(7), torch.tensor(3)), 0, repeated))
    assert rounded.dtype == narrow
    toward, away = neighbours(x.float(), narrow)  # float64: its nearest float32 is what gets rounded
    assert ((rounded == toward) | (rounded == away)).all()
    low, high = toward.double(), away.double()
    p = (x.float().double() - low) / (high - low)
    bound = 5 * (high - low).abs() * torch.sqrt(p * (1 - p) / n)  # (away - toward < 0 for x < 0)
    error = (rounded.double().mean(0) - x.float().double()).abs()
    assert (error <= bound + 1e-12 * x.double().abs()).all(), (error / bound).max()
    # The frequency of rounding away is p: a stream that always rounded the same way would fail this.
    assert ((rounded == away).double().mean(0) - p).abs().max() <= 5 * (0.25 / n) ** 0.5


def test_values_of_bfloat16_and_special_values_are_kept():
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, 2.0**-133]).to(torch.bfloat16).float()  # bf16 values
    special = torch.tensor([torch.inf, -torch.inf, torch.nan, -torch.nan])
    for x in (exact, special):
        out = stochastic_round_to_bf16(x, _stream(_step_key(torch.tensor(0), torch.tensor(0)), 0, x))
        torch.testing.assert_close(out, x.to(torch.bfloat16), equal_nan=True, rtol=0, atol=0)
        assert torch.equal(torch.signbit(out), torch.signbit(x.to(torch.bfloat16)))


@pytest.mark.slow
def test_compiled_rounding_draws_and_rounds_as_eager_does():
    """Bit for bit, for any count (a tensor: no recompile as it moves)."""
    torch._dynamo.reset()
    x = torch.randn(4096) * torch.logspace(-30, 30, 4096)

    def rounded(x, seed, count):
        return stochastic_round_to_bf16(x, _stream(_step_key(seed, count), 2, x))

    compiled = torch.compile(rounded, fullgraph=True)
    compiled(x, torch.tensor(0), torch.tensor(0))
    with torch.compiler.set_stance("fail_on_recompile"):
        for count in (0, 1, 17, 2**32 + 5):
            args = (x, torch.tensor(5), torch.tensor(count))
            assert torch.equal(compiled(*args).view(torch.int16), rounded(*args).view(torch.int16))


def test_the_stream_depends_on_seed_count_and_position_only():
    like = torch.zeros(3, 1000)
    draw = lambda seed, count, index: _stream(_step_key(torch.tensor(seed), torch.tensor(count)), index, like)  # noqa: E731
    assert torch.equal(draw(1, 2, 3), draw(1, 2, 3))
    for other in (draw(2, 2, 3), draw(1, 3, 3), draw(1, 2, 4), draw(1, 2**32 + 2, 3)):
        assert (other != draw(1, 2, 3)).float().mean() > 0.99
    bits = draw(0, 0, 0)
    assert bits.min() >= 0 and bits.max() < 2**32
    assert abs(bits.double().mean().item() / 2**32 - 0.5) < 0.02  # roughly uniform


# ----------------------------------------------------------------------------- 2,000 steps


def linear_regression():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(256, 16, generator=g), torch.ones(256, 1)], 1)  # a bias column
    y = x @ torch.randn(17, 1, generator=g) + 0.1 * torch.randn(256, 1, generator=g)
    return x, y


def train(tx, steps=2000):
    x, y = linear_regression()
    params = {"w": torch.zeros(17, 1)}
    state = tx.init(params)
    for _ in range(steps):
        grads = {"w": (2.0 / len(x)) * x.T @ (x @ params["w"] - y)}  # of the mean squared error
        updates, state = tx.update(grads, state, params)
        params = ft.apply_updates(params, updates)
    return params["w"], state


def test_bf16_state_with_stochastic_rounding_tracks_fp32_state_where_round_to_nearest_drifts():
    """AdamW (lr 1e-3, betas (0.9, 0.999)) on a 17-parameter linear regression, 2,000 steps, float32
    params. Relative distance of the final params from the fp32-state run, measured: stochastic rounding
    0.0047 (seeds 1-3: 0.0024, 0.0051, 0.0038), round-to-nearest 0.042 (its second moment stalls: a 0.1%
    step is under bf16's half-ulp). Eager, tiny: ~5 s for the three runs on an idle 2-core CPU."""
    make = lambda: ft.adamw(lr=1e-3, weight_decay=0.0)  # noqa: E731
    full, _ = train(make())
    stochastic, state = train(ft.low_precision_state(make()))
    nearest, _ = train(ft.low_precision_state(make(), stochastic_rounding=False))
    distance = lambda w: ((w - full).norm() / full.norm()).item()  # noqa: E731
    assert state.inner_state.inner_state[0].nu["w"].dtype == torch.bfloat16
    assert distance(stochastic) < 0.015
    assert distance(nearest) > 0.03
    assert distance(nearest) > 4 * distance(stochastic)


# ----------------------------------------------------------------------------- state and modes


def test_state_is_stored_in_bf16_and_counts_and_scalars_are_kept():
    params = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    tx = ft.low_precision_state(ft.inject_hyperparams(ft.adamw)(lr=1e-3, amsgrad=True))
    state = tx.init(params)
    for _ in range(2):
        updates, state = tx.update(_tree.map(torch.ones_like, params), state, params)
    assert state.count.dtype == state.seed.dtype == torch.int64 and int(state.count) == 2
    adam = ft.wrappers.hyperparams(state)
    assert all(v.dtype == torch.float64 for v in adam.values())  # injected 0-d hyperparameters: as they were
    moments = [t for t in _tree.leaves(state.inner_state) if t.ndim > 0]
    assert len(moments) == 6 and all(t.dtype == torch.bfloat16 for t in moments)  # mu, nu, nu_max for w and b
    assert all(u.dtype == torch.float32 for u in updates.values())  # the update is computed in float32


@pytest.mark.parametrize(
    "param_dtype, dtype, stored",
    [
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),  # already narrow: kept
        (torch.bfloat16, torch.float32, torch.bfloat16),  # never widened
        (torch.float64, torch.bfloat16, torch.bfloat16),  # stochastically, from the nearest float32
        (torch.float64, torch.float32, torch.float32),  # to nearest
        (torch.float32, torch.float16, torch.float16),  # to nearest
    ],
)
def test_only_wider_tensors_are_narrowed(param_dtype, dtype, stored):
    params = make_params(param_dtype)
    tx = ft.low_precision_state(ft.adam(lr=1e-2), dtype=dtype, stochastic_rounding=dtype == torch.bfloat16)
    new_params, state = params, tx.init(params)
    for t in range(3):
        updates, state = tx.update(gradient(new_params, t), state, new_params)
        new_params = ft.apply_updates(new_params, updates)
    assert {t.dtype for t in _tree.leaves(state.inner_state) if t.ndim > 0} == {stored}
    assert all(p.dtype == param_dtype for p in new_params.values())


def test_round_to_nearest_equals_adamw_with_its_state_cast_each_step():
    """stochastic_rounding=False: exactly AdamW whose moments are cast to bf16 after every update."""
    params = make_params(torch.float32)
    inner = ft.adamw(lr=1e-2)
    tx = ft.low_precision_state(inner, stochastic_rounding=False)
    ours, state = params, tx.init(params)
    theirs, theirs_state = params, _tree.map(lambda t: t.to(torch.bfloat16) if t.ndim else t, inner.init(params))
    for t in range(10):
        updates, state = tx.update(gradient(ours, t), state, ours)
        ours = ft.apply_updates(ours, updates)
        wide = _tree.map(lambda t: t.float() if t.ndim else t, theirs_state)
        their_updates, wide = inner.update(gradient(theirs, t), wide, theirs)
        theirs = ft.apply_updates(theirs, their_updates)
        theirs_state = _tree.map(lambda t: t.to(torch.bfloat16) if t.ndim else t, wide)
    assert relative_error(ours, theirs) == 0.0
    for a, b in zip(_tree.leaves(state.inner_state), _tree.leaves(theirs_state)):
        assert torch.equal(a, b)


def test_float64_storage_is_the_inner_transform_exactly():
    params = make_params()
    tx = ft.sgd(lr=0.05, momentum=0.9, nesterov=True)
    wrapped = ft.low_precision_state(tx, dtype=torch.float64)
    assert relative_error(run_functrain(wrapped, params, 10), run_functrain(tx, params, 10)) == 0.0


def test_seeds_draw_different_roundings_and_the_same_seed_the_same():
    run = lambda seed: train(ft.low_precision_state(ft.adamw(lr=1e-3), seed=seed), steps=20)  # noqa: E731
    (a, sa), (b, sb), (c, _) = run(0), run(0), run(1)
    assert torch.equal(a, b) and torch.equal(
        sa.inner_state.inner_state[0].nu["w"], sb.inner_state.inner_state[0].nu["w"]
    )
    assert not torch.equal(a, c)


def test_checkpoint_round_trip_resumes_the_same_random_stream():
    tx = ft.low_precision_state(ft.adamw(lr=1e-2), seed=3)
    params = make_params(torch.float32)

    def steps(params, state, ts):
        for t in ts:
            updates, state = tx.update(gradient(params, t), state, params)
            params = ft.apply_updates(params, updates)
        return params, state

    params, state = steps(params, tx.init(params), range(5))
    buffer = io.BytesIO()
    torch.save({"params": params, "opt_state": state}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    resumed = steps(loaded["params"], loaded["opt_state"], range(5, 10))
    uninterrupted = steps(params, state, range(5, 10))
    for a, b in zip(_tree.leaves(resumed), _tree.leaves(uninterrupted)):
        assert torch.equal(a, b)


def test_bad_arguments_are_named():
    for kwargs, name, error in [
        ({"dtype": torch.int8}, "dtype", ValueError),
        ({"dtype": "bf16"}, "dtype", ValueError),
        ({"seed": -1}, "seed", ValueError),
        ({"seed": 2**31}, "seed", ValueError),
        ({"seed": 1.5}, "seed", TypeError),
        ({"stochastic_rounding": "yes"}, "stochastic_rounding", TypeError),
        ({"dtype": torch.float16}, "stochastic_rounding", ValueError),  # stochastic rounding: bfloat16 only
    ]:
        with pytest.raises(error, match=re.escape(name)):
            ft.low_precision_state(ft.adamw(), **kwargs)
    with pytest.raises(TypeError, match="tx must be a GradientTransformation"):
        ft.low_precision_state(ft.adamw)


def test_a_state_of_another_dtype_is_refused_by_name():
    params = {"w": torch.zeros(3)}
    full_precision = ft.adamw().init(params)
    tx = ft.low_precision_state(ft.adamw())
    wrong = tx.init(params)._replace(inner_state=full_precision)  # float32 moments where bf16 is stored
    with pytest.raises(ValueError, match=r"differ in dtype .*torch.bfloat16 vs torch.float32"):
        tx.update({"w": torch.ones(3)}, wrong, params)


# ----------------------------------------------------------------------------- compiled


@pytest.mark.slow
def test_compiled_step_writes_the_eager_steps_state_bit_for_bit_and_never_recompiles():
    """From the same params and state, the compiled update stores the same bfloat16 state bit for bit (same
    random bits, same rounding); the params agree to float32 rounding (inductor's AdamW arithmetic)."""
    torch._dynamo.reset()
    tx = ft.low_precision_state(ft.inject_hyperparams(ft.adamw)(lr=1e-2, weight_decay=0.1))

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return ft.apply_updates(params, updates), state

    compiled = torch.compile(step, fullgraph=True)
    params = make_params(torch.float32)
    state = tx.init(params)
    for t in range(6):
        with torch.compiler.set_stance("fail_on_recompile" if t >= 2 else "default"):
            compiled_params, compiled_state = compiled(params, state, gradient(params, t))
        params, state = step(params, state, gradient(params, t))
        for a, b in zip(_tree.leaves(compiled_state), _tree.leaves(state)):
            assert a.dtype == b.dtype and torch.equal(a, b), t
        assert relative_error(compiled_params, params) <= 1e-6


# ----------------------------------------------------------------------------- sharded


def sharded_scenario(rank):
    """A float64 MLP trained sharded over the ranks and in one process, bf16 state both ways."""
    from torch.distributed.device_mesh import init_device_mesh

    world = torch.distributed.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64))]
    data = data * 3
    loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
    out = {}
    for rounding in (True, False):
        tx = ft.low_precision_state(ft.adamw(lr=1e-2), stochastic_rounding=rounding)
        finals = []
        for sharded in (True, False):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
            state = ft.TrainState.create(model, tx, mesh=mesh if sharded else None)
            step = ft.make_train_step(model, loss_fn, tx, mesh=mesh if sharded else None)
            for x, y in data:
                state, _ = step(state, (x.chunk(world)[rank], y.chunk(world)[rank]) if sharded else (x, y))
            finals.append(ft.distributed.full_tensors(state))
        out[rounding] = finals
    return out


def test_sharded_over_two_ranks_equals_one_process(tmp_path):
    """Each rank rounds its own rows, drawing each element's bits by its index in the whole tensor: the
    sharded run stores the one-process state bit for bit (stochastic and to nearest), params to 1e-12.
    The MLP's 8-row and 1-row tensors cover a split and a replicated placement."""
    from .ranks import run_on_ranks

    for out in run_on_ranks(sharded_scenario, 2, tmp_path):
        for rounding in (True, False):
            sharded, single = out[rounding]
            assert relative_error(sharded.params, single.params) <= 1e-12
            moments = [t for t in _tree.leaves(sharded.opt_state) if t.ndim]
            assert moments and all(t.dtype == torch.bfloat16 for t in moments)
            for a, b in zip(_tree.leaves(sharded.opt_state), _tree.leaves(single.opt_state)):
                assert a.dtype == b.dtype and torch.equal(a, b)


def compiled_sharded_scenario(rank):
    from torch.distributed.device_mesh import init_device_mesh

    world = torch.distributed.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64))
    loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
    tx = ft.low_precision_state(ft.adamw(lr=1e-2))
    finals = []
    for compile in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
        state = ft.TrainState.create(model, tx, mesh=mesh)
        step = ft.make_train_step(model, loss_fn, tx, mesh=mesh, compile=compile)
        for i in range(3):
            with torch.compiler.set_stance("fail_on_recompile" if compile and i else "default"):
                state, _ = step(state, tuple(t.chunk(world)[rank] for t in batch))
        finals.append(ft.distributed.full_tensors(state))
    return finals


@pytest.mark.slow
def test_compiled_sharded_step_draws_the_eager_bits(tmp_path):
    from .ranks import run_on_ranks

    for compiled, eager in run_on_ranks(compiled_sharded_scenario, 2, tmp_path):
        assert relative_error(compiled.params, eager.params) <= 1e-12
        for a, b in zip(_tree.leaves(compiled.opt_state), _tree.leaves(eager.opt_state)):
            assert a.dtype == b.dtype and torch.equal(a, b)
