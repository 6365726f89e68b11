"""low_precision_state: an optimiser's state stored in bfloat16 (or float16), with stochastic rounding."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _sharding, _tree, _validate
from ..base import GradientTransformation, OptState, register_state, state_check, step_count


@register_state
class LowPrecisionState(NamedTuple):
    count: Tensor  # updates done so far, 0-d int64: the counter of the rounding's random stream
    seed: Tensor  # the random stream's seed, 0-d int64 (kept in the state: a resumed run draws the same bits)
    inner_state: OptState  # tx's state, its tensors wider than ``dtype`` stored in ``dtype``


_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_MASK32 = 0xFFFFFFFF


def low_precision_state(
    tx: GradientTransformation,
    dtype: torch.dtype = torch.bfloat16,
    stochastic_rounding: bool = True,
    seed: int = 0,
) -> GradientTransformation:
    r"""``tx`` with its state stored in ``dtype`` (bfloat16: half of float32's memory), rounded stochastically.

    Each floating-point state tensor of ``tx`` that has at least one dimension (moments, accumulators:
    the tensors shaped like parameters) and is wider than ``dtype`` is kept in ``dtype``. Every update
    reads them back in the dtype ``tx`` built them in (float32 for float32 params: "upcast on read", exact),
    runs ``tx.update`` there, and writes the new state back in ``dtype``. Counts, 0-d scalars (step sizes,
    injected hyperparameters, D-Adaptation's estimates) and tensors already as narrow as ``dtype`` are kept
    as they are: the wrapper never widens a tensor, so ``dtype=torch.float64`` leaves ``tx`` exactly as it was.

    Writing back with round-to-nearest (``stochastic_rounding=False``) loses every change smaller than
    half a unit in the last place (ulp) of ``dtype``: an Adam second moment :math:`v \leftarrow \beta_2 v
    + (1 - \beta_2) g^2` with :math:`\beta_2 = 0.999` moves by 0.1% of itself per step, under bfloat16's
    half-ulp of 0.2-0.4%, so it stalls. Stochastic rounding rounds :math:`x` to its neighbours
    :math:`\lfloor x \rfloor` and :math:`\lceil x \rceil` in ``dtype`` (:math:`\lfloor x \rfloor` the one
    towards zero) as

    .. math::
        \operatorname{SR}(x) = \begin{cases}
            \lceil x \rceil & \text{with probability } p \\
            \lfloor x \rfloor & \text{otherwise}
        \end{cases}, \qquad p = \frac{x - \lfloor x \rfloor}{\lceil x \rceil - \lfloor x \rfloor},

    so :math:`\mathbb{E}[\operatorname{SR}(x)] = x`: small changes survive on average and the state
    tracks the full-precision one (Gupta et al., 2015; Zamirai et al., 2020). bfloat16 is float32 with
    the low 16 bits of the significand cut off, so the rounding works on float32's bit pattern: those 16
    bits are :math:`2^{16} p`, and the value rounds away from zero when 16 random bits are below them.
    That is exactly unbiased from a float32 state, and from a float64 state (rounded to the nearest
    float32 first) biased by at most :math:`2^{-17}` of a bfloat16 ulp. Infinities and NaNs are kept;
    a finite value above bfloat16's largest rounds up to infinity with probability :math:`p`, as
    rounding to nearest rounds it there past the half-way point. Stochastic rounding is for bfloat16
    only; ``float16`` and ``float32`` storage round to nearest (``stochastic_rounding=False``).

    The random bits are a hash of (``seed``, the update count, the state tensor's position, the element's
    index): no generator state, so a compiled step draws the eager step's bits and, from the same state,
    stores the same state bit for bit (only rounding bits, no float casts: see
    :func:`stochastic_round_to_bf16`), never recompiles, and a run resumed from a checkpoint (which holds
    ``seed`` and the count) draws the same bits. Eager,
    the hash costs a dozen integer passes over each narrowed tensor per update; compiled, inductor fuses
    it into the update's kernels. On a sharded (DTensor) state each rank rounds its own shard, drawing each
    element's bits by its index in the whole tensor: the same bits as one process.

    The update (what ``tx`` returns) is computed from the upcast state and returned as is; only the
    state is rounded. ``tx``'s declared fast path (``update_and_apply``, e.g. AdamW's fused kernel) is
    declined: it would write into upcast copies of the state, so it saves nothing.

    Args:
        tx: the transformation whose state to store narrowly (an optimiser, or any composition).
        dtype: the storage dtype: ``torch.bfloat16`` (default), ``torch.float16``, ``torch.float32``
            (for float64 runs) or ``torch.float64`` (nothing is narrower: ``tx`` itself).
        stochastic_rounding: round the new state stochastically (unbiased), for ``dtype=torch.bfloat16``;
            ``False`` rounds to nearest (any ``dtype``).
        seed: the seed of the rounding's random stream, an int in [0, 2**31).

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.ones(3)}
        >>> tx = ft.low_precision_state(ft.adamw(lr=1e-3))
        >>> state = tx.init(params)
        >>> leaves = torch.utils._pytree.tree_leaves(state.inner_state)
        >>> {t.dtype for t in leaves if t.ndim}, {t.dtype for t in leaves if not t.ndim}  # moments; counts
        ({torch.bfloat16}, {torch.int64})
        >>> updates, state = tx.update({"w": torch.tensor([0.1, -0.2, 0.3])}, state, params)
        >>> updates["w"].dtype, int(state.count)  # the update itself is computed in float32
        (torch.float32, 1)

    References:
        Gupta, Agrawal, Gopalakrishnan and Narayanan, 2015, "Deep Learning with Limited Numerical
        Precision" (stochastic rounding). Zamirai, Zhang, De Sa and Aberger, 2020, "Revisiting BFloat16
        Training" (stochastic rounding of bf16 weight and optimiser updates).
    """
    owner = "low_precision_state"
    if not isinstance(tx, GradientTransformation):
        raise TypeError(f"{owner}: tx must be a GradientTransformation, got {type(tx).__name__}")
    if dtype not in _DTYPES:
        raise ValueError(f"{owner}: dtype must be one of {_DTYPES}, got {dtype!r}")
    _validate.boolean(owner, "stochastic_rounding", stochastic_rounding)
    if stochastic_rounding and dtype in (torch.float16, torch.float32):
        raise ValueError(
            f"{owner}: stochastic_rounding is implemented for dtype=torch.bfloat16 (float32's bit pattern cut "
            f"short); for dtype={dtype} pass stochastic_rounding=False (round to nearest)"
        )
    seed = _validate.integer(owner, "seed", seed, 0, 2**31 - 1)

    def narrowed(wide: object) -> bool:
        """Whether ``tx``'s state tensor ``wide`` (as ``tx`` built it) is stored in ``dtype``."""
        return (
            isinstance(wide, Tensor)
            and wide.is_floating_point()
            and wide.ndim > 0
            and wide.dtype.itemsize > dtype.itemsize
        )

    def refuse_complex(params):
        if params is not None and _tree.has_complex(params):
            key, leaf = _tree.complex_leaves(params)[0]
            raise TypeError(
                f"ft.{owner} does not support complex parameters ('{key}' is {leaf.dtype}): the rounding is defined "
                "for real tensors; keep those parameters' state at full precision (ft.partition)"
            )

    def init(params):
        refuse_complex(params)
        count = step_count(params)
        inner = _tree.map(lambda t: t.to(dtype) if narrowed(t) else t, tx.init(params))  # to nearest: exact for zeros
        return LowPrecisionState(count, torch.full_like(count, seed), inner)

    check = state_check(f"ft.{owner}", init, LowPrecisionState)
    # The state tx builds for these params (on meta tensors), for the dtypes to upcast to: one per params
    # signature, as state_check keeps its expected state.
    last: list = [None, None]

    def wide_state(like):
        if _tree.tracing():
            return tx.init(_tree.meta_like(like))  # traced once: no cache read at run time
        signature = _tree.signature(like)
        if last[0] != signature:
            last[:] = [signature, tx.init(_tree.meta_like(like))]
        return last[1]

    def read(state, like):
        """``tx``'s state in the dtypes ``tx`` built it in."""
        return _tree.map(lambda s, w: s.to(w.dtype) if narrowed(w) else s, state.inner_state, wide_state(like))

    def write(state, inner):
        """``tx``'s new state, stored: each wide tensor rounded to ``dtype``."""
        flat, spec = _tree.flatten(inner)
        key = _step_key(state.seed, state.count) if stochastic_rounding else None
        stored = [store(t, key, i) if narrowed(t) else t for i, t in enumerate(flat)]
        return LowPrecisionState(state.count + 1, state.seed, _tree.unflatten(stored, spec))

    def store(t, key, index):
        if key is None:
            return t.to(dtype)
        return _on_local(t, lambda local, first: stochastic_round_to_bf16(local, _stream(key, index, local, first)))

    def update(updates, state, params=None, **extra):
        check(updates, state, params)
        refuse_complex(params if params is not None else updates)
        inner_updates, inner = tx.update(updates, read(state, updates if params is None else params), params, **extra)
        return inner_updates, write(state, inner)

    # Declined: tx's fast path would run on upcast copies of the state (a fused kernel's in-place write of
    # the moments saves nothing there), and the rounding reads its result anyway.
    return GradientTransformation(init, update, update_and_apply=None)


def _on_local(x: Tensor, fn) -> Tensor:
    """``fn(x, 0)``; for a DTensor, ``fn(local shard, global index of its first element)``, with ``x``'s
    placements (elementwise: no communication). The index makes each element draw the bits it draws in one
    process, for functrain's placements (rows split by ``Shard(0)``, or replicated); under any other the
    shard's own indices are used (as unbiased, other bits)."""
    if not _sharding.is_dtensor(x):
        return fn(x, 0)
    from torch.distributed.tensor import DTensor

    local = fn(x.to_local(), _first_index(x))
    return DTensor.from_local(local, x.device_mesh, x.placements, shape=x.shape, stride=x.stride(), run_check=False)


def _first_index(x: Tensor) -> int:
    """The flat index, in the whole tensor, of the first element of this rank's shard of ``x``: its first row
    times the row's size under ``Shard(0)`` (torch.chunk's split: ceil(rows / ranks) rows each), else 0."""
    shards = [(dim, p) for dim, p in enumerate(x.placements) if p.is_shard()]
    if len(shards) != 1 or shards[0][1].dim != 0 or x.ndim == 0:
        return 0
    dim = shards[0][0]
    rows, ranks = x.shape[0], x.device_mesh.size(dim)
    first_row = min(x.device_mesh.get_coordinate()[dim] * -(-rows // ranks), rows)
    return first_row * (x.numel() // max(rows, 1))


def stochastic_round_to_bf16(x: Tensor, bits: Tensor) -> Tensor:
    r"""``x`` (float32, or float64 rounded to the nearest float32 first) rounded to bfloat16: away from
    zero with probability :math:`p`, its fractional distance between its two bfloat16 neighbours, else
    towards zero. ``bits``: int64 of ``x``'s shape, uniform in [0, 2**32) (the low 16 are used).

    Integer arithmetic on float32's bit pattern only: no float cast round trip, which inductor may skip
    (it does not emulate a cast's precision loss when the value is cast back), so compiled == eager."""
    pattern = x.to(torch.float32).view(torch.int32).to(torch.int64)  # int64: no sum below overflows
    fraction = pattern & 0xFFFF  # the bits bfloat16 drops: 2**16 p
    up = (bits & 0xFFFF) < fraction  # with probability p
    # Sign-magnitude: clearing the low bits steps the magnitude towards zero, adding 2**16 steps it away,
    # for either sign (the largest finite value steps to infinity; infinities have no low bits).
    rounded = (pattern & ~0xFFFF) + up.to(torch.int64) * 0x10000
    out = rounded.to(torch.int32).view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero
    return torch.where(torch.isnan(x), x.to(torch.bfloat16), out)  # a NaN's pattern could step out of NaN


def _mix32(x: Tensor | int) -> Tensor | int:
    """A 32-bit integer hash (TheIronBorn's and Wellons' lowbias32 variant, hash-prospector), on int64
    values in [0, 2**32): both multipliers are below 2**31, so no product overflows int64."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def _step_key(seed: Tensor, count: Tensor) -> Tensor:
    """The random stream's key for one update: a 0-d int64 in [0, 2**32) of (seed, count)."""
    key = _mix32(_mix32(seed & _MASK32) ^ (count & _MASK32))
    return _mix32(key ^ ((count >> 32) & _MASK32))  # counts past 2**32 still draw new bits


def _stream(key: Tensor, index: int, like: Tensor, first: int = 0) -> Tensor:
    """Uniform 32-bit integers (int64) of ``like``'s shape, a function of (key, index, element), the elements
    numbered from ``first`` (a shard's place in the whole tensor)."""
    key = key ^ _mix32(index + 1)  # a Python int: one op per state tensor
    element = torch.arange(first, first + like.numel(), dtype=torch.int64, device=like.device).reshape(like.shape)
    if first + like.numel() > 2**32:  # (a static decision on the shape) the high half of the index too
        key = _mix32(key ^ (element >> 32))
    return _mix32(_mix32((element & _MASK32) ^ key) ^ 0x5BD1E995)
