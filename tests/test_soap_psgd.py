"""What the common battery does not cover for ft.soap and ft.psgd_kron: when SOAP refreshes its
eigenbases, which dimensions get which factors, the explicit random probes of PSGD, and exact
resumption across a refresh. References: HeavyBall 3.2.1 (tests/specs_heavyball.py)."""

from __future__ import annotations

import io
import math

import pytest
import torch

import functrain as ft
from functrain.transforms._psgd import (
    _BLOCK,
    _factor_gram,
    _preconditioned,
    _times_factor,
    _upper_product,
    factor_kinds,
    normal_draw,
)
from functrain.transforms._soap import initial_basis, merged_shape

from .harness import gradient, make_params, relative_error, run_functrain, run_reference
from .registry import BY_NAME
from .specs_heavyball import PsgdKronReference, SoapReference


def _soap_state(opt_state):
    return opt_state.inner_state[0]


def _run(tx, params, steps, state=None, start=0):
    state = tx.init(params) if state is None else state
    for t in range(start, start + steps):
        updates, state = tx.update(gradient(params, t), state, params)
        params = ft.apply_updates(params, updates)
    return params, state


def _heavyball_refresh_steps(frequency: int, steps: int) -> set[int]:
    """The steps heavyball.utils.psgd_should_update picks: its running Python-float sum of
    ``1 / frequency`` passes an integer."""
    picked, total = set(), 0.0
    for t in range(1, steps + 1):
        if int(total + 1 / frequency) > int(total):
            picked.add(t)
        total += 1 / frequency
    return picked


def test_soap_refreshes_its_bases_where_heavyballs_running_sum_passes_an_integer():
    """The bases move exactly on HeavyBall's steps (after the first step's eigh) and stay put in
    between. Float sums make these {3, 7, 9} for frequency 3 (5/3 + 1/3 = 1.999...) and {11} for 10."""
    params = make_params(matrices_only=True)
    for frequency in (3, 10):
        tx = ft.soap(lr=0.01, precondition_frequency=frequency)
        state, p = tx.init(params), params
        previous = _soap_state(state).q["w"]
        moved = set()
        for t in range(1, 12):
            updates, state = tx.update(gradient(p, t), state, p)
            p = ft.apply_updates(p, updates)
            q = _soap_state(state).q["w"]
            if t > 1 and any(not torch.equal(a, b) for a, b in zip(q, previous)):
                moved.add(t)
            previous = q
        assert moved == _heavyball_refresh_steps(frequency, 11) - {1}
    assert _heavyball_refresh_steps(3, 11) == {3, 7, 9} and _heavyball_refresh_steps(10, 11) == {11}


def test_soap_first_step_only_builds_the_preconditioner():
    params = make_params()
    tx = ft.soap(lr=0.1, weight_decay=0.5)
    updates, state = tx.update(gradient(params, 0), tx.init(params), params)
    assert all(not u.any() for u in updates.values())  # no step, no decay
    g = gradient(params, 0)["w"]
    gg = _soap_state(state).gg["w"]
    torch.testing.assert_close(gg[0], g @ g.T, rtol=1e-14, atol=0)
    torch.testing.assert_close(gg[1], g.T @ g, rtol=1e-14, atol=0)


def test_soap_factors_per_dimension():
    """Vectors and scalars have no factor (plain Adam) unless precondition_1d; dimensions over
    max_precond_dim or of length 1 keep none; merge_dims folds trailing dimensions (HeavyBall's
    dim_merger), leaving 0-d tensors alone."""
    params = {"m": torch.zeros(4, 3), "v": torch.zeros(5), "s": torch.zeros(()), "k": torch.zeros(6, 2, 3, 3)}
    shapes = lambda tx: {k: [tuple(f.shape) for f in v] for k, v in _soap_state(tx.init(params)).gg.items()}  # noqa: E731
    assert shapes(ft.soap()) == {"m": [(4, 4), (3, 3)], "v": [], "s": [], "k": [(6, 6), (18, 18)]}
    assert shapes(ft.soap(merge_dims=False))["k"] == [(6, 6), (2, 2), (3, 3), (3, 3)]
    assert shapes(ft.soap(precondition_1d=True))["v"] == [(5, 5)]
    assert shapes(ft.soap(max_precond_dim=4))["m"] == [(4, 4), (3, 3)]
    assert shapes(ft.soap(max_precond_dim=3, merge_dims=False))["k"] == [(2, 2), (3, 3), (3, 3)]
    assert merged_shape((128, 64, 3, 3), 2048) == (128, 576) and merged_shape((), 8) == ()


def test_soap_with_vectors_only_is_adam_with_heavyballs_bias_correction():
    """No factor anywhere: equal to heavyball.SOAP, and then to Adam with eps outside the root."""
    params = {"b": torch.randn(7, dtype=torch.float64), "c": torch.randn(3, dtype=torch.float64)}
    kwargs = {"lr": 0.01, "weight_decay": 0.0}
    ours = run_functrain(ft.soap(**kwargs), params, 20)
    assert relative_error(ours, run_reference(SoapReference, kwargs, params, 20)) <= 1e-12


def test_soap_initial_basis_spans_the_null_space_continuously():
    """A rank-1 factor: the first column is the gradient's direction; the rest span its orthogonal
    complement, and a change in the last bits of the factor moves the basis by rounding only (eigh's
    own eigenvectors for the repeated zero eigenvalue are arbitrary there)."""
    g = torch.randn(6, 1, dtype=torch.float64)
    m = (g @ g.T)[None]
    basis = initial_basis(m)[0]
    torch.testing.assert_close(basis.T @ basis, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-14)
    assert torch.allclose(basis[:, 0].abs(), (g[:, 0] / g.norm()).abs(), atol=1e-14)
    noise = torch.randn_like(m)
    nudged = initial_basis(m * (1 + 1e-15 * (noise + noise.mT)))[0]
    assert (nudged - basis).abs().max() < 1e-12


@pytest.mark.parametrize("shape,kinds", [((4, 3), ["triangular"] * 2), ((5,), ["diagonal"]), ((), ["scalar"])])
def test_psgd_factor_kinds(shape, kinds):
    assert factor_kinds(shape, 2048, 2, None) == kinds


def test_psgd_large_dimensions_fall_back_to_diagonal_factors():
    assert factor_kinds((4, 3000), 2048, 2, None) == ["triangular", "diagonal"]
    assert factor_kinds((4, 6, 5), 2048, 2, "one_diag") == ["triangular", "diagonal", "triangular"]
    assert factor_kinds((4, 6, 5), 2048, 2, "one_triu") == ["triangular", "diagonal", "diagonal"]
    assert factor_kinds((4, 6), 2048, 2, "all_diag") == ["diagonal", "diagonal"]
    params = {"w": torch.zeros(1, 4, 3), "big": torch.zeros(3, 5)}  # length-1 dimensions are squeezed out
    q = ft.psgd_kron(max_size_triangular=4).init(params).inner_state[0].q
    assert [tuple(f.shape) for f in q["w"]] == [(4, 4), (3, 3)]
    assert [tuple(f.shape) for f in q["big"]] == [(3, 3), (5,)]


@pytest.mark.parametrize("mode", [None, "one_diag", "smart_one_diag", "one_triu", "all_diag"])
def test_psgd_factor_kinds_equal_heavyballs_with_ties(mode):
    """Which dimension is "the largest" or "the smallest" when sizes tie: HeavyBall's ``_max_idx`` and
    numpy's stable argsort, followed by functrain's plain comparisons (dynamo traces those on symbolic
    sizes)."""
    from heavyball.utils import init_Q_exprs

    for shape in [(4, 4), (3, 5, 5), (5, 3, 5), (5, 5, 3), (2, 3), (3, 2, 3, 2), (7,)]:
        qs = init_Q_exprs(torch.randn(1, *shape), 1.0, 1.0, None, 2048, 2, mode, None, None)
        expected = ["triangular" if q.dim() == 3 else "diagonal" for q in qs]
        assert factor_kinds(shape, 2048, 2, mode) == expected, shape


@pytest.mark.parametrize("n", [5, _BLOCK, _BLOCK + 1, 2 * _BLOCK + 3, 4 * _BLOCK])
def test_psgd_blocked_triangular_product_equals_the_matmul(n):
    """PSGD's factor step ``triu(T) Q`` in blocks equals the full matmul, at every split (odd ones
    too), and is upper triangular with exact zeros below the diagonal."""
    g = torch.Generator().manual_seed(n)
    t = torch.randn(1, n, n, generator=g, dtype=torch.float64)
    q = torch.randn(1, n, n, generator=g, dtype=torch.float64).triu()
    out = _upper_product(t, q)
    torch.testing.assert_close(out, t.triu() @ q, rtol=1e-12, atol=1e-12 * n)
    assert torch.equal(out.tril(-1), torch.zeros_like(out))


BLOCKED_SHAPES = [(2 * _BLOCK + 3, 7), (7, _BLOCK + 1), (3, _BLOCK + 9, 5), (_BLOCK, 4)]


@pytest.mark.parametrize("shape", BLOCKED_SHAPES)
def test_psgd_blocked_gram_equals_heavyballs_einsum(shape):
    """Each triangular factor's Gram matrix, in blocks, equals HeavyBall's einsum (``calcG_expr``)
    for every dimension."""
    from heavyball.utils import calcG_expr

    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for i, expr in enumerate(calcG_expr((3,) * len(shape), x.ndim)):
        torch.testing.assert_close(_factor_gram(x, i), torch.einsum(expr, x, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", BLOCKED_SHAPES)
@pytest.mark.parametrize("diagonal", [(), (0,), (1,)])
def test_psgd_factors_applied_in_blocks_equal_heavyballs_einsums(shape, diagonal):
    """``Q x`` (each factor once) and ``P x = Q^T Q x``, factor by factor with triangular ones in
    blocks, equal HeavyBall's einsums (``cached_precond_grad_expr``, ``precond_grad_expr``) with
    triangular and diagonal factors mixed."""
    from heavyball.utils import cached_precond_grad_expr, precond_grad_expr

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, *shape, generator=g, dtype=torch.float64)
    qs = [
        torch.randn(1, n, generator=g, dtype=torch.float64)
        if i in diagonal
        else torch.randn(1, n, n, generator=g, dtype=torch.float64).triu()
        for i, n in enumerate(shape)
    ]
    ndims = tuple(q.ndim for q in qs)
    once = x
    for i, q in enumerate(qs):
        once = _times_factor(once, q, i)
    expected_once = torch.einsum(cached_precond_grad_expr(ndims, x.ndim), *qs, x)
    torch.testing.assert_close(once, expected_once, rtol=1e-10, atol=1e-10 * expected_once.abs().max())
    expected = torch.einsum(precond_grad_expr(ndims, x.ndim), *[q for q in qs for _ in (0, 1)], x)
    torch.testing.assert_close(_preconditioned(qs, x), expected, rtol=1e-10, atol=1e-10 * expected.abs().max())


def test_psgd_with_factors_above_the_block_size_equals_heavyball():
    """A parameter whose factors are applied and stepped in blocks (1112 x 556) takes HeavyBall's steps."""
    g = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(2 * _BLOCK + 88, _BLOCK + 44, generator=g, dtype=torch.float64)}
    actual = run_functrain(ft.psgd_kron(lr=0.01), params, 4)
    expected = run_reference(PsgdKronReference, {"lr": 0.01}, params, 4)
    assert relative_error(actual, expected) <= 1e-9


def test_psgd_probes_are_standard_normal_and_a_pure_function_of_key_and_step():
    key = torch.tensor(12345)
    draw = normal_draw(key, torch.tensor(7), (200_000,), torch.float64)
    assert abs(draw.mean().item()) < 0.01 and abs(draw.std().item() - 1) < 0.01
    assert abs(((draw > 1.96).double().mean() - 0.025).item()) < 0.002
    assert torch.equal(draw, normal_draw(key, torch.tensor(7), (200_000,), torch.float64))
    assert not torch.equal(draw[:10], normal_draw(key, torch.tensor(8), (10,), torch.float64))
    assert not torch.equal(draw[:10], normal_draw(torch.tensor(12346), torch.tensor(7), (10,), torch.float64))


def _lowbias32(x: int) -> int:
    """Chris Wellons' lowbias32 hash in Python integers: the reference for the tensor version."""
    mask = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & mask
    x ^= x >> 15
    x = (x * 0x846CA68B) & mask
    return x ^ (x >> 16)


def test_psgd_probe_stream_is_the_documented_formula():
    """Element i of the draw for (key, counter) is Box-Muller on the hashes of indices 2i and 2i + 1
    under the stream's hash, written here in Python integers and floats: the stream a checkpoint's
    resume continues does not change with how the tensor code computes it."""
    key, counter, shape = 987654321, 41, (7, 3000)
    draw = normal_draw(torch.tensor(key), torch.tensor(counter), shape, torch.float64).flatten()
    stream = _lowbias32((_lowbias32(key) + counter) & 0xFFFFFFFF)
    for i in [0, 1, 2, 1000, 20_999]:
        u1 = (_lowbias32(_lowbias32(2 * i) ^ stream) + 1) / 2.0**32
        u2 = _lowbias32(_lowbias32(2 * i + 1) ^ stream) / 2.0**32
        expected = math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)
        assert draw[i].item() == pytest.approx(expected, rel=1e-14, abs=1e-15), i


def test_psgd_seed_changes_the_trajectory_and_the_reference_follows_it():
    params = make_params()
    a = run_functrain(ft.psgd_kron(lr=0.01, seed=0), params, 10)
    b = run_functrain(ft.psgd_kron(lr=0.01, seed=1), params, 10)
    assert relative_error(a, b) > 1e-6
    expected = run_reference(PsgdKronReference, {"lr": 0.01, "seed": 1}, params, 10)
    assert relative_error(b, expected) <= 1e-7


@pytest.mark.parametrize("name", ["soap", "psgd_kron"])
def test_resume_from_a_checkpoint_across_a_refresh_is_exact(name):
    """A checkpoint taken before a refresh (SOAP, frequency 3) or a fit (PSGD, probability 1/2)
    resumes bit for bit: the schedule's running sum, the bases, and PSGD's probe keys are all state."""
    kwargs = {
        "soap": {"lr": 0.01, "precondition_frequency": 3},
        "psgd_kron": {"lr": 0.01, "preconditioner_update_probability": 0.5},
    }[name]
    tx = BY_NAME[name].make(**kwargs)
    params = make_params()
    p, state = _run(tx, params, 5)
    buffer = io.BytesIO()
    torch.save({"params": p, "state": state}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    resumed, _ = _run(tx, loaded["params"], 6, loaded["state"], start=5)
    uninterrupted, _ = _run(tx, params, 11)
    assert relative_error(resumed, uninterrupted) == 0.0


@pytest.mark.parametrize("name", ["soap", "psgd_kron"])
def test_complex_params_are_refused(name):
    params = {"z": torch.zeros(3, dtype=torch.complex64)}
    tx = getattr(ft, name)(lr=0.01)
    with pytest.raises(TypeError, match="complex"):
        tx.update(params, tx.init(params), params)


def test_soap_amplifies_a_last_bit_change_by_its_rounding_gain():
    """The registry's ``rounding_gain`` for SOAP, measured: one process, float64, every gradient
    changed by ~1 ulp (a sum in another order, as a sharded or compiled step makes it). Six steps
    later the parameters differ by 1e-11 to 4e-11 relative (by machine): eigenvectors of near-degenerate factors turn by
    (the change) / (the eigenvalue gap). Within the gain, and far above plain rounding."""
    spec = BY_NAME["soap"]
    worst = 0.0
    for case in spec.cases():
        runs = []
        for perturb in (False, True):
            params = make_params(dtype=torch.float64)
            tx, noise = spec.make(**case), torch.Generator().manual_seed(1)
            state = tx.init(params)
            for t in range(6):
                grads = gradient(params, t)
                if perturb:
                    grads = {k: g * (1 + 2.0**-52 * torch.randn(g.shape, generator=noise, dtype=g.dtype))
                             for k, g in grads.items()}  # fmt: skip
                updates, state = tx.update(grads, state, params)
                params = ft.apply_updates(params, updates)
            runs.append(params)
        worst = max(worst, relative_error(*runs))
    eps = torch.finfo(torch.float64).eps
    assert 1e3 * eps < worst < spec.rounding_gain * eps


def _aten_ops_per_step(step, params, tx, steps: int) -> list[set[str]]:
    """The ATen ops each call of ``step`` ran (the profiler's names), calls 1..``steps``."""
    state, out = tx.init(params), []
    for t in range(1, steps + 1):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            updates, state = step(gradient(params, t), state, params)
        params = ft.apply_updates(params, updates)
        out.append({event.name for event in prof.events()})
    return out


@pytest.mark.slow
def test_compiled_soap_decomposes_only_on_the_steps_that_need_it():
    """Compiled, SOAP's first-step eigendecomposition runs on step 1 alone and its QR refresh on
    HeavyBall's refresh steps alone (torch.cond, via _tree.when), as the eager step does; merged
    with torch.where they ran every step, 11x HeavyBall's time per update at 10M parameters."""
    params = make_params(dtype=torch.float32, matrices_only=True)
    tx = ft.soap(lr=0.01, precondition_frequency=3)
    compiled = torch.compile(lambda g, s, p: tx.update(g, s, p), fullgraph=True, dynamic=False)
    compiled(gradient(params, 0), tx.init(params), params)  # compiling calls every op on fake tensors
    refresh = _heavyball_refresh_steps(3, 7) - {1}
    for name, step in (("eager", tx.update), ("compiled", compiled)):
        ran = _aten_ops_per_step(step, params, tx, 7)
        assert [t for t in range(1, 8) if any("eigh" in op for op in ran[t - 1])] == [1], name
        assert {t for t in range(1, 8) if any("linalg_qr" in op for op in ran[t - 1])} == refresh, name


@pytest.mark.parametrize("name", ["soap", "psgd_kron"])
def test_compiled_occasional_work_is_a_branch_of_one_graph(name):
    """The first step's factors and the refreshes (SOAP) or refits (PSGD) are torch.cond branches of
    the step's one graph, two per preconditioned parameter, not both sides merged by torch.where."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    params = make_params(dtype=torch.float32, matrices_only=True)
    tx = getattr(ft, name)(lr=0.01)
    compiled = torch.compile(lambda g, s, p: tx.update(g, s, p), backend=capture, fullgraph=True, dynamic=False)
    compiled(gradient(params, 1), tx.init(params), params)
    conds = [n for n in graphs[0].graph.nodes if n.target is torch.ops.higher_order.cond]
    assert len(graphs) == 1 and len(conds) == 2 * len(params)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["soap", "psgd_kron"])
def test_compiled_with_dynamic_shapes_equals_eager(name):
    """``compile={"dynamic": True}`` (symbolic sizes): SOAP takes torch.where's form of its branches
    (dynamo's torch.cond fails there), and PSGD's factor layout traces on symbolic sizes."""
    params = make_params(dtype=torch.float32, matrices_only=True)
    tx = getattr(ft, name)(lr=0.01, precondition_frequency=2) if name == "soap" else ft.psgd_kron(lr=0.01)
    compiled = torch.compile(lambda g, s, p: tx.update(g, s, p), fullgraph=True, dynamic=True)
    eager_state = compiled_state = tx.init(params)
    for t in range(1, 5):
        grads = gradient(params, t)
        eager, eager_state = tx.update(grads, eager_state, params)
        out, compiled_state = compiled(grads, compiled_state, params)
        for k in params:
            torch.testing.assert_close(out[k], eager[k], rtol=1e-4, atol=1e-6)
