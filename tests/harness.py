"""Drives a functrain optimiser and its reference on the same problem, step for step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import functrain as ft

SHAPES = {"w": (4, 3), "b": (3,), "t": (2, 3, 4), "s": ()}
MATRIX_SHAPES = {"w": (4, 3), "v": (3, 5), "u": (6, 6)}


def make_params(dtype=torch.float64, matrices_only=False, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = MATRIX_SHAPES if matrices_only else SHAPES
    return {k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for k, s in shapes.items()}


def gradient(params: dict[str, torch.Tensor], step: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """A noisy quadratic's gradient, ``c * (p - target) + noise_t``: it depends on the params, so a
    trajectory that drifts from the reference's drifts further, and the noise keeps signs changing."""
    out = {}
    for i, (k, p) in enumerate(params.items()):
        g = torch.Generator().manual_seed(seed * 1000 + step * 31 + i)
        target = torch.linspace(-1, 1, max(p.numel(), 1), dtype=torch.float64).reshape(p.shape)
        curvature = 0.5 + torch.rand(p.shape, generator=g, dtype=torch.float64)
        noise = 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64)
        out[k] = (curvature * (p.double() - target) + noise).to(p.dtype)
    return out


def run_functrain(tx: ft.GradientTransformation, params: dict, steps: int, update: Callable | None = None) -> dict:
    """``steps`` updates from ``params``; ``update`` replaces ``tx.update`` (e.g. a compiled one)."""
    update = update or tx.update
    state = tx.init(params)
    for t in range(steps):
        updates, state = update(gradient(params, t), state, params)
        params = ft.apply_updates(params, updates)
    return params


def run_reference(
    reference: Callable[..., torch.optim.Optimizer],
    kwargs: dict[str, Any],
    params: dict,
    steps: int,
    lr_at: Callable[[int], float] | None = None,
) -> dict:
    """``steps`` reference steps; ``lr_at(t)`` sets every group's lr before step t, as an
    lr_scheduler stepped once per optimiser step does."""
    tensors = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = reference(list(tensors.values()), **kwargs)
    for t in range(steps):
        if lr_at is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(t)
        grads = gradient({k: v.detach() for k, v in tensors.items()}, t)
        for k, v in tensors.items():
            v.grad = grads[k].clone()
        opt.step()
    return {k: v.detach() for k, v in tensors.items()}


def relative_error(actual: dict, expected: dict) -> float:
    """Largest, over leaves, of ``||actual - expected|| / ||expected||`` (computed in float64)."""
    worst = 0.0
    for k in expected:
        a, e = actual[k].double(), expected[k].double()
        worst = max(worst, ((a - e).norm() / e.norm().clamp_min(1e-30)).item())
    return worst


class Indices(torch.utils.data.Dataset):
    """dataset[i] == i: the batches show which samples were drawn."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i
