"""SOAP: Adam run in the eigenbasis of Shampoo's preconditioner, as HeavyBall 3.2.1 computes it."""

from __future__ import annotations

import string
from typing import NamedTuple

import torch
from torch import Tensor

from .. import _sharding, _tree
from .._hoist import hoist
from ..base import GradientTransformation, Params, register_state, step_count

_LETTERS = string.ascii_lowercase


@register_state
class ScaleBySoapState(NamedTuple):
    count: Tensor  # updates done so far, 0-d int64
    refreshes: Tensor  # 0-d float64: the running sum of 1 / precondition_frequency (HeavyBall's schedule)
    exp_avg: Params  # first moment, in the eigenbasis, shaped like the params
    exp_avg_sq: Params  # second moment, in the eigenbasis, shaped like the params
    gg: Params  # per parameter, a tuple: the EMA of g g^T along each preconditioned dimension
    q: Params  # per parameter, a tuple: the eigenbasis (columns) of each of those matrices


# ----------------------------------------------------------------------------- static layout of one parameter


def merged_shape(shape: tuple[int, ...], max_precond_dim: int) -> tuple[int, ...]:
    """HeavyBall's ``dim_merger``: trailing dimensions merged while their product stays within
    ``max_precond_dim`` (fan-out is never merged into fan-in; a conv kernel ``(o, i, k, k)`` becomes
    ``(o, i*k*k)``). A 0-d tensor is left as it is (HeavyBall's indexes ``shape[0]`` and fails)."""
    if len(shape) == 0:
        return shape
    new, cumulative = [], 1
    for size in shape[1:][::-1]:
        if cumulative * size > max_precond_dim:
            if cumulative > 1:
                new.append(cumulative)
                cumulative = size
            else:
                new.append(size)
                cumulative = 1
        else:
            cumulative *= size
    if cumulative > 1:
        new.append(cumulative)
    return (shape[0], *new[::-1])


def preconditioned_dims(shape: tuple[int, ...], max_precond_dim: int, precondition_1d: bool) -> list[bool]:
    """Which dimensions of ``shape`` get a Shampoo factor (HeavyBall's ``init_preconditioner``): every
    dimension of a tensor with 2 or more dimensions (a vector only with ``precondition_1d``) except
    those longer than ``max_precond_dim`` or of length 1. Others are left in the original basis."""
    numel = 1
    for size in shape:
        numel *= size
    if numel <= 1 or not (len(shape) > 1 or precondition_1d):
        return [False] * len(shape)
    return [1 < size <= max_precond_dim for size in shape]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """HeavyBall's ``promote``: half-precision tensors are computed (and their factors kept) in float32."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


# ----------------------------------------------------------------------------- the maths, on a batch of one
# Every tensor below carries a leading batch dimension of size one, the form in which HeavyBall runs each
# parameter (a "bucket" of one): the same einsums on the same shapes give the same roundings, which matters
# where the eigenvectors of a repeated eigenvalue follow the last bit of the matrix.


def _outer_products(g: Tensor, active: list[bool]) -> list[Tensor | None]:
    """``g g^T`` along each preconditioned dimension (contracting all the others)."""
    g0 = _LETTERS[: g.dim() - 1]
    out = []
    for idx, on in enumerate(active):
        if not on:
            out.append(None)
            continue
        b = g0[idx]
        out.append(torch.einsum(f"...{g0},...{g0.replace(b, b.upper())}->...{b + b.upper()}", g, g))
    return out


def _project(x: Tensor, qs: list[Tensor | None], back: bool) -> Tensor:
    """``x`` in the eigenbasis (``Q_i^T`` along each dimension i), or back from it (``Q_i``)."""
    letters = _LETTERS[: x.dim() - 1]
    factors = ",".join("..." + (c + c.upper())[:: -1 if back else 1] for q, c in zip(qs, letters) if q is not None)
    if not factors:
        return x
    out = "".join(c.upper() if c.upper() in factors else c for c in letters)
    return torch.einsum(f"...{letters},{factors}->...{out}", x, *[q for q in qs if q is not None])


def initial_basis(m: Tensor) -> Tensor:
    """The first eigenbasis of a factor ``m`` (a batch of symmetric matrices): the eigenvectors of
    ``m + 1e-30 I`` by decreasing eigenvalue (HeavyBall's ``get_orthogonal_matrix``), with the null
    space spanned canonically.

    The first factor is one outer product, so ``m`` is rank-deficient, and the eigenvectors ``eigh``
    returns for its (repeated) zero eigenvalue are whatever the rounding makes them: a change in the
    gradient's last bit (a sharded step sums it in another order; a compiled one rounds otherwise)
    turns them arbitrarily within the null space, and Adam in that basis follows, so two runs equal to
    rounding would drift apart. Here the eigenvalues within ``min(64 n eps, 1/8)`` of the largest
    (HeavyBall's noise margin for QR) count as zero, and their eigenvectors are replaced by those of
    ``P D P`` (``P`` the projector on that space, ``D = diag(1, ..., n)``): a basis of the same space
    that depends continuously on ``m``. The other eigenvectors are ``eigh``'s. The parity tests give
    HeavyBall this same first basis.
    """
    size = m.shape[-1]
    eye = torch.eye(size, device=m.device, dtype=m.dtype)
    values, vectors = torch.linalg.eigh(m + 1e-30 * eye)
    values, vectors = torch.flip(values, [-1]), torch.flip(vectors, [-1])
    margin = min(64 * size * torch.finfo(m.dtype).eps, 0.125)
    null = values <= margin * values.abs().amax(dim=-1, keepdim=True)  # the trailing columns
    projector = (vectors * null.unsqueeze(-2).to(m.dtype)) @ vectors.mT
    ramp = torch.arange(1, size + 1, device=m.device, dtype=m.dtype)
    spread = torch.flip(torch.linalg.eigh(projector * ramp.unsqueeze(-2) @ projector).eigenvectors, [-1])
    # P D P is positive on the null space and zero on the rest: its first k columns span the null space.
    k = null.sum(dim=-1, keepdim=True)
    index = (torch.arange(size, device=m.device) - (size - k)).clamp(min=0).unsqueeze(-2).expand_as(spread)
    return torch.where(null.unsqueeze(-2), spread.gather(-1, index), vectors)


def refreshed_basis(m: Tensor, q: Tensor, floor: float = 1e-8) -> Tensor:
    """One step of power iteration with QR from the basis ``q`` towards the eigenvectors of ``m``
    (HeavyBall's ``get_orthogonal_matrix_QR``).

    .. math::
        \\lambda = \\mathrm{diag}(Q^T M Q),\\quad W = (M + c\\,I)\\,Q,\\quad
        c = \\max(\\text{floor}, \\min(64\\,n\\,\\epsilon_{\\text{dtype}}, 1/8))\\,\\max_j|\\lambda_j|

    then QR of ``W``'s columns taken by decreasing :math:`\\lambda` (signs made positive on R's
    diagonal), each column put back where it came from. The shift :math:`c` lifts the null space of
    a rank-deficient ``m``, whose QR completion would otherwise follow rounding noise.
    """
    gram = m @ q
    eig = torch.einsum("...ij,...ij->...j", q, gram)
    magnitude = eig.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)
    lift = max(floor, min(64 * m.shape[-1] * torch.finfo(m.dtype).eps, 0.125))
    work = gram + (lift * magnitude).unsqueeze(-1) * q
    index = torch.argsort(eig, descending=True).unsqueeze(-2).expand_as(work)
    orthogonal, triangular = torch.linalg.qr(work.gather(-1, index))
    signs = triangular.diagonal(dim1=-2, dim2=-1).sign()
    orthogonal = orthogonal * torch.where(signs != 0, signs, torch.ones_like(signs)).unsqueeze(-2)
    return work.scatter(-1, index, orthogonal)


def _change_basis(x: Tensor, old: list[Tensor | None], new: list[Tensor | None]) -> Tensor:
    """``x`` from the eigenbasis ``old`` to the eigenbasis ``new`` (``Q_new^T Q_old`` along each dimension)."""
    letters = _LETTERS[: x.dim() - 1]
    targets = _LETTERS[x.dim() - 1 : 2 * (x.dim() - 1)]
    from_old = ",".join(f"...{c.upper()}{c}" for q, c in zip(old, letters) if q is not None)
    to_new = ",".join(f"...{c.upper()}{o}" for q, c, o in zip(new, letters, targets) if q is not None)
    out = "".join(o if o in to_new else c for c, o in zip(letters, targets))
    kept = [q for q in old if q is not None] + [q for q in new if q is not None]
    return torch.einsum(f"...{letters},{from_old},{to_new}->...{out}", x, *kept)


def _debiased(beta, t: Tensor, like: Tensor) -> Tensor:
    """HeavyBall's bias correction folded into the decay: the EMA with decay
    ``1 - (1 - beta) / (1 - beta^t)`` is the bias-corrected mean of the first ``t`` values."""
    beta = torch.as_tensor(beta, dtype=like.dtype, device=like.device)
    return 1 - (1 - beta) / (-torch.expm1(t * torch.log1p(beta - 1)))


def debiased_in_float32(beta, count: Tensor) -> Tensor:
    """:func:`_debiased` at the 1-based step ``count``, computed as HeavyBall computes it for a Python
    float ``beta`` (``1 - (1 - beta) / (1 - beta ** step)`` with an int64 ``step`` tensor: torch's
    default dtype, float32). Used where HeavyBall does, so a float64 run follows it to ~1e-9 rather
    than ~1e-7; a tensor ``beta`` takes the same roundings."""
    beta = torch.as_tensor(beta, dtype=torch.float64, device=count.device)
    return 1 - (1 - beta).float() / (1 - beta.float() ** count)


def _lerp(x: Tensor, y: Tensor, weight: Tensor) -> Tensor:
    """``x (1 - w) + y w``, HeavyBall's ``stochastic_lerp_`` (not ``torch.lerp``, which rounds otherwise)."""
    return x * (1 - weight) + y * weight


# ----------------------------------------------------------------------------- sharded tensors


def _whole(t: Tensor) -> Tensor:
    """The whole of ``t`` (gathered when it is a sharded DTensor)."""
    return t.full_tensor() if _sharding.is_dtensor(t) else t


def _placed_like(whole: Tensor, like: Tensor) -> Tensor:
    """``whole`` placed as ``like`` is: each rank keeps its own rows of a sharded one (no communication)."""
    return _sharding.on_whole(lambda _: whole, like) if _sharding.is_dtensor(like) else whole


# ----------------------------------------------------------------------------- the transform


def scale_by_soap(
    b1: float | Tensor = 0.9,
    b2: float | Tensor = 0.95,
    shampoo_beta: float | Tensor = 0.95,
    eps: float | Tensor = 1e-8,
    precondition_frequency: int = 2,
    max_precond_dim: int = 2048,
    merge_dims: bool = True,
    precondition_1d: bool = False,
) -> GradientTransformation:
    r"""SOAP's direction: Adam in the eigenbasis of Shampoo's Kronecker factors (HeavyBall 3.2.1's
    ``scale_by_soap``).

    For a parameter (its trailing dimensions merged when ``merge_dims``) with gradient :math:`G_t`
    and a factor :math:`L_i` per preconditioned dimension :math:`i`, at step :math:`t \ge 2`:

    .. math::
        \tilde G &= G_t \times_i Q_i^T, \qquad
        \hat\beta(\beta, s) = 1 - \frac{1-\beta}{1-\beta^s}\\
        m &\leftarrow \hat\beta(\beta_1, t-1)\, m + (1-\hat\beta(\beta_1, t-1))\,\tilde G, \qquad
        v \leftarrow \hat\beta(\beta_2, t-1)\, v + (1-\hat\beta(\beta_2, t-1))\,\tilde G^2\\
        u_t &= \big(m / \max(\sqrt{v}, \epsilon)\big) \times_i Q_i\\
        L_i &\leftarrow \hat\beta(\beta_s, t)\, L_i + (1-\hat\beta(\beta_s, t))\, G_{(i)} G_{(i)}^T

    and on the steps HeavyBall's schedule picks (the running sum of ``1 / precondition_frequency``
    passes an integer) each :math:`Q_i` takes one QR power-iteration step towards the eigenvectors
    of :math:`L_i` (:func:`refreshed_basis`) and :math:`m` is rotated into the new basis. The first
    step only sets :math:`L_i = G_{(i)} G_{(i)}^T` and :math:`Q_i` to its eigenvectors
    (``torch.linalg.eigh``, the null space spanned canonically: :func:`initial_basis`) and returns a
    zero update. :math:`\hat\beta` is HeavyBall's bias
    correction, folded into the decay; :math:`\max(\sqrt{v}, \epsilon)` is its denominator.

    Dimensions longer than ``max_precond_dim`` or of length 1 stay in the original basis, as do
    vectors (unless ``precondition_1d``) and scalars, for which this is Adam. The factors and bases
    are held whole on every rank when the parameters are sharded (the moments are sharded like the
    parameters), so a sharded step equals an unsharded one exactly. Eagerly, the first step's
    eigendecomposition and the QR refreshes run only on the steps that need them; compiled with static
    shapes (a compiled step's default) too, as branches of ``torch.cond`` (one graph, no host read).
    Compiled with dynamic shapes, and under ``vmap`` with per-model step counts, they run every step
    and ``torch.where`` keeps them where they apply (:func:`functrain._tree.when`).

    Args:
        b1: :math:`\beta_1`, decay of the first moment, in [0, 1).
        b2: :math:`\beta_2`, decay of the second moment, in [0, 1).
        shampoo_beta: :math:`\beta_s`, decay of the Kronecker factors, in [0, 1).
        eps: :math:`\epsilon`, the floor of the denominator, > 0.
        precondition_frequency: refresh the bases every this many steps on average (an int >= 1).
        max_precond_dim: the longest dimension that gets a factor (and the merging limit).
        merge_dims: merge trailing dimensions (see :func:`merged_shape`).
        precondition_1d: give vectors a factor too.
    """

    def layout(shape: tuple[int, ...]) -> tuple[tuple[int, ...], list[bool]]:
        shape = merged_shape(shape, max_precond_dim) if merge_dims else shape
        return shape, preconditioned_dims(shape, max_precond_dim, precondition_1d)

    def factors(p: Tensor) -> tuple[Tensor, ...]:
        shape, active = layout(tuple(p.shape))
        dtype = _compute_dtype(p.dtype)
        return tuple(torch.zeros(size, size, dtype=dtype, device=p.device) for size, on in zip(shape, active) if on)

    def init(params):
        return ScaleBySoapState(
            count=step_count(params),
            refreshes=torch.zeros((), dtype=torch.float64, device=step_count(params).device),
            exp_avg=_tree.map(torch.zeros_like, params),
            exp_avg_sq=_tree.map(torch.zeros_like, params),
            gg=_tree.map(factors, params),
            q=_tree.map(factors, params),
        )

    def update(updates, state, params=None, **extra):
        count = state.count + 1
        refreshes = state.refreshes + 1 / precondition_frequency
        # HeavyBall refreshes when the running sum passes an integer (so 1/10 summed ten times, which
        # is 0.999..., refreshes at step 11): the same float64 sum here.
        refresh, first = _tree.decided(*hoist(refreshes.floor() > state.refreshes.floor(), count == 1))

        def step(g, m, v, gg, q):
            shape, active = layout(tuple(g.shape))
            dtype = _compute_dtype(g.dtype)
            batch = lambda x: x.reshape(shape)[None].to(dtype)  # noqa: E731 - see "a batch of one" above
            g32, m32, v32 = batch(_whole(g)), batch(_whole(m)), batch(_whole(v))
            gg = _expand(active, [x[None] for x in gg])
            q = _expand(active, [x[None] for x in q])
            outer = _outer_products(g32, active)

            def later_step():
                """Adam in the current eigenbasis, then the factors, then (maybe) a new basis."""
                t = count.to(dtype)
                projected = _project(g32, q, back=False)
                new_m = _lerp(m32, projected, 1 - _debiased(b1, t - 1, g32))
                new_v = _lerp(v32, projected * projected, 1 - _debiased(b2, t - 1, g32))
                denom = new_v.clamp_min(0).sqrt().clamp(min=_as(eps, new_v))
                direction = _project(new_m / denom, q, back=True)
                ws = 1 - debiased_in_float32(shampoo_beta, count).to(dtype)
                new_gg = [None if x is None else _lerp(x, o, ws) for x, o in zip(gg, outer)]

                def refreshed():
                    fresh_q = [None if x is None else refreshed_basis(x, b) for x, b in zip(new_gg, q)]
                    return _change_basis(new_m, q, fresh_q), fresh_q

                new_m, new_q = _tree.when(refresh, refreshed, (new_m, q)) if any(active) else (new_m, q)
                return new_m, new_v, new_gg, new_q, direction

            def first_values():
                """Step 1 sets the factors from this gradient and gives no update."""
                return m32, v32, outer, torch.zeros_like(g32)

            def first_bases():
                """... and takes the factors' eigenvectors: on step 1 only, compiled too (_tree.when)."""
                return [None if x is None else initial_basis(x) for x in outer]

            # The later step's arithmetic is cheap: traced, it runs on every step and torch.where keeps
            # step 1's values; eagerly the host reads which side to keep.
            new_m, new_v, new_gg, new_q, direction = later_step()
            later = (new_m, new_v, new_gg, direction)
            new_m, new_v, new_gg, direction = _tree.choose(first, first_values, lambda: later)
            new_q = _tree.when(first, first_bases, new_q)
            return (
                _placed_like(direction[0].reshape(g.shape).to(g.dtype), g),
                _placed_like(new_m[0].reshape(g.shape).to(m.dtype), m),
                _placed_like(new_v[0].reshape(g.shape).to(v.dtype), v),
                tuple(x[0] for x in new_gg if x is not None),
                tuple(x[0] for x in new_q if x is not None),
            )

        out, exp_avg, exp_avg_sq, gg, q = _tree.map_many_per_leaf(
            step, updates, state.exp_avg, state.exp_avg_sq, state.gg, state.q, n=5
        )
        return out, ScaleBySoapState(count, refreshes, exp_avg, exp_avg_sq, gg, q)

    return GradientTransformation(init, update)


def _expand(active: list[bool], present: list[Tensor]) -> list[Tensor | None]:
    """The per-dimension list (None where a dimension has no factor) from the factors present."""
    it = iter(present)
    return [next(it) if on else None for on in active]


def _as(value, like: Tensor):
    return value.to(dtype=like.dtype, device=like.device) if isinstance(value, Tensor) else value
