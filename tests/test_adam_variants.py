"""NAdam, RAdam and Adamax details the common battery does not reach."""

from __future__ import annotations

import pytest
import torch

import functrain as ft
from functrain.transforms import scale_by_nadam, scale_by_radam

from .harness import make_params, relative_error, run_functrain, run_reference


def test_nadam_keeps_mu_product_in_torch_optims_scalar_dtype():
    """torch.optim.NAdam rounds its running product of momentum coefficients to float32 each step;
    keeping the same dtype is what makes float64 runs agree to rounding, not to ~1e-9."""
    state = scale_by_nadam().init({"w": torch.zeros(3, dtype=torch.float64)})
    assert state.mu_product.dtype == torch.float32
    params = make_params()
    kwargs = {"lr": 0.05, "momentum_decay": 0.1}
    assert (
        relative_error(
            run_functrain(ft.nadam(**kwargs), params, 40), run_reference(torch.optim.NAdam, kwargs, params, 40)
        )
        <= 1e-13
    )


def test_radam_switches_to_the_adaptive_step_when_rho_exceeds_5():
    # beta2 = 0.999: rho_t = 1, 2, 3, 4, 5 - 1e-3 for t <= 5 (plain momentum, m_t / (1 - b1^t)), > 5 from t = 6.
    tx = scale_by_radam(0.9, 0.999, 1e-8)
    params = {"w": torch.ones(3, dtype=torch.float64)}
    state, m = tx.init(params), torch.zeros(3, dtype=torch.float64)
    for t in range(1, 8):
        g = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64) * t
        updates, state = tx.update({"w": g}, state, params)
        m = m.lerp(g, 0.1)
        momentum_step = m / (1 - 0.9**t)
        assert torch.allclose(updates["w"], momentum_step, rtol=1e-14) == (t <= 5)


@pytest.mark.parametrize("b2", [0.999, 0.6, 0.5, 1 / 3])
def test_radam_gradient_through_beta2_is_finite(b2):
    """The unused branch of the rho_t > 5 switch is kept finite (b2 = 0.6 and 1/3 make its ratio 0/0)."""

    def total(b2):
        tx = scale_by_radam(0.9, b2, 1e-8)
        params = {"w": torch.ones(3, dtype=torch.float64)}
        state, acc = tx.init(params), 0.0
        for t in range(8):
            updates, state = tx.update({"w": torch.full((3,), 0.5 * (t + 1), dtype=torch.float64)}, state, params)
            acc = acc + updates["w"].sum()
        return acc

    grad = torch.func.grad(total)(torch.tensor(b2, dtype=torch.float64))
    assert torch.isfinite(grad)


@pytest.mark.parametrize("make", [ft.nadam, ft.radam, ft.adamax])
def test_zero_size_and_scalar_leaves(make):
    params = {"e": torch.zeros(0, 3), "s": torch.tensor(1.5), "v": torch.ones(4)}
    tx = make(lr=0.01)
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update({k: torch.ones_like(v) for k, v in params.items()}, state, params)
        params = ft.apply_updates(params, updates)
    assert params["e"].shape == (0, 3) and torch.isfinite(params["s"]) and torch.isfinite(params["v"]).all()
