"""Registry specs for the second-order optimisers after HeavyBall 3.2.1 (pinned in the dev extra):
``ft.soap`` against ``heavyball.SOAP`` and ``ft.psgd_kron`` against ``heavyball.PSGDKron``.

HeavyBall is configured to what functrain computes: its own ``torch.compile`` off (the module-level
``heavyball.utils.compile_mode``, so the reference runs eagerly on the CPU), one parameter at a time
(``multi_tensor=False``), its state in the parameters' dtype (``storage_dtype``, ``q_dtype``; its
default is float32), and no caution, MARS or stochastic rounding (stochastic rounding only acts on
bfloat16 state, which the parity tests do not use).
"""

from __future__ import annotations

import contextlib
import warnings
from unittest import mock

import heavyball
import heavyball.utils
import torch

import functrain as ft
from functrain.transforms._psgd import leaf_key, normal_draw
from functrain.transforms._soap import initial_basis

from .registry import Spec

heavyball.utils.compile_mode = None  # the reference runs eagerly (its own compiled kernels are for GPUs)

# HeavyBall's advice on settings the tests choose on purpose (an explicit precond_init_scale, an lr
# that moves between steps with multi_tensor=False): nothing to act on here.
_ADVICE = ("It's recommended to use precond_init_scale", "Learning rate changed between steps")


@contextlib.contextmanager
def _without_heavyballs_advice():
    with warnings.catch_warnings():
        for message in _ADVICE:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        yield


def _dtype_name(params) -> str:
    return str(params[0].dtype).removeprefix("torch.") if params else "float32"


class SoapReference:
    """``heavyball.SOAP`` with ``kwargs``, its state in the parameters' dtype, and its first eigenbasis
    functrain's ``initial_basis``.

    HeavyBall's first basis is ``eigh``'s eigenvectors of a rank-deficient factor, those of the zero
    eigenvalue whatever the rounding makes them; functrain spans that null space canonically (see
    ``functrain.transforms._soap.initial_basis``). During each step this replaces
    ``heavyball.utils.get_orthogonal_matrix`` (called once per factor, at the first step) with it, so
    both start from the same basis, as PSGD's reference gets functrain's random probes. HeavyBall's
    ``merge_dims`` indexes a tensor's first dimension, so 0-d parameters go in a group of their own
    without it (nothing to merge: a scalar is plain Adam either way).
    """

    def __init__(self, params, **kwargs):
        params = list(params)
        groups = [
            {"params": [p for p in params if p.dim() > 0]},
            {"params": [p for p in params if p.dim() == 0], "merge_dims": False},
        ]
        self.optimizer = heavyball.SOAP(
            [g for g in groups if g["params"]], multi_tensor=False, storage_dtype=_dtype_name(params), **kwargs
        )
        self.param_groups = self.optimizer.param_groups

    def step(self):
        def get_orthogonal_matrix(factors):
            return [None if m is None else initial_basis(m) for m in factors]

        with (
            mock.patch.object(heavyball.utils, "get_orthogonal_matrix", get_orthogonal_matrix),
            _without_heavyballs_advice(),
        ):
            self.optimizer.step()


SOAP_OPTIONS = [
    # The first case also runs with tensor hyperparameters and an lr schedule: every float changed.
    {"betas": (0.8, 0.9), "shampoo_beta": 0.9, "eps": 1e-6, "weight_decay": 0.05},
    {},
    {"merge_dims": False, "weight_decay": 0.0},
    # 1/10 summed ten times is 0.999...: HeavyBall's first refresh is at step 11, not 10.
    {"precondition_frequency": 10, "warmup_steps": 5},
    # vectors get a factor; dimensions over 3 keep none (the 4s of "w" and "t")
    {"precondition_1d": True, "max_precond_dim": 3, "precondition_frequency": 3},
]


class PsgdKronReference:
    """``heavyball.PSGDKron`` drawing functrain's probe vectors.

    HeavyBall draws each probe with ``torch.randn_like`` inside ``heavyball.utils.dampen_grad``, once
    per parameter, in order, on the steps that fit the preconditioner. For each step this replaces
    ``dampen_grad`` with the same formula on ``normal_draw(key_i, step)``, ``key_i`` the key
    ``ft.psgd_kron(seed=...)`` gives the i-th parameter: both then see the same numbers.
    """

    def __init__(self, params, seed=0, trust_region=True, **kwargs):
        params = list(params)
        if not trust_region:
            kwargs["update_clipping"] = None
        dtype = _dtype_name(params)
        for name in ("preconditioner_update_probability", "precond_init_scale"):
            if kwargs.get(name) == 0.0:  # functrain's 0 is HeavyBall's None (its default)
                del kwargs[name]
        groups = [  # HeavyBall's merge_dims fails on 0-d tensors: see SoapReference
            {"params": [p for p in params if p.dim() > 0]},
            {"params": [p for p in params if p.dim() == 0], "merge_dims": False},
        ]
        self.optimizer = heavyball.PSGDKron(
            [g for g in groups if g["params"]], multi_tensor=False, storage_dtype=dtype, q_dtype=dtype, **kwargs
        )
        self.param_groups = self.optimizer.param_groups
        # HeavyBall draws in its groups' order; each parameter keeps the key of its position in the tree.
        position = {id(p): i for i, p in enumerate(params)}
        self.keys = [leaf_key(seed, position[id(p)]) for g in groups if g["params"] for p in g["params"]]
        self.steps = 0

    def step(self):
        keys = iter(self.keys)
        count = torch.tensor(self.steps)

        def dampen_grad(g, damp=1e-9):
            v = normal_draw(next(keys), count, tuple(g.shape), g.dtype)
            return v, g + (damp + torch.finfo(torch.float32).eps * g.abs()) * v

        with mock.patch.object(heavyball.utils, "dampen_grad", dampen_grad), _without_heavyballs_advice():
            self.optimizer.step()
        self.steps += 1


PSGD_KRON_OPTIONS = [
    # The first case also runs with tensor hyperparameters and an lr schedule: floats changed.
    {"beta": 0.8, "weight_decay": 0.05, "lower_bound_beta": 0.5, "precond_lr": 0.3, "dampening": 1e-6},
    {},
    {"trust_region": False, "momentum_into_precond_update": False, "seed": 3},
    # a fit every other step; the largest dimension of each tensor diagonal
    {"preconditioner_update_probability": 0.5, "memory_save_mode": "one_diag", "warmup_steps": 5},
    # dimensions over 3 get diagonal factors; merged trailing dimensions
    {"max_size_triangular": 3, "merge_dims": True, "precond_update_power_iterations": 4},
    {"memory_save_mode": "one_triu", "precond_init_scale": 0.5},
]

SPECS = [
    Spec(
        "soap",
        ft.soap,
        SoapReference,
        SOAP_OPTIONS,
        base={"lr": 0.01},
        converge={"lr": 0.02, "weight_decay": 0.0},
        rounding_gain=5e5,  # the measured gain (up to 1.85e5), with room for other machines' LAPACK
        bad=[
            ({"lr": -1.0}, "lr"),
            ({"betas": (1.0, 0.95)}, "betas[0]"),
            ({"betas": (0.9, -0.1)}, "betas[1]"),
            ({"shampoo_beta": 1.5}, "shampoo_beta"),
            ({"eps": 0.0}, "eps"),
            ({"precondition_frequency": 0}, "precondition_frequency"),
            ({"max_precond_dim": 0}, "max_precond_dim"),
            ({"warmup_steps": -1}, "warmup_steps"),
        ],
    ),
    Spec(
        "psgd_kron",
        ft.psgd_kron,
        PsgdKronReference,
        PSGD_KRON_OPTIONS,
        base={"lr": 0.01},
        converge={"lr": 0.01},
        bad=[
            ({"lr": -1.0}, "lr"),
            ({"beta": 1.0}, "beta"),
            ({"preconditioner_update_probability": 1.5}, "preconditioner_update_probability"),
            ({"memory_save_mode": "bogus"}, "memory_save_mode"),
            ({"lower_bound_beta": 1.5}, "lower_bound_beta"),
            ({"precond_lr": 0.0}, "precond_lr"),
            ({"max_size_triangular": 0}, "max_size_triangular"),
        ],
    ),
]
