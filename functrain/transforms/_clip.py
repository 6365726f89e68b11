"""Clipping: bound each update element, or the norm of all updates together."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _tree, _validate
from ..base import GradientTransformation, Updates, empty_init


def clip(max_delta: float | Tensor) -> GradientTransformation:
    """Clamps every update element to ``[-max_delta, max_delta]``.

    Equal to ``torch.nn.utils.clip_grad_value_(params, max_delta)``; optax's ``clip``. Holds no state.

    Args:
        max_delta: the largest magnitude an element keeps, ``>= 0`` (a float or a 0-d tensor; to
            schedule it, ``ft.inject_hyperparams(ft.clip)(max_delta=schedule)``).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.clip(1.0)
        >>> tx.update({"w": torch.tensor([-3.0, 0.5, 2.0])}, tx.init({}))[0]
        {'w': tensor([-1.0000,  0.5000,  1.0000])}
    """
    _validate.not_a_schedule("clip", "max_delta", max_delta)
    _validate.in_range("clip", "max_delta", max_delta, 0.0)

    def update(updates, state, params=None, **extra):
        if not isinstance(max_delta, Tensor) and _tree.fast_path_ok(updates):

            def clamp(us):
                out = torch._foreach_clamp_min(us, -max_delta)  # torch's order: clamp_min, then clamp_max
                torch._foreach_clamp_max_(out, max_delta)
                return (out,)

            return _tree.foreach_map(clamp, updates)[0], state

        def clamp_one(u):
            delta = _tree.scalar_for(max_delta, u)
            return u.clamp(-delta, delta)

        return _tree.map(clamp_one, updates), state

    return GradientTransformation(empty_init, update)


def _norm_order(owner: str, norm_type: float | int | str) -> float:
    """``norm_type`` as a float (``"inf"`` allowed, as torch allows it), checked to be ``> 0``."""
    if isinstance(norm_type, str):
        try:
            norm_type = float(norm_type)
        except ValueError:
            raise ValueError(f"{owner}: norm_type must be a number > 0 or 'inf', got {norm_type!r}") from None
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)):
        raise TypeError(f"{owner}: norm_type must be a Python number or 'inf', got {type(norm_type).__name__}")
    _validate.in_range(owner, "norm_type", float(norm_type), 0.0, low_open=True)
    return float(norm_type)


def global_norm(tree: Updates, norm_type: float | str = 2.0) -> Tensor:
    """The ``norm_type``-norm of all the leaves of ``tree`` together, as if concatenated: a 0-d tensor.

    Computed as torch does (``torch.nn.utils.get_total_norm``, which ``clip_grad_norm_``
    returns): the norm of each leaf, one ``torch._foreach_norm`` per (device, dtype) group in eager
    mode, then the norm of those norms, stacked on the first leaf's device (so mixed dtypes are
    promoted, e.g. bf16 with fp32 gives fp32). An empty tree has norm ``tensor(0.)``. No host
    synchronisation: log it, or feed it on, as a tensor.

    Args:
        tree: a pytree of tensors (typically gradients).
        norm_type: the order ``p > 0`` of the norm; ``float("inf")`` (or ``"inf"``) for the max-norm.

    Example:
        >>> import torch, functrain as ft
        >>> ft.transforms.global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]])})
        tensor(5.)
    """
    return _global_norm(tree, _norm_order("global_norm", norm_type))


def _global_norm(tree: Updates, order: float) -> Tensor:
    """:func:`global_norm` for an ``order`` already checked. A transform's update calls this one: a
    host-side check of a Python float inside a compiled step breaks the graph when dynamo has come to
    treat that float as a variable (it does so per code location, and every step shares its code)."""
    norm_type = order
    flat = _tree.leaves(tree)
    if not flat:
        return torch.tensor(0.0)
    norms: list[Tensor] = []
    fast = _tree.fast_path_ok(flat)
    for group in _tree.device_dtype_groups(flat):
        if fast:
            norms.extend(torch._foreach_norm(group, norm_type))
        else:
            norms.extend(torch.linalg.vector_norm(t, norm_type) for t in group)
    return torch.linalg.vector_norm(torch.stack([n.to(flat[0].device) for n in norms]), norm_type)


def clip_by_global_norm(max_norm: float | Tensor, norm_type: float | str = 2.0) -> GradientTransformation:
    """Scales all updates by one factor so that their global norm is at most ``max_norm``.

    Equal to ``torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)``, arithmetic included::

        total = global_norm(updates, norm_type)
        u <- u * min(max_norm / (total + 1e-6), 1)

    The factor is applied even when it is 1 (as torch does), so no value decides a branch and the
    update compiles to one graph with no host synchronisation. Holds no state; to log the norm,
    compute :func:`global_norm` of the gradients alongside.

    torch's ``error_if_nonfinite`` would need a host read of the norm, so it has no counterpart:
    a non-finite norm scales every update to NaN (as torch does by default), and skipping such
    steps is the job of ``apply_if_finite``.

    Args:
        max_norm: the largest global norm kept, ``>= 0`` (a float or a 0-d tensor; to schedule it,
            ``ft.inject_hyperparams(ft.clip_by_global_norm)(max_norm=schedule)``).
        norm_type: the order ``p > 0`` of the norm; ``float("inf")`` (or ``"inf"``) for the max-norm.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.clip_by_global_norm(1.0)
        >>> updates, _ = tx.update({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, tx.init({}))
        >>> ft.transforms.global_norm(updates)
        tensor(1.0000)

    References:
        Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent neural networks",
        ICML 2013 (https://arxiv.org/abs/1211.5063).
    """
    _validate.not_a_schedule("clip_by_global_norm", "max_norm", max_norm)
    _validate.in_range("clip_by_global_norm", "max_norm", max_norm, 0.0)
    norm_type = _norm_order("clip_by_global_norm", norm_type)

    def update(updates, state, params=None, **extra):
        flat = _tree.leaves(updates)
        if not flat:
            return updates, state
        total = _global_norm(updates, norm_type)
        # `max_norm / x` is `x.reciprocal() * max_norm` for a Python float (Tensor.__rtruediv__),
        # which is how torch computes it; a tensor max_norm takes the same route.
        coefficient = torch.clamp((total + 1e-6).reciprocal() * _tree.scalar_for(max_norm, total), max=1.0)
        if _tree.fast_path_ok(flat):

            def rescale(us):
                out = torch._foreach_mul(us, coefficient.to(us[0].device))
                # A 0-d leaf times the 0-d coefficient promotes; torch's in-place mul keeps the leaf's dtype.
                return ([o if o.dtype == u.dtype else o.to(u.dtype) for o, u in zip(out, us)],)

            return _tree.foreach_map(rescale, updates)[0], state
        return _tree.map(lambda u: (u * coefficient.to(u.device)).to(u.dtype), updates), state

    return GradientTransformation(empty_init, update)
