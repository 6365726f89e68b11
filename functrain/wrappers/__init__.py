"""Wrappers: transformations that change how another transformation is driven, and what it keeps.

``inject_hyperparams`` / ``schedulable`` / ``set_hyperparams`` (hyperparameters as state tensors), ``accumulate``
(gradient accumulation), ``apply_if_finite`` (skip non-finite steps), ``ema_params`` (an EMA of the
params), ``lookahead`` (slow and fast weights) and ``cautious`` (only the update components that
descend). Every choice between steps is a ``torch.where``,
so each compiles into one graph.
"""

from ._accumulate import (
    AccumulateState as AccumulateState,
    accumulate as accumulate,
    accumulate_has_updated as accumulate_has_updated,
)
from ._cautious import cautious as cautious
from ._ema import EmaParamsState as EmaParamsState, ema_params as ema_params, ema_params_of as ema_params_of
from ._finite import ApplyIfFiniteState as ApplyIfFiniteState, apply_if_finite as apply_if_finite
from ._inject import (
    InjectHyperparamsState as InjectHyperparamsState,
    ScheduleState as ScheduleState,
    hyperparams as hyperparams,
    inject_hyperparams as inject_hyperparams,
    is_hyperparameter as is_hyperparameter,
    schedulable as schedulable,
    set_hyperparams as set_hyperparams,
    signature_of as signature_of,
)
from ._lookahead import LookaheadState as LookaheadState, lookahead as lookahead
from ._low_precision import LowPrecisionState as LowPrecisionState, low_precision_state as low_precision_state
from ._sam import sam as sam

__all__ = [
    "AccumulateState",
    "ApplyIfFiniteState",
    "EmaParamsState",
    "InjectHyperparamsState",
    "LookaheadState",
    "LowPrecisionState",
    "ScheduleState",
    "accumulate",
    "accumulate_has_updated",
    "apply_if_finite",
    "cautious",
    "ema_params",
    "ema_params_of",
    "hyperparams",
    "inject_hyperparams",
    "is_hyperparameter",
    "lookahead",
    "low_precision_state",
    "sam",
    "schedulable",
    "set_hyperparams",
    "signature_of",
]
