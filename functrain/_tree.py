"""Tree maths: the only module that touches a pytree library.

Every other module sees pytrees through these functions. The ``torch._foreach_*`` fast paths live
here too: they run one kernel per (device, dtype) group of leaves instead of one per leaf, which is
what makes an eager update over hundreds of tensors cheap. They are used only in plain eager mode;
under ``torch.compile`` the per-leaf form is traced and fused by inductor, and under ``torch.func``
transforms (vmap, grad) or autograd the per-leaf form is the one with full support.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor

try:  # torch.optim's own grouping: private, and it has moved once already
    from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype
except ImportError:  # pragma: no cover - exercised by monkeypatching _HAS_FOREACH
    _group_tensors_by_device_and_dtype = None

Tree = Any

flatten = pytree.tree_flatten
unflatten = pytree.tree_unflatten


class TreeMismatchError(ValueError):
    """Two pytrees that must share a structure do not; the message names the first differing key."""


def _keyed_leaves(tree: Tree) -> list[str]:
    paths, _ = pytree.tree_flatten_with_path(tree)
    return [pytree.keystr(path) for path, _ in paths]


def first_difference(a: Tree, b: Tree) -> str:
    """Describes where two trees first differ: where one optimiser's state meets another's, both
    optimisers by name; else the first key path that differs; else the first node of another class."""
    where, x, y = _first_type_difference(a, b)
    if where is not None and (_optimiser_of(x) or _optimiser_of(y)):
        return f"different types at {where or '<root>'}: {describe_state(x)} vs {describe_state(y)}"
    keys_a, keys_b = _keyed_leaves(a), _keyed_leaves(b)
    for key_a, key_b in zip(keys_a, keys_b):
        if key_a != key_b:
            return f"first differing key: {key_a or '<root>'} vs {key_b or '<root>'}"
    if len(keys_a) != len(keys_b):
        longer, extra = ("first", keys_a) if len(keys_a) > len(keys_b) else ("second", keys_b)
        missing = extra[min(len(keys_a), len(keys_b))]
        return f"first differing key: {missing or '<root>'} (only in the {longer})"
    if where is not None:
        return f"same keys, different types at {where or '<root>'}: {describe_state(x)} vs {describe_state(y)}"
    return f"same keys, different container types: {structure(a)} vs {structure(b)}"


def _optimiser_of(node: Any) -> str | None:
    """The optimiser an ``ft`` optimiser's state names (``AdamState.optimiser == "adam"``), else None."""
    return getattr(type(node), "optimiser", None)


def _first_type_difference(a: Any, b: Any, path: str = "") -> tuple[str | None, Any, Any]:
    """The key path and the two containers where ``a`` and ``b`` first differ in class (leaves of
    different types, such as a tensor and its label, do not count); ``None`` when there is none."""
    containers = (dict, list, tuple)
    if not (isinstance(a, containers) and isinstance(b, containers)):
        return None, a, b
    if type(a) is not type(b):
        return path, a, b
    if isinstance(a, dict):
        pairs = [(f"{path}[{k!r}]", a[k], b[k]) for k in a if k in b]
    elif isinstance(a, (tuple, list)):
        fields = getattr(a, "_fields", None)
        pairs = [(f"{path}.{fields[i]}" if fields else f"{path}[{i}]", x, y) for i, (x, y) in enumerate(zip(a, b))]
    else:
        pairs = []
    for sub_path, x, y in pairs:
        found = _first_type_difference(x, y, sub_path)
        if found[0] is not None:
            return found
    return None, a, b


def describe_state(state: Any) -> str:
    """What a state is, for an error: the optimiser that built it when its class says so."""
    optimiser = getattr(type(state), "optimiser", None)
    if optimiser:
        return f"ft.{optimiser}'s state ({type(state).__name__})"
    name = type(state).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def check_same_structure(a: Tree, b: Tree, name_a: str = "first", name_b: str = "second") -> None:
    """Raises :class:`TreeMismatchError` naming the first differing key if ``a`` and ``b`` differ."""
    if pytree.tree_structure(a) != pytree.tree_structure(b):
        raise TreeMismatchError(f"{name_a} and {name_b} have different structures; {first_difference(a, b)}")


def check_same_shapes(a: Tree, b: Tree, name_a: str = "first", name_b: str = "second") -> None:
    """:func:`check_same_structure`, and each pair of leaves of one shape: raises
    :class:`TreeMismatchError` naming the first key where they differ. Runs before a fused or
    multi-tensor kernel, which reads and writes by its inputs' sizes and must never see a mismatch."""
    # Each tree flattened once: this runs on every eager step (apply_updates, the fused kernels);
    # key paths are computed only to name a mismatch.
    _check_flat_shapes(a, b, *pytree.tree_flatten(a), *pytree.tree_flatten(b), name_a, name_b)


def _check_flat_shapes(a, b, flat_a, spec_a, flat_b, spec_b, name_a: str, name_b: str) -> None:
    if spec_a != spec_b:
        raise TreeMismatchError(f"{name_a} and {name_b} have different structures; {first_difference(a, b)}")
    for i, (x, y) in enumerate(zip(flat_a, flat_b)):
        if isinstance(x, Tensor) != isinstance(y, Tensor):  # a None gradient, a float
            tensor_side, other, other_name = (name_a, y, name_b) if isinstance(x, Tensor) else (name_b, x, name_a)
            raise TreeMismatchError(
                f"{other_name} at {_keyed_leaves(a)[i] or '<root>'} is {type(other).__name__}, not a tensor as in "
                f"{tensor_side}" + (" (a parameter without a gradient: give it zeros)" if other is None else "")
            )
        if isinstance(x, Tensor) and x.shape != y.shape:
            raise TreeMismatchError(
                f"{name_a} and {name_b} differ in shape at {_keyed_leaves(a)[i] or '<root>'}: "
                f"{tuple(x.shape)} vs {tuple(y.shape)}"
            )
        if isinstance(x, Tensor) and (x.layout is not torch.strided or y.layout is not torch.strided):
            name, tensor = (name_a, x) if x.layout is not torch.strided else (name_b, y)
            _refuse_sparse(name, _keyed_leaves(a)[i], tensor)


def check_updates(updates: Tree, params: Tree | None) -> tuple:
    """Updates of the params' structure and shapes (when given), every leaf a tensor: a ``None``
    gradient or a float is named here rather than failing inside a transform's arithmetic. Returns
    the :func:`signature` of the params (of the updates without params), from the same flattening."""
    flat_u, spec_u = pytree.tree_flatten(updates)
    if params is None:
        _check_tensors(updates, flat_u)
        return spec_u, _leaf_signature(flat_u)
    flat_p, spec_p = pytree.tree_flatten(params)
    _check_flat_shapes(params, updates, flat_p, spec_p, flat_u, spec_u, "params", "updates (gradients)")
    return spec_p, _leaf_signature(flat_p)


def check_tensors(updates: Tree) -> None:
    """Every leaf of ``updates`` is a tensor: a ``None`` gradient or a float is named by its key."""
    _check_tensors(updates, leaves(updates))


def _check_tensors(updates: Tree, flat: list) -> None:
    for i, leaf in enumerate(flat):  # one plain loop: traced on every compiled update
        if not isinstance(leaf, Tensor):
            key = _keyed_leaves(updates)[i]
            raise TreeMismatchError(f"updates (gradients) at {key or '<root>'} is {type(leaf).__name__}, not a tensor")
        if leaf.layout is not torch.strided:
            _refuse_sparse("updates (gradients)", _keyed_leaves(updates)[i], leaf)


def _refuse_sparse(name: str, key: str, tensor: Tensor) -> None:
    """Every transform does dense arithmetic: a sparse tensor would fail inside a kernel (lerp, the fused
    AdamW) or, through ops that happen to accept it, give a silently different step (a sparse update)."""
    raise ValueError(
        f"{name} at {key or '<root>'} is a sparse tensor ({tensor.layout}): functrain's optimisers take dense "
        "gradients only. Build the embedding with nn.Embedding(sparse=False) (the default), whose dense gradient "
        "every functrain optimiser takes, or pass grad.to_dense(); torch.optim.SparseAdam's lazy per-row update "
        "(moments of the rows seen in this batch only) has no functional form here"
    )


def check_shapes_against(a: Tree, name_a: str, others: Sequence[tuple[Tree, str]]) -> None:
    """:func:`check_same_shapes` of ``a`` against each of ``others`` (``(tree, name)`` pairs), with
    ``a`` flattened once: the trees a fused kernel takes together."""
    flat_a, spec_a = pytree.tree_flatten(a)
    for b, name_b in others:
        _check_flat_shapes(a, b, flat_a, spec_a, *pytree.tree_flatten(b), name_a, name_b)


def signature(tree: Tree) -> tuple:
    """The structure, shapes and dtypes of ``tree``: equal signatures give ``init`` equal structures."""
    flat, spec = pytree.tree_flatten(tree)
    return spec, _leaf_signature(flat)


def _leaf_signature(flat: list) -> tuple:
    return tuple((x.shape, x.dtype) if isinstance(x, Tensor) else type(x) for x in flat)


def signature_has_complex(sig: tuple) -> bool:
    """Whether a :func:`signature` has a complex tensor (no second walk over the tree)."""
    return any(type(leaf) is tuple and leaf[1].is_complex for leaf in sig[1])


class Layout(NamedTuple):
    """A tree and its :func:`signature`, computed once: what a state is compared against each step."""

    tree: Tree
    signature: tuple


def layout(tree: Tree) -> Layout:
    return Layout(tree, signature(tree))


def check_like(expected: Layout, actual: Tree, name_expected: str, name_actual: str) -> None:
    """``actual`` has ``expected``'s structure, and each tensor its shape and dtype; else
    :class:`TreeMismatchError` naming the first key that differs. For a state against the one
    ``init`` builds: a dtype the kernels did not expect reads or writes the wrong number of bytes in a
    fused kernel, or silently promotes in a per-leaf one."""
    flat, spec = pytree.tree_flatten(actual)  # the one flattening per step: the expected side is cached
    if spec != expected.signature[0]:
        raise TreeMismatchError(
            f"{name_expected} and {name_actual} have different structures; {first_difference(expected.tree, actual)}"
        )
    for i, (want, y) in enumerate(zip(expected.signature[1], flat)):
        if type(want) is tuple and isinstance(y, Tensor) and (want[0] != y.shape or want[1] != y.dtype):
            what = "shape" if want[0] != y.shape else "dtype"
            raise TreeMismatchError(
                f"{name_expected} and {name_actual} differ in {what} at {name_actual}{_keyed_leaves(actual)[i]}: "
                + (f"{tuple(want[0])} vs {tuple(y.shape)}" if what == "shape" else f"{want[1]} vs {y.dtype}")
            )


def meta_like(tree: Tree) -> Tree:
    """``tree`` with each tensor replaced by a ``meta`` tensor of its shape and dtype (no memory, no
    compute): running ``init`` on it gives the structure of the state without allocating it."""
    return pytree.tree_map(lambda x: torch.empty_like(x, device="meta") if isinstance(x, Tensor) else x, tree)


def complex_leaves(tree: Tree) -> list[tuple[str, Tensor]]:
    """The ``(key, tensor)`` pairs of ``tree`` whose dtype is complex."""
    return [(key, x) for key, x in named_leaves(tree) if x.is_complex()] if has_complex(tree) else []


def has_complex(tree: Tree) -> bool:
    for x in leaves(tree):  # a loop, not any(...): traced on every compiled update (see _tensor_dicts_keys)
        if isinstance(x, Tensor) and x.is_complex():
            return True
    return False


def as_real(tree: Tree) -> Tree:
    """Each complex tensor of ``tree`` as its real view (``torch.view_as_real``: a trailing dim of 2,
    the same memory), as torch.optim steps complex parameters; real tensors pass through."""
    if not has_complex(tree):
        return tree
    return pytree.tree_map(lambda x: torch.view_as_real(x) if isinstance(x, Tensor) and x.is_complex() else x, tree)


def as_complex_like(tree: Tree, like: Tree) -> Tree:
    """Undoes :func:`as_real`: each leaf whose counterpart in ``like`` is complex, viewed as complex."""
    if not has_complex(like):
        return tree
    return pytree.tree_map(lambda x, ref: torch.view_as_complex(x) if ref.is_complex() else x, tree, like)


def _tensor_dicts_keys(trees: tuple[Tree, ...]) -> list | None:
    """The keys, when every tree is a plain dict of tensors with the same keys in the same order (a
    params or gradients dict, an optimiser's moments: the common case); else ``None``.

    Such trees are mapped key by key, which is exactly what pytree gives for them (a dict flattens
    to its values in insertion order) without building its specs: under ``torch.compile`` dynamo
    traces pytree's Python op by op, and that took half the time of tracing a GPT's train step.
    Plain loops, not ``all(...)`` over generators: dynamo traces those at several times the cost."""
    if type(trees[0]) is not dict:
        return None
    keys = list(trees[0])
    for tree in trees:
        if type(tree) is not dict or list(tree) != keys:
            return None
        for value in tree.values():
            if not isinstance(value, Tensor):
                return None  # a nested container or None: pytree's walk decides
    return keys


def leaves(tree: Tree) -> list:
    """The leaves of ``tree`` in pytree's order."""
    return list(tree.values()) if _tensor_dicts_keys((tree,)) is not None else pytree.tree_leaves(tree)


def map(fn: Callable[..., Any], tree: Tree, *rest: Tree) -> Tree:  # noqa: A001 - tree.map reads well
    """``fn`` applied leaf by leaf over trees of one structure (checked, with the first differing key)."""
    keys = _tensor_dicts_keys((tree, *rest))
    if keys is not None:
        return dict(zip(keys, [fn(*xs) for xs in zip(tree.values(), *(other.values() for other in rest))]))
    flat, spec = pytree.tree_flatten(tree)
    others = []
    for other in rest:
        other_flat, other_spec = pytree.tree_flatten(other)
        if other_spec != spec:
            raise TreeMismatchError(f"trees have different structures; {first_difference(tree, other)}")
        others.append(other_flat)
    return pytree.tree_unflatten([fn(*xs) for xs in zip(flat, *others)], spec)


def map_many(fn: Callable[..., tuple], tree: Tree, *rest: Tree, n: int) -> tuple[Tree, ...]:
    """Like :func:`map` for an ``fn`` that returns a tuple of ``n`` tensors; returns ``n`` trees."""
    keys = _tensor_dicts_keys((tree, *rest))
    if keys is not None:
        results = [fn(*xs) for xs in zip(tree.values(), *(other.values() for other in rest))]
        return tuple(dict(zip(keys, [r[i] for r in results])) for i in range(n))
    flat, spec = pytree.tree_flatten(tree)
    for other in rest:
        if pytree.tree_structure(other) != spec:
            raise TreeMismatchError(f"trees have different structures; {first_difference(tree, other)}")
    results = [fn(*xs) for xs in zip(flat, *(pytree.tree_leaves(o) for o in rest))]
    return tuple(pytree.tree_unflatten([r[i] for r in results], spec) for i in range(n))


def map_many_per_leaf(fn: Callable[..., tuple], tree: Tree, *rest: Tree, n: int) -> tuple[Tree, ...]:
    """Like :func:`map_many`, where each of ``rest`` has ``tree``'s structure down to ``tree``'s leaves
    and holds whatever it likes there (a tuple of factors per parameter, say), passed to ``fn`` whole."""
    flat, spec = pytree.tree_flatten(tree)
    results = [fn(*xs) for xs in zip(flat, *(spec.flatten_up_to(o) for o in rest))]
    return tuple(pytree.tree_unflatten([r[i] for r in results], spec) for i in range(n))


def structure(tree: Tree) -> pytree.TreeSpec:
    return pytree.tree_structure(tree)


# ----------------------------------------------------------------------------- are we tracing?


def tracing() -> bool:
    """Whether this code is being traced: under ``torch.compile``, or inside a ``torch.func``
    transform (vmap, grad, jvp). There, the per-leaf reference form runs, Python-side caches are
    skipped (the code runs once, at trace time) and no tensor value is read on the host.

    The functorch test reads a private API; if a torch release drops it, every call counts as
    traced: the reference paths, always right, only slower.
    """
    if torch.compiler.is_compiling():
        return True
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    return peek is None or peek() is not None


# ----------------------------------------------------------------------------- the multi-tensor path

# Every private multi-tensor op the fast paths call. Without one of them, or without torch's grouping
# helper, the fast paths are off and the per-leaf reference runs: slower, never wrong.
_FOREACH_OPS = (
    "add", "add_", "addcmul_", "clamp_max_", "clamp_min", "div", "div_", "lerp", "maximum", "mul", "mul_",
    "norm", "sqrt", "sqrt_", "sub",
)  # fmt: skip
_HAS_FOREACH = _group_tensors_by_device_and_dtype is not None and all(
    hasattr(torch, f"_foreach_{op}") for op in _FOREACH_OPS
)


def fast_path_ok(tree: Tree) -> bool:
    """Whether the ``torch._foreach_*`` path may run over ``tree``'s leaves (a tree, or a list of its
    leaves): plain eager mode, nothing to differentiate. Traced, the leaves are never walked."""
    if not _HAS_FOREACH or tracing():
        return False
    flat = leaves(tree)
    return bool(flat) and not (torch.is_grad_enabled() and any(t.requires_grad for t in flat))


def foreach_map(fn: Callable[..., Sequence[list[Tensor]]], *trees: Tree) -> tuple[Tree, ...]:
    """Runs ``fn(*lists)`` once per (device, dtype) group of the trees' leaves.

    ``fn`` receives one list per input tree (matching positions) and returns a sequence of output
    lists, each matching its inputs; the outputs are put back into trees of the first tree's
    structure. Groups follow the first tree's leaves.
    """
    first, spec = pytree.tree_flatten(trees[0])  # each tree walked once: this runs on every eager update
    flats = [first]
    for tree in trees[1:]:
        flat, other_spec = pytree.tree_flatten(tree)
        if other_spec != spec:
            raise TreeMismatchError(f"trees have different structures; {first_difference(trees[0], tree)}")
        flats.append(flat)
    outputs: list[list[Tensor | None]] | None = None
    groups = _group_tensors_by_device_and_dtype(flats, with_indices=True)
    for (_device, _dtype), (lists, indices) in groups.items():
        results = fn(*lists)
        if outputs is None:
            outputs = [[None] * len(flats[0]) for _ in results]
        for out, result in zip(outputs, results):
            for i, value in zip(indices, result):
                out[i] = value
    assert outputs is not None, "foreach_map needs at least one leaf"
    return tuple(pytree.tree_unflatten(out, spec) for out in outputs)


def scalar_for(value: float | Tensor, like: Tensor) -> float | Tensor:
    """A hyperparameter value ready for an op over tensors like ``like`` (foreach ops too).

    A tensor is cast to ``like``'s dtype, so that the foreach path and the per-leaf path round the
    same way (a foreach op and a plain op given a wider scalar tensor do not). On fp16/bf16 leaves
    this rounds a tensor hyperparameter to 8 bits of mantissa, where a Python float is not rounded:
    use float hyperparameters for low-precision parameters when the last bit matters.
    """
    if isinstance(value, Tensor):
        return value.to(device=like.device, dtype=like.dtype)
    return value


# ----------------------------------------------------------------------------- tree maths


def add(a: Tree, b: Tree) -> Tree:
    """``a + b`` leaf by leaf, each result in ``a``'s dtype (so bf16 params stay bf16)."""
    if fast_path_ok(a):
        return foreach_map(lambda xs, ys: (torch._foreach_add(xs, ys),), a, _cast_like(b, a))[0]
    return map(lambda x, y: x + y.to(x.dtype), a, b)


def add_(a: Tree, b: Tree) -> Tree:
    """``a += b`` leaf by leaf, in place (``b`` cast to each leaf's dtype); returns ``a``."""
    b = _cast_like(b, a)
    if fast_path_ok(a):
        foreach_map(_foreach_add_into, a, b)
    else:
        map(lambda x, y: x.add_(y), a, b)
    return a


def _foreach_add_into(xs: list[Tensor], ys: list[Tensor]) -> tuple[list[Tensor]]:
    torch._foreach_add_(xs, ys)
    return (xs,)


def _cast_like(tree: Tree, like: Tree) -> Tree:
    return map(lambda t, ref: t if t.dtype == ref.dtype else t.to(ref.dtype), tree, like)


def zeros_like(tree: Tree) -> Tree:
    return map(lambda t: torch.zeros_like(t, memory_format=torch.preserve_format), tree)


def full_like(tree: Tree, value: float | Tensor) -> Tree:
    return map(
        lambda t: torch.full_like(t, 0.0).add_(value) if isinstance(value, Tensor) else torch.full_like(t, value), tree
    )


def scale(tree: Tree, factor: float | Tensor) -> Tree:
    """``factor * tree``."""
    if fast_path_ok(tree):
        return foreach_map(lambda xs: (torch._foreach_mul(xs, scalar_for(factor, xs[0])),), tree)[0]
    return map(lambda t: t * scalar_for(factor, t), tree)


def add_scaled(a: Tree, b: Tree, factor: float | Tensor) -> Tree:
    """``a + factor * b``."""
    if fast_path_ok(a):

        def fused(xs, ys):
            f = scalar_for(factor, xs[0])
            return (
                torch._foreach_add(xs, torch._foreach_mul(ys, f))
                if isinstance(f, Tensor)
                else torch._foreach_add(xs, ys, alpha=f),
            )

        return foreach_map(fused, a, b)[0]
    return map(lambda x, y: x + scalar_for(factor, y) * y, a, b)


def _key_name(key: Any) -> str:
    for attribute in ("key", "idx", "name"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def named_leaves(tree: Tree) -> list[tuple[str, Tensor]]:
    """``(name, leaf)`` pairs, the name joining the keys with dots as ``named_parameters`` does
    (``{"fc": {"weight": w}}`` gives ``"fc.weight"``; a flat ``named_parameters`` dict keeps its keys)."""
    if _tensor_dicts_keys((tree,)) is not None:
        return [(str(key), leaf) for key, leaf in tree.items()]  # as the general walk names a dict's leaves
    paths, _ = pytree.tree_flatten_with_path(tree)
    return [(".".join(_key_name(k) for k in path), leaf) for path, leaf in paths]


def scaled_sum(a: Tree, alpha: float | Tensor, b: Tree, beta: float | Tensor) -> Tree:
    """``alpha * a + beta * b`` leaf by leaf, in one new tensor per leaf."""
    if fast_path_ok(a):

        def fused(xs, ys):
            out = torch._foreach_mul(xs, scalar_for(alpha, xs[0]))  # the one allocation; the rest in place
            weight = scalar_for(beta, ys[0])
            if isinstance(weight, Tensor):
                torch._foreach_add_(out, torch._foreach_mul(ys, weight))
            else:
                torch._foreach_add_(out, ys, alpha=weight)
            return (out,)

        return foreach_map(fused, a, b)[0]
    # In ``a``'s dtype, as the fast path returns it (``b`` may be wider, e.g. fp32 params for bf16 updates).
    return map(lambda x, y: (x * scalar_for(alpha, x) + y * scalar_for(beta, y)).to(x.dtype), a, b)


# ----------------------------------------------------------------------------- labelled leaves


def label_leaves(tree: Tree, labels: Any, owner: str, what: str = "labels") -> list[tuple[str, Any]]:
    """``(name, label)`` for each leaf of ``tree``, in leaf order, with the dotted names of :func:`named_leaves`.

    ``labels`` is a tree of labels with ``tree``'s structure (checked: :class:`TreeMismatchError`
    names the first differing key) or a function ``(name, leaf) -> label``. Plain Python: under
    ``torch.compile`` it runs once, at trace time. The names must be unique, because groups of
    leaves travel as ``{name: leaf}`` dicts (see :func:`group_by_label`).
    """
    named = named_leaves(tree)
    if callable(labels):
        assigned = [(name, labels(name, leaf)) for name, leaf in named]
    else:
        check_same_structure(tree, labels, f"{owner}: params", what)
        assigned = [(name, label) for (name, _), label in zip(named, leaves(labels))]
    seen: set[str] = set()
    for name, _ in assigned:
        if name in seen:
            raise ValueError(f"{owner}: two leaves are both named {name!r}; give the params unique dotted names")
        seen.add(name)
    return assigned


def mask_leaves(tree: Tree, mask: Any, owner: str) -> list[tuple[str, bool]]:
    """:func:`label_leaves` for a mask: every label must be a Python ``bool``."""
    assigned = label_leaves(tree, mask, owner, "mask")
    for name, selected in assigned:
        if not isinstance(selected, bool):
            raise TypeError(f"{owner}: the mask must give a bool for each leaf, got {selected!r} for {name!r}")
    return assigned


def group_by_label(tree: Tree, assigned: list[tuple[str, Any]], labels: Any) -> dict[Any, dict[str, Any]]:
    """``{label: {name: leaf}}`` for each of ``labels`` (in that order), the leaves of ``tree``
    placed by ``assigned`` (from :func:`label_leaves`, for a tree of the same structure)."""
    groups: dict[Any, dict[str, Any]] = {label: {} for label in labels}
    flat = leaves(tree)
    if len(flat) != len(assigned):
        raise TreeMismatchError(f"a tree of {len(flat)} leaves was labelled for {len(assigned)} leaves")
    for (name, label), leaf in zip(assigned, flat):
        groups[label][name] = leaf
    return groups


def ungroup(groups: dict[Any, dict[str, Any]], assigned: list[tuple[str, Any]], like: Tree) -> Tree:
    """The inverse of :func:`group_by_label`: the grouped leaves back in ``like``'s structure."""
    return unflatten([groups[label][name] for name, label in assigned], structure(like))


def device_dtype_groups(tensors: Sequence[Tensor]) -> list[list[Tensor]]:
    """``tensors`` grouped by (device, dtype), groups in the order torch's multi-tensor code uses
    (so a reduction over the groups adds in the same order as ``torch.nn.utils``); under
    ``torch.compile`` or a functorch transform, in order of first appearance."""
    if tracing() or not _HAS_FOREACH:
        groups: dict[tuple, list[Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.device, t.dtype), []).append(t)
        return list(groups.values())
    return [lists[0] for lists, _ in _group_tensors_by_device_and_dtype([list(tensors)]).values()]


# ----------------------------------------------------------------------------- walking optimiser states


def _children(node: Any) -> list[tuple[Any, Any]]:
    """``(key, child)`` of a state node: a NamedTuple's fields, a tuple's or list's items (by index), a
    dict's values (by key)."""
    if isinstance(node, tuple) and hasattr(type(node), "_fields"):
        return [(field, getattr(node, field)) for field in node._fields]
    if isinstance(node, (tuple, list)):
        return list(enumerate(node))
    if isinstance(node, dict):
        return list(node.items())
    return []


def state_nodes(state: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every node of an optimiser state with its dotted path (``"1.inner_state.mu"``), depth first,
    each node before its children: the one walk that finds a wrapper's state at any depth."""
    found = [(path, state)]
    for key, child in _children(state):
        found.extend(state_nodes(child, f"{path}.{key}" if path else str(key)))
    return found


def find_states(state: Any, cls: type) -> list[Any]:
    """Every ``cls`` instance inside ``state`` (chain tuples, NamedTuple states, partition's dicts), outermost
    first (the order of :func:`state_nodes`). Tensors hold no state, so they are not visited: a train step
    looks for its loss scale on every call, and under ``torch.compile`` each visit is traced."""
    found = [state] if isinstance(state, cls) else []
    for _, child in _children(state):
        if not isinstance(child, Tensor):
            found.extend(find_states(child, cls))
    return found


def replace_node(tree: Any, old: Any, new: Any) -> Any:
    """``tree`` with the node ``old`` (found by identity) replaced by ``new``; containers off its path are shared."""
    if tree is old:
        return new
    if isinstance(tree, dict):
        children = {k: replace_node(v, old, new) for k, v in tree.items()}
        return tree if all(children[k] is tree[k] for k in tree) else type(tree)(children)
    if isinstance(tree, (tuple, list)):
        children = [replace_node(v, old, new) for v in tree]
        if all(c is v for c, v in zip(children, tree)):
            return tree
        return type(tree)(*children) if hasattr(tree, "_fields") else type(tree)(children)
    return tree


# ----------------------------------------------------------------------------- selecting whole trees


def all_finite(tree: Tree) -> Tensor:
    """A 0-d bool tensor: whether every element of every leaf is finite (no host read).

    Eagerly, one ``_foreach_norm(inf)`` per (device, dtype) group and a single ``isfinite`` on the
    stacked maxima (inf and NaN propagate through the max) replaces two kernels per leaf.
    """
    flat = [t for t in leaves(tree) if t.numel() > 0]
    if not flat:
        return torch.tensor(True)
    device = flat[0].device
    if fast_path_ok(flat):
        groups = device_dtype_groups(flat)
        maxima = [m.to(device) for group in groups for m in torch._foreach_norm(group, ord=float("inf"))]
        return torch.isfinite(torch.stack(maxima)).all()
    return torch.stack([torch.isfinite(t).all().to(device) for t in flat]).all()


def where(condition: Tensor, a: Tree, b: Tree) -> Tree:
    """``a`` where the 0-d bool ``condition`` holds, else ``b``, leaf by leaf: a branch without a
    Python ``if`` on a tensor, so it traces into one graph and never syncs with the device."""
    return map(lambda x, y: torch.where(condition.to(x.device), x, y), a, b)


def decided(*conditions: Tensor) -> tuple[Tensor | bool, ...]:
    """0-d bool ``conditions`` as :func:`choose` takes them: read on the host once, eagerly (one read
    per step for many calls of :func:`choose`, not one per call), and left as tensors when traced."""
    return conditions if tracing() else tuple(bool(c) for c in conditions)


def choose(condition: Tensor | bool, if_true: Callable[[], Tree], if_false: Callable[[], Tree]) -> Tree:
    """``if_true()`` if the 0-d bool ``condition`` holds, else ``if_false()``: two trees of one structure.
    ``condition`` may be a Python bool eagerly (see :func:`decided`).

    Eager, the host reads the condition and runs only the branch taken (an optimiser's occasional
    work, an eigendecomposition or a line-search trip, costs nothing on the other steps). Traced
    (compiled, vmapped), both branches run and each leaf is merged by ``torch.where``, so the graph
    holds both and the data picks one, with no host read; a leaf both branches share passes as it
    is. Both forms give the same numbers.
    """
    if tracing():
        return map(lambda a, b: a if a is b else torch.where(condition.to(a.device), a, b), if_true(), if_false())
    return if_true() if bool(condition) else if_false()


def when(condition: Tensor | bool, fn: Callable[[], Tree], tree: Tree) -> Tree:
    """``fn()`` if the 0-d bool ``condition`` holds, else ``tree`` (a tree of tensors, of ``fn()``'s
    structure, shapes and dtypes): :func:`choose` for occasional costly work (an eigendecomposition,
    a preconditioner refit), where computing both sides on every step would cost more than the step.

    Compiled, it is ``torch.cond``: the graph holds both sides and runs only the one taken, with no
    host read and no graph break (each side returns fresh row-major copies, as ``torch.cond`` asks).
    That is when shapes are static (``torch.compile(..., dynamic=False)``, as a compiled step is
    unless given ``compile={"dynamic": True}``): in torch 2.14 dynamo's ``torch.cond`` fails on a
    branch that computes with a symbolic size, and traced code cannot tell a symbolic size from an
    int without specialising it. With dynamic shapes, under ``vmap`` with a per-model ``condition``
    (which ``torch.cond`` cannot batch) and in other traced code it is :func:`choose`, both sides
    merged by ``torch.where``; eagerly, only the side taken runs. The numbers are the same in every
    form.
    """
    if not (torch.compiler.is_compiling() and isinstance(condition, Tensor) and not _batched(condition)):
        return choose(condition, fn, lambda: tree)
    kept, spec = pytree.tree_flatten(tree)
    tensors = [i for i, leaf in enumerate(kept) if isinstance(leaf, Tensor)]  # traced, None may be a leaf
    if not tensors:
        return tree
    if not _static_shapes():
        return choose(condition, fn, lambda: tree)

    def taken() -> list[Tensor]:
        leaves, taken_spec = pytree.tree_flatten(fn())
        if taken_spec != spec or [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)] != tensors:
            raise TreeMismatchError(f"when: fn() gives {taken_spec}, the kept tree is {spec}")
        return [_fresh(leaves[i]) for i in tensors]

    def unchanged() -> list[Tensor]:
        return [_fresh(kept[i]) for i in tensors]

    out = list(kept)
    for i, leaf in zip(tensors, torch.cond(condition, taken, unchanged)):
        out[i] = leaf
    return pytree.tree_unflatten(out, spec)


def _static_shapes() -> bool:
    """Whether the code being compiled has static shapes: ``torch.compile(..., dynamic=False)``, as a
    compiled step is unless given ``compile={"dynamic": True}``. With ``dynamic=None`` (torch's
    default) a recompile on new shapes may make them symbolic, which dynamo's ``torch.cond`` fails on."""
    config = torch._dynamo.config
    return bool(config.assume_static_by_default and not config.automatic_dynamic_shapes)


def _fresh(t: Tensor) -> Tensor:
    """A copy of ``t`` with row-major strides, those of size-1 dimensions too: ``torch.cond`` wants
    the two sides' outputs laid out alike and not aliasing its inputs (``contiguous()`` may return a
    view whose size-1 strides differ)."""
    return t.clone(memory_format=torch.contiguous_format)


# functorch's private test for a vmap batch dimension (dynamo traces it); without it, every tensor counts
# as batched and when() takes choose()'s form: always right, only slower compiled.
_IS_BATCHED = getattr(getattr(torch._C, "_functorch", None), "is_batchedtensor", None)


def _batched(t: Tensor) -> bool:
    """Whether ``t`` carries a ``vmap`` batch dimension."""
    return _IS_BATCHED is None or _IS_BATCHED(t)


def where_or_zero(condition: Tensor, tree: Tree) -> Tree:
    """``tree`` where the 0-d bool ``condition`` holds, else zeros: a skipped step's updates."""
    return map(lambda x: torch.where(condition.to(x.device), x, torch.zeros((), dtype=x.dtype, device=x.device)), tree)
