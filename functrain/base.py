"""Core types: a gradient transformation is a pair of pure functions over pytrees of tensors.

``init(params) -> state`` builds every tensor the transformation will ever need;
``update(updates, state, params=None, **extra) -> (updates, state)`` maps incoming updates
(gradients, for the first transformation of a chain) to outgoing ones and returns a new state.
Neither function mutates its inputs. Updates are *added* to parameters by :func:`apply_updates`,
so a descent step carries its own minus sign (see ``scale_by_learning_rate``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, NamedTuple, Protocol, TypeVar, Union

import torch
from torch import Tensor

from . import _tree
from ._hoist import hoist

Params = Any
"""A pytree of tensors: ``dict[str, Tensor]`` from ``model.named_parameters()``, or any nesting."""
Updates = Any
"""A pytree of tensors with the structure of the params (gradients, or steps to add)."""
OptState = Any
"""A pytree (usually a NamedTuple) of tensors: everything an optimiser carries between steps."""
Schedule = Callable[[Tensor], Tensor]
LeafNames = Callable[[Any], frozenset]  # params -> the dotted names of some of their leaves
"""Maps the 0-d int64 step count (updates done so far) to a 0-d tensor value."""
Hyperparameter = Union[float, Tensor, Schedule]  # noqa: UP007 - a runtime alias, py3.10-safe
"""A python number, a 0-d tensor, or a :data:`Schedule` of the step count."""


class TransformInitFn(Protocol):
    def __call__(self, params: Params) -> OptState: ...


class TransformUpdateFn(Protocol):
    def __call__(
        self, updates: Updates, state: OptState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, OptState]: ...


class UpdateAndApplyFn(Protocol):
    def __call__(
        self, updates: Updates, state: OptState, params: Params, *, donate: bool = False, **extra: Any
    ) -> tuple[Params, OptState]: ...


class GradientTransformation(NamedTuple):
    """A pure optimiser building block: ``init(params) -> state`` and
    ``update(updates, state, params=None, **extra) -> (updates, state)``, and optionally a declared
    fast path ``update_and_apply(updates, state, params, *, donate=False, **extra) -> (params, state)``.

    ``extra`` carries keyword arguments that some transforms read; every transform accepts and
    ignores the ones it does not use. A training step (``make_train_step``) supplies:

    - ``value``: the loss at ``params``, a 0-d tensor (``reduce_on_plateau`` reads it);
    - ``value_fn``: ``value_fn(params) -> (loss, grads)``, the loss and its gradient on the same
      batch at other parameters (for line searches and sharpness-aware methods).

    ``update_and_apply`` is the update added to the parameters in one pass (torch's fused AdamW
    kernel steps the parameters without an update buffer). ``None`` (the default) means
    ``update`` then :func:`apply_updates`, which is always the reference that a fast path must
    equal. With ``donate=True`` the caller gives up ``params`` and ``state`` (an eager in-place
    step overwrites them with the result anyway), and the function may write the result into
    their tensors; with ``donate=False`` it must leave its inputs as they were. Combinators and
    wrappers pass a fast path on where they can and set ``None`` where they cannot. Call it
    through :func:`update_and_apply`, which supplies the reference when the field is ``None``.

    Two optional declarations tell a training step which parameters it need not differentiate.
    Each maps the params to a frozenset of leaf names (the dotted names of :func:`partition`'s
    groups); ``None`` (the default) declares nothing:

    - ``frozen``: the leaves whose update is an exact zero, ``-0.0`` (``p + -0.0`` is ``p`` bit
      for bit, ``-0.0`` included), whatever the gradients, and whose gradients nothing in the
      transformation reads (:func:`~functrain.set_to_zero` freezes every leaf it is given);
    - ``passes``: the leaves whose update is the incoming one unchanged, read by nothing else (no
      state, no norm over leaves: :func:`~functrain.masked`'s unselected leaves).

    ``partition``, ``masked``, ``freeze``, ``chain`` and ``named_chain`` compose them (a chain
    freezes a leaf that each part freezes or passes and one at least freezes). A step built with
    :func:`~functrain.make_train_step` does not differentiate the frozen parameters at all (the
    backward through a frozen backbone never runs) and gives the transformation zeros in place of
    their gradients, which the declaration makes equal to the reference.
    """

    init: TransformInitFn
    update: TransformUpdateFn
    update_and_apply: UpdateAndApplyFn | None = None
    frozen: LeafNames | None = None
    passes: LeafNames | None = None


_S = TypeVar("_S", bound=type)


def register_state(cls: _S) -> _S:
    """Class decorator for a transform's state NamedTuple.

    Lets ``torch.load(..., weights_only=True)`` rebuild the class: the safe unpickler refuses
    classes it has not been told about, and a NamedTuple of tensors runs no code when rebuilt.
    """
    torch.serialization.add_safe_globals([cls])
    return cls


@register_state
class EmptyState(NamedTuple):
    """State of a transformation that carries nothing between steps."""


def empty_init(params: Params) -> EmptyState:
    """The ``init`` of a transformation that carries nothing between steps."""
    del params
    return EmptyState()


def require_params(owner: str, params: Params | None) -> None:
    """Raises the error a transformation that reads the parameters gives when ``update`` got none."""
    if params is None:
        raise ValueError(f"{owner} needs params: call update(updates, state, params)")


def check_state_type(owner: str, state: OptState, cls: type) -> None:
    """Refuses a state that is not a ``cls`` (another transformation's), naming what it is. For
    combinators, whose parts check their own states."""
    if type(state) is not cls:  # not isinstance: AdamState and AdamaxState share a base
        raise _tree.TreeMismatchError(
            f"{owner}.update got {_tree.describe_state(state)} as opt_state, not the {cls.__name__} that "
            f"{owner}'s init builds: pass the state this optimiser's init made (or that its checkpoint holds)"
        )


# (structure key, params signature) -> the state init builds, shared by every transformation built
# with the same structure key: a scheduled inject_hyperparams(ft.adamw) rebuilds its AdamW each update,
# and must not rebuild the expected state each time too. Bounded: oldest entries go first.
_EXPECTED: dict[tuple, _tree.Layout] = {}
_EXPECTED_MAX = 256


def state_check(
    owner: str, init: TransformInitFn, cls: type, structure_key: Hashable | None = None
) -> Callable[[Updates, OptState, Params | None], tuple | None]:
    """``check(updates, state, params)`` for ``owner``'s update: refuses, naming the first key that
    differs, a state other than the one ``init`` builds for these params (its classes, structure,
    shapes and dtypes: another optimiser's state, or one from a smaller model) and updates of other
    shapes than the params. So nothing mismatched reaches a kernel, which reads and writes by its
    inputs' sizes, or a broadcast, which would silently grow a state. Returns the params' signature
    (``None`` while tracing).

    The expected state is ``init`` run once per params signature on ``meta`` tensors (no memory,
    no compute), kept per check or, given a ``structure_key`` (everything the state's structure
    depends on, e.g. the factory and its non-tensor arguments), shared by every check with that key.
    While tracing only the state's class is checked (``cls``, what ``init`` returns: a Python
    comparison, free in a graph): Adamax's state has Adam's shapes, so a compiled Adam step would
    otherwise run on it. The compiled step then reports the eager step's error (see
    ``make_train_step``).
    """
    # The last (signature, layout): a model's parameters keep their signature from step to step, and
    # `==` on a TreeSpec is cheap where its hash is not.
    last: list = [None, None]

    def expected(like: Params, signature: tuple) -> _tree.Layout:
        if last[0] != signature:
            last[:] = [signature, built(like, signature)]
        return last[1]

    def built(like: Params, signature: tuple) -> _tree.Layout:
        if structure_key is None:
            return _tree.layout(init(_tree.meta_like(like)))
        key = (structure_key, signature)
        if key not in _EXPECTED:
            if len(_EXPECTED) >= _EXPECTED_MAX:
                del _EXPECTED[next(iter(_EXPECTED))]
            _EXPECTED[key] = _tree.layout(init(_tree.meta_like(like)))
        return _EXPECTED[key]

    def check(updates: Updates, state: OptState, params: Params | None) -> tuple | None:
        if type(state) is not cls:  # not isinstance: AdamState and AdamaxState share a base
            check_state_type(owner, state, cls)
        if _tree.tracing():
            return None
        signature = _tree.check_updates(updates, params)
        like = updates if params is None else params
        _tree.check_like(expected(like, signature), state, f"{owner}'s state for these params", "opt_state")
        return signature

    return check


def identity() -> GradientTransformation:
    """The transformation that returns its updates unchanged and holds no state."""

    def update(updates, state, params=None, **extra):
        del params, extra
        return updates, state

    return GradientTransformation(empty_init, update)


def apply_updates(params: Params, updates: Updates) -> Params:
    """Returns ``params + updates`` leaf by leaf, as new tensors in each parameter's dtype.

    The inputs are left untouched. ``updates`` must have the same tree structure as ``params``.
    """
    _tree.check_same_shapes(params, updates, "params", "updates")
    return _tree.add(params, updates)


def update_and_apply(
    tx: GradientTransformation,
    updates: Updates,
    state: OptState,
    params: Params,
    *,
    donate: bool = False,
    **extra: Any,
) -> tuple[Params, OptState]:
    """One optimiser step: the new parameters and state.

    ``tx.update_and_apply`` where ``tx`` declares one, else the reference: ``tx.update`` then
    :func:`apply_updates` (into the parameters themselves when ``donate``). With ``donate=True``
    the caller gives up ``params`` and ``state``: the result may live in their tensors.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = ft.adamw(lr=0.1, weight_decay=0.5)
        >>> new_params, state = ft.update_and_apply(tx, {"w": torch.tensor([0.5, -3.0])}, tx.init(params), params)
        >>> new_params["w"], params["w"]  # pure: the input is left as it was
        (tensor([ 0.8500, -1.8000]), tensor([ 1., -2.]))
    """
    if tx.update_and_apply is not None:
        return tx.update_and_apply(updates, state, params, donate=donate, **extra)
    updates, state = tx.update(updates, state, params, **extra)
    return apply_updates_to(params, updates, donate=donate), state


def apply_updates_to(params: Params, updates: Updates, *, donate: bool) -> Params:
    """:func:`apply_updates`, or with ``donate`` the same sums written into ``params``' own tensors."""
    if not donate:
        return apply_updates(params, updates)
    _tree.check_same_shapes(params, updates, "params", "updates")
    return _tree.add_(params, updates)


def value_at(hyperparameter: Hyperparameter, count: Tensor) -> float | Tensor:
    """The value of a hyperparameter at step ``count``: calls schedules, passes values through."""
    return hoist(hyperparameter(count)) if callable(hyperparameter) else hyperparameter


def step_count(params: Params) -> Tensor:
    """A fresh 0-d int64 step counter on the device of the first parameter (CPU when empty).

    Kept on the parameters' device so a compiled (or CUDA-graphed) step never reads a host value.
    """
    leaves = _tree.leaves(params)
    device = leaves[0].device if leaves else torch.device("cpu")
    return torch.zeros((), dtype=torch.int64, device=device)
