"""Sharded parameters on DTensor (FSDP / ZeRO-3, and HSDP on a 2-D mesh), the SimpleFSDP way.

Each parameter is a ``DTensor`` over a ``DeviceMesh``; each rank holds 1/N of it (``Shard(0)``)
and the optimiser state ``tx.init`` builds from it is sharded the same way, so params and state
take 1/N of the memory per rank. The step gathers each parameter where the model needs it, as an
ordinary differentiable op::

    full = p.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])

whose backward is the reduce-scatter of the gradient: each rank gets the sum over ranks of its own
rows. The gradient then has the parameter's placements, and the optimiser runs on local shards.
DTensor's ops make the transforms that look at whole tensors exact (a global norm sums the
squares of every shard; a row or column mean reduces across ranks); the few that cannot be written
as such ops (Muon's Newton-Schulz iteration) gather the whole tensor with :func:`on_whole`.

Because the sharding is a pair of collectives inside one traced function (not module hooks, as
FSDP2's ``fully_shard``), ``torch.compile`` sees the whole step, communication included.

``torch.distributed.tensor`` is imported only when a mesh is used: a process that never shards
pays nothing for it, and no tensor can be a DTensor before it is imported.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor

from . import _tree

# Whole-tensor bytes per all-gather / reduce-scatter bucket (see gather_all): about one block of the
# benchmark GPT, as FSDP2 groups a block's params. With 25 MiB (DDP's cap) the step's peak memory
# was 5% higher (the backward holds a bucket's gradients and their concatenation) at the same speed.
BUCKET_BYTES = 4 * 2**20

# A 2-D mesh is HSDP: replicate over the first dimension (e.g. nodes), shard over the second.
HSDP_DIM_NAMES = ("replicate", "shard")


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (False, cheaply, when DTensor was never imported)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def has_dtensors(tree: Any) -> bool:
    return any(is_dtensor(t) for t in _tree.leaves(tree))


def check_mesh(owner: str, mesh: Any) -> Any:
    """``mesh``, checked: a 1-D DeviceMesh (FSDP), or a 2-D one named ``("replicate", "shard")`` (HSDP)."""
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise TypeError(
            f"{owner}: mesh must be a torch.distributed.device_mesh.DeviceMesh (e.g. "
            f'init_device_mesh("cpu", (world_size,))) or None, got {type(mesh).__name__}'
        )
    if mesh.ndim == 2 and mesh.mesh_dim_names != HSDP_DIM_NAMES:
        raise ValueError(
            f"{owner}: a 2-D mesh is HSDP and must be named {HSDP_DIM_NAMES} (replicate over the first dimension, "
            f"shard over the second), got mesh_dim_names={mesh.mesh_dim_names}"
        )
    if mesh.ndim not in (1, 2):
        raise ValueError(f"{owner}: mesh must be 1-D (FSDP) or 2-D (HSDP), got a {mesh.ndim}-D mesh")
    return mesh


def placements(t: Tensor, mesh: Any) -> list:
    """Where ``t`` lives on ``mesh``: its rows split over the shard dimension (``Shard(0)``) when
    the first dimension has at least one row per rank; otherwise (a 0-d tensor, a vector shorter
    than the mesh) a whole copy on every rank (``Replicate()``). On an HSDP mesh each replica
    group holds the whole tensor, sharded within the group."""
    from torch.distributed.tensor import Replicate, Shard

    shard_ranks = mesh.size(mesh.ndim - 1)
    inner = Shard(0) if t.ndim >= 1 and t.shape[0] >= shard_ranks else Replicate()
    return [Replicate()] * (mesh.ndim - 1) + [inner]


def shard(owner: str, params: dict[str, Tensor], mesh: Any) -> dict[str, Tensor]:
    """``params`` distributed over ``mesh`` from rank 0's values (each rank keeps its shard)."""
    from torch.distributed.tensor import distribute_tensor

    out = {}
    for name, p in params.items():
        if is_dtensor(p):
            raise ValueError(f"{owner}: parameter {name!r} is already a DTensor; pass a model with plain parameters")
        if p.is_complex():
            raise TypeError(
                f"{owner}: parameter {name!r} is complex ({p.dtype}); sharded training supports real parameters only"
            )
        where = placements(p, mesh)
        # A replicated tensor is broadcast into the tensor given (rank 0's is kept as the local
        # copy): give it a copy, or the model's own parameter would be overwritten on the other
        # ranks and written by an in-place step on every rank. Shards are new tensors already.
        whole = p.detach() if _is_sharded(where) else p.detach().clone()
        out[name] = distribute_tensor(whole, mesh, where)
    return out


def _is_sharded(where: Any) -> bool:
    return any(placement.is_shard() for placement in where)


def check_sharded(owner: str, params: dict[str, Tensor], mesh: Any) -> None:
    """Refuses a state whose params are not DTensors on ``mesh`` (a state built without ``mesh=``)."""
    for name, p in params.items():
        if not is_dtensor(p):
            raise ValueError(
                f"{owner}: parameter {name!r} is a plain tensor but the step was built with mesh=: build the state "
                "with ft.TrainState.create(model, tx, mesh=mesh)"
            )
        if p.device_mesh != mesh:
            raise ValueError(f"{owner}: parameter {name!r} lives on {p.device_mesh}, but the step was built for {mesh}")


def gather(p: Tensor) -> Tensor:
    """The whole of DTensor ``p`` as a plain tensor on every rank; its backward reduce-scatters the
    gradient (sums it over ranks, each keeping its rows), and all-reduces it where ``p`` is replicated."""
    from torch.distributed.tensor import Partial, Replicate

    ndim = p.device_mesh.ndim
    return p.redistribute(p.device_mesh, [Replicate()] * ndim).to_local(grad_placements=[Partial()] * ndim)


def gather_all(params: list[Tensor]) -> list[Tensor]:
    """:func:`gather` of every DTensor in ``params``, in one all-gather per bucket (params of one
    mesh, placements and dtype) instead of one per tensor; its backward is one reduce-scatter per bucket.

    Per-tensor collectives cost a round trip each and wait one after another: on the GPT benchmark
    (77 tensors, 2 gloo ranks) they were 60% of the step. Each shard is padded to the largest
    shard's rows (DTensor splits rows as ``torch.chunk`` does: the first ranks hold
    ``ceil(rows / N)`` each), the padded shards are laid end to end and gathered, and each whole
    tensor is cut out of the ``(N, bucket)`` result. Only differentiable tensor ops are used, so
    autograd derives the backward (``split``'s backward is one ``cat`` into a single bucket-sized
    gradient) and ``torch.compile`` traces it with the collectives inside.

    Every parameter is whole from here to its last use, in the backward pass for most: the
    callers bound that, eager by gathering each block as it runs (:class:`BlockGather`), compiled
    with a graph pass (:mod:`functrain._regather`).
    """
    out: list[Tensor | None] = [None] * len(params)
    for i, p in enumerate(params):
        if not _is_sharded(p.placements):
            out[i] = gather(p)  # replicated: its gradient is all-reduced on its own
    for indices in _buckets([i for i, whole in enumerate(out) if whole is None], params):
        for i, whole in zip(indices, _gather_bucket([params[i] for i in indices])):
            out[i] = whole
    return out


def gather_params(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """:func:`gather_all` of a ``{name: DTensor}`` dict."""
    return dict(zip(params, gather_all(list(params.values()))))


def _buckets(indices: list[int], params: list[Tensor]) -> list[list[int]]:
    """``indices`` in order, cut into runs of one mesh, placements and dtype of at most
    :data:`BUCKET_BYTES` whole bytes each (a larger tensor is a bucket of its own). Several buckets
    in the model's order let a later bucket's gather overlap the forward pass of the layers before
    it, and an earlier bucket's reduce-scatter overlap the rest of the backward pass."""
    buckets: list[list[int]] = []
    key = size = None
    for i in indices:
        p = params[i]
        this = (p.device_mesh, tuple(p.placements), p.dtype, p.device)
        nbytes = p.numel() * p.element_size()
        if buckets and this == key and size + nbytes <= BUCKET_BYTES:
            buckets[-1].append(i)
            size += nbytes
        else:
            buckets.append([i])
            key, size = this, nbytes
    return buckets


def _gather_bucket(params: list[Tensor]) -> list[Tensor]:
    """The whole tensors of ``params``: DTensors sharded by rows over the last mesh dimension, with
    the same placements and dtype."""
    import torch.distributed._functional_collectives as funcol
    from torch.distributed.tensor import Partial

    first = params[0]
    mesh, shard_dim = first.device_mesh, first.device_mesh.ndim - 1
    n = mesh.size(shard_dim)
    # On HSDP each replica group gathers its own copy; the gradient is then still a sum pending over
    # the replicas (Partial), which like_param all-reduces, tensor by tensor.
    grad_placements = [Partial()] * shard_dim + [first.placements[shard_dim]]
    padded, sizes = [], []
    for p in params:
        rows = -(-p.shape[0] // n)  # ceil: the rows of the largest shard
        local = p.to_local(grad_placements=grad_placements)
        if p.shape[0] % n:
            # Padded on every rank, even one whose shard is full: every rank builds the same graph,
            # so the ranks' backward passes issue the same collectives in the same order.
            local = torch.cat([local, local.new_zeros((rows - local.shape[0], *local.shape[1:]))])
        padded.append(local.reshape(-1))
        sizes.append(local.numel())
    all_gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
    gathered = all_gather(torch.cat(padded), 0, (mesh, shard_dim)).view(n, -1)
    wholes = []
    for p, part in zip(params, gathered.split(sizes, dim=1)):
        # (ranks, padded shard) -> (ranks * padded rows, ...) -> the tensor's own rows
        wholes.append(part.reshape(-1, *p.shape[1:])[: p.shape[0]])
    return wholes


def like_param(grad: Tensor | None, p: Tensor) -> Tensor:
    """``grad`` with ``p``'s placements (zeros when ``p`` did not take part in the loss)."""
    if grad is None:
        return torch.zeros_like(p)
    return grad if tuple(grad.placements) == tuple(p.placements) else grad.redistribute(p.device_mesh, p.placements)


def mean_over_mesh(values: Tensor, mesh: Any) -> Tensor:
    """The mean over every rank of ``mesh`` of ``values``, a plain tensor each rank computed."""
    import torch.distributed._functional_collectives as funcol

    total = values
    for dim in range(mesh.ndim):
        total = funcol.all_reduce(total, "sum", (mesh, dim))
    return total / mesh.size()


def mean_metrics(loss: Tensor, metrics: dict[str, Tensor], mesh: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss and 0-d metrics averaged over the mesh in one collective per mesh dimension;
    floating-point metrics keep their dtype, counts become the loss's dtype."""
    names = sorted(metrics)
    means = mean_over_mesh(torch.stack([loss, *(metrics[k].to(loss.dtype) for k in names)]), mesh)
    return means[0], {
        k: mean.to(metrics[k].dtype) if metrics[k].is_floating_point() else mean for k, mean in zip(names, means[1:])
    }


def on_whole(fn: Any, t: Tensor) -> Tensor:
    """``fn(t)`` for a function of a whole tensor (Muon's orthogonalisation): a sharded DTensor is
    gathered, ``fn`` runs on the whole tensor on every rank, and each rank keeps its own rows, so
    the result equals the unsharded one exactly. A plain tensor goes straight to ``fn``."""
    if not is_dtensor(t):
        return fn(t)
    from torch.distributed.tensor import DTensor, Replicate

    mesh = t.device_mesh
    whole = fn(t.full_tensor())
    # Replicate -> Shard keeps each rank's rows of its own copy: no communication.
    return DTensor.from_local(whole, mesh, [Replicate()] * mesh.ndim, run_check=False).redistribute(mesh, t.placements)


def full_tensors(tree: Any) -> Any:
    """``tree`` with every DTensor gathered into a plain tensor (collective: call on every rank)."""
    return _tree.map(lambda t: t.full_tensor() if is_dtensor(t) else t, tree)


# ----------------------------------------------------------------------------- gathering block by block


def gather_units(model: torch.nn.Module) -> list[str]:
    """The paths of ``model``'s gather units: each module with parameters that is an element of an
    ``nn.ModuleList`` or ``nn.Sequential`` (a transformer block, a ResNet block), outermost first:
    the modules FSDP2's recipe calls ``fully_shard`` on. Every other parameter (embeddings, the
    head, a final norm) belongs to the root, which is gathered before the forward pass."""
    units: list[str] = []

    def visit(prefix: str, module: torch.nn.Module) -> None:
        container = isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential))
        for name, child in module.named_children():
            if container and next(child.parameters(), None) is not None:
                units.append(prefix + name)
            else:
                visit(f"{prefix}{name}.", child)

    visit("", model)
    return units


def run_gathered(run: Any, model: torch.nn.Module, params: dict[str, Tensor]) -> Any:
    """``run(whole_params)``, the forward pass of ``model`` (a step's stateless copy) on the whole
    of the DTensors ``params``: eager, each block gathered as it runs (:class:`BlockGather`);
    compiled, every block traced as gathered up front in a bucket of its own (module and
    saved-tensor hooks are eager's), and the compiled step's graph pass
    (:data:`functrain._regather.REGATHER_PASS`) moves each gather to the block and gathers again
    for its backward pass."""
    units = gather_units(model)
    if torch.compiler.is_compiling():
        return run(gather_by_unit(units, params))
    try:
        with BlockGather(model, units, params) as blocks:
            out = run(blocks.root())
    except RuntimeError as error:
        if "mixed torch.Tensor and DTensor" not in str(error):
            raise
        raise _used_outside(units) from error
    if has_dtensors(out):
        raise _used_outside(units)
    return out


def gather_by_unit(units: list[str], params: dict[str, Tensor]) -> dict[str, Tensor]:
    """:func:`gather_params` with the root's parameters and each unit's in buckets of their own,
    as the compiled step gathers them: there, :data:`functrain._regather.REGATHER_PASS` moves
    each unit's gather to the unit and repeats it for the unit's backward pass."""
    out = {}
    for names in by_unit(units, params).values():
        out.update(zip(names, gather_all([params[k] for k in names])))
    return {k: out[k] for k in params}


def by_unit(units: list[str], names: Any) -> dict[str, list[str]]:
    """``names`` grouped by the unit they belong to, in order; ``""``: the root's."""
    groups: dict[str, list[str]] = {}
    for name in names:
        unit = next((u for u in units if name.startswith(u + ".")), "")
        groups.setdefault(unit, []).append(name)
    return groups


def _used_outside(units: list[str]) -> ValueError:
    """The error for a block's parameter used outside the block's ``forward``, where it is a shard."""
    return ValueError(
        f"a parameter of a block ({', '.join(units)}) was used outside that block's forward (a weight tied to "
        "another module, or loss_fn reading model.<block>.<param>): a sharded step gathers each block's parameters "
        "only while the block runs, as FSDP2 does. Use the parameter inside its block, or keep it outside the "
        "nn.ModuleList / nn.Sequential"
    )


class BlockGather:
    """Gathers each unit's parameters when the unit runs and frees them after it, in the forward
    pass and again in the backward pass: FSDP2's memory (one block whole at a time, besides the
    root), with the step's own collectives.

    Eager steps only. Module forward pre-hooks on the step's own stateless copy swap the unit's
    whole tensors in (``gather_all``: differentiable, its backward reduce-scatters), and the
    post-hooks swap the shards back, so nothing but autograd holds the whole tensors afterwards.
    Autograd would keep them all until the backward pass (a linear layer saves its weight), so a
    saved-tensor hook stores a recipe instead (unit, which whole tensor, its view) and the backward
    pass gathers the unit again when it first needs it, and drops it when its last saved view has
    been used. A saved view whose tensor is still alive (a second derivative taken inside the
    unit) is given back as it is; one unpacked while grad mode is on (``create_graph=True``) is
    gathered differentiably, so second derivatives reach the shards too.

    Every rank must run the same units in the same order (as with FSDP2): a unit's gather is a
    collective. A parameter of a unit used outside that unit's ``forward`` is still a shard there,
    and the error says so.
    """

    def __init__(self, model: torch.nn.Module, units: list[str], params: dict[str, Tensor]):
        self.model = model
        self.params = params
        groups = by_unit(units, params)
        self.members = {u: groups.get(u, []) for u in units}
        self.root_names = groups.get("", [])
        self.live: dict[int, tuple[str, int, Any]] = {}  # storage address -> (unit, index, weakref)
        self.regathered: dict[str, list[Tensor]] = {}  # in the backward pass
        self.pending: dict[str, int] = {}  # saved views not yet unpacked, per unit
        self.handles: list[Any] = []

    def root(self) -> dict[str, Tensor]:
        """The params for ``functional_call``: the root's gathered now, the units' still shards."""
        out = dict(self.params)
        out.update(zip(self.root_names, gather_all([self.params[k] for k in self.root_names])))
        return out

    def __enter__(self) -> BlockGather:
        for unit, names in self.members.items():
            if names:
                module = self.model.get_submodule(unit)
                self.handles.append(module.register_forward_pre_hook(self._before(unit, names)))
                self.handles.append(module.register_forward_hook(self._after(unit, names)))
        self.saved = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self.saved.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.saved.__exit__(*exc)
        for handle in self.handles:
            handle.remove()
        # No cycles through the hooks: the backward's saved views are then all that keeps this
        # object (and the units it gathers again) alive, and it goes with them.
        del self.saved, self.handles
        self.live.clear()

    def _swap(self, unit: str, names: list[str], tensors: list[Tensor]) -> None:
        module = self.model.get_submodule(unit)
        for name, t in zip(names, tensors):
            owner, _, attr = name[len(unit) + 1 :].rpartition(".")
            module.get_submodule(owner)._parameters[attr] = t

    def _before(self, unit: str, names: list[str]):
        import weakref

        def hook(module: torch.nn.Module, args: Any) -> None:
            wholes = gather_all([self.params[k] for k in names])
            for i, whole in enumerate(wholes):
                self.live.setdefault(_address(whole), (unit, i, weakref.ref(whole)))
            self._swap(unit, names, wholes)

        return hook

    def _after(self, unit: str, names: list[str]):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            self._swap(unit, names, [self.params[k] for k in names])
            # The addresses may be reused once these tensors are freed: forget them.
            self.live = {a: v for a, v in self.live.items() if v[0] != unit}

        return hook

    def _pack(self, t: Tensor) -> Any:
        found = self.live.get(_address(t)) if self.live else None
        if found is None or found[2]() is None or found[2]().dtype != t.dtype:
            return t
        unit, i, ref = found
        self.pending[unit] = self.pending.get(unit, 0) + 1
        return (unit, i, ref, tuple(t.shape), t.stride(), t.storage_offset())

    def _unpack(self, packed: Any) -> Tensor:
        if isinstance(packed, Tensor):
            return packed
        unit, i, ref, shape, stride, offset = packed
        whole = ref()
        if whole is None:
            if torch.is_grad_enabled():  # create_graph: the view must depend on the shards
                whole = gather_all([self.params[k] for k in self.members[unit]])[i]
            else:
                if unit not in self.regathered:
                    with torch.no_grad():
                        self.regathered[unit] = gather_all([self.params[k] for k in self.members[unit]])
                whole = self.regathered[unit][i]
        self.pending[unit] -= 1
        if self.pending[unit] == 0:
            self.regathered.pop(unit, None)
        return whole.as_strided(shape, stride, offset)


def _address(t: Tensor) -> int | None:
    """Where ``t``'s storage starts; None for a tensor without one of its own (a DTensor, a
    tensor whose storage was freed, a meta tensor)."""
    if is_dtensor(t) or t.device.type == "meta" or t.layout != torch.strided:
        return None
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:  # "invalid python storage": saved tensors of some ops are storage-less
        return None
