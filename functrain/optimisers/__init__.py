"""Optimisers: each a ``chain`` of transforms mirroring one torch.optim class (or a paper)."""

from ._adafactor import adafactor as adafactor
from ._adam import adam as adam, adamw as adamw
from ._adam_variants import adamax as adamax, nadam as nadam, radam as radam
from ._ademamix import ademamix as ademamix
from ._adopt import adopt as adopt
from ._asgd import AsgdStepSizeState as AsgdStepSizeState, asgd as asgd
from ._dadapt import dadapt_adam as dadapt_adam
from ._lbfgs import LbfgsMemory as LbfgsMemory, lbfgs as lbfgs
from ._lion import lion as lion
from ._mars import mars as mars
from ._muon import muon as muon
from ._prodigy import prodigy as prodigy
from ._psgd import psgd_kron as psgd_kron
from ._rms import adadelta as adadelta, adagrad as adagrad, rmsprop as rmsprop
from ._rprop import rprop as rprop
from ._schedule_free import (
    schedule_free_adamw as schedule_free_adamw,
    schedule_free_eval_params as schedule_free_eval_params,
)
from ._sgd import sgd as sgd
from ._soap import soap as soap
from ._trust_ratio import lamb as lamb, lars as lars

__all__ = [
    "AsgdStepSizeState",
    "LbfgsMemory",
    "adadelta",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "ademamix",
    "adopt",
    "asgd",
    "dadapt_adam",
    "lamb",
    "lars",
    "lbfgs",
    "lion",
    "mars",
    "muon",
    "nadam",
    "prodigy",
    "psgd_kron",
    "radam",
    "rmsprop",
    "rprop",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "sgd",
    "soap",
]
