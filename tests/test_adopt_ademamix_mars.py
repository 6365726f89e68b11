"""ADOPT, AdEMAMix and MARS beyond the battery (tests/specs_pytorch_optimizer.py): ADOPT's first step and
its clip against the paper, AdEMAMix's warmup schedulers against pytorch-optimizer's and the paper's
half-life rule, and MARS against pytorch-optimizer itself (where it differs from the authors), its
corrected-gradient clip, and its two learning rates under schedules."""

from __future__ import annotations

import math

import pytest
import pytorch_optimizer
import torch
from pytorch_optimizer.base.optimizer import BaseOptimizer

import functrain as ft

from .harness import make_params, relative_error, run_functrain, run_reference
from .registry import BY_NAME

MarsAdamW = BY_NAME["mars"].reference  # the authors' MARS-AdamW, written out in tests/specs_pytorch_optimizer.py
STEPS = 25

# ----------------------------------------------------------------------------- ADOPT


def test_adopt_first_step_only_records_the_squared_gradient():
    params = {"w": torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)}
    g = {"w": torch.tensor([0.5, -4.0, 0.0], dtype=torch.float64)}
    for kwargs in [{}, {"weight_decay": 0.1}, {"clip_exp": None}]:
        tx = ft.adopt(lr=0.1, **kwargs)
        updates, state = tx.update(g, tx.init(params), params)
        assert torch.equal(updates["w"].abs(), torch.zeros(3, dtype=torch.float64))
        (adopt_state,) = ft._tree.find_states(state, ft.transforms.ScaleByAdoptState)
        decayed = g["w"] + kwargs.get("weight_decay", 0.0) * params["w"]  # the L2 term is in the gradient
        assert torch.equal(adopt_state.nu["w"], decayed * decayed)  # v_0 = g_0^2, not (1 - b2) g_0^2
        assert torch.equal(adopt_state.mu["w"], torch.zeros(3, dtype=torch.float64))


def test_adopt_clips_the_first_update_at_one_as_the_paper_and_not_at_two_to_the_quarter():
    """A gradient 100x the first one: normalised by the first, clipped at c_1 = 1**0.25 (the paper; the
    authors' code). pytorch-optimizer's own schedule, clip_lambda(step) with the 1-based step, gives 2**0.25."""
    lr, b1 = 0.1, 0.9
    params = {"w": torch.tensor([0.0], dtype=torch.float64)}
    grads = [torch.tensor([1.0], dtype=torch.float64), torch.tensor([100.0], dtype=torch.float64)]
    tx = ft.adopt(lr=lr, betas=(b1, 0.9999))
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update({"w": g}, state, params)
    assert updates["w"].item() == pytest.approx(-lr * (1 - b1) * 1.0, rel=1e-15)

    stock = pytorch_optimizer.ADOPT(
        [p := torch.zeros(1, dtype=torch.float64, requires_grad=True)], lr=lr, foreach=False
    )
    for g in grads:
        p.grad = g.clone()
        stock.step()
    assert p.item() == pytest.approx(-lr * (1 - b1) * 2**0.25, rel=1e-15)


def test_adopt_without_clipping_equals_stock_pytorch_optimizer():
    """Where the clip schedule is out of the picture, the stock reference and ft.adopt take the same steps."""
    params = make_params()
    for kwargs in [{"clip_exp": None}, {"clip_exp": None, "weight_decay": 0.1, "decoupled_weight_decay": True}]:
        stock = {"clip_lambda": None, "weight_decouple": kwargs.get("decoupled_weight_decay", False)}
        stock.update({k: v for k, v in kwargs.items() if k == "weight_decay"})
        expected = run_reference(pytorch_optimizer.ADOPT, {"lr": 0.01, "foreach": False, **stock}, params, STEPS)
        assert relative_error(run_functrain(ft.adopt(lr=0.01, **kwargs), params, STEPS), expected) <= 1e-7


# ----------------------------------------------------------------------------- AdEMAMix


@pytest.mark.parametrize("betas", [(0.9, 0.9999), (0.8, 0.999), (0.5, 0.99999)])
def test_ademamix_schedulers_equal_pytorch_optimizers_over_and_after_the_warmup(betas):
    b1, b3 = betas
    warmup, alpha = 40, 8.0
    for step in range(1, 2 * warmup + 1):
        t = torch.tensor(float(step), dtype=torch.float64)
        ours_alpha = float(ft.transforms.ademamix_alpha(t, alpha, warmup))
        ours_beta3 = float(ft.transforms.ademamix_beta3(t, b1, b3, warmup))
        assert ours_alpha == pytest.approx(pytorch_optimizer.AdEMAMix.schedule_alpha(warmup, step, alpha), rel=1e-15)
        assert ours_beta3 == pytest.approx(pytorch_optimizer.AdEMAMix.schedule_beta3(warmup, step, b1, b3), rel=1e-15)
        assert ours_beta3 <= b3 and ours_alpha <= alpha


def test_ademamix_beta3_warmup_grows_the_half_life_linearly_from_beta1s_to_beta3s():
    """The paper's rule: the half-life ln(0.5) / ln(beta) goes linearly from beta1's (t = 0) to beta3's (t = T)."""
    b1, b3, warmup = 0.9, 0.9999, 100

    def half_life(beta):
        return math.log(0.5) / math.log(beta)

    for step in (1, 25, 50, 99, 100):
        t = torch.tensor(float(step), dtype=torch.float64)
        beta = float(ft.transforms.ademamix_beta3(t, b1, b3, warmup))
        expected = half_life(b1) + (half_life(b3) - half_life(b1)) * step / warmup
        assert half_life(beta) == pytest.approx(expected, rel=1e-9)


def test_ademamix_without_warmup_keeps_alpha_and_beta3():
    t = torch.tensor(7.0, dtype=torch.float64)
    assert ft.transforms.ademamix_alpha(t, 5.0, None) == 5.0
    assert ft.transforms.ademamix_beta3(t, 0.9, 0.9999, None) == 0.9999


def test_ademamix_warmup_in_a_compiled_update_never_recompiles():
    tx = ft.ademamix(lr=0.01, t_alpha_beta3=3)
    params = make_params(torch.float32)
    state = tx.init(params)
    update = torch.compile(tx.update, fullgraph=True)
    eager_state, compiled_state = state, state
    for t in range(6):
        grads = {k: torch.randn_like(v) for k, v in params.items()}
        with torch.compiler.set_stance("fail_on_recompile" if t else "default"):
            compiled_updates, compiled_state = update(grads, compiled_state, params)
        eager_updates, eager_state = tx.update(grads, eager_state, params)
        assert relative_error(compiled_updates, eager_updates) <= 1e-5


# ----------------------------------------------------------------------------- MARS


class _StockMarsWithoutRootEpsilon(pytorch_optimizer.MARS):
    """pytorch-optimizer's MARS with the 1e-15 it adds under the square root set to 0."""

    @staticmethod
    def apply_ams_bound(ams_bound, exp_avg_sq, max_exp_avg_sq, eps, exp_avg_sq_eps=1e-15):
        return BaseOptimizer.apply_ams_bound(ams_bound, exp_avg_sq, max_exp_avg_sq, eps, exp_avg_sq_eps=0.0)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"optimize_1d": True, "gamma": 0.1}, {"weight_decay": 0.1, "lr_1d": 0.02}, {"maximize": True}],
    ids=["default", "optimize_1d", "decay", "maximize"],
)
def test_mars_equals_pytorch_optimizer_where_its_denominator_agrees_with_the_paper(kwargs):
    """pytorch-optimizer divides (sqrt(v + 1e-15) + eps) by sqrt(1 - b2^t), the paper sqrt(v) by it before
    adding eps: with eps = 0 and no 1e-15 the two are one formula, and ft.mars equals pytorch-optimizer."""
    params = make_params()
    kwargs = {"lr": 0.01, "eps": 0.0, **kwargs}
    expected = run_reference(
        lambda ps, **kw: _StockMarsWithoutRootEpsilon(ps, foreach=False, **kw), kwargs, params, STEPS
    )
    assert relative_error(run_functrain(ft.mars(**kwargs), params, STEPS), expected) <= 1e-7


def test_mars_is_near_stock_pytorch_optimizer_with_its_default_eps():
    """The size of the departure: eps scaled by 1/sqrt(1 - b2^t) and the 1e-15, both small next to sqrt(v)."""
    params = make_params()
    expected = run_reference(
        lambda ps, **kw: pytorch_optimizer.MARS(ps, foreach=False, **kw), {"lr": 0.01}, params, STEPS
    )
    error = relative_error(run_functrain(ft.mars(lr=0.01), params, STEPS), expected)
    assert 0 < error <= 1e-4


def test_mars_clips_the_corrected_gradient_to_norm_one_per_tensor():
    """c_1 = (1 + gamma b1 / (1 - b1)) g_1, divided by its norm when above 1: m_1 = (1 - b1) c_1 has norm 1 - b1."""
    b1, gamma = 0.95, 0.025
    params = {"w": torch.zeros(3, 4, dtype=torch.float64), "v": torch.zeros(2, 2, dtype=torch.float64)}
    grads = {"w": torch.full((3, 4), 5.0, dtype=torch.float64), "v": torch.full((2, 2), 0.01, dtype=torch.float64)}
    tx = ft.mars(lr=0.01, betas=(b1, 0.99), gamma=gamma)
    _, state = tx.update(grads, tx.init(params), params)
    mars_state = state.inner_state[0].inner_state[0]  # chain(masked(MARS), masked(AdamW)): MARS's own state
    assert mars_state.mu["w"].norm().item() == pytest.approx(1 - b1, rel=1e-12)  # clipped
    unclipped = (1 - b1) * (1 + gamma * b1 / (1 - b1)) * grads["v"]  # norm 0.02 * 1.475 < 1: kept as it is
    torch.testing.assert_close(mars_state.mu["v"], unclipped, rtol=1e-14, atol=0)
    assert torch.equal(mars_state.last_grad["w"], grads["w"])  # the approximate variant keeps g_{t-1}


def test_mars_vectors_learning_rate_is_its_own_hyperparameter_schedule_both_to_follow_a_scheduler():
    """The authors (and pytorch-optimizer) scale the vectors' rate by an lr scheduler's factor; here lr_1d
    is scheduled on its own: the same schedule shape for both equals the reference with lr set each step."""
    base_lr, lr_1d = 0.01, 0.02
    factor = lambda t: 0.9**t  # noqa: E731
    params = make_params()
    tx = ft.mars(
        lr=lambda count: base_lr * factor(count.to(torch.float64)),
        lr_1d=lambda count: lr_1d * factor(count.to(torch.float64)),
    )
    kwargs = {"lr": base_lr, "lr_1d": lr_1d}
    expected = run_reference(MarsAdamW, kwargs, params, STEPS, lr_at=lambda t: base_lr * factor(t))
    assert relative_error(run_functrain(tx, params, STEPS), expected) <= 1e-7
    # Scheduling lr alone leaves the vectors' rate constant, unlike the reference.
    only_lr = ft.mars(lr=lambda count: base_lr * factor(count.to(torch.float64)), lr_1d=lr_1d)
    assert relative_error(run_functrain(only_lr, params, STEPS), expected) > 1e-6
