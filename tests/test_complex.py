"""Complex parameters: stepped as torch.optim steps them (their real views), or refused up front.

torch.optim steps a complex parameter as ``torch.view_as_real`` of it (and of its gradient and state)
for sgd, adam, adamw, adamax, nadam, radam, adagrad, adadelta, rmsprop, rprop and asgd; Adafactor and
Muon refuse complex parameters. Every option combination of the registry is checked against torch.
"""

from __future__ import annotations

import pytest
import torch

import functrain as ft

from .registry import BY_NAME, COMPLEX_SUPPORTED, SPECS

STEPS = 5
CASES = [
    pytest.param(BY_NAME[name], kwargs, id=f"{name}-{i}")
    for name in COMPLEX_SUPPORTED
    for i, kwargs in enumerate(BY_NAME[name].cases())
]


def complex_params(dtype=torch.complex128) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"w": (4, 3), "b": (3,), "s": ()}
    return {k: torch.randn(s, generator=g, dtype=torch.complex128).to(dtype) for k, s in shapes.items()}


def complex_gradient(params: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """A noisy quadratic's gradient on complex numbers: it depends on the params, so drift grows."""
    out = {}
    for i, (k, p) in enumerate(params.items()):
        g = torch.Generator().manual_seed(1000 + step * 31 + i)
        noise = torch.randn(p.shape, generator=g, dtype=torch.complex128)
        out[k] = (0.7 * (p.to(torch.complex128) - 0.5j) + 0.3 * noise).to(p.dtype)
    return out


def run_ours(tx, params):
    state = tx.init(params)
    for t in range(STEPS):
        updates, state = tx.update(complex_gradient(params, t), state, params)
        params = ft.apply_updates(params, updates)
    return params


def run_torch(reference, kwargs, params):
    tensors = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = reference(list(tensors.values()), **kwargs)
    for t in range(STEPS):
        grads = complex_gradient({k: v.detach() for k, v in tensors.items()}, t)
        for k, v in tensors.items():
            v.grad = grads[k]
        opt.step()
    return {k: v.detach() for k, v in tensors.items()}


def worst_relative_error(actual, expected) -> float:
    return max(((actual[k] - expected[k]).abs().norm() / expected[k].abs().norm()).item() for k in expected)


@pytest.mark.parametrize("spec,kwargs", CASES)
def test_complex_params_equal_torch_optim(spec, kwargs):
    params = complex_params()
    ours = run_ours(spec.make(**kwargs), params)
    assert all(v.dtype == torch.complex128 for v in ours.values())
    assert worst_relative_error(ours, run_torch(spec.reference, kwargs, params)) <= 1e-7  # the float64 battery's bound


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_complex_params_take_the_fused_path_too(name):
    """The declared fast path (torch's fused kernel on the real views) equals the reference."""
    spec = BY_NAME[name]
    kwargs = spec.cases()[0]
    params = complex_params(torch.complex64)
    tx = spec.make(**kwargs)
    state = tx.init(params)
    for t in range(STEPS):
        params, state = ft.update_and_apply(tx, complex_gradient(params, t), state, params)
    expected = run_torch(spec.reference, kwargs, complex_params(torch.complex64))
    assert worst_relative_error(params, expected) <= 1e-5


@pytest.mark.parametrize("spec", [s for s in SPECS if s.name not in COMPLEX_SUPPORTED], ids=lambda s: s.name)
def test_optimisers_without_complex_support_refuse_it_naming_the_parameter(spec):
    params = {"real": torch.ones(4, 3), "z": torch.ones(4, 3, dtype=torch.complex64)}
    tx = spec.make(**spec.cases()[0])
    with pytest.raises(
        TypeError, match=rf"ft\.{spec.name} does not support complex parameters \('z' is torch.complex64\)"
    ):
        tx.init(params)
    real_state = tx.init({"real": torch.ones(4, 3), "z": torch.ones(4, 3)})
    with pytest.raises(TypeError, match="does not support complex"):
        tx.update({k: torch.ones_like(v) for k, v in params.items()}, real_state, params)


def test_complex_train_step_equals_torch_adam():
    """Through make_train_step (autograd's conjugate-Wirtinger gradient, as .backward() gives)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2, dtype=torch.complex64)
    x = torch.randn(8, 3, dtype=torch.complex64)

    def loss_fn(m, batch):
        return m(batch).abs().pow(2).mean()

    tx = ft.adam(lr=0.01)
    step = ft.make_train_step(model, loss_fn, tx)
    state = ft.TrainState.create(model, tx)
    reference = torch.nn.Linear(3, 2, dtype=torch.complex64)
    reference.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(reference.parameters(), lr=0.01)
    for _ in range(3):
        state, _ = step(state, x)
        opt.zero_grad()
        loss_fn(reference, x).backward()
        opt.step()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach())
