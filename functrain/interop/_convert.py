"""State conversion between torch.optim optimisers and functrain ``opt_state`` trees."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import _tree, optimisers
from ..base import EmptyState, GradientTransformation, OptState, Params
from ..combine import MaskedState, PartitionState, partition
from ..wrappers import InjectHyperparamsState, ScheduleState, is_hyperparameter, signature_of
from ._tables import _DERIVED, _Field, _Mirror, _mirror_of, _scalar_dtype, _torch_name

# ----------------------------------------------------------------------------- parameters and groups


class _Layout(NamedTuple):
    """The torch optimiser's parameters in order, with the functrain names they are known by."""

    tensors: list[Tensor]
    names: list[str]
    groups: list[dict]  # the param group of each parameter
    index: dict[str, int]


def _layout(optimizer: torch.optim.Optimizer, params: Params) -> _Layout:
    tensors = [p for group in optimizer.param_groups for p in group["params"]]
    groups = [group for group in optimizer.param_groups for _ in group["params"]]
    named = _tree.named_leaves(params)
    if len(named) != len(tensors):
        raise ValueError(f"params has {len(named)} tensors, the torch optimizer {len(tensors)}")
    for (name, leaf), p in zip(named, tensors):
        if leaf.shape != p.shape:
            raise ValueError(
                f"parameter '{name}' has shape {tuple(leaf.shape)} but the torch optimizer's parameter in that "
                f"position has {tuple(p.shape)}: params must list the optimizer's parameters in its order"
            )
    names = [name for name, _ in named]
    return _Layout(tensors, names, groups, {name: i for i, name in enumerate(names)})


def _names_of(optimizer: torch.optim.Optimizer, named_params: Mapping[str, Tensor] | None) -> list[str]:
    tensors = [p for group in optimizer.param_groups for p in group["params"]]
    if named_params is None:
        return [f"p{i}" for i in range(len(tensors))]
    by_id = {id(t): name for name, t in named_params.items()}
    missing = [i for i, p in enumerate(tensors) if id(p) not in by_id]
    if missing:
        raise ValueError(
            f"named_params does not name the torch optimizer's parameter {missing[0]} (shape "
            f"{tuple(tensors[missing[0]].shape)}); pass e.g. dict(model.named_parameters())"
        )
    return [by_id[id(p)] for p in tensors]


def _plain(param: inspect.Parameter, value: Any) -> Any:
    """A param group's value as a functrain factory argument: 0-d tensors become floats, and so do
    ints given for a float hyperparameter (torch's defaults write e.g. ``weight_decay=0``); an
    integer argument (``ns_steps``) stays an int. ``is_hyperparameter`` is inject_hyperparams' policy."""
    if isinstance(value, tuple):
        return tuple(_plain(param, v) for v in value)
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value.item())
    if isinstance(value, int) and not isinstance(value, bool) and is_hyperparameter(param, value):
        return float(value)
    return value


def _factory_kwargs(factory: Callable, group: dict) -> dict[str, Any]:
    parameters = signature_of(factory).parameters
    return {name: _plain(param, group[name]) for name, param in parameters.items() if name in group}


# ----------------------------------------------------------------------------- walking a state tree


def _is_namedtuple(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(type(node), "_fields")


def _per_param_names(state: Any) -> list[str]:
    """The parameter names a (partition's inner) state holds per-parameter tensors for."""
    names: dict[str, None] = {}

    def visit(node):
        if isinstance(node, PartitionState):
            for inner in node.inner_states.values():
                visit(inner)
        elif isinstance(node, (InjectHyperparamsState, ScheduleState, MaskedState)):
            visit(node.inner_state)
        elif _is_namedtuple(node):
            for field, value in zip(node._fields, node):
                if field != "count" and not isinstance(value, Tensor):
                    names.update(dict.fromkeys(name for name, _ in _tree.named_leaves(value)))
        elif isinstance(node, (tuple, list)):
            for child in node:
                visit(child)
        elif isinstance(node, dict):
            for child in node.values():
                visit(child)

    visit(state)
    return list(names)


class _Count(NamedTuple):
    """Stands for the count of a wrapper state (``InjectHyperparamsState``, ``ScheduleState``) while walking."""

    count: Tensor


def _walk(node: Any, path: str, scope: list[str], on_state: Callable[[Any, str, list[str]], Any]) -> Any:
    """Rebuilds a state tree, calling ``on_state(state, path, scope)`` for each transform state.

    ``scope`` is the names of the parameters the state's transform sees: all of them, or one
    partition group's (found from the per-parameter tensors in that group's state).
    """
    if isinstance(node, PartitionState):
        inner = {
            label: _walk(state, f"{path}.inner_states[{label!r}]", _per_param_names(state), on_state)
            for label, state in node.inner_states.items()
        }
        return PartitionState(inner)
    if isinstance(node, MaskedState):  # its transform sees the selected parameters only
        inner = node.inner_state
        return MaskedState(_walk(inner, f"{path}.inner_state", _per_param_names(inner), on_state))
    if isinstance(node, InjectHyperparamsState):  # its count is converted; its hyperparams stay tx's
        count = on_state(_Count(node.count), path, scope).count
        inner = _walk(node.inner_state, f"{path}.inner_state", scope, on_state)
        return InjectHyperparamsState(count, node.hyperparams, inner)
    if isinstance(node, ScheduleState):  # every optimiser's: its count (the schedules' position) is converted
        count = on_state(_Count(node.count), path, scope).count
        return type(node)(count, _walk(node.inner_state, f"{path}.inner_state", scope, on_state))
    if _is_namedtuple(node):
        return on_state(node, path, scope)
    if isinstance(node, (tuple, list)):
        return type(node)(_walk(child, f"{path}[{i}]", scope, on_state) for i, child in enumerate(node))
    if isinstance(node, dict):
        return {key: _walk(child, f"{path}[{key!r}]", scope, on_state) for key, child in node.items()}
    raise TypeError(f"opt_state{path}: expected a transform's state (a NamedTuple), got {type(node).__name__}")


def _fields_of(mirror: _Mirror, state: Any, path: str, torch_name: str) -> dict[str, _Field]:
    """The table entries for one functrain state: field name -> entry. Raises for a state with a
    field that neither the table nor the shared step count accounts for."""
    entries = {f.field: f for f in mirror.fields if isinstance(state, f.states)}
    for field in state._fields:
        if field != "count" and field not in entries:
            raise ValueError(
                f"opt_state{path} is a {type(state).__name__}, whose '{field}' has no counterpart in "
                f"{torch_name}'s state (is the functrain optimiser '{mirror.factory}' with the same options?)"
            )
    return entries


def _counts(opt_state: OptState) -> set[int]:
    found: set[int] = set()

    def visit(state, path, scope):
        if "count" in getattr(state, "_fields", ()):
            found.add(int(state.count.item()))
        return state

    _walk(opt_state, "", [], visit)
    return found


# ----------------------------------------------------------------------------- torch -> functrain


def opt_state_from_torch(
    tx: GradientTransformation, params: Params, optimizer: torch.optim.Optimizer, *, step: int | None = None
) -> OptState:
    """Converts a torch.optim optimiser's state into ``tx``'s ``opt_state`` for ``params``.

    The result has the structure, dtypes and devices of ``tx.init(params)``, with every
    per-parameter tensor and step count taken from ``optimizer.state`` through the table of its
    class (see the module docstring). ``params`` lists the optimiser's parameters in its order
    (across param groups); the names are its keys. ``tx`` supplies the hyperparameters (any
    ``inject_hyperparams`` values are kept): build it with the torch optimiser's options, or use
    :func:`from_torch_optimizer`, which does.

    Args:
        tx: a functrain transformation with the torch optimiser's state layout: the mirrored
            optimiser, possibly wrapped in ``inject_hyperparams`` or composed with ``partition``.
        params: the parameters, in the optimiser's order.
        optimizer: one of torch.optim's SGD, Adam, AdamW, NAdam, RAdam, Adamax, Adagrad, Adadelta,
            RMSprop, Rprop, ASGD, Adafactor or Muon.
        step: the number of steps taken, for SGD and Muon, which keep no count (default: 1 if the
            optimiser holds any state, else 0; only ``count == 0`` changes an SGD update). For the
            others it must equal the torch step, if given.

    Raises:
        ValueError: torch's per-parameter steps differ, a state key has no place in ``tx``'s state
            or the reverse, or ``params`` does not match the optimiser's parameters.

    Example:
        >>> import torch, functrain as ft
        >>> w = torch.tensor([1.0, -2.0], requires_grad=True)
        >>> opt = torch.optim.Adam([w], lr=0.1)
        >>> w.grad = torch.tensor([0.5, -3.0]); opt.step()
        >>> state = ft.opt_state_from_torch(ft.adam(lr=0.1), {"w": w.detach()}, opt)
        >>> state.count, state.inner_state[0].mu["w"]
        (tensor(1), tensor([ 0.0500, -0.3000]))
    """
    mirror = _mirror_of(optimizer)
    layout = _layout(optimizer, params)
    source = _TorchState(
        _torch_name(optimizer),
        layout,
        [optimizer.state.get(p, {}) for p in layout.tensors],
        [mirror.keys(group, p) for group, p in zip(layout.groups, layout.tensors)],
        set(),
    )
    count = _torch_count(source, step)

    def fill(state, path, scope):
        if isinstance(state, EmptyState):
            return state
        entries = _fields_of(mirror, state, path, source.torch_name)
        values = []
        for field, value in zip(state._fields, state):
            if field == "count":
                values.append(torch.full_like(value, count))
            elif entries[field].scalar:
                values.append(_scalar_from_torch(source, entries[field].key, value, scope))
            else:
                values.append(_tree_from_torch(source, entries[field].key, value, f"{path}.{field}", count))
        return type(state)(*values)

    with torch.no_grad():
        opt_state = _walk(tx.init(params), "", layout.names, fill)
    for i, state in enumerate(source.states):
        unused = sorted(set(state) - _DERIVED - {key for j, key in source.consumed if j == i})
        if unused:
            raise ValueError(
                f"{source.torch_name}'s state '{unused[0]}' of parameter '{layout.names[i]}' has no place in tx's "
                "state; build tx with the torch optimizer's options (e.g. amsgrad, momentum, centered)"
            )
    return opt_state


class _TorchState(NamedTuple):
    torch_name: str
    layout: _Layout
    states: list[dict[str, Tensor]]  # torch's state of each parameter ({} before its first step)
    expected: list[set[str]]  # the keys torch keeps for each parameter once it has stepped
    consumed: set[tuple[int, str]]  # (parameter, key) pairs read into the functrain state


def _torch_count(source: _TorchState, step: int | None) -> int:
    """The one step count of all the parameters' torch states (checked), or the count to use."""
    steps: dict[int, list[str]] = {}
    for name, state, expected in zip(source.layout.names, source.states, source.expected):
        if not state:
            continue
        if set(state) != expected:
            difference = sorted(expected - set(state)) or sorted(set(state) - expected)
            raise ValueError(
                f"{source.torch_name}'s state of parameter '{name}' has keys {sorted(state)}, expected "
                f"{sorted(expected)} (first difference: '{difference[0]}')"
            )
        if "step" in state:
            steps.setdefault(int(state["step"].item()), []).append(name)
    if len(steps) > 1:
        (a, names_a), (b, names_b) = sorted(steps.items())[:2]
        raise ValueError(
            f"{source.torch_name}'s per-parameter steps differ: '{names_a[0]}' has taken {a}, '{names_b[0]}' {b} "
            "(some parameters missed gradients); functrain keeps one step count for all parameters of a transform"
        )
    if steps:
        (found,) = steps
        if step is not None and step != found:
            raise ValueError(f"step={step} but {source.torch_name}'s state has taken {found} steps")
        return found
    if step is not None:
        return step
    return 1 if any(source.states) else 0


def _tree_from_torch(source: _TorchState, key: str, template: Any, path: str, count: int) -> Any:
    leaves, spec = _tree.flatten(template)
    out = []
    for name, leaf in zip((n for n, _ in _tree.named_leaves(template)), leaves):
        i = source.layout.index.get(name)
        if i is None:
            raise ValueError(f"opt_state{path} holds state for '{name}', which is not among params")
        state = source.states[i]
        if key not in state:
            if not state and count > 0 and key in source.expected[i]:
                raise ValueError(
                    f"parameter '{name}' has no {source.torch_name} state (it has never received a gradient), "
                    f"but tx keeps state for it at step {count}: functrain keeps one step count for all "
                    "parameters of a transform; give it no state (ft.partition with ft.set_to_zero(), or "
                    "ft.masked) or convert before the first step"
                )
            out.append(leaf)  # before torch's first step (init values), or a slot this tensor does not use
            continue
        value = state[key]
        if value.shape != leaf.shape:
            raise ValueError(
                f"torch state '{key}' of parameter '{name}' has shape {tuple(value.shape)}, "
                f"opt_state{path} expects {tuple(leaf.shape)}"
            )
        out.append(value.detach().to(device=leaf.device, dtype=leaf.dtype, copy=True))
        source.consumed.add((i, key))
    return _tree.unflatten(out, spec)


def _scalar_from_torch(source: _TorchState, key: str, template: Tensor, scope: list[str]) -> Tensor:
    holders = [source.layout.index[name] for name in scope if key in source.states[source.layout.index[name]]]
    source.consumed.update((i, key) for i in holders)
    if not holders:
        return template
    value = source.states[holders[0]][key].detach()
    return value.to(device=template.device, dtype=template.dtype).reshape(())


def from_torch_optimizer(
    optimizer: torch.optim.Optimizer, named_params: Mapping[str, Tensor] | None = None, *, step: int | None = None
) -> tuple[GradientTransformation, OptState, dict[str, Tensor]]:
    """The functrain optimiser, state and params that continue a torch.optim optimiser's run.

    Builds the same-name functrain optimiser from each param group's hyperparameters (several
    groups: a :func:`~functrain.partition` over the labels ``"group0"``, ``"group1"``, ...),
    converts the state with :func:`opt_state_from_torch`, and returns the params as a
    ``{name: tensor}`` dict in the optimiser's order (detached; they share storage with the
    optimiser's parameters, and functrain's pure updates never write to them).

    Args:
        optimizer: one of torch.optim's SGD, Adam, AdamW, NAdam, RAdam, Adamax, Adagrad, Adadelta,
            RMSprop, Rprop, ASGD, Adafactor or Muon.
        named_params: ``{name: tensor}`` naming the optimiser's parameters, e.g.
            ``dict(model.named_parameters())`` (extra entries are ignored); default ``p0, p1, ...``.
        step: see :func:`opt_state_from_torch`.

    Returns:
        ``(tx, opt_state, params)``.

    Example:
        >>> import torch, functrain as ft
        >>> w = torch.tensor([1.0, -2.0], requires_grad=True)
        >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
        >>> w.grad = torch.tensor([1.0, 1.0]); opt.step()
        >>> tx, state, params = ft.from_torch_optimizer(opt, {"w": w})
        >>> updates, state = tx.update({"w": torch.tensor([1.0, 1.0])}, state, params)
        >>> ft.apply_updates(params, updates)["w"]  # the second step of torch.optim.SGD
        tensor([ 0.7100, -2.2900])
    """
    mirror = _mirror_of(optimizer)
    names = _names_of(optimizer, named_params)
    tensors = [p for group in optimizer.param_groups for p in group["params"]]
    params = {name: p.detach() for name, p in zip(names, tensors)}
    factory = getattr(optimisers, mirror.factory)
    txs = [factory(**_factory_kwargs(factory, group)) for group in optimizer.param_groups]
    if len(txs) == 1:
        tx = txs[0]
    else:
        group_of = [f"group{g}" for g, group in enumerate(optimizer.param_groups) for _ in group["params"]]
        labels = dict(zip(names, group_of))
        tx = partition({f"group{g}": group_tx for g, group_tx in enumerate(txs)}, labels)
    return tx, opt_state_from_torch(tx, params, optimizer, step=step), params


# ----------------------------------------------------------------------------- functrain -> torch


def load_into_torch(
    optimizer: torch.optim.Optimizer, opt_state: OptState, params: Params, *, step: int | None = None
) -> None:
    """Writes a functrain ``opt_state`` into a torch.optim optimiser, through its ``load_state_dict``.

    The reverse of :func:`opt_state_from_torch`: each per-parameter tensor goes to the torch key of
    its table entry, every parameter gets the state's step count as torch's ``step`` (a float
    tensor in torch's scalar dtype, on the CPU; ``load_state_dict`` moves it where torch wants
    it), and derived values (ASGD's ``mu``) are recomputed. The param groups (hyperparameters)
    stay the optimiser's own: build it with the options of the functrain optimiser.

    Args:
        optimizer: the torch optimiser to load into, over tensors in the order of ``params``.
        opt_state: the functrain state, e.g. of ``ft.adamw(...)``, possibly inside
            ``inject_hyperparams`` or ``partition``.
        params: the params the state belongs to (their names are the state's keys).
        step: the number of steps taken, needed only where the functrain state keeps no count but
            torch does (a bare chain of transforms; every ``ft`` optimiser's ``ScheduleState``
            counts its updates); when the state has a count, it must agree.

    Raises:
        ValueError: the state lacks a key that the optimiser's options need (e.g.
            ``max_exp_avg_sq`` for ``amsgrad=True``) or holds one it does not, the state's counts
            differ, or no step count is known.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> tx = ft.adam(lr=0.1)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, -3.0])}, tx.init(params), params)
        >>> params = ft.apply_updates(params, updates)
        >>> w = params["w"].clone().requires_grad_()
        >>> opt = torch.optim.Adam([w], lr=0.1)
        >>> ft.load_into_torch(opt, state, params)
        >>> opt.state[w]["step"], opt.state[w]["exp_avg"]
        (tensor(1.), tensor([ 0.0500, -0.3000]))
    """
    mirror = _mirror_of(optimizer)
    torch_name = _torch_name(optimizer)
    layout = _layout(optimizer, params)
    expected = [mirror.keys(group, p) for group, p in zip(layout.groups, layout.tensors)]
    out: list[dict[str, Tensor]] = [{} for _ in layout.tensors]

    def put(i: int, key: str, value: Tensor, path: str) -> None:
        if key in out[i]:
            raise ValueError(f"opt_state{path}: a second state for torch's '{key}' of parameter '{layout.names[i]}'")
        out[i][key] = value.detach().clone()

    def read(state, path, scope):
        if isinstance(state, EmptyState):
            return state
        entries = _fields_of(mirror, state, path, torch_name)
        for field, value in zip(state._fields, state):
            if field == "count":
                continue
            entry = entries[field]
            if entry.scalar:
                for name in scope:
                    put(layout.index[name], entry.key, value.reshape(()).to(_scalar_dtype()), f"{path}.{field}")
                continue
            for name, leaf in _tree.named_leaves(value):
                i = layout.index.get(name)
                if i is None:
                    raise ValueError(f"opt_state{path}.{field} holds state for '{name}', which is not among params")
                if entry.key in expected[i] or leaf.shape != (0,):  # (0,): a slot this tensor does not use
                    put(i, entry.key, leaf, f"{path}.{field}")
        return state

    _walk(opt_state, "", layout.names, read)
    count = _state_count(opt_state, expected, step)
    provided = [bool(state) for state in out]
    for i, (group, keys) in enumerate(zip(layout.groups, expected)):
        if not provided[i] and (count == 0 or any(provided)):
            continue  # tx keeps no state for it (e.g. ft.set_to_zero() in a partition): torch holds none either
        if "step" in keys:
            out[i]["step"] = torch.tensor(float(count), dtype=_scalar_dtype())
        if "mu" in keys:  # ASGD's averaging rate, 1 / max(1, step - t0) after `step` steps
            out[i]["mu"] = torch.tensor(1.0 / max(1.0, count - group["t0"]), dtype=_scalar_dtype())
        if set(out[i]) != keys:
            missing, extra = sorted(keys - set(out[i])), sorted(set(out[i]) - keys)
            what = (
                f"needs '{missing[0]}', which opt_state does not hold"
                if missing
                else f"keeps no '{extra[0]}', which opt_state holds"
            )
            raise ValueError(
                f"{torch_name} with these options {what} for parameter '{layout.names[i]}'; build the "
                "functrain optimiser with the torch optimizer's options (e.g. amsgrad, momentum, centered)"
            )
        if count == 0 and not mirror.eager:
            out[i] = {}  # torch.optim builds these states at the first step (SGD's first step differs)
    state_dict = optimizer.state_dict()
    optimizer.load_state_dict(
        {"state": {i: state for i, state in enumerate(out) if state}, "param_groups": state_dict["param_groups"]}
    )


def _state_count(opt_state: OptState, expected: list[set[str]], step: int | None) -> int:
    counts = _counts(opt_state)
    if len(counts) > 1:
        raise ValueError(f"opt_state's step counts differ ({sorted(counts)}); torch keeps one step per parameter")
    if counts:
        (count,) = counts
        if step is not None and step != count:
            raise ValueError(f"step={step} but opt_state's count is {count}")
        return count
    if step is not None:
        return step
    if any("step" in keys for keys in expected):
        raise ValueError(
            "opt_state keeps no step count, but the torch optimizer's state has 'step': pass "
            "step=<number of updates done>"
        )
    return 0
