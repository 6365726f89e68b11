"""apply_if_finite: skip the steps whose gradients or updates are not finite."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _tree, _validate
from ..base import GradientTransformation, OptState, check_state_type, register_state, step_count


@register_state
class ApplyIfFiniteState(NamedTuple):
    notfinite_count: Tensor  # consecutive non-finite steps up to now (0 after a finite one), 0-d int64
    last_finite: Tensor  # whether the last step was finite (and applied), 0-d bool
    total_notfinite: Tensor  # non-finite steps since init, 0-d int64
    inner_state: OptState


# A check without a host read (a device-side assert on a GPU, a graph op under compile); private, so
# looked up once: without it an eager check reads the 0-d flag, and a traced one is skipped.
_ASSERT_ASYNC = getattr(torch, "_assert_async", None)


def _assert(ok: Tensor, message: str) -> None:
    if _ASSERT_ASYNC is not None:
        _ASSERT_ASYNC(ok, message)
    elif not _tree.tracing() and not bool(ok):
        raise RuntimeError(message)


def apply_if_finite(tx: GradientTransformation, max_consecutive_errors: int) -> GradientTransformation:
    """Runs ``tx`` but drops any step whose gradients or updates hold a NaN or an infinity.

    On such a step the returned updates are zeros and ``tx``'s state is left as it was, so the
    run continues exactly as if the step had never happened (test: NaN gradients injected at
    chosen steps give the params of the run with those steps removed). The state counts the
    consecutive non-finite steps (``notfinite_count``, back to 0 on a finite step), all of them
    (``total_notfinite``) and whether the last step was applied (``last_finite``).

    When a step makes more than ``max_consecutive_errors`` non-finite steps in a row, update raises
    ``RuntimeError``; a run that keeps producing NaNs is broken, not unlucky (mixed-precision loss
    scaling, which expects bursts, belongs in a loss scaler). The check is
    ``torch._assert_async``, so no value is read on the host: in eager mode on a CPU it raises
    inside update; under ``torch.compile(fullgraph=True)`` the assertion is part of the graph
    (inductor keeps ``aten._assert_async.msg``) and raises the same way on a CPU; on a GPU it is a
    device-side assertion, reported at the next synchronisation, after which that CUDA context is
    unusable, as with any device-side assert, so save a checkpoint before the run gets there.
    optax's ``apply_if_finite`` applies the updates at that point instead of raising.

    Every choice is a ``torch.where`` on a 0-d bool, so a compiled step is one graph.

    Args:
        tx: the transformation to protect.
        max_consecutive_errors: the largest number of consecutive non-finite steps tolerated, an
            int >= 0 (0 raises on the first one).

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([1.0])}
        >>> tx = ft.apply_if_finite(ft.sgd(lr=0.1), max_consecutive_errors=2)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([float("nan")])}, state, params)
        >>> updates["w"], state.notfinite_count, state.last_finite
        (tensor([0.]), tensor(1), tensor(False))

    References:
        optax ``apply_if_finite`` (``optax/_src/transform.py``).
    """
    if not isinstance(tx, GradientTransformation):
        raise TypeError(f"apply_if_finite: tx must be a GradientTransformation, got {type(tx).__name__}")
    _validate.integer("apply_if_finite", "max_consecutive_errors", max_consecutive_errors, 0)
    message = (
        f"apply_if_finite: more than max_consecutive_errors={max_consecutive_errors} consecutive steps had "
        "non-finite gradients or updates"
    )

    def init(params):
        count = step_count(params)
        return ApplyIfFiniteState(
            count, torch.ones((), dtype=torch.bool, device=count.device), count.clone(), tx.init(params)
        )

    def update(updates, state, params=None, **extra):
        # The class only: it holds no tensor shaped like the params; the inner transformation
        # checks its own state (every ft optimiser does).
        check_state_type("ft.apply_if_finite", state, ApplyIfFiniteState)
        inner_updates, inner_state = tx.update(updates, state.inner_state, params, **extra)
        # The gradients are checked too: a transform may map a NaN to a finite update (a sign, a
        # clipped norm) while its state has already taken the NaN in.
        finite = (_tree.all_finite(updates) & _tree.all_finite(inner_updates)).to(state.notfinite_count.device)
        notfinite_count = torch.where(finite, 0, state.notfinite_count + 1)
        _assert(notfinite_count <= max_consecutive_errors, message)
        return _tree.where_or_zero(finite, inner_updates), ApplyIfFiniteState(
            notfinite_count=notfinite_count,
            last_finite=finite,
            total_notfinite=state.total_notfinite + (~finite).to(state.total_notfinite.dtype),
            inner_state=_tree.where(finite, inner_state, state.inner_state),
        )

    # Declined: whether to apply is decided by the inner transform's output, after it is computed; a
    # pass that wrote the parameters (and moments) first could not keep the old ones on a skipped step.
    return GradientTransformation(init, update, update_and_apply=None)
