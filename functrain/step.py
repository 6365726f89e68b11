"""The training step: ``step(state, batch) -> (state, metrics)``, a pure function of tensors.

``make_train_step`` builds it from a model, a loss function and a gradient transformation:

.. code-block:: text

    loss, aux = loss_fn(model with state.params and state.buffers, batch)   # torch.func.functional_call
    grads     = d loss / d params                                           # torch.func.grad_and_value
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params    = params + updates

Each step function owns a *stateless copy* of the model: the module tree with every parameter and
buffer on the ``meta`` device (no memory), in train mode for the train step and eval mode for the
eval step. ``functional_call`` swaps the state's tensors in for each call, so the user's model is
never touched, train and eval never flip a shared ``training`` flag (no recompiles when they are
interleaved), and the step composes from the outside with ``torch.func.vmap``, ``torch.func.grad``
and ``torch.compile``.
"""

from __future__ import annotations

import copy
import functools
import importlib
import logging
import sys
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import _precompile, _sharding, _tree, _validate
from .base import GradientTransformation, OptState, Params, register_state, step_count, update_and_apply
from .loss_scale import LossScaleState

Batch = Any
LossFn = Callable[[nn.Module, Batch], "Tensor | tuple[Tensor, dict[str, Tensor]]"]
Metrics = dict[str, Tensor]

_PRECISIONS = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


@register_state
class TrainState(NamedTuple):
    """Everything a training step reads and writes.

    Attributes:
        params: ``{name: tensor}`` as ``model.named_parameters()`` names them.
        buffers: ``{name: tensor}`` as ``model.named_buffers()`` (BatchNorm running statistics).
        opt_state: the state of the gradient transformation.
        step: 0-d int64 tensor on the params' device: the number of steps taken.
    """

    params: Params
    buffers: dict[str, Tensor]
    opt_state: OptState
    step: Tensor

    @classmethod
    def create(cls, model: nn.Module, tx: GradientTransformation, *, mesh: Any = None) -> TrainState:
        """The initial state of ``model`` trained by ``tx``.

        The params and buffers are the model's own tensors, detached (no copy): a pure step never
        writes to them, and an ``inplace`` step updates them where they lie, so the model then
        holds the trained weights.

        Only parameters with ``requires_grad=True`` are ``params``: the step differentiates them
        and ``tx`` holds state for them. Frozen parameters (``requires_grad=False``) travel with
        the buffers, as torch.optim skips a parameter whose ``.grad`` is None: they are never
        differentiated (no backward work) and never moved.

        With ``mesh`` (a ``torch.distributed.device_mesh.DeviceMesh``; call on every rank), the
        params are sharded (FSDP / ZeRO-3): each becomes a DTensor split by rows over the mesh,
        ``Shard(0)``, from rank 0's values, and ``tx.init`` builds the optimiser state sharded the
        same way, so each rank holds 1/N of both. A parameter whose first dimension has fewer rows
        than the mesh has ranks (a 0-d tensor, a short bias) is replicated instead. A 2-D mesh
        named ``("replicate", "shard")`` gives HSDP: replicated over the first dimension, sharded
        over the second. Buffers and frozen parameters stay plain tensors, whole on every rank.
        Train the state with ``make_train_step(..., mesh=mesh)``.

        Example:
            >>> import torch, functrain as ft
            >>> state = ft.TrainState.create(torch.nn.Linear(3, 2), ft.sgd(lr=0.1))
            >>> sorted(state.params), int(state.step)
            (['bias', 'weight'], 0)
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"TrainState.create: model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(tx, GradientTransformation):
            raise TypeError(f"TrainState.create: tx must be a GradientTransformation, got {type(tx).__name__}")
        named = list(model.named_parameters())
        params = {name: p.detach() for name, p in named if p.requires_grad}
        if mesh is not None:
            params = _sharding.shard("TrainState.create", params, _sharding.check_mesh("TrainState.create", mesh))
        frozen = {name: p.detach() for name, p in named if not p.requires_grad}
        buffers = {**frozen, **{name: b.detach() for name, b in model.named_buffers()}}
        return cls(params, buffers, tx.init(params), step_count(params or buffers))


def stack_states(states: Sequence[Any]) -> Any:
    """Stacks K states (or any trees of one structure) leaf by leaf along a new leading dimension,
    for training K models at once with ``torch.func.vmap(step, in_dims=(0, None))``."""
    if not states:
        raise ValueError("stack_states: states must hold at least one state")
    return _tree.map(lambda *leaves: torch.stack(leaves), *states)


def unstack_states(stacked: Any) -> list[Any]:
    """The inverse of :func:`stack_states`: K trees, each holding one slice of every leaf."""
    leaves = _tree.leaves(stacked)
    if not leaves:
        raise ValueError("unstack_states: the tree has no tensors to unstack")
    return [_tree.map(lambda leaf: leaf[i], stacked) for i in range(leaves[0].shape[0])]


# ----------------------------------------------------------------------------- the model, without weights


class _LossModule(nn.Module):
    """``loss_fn(model, batch)`` as a module, so ``functional_call`` can run it: inside the call,
    ``model`` (a real ``nn.Module``) holds the state's tensors, and ``loss_fn`` may call any of its
    submodules or methods, not just ``forward``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Batch):
        return self.loss_fn(self.model, batch)


def _stateless_copy(model: nn.Module, training: bool) -> nn.Module:
    """``model``'s module tree with every parameter and buffer replaced by a ``meta`` tensor of the
    same shape: the structure functional_call needs, without a second copy of the weights. Tied
    parameters stay tied (the deepcopy memo maps each tensor once)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo).train(training)


def _prefixed(params: Params, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
    return {**{f"model.{k}": v for k, v in params.items()}, **{f"model.{k}": v for k, v in buffers.items()}}


def _check_state(owner: str, expected: dict[str, tuple[int, ...]], state: Any) -> None:
    """Names the first parameter or buffer where ``state`` differs from the model."""
    if not isinstance(state, TrainState):
        raise TypeError(f"{owner}: state must be a functrain.TrainState, got {type(state).__name__}")
    actual = {**state.params, **state.buffers}
    if actual.keys() != expected.keys():
        missing = [k for k in expected if k not in actual]
        extra = [k for k in actual if k not in expected]
        raise ValueError(
            f"{owner}: the state was built for another model: "
            + (
                f"the model's '{missing[0]}' is missing from the state"
                if missing
                else f"'{extra[0]}' is not in the model"
            )
        )
    for name, shape in expected.items():
        if tuple(actual[name].shape) != shape:
            raise ValueError(
                f"{owner}: the state was built for another model: '{name}' has shape "
                f"{tuple(actual[name].shape)} in the state but {shape} in the model"
            )


def _split_output(owner: str, out: Any) -> tuple[Tensor, Metrics]:
    """``loss`` or ``(loss, metrics)`` from ``loss_fn``, checked: a 0-d floating-point loss."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
        loss, metrics = out
    else:
        loss, metrics = out, {}
    if not isinstance(loss, Tensor) or loss.ndim != 0 or not loss.is_floating_point():
        what = (
            f"a tensor of shape {tuple(loss.shape)} and dtype {loss.dtype}"
            if isinstance(loss, Tensor)
            else f"{type(loss).__name__}"
        )
        raise TypeError(
            f"{owner}: loss_fn must return a 0-d floating-point loss tensor, or (loss, metrics_dict); "
            f"it returned {what}"
        )
    if "loss" in metrics:
        raise ValueError(f"{owner}: loss_fn's metrics must not contain 'loss': the step reports the loss itself")
    for name, value in metrics.items():
        # Metrics stay on the device (no host sync per step), so each is a 0-d tensor, not a float.
        if not isinstance(value, Tensor) or value.ndim != 0:
            what = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            raise TypeError(
                f"{owner}: loss_fn's metric {name!r} must be a 0-d tensor (e.g. (logits.argmax(-1) == y).float()"
                f".mean(), not .item() or a Python number), got {what}"
            )
    return loss, metrics


class _Forward:
    """Runs ``loss_fn`` on a stateless model copy with the state's tensors, under autocast if asked."""

    def __init__(self, owner: str, model: nn.Module, loss_fn: LossFn, training: bool, precision: str | None):
        self.owner = owner
        self.module = _LossModule(_stateless_copy(model, training), loss_fn)
        self.expected = {k: tuple(v.shape) for k, v in [*model.named_parameters(), *model.named_buffers()]}
        self.autocast_dtype = _PRECISIONS[precision]
        # functional_call's tie_weights walks every module on each call (traced, under compile) for tensors
        # reachable under two names; a model's ties are fixed, so they are looked for once, here.
        self.tie_weights = _has_tied_tensors(model)

    @property
    def model(self) -> nn.Module:
        """The stateless copy of the model that ``functional_call`` fills with the state's tensors."""
        return self.module.model

    def check_structure(self) -> None:
        """Refuses a model that grew parameters or buffers while it ran: a submodule created in
        ``forward`` (or ``loss_fn``) is not in the state, so it would never be trained or saved,
        and each step would run a fresh random copy of it."""
        names = [k for k, _ in [*self.module.model.named_parameters(), *self.module.model.named_buffers()]]
        new = [k for k in names if k not in self.expected]
        if new:
            raise ValueError(
                f"{self.owner}: the model created {new[0]!r} while it ran, so it is not in the state: it would "
                "never be trained or saved, and every step would run a new random copy. Create every submodule, "
                "parameter and buffer in __init__ (for lazy modules, run one forward pass before TrainState.create)"
            )

    def __call__(self, params: Params, buffers: dict[str, Tensor], batch: Batch) -> tuple[Tensor, Metrics]:
        """Runs the model; BatchNorm-like modules write their new statistics into ``buffers``."""
        if torch.compiler.is_compiling():
            out = self._run(params, buffers, batch)  # dynamo traces no try block; eager runs report errors
        else:
            try:
                out = self._run(params, buffers, batch)
            except (RuntimeError, TypeError, ValueError, IndexError) as error:
                if type(error) not in (RuntimeError, TypeError, ValueError, IndexError):
                    raise  # a user's own exception class may not take a single message
                raise type(error)(f"{self.owner}: the model or loss_fn rejected the batch: {error}") from error
        loss, metrics = _split_output(self.owner, out)
        return loss.float() if loss.dtype in (torch.float16, torch.bfloat16) else loss, metrics

    def _run(self, params: Params, buffers: dict[str, Tensor], batch: Batch) -> Any:
        if self.autocast_dtype is None:
            return self._call(params, buffers, batch)
        device = next(iter(params.values())).device.type if params else "cpu"
        with torch.autocast(device, dtype=self.autocast_dtype):
            return self._call(params, buffers, batch)

    def _call(self, params: Params, buffers: dict[str, Tensor], batch: Batch) -> Any:
        tensors = _prefixed(params, buffers)
        return torch.func.functional_call(self.module, tensors, (batch,), tie_weights=self.tie_weights)


def _has_tied_tensors(model: nn.Module) -> bool:
    """Whether a parameter or buffer of ``model`` is reachable under two names (an output layer
    sharing the embedding's weight): ``functional_call`` then sets both names from the one given."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return len({id(t) for _, t in named}) < len(named)


# ----------------------------------------------------------------------------- the steps


def _microbatches(owner: str, batch: Batch, k: int) -> list[Batch]:
    """``batch`` split into ``k`` equal parts along the first dimension of every tensor in it."""
    if k == 1:
        return [batch]
    flat, spec = _tree.flatten(batch)
    for leaf in flat:
        if isinstance(leaf, Tensor) and (leaf.ndim == 0 or leaf.shape[0] % k):
            raise ValueError(
                f"{owner}: microbatches={k} must divide the batch size, got a batch tensor of shape {tuple(leaf.shape)}"
            )
    chunks = [leaf.chunk(k) if isinstance(leaf, Tensor) else [leaf] * k for leaf in flat]
    return [_tree.unflatten([c[i] for c in chunks], spec) for i in range(k)]


def _mean(values: list[Tensor]) -> Tensor:
    """The mean over microbatches; integer metrics (counts) are averaged as floats."""
    if len(values) == 1:
        return values[0]
    stacked = torch.stack(values)
    return (stacked if stacked.is_floating_point() else stacked.to(torch.get_default_dtype())).mean(0)


def make_train_step(
    model: nn.Module,
    loss_fn: LossFn,
    tx: GradientTransformation,
    *,
    compile: bool | dict[str, Any] = False,
    inplace: bool = False,
    microbatches: int = 1,
    precision: str | None = None,
    reduce_buffers: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
    mesh: Any = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Builds ``step(state, batch) -> (state, metrics)``: one optimiser step of ``tx`` on ``loss_fn``.

    Args:
        model: the ``nn.Module``; only its structure is used (the weights come from the state).
        loss_fn: ``loss_fn(model, batch)`` returning a 0-d loss or ``(loss, metrics_dict)``;
            ``model`` runs with the state's params and buffers, in train mode.
        tx: the gradient transformation (an optimiser, or any composition).
        compile: ``True``, or a dict of ``torch.compile`` options (e.g. ``{"mode": "max-autotune"}``),
            compiles the whole step with ``fullgraph=True``: one graph, for static shapes
            (``dynamic=False`` unless given: an epoch's smaller last batch compiles one more graph). Hyperparameters and
            schedules are tensors in the state, so moving them never recompiles. GEMMs run on
            ATen's kernels (MKL on the CPU) and no choice is timed, so the numbers are bitwise the
            same across processes and with empty compile caches (``"mode": "max-autotune"`` times
            kernels: an opt-in). The functrain key ``"cpu_gemm": "fastest"`` (default ``"aten"``)
            also opts in to timing: each float32 CPU GEMM runs on the faster of MKL and oneDNN for
            its shape, measured at compile time. Its numbers then depend on those timings: two cold
            compiles (a resume in a new process) may differ at float32 rounding. The key
            ``"precompile": True`` saves the step's trace in the compile cache file too, so that a
            new process loading it neither traces nor compiles the step (torch's experimental AOT
            precompile, checked against this step's closure, sources and settings: see
            ``docs/concepts/compiling.md``).
        inplace: write the new params, buffers, optimiser state and step count into the input
            state's tensors instead of new ones (the returned state holds the same tensors). With
            ``compile``, inductor writes each result straight into its tensor, so a step needs no
            second copy of params and optimiser state: torch.optim's peak memory. Eager, the state
            is donated: ``tx``'s declared fast path runs with ``donate=True`` (see
            :func:`functrain.update_and_apply`), so ``adam``/``adamw`` (alone, ending a ``chain``
            or ``named_chain``, in a ``partition`` group or under ``masked``) run torch's fused
            kernel on the params and moments where they lie, as ``torch.optim.AdamW(fused=True)``
            does; with other transforms the params get an in-place add and the new state tensors
            are copied in. The input state is consumed; do not reuse it.
        microbatches: split each batch into this many equal parts along dim 0 and average their
            gradients (gradient accumulation inside one step). For a mean-reduced loss this is the
            full-batch gradient, in ``1/microbatches`` of the activation memory. BatchNorm sees
            each part's statistics, as it would in separate steps.
        precision: ``"bf16"`` or ``"fp16"`` runs the forward pass under ``torch.autocast``;
            params, gradients and optimiser state stay in their own dtype (fp32 master weights).
            ``"fp16"`` needs ``tx`` wrapped in :func:`functrain.dynamic_loss_scale`.
        reduce_buffers: applied to the new buffers at the end of each step; in data-parallel
            training, ``ft.distributed.mean_over_ranks`` keeps BatchNorm statistics identical on
            every rank (without it each rank keeps its own shard's statistics).
        mesh: train a sharded state (``TrainState.create(model, tx, mesh=mesh)``, FSDP / ZeRO-3 or
            HSDP) on this ``DeviceMesh``. Each rank passes its own part of the batch; the step
            gathers each parameter for the forward pass, and the backward of that gather
            reduce-scatters its gradient, so every rank gets its shard of the gradient of the mean
            loss over all ranks' batches: the step equals one process on the combined batch (for a
            mean-reduced loss with equal parts). ``tx`` runs on the local shards; global norms,
            trust ratios and factored statistics reduce across ranks, and Muon orthogonalises whole
            matrices. Gradients come from ``torch.autograd.grad`` (``torch.func.grad`` does not run
            on DTensor), so a sharded step cannot itself be differentiated or vmapped. The
            metrics are means over all ranks.

    The step calls ``tx`` with the extra arguments ``value`` (the loss, a 0-d tensor, averaged
    over microbatches) and ``value_fn`` (``value_fn(params) -> (loss, grads)``: the loss on the same
    batch and its gradient at other parameters, without loss scaling, BatchNorm's statistic updates
    dropped), so ``reduce_on_plateau`` and line-search or sharpness-aware transforms run inside it.

    Returns:
        ``step(state, batch) -> (state, metrics)``, where ``metrics`` holds 0-d tensors on the
        device: ``"loss"`` and whatever ``loss_fn`` returned (averaged over microbatches), plus
        ``"loss_scale"`` under fp16. Nothing is read back to the host.

    The step is pure (unless ``inplace``): the input state is left exactly as it was. It is
    differentiable (``torch.func.grad`` through unrolled steps) and vmappable: train K models at
    once with ``torch.func.vmap(step, in_dims=(0, None), randomness="different")`` over states
    stacked by :func:`stack_states`.

    Example:
        >>> import torch, torch.nn.functional as F, functrain as ft
        >>> model = torch.nn.Linear(4, 1)
        >>> def loss_fn(model, batch):
        ...     x, y = batch
        ...     return F.mse_loss(model(x), y)
        >>> step = ft.make_train_step(model, loss_fn, ft.sgd(lr=0.1))
        >>> state = ft.TrainState.create(model, ft.sgd(lr=0.1))
        >>> state, metrics = step(state, (torch.randn(8, 4), torch.randn(8, 1)))
        >>> int(state.step), sorted(metrics)
        (1, ['loss'])
    """
    owner = "make_train_step"
    _check_step_args(owner, model, loss_fn, compile, precision)
    if not isinstance(tx, GradientTransformation):
        raise TypeError(f"{owner}: tx must be a GradientTransformation, got {type(tx).__name__}")
    _validate.integer(owner, "microbatches", microbatches, 1)
    if mesh is not None:
        _sharding.check_mesh(owner, mesh)
    forward = _Forward("train step", model, loss_fn, training=True, precision=precision)

    def loss_for_grad(params, buffers, batch, loss_scale):
        loss, metrics = forward(params, buffers, batch)
        scaled = loss if loss_scale is None else loss * loss_scale
        return scaled, (loss.detach(), metrics)

    def loss_of_trained(trained, params, buffers, batch, loss_scale):
        return loss_for_grad({k: trained.get(k, p) for k, p in params.items()}, buffers, batch, loss_scale)

    functorch_grad_of_trained = torch.func.grad_and_value(loss_of_trained, has_aux=True)

    def functorch_grad_and_loss(params, buffers, batch, loss_scale, frozen):
        """The gradient of the scaled loss with respect to the params not in ``frozen`` (zeros for
        those), and the scaled loss, the loss and the metrics, by ``torch.func.grad_and_value``."""
        trained = {k: p for k, p in params.items() if k not in frozen}
        # Everything the loss reads is an argument: functorch refuses in-place writes (BatchNorm's
        # running statistics) to tensors a transformed function captures.
        grads, out = functorch_grad_of_trained(trained, params, buffers, batch, loss_scale)
        return {k: grads[k] if k in grads else _frozen_gradient(p) for k, p in params.items()}, out

    def autograd_grad_and_loss(params, buffers, batch, loss_scale, frozen):
        """The same as ``functorch_grad_and_loss``, by ``torch.autograd.grad`` on detached leaves:
        in plain eager mode it skips functorch's per-op wrapping; compiled, dynamo traces it when
        told to (see ``_CompiledStep``), which also runs where functorch's backward fails (bf16
        autocast with dropout in scaled_dot_product_attention); and it is the only way on DTensor.

        Sharded (``mesh``), each parameter is gathered where the model runs (``functrain._sharding``:
        block by block as each block runs, in the forward and again in the backward pass), the
        gradients come back as shards like the params', and loss and metrics are averaged over the
        ranks. Parameters in ``frozen`` are not differentiated: their gradients are zeros."""
        leaves, spec = _tree.flatten(params)
        trained = [name not in frozen for name, _ in _tree.named_leaves(params)]
        inputs = [p.detach().requires_grad_(t) for p, t in zip(leaves, trained)]
        differentiated = [x for x, t in zip(inputs, trained) if t]
        with torch.enable_grad():
            run = functools.partial(loss_for_grad, buffers=buffers, batch=batch, loss_scale=loss_scale)
            used = _tree.unflatten(inputs, spec)
            scaled, (loss, metrics) = run(used) if mesh is None else _sharding.run_gathered(run, forward.model, used)
            _check_differentiable(scaled, bool(differentiated))
            # Sharded, each rank's loss is the mean over its own part of the batch and the gather's
            # backward sums gradients over ranks, so 1/N of each is the gradient of the mean over ranks.
            to_differentiate = scaled if mesh is None else scaled / mesh.size()
            found = iter(
                torch.autograd.grad(to_differentiate, differentiated, allow_unused=True) if differentiated else ()
            )
            grads = [next(found) if t else _frozen_gradient(p) for p, t in zip(inputs, trained)]
        metrics = {k: v.detach() for k, v in metrics.items()}
        if mesh is None:  # None: a parameter the loss does not use
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(inputs, grads)]
        else:
            grads = [_sharding.like_param(g, p) for g, p in zip(grads, inputs)]
            loss, metrics = _sharding.mean_metrics(loss, metrics, mesh)
        return _tree.unflatten(grads, spec), (scaled.detach(), (loss, metrics))

    def gradients(params, buffers, batch, loss_scale, traced_autograd, frozen):
        """The gradient (of the scaled loss), the mean loss and each microbatch's metrics at ``params``.
        ``torch.func`` differentiates wherever the step is itself transformed (vmapped, differentiated)
        or compiled without ``traced_autograd``; ``torch.autograd.grad`` everywhere else. The params
        ``tx`` declares ``frozen`` are not differentiated (their backward is never run): zeros stand in
        for their gradients, which ``tx`` does not read."""
        by_autograd = mesh is not None or traced_autograd or _tree.fast_path_ok(params)
        differentiate = autograd_grad_and_loss if by_autograd else functorch_grad_and_loss
        grads, losses, metrics = None, [], []
        for part in _microbatches("train step", batch, microbatches):
            part_grads, (_, (loss, part_metrics)) = differentiate(params, buffers, part, loss_scale, frozen)
            grads = part_grads if grads is None else _tree.add(grads, part_grads)
            losses.append(loss)
            metrics.append(part_metrics)
        if microbatches > 1:
            grads = _tree.scale(grads, 1.0 / microbatches)
        return grads, _mean(losses), metrics

    def step(
        state: TrainState, batch: Batch, inplace: bool = inplace, traced_autograd: bool = False
    ) -> tuple[TrainState, Metrics]:
        _check_state("train step", forward.expected, state)
        if mesh is not None and not torch.compiler.is_compiling():
            _sharding.check_sharded("train step", state.params, mesh)
        loss_scale = _loss_scale_of(state.opt_state, precision)
        # functional_call lets BatchNorm write its running statistics into the buffers it is
        # given; a pure step hands it copies, an in-place step the state's own tensors.
        buffers = state.buffers if inplace else {k: b.clone() for k, b in state.buffers.items()}
        frozen = frozenset() if tx.frozen is None else tx.frozen(state.params)
        grads, loss, metrics = gradients(state.params, buffers, batch, loss_scale, traced_autograd, frozen)
        if reduce_buffers is not None:
            buffers = reduce_buffers(buffers)

        def value_fn(params: Params) -> tuple[Tensor, Params]:
            """The loss on this batch and its gradient at other ``params`` (a line search's or SAM's
            second evaluation): unscaled, and on copies of the buffers, whose updates are dropped."""
            other_buffers = {k: b.clone() for k, b in buffers.items()}
            other_grads, other_loss, _ = gradients(params, other_buffers, batch, None, traced_autograd, frozen)
            return other_loss, other_grads

        # An eager in-place step gives its state up to the optimiser (it is overwritten with the
        # result anyway); a compiled one never does: inductor writes in place by itself, and the
        # branch is on Python bools, so nothing is traced for it.
        donate = inplace and not torch.compiler.is_compiling()
        params, opt_state = update_and_apply(
            tx, grads, state.opt_state, state.params, donate=donate, value=loss, value_fn=value_fn
        )
        new = TrainState(params, buffers, opt_state, state.step + 1)
        if inplace:
            new = _write_into(state, new)
        out = {"loss": loss, **{k: _mean([m[k] for m in metrics]).detach() for k in metrics[0]}}
        if loss_scale is not None:
            out["loss_scale"] = loss_scale
        return new, out

    def first_call(state: TrainState, batch: Batch) -> None:
        """What only a run of the model shows, checked once before a compiled step is traced: the
        loss must depend on the parameters (under torch.func.grad a detached loss has zero gradient,
        silently), and the model must not create parameters while it runs."""
        _check_state("train step", forward.expected, state)
        if mesh is not None:
            _sharding.check_sharded("train step", state.params, mesh)
        params = {k: p.detach().requires_grad_() for k, p in state.params.items()}
        buffers = {k: b.clone() for k, b in state.buffers.items()}
        with torch.enable_grad(), _rng_untouched(params):
            whole = params if mesh is None else _sharding.gather_params(params)
            loss, _ = forward(whole, buffers, _microbatches("train step", batch, microbatches)[0])
        forward.check_structure()
        _check_differentiable(loss, bool(params))

    def pure_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        return step(state, batch, inplace=False)

    def autograd_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        return step(state, batch, traced_autograd=True)

    # Compiled, a plain call runs autograd_step; a step that is itself vmapped or differentiated
    # runs `step` (torch.func), which a sharded step cannot (torch.func does not run on DTensor).
    sharded = mesh is not None
    return _checked(step, pure_step, compile, first_call, forward, autograd_step, not sharded, sharded)


def _rng_untouched(params: Params):
    """The random generators as they were after the block: the first call's check runs the model
    once more (dropout draws), and a run resumed in a new process, which checks again, must draw the
    same numbers as the run it continues."""
    devices = sorted({p.device.index or 0 for p in _tree.leaves(params) if p.device.type == "cuda"})
    return torch.random.fork_rng(devices=devices)


def _frozen_gradient(p: Tensor) -> Tensor:
    """What stands in for the gradient of a parameter ``tx`` declares frozen, which nothing reads:
    zeros, one element broadcast to ``p``'s shape (no memory, no pass over it); a DTensor's zeros
    are sharded like it."""
    if _sharding.is_dtensor(p):
        return torch.zeros_like(p)
    return p.new_zeros(()).expand(p.shape)


def _check_differentiable(loss: Tensor, has_params: bool) -> None:
    """A loss that does not depend on the parameters has no gradient: refuse it rather than step on zeros."""
    if has_params and not loss.requires_grad:
        raise ValueError(
            "train step: the loss does not depend on the model's parameters (it has no grad_fn): loss_fn "
            "must compute it from the model's output without .detach(), .item(), torch.no_grad() or "
            "torch.inference_mode()"
        )


def make_eval_step(
    model: nn.Module,
    loss_fn: LossFn,
    *,
    compile: bool | dict[str, Any] = False,
    precision: str | None = None,
    mesh: Any = None,
) -> Callable[[TrainState, Batch], Metrics]:
    """Builds ``evaluate(state, batch) -> metrics``: ``loss_fn`` in eval mode, without gradients.

    The state is not changed (BatchNorm uses its running statistics and updates nothing). Train
    and eval steps own separate model copies, so interleaving them never recompiles either.
    With ``mesh``, the state is sharded (``TrainState.create(..., mesh=mesh)``): each parameter is
    gathered for the forward pass, and the metrics are means over the ranks' parts of the batch.

    Example:
        >>> import torch, torch.nn.functional as F, functrain as ft
        >>> model = torch.nn.Linear(4, 1)
        >>> evaluate = ft.make_eval_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]))
        >>> state = ft.TrainState.create(model, ft.sgd(lr=0.1))
        >>> sorted(evaluate(state, (torch.randn(8, 4), torch.randn(8, 1))))
        ['loss']
    """
    owner = "make_eval_step"
    _check_step_args(owner, model, loss_fn, compile, precision)
    if mesh is not None:
        _sharding.check_mesh(owner, mesh)
    forward = _Forward("eval step", model, loss_fn, training=False, precision=precision)

    def evaluate(state: TrainState, batch: Batch) -> Metrics:
        _check_state("eval step", forward.expected, state)
        if mesh is None:
            with torch.no_grad():
                loss, metrics = forward(state.params, state.buffers, batch)
            return {"loss": loss, **metrics}
        if not torch.compiler.is_compiling():
            _sharding.check_sharded("eval step", state.params, mesh)
        with torch.no_grad():
            run = functools.partial(forward, buffers=state.buffers, batch=batch)
            loss, metrics = _sharding.run_gathered(run, forward.model, state.params)
            loss, metrics = _sharding.mean_metrics(loss, metrics, mesh)
        return {"loss": loss, **metrics}

    def first_call(state: TrainState, batch: Batch) -> None:
        with _rng_untouched(state.params):
            evaluate(state, batch)
        forward.check_structure()

    return _checked(evaluate, evaluate, compile, first_call, forward, sharded=mesh is not None)


def _check_step_args(owner: str, model: Any, loss_fn: Any, compile: Any, precision: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"{owner}: loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
    if not isinstance(compile, (bool, dict)):
        raise TypeError(f"{owner}: compile must be a bool or a dict of torch.compile options, got {compile!r}")
    _validate.one_of(owner, "precision", precision, tuple(_PRECISIONS))


def _loss_scale_of(opt_state: OptState, precision: str | None) -> Tensor | None:
    """The current loss scale when the optimiser holds a ``dynamic_loss_scale`` (at any depth)."""
    found = _tree.find_states(opt_state, LossScaleState)
    if len(found) > 1:
        raise ValueError(f"train step: the optimiser holds {len(found)} dynamic_loss_scale wrappers; use one")
    if found:
        return found[0].scale
    if precision == "fp16":
        raise ValueError(
            "train step: precision='fp16' needs loss scaling against gradient underflow: build the "
            "state and the step with tx = ft.dynamic_loss_scale(your_optimiser)"
        )
    return None


def _write_into(old: TrainState, new: TrainState) -> TrainState:
    """Copies every tensor of ``new`` into its counterpart in ``old``; returns ``old``.

    Under torch.compile the copy is an input mutation that inductor fuses into the kernel that
    computes the value, so the result is written once, into the existing tensor.
    """
    _tree.map(lambda dst, src: dst if dst is src else dst.copy_(src), old, new)
    return old


def _checked(
    fn: Callable,
    pure_eager: Callable,
    compile: bool | dict[str, Any],
    first_call: Callable,
    forward: _Forward,
    autograd_fn: Callable | None = None,
    transformable: bool = True,
    sharded: bool = False,
) -> Callable:
    """``fn``, compiled when asked, whose errors are the eager step's: same type, same message.
    ``autograd_fn``: the same step differentiating with ``torch.autograd.grad``, which compiled
    plain calls run (see :class:`_CompiledStep`); ``transformable=False``: there is no ``fn`` to
    run under ``torch.func`` transforms; ``sharded``: the step gathers its parameters (``mesh=``)."""
    if compile is False:
        return _EagerStep(fn, forward)
    _import_cpp_extension_without_its_cuda_notice()
    options = {} if compile is True else dict(compile)
    options.setdefault("fullgraph", True)
    # Static shapes unless asked: a second batch size (an epoch's last, smaller batch) then compiles
    # one more graph for that size. With dynamo's automatic dynamic shapes it would retrace with a
    # symbolic batch size, and dropout under torch.func.grad cannot trace that: the step would fail.
    options.setdefault("dynamic", False)
    precompile = options.pop("precompile", False)
    if not isinstance(precompile, bool):
        raise ValueError(f"compile['precompile'] must be True or False, got {precompile!r}")
    options = _with_graph_passes(options, sharded)
    sources = {"transformable": fn if transformable else None, "by_autograd": autograd_fn}
    own = {name: None if f is None else _with_own_code(f) for name, f in sources.items()}
    compiled = {name: None if f is None else _compile(f, options) for name, f in own.items()}
    step = _CompiledStep(
        compiled["transformable"], compiled["by_autograd"], pure_eager, first_call, (sources["transformable"], options)
    )
    if precompile:
        # Plain calls run the autograd form (the transformable one for an eval step, which has no other).
        plain = "by_autograd" if autograd_fn is not None else "transformable"
        step._precompiled = _precompile.Precompiled(own[plain], compiled[plain], options)
    return step


def _compile(fn: Callable, options: dict[str, Any]) -> Callable:
    """``torch.compile(fn, **options)``, given its own copy of the nested inductor ``options`` dict:
    torch.compile pops keys from it (``guard_filter_fn``, ``use_aoti``), and a step compiles up to
    three functions with the same options (its two forms, and ``ft.vmap``'s)."""
    nested = options.get("options")
    return torch.compile(fn, **({**options, "options": dict(nested)} if isinstance(nested, dict) else options))


_CUDA_NOTICE = "No CUDA runtime is found"


def _import_cpp_extension_without_its_cuda_notice() -> None:
    """Imports ``torch.utils.cpp_extension``, which inductor imports at its first compile, without the
    notice it logs once per process at import on a machine with a CUDA toolkit but no CUDA device
    ("No CUDA runtime is found, using CUDA_HOME=..."): on a CPU-only run it says nothing to act on.

    Only that record is dropped, and only during this import: the filter is removed afterwards, every
    other record of that logger passes, and where a CUDA device is present nothing is done (torch
    logs nothing then). A ``torch.compile`` of the user's own, before any functrain step, still shows it.
    """
    if "torch.utils.cpp_extension" in sys.modules or torch.cuda.is_available():
        return
    logger = logging.getLogger("torch.utils.cpp_extension")

    def not_the_notice(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_CUDA_NOTICE)

    logger.addFilter(not_the_notice)
    try:
        importlib.import_module("torch.utils.cpp_extension")  # for its side effect, quietly
    finally:
        logger.removeFilter(not_the_notice)


class _EagerStep:
    """An eager step whose first call also checks that the model created nothing while it ran."""

    def __init__(self, fn: Callable, forward: _Forward):
        self._fn, self._forward, self._checked = fn, forward, False
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self._fn(*args, **kwargs)
        if not self._checked:
            self._forward.check_structure()
            self._checked = True
        return out


class _CompiledStep:
    """A compiled step that reports functrain's own errors as the eager step does.

    A check that fails while dynamo traces (a state from another optimiser, a batch the model
    rejects, a float loss) reaches the caller as dynamo's ``Unsupported: Observed exception``, which
    ``except ValueError`` does not catch. So: the first call checks what only a run of the model
    shows (see ``make_train_step``'s ``first_call``), and when a call fails, the same inputs go
    through the pure eager step, which raises the check's own error; when that runs clean, the
    compiler's error is re-raised as it was. Nothing is re-run on the happy path.

    A train step is compiled in up to two forms, chosen per call in Python, before dynamo runs:
    ``by_autograd`` (gradients by ``torch.autograd.grad``, which dynamo traces only under its
    ``trace_autograd_ops`` option, set for these calls alone) for plain calls, and
    ``transformable`` (``torch.func.grad``) for a step that is itself inside a ``torch.func``
    transform or differentiated (an input requires grad), where ``autograd.grad`` on detached
    leaves would cut the outer derivative. Each compiles on its first use only. The two give
    the same inductor code where both run; ``autograd.grad`` also traces where functorch's
    backward fails (bf16 autocast with dropout in ``scaled_dot_product_attention``).
    """

    def __init__(
        self,
        transformable: Callable | None,
        by_autograd: Callable | None,
        pure_eager: Callable,
        first_call: Callable,
        vmappable: tuple[Callable | None, dict[str, Any]] = (None, {}),
    ):
        self._transformable, self._by_autograd = transformable, by_autograd
        self._pure_eager, self._first_call = pure_eager, first_call
        self._vmappable = vmappable  # the uncompiled transformable step and its compile options, for ft.vmap
        self._checked = False
        self._trace_autograd = torch._dynamo.config.patch(trace_autograd_ops=True)  # entered per call, never global
        self._precompiled: _precompile.Precompiled | None = None  # compile={"precompile": True}: plain calls
        functools.update_wrapper(self, pure_eager)

    def __getattr__(self, name: str) -> Any:  # what torch.compile's wrapper offers (e.g. dynamo's cache)
        return getattr(self._by_autograd or self._transformable, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        transformed = torch._C._functorch.maybe_current_level() is not None  # inside vmap or torch.func.grad
        if not self._checked and not transformed:  # (the check's eager forward cannot run inside vmap)
            self._first_call(*args, **kwargs)
            self._checked = True
        try:
            plain = self._transformable is None or (
                (self._by_autograd or self._precompiled) is not None
                and not transformed
                and not _differentiated(args, kwargs)
            )
            if plain and self._by_autograd is not None:
                with self._trace_autograd:
                    return (self._precompiled or self._by_autograd)(*args, **kwargs)
            if plain and self._precompiled is not None:  # an eval step's plain call
                return self._precompiled(*args, **kwargs)
            return self._transformable(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:
            if transformed and isinstance(error, torch._dynamo.exc.Unsupported) and "functorch" in str(error):
                raise TypeError(_COMPILED_INSIDE_A_TRANSFORM) from error
            self._pure_eager(*args, **kwargs)  # raises the eager step's own error, chained to the compiler's
            raise


_COMPILED_INSIDE_A_TRANSFORM = (
    "a compiled step cannot run inside torch.func.vmap (or another torch.func transform) called from eager "
    "code: dynamo cannot trace a call made under a transform (pytorch #128711). For ensembles and sweeps, "
    "ft.vmap(step, in_dims=(0, 0)) compiles the vmapped step as one graph; or vmap the step built with "
    "compile=False and compile the result: torch.compile(torch.func.vmap(step, in_dims=...), fullgraph=True)"
)


def vmap(step: Callable, in_dims: Any = 0, *, randomness: str = "error") -> Callable:
    """``torch.func.vmap`` of a train or eval step: K models (a stacked state, see
    :func:`stack_states`) trained in one call, each on its own batch (``in_dims=(0, 0)``) or all on
    the same one (``in_dims=(0, None)``). A step built with ``compile=...`` gives the vmapped step
    compiled as one graph, with the step's own ``torch.compile`` options: ``torch.func.vmap`` of a
    compiled step cannot run (dynamo does not trace a call made under vmap), so this is the way to
    vmap it. An eager step gives ``torch.func.vmap(step, ...)`` as it is.

    The vmapped step runs the ``torch.func`` route (``torch.func.grad``) and each model's numbers
    equal its own step's to rounding (batched matrix products sum in another order).

    Args:
        step: from :func:`make_train_step` or :func:`make_eval_step` (compiled or not); not sharded.
        in_dims: as ``torch.func.vmap``'s: ``(0, 0)`` stacked states and stacked batches,
            ``(0, None)`` stacked states and one batch for all.
        randomness: as ``torch.func.vmap``'s: ``"error"`` (the default: a model with dropout must
            choose), ``"different"`` (independent draws per model) or ``"same"``.

    Example:
        >>> import torch, torch.nn.functional as F, functrain as ft
        >>> model, tx = torch.nn.Linear(4, 1), ft.adamw(1e-2)
        >>> step = ft.make_train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), tx)  # compile=True: the same
        >>> states = ft.stack_states([ft.TrainState.create(torch.nn.Linear(4, 1), tx) for _ in range(10)])
        >>> batches = (torch.randn(10, 8, 4), torch.randn(10, 8, 1))  # one batch of 8 per model
        >>> states, metrics = ft.vmap(step, in_dims=(0, 0))(states, batches)
        >>> metrics["loss"].shape, states.params["weight"].shape
        (torch.Size([10]), torch.Size([10, 1, 4]))
    """
    _validate.one_of("vmap", "randomness", randomness, ("error", "different", "same"))
    if not isinstance(step, _CompiledStep):
        if not callable(step):
            raise TypeError(f"vmap: step must be a step from make_train_step or make_eval_step, got {step!r}")
        return torch.func.vmap(step, in_dims=in_dims, randomness=randomness)
    fn, options = step._vmappable
    if fn is None:
        raise TypeError("vmap: a sharded step (mesh=...) cannot be vmapped: torch.func does not run on DTensor")

    def vmapped(*args: Any, **kwargs: Any) -> Any:  # the vmap call inside: dynamo traces it as one graph
        return torch.func.vmap(fn, in_dims=in_dims, randomness=randomness)(*args, **kwargs)

    compiled = _compile(_with_own_code(vmapped), options)
    eager = torch.func.vmap(step._pure_eager, in_dims=in_dims, randomness=randomness)
    return _CompiledStep(compiled, None, eager, first_call=lambda *args, **kwargs: None)


def _differentiated(args: Any, kwargs: Any) -> bool:
    """Whether the caller differentiates through this call: an input requires grad."""
    return torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in _tree.leaves((args, kwargs))
    )


def _with_graph_passes(options: dict[str, Any], sharded: bool) -> dict[str, Any]:
    """``options`` for ``torch.compile``, less functrain's own key ``cpu_gemm``, with functrain's
    inductor passes set where they apply (a pass the caller set in the same slot is kept instead).

    ``cpu_gemm="aten"`` (the default) leaves every GEMM on ATen: no timing, so the compiled step's
    numbers are the same in every process (DESIGN.md 2a). ``cpu_gemm="fastest"`` sets inductor's
    post-grad pass to :data:`functrain._gemm.GEMM_PASS` (each float32 CPU GEMM on the faster of
    ATen's BLAS and oneDNN, timed while compiling). A ``sharded`` step gets
    :data:`functrain._regather.REGATHER_PASS` as the post-grad pre-pass: each block's parameters
    are whole only while the block runs, forward and backward, as FSDP2 does; the numbers are the
    same with and without it. Neither applies to another backend than inductor. ``torch.compile``
    takes a ``mode`` or ``options``, not both, so then a ``mode`` becomes the inductor options it
    stands for.
    """
    options = dict(options)
    cpu_gemm = options.pop("cpu_gemm", "aten")
    allowed = ("aten", "fastest")
    if not isinstance(cpu_gemm, str) or cpu_gemm not in allowed:
        raise ValueError(f"compile['cpu_gemm'] must be one of {allowed}, got {cpu_gemm!r}")
    if options.get("backend", "inductor") != "inductor" or ("mode" in options and "options" in options):
        return options  # (given both mode and options, they are left for torch.compile to refuse)
    passes = {}
    if cpu_gemm == "fastest":
        passes.update(_gemm_pass())
    if sharded:
        passes.update(_regather_pass())
    if not passes:
        return options
    mode = options.pop("mode", None)
    if mode:
        try:
            from torch._inductor import list_mode_options
        except ImportError as error:
            warnings.warn(
                f"compile mode {mode!r} cannot carry functrain's graph passes in this torch ({error}): they are off",
                RuntimeWarning,
                stacklevel=3,
            )
            return {**options, "mode": mode}
    inductor = dict(list_mode_options(mode, options.get("dynamic")) if mode else options.get("options") or {})
    for slot, graph_pass in passes.items():
        inductor.setdefault(slot, graph_pass)
    return {**options, "options": inductor}


def _regather_pass() -> dict[str, Any]:
    return _inductor_pass(
        "post_grad_custom_pre_pass",
        "_regather.REGATHER_PASS",
        "the compiled sharded step's regather pass",
        "every parameter is gathered whole for the whole step",
    )


def _gemm_pass() -> dict[str, Any]:
    return _inductor_pass(
        "post_grad_custom_post_pass", "_gemm.GEMM_PASS", "compile['cpu_gemm']='fastest'", "every GEMM stays on ATen"
    )


def _inductor_pass(slot: str, name: str, what: str, without: str) -> dict[str, Any]:
    """``{slot: functrain.<name>}`` (``module.PASS``); nothing, with a warning (``what`` is unavailable:
    ``without``), where this torch lacks inductor's ``slot`` or what the pass imports. Both passes
    change no numbers a user relies on by default, so a step without one still runs."""
    # Imported here: importing inductor takes over a second, which only a compiled step should pay.
    # The hooks are private inductor API: if they moved, the pass is lost with a warning, never the step.
    module, attribute = name.split(".")
    try:
        from torch._inductor import config

        graph_pass = getattr(importlib.import_module(f"functrain.{module}"), attribute)
        missing = None if hasattr(config, slot) else f"inductor's {slot}"
    except ImportError as error:
        missing = str(error)
    if missing is not None:
        warnings.warn(f"{what} is unavailable in this torch ({missing}): {without}", RuntimeWarning, stacklevel=5)
        return {}
    return {slot: graph_pass}


def _with_own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own.

    Dynamo keeps compiled graphs per code object, and at most ``recompile_limit`` (8) of them. Every
    step built here is a closure over the same ``def``, so without a copy the ninth model compiled in
    one process (a sweep, a benchmark suite, a notebook) would hit the limit, a hard error under
    ``fullgraph=True``, and each step would check the guards of all the others' graphs.
    """
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    own.__kwdefaults__ = fn.__kwdefaults__
    return functools.update_wrapper(own, fn)
