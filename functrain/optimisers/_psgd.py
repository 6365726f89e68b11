"""PSGD-Kron, as HeavyBall 3.2.1's ``PSGDKron``."""

from __future__ import annotations

from .. import _validate
from ..base import GradientTransformation, Hyperparameter
from ..combine import chain
from ..transforms import MEMORY_SAVE_MODES, scale_by_psgd_kron
from ..wrappers import schedulable
from ._soap import heavyball_descent


@schedulable
def psgd_kron(
    lr: Hyperparameter = 1e-3,
    beta: Hyperparameter = 0.9,
    weight_decay: Hyperparameter = 0.0,
    preconditioner_update_probability: Hyperparameter = 0.0,
    max_size_triangular: int = 2048,
    min_ndim_triangular: int = 2,
    memory_save_mode: str | None = None,
    momentum_into_precond_update: bool = True,
    warmup_steps: int = 0,
    merge_dims: bool = False,
    lower_bound_beta: Hyperparameter = 0.9,
    dampening: Hyperparameter = 1e-9,
    precond_update_power_iterations: int = 2,
    precond_init_scale: Hyperparameter = 0.0,
    precond_init_scale_scale: float = 1.0,
    precond_init_scale_power: float | None = None,
    precond_lr: Hyperparameter = 0.1,
    trust_region: bool = True,
    seed: int = 0,
) -> GradientTransformation:
    r"""PSGD with a Kronecker-factored preconditioner, numerically equal to HeavyBall 3.2.1's
    ``heavyball.PSGDKron`` with the same arguments (given the same random probe vectors).

    Update rule, for a parameter :math:`\theta` with gradient :math:`g_t`, and :math:`P = Q^T Q` with
    :math:`Q` a Kronecker product of one factor per dimension (upper triangular, or diagonal for
    dimensions longer than ``max_size_triangular``, for tensors of fewer than ``min_ndim_triangular``
    dimensions, or as ``memory_save_mode`` picks):

    .. math::
        m_t &= \hat\beta\, m_{t-1} + (1 - \hat\beta)\, g_t, \qquad
            \hat\beta = 1 - \frac{1-\beta}{1-\beta^t}\\
        v &\sim \mathcal N(0, I), \qquad h = m_t + (\delta + \epsilon_{32}|m_t|)\, v\\
        Q_i &\leftarrow Q_i - \frac{\eta}{\ell_i}\,\mathrm{triu}\big(A_{(i)}A_{(i)}^T - B_{(i)}B_{(i)}^T\big)\,Q_i,
            \qquad A = Q h,\ B = Q^{-T} v\\
        \theta_t &= \theta_{t-1}(1 - \gamma_t\lambda) - \gamma_t\,\mathrm{clip}(P\, m_t)

    The preconditioner is fitted on the steps where the running sum of
    ``preconditioner_update_probability`` passes an integer (by default 1 for 1000 steps, then
    decaying by 0.999 per step to 0.03), after the factors are balanced; :math:`\ell_i` is a running
    bound on the step's scale (decay ``lower_bound_beta``); clip is HeavyBall's trust-region
    clipping (``trust_region``), :math:`\gamma_t` a linear warm-up over ``warmup_steps``, and the
    first step sets :math:`Q` to a scaled identity from :math:`g_1`. See
    :func:`functrain.transforms.scale_by_psgd_kron`.

    The random probes are explicit: drawn from a key per parameter kept in the state (from ``seed``)
    and the step count, so a run is reproducible and resumes exactly, where HeavyBall draws from
    torch's global generator. HeavyBall differs from the authors' code (Li's ``psgd_torch``,
    Walters' ``kron_torch``), and this follows HeavyBall, the pinned reference: its step bound is the
    running lower bound above (the authors normalise by the current bound alone), its update
    schedule is a deterministic running sum (theirs a coin flip), it balances the factors at every
    fit (theirs with probability 0.01), and it applies trust-region clipping. The state is kept in
    the parameter's dtype (HeavyBall's ``storage_dtype`` and ``q_dtype`` default to float32), the
    bounds in float64 as HeavyBall does. HeavyBall's caution, MARS, cached and delayed variants,
    Hessian-vector products and its own compilation are left out; an all-zero or non-finite first
    gradient gives a non-finite preconditioner where HeavyBall raises (a compiled step cannot).

    Args:
        lr: learning rate :math:`\gamma`.
        beta: momentum :math:`\beta`, in [0, 1).
        weight_decay: decoupled decay :math:`\lambda`.
        preconditioner_update_probability: the fraction of steps that fit the preconditioner, in
            (0, 1]; 0 (the default) for HeavyBall's annealed schedule (its ``None``).
        max_size_triangular: dimensions longer than this get a diagonal factor.
        min_ndim_triangular: tensors with fewer dimensions get diagonal factors.
        memory_save_mode: None, "one_diag", "smart_one_diag", "one_triu" or "all_diag".
        momentum_into_precond_update: fit the preconditioner to the momentum (else the gradient).
        warmup_steps: linear learning-rate warm-up length (an int >= 0).
        merge_dims: merge trailing dimensions up to ``max_size_triangular``.
        lower_bound_beta: :math:`\beta_\ell`, decay of the step bound, in [0, 1).
        dampening: :math:`\delta`, the probe's perturbation floor, >= 0.
        precond_update_power_iterations: power iterations for a triangular factor's bound.
        precond_init_scale: the initial scale of :math:`P` (> 0); 0 (the default) derives it from the
            first gradient (HeavyBall's ``None``).
        precond_init_scale_scale: multiplies the derived scale.
        precond_init_scale_power: the power of the derived scale (None: 1/2).
        precond_lr: :math:`\eta`, the preconditioner's step size, > 0.
        trust_region: apply HeavyBall's trust-region clipping to the update.
        seed: the seed of the probe vectors' streams (an int >= 0).

    Every float argument may be a float, a 0-d tensor, or a schedule of the step count.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([[1.0, -2.0], [0.5, 3.0]])}
        >>> tx = ft.psgd_kron(lr=0.1)
        >>> state = tx.init(params)
        >>> for g in ([[0.5, -3.0], [1.0, 1.0]], [[0.2, -1.0], [0.5, 2.0]]):
        ...     updates, state = tx.update({"w": torch.tensor(g)}, state, params)
        ...     params = ft.apply_updates(params, updates)
        >>> params["w"].shape
        torch.Size([2, 2])

    References:
        Li, 2018, "Preconditioned Stochastic Gradient Descent", IEEE TNNLS (arXiv:1512.04202).
        Li, 2019, "Preconditioner on Matrix Lie Group for SGD", arXiv:1809.10232 (Kronecker factors).
        HeavyBall 3.2.1, ``heavyball.PSGDKron`` (https://github.com/HomebrewML/HeavyBall).
    """
    owner = "psgd_kron"
    _validate.in_range(owner, "lr", lr, 0.0)
    _validate.in_range(owner, "beta", beta, 0.0, 1.0, high_open=True)
    _validate.in_range(owner, "weight_decay", weight_decay, 0.0)
    _validate.in_range(owner, "preconditioner_update_probability", preconditioner_update_probability, 0.0, 1.0)
    _validate.integer(owner, "max_size_triangular", max_size_triangular, 1)
    _validate.integer(owner, "min_ndim_triangular", min_ndim_triangular, 0)
    _validate.one_of(owner, "memory_save_mode", memory_save_mode, MEMORY_SAVE_MODES)
    _validate.integer(owner, "warmup_steps", warmup_steps, 0)
    _validate.in_range(owner, "lower_bound_beta", lower_bound_beta, 0.0, 1.0, high_open=True)
    _validate.in_range(owner, "dampening", dampening, 0.0)
    _validate.integer(owner, "precond_update_power_iterations", precond_update_power_iterations, 0)
    _validate.in_range(owner, "precond_init_scale", precond_init_scale, 0.0)
    _validate.in_range(owner, "precond_lr", precond_lr, 0.0, low_open=True)
    _validate.integer(owner, "seed", seed, 0)
    return chain(
        scale_by_psgd_kron(
            beta,
            preconditioner_update_probability,
            max_size_triangular,
            min_ndim_triangular,
            memory_save_mode,
            momentum_into_precond_update,
            merge_dims,
            lower_bound_beta,
            dampening,
            precond_update_power_iterations,
            precond_init_scale,
            precond_init_scale_scale,
            precond_init_scale_power,
            precond_lr,
            trust_region,
            seed,
        ),
        heavyball_descent(lr, weight_decay, warmup_steps, skip_first=False),
    )
