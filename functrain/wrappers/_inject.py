"""inject_hyperparams, schedulable and set_hyperparams: hyperparameters as tensors in the optimiser state."""

from __future__ import annotations

import functools
import inspect
import sys
import typing
from collections.abc import Callable, Hashable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import _tree
from .._hoist import hoist
from ..base import (
    GradientTransformation,
    OptState,
    check_state_type,
    register_state,
    state_check,
    step_count,
    update_and_apply,
)
from ._common import find_one_state


@register_state
class InjectHyperparamsState(NamedTuple):
    count: Tensor  # updates done so far: the position of every schedule
    hyperparams: dict[str, Any]  # name -> 0-d float64 tensor (a tuple of them for e.g. betas)
    inner_state: OptState


# ----------------------------------------------------------------------------- which arguments are hyperparameters

# Callables that are not schedules: a mask or labelling function of (name, tensor).
_NEVER_INJECTED = frozenset({"mask", "labels"})
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_scalar(value: Any) -> bool:
    """A number, a tensor or a schedule (a callable that is not a transformation)."""
    return _is_number(value) or isinstance(value, Tensor) or _is_schedule(value)


def _is_schedule(value: Any) -> bool:
    return callable(value) and not isinstance(value, GradientTransformation)


def _numeric_value(value: Any) -> bool:
    """A scalar, or a plain tuple of scalars (``None`` items allowed: adafactor's ``eps=(None, 1e-3)``).
    A NamedTuple such as a GradientTransformation is not a tuple of hyperparameters."""
    if type(value) is tuple:
        return any(v is not None for v in value) and all(v is None or _is_scalar(v) for v in value)
    return _is_scalar(value)


def signature_of(factory: Callable[..., Any]) -> inspect.Signature:
    """``factory``'s signature with each parameter's annotation evaluated to types, in the factory's
    own module (``from __future__ import annotations`` leaves them as strings). An annotation that
    cannot be evaluated (a name imported only for type checkers) stays a string, which
    :func:`is_hyperparameter` treats as saying nothing, and so do all of them when a factory is
    wrapped inside a traced function, where evaluating code cannot be traced."""
    signature = inspect.signature(factory)
    if _tree.tracing():
        return signature
    namespace = getattr(inspect.unwrap(factory), "__globals__", {})
    parameters = [p.replace(annotation=_evaluated(p.annotation, namespace)) for p in signature.parameters.values()]
    return signature.replace(parameters=parameters)


def _evaluated(annotation: Any, namespace: dict[str, Any]) -> Any:
    """A string annotation as the types it names (what ``inspect.signature(eval_str=True)`` does, one
    parameter at a time, so that one unresolvable name leaves only its own annotation a string)."""
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, dict(namespace))  # noqa: S307 - the factory's own annotation text
    except Exception:  # noqa: BLE001 - any failure means "unknown", as documented
        return annotation


def _types_in(annotation: Any) -> set[Any]:
    """Every type an annotation names, through unions, tuples and callables:
    ``tuple[Hyperparameter, float | None]`` names float, Tensor, a schedule's types and NoneType."""
    if isinstance(annotation, list):  # a callable's parameter list
        return {t for argument in annotation for t in _types_in(argument)}
    arguments = typing.get_args(annotation)
    if not arguments:
        return {annotation}
    return {t for argument in arguments for t in _types_in(argument)}


def _declared_numeric(param: inspect.Parameter) -> bool | None:
    """What the signature says: True for a numeric hyperparameter, False for an option or a count,
    None when it says nothing (no annotation, no default)."""
    annotation = param.annotation
    if annotation is not inspect.Parameter.empty and not isinstance(annotation, str):
        # ``Hyperparameter``, ``float | Tensor``, ``tuple[Hyperparameter, ...]``; not ``int`` (ns_steps,
        # every), and not a float that may also be a string (``norm_type: float | str``): that is an option.
        named = _types_in(annotation)
        return bool(named & {float, Tensor}) and str not in named
    default = param.default
    if default is inspect.Parameter.empty or default is None:
        return None
    if type(default) is tuple:
        return any(isinstance(v, float) for v in default) and all(v is None or _is_number(v) for v in default)
    return isinstance(default, float)


def is_hyperparameter(param: inspect.Parameter, value: Any) -> bool:
    """Whether ``value``, passed for a factory's parameter ``param``, is a numeric hyperparameter.

    The one policy shared by :func:`inject_hyperparams` (what it keeps as tensors), :func:`schedulable`
    (where a callable is a schedule) and ``ft.interop`` (which ints of a torch param group become
    floats). The factory's signature decides: a parameter annotated ``Hyperparameter``, ``Tensor`` or
    ``float`` (but not ``float | str``), or unannotated with a float default (or a tuple of floats),
    is one, and an int passed for it counts as a float; a parameter declared ``int`` (``ns_steps``,
    ``every``, ``sync_period``) or ``bool`` is not. When the signature says nothing, a float, a tensor
    or a schedule is one and an int is not. ``*args``/``**kwargs``, ``mask`` and ``labels`` (functions
    of ``(name, tensor)``), transformations, bools, strings and None never are.
    """
    if param.kind in _VARIADIC or param.name in _NEVER_INJECTED or not _numeric_value(value):
        return False
    declared = _declared_numeric(param)
    if declared is not None:
        return declared
    items = value if type(value) is tuple else (value,)
    return not any(isinstance(v, int) for v in items)


def _is_zero(value: Any) -> bool:
    return _is_number(value) and value == 0


# ----------------------------------------------------------------------------- inject_hyperparams


def inject_hyperparams(
    factory: Callable[..., GradientTransformation], static_args: Iterable[str] = ()
) -> Callable[..., GradientTransformation]:
    """Wraps an optimiser factory so its numeric hyperparameters live in the optimiser state.

    ``inject_hyperparams(ft.adamw)(lr=1e-3, weight_decay=ft.schedules.linear_lr(...))`` builds an
    AdamW whose state is ``InjectHyperparamsState(count, hyperparams, inner_state)``; every numeric
    hyperparameter of the factory (:func:`is_hyperparameter`: for AdamW ``lr``, ``betas``, ``eps``
    and ``weight_decay``), given or left at its default, is a 0-d float64 tensor in
    ``state.hyperparams[name]`` (tuples such as ``betas`` hold a tuple of them); an int given for a
    float hyperparameter (``weight_decay=0``) is converted. A default of exactly zero is the one
    exception: it switches a feature off (no momentum buffer, no decay pass, as in torch.optim), so
    it stays a Python ``0.0``; pass it explicitly (``momentum=0.0``) to make it changeable.

    Change values between steps with :func:`set_hyperparams` (``state = ft.set_hyperparams(state,
    lr=1e-4)``) and the next update uses them; a compiled step does not recompile, because only
    tensor values changed (a replacement of another dtype or device would recompile: that is why
    :func:`set_hyperparams` keeps both). A schedule is evaluated at the update count before each
    update and its value stored. Initial values, and schedules at count 0, are checked by the
    factory's own validation when the wrapper is built.

    Arguments named in ``static_args``, and those that are not numeric hyperparameters (ints such as
    ``ns_steps``, bools, strings, transformations, ``mask`` / ``labels`` functions, ``*args``), are
    passed through unchanged.

    In eager mode the inner transformation is built once and reused for as long as the state holds
    the same hyperparameter tensors (no schedule, nothing replaced), so the factory's Python work
    is not repeated every step. Replace hyperparameter tensors rather than writing into them.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.inject_hyperparams(ft.adamw)(lr=1e-3)
        >>> state = tx.init({"w": torch.ones(2)})
        >>> sorted(state.hyperparams)
        ['betas', 'eps', 'lr', 'weight_decay']
        >>> float(ft.set_hyperparams(state, lr=1e-4).hyperparams["lr"])
        0.0001
    """
    if not callable(factory) or isinstance(factory, GradientTransformation):
        raise TypeError(
            "inject_hyperparams: factory must be a function that returns a GradientTransformation (e.g. ft.adam, "
            f"not ft.adam(...)), got {type(factory).__name__}"
        )
    name = getattr(factory, "__name__", type(factory).__name__)
    signature = signature_of(factory)
    # How each argument is passed, as plain tuples: the factory is called again inside a traced
    # update, where torch.compile cannot look through inspect's objects.
    layout = tuple((p.name, p.kind) for p in signature.parameters.values())
    static_args = frozenset(static_args)

    @functools.wraps(factory)
    def build(*args, **kwargs) -> GradientTransformation:
        bound = _bind(signature, name, args, kwargs)
        given = set(bound.arguments)
        bound.apply_defaults()
        injected = {
            arg: value
            for arg, value in bound.arguments.items()
            if arg not in static_args
            and is_hyperparameter(signature.parameters[arg], value)
            and (arg in given or not _is_zero(value))
        }
        static = {arg: value for arg, value in bound.arguments.items() if arg not in injected}

        def call(hyperparams: dict[str, Any]) -> GradientTransformation:
            args, kwargs = _arguments(layout, {**static, **hyperparams})
            return factory(*args, **kwargs)

        # The factory's own checks, once, on the initial values (a schedule at count 0), as the
        # tensors an update passes: the result says whether the inner transform has a fast path.
        zero = torch.zeros((), dtype=torch.int64)
        probe = call(_as_tensors(_values_at(injected, zero, _initial(injected)), zero.device))

        cache: list[tuple[dict[str, Any], GradientTransformation]] = []  # the last (hyperparams, transform)

        def inner(hyperparams: dict[str, Any]) -> GradientTransformation:
            # Under torch.compile (or vmap/grad) this runs once, at trace time: nothing to save; on
            # meta tensors it is an input check's init (base.state_check), which must not evict the real one.
            if _tree.tracing() or any(v.is_meta for v in _tree.leaves(hyperparams) if isinstance(v, Tensor)):
                return call(hyperparams)
            if cache and _same_objects(cache[0][0], hyperparams):
                return cache[0][1]
            tx = call(hyperparams)
            cache[:] = [(hyperparams, tx)]  # holds the tensors, so an id is never reused while cached
            return tx

        def init(params):
            count = step_count(params)
            values = _values_at(injected, count, _initial(injected))
            hyperparams = _as_tensors(values, count.device, copy=True)
            return InjectHyperparamsState(count, hyperparams, inner(hyperparams).init(params))

        def current(state):
            return _as_tensors(_values_at(injected, state.count, state.hyperparams), state.count.device)

        def check(state):
            # The class only: the inner transformation checks its own state (every ft optimiser does).
            check_state_type(f"ft.inject_hyperparams({name})", state, InjectHyperparamsState)

        def update(updates, state, params=None, **extra):
            check(state)
            hyperparams = current(state)
            updates, inner_state = inner(hyperparams).update(updates, state.inner_state, params, **extra)
            return updates, InjectHyperparamsState(state.count + 1, hyperparams, inner_state)

        def update_and_apply_inner(updates, state, params, *, donate=False, **extra):
            check(state)
            hyperparams = current(state)
            params, inner_state = update_and_apply(
                inner(hyperparams), updates, state.inner_state, params, donate=donate, **extra
            )
            return params, InjectHyperparamsState(state.count + 1, hyperparams, inner_state)

        offered = probe.update_and_apply is not None
        return GradientTransformation(init, update, update_and_apply_inner if offered else None)

    return build


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _arguments(layout: tuple, values: dict[str, Any]) -> tuple[list, dict]:
    """``(args, kwargs)`` that call a function of this ``layout`` with ``values`` (every parameter
    present, as after ``apply_defaults``): what ``inspect.BoundArguments`` computes, in plain Python."""
    args: list = []
    kwargs: dict = {}
    for arg, kind in layout:
        if arg not in values:
            continue
        if kind in _POSITIONAL:
            args.append(values[arg])
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            args.extend(values[arg])
        elif kind == inspect.Parameter.VAR_KEYWORD:
            kwargs.update(values[arg])
        else:
            kwargs[arg] = values[arg]
    return args, kwargs


def _bind(signature: inspect.Signature, name: str, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    """``signature.bind``, with an error that names the factory and what it takes."""
    takes = ", ".join(p.name for p in signature.parameters.values())
    accepts_any = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    unknown = [k for k in kwargs if k not in signature.parameters]
    if unknown and not accepts_any:
        raise TypeError(f"inject_hyperparams({name}): unexpected argument {unknown[0]!r}; {name} takes {takes}")
    try:
        return signature.bind(*args, **kwargs)
    except TypeError as error:
        raise TypeError(f"inject_hyperparams({name}): {error}; {name} takes {takes}") from None


def _values_at(injected: dict[str, Any], count: Tensor, stored: dict[str, Any]) -> dict[str, Any]:
    """Each injected value at ``count``: a schedule is evaluated, any other value read from ``stored``."""

    def value(spec, old):
        if type(spec) is tuple:
            return tuple(value(s, o) for s, o in zip(spec, old))
        return hoist(spec(count)) if _is_schedule(spec) else old

    return {name: value(spec, stored[name]) for name, spec in injected.items()}


def _initial(injected: dict[str, Any]) -> dict[str, Any]:
    """The stored values before the first update: the given ones (schedules are evaluated instead)."""

    def initial(spec):
        if type(spec) is tuple:
            return tuple(initial(s) for s in spec)
        return None if _is_schedule(spec) else spec

    return {name: initial(spec) for name, spec in injected.items()}


def _as_tensors(values: dict[str, Any], device: torch.device, copy: bool = False) -> dict[str, Any]:
    """Each value as a 0-d float64 tensor on ``device``; a tensor already so is returned as is (unless
    ``copy``), so a state that holds its values passes the same objects on (see the cache above)."""

    def convert(v):
        if isinstance(v, tuple):
            return tuple(convert(x) for x in v)
        if v is None:
            return v
        if isinstance(v, Tensor):
            if v.dtype == torch.float64 and v.device == device and v.dim() == 0 and not copy:
                return v
            return v.detach().to(device=device, dtype=torch.float64, copy=True).reshape(())
        return torch.tensor(float(v), dtype=torch.float64, device=device)

    return {k: convert(v) for k, v in values.items()}


def _same_objects(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def same(x, y):
        if isinstance(x, tuple) and isinstance(y, tuple):
            return len(x) == len(y) and all(same(p, q) for p, q in zip(x, y))
        return x is y

    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- set_hyperparams


def set_hyperparams(opt_state: OptState, **values: Any) -> OptState:
    """A copy of ``opt_state`` with the named injected hyperparameters replaced.

    ``opt_state`` is the state of an :func:`inject_hyperparams` optimiser, or any state that holds
    exactly one (a chain, ``accumulate``, a ``TrainState``, ...); when it holds several, pass the
    one to change. Each value (a number, a 0-d tensor, or a tuple of them for e.g. ``betas``)
    becomes a 0-d float64 tensor on the old value's device, so a compiled step reads it without
    recompiling. A hyperparameter driven by a schedule is recomputed from it at the next update:
    change the schedule instead. Nothing is mutated; the tensors not named are shared.

    Args:
        opt_state: a state holding exactly one ``InjectHyperparamsState``.
        **values: hyperparameter name -> new value.

    Raises:
        ValueError: when there is no (or more than one) injected state, or a name it does not hold.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.chain(ft.clip_by_global_norm(1.0), ft.inject_hyperparams(ft.adam)(lr=1e-3))
        >>> state = ft.set_hyperparams(tx.init({"w": torch.ones(2)}), lr=1e-4, betas=(0.8, 0.9))
        >>> float(state[1].hyperparams["lr"]), state[1].hyperparams["betas"][0].dtype
        (0.0001, torch.float64)
    """
    found = find_one_state(opt_state, InjectHyperparamsState, "set_hyperparams", "inject_hyperparams")
    unknown = sorted(set(values) - set(found.hyperparams))
    if unknown:
        raise ValueError(
            f"set_hyperparams: no injected hyperparameter {unknown[0]!r}; the state holds {sorted(found.hyperparams)} "
            "(build the optimiser with ft.inject_hyperparams(factory)(...) to change others during training)"
        )
    hyperparams = dict(found.hyperparams)
    for name, value in values.items():
        hyperparams[name] = _replacement(name, value, found.hyperparams[name])
    _check_as_the_factory_does(found, hyperparams)
    return _tree.replace_node(opt_state, found, found._replace(hyperparams=hyperparams))


def _check_as_the_factory_does(found: InjectHyperparamsState, hyperparams: dict[str, Any]) -> None:
    """Refuses what the optimiser's constructor refuses (``lr=-1``, NaN, ``betas=(0.9, 1.5)``): its
    factory runs once on the new values, for its checks alone. The inner state says which factory
    that is (every ``ft`` optimiser's state names it); for any other, non-finite values are refused."""
    factory = getattr(type(found.inner_state), "factory", None)
    if factory is None:
        for name, value in hyperparams.items():
            for i, item in enumerate(value if isinstance(value, tuple) else (value,)):
                if isinstance(item, Tensor) and item.device.type == "cpu" and not torch.isfinite(item):
                    where = f"{name}[{i}]" if isinstance(value, tuple) else name
                    raise ValueError(f"set_hyperparams: {where} must be finite, got {float(item)}")
        return
    try:
        factory(**hyperparams)
    except (TypeError, ValueError) as error:
        raise type(error)(f"set_hyperparams: {error}") from None


def hyperparams(state: Any) -> dict[str, Tensor]:
    """The injected hyperparameters in ``state`` (no host sync): ``{"lr": tensor, ...}``.

    Names are the keyword names given to :func:`~functrain.inject_hyperparams` (``"betas.0"`` for a
    tuple's items); when the state holds several injected optimisers (a GAN's two states), each
    name is prefixed with the dotted path to its optimiser state (``"0.opt_state.lr"``).

    Example:
        >>> import torch, functrain as ft
        >>> state = ft.TrainState.create(torch.nn.Linear(2, 1), ft.inject_hyperparams(ft.adam)(lr=1e-3))
        >>> {k: float(v) for k, v in ft.hyperparams(state).items()}
        {'lr': 0.001, 'betas.0': 0.9, 'betas.1': 0.999, 'eps': 1e-08}
    """
    found = [(path, node) for path, node in _tree.state_nodes(state) if isinstance(node, InjectHyperparamsState)]
    out: dict[str, Tensor] = {}
    for path, inject_state in found:
        prefix = f"{path}." if len(found) > 1 else ""
        for name, value in inject_state.hyperparams.items():
            if isinstance(value, tuple):
                out.update({f"{prefix}{name}.{i}": v for i, v in enumerate(value) if isinstance(v, Tensor)})
            elif isinstance(value, Tensor):
                out[prefix + name] = value
    return out


def _replacement(name: str, value: Any, old: Any) -> Any:
    if isinstance(old, tuple):
        if not isinstance(value, (tuple, list)) or len(value) != len(old):
            raise ValueError(f"set_hyperparams: {name} must be a tuple of {len(old)} values, got {value!r}")
        return tuple(_replacement(f"{name}[{i}]", v, o) for i, (v, o) in enumerate(zip(value, old)))
    if old is None:
        if value is not None:
            raise ValueError(f"set_hyperparams: {name} is None (not injected) and stays None, got {value!r}")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(
            f"set_hyperparams: {name} must be a number or a 0-d tensor, got {type(value).__name__}"
            + ("; to schedule it, pass the schedule to inject_hyperparams" if callable(value) else "")
        )
    if isinstance(value, Tensor) and value.ndim != 0:
        raise ValueError(f"set_hyperparams: {name} must be a number or a 0-d tensor, got shape {tuple(value.shape)}")
    return torch.as_tensor(value, dtype=torch.float64, device=old.device).detach().clone().reshape(())


# ----------------------------------------------------------------------------- schedulable


@register_state
class ScheduleState(NamedTuple):
    """State of every optimiser built by a :func:`schedulable` factory (``ft.adam(...)``, ...), whatever
    its arguments: floats, 0-d tensors or schedules. Schedules are evaluated at ``count`` and not
    stored, so the structure never depends on which arguments are scheduled."""

    count: Tensor  # updates done so far: the position of every schedule (0-d int64, on the params' device)
    inner_state: OptState  # the state of the plain transformation the factory builds


def schedulable(factory: Callable[..., GradientTransformation] | None = None, *, complex_params: bool = False) -> Any:
    """Lets every numeric hyperparameter of ``factory`` be a schedule of the step count.

    The returned factory builds a transformation whose state is always a ``ScheduleState(count,
    inner_state)`` of the factory's own subclass (``AdamState`` for ``ft.adam``): ``count`` is the
    number of updates done (the position of every schedule) and
    ``inner_state`` the state of ``factory``'s own transformation. The structure is the same whether
    a hyperparameter is a float, a 0-d tensor or a schedule (:func:`is_hyperparameter`; a ``mask``
    function is not one), so a checkpoint of a constant-rate run loads into a scheduled one.

    Without schedules, ``factory``'s transformation is built once and driven as it is, its declared
    fast path included. With schedules, it is built again for each update, with each scheduled
    argument's value at ``count`` as a 0-d float64 tensor on the count's device (a tuple such as
    ``betas`` with one scheduled item passes all its items so), so a compiled step does not
    recompile as the values change. ``factory``'s own validation runs once when the transformation
    is built, on the initial values (schedules at count 0).

    Every eager ``update`` first checks its inputs (under tracing the same checks run when a compiled
    step's error is reported, see ``make_train_step``): the state must be one this factory's ``init``
    built (another optimiser's is refused, naming both), with the structure, shapes and dtypes
    ``init`` gives for these parameters, and the updates must have the parameters' shapes. Nothing
    mismatched reaches a kernel, so nothing is read past a buffer's end.

    Complex parameters: with ``complex_params=True`` (the optimisers torch.optim steps complex
    parameters for) each complex tensor is stepped as its real view, as torch.optim does, so the
    numbers are torch's; otherwise complex parameters are refused with a ``TypeError`` naming one.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.ones(2)}
        >>> constant = ft.adam(lr=0.1).init(params)
        >>> scheduled = ft.adam(lr=ft.schedules.linear_lr(0.1, total_iters=10)).init(params)
        >>> type(constant).__name__, constant.count, type(constant.inner_state[0]).__name__
        ('AdamState', tensor(0), 'ScaleByAdamState')
        >>> torch.utils._pytree.tree_structure(constant) == torch.utils._pytree.tree_structure(scheduled)
        True
    """
    if factory is None:  # used as @schedulable(complex_params=True)
        return functools.partial(schedulable, complex_params=complex_params)
    if complex_params:
        _COMPLEX_OPTIMISERS.append(factory.__name__)
    signature = signature_of(factory)
    # How each argument is passed, as plain tuples: a scheduled factory is called again inside a
    # traced update, where torch.compile cannot look through inspect's objects.
    layout = tuple((p.name, p.kind) for p in signature.parameters.values())
    state_class = _state_class(factory)

    @functools.wraps(factory)
    def build(*args, **kwargs) -> GradientTransformation:
        if not any(_has_schedule(v) for v in (*args, *kwargs.values())):
            # The common case, and the only one inside a traced update (inject_hyperparams passes
            # tensors): no signature work, which torch.compile cannot trace through.
            tx = factory(*args, **kwargs)
            key = _structure_key(state_class, args, kwargs)
            return _driven(lambda count: tx, tx.update_and_apply is not None, state_class, complex_params, key)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()  # every argument present, so _arguments places each where it belongs
        scheduled = {
            name: value
            for name, value in bound.arguments.items()
            if is_hyperparameter(signature.parameters[name], value) and _has_schedule(value)
        }
        if not scheduled:
            tx = factory(*args, **kwargs)
            return _driven(lambda count: tx, tx.update_and_apply is not None, state_class, complex_params)
        static = {name: value for name, value in bound.arguments.items() if name not in scheduled}

        def at(count: Tensor) -> GradientTransformation:
            values = _as_tensors(_values_at(scheduled, count, scheduled), count.device)
            args, kwargs = _arguments(layout, {**static, **values})
            return factory(*args, **kwargs)

        # The factory's own checks, once, on the schedules' values at count 0; the result also
        # says whether the transformation built from tensors declares a fast path.
        probe = at(torch.zeros((), dtype=torch.int64))
        return _driven(at, probe.update_and_apply is not None, state_class, complex_params)

    return build


# The optimisers declared with complex_params=True, in declaration order: named when another refuses.
_COMPLEX_OPTIMISERS: list[str] = []


def _state_class(factory: Callable[..., GradientTransformation]) -> type[ScheduleState]:
    """The ``ScheduleState`` subclass that marks a state as built by ``factory`` (``AdamState`` for
    ``adam``): a state's tree structure then says which optimiser it belongs to, so Adam's state is
    refused by Adamax's update and by a checkpoint load into an Adamax run, though their tensors
    have the same shapes. The class lives in the factory's module under its own name, where pickle
    and ``torch.load(weights_only=True)`` look it up."""
    name = "".join(part.capitalize() for part in factory.__name__.split("_")) + "State"
    cls = type(
        name,
        (ScheduleState,),
        {
            "__slots__": (),
            "__module__": factory.__module__,
            "__qualname__": name,
            "__doc__": f"State of ``ft.{factory.__name__}``: a :class:`ScheduleState` that names its optimiser.",
            "optimiser": factory.__name__,
            # set_hyperparams runs the factory's own checks on new values (a plain function, not a method)
            "factory": staticmethod(factory),
        },
    )
    setattr(sys.modules[factory.__module__], name, cls)
    return register_state(cls)


def _driven(
    at: Callable[[Tensor], GradientTransformation],
    offered: bool,
    state_class: type,
    complex_params: bool,
    structure_key: Hashable | None = None,
) -> GradientTransformation:
    """The transformation that runs ``at(count)``, the inner transformation at the state's count,
    on checked inputs (and on the real views of complex parameters, when it takes them)."""
    owner = f"ft.{state_class.optimiser}"

    def refuse_complex(tree):
        key, leaf = _tree.complex_leaves(tree)[0]
        raise TypeError(
            f"{owner} does not support complex parameters ('{key}' is {leaf.dtype}); the optimisers that "
            f"step complex parameters as torch.optim does are {', '.join(sorted(_COMPLEX_OPTIMISERS))} (or split each "
            "into real and imaginary parts with torch.view_as_real)"
        )

    def init(params):
        if _tree.has_complex(params):
            if not complex_params:
                refuse_complex(params)
            params = _tree.as_real(params)
        count = step_count(params)
        return state_class(count, at(count).init(params))

    check = state_check(owner, init, state_class, structure_key)

    def stepped(run, updates, state, params, out_like):
        """``run(updates, params) -> (out, inner_state)`` on checked inputs, on real views when they
        are complex (the result viewed back like ``out_like``); returns ``out`` and the new state."""
        signature = check(updates, state, params)
        # Read off the check's signature when there is one: no second walk over the trees.
        complex_inputs = (
            _tree.signature_has_complex(signature)
            if signature is not None and params is not None
            else _tree.has_complex(updates) or _tree.has_complex(params)
        )
        if not complex_inputs:
            out, inner_state = run(updates, params)
        else:
            if not complex_params:
                refuse_complex(updates if params is None else params)
            out, inner_state = run(_tree.as_real(updates), _tree.as_real(params))
            out = _tree.as_complex_like(out, out_like)
        return out, state_class(state.count + 1, inner_state)

    # The inner transformation is built inside run, after the check: a foreign state may have no count.
    def update(updates, state, params=None, **extra):
        def run(u, p):
            return at(state.count).update(u, state.inner_state, p, **extra)

        return stepped(run, updates, state, params, updates)

    def update_and_apply_inner(updates, state, params, *, donate=False, **extra):
        def run(u, p):
            return update_and_apply(at(state.count), u, state.inner_state, p, donate=donate, **extra)

        return stepped(run, updates, state, params, params)

    return GradientTransformation(init, update, update_and_apply_inner if offered else None)


def _structure_key(state_class: type, args: tuple, kwargs: dict) -> Hashable | None:
    """What the structure of a factory's state can depend on: the factory, and its arguments other
    than tensors (hyperparameter values, which never change the structure). ``None`` when an argument
    cannot be hashed: that transformation keeps its own cache."""

    def part(value):
        if isinstance(value, Tensor):
            return Tensor
        if type(value) is tuple:
            return tuple(part(v) for v in value)
        hash(value)
        return value

    try:
        return state_class, tuple(part(a) for a in args), tuple(sorted((k, part(v)) for k, v in kwargs.items()))
    except TypeError:
        return None


def _has_schedule(value: Any) -> bool:
    if type(value) is tuple:
        return any(_has_schedule(v) for v in value)
    return _is_schedule(value)
