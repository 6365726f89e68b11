"""Transforms: one idea each, named as in optax where optax has the idea."""

from ._adam import scale_by_adam as scale_by_adam, scale_by_amsgrad as scale_by_amsgrad
from ._adam_variants import (
    scale_by_adamax as scale_by_adamax,
    scale_by_nadam as scale_by_nadam,
    scale_by_radam as scale_by_radam,
)
from ._averaging import polyak_averaging as polyak_averaging
from ._basic import (
    add_decayed_weights as add_decayed_weights,
    descend_with_decoupled_decay as descend_with_decoupled_decay,
    scale as scale,
    scale_by_learning_rate as scale_by_learning_rate,
    scale_by_schedule as scale_by_schedule,
    trace as trace,
)
from ._clip import clip as clip, clip_by_global_norm as clip_by_global_norm, global_norm as global_norm
from ._factored import scale_by_factored_rms as scale_by_factored_rms
from ._lion import scale_by_lion as scale_by_lion
from ._muon import orthogonalize_via_newton_schulz as orthogonalize_via_newton_schulz, scale_by_muon as scale_by_muon
from ._plateau import ReduceOnPlateauState as ReduceOnPlateauState, reduce_on_plateau as reduce_on_plateau
from ._rms import (
    scale_by_adadelta as scale_by_adadelta,
    scale_by_rms as scale_by_rms,
    scale_by_rss as scale_by_rss,
    scale_by_stddev as scale_by_stddev,
)
from ._rprop import scale_by_rprop as scale_by_rprop
from ._schedule_free import (
    scale_by_bias_corrected_rms as scale_by_bias_corrected_rms,
    scale_by_schedule_free as scale_by_schedule_free,
)
from ._trust_ratio import scale_by_trust_ratio as scale_by_trust_ratio
