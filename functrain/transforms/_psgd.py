"""PSGD-Kron: a Kronecker-factored preconditioner fitted by Lie-group descent, as HeavyBall 3.2.1 computes it."""

from __future__ import annotations

import itertools
import math
import string
from typing import NamedTuple

import torch
from torch import Tensor

from .. import _tree
from .._hoist import hoist
from ..base import GradientTransformation, Params, register_state, step_count
from ._soap import _compute_dtype, _lerp, _placed_like, _whole, debiased_in_float32, merged_shape

_LETTERS = string.ascii_lowercase
MEMORY_SAVE_MODES = (None, "one_diag", "smart_one_diag", "one_triu", "all_diag")
"""The values ``memory_save_mode`` takes (HeavyBall's): which dimensions get a diagonal factor."""


@register_state
class ScaleByPsgdKronState(NamedTuple):
    count: Tensor  # updates done so far, 0-d int64
    updates_due: Tensor  # 0-d float64: the running sum of the update probability (HeavyBall's schedule)
    key: Params  # per parameter, a 0-d int64: the stream its random probe vectors are drawn from
    exp_avg: Params  # momentum, shaped like the params
    q: Params  # per parameter, a tuple of factors: (n, n) upper triangular, (n,) diagonal, or () for a scalar
    lower_bound: Params  # per parameter, a tuple of 0-d float64: the running bound on each factor's step size


# ----------------------------------------------------------------------------- random probe vectors
# PSGD fits its preconditioner to pairs (v, H v) with v ~ N(0, I). The draws are a pure function of a
# key kept in the state, the step count and the element's index (a counter-based generator written
# in integer tensor ops), so a step is reproducible, resumes exactly from a checkpoint, compiles into
# the graph, and draws the same numbers on every rank of a sharded step.

_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2^32`` for ``x`` in [0, 2^32) held in int64, in two 16-bit halves so nothing overflows."""
    return (x * (c & 0xFFFF) + ((x * (c >> 16)) & 0xFFFF) * 65536) & _MASK32


def _hash32(x: Tensor) -> Tensor:
    """Chris Wellons' ``lowbias32`` integer hash of 32-bit values (held in int64)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def leaf_key(seed: int, index: int) -> Tensor:
    """The key of the ``index``-th parameter's stream for ``seed``: a 0-d int64 in [0, 2^32)."""
    return _hash32(torch.tensor((seed * 0x9E3779B9 + index) & _MASK32, dtype=torch.int64))


def normal_draw(key: Tensor, counter: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Standard normal numbers of ``shape``, a pure function of ``(key, counter)`` and each element's
    flat index: two 32-bit uniforms per element (a hash of the index under the stream's own hash)
    through Box-Muller, :math:`\\sqrt{-2\\ln u_1}\\cos(2\\pi u_2)`, in float64, then cast to ``dtype``."""
    stream = _hash32((_hash32(key) + counter) & _MASK32)
    element = torch.arange(math.prod(shape), dtype=torch.int64, device=key.device)

    def bits(index):
        return _hash32(_hash32(index) ^ stream).to(torch.float64)

    # Element i takes the bits of indices 2i and 2i + 1, each computed where it is used: slicing one
    # array of 2n draws every other entry, which a compiled CPU kernel reads unvectorised (4x slower).
    u1 = (bits(2 * element) + 1) / 2.0**32  # in (0, 1]: the logarithm is finite
    u2 = bits(2 * element + 1) / 2.0**32
    return ((-2 * u1.log()).sqrt() * torch.cos(2 * math.pi * u2)).reshape(shape).to(dtype)


# ----------------------------------------------------------------------------- static layout of one parameter


def factor_kinds(
    shape: tuple[int, ...], max_size_triangular: int, min_ndim_triangular: int, memory_save_mode: str | None
) -> list[str]:
    """Each dimension's factor, "triangular" or "diagonal" (HeavyBall's ``init_Q_exprs``), for a shape
    whose length-1 dimensions are already squeezed out; ``["scalar"]`` for a 0-d one. A dimension is
    diagonal when it is longer than ``max_size_triangular``, when the tensor has fewer than
    ``min_ndim_triangular`` dimensions, or when ``memory_save_mode`` picks it: "one_diag" the largest
    (the last of equals), "smart_one_diag" the largest when it is strictly larger than the rest,
    "one_triu" all but the smallest, "all_diag" all."""
    if len(shape) == 0:
        return ["scalar"]
    diagonal = [False] * len(shape)
    # Plain Python (HeavyBall uses numpy): this runs while a compiled step is traced, where the sizes
    # may be symbolic (dynamic=True): comparisons, no max(key=...), which dynamo cannot trace on those.
    if memory_save_mode == "one_diag":
        diagonal[_last_largest(shape)] = True
    elif memory_save_mode == "smart_one_diag":
        ordered = sorted(shape)
        if len(shape) >= 2 and ordered[-1] > ordered[-2]:
            diagonal[_last_largest(shape)] = True
    elif memory_save_mode == "one_triu":
        smallest = _first_smallest(shape)
        diagonal = [i != smallest for i in range(len(shape))]
    elif memory_save_mode == "all_diag":
        diagonal = [True] * len(shape)
    return [
        "diagonal"
        if size == 1 or size > max_size_triangular or len(shape) < min_ndim_triangular or diag
        else "triangular"
        for size, diag in zip(shape, diagonal)
    ]


def _last_largest(shape: tuple[int, ...]) -> int:
    """The index of the last of the largest sizes."""
    best = 0
    for i in range(1, len(shape)):
        if shape[i] >= shape[best]:
            best = i
    return best


def _first_smallest(shape: tuple[int, ...]) -> int:
    """The index of the first of the smallest sizes."""
    best = 0
    for i in range(1, len(shape)):
        if shape[i] < shape[best]:
            best = i
    return best


# ----------------------------------------------------------------------------- the maths, on a batch of one
# As in _soap.py, each tensor carries a leading batch dimension of one (HeavyBall's bucket of one), so the
# triangular solves and the diagonal factors' einsums are HeavyBall's own, on the same shapes.


def _diagonal_gram_expr(i: int, q_ndim: int, x_ndim: int) -> str:
    """The einsum of ``X X^T`` for dimension ``i``, contracted over the others (HeavyBall's ``calcG_expr``),
    for a factor that keeps only part of it: the diagonal for a diagonal factor (``q_ndim`` 2), the total
    for a scalar one. A triangular factor's whole matrix is :func:`_factor_gram`."""
    base = _LETTERS[: x_ndim - 1]
    return f"...{base},...{base}->...{base[i] if q_ndim == 2 else ''}"


def _balanced(qs: list[Tensor]) -> list[Tensor]:
    """The factors rescaled to equal largest entries (their geometric mean), which leaves their
    Kronecker product unchanged (HeavyBall's ``psgd_balance_Q``)."""
    logs = [q.abs().amax(dim=tuple(range(1, q.ndim))).log() for q in qs]
    mean = sum(logs) / len(qs)
    return [q * (mean - n).exp().view(-1, *[1] * (q.ndim - 1)) for q, n in zip(qs, logs)]


# PSGD's products with its triangular factors, computed in blocks to skip the half that is known to be
# zero (or, for a Gram matrix, the transpose of the other half): each splits a factor in two halves and
# recurses on the diagonal blocks. The product of two upper triangular n x n matrices then costs n^3/3
# multiply-adds against a matmul's n^3 (a 2048 x 2048 one: 41 against 90 ms on 2 CPU threads); a
# triangular factor applied to a gradient, and a Gram matrix, half. HeavyBall and pytorch-optimizer
# use full matmuls (einsums). The entries are the same sums, grouped otherwise: equal to rounding.
# Blocks of 512 or less are plain matmuls: smaller ones gained little (2048: 39 ms with 256) and made
# the compiled graph larger (compiling the 10M benchmark set took 610 s with 256, 480 s with 512).
_BLOCK = 512


def _upper_product(t: Tensor, q: Tensor) -> Tensor:
    """``triu(t) @ q`` for upper triangular ``q`` (batches of square matrices): in blocks,
    ``[[T11, T12], [0, T22]] [[Q11, Q12], [0, Q22]] = [[T11 Q11, T11 Q12 + T12 Q22], [0, T22 Q22]]``."""
    n = q.shape[-1]
    if n <= _BLOCK:
        return t.triu() @ q
    h = n // 2
    t11, t12, t22 = t[..., :h, :h], t[..., :h, h:], t[..., h:, h:]
    q11, q12, q22 = q[..., :h, :h], q[..., :h, h:], q[..., h:, h:]
    top = torch.cat([_upper_product(t11, q11), t11.triu() @ q12 + t12 @ q22], dim=-1)
    bottom = torch.cat([torch.zeros_like(t12.mT), _upper_product(t22, q22)], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def _times_upper(y: Tensor, q: Tensor, transposed: bool) -> Tensor:
    """``Q v`` (``Q^T v`` when ``transposed``) for each vector ``v`` along the last dimension of ``y``,
    ``Q`` upper triangular: ``y Q^T`` (``y Q``) in blocks, ``y [[A, B], [0, C]] = [y_1 A, y_1 B + y_2 C]``,
    half a matmul's multiply-adds."""
    n = q.shape[-1]
    if n <= _BLOCK:
        return y @ (q if transposed else q.mT)
    h = n // 2
    a, b, c = q[..., :h, :h], q[..., :h, h:], q[..., h:, h:]
    y1, y2 = y[..., :h], y[..., h:]
    if transposed:
        return torch.cat([_times_upper(y1, a, True), y1 @ b + _times_upper(y2, c, True)], dim=-1)
    return torch.cat([_times_upper(y1, a, False) + y2 @ b.mT, _times_upper(y2, c, False)], dim=-1)


def _times_factor(x: Tensor, q: Tensor, i: int, transposed: bool = False) -> Tensor:
    """``x`` with factor ``q`` (or its transpose) applied along dimension ``i`` (after the batch
    dimension): a triangular factor to each vector along it, a diagonal one entry by entry, a scalar
    to all of ``x``."""
    if q.ndim < 3:
        return x * _along(q, i, x.ndim)
    return _on_vectors(x, i, lambda rows: _times_upper(rows, q, transposed))


def _on_vectors(x: Tensor, i: int, fn) -> Tensor:
    """``fn`` applied to the vectors along dimension ``i`` of ``x`` (after the batch dimension), given
    as the rows of one matrix per batch entry, and the result laid out as ``x``."""
    vectors = x.movedim(i + 1, -1)
    rows = vectors.reshape(x.shape[0], -1, vectors.shape[-1])
    return fn(rows).reshape(vectors.shape).movedim(-1, i + 1)


def _along(q: Tensor, i: int, ndim: int) -> Tensor:
    """A diagonal factor ``(batch, n)`` viewed to broadcast along dimension ``i`` of an ``ndim``-d
    tensor; a scalar one ``(batch,)`` to broadcast over all of it."""
    shape = [q.shape[0]] + [1] * (ndim - 1)
    if q.ndim == 2:
        shape[i + 1] = -1
    return q.view(shape)


def _preconditioned(qs: list[Tensor], x: Tensor) -> Tensor:
    """``P x = (Q_1^T Q_1) (Q_2^T Q_2) ... x``, each factor's square applied along its dimension (the
    Kronecker factors act on separate dimensions, so in any order): HeavyBall's ``precond_grad_expr``."""
    for i, q in enumerate(qs):
        x = _times_factor(_times_factor(x, q, i), q, i, transposed=True)
    return x


def _gram(x: Tensor) -> Tensor:
    """``x @ x^T`` over the last dimension (batches of matrices): in blocks of rows,
    ``[[X1 X1^T, X1 X2^T], [(X1 X2^T)^T, X2 X2^T]]``, the lower block the upper one's transpose."""
    n = x.shape[-2]
    if n <= _BLOCK:
        return x @ x.mT
    x1, x2 = x[..., : n // 2, :], x[..., n // 2 :, :]
    off = x1 @ x2.mT
    return torch.cat([torch.cat([_gram(x1), off], dim=-1), torch.cat([off.mT, _gram(x2)], dim=-1)], dim=-2)


def _factor_gram(x: Tensor, i: int) -> Tensor:
    """A triangular factor's ``X X^T`` for dimension ``i`` of ``x`` (after the batch dimension),
    contracted over the others (HeavyBall's ``calcG_expr``): the ``n_i x n_i`` matrix."""
    rows = x.movedim(i + 1, 1)
    return _gram(rows.reshape(x.shape[0], x.shape[i + 1], -1))


def _largest_eigenvalue(a: Tensor, iterations: int) -> Tensor:
    """Power iteration for the largest eigenvalue of symmetric positive semi-definite ``a``, started
    from its row of largest norm (HeavyBall's ``max_eigenvalue_spd``)."""
    row_norms = a.norm(dim=-1)
    scale, row = row_norms.max(dim=-1)
    scale = scale.clamp(min=torch.finfo(torch.float32).tiny)
    x = a.gather(-2, row[..., None, None].expand(*a.shape[:-2], 1, a.shape[-1])).squeeze(-2)
    a = a / scale[..., None, None]
    x = x / scale[..., None]

    def mv(v):
        return ((v[..., None, :] @ a.mT) @ a.mT).squeeze(-2)

    for _ in range(iterations):
        x = torch.nn.functional.normalize(mv(x), dim=-1)
    return (x * mv(x)).sum(dim=-1).sqrt() * scale


def _init_scale(g: Tensor, scale, scale_scale, scale_power) -> Tensor:
    """The initial scale of the preconditioner (HeavyBall's ``precond_init_scale``): given (> 0), or
    ``(scale_scale / mean(g^4)^(1/8))^scale_power`` (``scale_power`` 1/2 unless given), computed in
    float64 in log space."""
    if not (isinstance(scale, (int, float)) and scale == 0):
        return torch.as_tensor(scale, dtype=torch.float64, device=g.device)
    x = g.double().abs().clamp(min=1e-12).log() * 4
    lse = (x.flatten().logsumexp(dim=0) - math.log(g.numel())) / 4 / 2  # ln mean(g^4)^(1/8)
    root = torch.where(-lse > 0, 1 / lse.exp(), (-lse).exp())  # HeavyBall's stable_exp(-lse)
    return (root * scale_scale) ** (0.5 if scale_power is None else scale_power)


def _initial_factors(g: Tensor, kinds: list[str], dtype: torch.dtype, scale: Tensor) -> list[Tensor]:
    """The first preconditioner: ``scale^(1/d)`` times the identity in each of the ``d`` dimensions."""
    if kinds == ["scalar"]:
        return [scale.to(dtype) * torch.ones(1, dtype=dtype, device=g.device)]
    scale = (scale ** (1 / len(kinds))).to(dtype)
    shape = g.shape[1:]
    return [
        scale * torch.eye(size, dtype=dtype, device=g.device)[None]
        if kind == "triangular"
        else scale * torch.ones(1, size, dtype=dtype, device=g.device)
        for size, kind in zip(shape, kinds)
    ]


def fitted_factors(
    qs: list[Tensor],
    lower_bounds: list[Tensor],
    g: Tensor,
    v: Tensor,
    precond_lr,
    lower_bound_beta,
    power_iterations: int,
) -> tuple[list[Tensor], list[Tensor]]:
    """One step of PSGD's fit of ``P = Q^T Q`` (``Q`` the Kronecker product of the factors) to the pair
    ``(v, h)``, ``h = H v`` or its stand-in (HeavyBall's ``psgd_update_precond``).

    With ``A = Q h`` and ``B = Q^{-T} v`` (triangular solves), each factor steps along the
    criterion's relative gradient on its Lie group:

    .. math::
        Q_i \\leftarrow Q_i - \\frac{\\eta}{\\ell_i}\\,\\mathrm{triu}(A_{(i)}A_{(i)}^T - B_{(i)}B_{(i)}^T)\\,Q_i,
        \\qquad \\ell_i = \\max(\\lambda_i, \\ell_i + (1-\\beta_\\ell)(\\lambda_i - \\ell_i))

    where :math:`\\lambda_i` bounds the norm of :math:`A_{(i)}A_{(i)}^T + B_{(i)}B_{(i)}^T` (power
    iteration for a triangular factor, the largest entry for a diagonal one) and :math:`\\ell_i` is
    its running bound (kept in float64). The factors are balanced first (:func:`_balanced`).
    """
    qs = _balanced(qs)
    dtype = g.dtype
    a = g
    for i, q in enumerate(qs):  # A = Q h, each factor once: HeavyBall's ``cached_precond_grad_expr``
        a = _times_factor(a, q, i)
    b = v
    for i, q in enumerate(qs):
        if q.ndim <= 2:
            b = b / _along(q, i, b.ndim)
    for i, q in enumerate(qs):  # B = Q^{-T} v: v Q^{-1} along each triangular factor's dimension
        if q.ndim == 3:
            solve = lambda rows, q=q: torch.linalg.solve_triangular(q, rows.contiguous(), upper=True, left=False)  # noqa: E731
            b = _on_vectors(b, i, solve).contiguous()

    lr = torch.as_tensor(precond_lr, dtype=dtype, device=g.device)
    beta = torch.as_tensor(lower_bound_beta, dtype=dtype, device=g.device)
    new_qs, new_bounds = [], []
    for i, (q, bound) in enumerate(zip(qs, lower_bounds)):
        if q.ndim < 3:
            expr = _diagonal_gram_expr(i, q.ndim, g.ndim)
            term1 = torch.einsum(expr, a, a)
            term2 = torch.einsum(expr, b, b)
            total = term1 + term2
            size = total if q.ndim == 1 else total.amax(dim=-1)
            step = q * (term1 - term2)
        else:
            term1, term2 = _factor_gram(a, i), _factor_gram(b, i)
            size = _largest_eigenvalue(term1 + term2, power_iterations)
            step = _upper_product(term1 - term2, q)
        # HeavyBall keeps the running bound in float64 and steps with it rounded to the factor's dtype.
        bound = size.maximum(bound + (size - bound) * (1 - beta))
        new_bounds.append(bound)
        ell = bound.to(size.dtype).view(-1, *[1] * (step.ndim - 1))
        new_qs.append(q - step / ell * lr)
    return new_qs, new_bounds


def trust_region_clip(u: Tensor, lerp: float = 0.9, scale: float = 1.5) -> Tensor:
    """HeavyBall's default update clipping: with :math:`x = u/s`,
    :math:`s\\,(\\lambda\\tanh x + (1-\\lambda)\\,\\mathrm{sign}(x)\\log(1+|x|))` clamped to [-2, 2]."""
    lerp = torch.as_tensor(lerp, dtype=u.dtype, device=u.device)
    scale = torch.as_tensor(scale, dtype=u.dtype, device=u.device)
    x = u / scale
    tanh = x.tanh()
    x = x.abs().log1p().copysign(tanh) * (1 - lerp) + tanh * lerp
    return (x * scale).clamp(min=-2, max=2)


def update_probability(count: Tensor, max_prob=1.0, min_prob=0.03, decay=0.999, flat_start=1000) -> Tensor:
    """HeavyBall's default preconditioner-update probability at the 1-based step ``count + 1``:
    ``max_prob`` for ``flat_start`` steps, then decaying by ``decay`` per step to ``min_prob``."""
    n = (count + 1).to(torch.float64)
    return (max_prob * decay ** (n - flat_start).clamp(min=0)).clamp(min=min_prob)


# ----------------------------------------------------------------------------- the transform


def scale_by_psgd_kron(
    beta: float | Tensor = 0.9,
    preconditioner_update_probability: float | Tensor = 0.0,
    max_size_triangular: int = 2048,
    min_ndim_triangular: int = 2,
    memory_save_mode: str | None = None,
    momentum_into_precond_update: bool = True,
    merge_dims: bool = False,
    lower_bound_beta: float | Tensor = 0.9,
    dampening: float | Tensor = 1e-9,
    precond_update_power_iterations: int = 2,
    precond_init_scale: float = 0.0,
    precond_init_scale_scale: float = 1.0,
    precond_init_scale_power: float | None = None,
    precond_lr: float | Tensor = 0.1,
    trust_region: bool = True,
    seed: int = 0,
) -> GradientTransformation:
    r"""PSGD-Kron's direction (HeavyBall 3.2.1's ``PSGDKron`` chain: ``exp_avg``, ``scale_by_psgd``,
    ``trust_region_clip_``).

    For a parameter with gradient :math:`g_t` (its length-1 dimensions squeezed out, trailing
    dimensions merged when ``merge_dims``) and a preconditioner :math:`P = Q^T Q` with :math:`Q` a
    Kronecker product of factors (upper triangular, diagonal, or a scalar):

    .. math::
        m_t &= \hat\beta(\beta, t)\, m_{t-1} + (1 - \hat\beta(\beta, t))\, g_t, \qquad
            \hat\beta(\beta, t) = 1 - \frac{1-\beta}{1-\beta^t}\\
        v &\sim \mathcal N(0, I), \qquad h = x + (\delta + \epsilon_{32}|x|)\, v,
            \quad x = m_t \text{ (or } g_t\text{ without momentum\_into\_precond\_update)}\\
        Q &\leftarrow \text{one fit step on } (v, h) \text{ (see :func:`fitted_factors`), on the
            steps the schedule picks}\\
        u_t &= \mathrm{clip}(P\, m_t)

    where the schedule updates when the running sum of the probability (by default
    :func:`update_probability`: 1 for 1000 steps, then decaying to 0.03) passes an integer (HeavyBall
    draws no coin: the sum is deterministic), and clip is :func:`trust_region_clip` (``trust_region``).
    The first step sets :math:`Q` to a scaled identity (:func:`_init_scale`, from :math:`g_1`).

    The probe :math:`v` is drawn by :func:`normal_draw` from a per-parameter key in the state (from
    ``seed`` and the parameter's position in the tree) and the step count: HeavyBall draws it from
    torch's global generator instead (``torch.randn_like``); the parity test hands HeavyBall these
    draws. The factors are computed on the whole tensor when the parameters are sharded, and are held
    whole on every rank (the momentum is sharded like the parameters). The first factors and the fits
    are computed only on the steps that take them, eagerly and compiled with static shapes (a compiled
    step's default: branches of ``torch.cond``); compiled with dynamic shapes or under ``vmap`` with
    per-model step counts, on every step, kept by ``torch.where`` (:func:`functrain._tree.when`).
    """

    def layout(shape: tuple[int, ...]) -> tuple[tuple[int, ...], list[str]]:
        shape = merged_shape(shape, max_size_triangular) if merge_dims else shape
        shape = tuple(size for size in shape if size != 1)  # HeavyBall's SqueezeGrad
        return shape, factor_kinds(shape, max_size_triangular, min_ndim_triangular, memory_save_mode)

    def factors(p: Tensor) -> tuple[Tensor, ...]:
        shape, kinds = layout(tuple(p.shape))
        if kinds == ["scalar"]:
            return (torch.ones((), dtype=p.dtype, device=p.device),)
        return tuple(
            torch.eye(size, dtype=p.dtype, device=p.device)
            if kind == "triangular"
            else torch.ones(size, dtype=p.dtype, device=p.device)
            for size, kind in zip(shape, kinds)
        )

    def bounds(p: Tensor) -> tuple[Tensor, ...]:
        return tuple(torch.zeros((), dtype=torch.float64, device=q.device) for q in factors(p))

    def init(params):
        count = step_count(params)
        position = itertools.count()  # each leaf's key from its position in the tree (map visits them in order)
        return ScaleByPsgdKronState(
            count=count,
            updates_due=torch.zeros((), dtype=torch.float64, device=count.device),
            key=_tree.map(lambda _: leaf_key(seed, next(position)).to(count.device), params),
            exp_avg=_tree.map(torch.zeros_like, params),
            q=_tree.map(factors, params),
            lower_bound=_tree.map(bounds, params),
        )

    def update(updates, state, params=None, **extra):
        count = state.count + 1
        if isinstance(preconditioner_update_probability, (int, float)) and preconditioner_update_probability == 0:
            probability = update_probability(state.count)  # 0: HeavyBall's annealed schedule
        else:
            probability = torch.as_tensor(preconditioner_update_probability, dtype=torch.float64)
        updates_due = state.updates_due + probability.to(state.updates_due.device)
        refit, first = _tree.decided(*hoist(updates_due.floor() > state.updates_due.floor(), count == 1))

        def step(g, m, key, qs, lbs):
            shape, kinds = layout(tuple(g.shape))
            dtype = _compute_dtype(g.dtype)
            batch = lambda x: x.reshape(shape)[None].to(dtype)  # noqa: E731 - a batch of one
            g32, m32 = batch(_whole(g)), batch(_whole(m))
            m32 = _lerp(m32, g32, 1 - debiased_in_float32(beta, count).to(dtype))
            new_m = m32[0].reshape(g.shape).to(m.dtype)
            qs = [q[None].to(dtype) for q in qs]
            lbs = [b[None] for b in lbs]

            # Outside the branch: an injected scale is a tensor of the state, which dynamo cannot take
            # into torch.cond's branch through torch.as_tensor; the scale is one reduction, cheap.
            scale = _init_scale(g32, precond_init_scale, precond_init_scale_scale, precond_init_scale_power)

            def initial():
                return list(_initial_factors(g32, kinds, dtype, scale))

            qs = _tree.when(first, initial, qs)

            def fitted():
                """A fit on a random probe (a pure function of the key and the step: no generator state)."""
                x = m32 if momentum_into_precond_update else g32
                v = normal_draw(key, state.count, x.shape, dtype)
                h = x + (dampening + torch.finfo(torch.float32).eps * x.abs()) * v
                new_qs, new_lbs = fitted_factors(
                    qs, lbs, h, v, precond_lr, lower_bound_beta, precond_update_power_iterations
                )
                return list(new_qs), list(new_lbs)

            qs, lbs = _tree.when(refit, fitted, (qs, lbs))

            direction = _preconditioned(qs, m32)
            if trust_region:
                direction = trust_region_clip(direction)
            direction = direction[0].reshape(g.shape).to(g.dtype)
            return (
                _placed_like(direction, g),
                _placed_like(new_m, m),
                tuple(q[0].to(g.dtype) for q in qs),
                tuple(b[0] for b in lbs),
            )

        out, exp_avg, q, lower_bound = _tree.map_many_per_leaf(
            step, updates, state.exp_avg, state.key, state.q, state.lower_bound, n=4
        )
        return out, ScaleByPsgdKronState(count, updates_due, state.key, exp_avg, q, lower_bound)

    return GradientTransformation(init, update)
