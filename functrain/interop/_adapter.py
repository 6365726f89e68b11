"""A functrain transformation behind the ``torch.optim.Optimizer`` interface."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .. import _tree
from ..base import GradientTransformation, update_and_apply
from ..wrappers import InjectHyperparamsState


class TorchOptimizer(torch.optim.Optimizer):
    """Runs a functrain transformation as a ``torch.optim.Optimizer``, for imperative training loops.

    ``step()`` reads each parameter's ``.grad``, runs ``tx.update(grads, opt_state, params)`` and
    adds the updates to the parameters in place (under ``torch.no_grad``); ``zero_grad`` and hooks
    work as for any torch optimiser, and so does an ``lr_scheduler`` when ``tx`` is built by
    ``ft.inject_hyperparams`` (the scheduler reads and writes ``param_groups[0]["lr"]``, which
    only an injected ``tx`` has; otherwise it raises a ``KeyError`` that says so, and a functrain
    schedule, ``ft.adam(lr=ft.schedules.step_lr(...))``, does the same job). Any composition works unchanged
    (``ft.partition`` with a ``(name, tensor) -> label`` function sees the names when the
    parameters are given as ``model.named_parameters()``; otherwise ``p0, p1, ...``).

    Differences from torch.optim, all following from one functional state over all parameters:

    - A parameter whose ``.grad`` is None gets a zero gradient (torch.optim skips it): the
      transformation still updates it, e.g. by momentum or weight decay. Freeze parameters by
      leaving them out, or with ``ft.partition(..., {"frozen": ft.set_to_zero()})``.
    - There is one param group, and ``add_param_group`` is not supported; per-group settings
      belong in ``tx`` (``ft.partition``).
    - When ``tx`` is built by ``ft.inject_hyperparams``, its hyperparameters (every numeric one of
      the factory: ``"lr"``, ``"betas"``, ``"eps"``, ...) appear in ``param_groups[0]`` as Python
      numbers, and a value written there (by you or an ``lr_scheduler``) is copied into the state
      before the next step. Values that the state changes itself (schedules passed to
      ``inject_hyperparams``) are not copied back. Reading a hyperparameter that ``tx`` does not
      inject raises a ``KeyError`` naming the ones it has.
    - ``state_dict()`` holds the whole ``opt_state`` tree under ``["state"]["opt_state"]``; it
      loads with ``torch.load(..., weights_only=True)`` and back into a ``TorchOptimizer`` over
      the same transformation. Convert to a torch.optim optimiser with :func:`load_into_torch`.

    Args:
        params: an iterable of tensors, or of ``(name, tensor)`` pairs such as
            ``model.named_parameters()``.
        tx: any functrain GradientTransformation.

    Attributes:
        tx: the transformation.
        opt_state: its current state (replaced, not mutated, by each step); convert it with
            :func:`load_into_torch`, or read e.g. ``opt_state.hyperparams``.

    Example:
        >>> import torch, functrain as ft
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = ft.TorchOptimizer([w], ft.inject_hyperparams(ft.sgd)(lr=0.1))
        >>> opt.param_groups[0]["lr"]
        0.1
        >>> (w**2).sum().backward(); opt.step(); opt.zero_grad()
        >>> w
        Parameter containing:
        tensor([ 0.8000, -1.6000], requires_grad=True)
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[tuple[str, Tensor]], tx: GradientTransformation):
        if not isinstance(tx, GradientTransformation):
            raise TypeError(f"TorchOptimizer: tx must be a GradientTransformation, got {type(tx).__name__}")
        params = list(params)
        if any(isinstance(p, dict) for p in params):
            raise TypeError(
                "TorchOptimizer takes one group of parameters (tensors or (name, tensor) pairs), not param group "
                "dicts: express per-group settings in tx, e.g. with ft.partition"
            )
        self._ready = False
        super().__init__(params, defaults={})
        self._ready = True
        self.tx = tx
        group = self.param_groups[0]
        self._names = list(group.get("param_names") or (f"p{i}" for i in range(len(group["params"]))))
        with torch.no_grad():
            self.opt_state = tx.init(self._params())
        self._synced = self._hyperparameters()
        group.update(self._synced)
        self.param_groups[0] = _ParamGroup(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._ready:
            raise NotImplementedError(
                "TorchOptimizer: its functrain state is built for the parameters given at construction; "
                "build a new TorchOptimizer over all parameters (with ft.partition for per-group settings)"
            )
        super().add_param_group(param_group)

    def _params(self) -> dict[str, Tensor]:
        return {name: p.detach() for name, p in zip(self._names, self.param_groups[0]["params"])}

    def _hyperparameters(self) -> dict[str, Any]:
        """The injected hyperparameters as Python numbers (read once per change, not per step)."""
        if not isinstance(self.opt_state, InjectHyperparamsState):
            return {}
        return {name: _python(value) for name, value in self.opt_state.hyperparams.items()}

    def _push_hyperparameters(self) -> None:
        group = self.param_groups[0]
        changed = {
            name: group[name] for name, value in self._synced.items() if name in group and _python(group[name]) != value
        }
        if not changed:
            return
        state = self.opt_state
        hyperparams = dict(state.hyperparams)
        for name, value in changed.items():
            hyperparams[name] = _tensor_like(value, hyperparams[name])
            self._synced[name] = _python(value)
        self.opt_state = state._replace(hyperparams=hyperparams)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter from its ``.grad`` (zero where None); returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._push_hyperparameters()
        tensors = self.param_groups[0]["params"]
        grads = {}
        for name, p in zip(self._names, tensors):
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"TorchOptimizer: parameter '{name}' has a sparse gradient, which is not supported")
            grads[name] = torch.zeros_like(p) if p.grad is None else p.grad.detach()
        # A torch.optim step updates its parameters and state in place: donate both to tx's fast path
        # (the reference adds the updates into the parameters, in each one's dtype).
        _, self.opt_state = update_and_apply(self.tx, grads, self.opt_state, self._params(), donate=True)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict layout, with the functrain ``opt_state`` tree as ``["state"]["opt_state"]``."""
        state_dict = super().state_dict()
        state_dict["state"] = {"opt_state": self.opt_state}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a :meth:`state_dict` of a TorchOptimizer over the same transformation and parameters.

        Raises a ``ValueError`` naming the first differing key when the saved state's tree differs
        from this optimiser's (another transformation, other options or other parameters).
        """
        loaded = state_dict.get("state", {}).get("opt_state")
        if loaded is None:
            raise ValueError(
                "TorchOptimizer.load_state_dict: no ['state']['opt_state'] in this state dict; a torch.optim "
                "optimizer's state converts with ft.opt_state_from_torch"
            )
        _tree.check_same_structure(loaded, self.opt_state, "the loaded opt_state", "this optimizer's opt_state")
        for (name, new), old in zip(_tree.named_leaves(loaded), _tree.leaves(self.opt_state)):
            if new.shape != old.shape:
                raise ValueError(
                    f"the loaded opt_state's '{name}' has shape {tuple(new.shape)}, this optimizer's {tuple(old.shape)}"
                )
        opt_state = _tree.map(
            lambda new, old: new.detach().to(device=old.device, dtype=old.dtype, copy=True), loaded, self.opt_state
        )
        super().load_state_dict({**state_dict, "state": {}})
        self.param_groups[0] = _ParamGroup(self.param_groups[0])
        self.opt_state = opt_state
        self._synced = self._hyperparameters()


class _MissingHyperparameter(KeyError):
    def __str__(self) -> str:  # KeyError would print the message as a quoted repr
        return str(self.args[0])


class _ParamGroup(dict):
    """The one param group; a key it lacks (``"lr"`` read by an ``lr_scheduler``) raises a KeyError saying why."""

    def __missing__(self, key: Any) -> Any:
        held = sorted(k for k in self if k not in ("params", "param_names"))
        raise _MissingHyperparameter(
            f"TorchOptimizer: param_groups[0] has no {key!r}: only hyperparameters injected with "
            f"ft.inject_hyperparams appear there (this tx has {held}). Build tx as "
            f"ft.inject_hyperparams(ft.adam)(lr=...) to read or schedule them through param_groups, "
            f"or pass a schedule to the optimiser (ft.adam(lr=ft.schedules.step_lr(...)))"
        )


def _python(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_python(v) for v in value)
    if isinstance(value, Tensor):
        return value.item()
    return value


def _tensor_like(value: Any, like: Any) -> Any:
    if isinstance(like, tuple):
        return tuple(_tensor_like(v, old) for v, old in zip(value, like))
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).reshape(()).clone()
