"""Transforms: one idea each, named as in optax where optax has the idea."""

from ._adam import (
    ScaleByAdamState as ScaleByAdamState,
    ScaleByAmsgradState as ScaleByAmsgradState,
    scale_by_adam as scale_by_adam,
    scale_by_amsgrad as scale_by_amsgrad,
)
from ._adam_variants import (
    ScaleByNadamState as ScaleByNadamState,
    ScaleByRadamState as ScaleByRadamState,
    scale_by_adamax as scale_by_adamax,
    scale_by_nadam as scale_by_nadam,
    scale_by_radam as scale_by_radam,
)
from ._ademamix import (
    ScaleByAdemamixState as ScaleByAdemamixState,
    ademamix_alpha as ademamix_alpha,
    ademamix_beta3 as ademamix_beta3,
    scale_by_ademamix as scale_by_ademamix,
)
from ._adopt import ScaleByAdoptState as ScaleByAdoptState, scale_by_adopt as scale_by_adopt
from ._averaging import PolyakAveragingState as PolyakAveragingState, polyak_averaging as polyak_averaging
from ._basic import (
    ScaleByScheduleState as ScaleByScheduleState,
    TraceState as TraceState,
    add_decayed_weights as add_decayed_weights,
    descend_with_decoupled_decay as descend_with_decoupled_decay,
    scale as scale,
    scale_by_learning_rate as scale_by_learning_rate,
    scale_by_schedule as scale_by_schedule,
    trace as trace,
)
from ._clip import clip as clip, clip_by_global_norm as clip_by_global_norm, global_norm as global_norm
from ._factored import (
    ScaleByFactoredRmsState as ScaleByFactoredRmsState,
    scale_by_factored_rms as scale_by_factored_rms,
)
from ._lion import ScaleByLionState as ScaleByLionState, scale_by_lion as scale_by_lion
from ._lr_free import (
    ScaleByDAdaptAdamState as ScaleByDAdaptAdamState,
    ScaleByProdigyState as ScaleByProdigyState,
    scale_by_dadapt_adam as scale_by_dadapt_adam,
    scale_by_prodigy as scale_by_prodigy,
)
from ._mars import ScaleByMarsState as ScaleByMarsState, scale_by_mars as scale_by_mars
from ._muon import (
    ADJUST_LR_FNS as ADJUST_LR_FNS,
    NS_COEFFICIENTS as NS_COEFFICIENTS,
    ScaleByMuonState as ScaleByMuonState,
    orthogonalize_via_newton_schulz as orthogonalize_via_newton_schulz,
    scale_by_muon as scale_by_muon,
)
from ._plateau import ReduceOnPlateauState as ReduceOnPlateauState, reduce_on_plateau as reduce_on_plateau
from ._psgd import (
    MEMORY_SAVE_MODES as MEMORY_SAVE_MODES,
    ScaleByPsgdKronState as ScaleByPsgdKronState,
    scale_by_psgd_kron as scale_by_psgd_kron,
)
from ._rms import (
    ScaleByAdadeltaState as ScaleByAdadeltaState,
    ScaleByRmsState as ScaleByRmsState,
    ScaleByRssState as ScaleByRssState,
    ScaleByStddevState as ScaleByStddevState,
    scale_by_adadelta as scale_by_adadelta,
    scale_by_rms as scale_by_rms,
    scale_by_rss as scale_by_rss,
    scale_by_stddev as scale_by_stddev,
)
from ._rprop import ScaleByRpropState as ScaleByRpropState, scale_by_rprop as scale_by_rprop
from ._schedule_free import (
    ScaleByBiasCorrectedRmsState as ScaleByBiasCorrectedRmsState,
    ScaleByScheduleFreeState as ScaleByScheduleFreeState,
    scale_by_bias_corrected_rms as scale_by_bias_corrected_rms,
    scale_by_schedule_free as scale_by_schedule_free,
)
from ._soap import ScaleBySoapState as ScaleBySoapState, scale_by_soap as scale_by_soap
from ._trust_ratio import scale_by_trust_ratio as scale_by_trust_ratio

__all__ = [
    "ADJUST_LR_FNS",
    "MEMORY_SAVE_MODES",
    "NS_COEFFICIENTS",
    "PolyakAveragingState",
    "ReduceOnPlateauState",
    "ScaleByAdadeltaState",
    "ScaleByAdamState",
    "ScaleByAdemamixState",
    "ScaleByAdoptState",
    "ScaleByAmsgradState",
    "ScaleByBiasCorrectedRmsState",
    "ScaleByDAdaptAdamState",
    "ScaleByFactoredRmsState",
    "ScaleByLionState",
    "ScaleByMarsState",
    "ScaleByMuonState",
    "ScaleByNadamState",
    "ScaleByProdigyState",
    "ScaleByPsgdKronState",
    "ScaleByRadamState",
    "ScaleByRmsState",
    "ScaleByRpropState",
    "ScaleByRssState",
    "ScaleByScheduleFreeState",
    "ScaleByScheduleState",
    "ScaleBySoapState",
    "ScaleByStddevState",
    "TraceState",
    "add_decayed_weights",
    "ademamix_alpha",
    "ademamix_beta3",
    "clip",
    "clip_by_global_norm",
    "descend_with_decoupled_decay",
    "global_norm",
    "orthogonalize_via_newton_schulz",
    "polyak_averaging",
    "reduce_on_plateau",
    "scale",
    "scale_by_adadelta",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_ademamix",
    "scale_by_adopt",
    "scale_by_amsgrad",
    "scale_by_bias_corrected_rms",
    "scale_by_dadapt_adam",
    "scale_by_factored_rms",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_mars",
    "scale_by_muon",
    "scale_by_nadam",
    "scale_by_prodigy",
    "scale_by_psgd_kron",
    "scale_by_radam",
    "scale_by_rms",
    "scale_by_rprop",
    "scale_by_rss",
    "scale_by_schedule",
    "scale_by_schedule_free",
    "scale_by_soap",
    "scale_by_stddev",
    "scale_by_trust_ratio",
    "trace",
]
