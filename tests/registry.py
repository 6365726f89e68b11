"""The one registry of optimisers (DESIGN.md rule 7): every entry runs the whole common battery.

An entry names the functrain factory, the reference it must equal (a torch.optim class, the
``schedulefree`` package, or a paper's update rule written imperatively in ``references.py``), every
option combination to check, and what the battery needs to know about it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import functrain as ft

from . import references


def grid(**axes: list[Any]) -> list[dict[str, Any]]:
    """Every combination of the given option values."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*axes.values())]


@dataclass(frozen=True)
class Spec:
    name: str
    make: Callable[..., ft.GradientTransformation]
    reference: Callable[..., torch.optim.Optimizer]
    options: list[dict[str, Any]]  # each is checked for parity, in float64, for `steps` steps
    base: dict[str, Any] = field(default_factory=dict)  # merged under every option (e.g. lr)
    matrices_only: bool = False  # Muon: every parameter must be 2-D
    converge: dict[str, Any] = field(default_factory=dict)  # kwargs that make it converge on the test problems
    converge_rosenbrock: dict[str, Any] | None = None  # where Rosenbrock needs other kwargs than the quadratic
    bad: list[tuple[dict[str, Any], str]] = field(default_factory=list)  # (kwargs, argument named in the error)
    float32_rtol: float = 1e-5  # rounding-level difference from the reference in float32
    # How much the optimiser's own maths amplifies a last-bit change of the gradient (a sum in another
    # order: sharded, compiled). 1 for elementwise maths; SOAP's eigenvectors of near-degenerate
    # factors 1e5-2e5, by the machine's LAPACK code path (measured: tests/test_soap_psgd.py::
    # test_soap_amplifies_a_last_bit_change_by_its_rounding_gain: under 1e5 on one x86 machine, 1.85e5 on another).
    rounding_gain: float = 1.0
    eval_params: Callable[..., Any] | None = None  # schedule-free: the reference's eval-mode point
    # A wrapper's spec (make = lambda **kw: ft.cautious(ft.adamw(**kw))): the ft.<name> function it exercises.
    wraps: Callable[..., Any] | None = None

    def cases(self) -> list[dict[str, Any]]:
        return [{**self.base, **option} for option in self.options]


def _sgd_options():
    out = []
    for o in grid(
        momentum=[0.0, 0.9],
        dampening=[0.0, 0.3],
        nesterov=[False, True],
        weight_decay=[0.0, 0.1],
        maximize=[False, True],
    ):
        if o["momentum"] == 0.0 and o["dampening"] != 0.0:
            continue
        if o["nesterov"] and (o["momentum"] == 0.0 or o["dampening"] != 0.0):
            continue
        out.append(o)
    return out


def _schedule_free_reference(params, **kwargs):
    schedulefree = __import__("schedulefree")
    opt = schedulefree.AdamWScheduleFree(params, foreach=False, **kwargs)
    opt.train()
    return opt


SPECS: list[Spec] = [
    Spec(
        "sgd",
        ft.sgd,
        torch.optim.SGD,
        _sgd_options(),
        base={"lr": 0.05},
        converge={"lr": 1e-3, "momentum": 0.9},
        bad=[
            ({"lr": -1.0}, "lr"),
            ({"momentum": -0.1}, "momentum"),
            ({"weight_decay": -1.0}, "weight_decay"),
            ({"nesterov": True}, "nesterov"),
        ],
    ),
    Spec(
        "adam",
        ft.adam,
        torch.optim.Adam,
        grid(
            amsgrad=[False, True], maximize=[False, True], decoupled_weight_decay=[False, True], weight_decay=[0.0, 0.1]
        ),
        base={"lr": 0.01},
        converge={"lr": 0.02},
        bad=[
            ({"lr": -1.0}, "lr"),
            ({"eps": -1.0}, "eps"),
            ({"betas": (1.0, 0.999)}, "betas[0]"),
            ({"betas": (0.9, -0.1)}, "betas[1]"),
            ({"weight_decay": -0.1}, "weight_decay"),
        ],
    ),
    Spec(
        "adamw",
        ft.adamw,
        torch.optim.AdamW,
        grid(amsgrad=[False, True], maximize=[False, True], weight_decay=[0.0, 0.1, 1e-2]),
        base={"lr": 0.01},
        converge={"lr": 0.02, "weight_decay": 0.0},
        bad=[({"lr": -1.0}, "lr"), ({"betas": (0.9, 1.5)}, "betas[1]")],
    ),
    Spec(
        "nadam",
        ft.nadam,
        torch.optim.NAdam,
        grid(
            momentum_decay=[4e-3, 0.1],
            decoupled_weight_decay=[False, True],
            weight_decay=[0.0, 0.1],
            maximize=[False, True],
        ),
        base={"lr": 0.01},
        converge={"lr": 0.02},
        bad=[({"lr": -1.0}, "lr"), ({"momentum_decay": -1.0}, "momentum_decay"), ({"betas": (1.0, 0.9)}, "betas[0]")],
    ),
    Spec(
        "radam",
        ft.radam,
        torch.optim.RAdam,
        grid(
            decoupled_weight_decay=[False, True],
            weight_decay=[0.0, 0.1],
            maximize=[False, True],
            betas=[(0.9, 0.999), (0.9, 0.5)],
        ),
        base={"lr": 0.01},
        converge={"lr": 0.01},
        bad=[({"lr": -1.0}, "lr"), ({"eps": -1.0}, "eps"), ({"betas": (0.9, 1.0)}, "betas[1]")],
    ),
    Spec(
        "adamax",
        ft.adamax,
        torch.optim.Adamax,
        grid(weight_decay=[0.0, 0.1], maximize=[False, True], betas=[(0.9, 0.999), (0.5, 0.9)]),
        base={"lr": 0.01},
        converge={"lr": 0.02},
        bad=[({"lr": -1.0}, "lr"), ({"betas": (1.0, 0.9)}, "betas[0]"), ({"weight_decay": -1.0}, "weight_decay")],
    ),
    Spec(
        "adagrad",
        ft.adagrad,
        torch.optim.Adagrad,
        grid(
            lr_decay=[0.0, 0.1],
            weight_decay=[0.0, 0.1],
            initial_accumulator_value=[0.0, 0.5],
            eps=[1e-10, 1e-3],
            maximize=[False, True],
        ),
        base={"lr": 0.05},
        converge={"lr": 0.5},
        bad=[
            ({"lr": -1.0}, "lr"),
            ({"lr_decay": -1.0}, "lr_decay"),
            ({"initial_accumulator_value": -1.0}, "initial_accumulator_value"),
            ({"eps": -1.0}, "eps"),
        ],
    ),
    Spec(
        "adadelta",
        ft.adadelta,
        torch.optim.Adadelta,
        grid(rho=[0.9, 0.5], weight_decay=[0.0, 0.1], maximize=[False, True], lr=[1.0, 0.5]),
        converge={"lr": 0.5},
        bad=[({"lr": -1.0}, "lr"), ({"rho": 1.5}, "rho"), ({"eps": -1.0}, "eps")],
    ),
    Spec(
        "rmsprop",
        ft.rmsprop,
        torch.optim.RMSprop,
        grid(
            centered=[False, True],
            momentum=[0.0, 0.9],
            weight_decay=[0.0, 0.1],
            maximize=[False, True],
            alpha=[0.99, 0.9],
        ),
        base={"lr": 0.01},
        converge={"lr": 0.01},
        bad=[
            ({"lr": -1.0}, "lr"),
            ({"alpha": -1.0}, "alpha"),
            ({"momentum": -1.0}, "momentum"),
            ({"eps": -1.0}, "eps"),
        ],
    ),
    Spec(
        "rprop",
        ft.rprop,
        torch.optim.Rprop,
        grid(etas=[(0.5, 1.2), (0.3, 1.5)], step_sizes=[(1e-6, 50.0), (1e-3, 0.02)], maximize=[False, True]),
        base={"lr": 0.01},
        converge={"lr": 0.01},
        bad=[({"lr": -1.0}, "lr"), ({"etas": (1.5, 1.2)}, "etas")],
    ),
    Spec(
        "asgd",
        ft.asgd,
        torch.optim.ASGD,
        grid(lambd=[1e-4, 0.1], alpha=[0.75, 0.5], t0=[1e6, 5.0], weight_decay=[0.0, 0.1], maximize=[False, True]),
        base={"lr": 0.05},
        converge={"lr": 0.05},
        converge_rosenbrock={"lr": 0.002},  # plain ASGD diverges on Rosenbrock from lr ~ 0.003, in torch too
        bad=[
            ({"lr": -1.0}, "lr"),
            ({"weight_decay": -1.0}, "weight_decay"),
            ({"lambd": -1.0}, "lambd"),
            ({"alpha": -0.5}, "alpha"),
            ({"t0": float("nan")}, "t0"),
        ],
    ),
    Spec(
        "adafactor",
        ft.adafactor,
        torch.optim.Adafactor,
        grid(
            beta2_decay=[-0.8, -0.5],
            eps=[(None, 1e-3), (1e-30, 1e-2)],
            d=[1.0, 2.0],
            weight_decay=[0.0, 0.1],
            maximize=[False, True],
        ),
        base={"lr": 0.01},
        converge={"lr": 0.05},
        bad=[
            ({"lr": -1.0}, "lr"),
            ({"beta2_decay": 0.5}, "beta2_decay"),
            ({"d": 0.5}, "d"),
            ({"eps": (None, -1.0)}, "eps"),
        ],
    ),
    Spec(
        "muon",
        ft.muon,
        torch.optim.Muon,
        grid(
            nesterov=[True, False],
            weight_decay=[0.1, 0.0],
            adjust_lr_fn=[None, "match_rms_adamw", "spectral_unclamped"],
            ns_steps=[5, 3],
        ),
        base={"lr": 0.02},
        matrices_only=True,
        converge={"lr": 0.02, "weight_decay": 0.0},
        bad=[({"lr": -1.0}, "lr"), ({"momentum": -1.0}, "momentum"), ({"adjust_lr_fn": "bogus"}, "adjust_lr_fn")],
        float32_rtol=1e-2,
    ),  # the Newton-Schulz iteration runs in bfloat16, in torch.optim.Muon too
    Spec(
        "lion",
        ft.lion,
        references.Lion,
        grid(betas=[(0.9, 0.99), (0.95, 0.98)], weight_decay=[0.0, 0.1], maximize=[False, True]),
        base={"lr": 1e-3},
        converge={"lr": 3e-3},
        bad=[({"lr": -1.0}, "lr"), ({"betas": (1.5, 0.99)}, "betas[0]")],
    ),
    Spec(
        "lamb",
        ft.lamb,
        references.Lamb,
        grid(weight_decay=[0.0, 0.1], eps=[1e-6, 1e-3], betas=[(0.9, 0.999), (0.8, 0.9)]),
        base={"lr": 0.01},
        converge={"lr": 0.02},
        bad=[({"lr": -1.0}, "lr"), ({"eps": -1.0}, "eps"), ({"betas": (0.9, 1.0)}, "betas[1]")],
    ),
    Spec(
        "lars",
        ft.lars,
        references.Lars,
        grid(momentum=[0.9, 0.0], nesterov=[False, True], weight_decay=[0.0, 1e-2], trust_coefficient=[1e-3, 0.1]),
        base={"lr": 0.5},
        converge={"lr": 1.0, "trust_coefficient": 1e-3},
        bad=[
            ({"lr": -1.0}, "lr"),
            ({"momentum": -1.0}, "momentum"),
            ({"trust_coefficient": -1.0}, "trust_coefficient"),
        ],
    ),
    Spec(
        "schedule_free_adamw",
        ft.schedule_free_adamw,
        _schedule_free_reference,
        grid(warmup_steps=[0, 5], weight_decay=[0.0, 0.1], r=[0.0, 1.0], weight_lr_power=[2.0, 0.0]),
        base={"lr": 0.01},
        converge={"lr": 0.05},
        bad=[({"lr": -1.0}, "lr"), ({"betas": (1.0, 0.999)}, "betas[0]"), ({"warmup_steps": -1}, "warmup_steps")],
    ),
]


def _frontier_specs() -> list[Spec]:
    """The specs that each ``tests/specs_*.py`` module lists in its ``SPECS`` (the optimisers added after
    the torch.optim mirrors, one module per family), in file-name order."""
    import importlib
    import pathlib

    found = []
    for path in sorted(pathlib.Path(__file__).parent.glob("specs_*.py")):
        found += importlib.import_module(f"{__package__}.{path.stem}").SPECS
    return found


FRONTIER = _frontier_specs()
SPECS += FRONTIER

TORCH_OPTIM_MIRRORS = [
    "sgd",
    "adam",
    "adamw",
    "nadam",
    "radam",
    "adamax",
    "adagrad",
    "adadelta",
    "rmsprop",
    "rprop",
    "asgd",
    "adafactor",
    "muon",
]
BEYOND_TORCH = ["lion", "lamb", "lars", "schedule_free_adamw"] + [spec.name for spec in FRONTIER]
# torch.optim steps complex parameters (as their real views) for all its optimisers but Adafactor and Muon.
COMPLEX_SUPPORTED = [name for name in TORCH_OPTIM_MIRRORS if name not in ("adafactor", "muon")]

BY_NAME = {spec.name: spec for spec in SPECS}
