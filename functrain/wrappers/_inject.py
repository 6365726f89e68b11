"""inject_hyperparams and schedulable: hyperparameters as tensors in the optimiser state."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..base import GradientTransformation, OptState, register_state, step_count


@register_state
class InjectHyperparamsState(NamedTuple):
    count: Tensor  # updates done so far: the position of every schedule
    hyperparams: dict[str, Any]  # name -> 0-d float64 tensor (a tuple of them for e.g. betas)
    inner_state: OptState


def _is_numeric(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, (float, Tensor)) or callable(value)


# Callables that are not schedules: a mask or labelling function of (name, tensor).
_NEVER_INJECTED = frozenset({"mask", "labels"})


def _injectable(value: Any) -> bool:
    """Floats, tensors and schedules are injected; ints, bools, strings and None stay static
    (they shape the computation, e.g. ``ns_steps``, ``nesterov``)."""
    if isinstance(value, tuple):
        return any(_is_numeric(v) for v in value)
    return _is_numeric(value)


def inject_hyperparams(
    factory: Callable[..., GradientTransformation], static_args: Iterable[str] = ()
) -> Callable[..., GradientTransformation]:
    """Wraps an optimiser factory so its numeric hyperparameters live in the optimiser state.

    ``inject_hyperparams(ft.adamw)(lr=1e-3, weight_decay=ft.schedules.linear_lr(...))`` builds an
    AdamW whose state is ``InjectHyperparamsState(count, hyperparams, inner_state)``; every float,
    tensor or schedule passed as a keyword argument is a 0-d float64 tensor in
    ``state.hyperparams[name]`` (tuples such as ``betas`` hold a tuple of them). Replace a value
    between steps (``state._replace(hyperparams={**state.hyperparams, "lr": torch.tensor(1e-4)})``)
    and the next update uses it; a compiled step does not recompile, because only tensor values
    changed. A schedule is evaluated at the update count before each update and its value stored.

    Arguments named in ``static_args``, non-numeric ones (ints, bools, strings) and ``mask`` /
    ``labels`` functions are passed through.
    """
    static_args = frozenset(static_args) | _NEVER_INJECTED

    @functools.wraps(factory)
    def build(*args, **kwargs) -> GradientTransformation:
        bound = inspect.signature(factory).bind(*args, **kwargs)
        given = dict(bound.arguments)
        factory(**given)  # validates the initial values with the factory's own checks
        injected = {k: v for k, v in given.items() if k not in static_args and _injectable(v)}
        static = {k: v for k, v in given.items() if k not in injected}

        def values_at(count: Tensor, stored: dict[str, Any]) -> dict[str, Any]:
            return {name: _value(spec, count, stored[name]) for name, spec in injected.items()}

        def inner(hyperparams: dict[str, Any]) -> GradientTransformation:
            return factory(**static, **hyperparams)

        def init(params):
            count = step_count(params)
            placeholder = {name: _placeholder(spec) for name, spec in injected.items()}
            hyperparams = _as_tensors(values_at(count, placeholder), count.device)
            return InjectHyperparamsState(count, hyperparams, inner(hyperparams).init(params))

        def update(updates, state, params=None, **extra):
            hyperparams = _as_tensors(values_at(state.count, state.hyperparams), state.count.device)
            updates, inner_state = inner(hyperparams).update(updates, state.inner_state, params, **extra)
            return updates, InjectHyperparamsState(state.count + 1, hyperparams, inner_state)

        return GradientTransformation(init, update)

    return build


def _value(spec: Any, count: Tensor, stored: Any) -> Any:
    """A schedule is evaluated at ``count``; any other injected value is read from the state."""
    if isinstance(spec, tuple):
        return tuple(_value(s, count, v) for s, v in zip(spec, stored))
    return spec(count) if callable(spec) else stored


def _placeholder(spec: Any) -> Any:
    if isinstance(spec, tuple):
        return tuple(_placeholder(s) for s in spec)
    return None if callable(spec) else spec


def _as_tensors(values: dict[str, Any], device: torch.device) -> dict[str, Any]:
    def convert(v):
        if isinstance(v, tuple):
            return tuple(convert(x) for x in v)
        if isinstance(v, (float, Tensor)):
            return torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
        return v

    return {k: convert(v) for k, v in values.items()}


def schedulable(factory: Callable[..., GradientTransformation]) -> Callable[..., GradientTransformation]:
    """Lets every numeric hyperparameter of ``factory`` be a schedule of the step count.

    Transforms take floats and 0-d tensors; when a call passes a schedule, the factory is driven
    through :func:`inject_hyperparams` with just the scheduled arguments injected, so each update
    rebuilds it with the schedules' current values. Calls without schedules return the plain chain.
    """

    @functools.wraps(factory)
    def build(*args, **kwargs) -> GradientTransformation:
        bound = inspect.signature(factory).bind(*args, **kwargs)
        scheduled = {k for k, v in bound.arguments.items() if _has_schedule(v)}
        if not scheduled:
            return factory(*args, **kwargs)
        static = set(bound.arguments) - scheduled
        return inject_hyperparams(factory, static_args=static)(**bound.arguments)

    return build


def _has_schedule(value: Any) -> bool:
    if isinstance(value, tuple):
        return any(_has_schedule(v) for v in value)
    return callable(value)
