"""Adafactor and Muon details the common battery does not reach."""

from __future__ import annotations

import re

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz

import functrain as ft
from functrain.transforms import orthogonalize_via_newton_schulz

from .harness import relative_error, run_functrain, run_reference

COEFFICIENTS = (3.4445, -4.7750, 2.0315)


@pytest.mark.parametrize("shape", [(4, 3), (3, 5), (6, 6), (1, 7), (9, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_newton_schulz_equals_torch_bitwise_and_leaves_its_input(shape, dtype):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    before = g.clone()
    ours = orthogonalize_via_newton_schulz(g, COEFFICIENTS, 5, 1e-7)
    theirs = _zeropower_via_newtonschulz(g.clone(), COEFFICIENTS, 5, 1e-7)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs)
    assert torch.equal(g, before)  # torch's version divides a bfloat16 input in place


@pytest.mark.parametrize(
    "params, key, shape",
    [
        ({"fc.weight": torch.zeros(3, 2), "fc.bias": torch.zeros(10)}, "fc.bias", "(10,)"),
        ({"a": {"b": torch.zeros(2, 2)}, "c": [torch.zeros(2, 2), torch.zeros(3, 2, 2)]}, "c.1", "(3, 2, 2)"),
        ({"scale": torch.tensor(1.0)}, "scale", "()"),
    ],
)
def test_muon_names_a_parameter_that_is_not_a_matrix(params, key, shape):
    message = f"muon: parameter '{key}' has shape {shape}; Muon only updates 2-D matrices"
    with pytest.raises(ValueError, match=re.escape(message) + ".*ft.partition"):
        ft.muon().init(params)


def test_muon_on_a_nested_tree_of_matrices():
    params = {"a": {"b": torch.randn(3, 2)}, "c": [torch.randn(2, 4), torch.randn(4, 4)]}
    tx = ft.muon(lr=0.02)
    updates, _ = tx.update(params, tx.init(params), params)
    assert [u.shape for u in (updates["a"]["b"], *updates["c"])] == [(3, 2), (2, 4), (4, 4)]


def test_adafactor_factors_the_last_two_dims_of_higher_rank_tensors():
    params = {"k": torch.randn(2, 3, 4, 5, dtype=torch.float64), "m": torch.randn(6, 2, dtype=torch.float64)}
    tx = ft.adafactor(lr=0.05, weight_decay=0.1)
    state = tx.init(params)
    assert state.inner_state[0].row["k"].shape == (2, 3, 4, 1) and state.inner_state[0].col["k"].shape == (2, 3, 1, 5)
    kwargs = {"lr": 0.05, "weight_decay": 0.1}
    assert (
        relative_error(run_functrain(tx, params, 10), run_reference(torch.optim.Adafactor, kwargs, params, 10)) <= 1e-12
    )


def test_adafactor_with_zero_size_and_scalar_leaves():
    """torch.optim.Adafactor divides by numel (0/0) here; the state must stay finite."""
    params = {"e": torch.zeros(0), "r": torch.zeros(0, 3), "c": torch.zeros(3, 0), "s": torch.tensor(2.0)}
    tx = ft.adafactor()
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update({k: torch.ones_like(v) for k, v in params.items()}, state, params)
        params = ft.apply_updates(params, updates)
    leaves = torch.utils._pytree.tree_leaves(state)
    assert all(torch.isfinite(leaf).all() for leaf in leaves if leaf.is_floating_point())
    assert torch.isfinite(params["s"]) and params["s"] < 2.0
