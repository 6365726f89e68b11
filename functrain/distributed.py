"""Data-parallel training over ``torch.distributed``: every rank runs the same step on its own
shard of the batch, and the gradients are averaged across ranks before the optimiser sees them.

.. code-block:: python

    torch.distributed.init_process_group("gloo")             # or "nccl"; torchrun sets the env
    tx = ft.chain(ft.distributed.sync_gradients(), ft.adamw(lr=1e-3))
    state = ft.distributed.broadcast_state(ft.TrainState.create(model, tx))   # rank 0's weights
    step = ft.make_train_step(model, loss_fn, tx, reduce_buffers=ft.distributed.mean_over_ranks)

The reduction uses traceable functional collectives (``torch.distributed._functional_collectives``),
so a compiled step stays one graph. gloo has no average, so gradients are summed and divided by the
world size. Because every rank then applies the same update to the same parameters, the optimiser
state stays identical on every rank without ever being communicated.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

try:  # traceable collectives (private, but DTensor and FSDP2 are built on them)
    import torch.distributed._functional_collectives as funcol
except ImportError:  # pragma: no cover - exercised by monkeypatching funcol
    funcol = None
from torch import Tensor

from . import _tree, _validate
from .base import EmptyState, GradientTransformation

_HOW_TO_START = (
    "no torch.distributed process group is initialised: launch with `torchrun --nproc_per_node=N script.py` "
    'and call torch.distributed.init_process_group("gloo") (CPU) or ("nccl") (GPU) before training'
)


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
