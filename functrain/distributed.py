"""Training over ``torch.distributed``: data parallel (below), or sharded on DTensor (FSDP / HSDP:
``ft.TrainState.create(model, tx, mesh=mesh)`` and ``ft.make_train_step(..., mesh=mesh)``; see
``docs/concepts/distributed.md``; :func:`full_tensors` gathers a sharded state's tensors).

Data parallel: every rank runs the same step on its own shard of the batch, and the gradients are
averaged across ranks before the optimiser sees them.

.. code-block:: python

    ft.distributed.init()          # torchrun sets the env; collectives time out after 10 minutes
    tx = ft.chain(ft.distributed.sync_gradients(), ft.adamw(lr=1e-3))
    state = ft.distributed.broadcast_state(ft.TrainState.create(model, tx))   # rank 0's weights
    step = ft.make_train_step(model, loss_fn, tx, reduce_buffers=ft.distributed.mean_over_ranks)

The reduction uses traceable functional collectives (``torch.distributed._functional_collectives``),
so a compiled step stays one graph. gloo has no average, so gradients are summed and divided by the
world size. Because every rank then applies the same update to the same parameters, the optimiser
state stays identical on every rank without ever being communicated.
"""

from __future__ import annotations

import math
import numbers
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

try:  # traceable collectives (private, but DTensor and FSDP2 are built on them)
    import torch.distributed._functional_collectives as funcol
except ImportError:  # pragma: no cover - exercised by monkeypatching funcol
    funcol = None
from torch import Tensor

from . import _sharding, _tree, _validate
from .base import EmptyState, GradientTransformation

_HOW_TO_START = (
    "no torch.distributed process group is initialised: launch with `torchrun --nproc_per_node=N script.py` "
    "and call ft.distributed.init() (or torch.distributed.init_process_group) before training"
)

DEFAULT_TIMEOUT = 600.0  # seconds; see init()


def init(
    backend: str | None = None,
    *,
    timeout: float | timedelta = DEFAULT_TIMEOUT,
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
) -> None:
    """Starts ``torch.distributed`` (``init_process_group``) with a collective timeout that a stalled
    job fails within.

    When a rank stalls (a hung data loader, a deadlock, a stopped process), the other ranks wait
    inside their next collective. ``timeout`` bounds
    that wait: they raise (gloo: a ``RuntimeError`` "Timed out waiting ... ms"; NCCL: its watchdog
    aborts the process), and the launcher (torchrun) stops the job instead of letting it hang.
    The same bound applies to the rendezvous (a rank that never starts).

    The default, 10 minutes, is torch's NCCL default; torch's gloo default is 30 minutes, which
    leaves a stalled CPU job idle for half an hour. Ten minutes is far beyond a healthy collective
    (milliseconds to seconds) yet short against a job's run. Work that one rank does while the
    others wait in a collective must fit within it: rank 0 writing a large checkpoint or running an
    evaluation alone, or a first compile that takes much longer on one rank. Raise it for those.

    Args:
        backend: ``"gloo"`` (CPU), ``"nccl"`` (CUDA), or ``None``: torch's choice (gloo for CPU
            tensors, and NCCL for CUDA tensors when CUDA is available).
        timeout: seconds (or a ``datetime.timedelta``) a collective, or the rendezvous, may wait
            for the other ranks before it raises.
        rank: this process's rank; ``None`` reads ``RANK`` from the environment (torchrun sets it).
        world_size: the number of ranks; ``None`` reads ``WORLD_SIZE`` from the environment.
        init_method: where the ranks meet (``"tcp://host:port"``, ``"file:///path"``); ``None``
            reads ``MASTER_ADDR`` and ``MASTER_PORT`` from the environment.

    Raises:
        TypeError: an argument of the wrong type, named.
        ValueError: an argument out of range, named.
        RuntimeError: a process group is already initialised.

    Example:
        >>> import functrain as ft
        >>> ft.distributed.init("gloo", timeout=0)
        Traceback (most recent call last):
        ...
        ValueError: ft.distributed.init: timeout must be a number of seconds > 0 or a datetime.timedelta, got 0
    """
    owner = "ft.distributed.init"
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f'{owner}: backend must be a str ("gloo", "nccl", ...) or None, got {type(backend).__name__}')
    seconds = _timeout_seconds(owner, timeout)
    if world_size is not None:
        world_size = _validate.integer(owner, "world_size", world_size, 1)
    if rank is not None:
        rank = _validate.integer(owner, "rank", rank, 0, None if world_size is None else world_size - 1)
    if dist.is_available() and dist.is_initialized():
        raise RuntimeError(
            f"{owner}: a process group is already initialised; call torch.distributed.destroy_process_group() "
            "first to start another"
        )
    dist.init_process_group(
        backend,
        init_method=init_method,
        timeout=timedelta(seconds=seconds),
        rank=-1 if rank is None else rank,
        world_size=-1 if world_size is None else world_size,
    )


def _timeout_seconds(owner: str, timeout: Any) -> float:
    allowed = "a number of seconds > 0 or a datetime.timedelta"
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"{owner}: timeout must be {allowed}, got {type(timeout).__name__}: {timeout!r}")
    else:
        seconds = float(timeout)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{owner}: timeout must be {allowed}, got {timeout!r}")
    return seconds


def _require_process_group(owner: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{owner}: {_HOW_TO_START}")


def rank() -> int:
    """This process's rank, or 0 when not running distributed."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks, or 1 when not running distributed."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Whether this is rank 0, the rank that logs, shows progress and writes checkpoints."""
    return rank() == 0


def per_rank_batch_size(global_batch_size: int) -> int:
    """The batch each rank loads for a global batch of ``global_batch_size`` (ValueError if it does not divide)."""
    n = world_size()
    _validate.integer("per_rank_batch_size", "global_batch_size", global_batch_size, 1)
    if global_batch_size % n:
        raise ValueError(
            f"per_rank_batch_size: the global batch size {global_batch_size} is not divisible by the world size "
            f"{n}; use a multiple of {n} so every rank gets an equal share"
        )
    return global_batch_size // n


# ----------------------------------------------------------------------------- reductions


def _check_bucket_cap(owner: str, bucket_cap_mb: Any) -> None:
    if bucket_cap_mb is not None:
        _validate.in_range(owner, "bucket_cap_mb", bucket_cap_mb, 0.0, low_open=True)


def _mean_flat(tensors: list[Tensor], group: Any) -> list[Tensor]:
    """All-reduce (sum) ``tensors`` of one dtype and device in one collective, then divide by the world size."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if funcol is not None:
        total = funcol.all_reduce(flat, "sum", group)
    else:  # the public in-place collective, on the buffer cat just made (eager only: it breaks a graph)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        total = flat
    total = total / dist.get_world_size(group)
    return [part.view_as(t) for part, t in zip(total.split([t.numel() for t in tensors]), tensors)]


def _buckets(tensors: list[Tensor], cap_bytes: float | None) -> list[list[int]]:
    """Indices of ``tensors`` grouped into buckets of one dtype and device and at most ``cap_bytes``
    each (a tensor larger than the cap gets a bucket of its own); ``None``: one bucket per tensor."""
    buckets: list[list[int]] = []
    open_bucket: dict[tuple, tuple[list[int], int]] = {}
    for i, t in enumerate(tensors):
        if cap_bytes is None:
            buckets.append([i])
            continue
        key = (t.device, t.dtype)
        members, size = open_bucket.get(key, ([], 0))
        nbytes = t.numel() * t.element_size()
        if members and size + nbytes > cap_bytes:
            buckets.append(members)
            members, size = [], 0
        open_bucket[key] = (members + [i], size + nbytes)
    buckets.extend(members for members, _ in open_bucket.values() if members)
    return buckets


def mean_over_ranks(tree: Any, group: Any = None, bucket_cap_mb: float | None = 25.0) -> Any:
    """The element-wise mean of ``tree`` over all ranks (floating-point leaves; others are kept).

    Traceable: it uses functional collectives, so it can run inside a compiled step. Leaves are
    packed into buckets of up to ``bucket_cap_mb`` megabytes (one collective each, fewer and larger
    messages); ``None`` sends one collective per leaf. Pass it as ``make_train_step(...,
    reduce_buffers=ft.distributed.mean_over_ranks)`` to keep BatchNorm statistics identical on every
    rank; without it each rank keeps the statistics of its own shard.
    """
    _require_process_group("mean_over_ranks")
    _check_bucket_cap("mean_over_ranks", bucket_cap_mb)
    group = dist.group.WORLD if group is None else group
    flat, spec = _tree.flatten(tree)
    floating = [i for i, t in enumerate(flat) if isinstance(t, Tensor) and t.is_floating_point()]
    out = list(flat)
    cap = None if bucket_cap_mb is None else bucket_cap_mb * 2**20
    for bucket in _buckets([flat[i] for i in floating], cap):
        indices = [floating[j] for j in bucket]
        for i, reduced in zip(indices, _mean_flat([flat[i] for i in indices], group)):
            out[i] = reduced
    return _tree.unflatten(out, spec)


def sync_gradients(group: Any = None, bucket_cap_mb: float | None = 25.0) -> GradientTransformation:
    """The mean of the incoming gradients over all ranks: the first link of a data-parallel chain.

    ``ft.chain(ft.distributed.sync_gradients(), ft.adamw(...))`` on N ranks, each with its own
    1/N of the batch, takes the same step as ``ft.adamw`` on the whole batch in one process (for a
    mean-reduced loss). Gradients are summed with ``all_reduce`` and divided by the world size
    (gloo has no average), bucketed as in :func:`mean_over_ranks`.

    Args:
        group: the process group (default: the world).
        bucket_cap_mb: largest bucket in megabytes, or ``None`` for one collective per tensor.
    """
    _check_bucket_cap("sync_gradients", bucket_cap_mb)

    def init(params):
        _require_process_group("sync_gradients")
        del params
        return EmptyState()

    def update(updates, state, params=None, **extra):
        return mean_over_ranks(updates, group, bucket_cap_mb), state

    return GradientTransformation(init, update)


def full_tensors(tree: Any) -> Any:
    """``tree`` with every DTensor (a sharded state's params and optimiser state) gathered into a
    whole plain tensor; other leaves are kept. A collective: call it on every rank, e.g. to
    evaluate or export the trained weights in one process."""
    return _sharding.full_tensors(tree)


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` when not distributed)."""
    if world_size() == 1:
        return [obj]
    everyone: list[Any] = [None] * world_size()
    dist.all_gather_object(everyone, obj)
    return everyone


def barrier() -> None:
    """Waits for every rank (nothing to wait for when not distributed)."""
    if world_size() > 1:
        dist.barrier()


def mean_of_floats(values: Tensor) -> Tensor:
    """The mean over ranks of a tensor of values every rank computed (itself when not distributed):
    logged metrics, so every rank logs, and decides on, the same numbers."""
    if world_size() == 1:
        return values
    total = values.clone()
    dist.all_reduce(total)
    return total / world_size()


# ----------------------------------------------------------------------------- starting together


def check_same_structure_on_all_ranks(tree: Any, group: Any = None) -> None:
    """Raises ValueError, on every rank, when the ranks' trees differ in names, shapes or dtypes,
    naming the first differing entry and the ranks. Call it before training: a mismatch found
    later shows up as a hang or a shape error deep inside a collective."""
    _require_process_group("check_same_structure_on_all_ranks")
    mine = [(name, tuple(leaf.shape), str(leaf.dtype)) for name, leaf in _tree.named_leaves(tree)]
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    reference = everyone[0]
    for other_rank, theirs in enumerate(everyone[1:], start=1):
        if theirs == reference:
            continue
        for ours_entry, their_entry in zip(reference, theirs):
            if ours_entry != their_entry:
                raise ValueError(
                    f"ranks disagree on the parameters: rank 0 has {ours_entry}, rank {other_rank} has {their_entry}"
                )
        raise ValueError(
            f"ranks disagree on the parameters: rank 0 has {len(reference)} tensors, "
            f"rank {other_rank} has {len(theirs)}"
        )


def broadcast_state(state: Any, src: int = 0, group: Any = None) -> Any:
    """``state`` with every tensor replaced by rank ``src``'s value, after checking that all ranks
    hold the same structure: every rank then starts from the same params, buffers and optimiser state.
    The input is left untouched (new tensors are returned)."""
    check_same_structure_on_all_ranks(state, group)
    out = []
    for leaf in _tree.leaves(state):
        copy = leaf.detach().clone()
        dist.broadcast(copy, src=src, group=group)
        out.append(copy)
    return _tree.unflatten(out, _tree.structure(state))
