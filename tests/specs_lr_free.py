"""Registry specs for the learning-rate-free optimisers: ``ft.prodigy`` against ``prodigyopt.Prodigy``
1.1.2 and ``ft.dadapt_adam`` against ``dadaptation.DAdaptAdam`` 3.2 (pinned in the dev extra)."""

from __future__ import annotations

import contextlib
import io

import functrain as ft

from .registry import Spec


def prodigy_reference(params, **kwargs):
    """``prodigyopt.Prodigy``, its "Using decoupled weight decay" print kept out of the test log."""
    import prodigyopt

    with contextlib.redirect_stdout(io.StringIO()):
        return prodigyopt.Prodigy(params, **kwargs)


def dadapt_adam_reference(params, **kwargs):
    """``dadaptation.DAdaptAdam``, its print kept out of the test log."""
    import dadaptation

    with contextlib.redirect_stdout(io.StringIO()):
        return dadaptation.DAdaptAdam(params, **kwargs)


# The first case is the one the battery also runs with tensor hyperparameters and an lr schedule:
# every float option set to a value other than its default. A larger d0 than the default 1e-6 makes
# the growth_rate cap bind. beta3 (default None) is checked in test_lr_free.py: test_core's check of
# inject_hyperparams expects the injected names to be those with a float or tuple default.
PRODIGY_OPTIONS = [
    {"betas": (0.9, 0.99), "weight_decay": 0.1, "d0": 1e-4, "d_coef": 1.5, "growth_rate": 1.5},
    {},
    {"weight_decay": 0.1},  # decoupled
    {"weight_decay": 0.1, "decouple": False},  # an L2 penalty in the gradient
    {"use_bias_correction": True, "weight_decay": 0.1},
    {"safeguard_warmup": True},
    {"slice_p": 3},
    {"slice_p": 5, "d0": 1e-3, "weight_decay": 0.1, "decouple": False},
    {"d0": 1e-3, "d_coef": 0.5, "growth_rate": 1.2},
    {"betas": (0.0, 0.99)},  # no first moment: steps along d_{k+1} g
]

DADAPT_ADAM_OPTIONS = [
    {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1, "d0": 1e-3, "growth_rate": 1.5},
    {},
    {"weight_decay": 0.1},  # an L2 penalty in the gradient (the package's default)
    {"weight_decay": 0.1, "decouple": True},
    {"use_bias_correction": True},
    {"use_bias_correction": True, "weight_decay": 0.1, "decouple": True, "d0": 1e-2},
    {"d0": 1e-3, "growth_rate": 1.05},
]

SPECS = [
    Spec(
        "prodigy",
        ft.prodigy,
        prodigy_reference,
        PRODIGY_OPTIONS,
        converge={},
        bad=[
            ({"lr": -1.0}, "lr"),
            ({"betas": (1.0, 0.999)}, "betas[0]"),
            ({"betas": (0.9, 1.5)}, "betas[1]"),
            ({"beta3": 1.0}, "beta3"),
            ({"eps": 0.0}, "eps"),
            ({"weight_decay": -0.1}, "weight_decay"),
            ({"d0": 0.0}, "d0"),
            ({"d_coef": 0.0}, "d_coef"),
            ({"growth_rate": 0.0}, "growth_rate"),
            ({"slice_p": 0}, "slice_p"),
        ],
    ),
    Spec(
        "dadapt_adam",
        ft.dadapt_adam,
        dadapt_adam_reference,
        DADAPT_ADAM_OPTIONS,
        converge={},
        bad=[
            ({"lr": -1.0}, "lr"),
            ({"betas": (-0.1, 0.999)}, "betas[0]"),
            ({"betas": (0.9, 1.0)}, "betas[1]"),
            ({"eps": -1e-8}, "eps"),
            ({"weight_decay": -0.1}, "weight_decay"),
            ({"d0": -1.0}, "d0"),
            ({"growth_rate": -1.0}, "growth_rate"),
        ],
    ),
]
