"""The state tables: for each mirrored torch.optim class, its per-parameter state keys and the
functrain state fields that hold them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..optimisers import AsgdStepSizeState
from ..transforms import (
    PolyakAveragingState,
    ScaleByAdadeltaState,
    ScaleByAdamState,
    ScaleByAmsgradState,
    ScaleByFactoredRmsState,
    ScaleByMuonState,
    ScaleByNadamState,
    ScaleByRadamState,
    ScaleByRmsState,
    ScaleByRpropState,
    ScaleByRssState,
    ScaleByStddevState,
    TraceState,
)


class _Field(NamedTuple):
    """One torch per-parameter state key and the functrain state field that holds it."""

    key: str
    states: tuple[type, ...]  # the functrain state classes with this field
    field: str
    scalar: bool = False  # a 0-d tensor per transform in functrain (torch: the same value per parameter)


class _Mirror(NamedTuple):
    factory: str  # the functrain optimiser's name
    fields: tuple[_Field, ...]
    keys: Callable[[dict, Tensor], set[str]]  # torch's state keys for a parameter after a step, given its group
    eager: bool = False  # torch builds the state in __init__ (Adagrad), not at the first step


_ADAM = (ScaleByAdamState, ScaleByAmsgradState)
_ADAM_FIELDS = (_Field("exp_avg", _ADAM, "mu"), _Field("exp_avg_sq", _ADAM, "nu"))
_AMSGRAD = _Field("max_exp_avg_sq", (ScaleByAmsgradState,), "nu_max")


def _adam_keys(group: dict, param: Tensor) -> set[str]:
    return {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if group["amsgrad"] else set())


def _rmsprop_keys(group: dict, param: Tensor) -> set[str]:
    return (
        {"step", "square_avg"}
        | ({"momentum_buffer"} if group["momentum"] != 0 else set())
        | ({"grad_avg"} if group["centered"] else set())
    )


def _adafactor_keys(group: dict, param: Tensor) -> set[str]:
    return {"step"} | ({"row_var", "col_var"} if param.dim() >= 2 else {"variance"})


_MIRRORS: dict[type, _Mirror] = {
    torch.optim.SGD: _Mirror(
        "sgd",
        (_Field("momentum_buffer", (TraceState,), "trace"),),
        lambda group, p: {"momentum_buffer"} if group["momentum"] != 0 else set(),
    ),
    torch.optim.Adam: _Mirror("adam", (*_ADAM_FIELDS, _AMSGRAD), _adam_keys),
    torch.optim.AdamW: _Mirror("adamw", (*_ADAM_FIELDS, _AMSGRAD), _adam_keys),
    torch.optim.NAdam: _Mirror(
        "nadam",
        (
            _Field("mu_product", (ScaleByNadamState,), "mu_product", scalar=True),
            _Field("exp_avg", (ScaleByNadamState,), "mu"),
            _Field("exp_avg_sq", (ScaleByNadamState,), "nu"),
        ),
        lambda group, p: {"step", "mu_product", "exp_avg", "exp_avg_sq"},
    ),
    torch.optim.RAdam: _Mirror(
        "radam",
        (_Field("exp_avg", (ScaleByRadamState,), "mu"), _Field("exp_avg_sq", (ScaleByRadamState,), "nu")),
        lambda group, p: {"step", "exp_avg", "exp_avg_sq"},
    ),
    torch.optim.Adamax: _Mirror(  # scale_by_adamax keeps Adam's state, with nu the infinity norm
        "adamax",
        (_Field("exp_avg", (ScaleByAdamState,), "mu"), _Field("exp_inf", (ScaleByAdamState,), "nu")),
        lambda group, p: {"step", "exp_avg", "exp_inf"},
    ),
    torch.optim.Adagrad: _Mirror(
        "adagrad",
        (_Field("sum", (ScaleByRssState,), "sum_of_squares"),),
        lambda group, p: {"step", "sum"},
        eager=True,
    ),
    torch.optim.Adadelta: _Mirror(
        "adadelta",
        (
            _Field("square_avg", (ScaleByAdadeltaState,), "nu"),
            _Field("acc_delta", (ScaleByAdadeltaState,), "delta_nu"),
        ),
        lambda group, p: {"step", "square_avg", "acc_delta"},
    ),
    torch.optim.RMSprop: _Mirror(
        "rmsprop",
        (
            _Field("square_avg", (ScaleByRmsState, ScaleByStddevState), "nu"),
            _Field("grad_avg", (ScaleByStddevState,), "mu"),
            _Field("momentum_buffer", (TraceState,), "trace"),
        ),
        _rmsprop_keys,
    ),
    torch.optim.Rprop: _Mirror(
        "rprop",
        (
            _Field("prev", (ScaleByRpropState,), "prev_updates"),
            _Field("step_size", (ScaleByRpropState,), "step_sizes"),
        ),
        lambda group, p: {"step", "prev", "step_size"},
    ),
    torch.optim.ASGD: _Mirror(  # torch's "mu" is 1 / max(1, step - t0): recomputed, not stored
        "asgd",
        (
            _Field("eta", (AsgdStepSizeState,), "eta", scalar=True),
            _Field("ax", (PolyakAveragingState,), "ax"),
        ),
        lambda group, p: {"step", "eta", "mu", "ax"},
    ),
    torch.optim.Adafactor: _Mirror(  # functrain holds an empty placeholder in the slot a tensor does not use
        "adafactor",
        (
            _Field("row_var", (ScaleByFactoredRmsState,), "row"),
            _Field("col_var", (ScaleByFactoredRmsState,), "col"),
            _Field("variance", (ScaleByFactoredRmsState,), "variance"),
        ),
        _adafactor_keys,
    ),
    torch.optim.Muon: _Mirror(
        "muon",
        (_Field("momentum_buffer", (ScaleByMuonState,), "momentum_buffer"),),
        lambda group, p: {"momentum_buffer"},
    ),
}

_DERIVED = {"step", "mu"}  # torch keys computed from the count (ASGD's "mu"), never read from a field


def _mirror_of(optimizer: Any) -> _Mirror:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    mirror = _MIRRORS.get(type(optimizer))
    if mirror is None:
        supported = ", ".join(f"torch.optim.{cls.__name__}" for cls in _MIRRORS)
        raise ValueError(
            f"{type(optimizer).__module__}.{type(optimizer).__qualname__} has no functrain mirror; "
            f"supported: {supported}"
        )
    return mirror


def _torch_name(optimizer: torch.optim.Optimizer) -> str:
    return f"torch.optim.{type(optimizer).__name__}"


def _scalar_dtype() -> torch.dtype:
    """The dtype torch.optim keeps ``step`` and other per-parameter scalars in."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
