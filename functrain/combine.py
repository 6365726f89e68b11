"""Combinators: build one transformation out of several."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, NamedTuple, Union

from torch import Tensor

from . import _tree
from .base import (
    GradientTransformation,
    OptState,
    apply_updates_to,
    check_state_type,
    empty_init,
    register_state,
    update_and_apply,
)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Applies ``transforms`` in order; the state is the tuple of their states.

    ``chain(scale_by_adam(), add_decayed_weights(1e-2), scale_by_learning_rate(1e-3))`` is AdamW.
    To address the states by name (``state["adam"]``), use :func:`named_chain`.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.chain(ft.clip_by_global_norm(1.0), ft.adam(lr=0.1))
        >>> params = {"w": torch.ones(3)}
        >>> updates, state = tx.update({"w": torch.full((3,), 10.0)}, tx.init(params), params)
        >>> len(state)
        2
    """
    for i, tx in enumerate(transforms):
        if not isinstance(tx, GradientTransformation):
            raise TypeError(f"chain: argument {i} must be a GradientTransformation, got {type(tx).__name__}")

    def init(params):
        return tuple(tx.init(params) for tx in transforms)

    def check(updates, state, params):
        # A NamedTuple is a tuple too: another optimiser's state (AdamState(count, inner)) is not a chain's.
        if not isinstance(state, (tuple, list)) or hasattr(state, "_fields"):
            raise ValueError(
                f"chain: opt_state is {_tree.describe_state(state)}, not the tuple of states chain's init builds"
            )
        if len(state) != len(transforms):
            raise ValueError(f"chain: state holds {len(state)} entries for {len(transforms)} transforms")
        # Only that every gradient is a tensor (a None one is named, not met in a transform's maths); an
        # optimiser in the chain checks shapes against its own state.
        _tree.check_tensors(updates)

    def update(updates, state, params=None, **extra):
        check(updates, state, params)
        return _update_through(transforms, updates, state, params, extra)

    def update_and_apply_last(updates, state, params, *, donate=False, **extra):
        # The head's updates, then the last transform's own fast path (AdamW's fused kernel after clipping).
        check(updates, state, params)
        updates, head = _update_through(transforms[:-1], updates, state[:-1], params, extra)
        params, last = update_and_apply(transforms[-1], updates, state[-1], params, donate=donate, **extra)
        return params, (*head, last)

    offered = bool(transforms) and transforms[-1].update_and_apply is not None
    return GradientTransformation(
        init, update, update_and_apply_last if offered else None, *_chained_declarations(transforms)
    )


def _chained_declarations(transforms) -> tuple[Callable | None, Callable | None]:
    """A chain's ``frozen`` and ``passes`` (see GradientTransformation): a leaf that every part
    freezes or passes, and one at least freezes, is frozen (a part that passes it keeps no state
    for it, and a part after the one that zeroes it gets zeros whatever the gradient); one that
    every part passes is passed."""
    transforms = list(transforms)
    if not transforms or any(tx.frozen is None and tx.passes is None for tx in transforms):
        return None, None

    def declared(tx, params) -> tuple[frozenset, frozenset]:
        return (tx.frozen(params) if tx.frozen else frozenset()), (tx.passes(params) if tx.passes else frozenset())

    def frozen(params) -> frozenset:
        parts = [declared(tx, params) for tx in transforms]
        return frozenset.intersection(*(f | p for f, p in parts)) & frozenset.union(*(f for f, _ in parts))

    def passes(params) -> frozenset:
        return frozenset.intersection(*(declared(tx, params)[1] for tx in transforms))

    return frozen, passes


def _update_through(transforms, updates, states, params, extra) -> tuple[Any, tuple]:
    """``updates`` through each transform in turn: the last updates, and the tuple of new states."""
    new_states = []
    for tx, state in zip(transforms, states):
        updates, state = tx.update(updates, state, params, **extra)
        new_states.append(state)
    return updates, tuple(new_states)


def named_chain(
    *pairs: tuple[str, GradientTransformation], **transforms: GradientTransformation
) -> GradientTransformation:
    """Like :func:`chain`, but the state is a dict ``name -> state``: checkpoints address states by name.

    ``named_chain(clip=ft.clip_by_global_norm(1.0), adam=ft.adam())`` applies ``clip`` then
    ``adam``, and its state is ``{"clip": ..., "adam": ...}``. Transforms are applied in the order
    given (keyword order is insertion order); ``(name, transform)`` pairs may be passed
    positionally to spell the order out, before any keyword arguments. A state is matched to its
    transform by name, never by position, so a saved state loads into a chain whose transforms were
    reordered, and a state whose names do not match the chain's (a renamed or missing entry) is
    refused with the names that differ. Reordering still changes the maths, of course.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.named_chain(clip=ft.clip_by_global_norm(1.0), adam=ft.adam(lr=0.1))
        >>> params = {"w": torch.ones(3)}
        >>> state = tx.init(params)
        >>> list(state), state["adam"].inner_state[0].mu["w"].shape  # adam: a ScheduleState around a chain
        (['clip', 'adam'], torch.Size([3]))
        >>> same = ft.named_chain(("clip", ft.clip_by_global_norm(1.0)), ("adam", ft.adam(lr=0.1)))
    """
    named: dict[str, GradientTransformation] = {}
    for i, pair in enumerate(pairs):
        if isinstance(pair, GradientTransformation) or not (isinstance(pair, tuple) and len(pair) == 2):
            raise TypeError(
                f"named_chain: positional argument {i} must be a (name, transform) pair, got {type(pair).__name__}; "
                "give each transform a name, e.g. named_chain(adam=ft.adam()) or named_chain(('adam', ft.adam()))"
            )
        name, tx = pair
        if not isinstance(name, str):
            raise TypeError(f"named_chain: the name of pair {i} must be a str, got {type(name).__name__}: {name!r}")
        if name in named:
            raise ValueError(f"named_chain: the name {name!r} is given twice")
        named[name] = tx
    for name, tx in transforms.items():
        if name in named:
            raise ValueError(f"named_chain: the name {name!r} is given twice")
        named[name] = tx
    for name, tx in named.items():
        if not isinstance(tx, GradientTransformation):
            raise TypeError(f"named_chain: {name!r} must be a GradientTransformation, got {type(tx).__name__}")

    def init(params):
        return {name: tx.init(params) for name, tx in named.items()}

    def check(updates, state, params):
        _tree.check_tensors(updates)
        if not isinstance(state, dict) or state.keys() != named.keys():
            given = list(state) if isinstance(state, dict) else _tree.describe_state(state)
            missing = [name for name in named if not isinstance(state, dict) or name not in state]
            unexpected = [name for name in state if name not in named] if isinstance(state, dict) else []
            raise ValueError(
                f"named_chain: the state does not match the transforms: missing {missing}, unexpected "
                f"{unexpected} (state holds {given}; transforms are {list(named)})"
            )

    def update(updates, state, params=None, **extra):
        check(updates, state, params)
        updates, new_states = _update_through(named.values(), updates, [state[name] for name in named], params, extra)
        return updates, dict(zip(named, new_states))

    def update_and_apply_last(updates, state, params, *, donate=False, **extra):
        check(updates, state, params)
        *head, last = named
        updates, new_states = _update_through(
            [named[name] for name in head], updates, [state[name] for name in head], params, extra
        )
        params, last_state = update_and_apply(named[last], updates, state[last], params, donate=donate, **extra)
        return params, {**dict(zip(head, new_states)), last: last_state}

    offered = bool(named) and list(named.values())[-1].update_and_apply is not None
    return GradientTransformation(
        init, update, update_and_apply_last if offered else None, *_chained_declarations(named.values())
    )


@register_state
class PartitionState(NamedTuple):
    inner_states: dict[Hashable, OptState]  # label -> the state of that label's transform


Labels = Union[Any, Callable[[str, Tensor], Hashable]]  # noqa: UP007


class _PerSignature:
    """``compute(tree)``, remembered per tree signature: its structure and each leaf's shape, dtype
    and device. Labelling every leaf by name is Python work proportional to the tree (about 0.4 ms
    for 200 leaves, more than an eager AdamW step's arithmetic), and the answer only changes when the
    tree does. Under ``torch.compile`` (or vmap/grad) it runs once, at trace time, so nothing is kept."""

    _MAX_ENTRIES = 8  # a few trees (params, then e.g. an eval subset); never grows without bound

    def __init__(self, compute: Callable[[Any], Any]):
        self.compute = compute
        self.entries: dict[Any, Any] = {}

    def __call__(self, tree: Any) -> Any:
        if _tree.tracing():
            return self.compute(tree)
        flat, spec = _tree.flatten(tree)
        key = (spec, tuple((t.shape, t.dtype, t.device) if isinstance(t, Tensor) else type(t) for t in flat))
        if key not in self.entries:
            if len(self.entries) >= self._MAX_ENTRIES:
                self.entries.clear()
            self.entries[key] = self.compute(tree)
        return self.entries[key]


def partition(transforms: dict[Hashable, GradientTransformation], labels: Labels) -> GradientTransformation:
    """Routes each parameter to the transform of its label: per-group settings in one optimiser.

    ``labels`` is a pytree of labels with the structure of the params, or a function
    ``(name, tensor) -> label`` where ``name`` is the dotted key (``"encoder.0.weight"``). Each
    transform sees only its own parameters, as a ``{name: tensor}`` dict, so its state holds
    nothing for the others (a frozen group under :func:`set_to_zero` holds no state at all).

    Labels are computed once per tree signature (its structure and each leaf's shape, dtype and
    device) and reused, so a labels function must depend only on the name and the tensor's
    metadata (``ndim``, ``shape``, ``dtype``), never on its values. When ``params`` are given to
    ``update``, the updates must have their structure (checked, naming the first differing key):
    the updates are routed by the params' labels.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.ones(2, 2), "bias": torch.ones(2)}
        >>> tx = ft.partition({"decay": ft.adamw(lr=0.1), "no_decay": ft.adam(lr=0.1)},
        ...                   lambda name, p: "decay" if p.ndim >= 2 else "no_decay")
        >>> sorted(tx.init(params).inner_states)
        ['decay', 'no_decay']
    """
    if not isinstance(transforms, dict):
        raise TypeError(
            "partition: transforms must be a dict label -> GradientTransformation, e.g. "
            f"{{'decay': ft.adamw(), 'no_decay': ft.adam()}}, got {type(transforms).__name__}"
        )
    for label, tx in transforms.items():
        if not isinstance(tx, GradientTransformation):
            raise TypeError(
                f"partition: transforms[{label!r}] must be a GradientTransformation, got {type(tx).__name__}"
            )

    def label_each(params) -> list[tuple[str, Hashable]]:
        assigned = _tree.label_leaves(params, labels, "partition")
        unknown = sorted({repr(label) for _, label in assigned if label not in transforms})
        if unknown:
            first = next(name for name, label in assigned if repr(label) in unknown)
            raise ValueError(
                f"partition: labels {', '.join(unknown)} have no transform (first: parameter "
                f"'{first}'); transforms are given for {sorted(map(repr, transforms))}"
            )
        return assigned

    label_of_each = _PerSignature(label_each)

    def init(params):
        assigned = label_of_each(params)
        used = {label for _, label in assigned}
        unused = [label for label in transforms if label not in used]
        if unused and assigned:
            raise ValueError(f"partition: transforms {unused} have no parameters labelled for them")
        groups = _tree.group_by_label(params, assigned, transforms)
        return PartitionState({label: tx.init(groups[label]) for label, tx in transforms.items()})

    def check(updates, state, params):
        check_state_type("ft.partition", state, PartitionState)
        if state.inner_states.keys() != transforms.keys():
            raise _tree.TreeMismatchError(
                f"ft.partition.update got a state for the labels {sorted(map(repr, state.inner_states))}, "
                f"not {sorted(map(repr, transforms))}: pass the state this partition's init made"
            )

    def update(updates, state, params=None, **extra):
        if params is not None:
            _tree.check_same_structure(updates, params, "partition: updates", "params")
        check(updates, state, params)
        assigned = label_of_each(updates if params is None else params)
        grouped_updates = _tree.group_by_label(updates, assigned, transforms)
        grouped_params = (
            _tree.group_by_label(params, assigned, transforms) if params is not None else dict.fromkeys(transforms)
        )
        new_states, new_updates = {}, {}
        for label, tx in transforms.items():
            new_updates[label], new_states[label] = tx.update(
                grouped_updates[label], state.inner_states[label], grouped_params[label], **extra
            )
        return _tree.ungroup(new_updates, assigned, updates), PartitionState(new_states)

    def update_and_apply_groups(updates, state, params, *, donate=False, **extra):
        # Each group through its own transform's fast path (or reference): per-group settings, one pass each.
        _tree.check_same_structure(updates, params, "partition: updates", "params")
        check(updates, state, params)
        assigned = label_of_each(params)
        grouped_updates = _tree.group_by_label(updates, assigned, transforms)
        grouped_params = _tree.group_by_label(params, assigned, transforms)
        new_states, new_params = {}, {}
        for label, tx in transforms.items():
            new_params[label], new_states[label] = update_and_apply(
                tx, grouped_updates[label], state.inner_states[label], grouped_params[label], donate=donate, **extra
            )
        return _tree.ungroup(new_params, assigned, params), PartitionState(new_states)

    def declared(field: str) -> Callable | None:
        # Each group's transform sees only its own leaves: what it declares holds in the whole tree.
        declaring = {label: getattr(tx, field) for label, tx in transforms.items() if getattr(tx, field) is not None}

        def names(params) -> frozenset:
            groups = _tree.group_by_label(params, label_of_each(params), transforms)
            return frozenset().union(*(of(groups[label]) for label, of in declaring.items()))

        return names if declaring else None

    offered = any(tx.update_and_apply is not None for tx in transforms.values())
    return GradientTransformation(
        init, update, update_and_apply_groups if offered else None, declared("frozen"), declared("passes")
    )


def set_to_zero() -> GradientTransformation:
    """Zero updates and no state: the transform of a frozen parameter group.

    ``partition({"train": ft.adamw(), "frozen": ft.set_to_zero()}, labels)`` trains only the
    first group, and holds no optimiser state for the second. ``set_to_zero`` zeroes *every*
    update it sees; to zero only some leaves of a tree and pass the others on, use :func:`freeze`.

    The zeros are negative, ``-0.0``: ``p + -0.0`` is ``p`` bit for bit (``p + 0.0`` would turn a
    ``-0.0`` parameter into ``0.0``), so a frozen parameter is exactly unchanged, and the fast path
    (``update_and_apply``) returns the parameters as they are, with no pass over them. It declares
    its leaves ``frozen``: :func:`~functrain.make_train_step` does not differentiate them.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.set_to_zero()
        >>> tx.update({"w": torch.ones(2)}, tx.init({"w": torch.ones(2)}))
        ({'w': tensor([-0., -0.])}, EmptyState())
    """

    def update(updates, state, params=None, **extra):
        return _tree.full_like(updates, -0.0), state

    def update_and_apply_nothing(updates, state, params, *, donate=False, **extra):
        _tree.check_same_structure(updates, params, "set_to_zero: updates", "params")
        return params, state  # p + -0.0 is p: the same tensors, donated or not

    def frozen(params) -> frozenset[str]:
        return frozenset(name for name, _ in _tree.named_leaves(params))

    return GradientTransformation(empty_init, update, update_and_apply_nothing, frozen=frozen)


@register_state
class MaskedState(NamedTuple):
    inner_state: OptState  # the inner transform's state, over the selected leaves only


Mask = Union[Any, Callable[[str, Tensor], bool]]  # noqa: UP007


def masked(inner: GradientTransformation, mask: Mask) -> GradientTransformation:
    """Applies ``inner`` to the leaves that ``mask`` selects; the others pass through unchanged.

    ``mask`` is a pytree of bools with the structure of the params, or a function
    ``(name, tensor) -> bool`` of the dotted name (as :func:`partition`'s labels; it runs in
    Python, at trace time under ``torch.compile``). ``inner`` sees only the selected leaves, as a
    ``{name: tensor}`` dict, so its state holds nothing for the others. A mask tree of another
    structure raises :class:`~functrain._tree.TreeMismatchError` naming the first differing key, and
    so do updates whose structure differs from the params given with them. As for :func:`partition`,
    the mask is computed once per tree signature, so a mask function must depend only on the name
    and the tensor's metadata, never on its values.

    Unselected updates are returned *unchanged*, as in optax: ``masked(ft.adamw(), trainable)`` on
    its own would add the raw gradients of the other leaves to their params. To train some leaves
    and freeze the rest with no state for the frozen ones, write
    ``chain(masked(ft.adamw(), trainable), freeze(frozen))`` or
    ``partition({"train": ft.adamw(), "frozen": set_to_zero()}, labels)``.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.ones(2, 2), "bias": torch.ones(2)}
        >>> tx = ft.masked(ft.transforms.scale(-0.5), lambda name, p: p.ndim >= 2)
        >>> updates, state = tx.update({"w": torch.ones(2, 2), "bias": torch.ones(2)}, tx.init(params), params)
        >>> updates["w"][0], updates["bias"]
        (tensor([-0.5000, -0.5000]), tensor([1., 1.]))
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"masked: inner must be a GradientTransformation, got {type(inner).__name__}")
    mask_of_each = _PerSignature(lambda tree: _tree.mask_leaves(tree, mask, "masked"))

    def init(params):
        assigned = mask_of_each(params)
        return MaskedState(inner.init(_tree.group_by_label(params, assigned, (True, False))[True]))

    def update(updates, state, params=None, **extra):
        if params is not None:
            _tree.check_same_structure(updates, params, "masked: updates", "params")
        check_state_type("ft.masked", state, MaskedState)
        assigned = mask_of_each(updates if params is None else params)
        groups = _tree.group_by_label(updates, assigned, (True, False))
        selected_params = None if params is None else _tree.group_by_label(params, assigned, (True, False))[True]
        groups[True], inner_state = inner.update(groups[True], state.inner_state, selected_params, **extra)
        return _tree.ungroup(groups, assigned, updates), MaskedState(inner_state)

    def update_and_apply_selected(updates, state, params, *, donate=False, **extra):
        # The selected leaves through inner's fast path; the others' updates are added unchanged.
        _tree.check_same_structure(updates, params, "masked: updates", "params")
        check_state_type("ft.masked", state, MaskedState)
        assigned = mask_of_each(params)
        grouped_updates = _tree.group_by_label(updates, assigned, (True, False))
        grouped_params = _tree.group_by_label(params, assigned, (True, False))
        selected, inner_state = update_and_apply(
            inner, grouped_updates[True], state.inner_state, grouped_params[True], donate=donate, **extra
        )
        others = apply_updates_to(grouped_params[False], grouped_updates[False], donate=donate)
        return _tree.ungroup({True: selected, False: others}, assigned, params), MaskedState(inner_state)

    def selected(params) -> dict[str, Tensor]:
        return _tree.group_by_label(params, mask_of_each(params), (True, False))[True]

    def frozen(params) -> frozenset[str]:
        return inner.frozen(selected(params))

    def passes(params) -> frozenset[str]:
        # The unselected leaves pass through unchanged, and reach nothing else.
        chosen = selected(params)
        inner_passes = inner.passes(chosen) if inner.passes is not None else frozenset()
        return frozenset(name for name, _ in _tree.named_leaves(params) if name not in chosen) | inner_passes

    offered = inner.update_and_apply is not None
    return GradientTransformation(
        init, update, update_and_apply_selected if offered else None, frozen if inner.frozen else None, passes
    )


def freeze(mask: Mask) -> GradientTransformation:
    """Zero updates, and no state, for the leaves ``mask`` selects; the others pass through unchanged.

    ``freeze(mask)`` is ``masked(set_to_zero(), mask)``: ``mask`` (a pytree of bools or a function
    ``(name, tensor) -> bool``) selects the *frozen* leaves. Unlike :func:`set_to_zero`, which
    zeroes every update it is given (its place is inside :func:`partition`, as a group's
    transform), ``freeze`` chains anywhere.

    Where it goes in a chain matters. ``chain(ft.adamw(), freeze(frozen))`` keeps frozen params
    still, but AdamW holds state for every leaf; ``chain(freeze(frozen), ft.adamw())`` is worse:
    AdamW still keeps state for every leaf and its decoupled weight decay moves the frozen params.
    For no state on frozen leaves, write ``chain(masked(ft.adamw(), trainable), freeze(frozen))``
    or ``partition({"train": ft.adamw(), "frozen": set_to_zero()}, labels)``.

    Those two forms, and ``freeze`` alone, declare the frozen leaves (``GradientTransformation.frozen``):
    :func:`~functrain.make_train_step` then does not differentiate them, as if they had
    ``requires_grad=False``, and the frozen params come back bit for bit as they were. A chain
    declares a leaf frozen only when each of its parts freezes or passes it: in
    ``chain(ft.clip_by_global_norm(1.0), partition(...))`` the frozen gradients count in the norm,
    so every parameter is differentiated; clip inside the trained group instead,
    ``partition({"train": chain(ft.clip_by_global_norm(1.0), ft.adamw()), "frozen": set_to_zero()}, labels)``.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"backbone.w": torch.ones(2), "head.w": torch.ones(2)}
        >>> tx = ft.freeze(lambda name, p: name.startswith("backbone"))
        >>> updates, state = tx.update({"backbone.w": torch.ones(2), "head.w": torch.ones(2)}, tx.init(params))
        >>> updates  # -0.0: p + -0.0 is p, bit for bit
        {'backbone.w': tensor([-0., -0.]), 'head.w': tensor([1., 1.])}
    """
    return masked(set_to_zero(), mask)
