"""One rank of the sharded-training benchmark (issue 17): run under torchrun, one implementation per launch.

    OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=65536 torchrun --standalone --nproc-per-node=2 \\
        benchmarks/sharded_worker.py --impl functrain-eager --out /tmp/sharded

``bench_sharded.py`` launches it once per implementation and world size, in fresh processes each
time, so that no implementation inherits another's allocations, caches or compiled code; it then
compares the saved parameters across implementations and prints the table.

Every implementation trains the GPT of ``gpt.py`` from the same initialisation (seed 0 on every
rank) on the same batches: each step draws ``world x cfg.batch`` sequences and rank ``r`` takes the
``r``-th ``cfg.batch`` of them, so every rank does the work of the single-process ``gpt-step``
(weak scaling), and every implementation follows the gradient of the mean loss over the whole batch.
AdamW is ``lr=1e-3, weight_decay=1e-2``, default betas and eps, throughout.

Implementations (``--impl``):

- ``fsdp2``: the peer. ``fully_shard`` on each ``Block``, then on the root (the standard recipe;
  default ``reshard_after_forward``), ``torch.optim.AdamW`` (foreach, torch's default), and
  ``opt.zero_grad(); loss.backward(); opt.step()``.
- ``ddp``: a second torch implementation, for the numerics: ``DistributedDataParallel`` and the
  same ``torch.optim.AdamW``, every rank holding everything.
- ``functrain-eager`` / ``functrain-eager-inplace`` / ``functrain-compiled`` / ``functrain-compiled-inplace``:
  ``ft.TrainState.create(model, tx, mesh=mesh)`` and ``ft.make_train_step(model, lm_loss, tx,
  mesh=mesh, compile=..., inplace=...)`` with ``tx = ft.adamw(...)``.
- ``dp-eager`` / ``dp-compiled``: functrain's data-parallel path, every rank holding everything:
  ``ft.distributed.broadcast_state(ft.TrainState.create(model, tx))`` and
  ``tx = ft.chain(ft.distributed.sync_gradients(), ft.adamw(...))`` (bucketed all-reduce).

Per launch: ``--warmup`` untimed steps (torch.optim's lazy state, compilation), then ``--steps``
timed ones; ``warmup + steps`` is 10 by default, after which rank 0 saves the whole parameters
(``full_tensor`` of each shard) for the numerics. Each timed step starts after a barrier and ends
when this rank returns from it (after a ``cuda.synchronize`` on GPU); a step's time is the slowest
rank's. Memory (CPU) is the peak resident set size during the timed steps, sampled every ~1 ms
from ``/proc/self/statm`` and read from the kernel's ``VmHWM`` after resetting it (the method of
``step_memory.py``, whose sampler this uses), minus the RSS after the imports and the process group
(the *base*); ``MALLOC_MMAP_THRESHOLD_=65536`` makes glibc return freed blocks to the OS, so the
RSS follows live memory. On CUDA it is ``torch.cuda.max_memory_allocated`` over the timed steps
minus the allocation at the base. With ``--tensor-peak`` (CPU) the last untimed step also runs
under the profiler, for the tensor memory alone (:func:`tensor_peak_bytes`). Params + optimiser
state bytes are summed over each tensor's local part (``to_local()`` of a DTensor; a plain tensor
whole).

Rank 0 writes ``{out}/{impl}.json`` (the numbers of every rank) and ``{out}/{impl}.params.pt``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
from gpt import FULL, SMOKE, gpt, lm_loss, token_batches  # noqa: E402
from step_memory import RssSampler, _reset_hwm, _status_kib, anon_rss_bytes, rss_bytes  # noqa: E402

import functrain as ft  # noqa: E402

IMPLEMENTATIONS = (
    "fsdp2",
    "ddp",
    "functrain-eager",
    "functrain-eager-inplace",
    "functrain-compiled",
    "functrain-compiled-inplace",
    "dp-eager",
    "dp-compiled",
)
CONFIGS = {"full": FULL, "smoke": SMOKE}
LR, WEIGHT_DECAY = 1e-3, 1e-2
TIMEOUT_S = 300  # a collective that waits longer raises: a broken rank fails the launch instead of hanging it


def local_bytes(tensors) -> int:
    """Bytes this rank holds for ``tensors``: a DTensor's local shard, a plain tensor whole."""
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            local = t.to_local() if hasattr(t, "to_local") else t
            total += local.numel() * local.element_size()
    return total


def global_bytes(tensors) -> int:
    """Bytes of ``tensors`` unsharded (a DTensor's global shape)."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def make_fsdp2(model, mesh):
    """The peer: FSDP2 per block and at the root, torch.optim.AdamW (foreach)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return torch_optim(model, model)


def make_ddp(model, mesh):
    """A second torch implementation, to show how far two correct ones differ: DDP (gradients
    all-reduced in buckets, every rank holding everything) and the same torch.optim.AdamW."""
    from torch.nn.parallel import DistributedDataParallel

    return torch_optim(DistributedDataParallel(model), model)


def torch_optim(wrapped, model):
    """Training ``wrapped`` (``model`` as FSDP2 or DDP made it) with torch.optim.AdamW (foreach)."""
    opt = torch.optim.AdamW(wrapped.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def run(batch) -> None:
        opt.zero_grad()  # set_to_none: gradients are freed here and rebuilt by backward
        lm_loss(wrapped, batch).backward()
        opt.step()

    def params() -> dict:
        return dict(model.named_parameters())

    def state_tensors() -> list:
        return [p for p in model.parameters()] + [v for s in opt.state.values() for v in s.values()]

    def held_tensors() -> list:  # between steps: the gradients too, freed by the next zero_grad
        return state_tensors() + [p.grad for p in model.parameters() if p.grad is not None]

    return run, params, state_tensors, held_tensors


def make_functrain(impl, model, mesh):
    tx = ft.adamw(lr=LR, weight_decay=WEIGHT_DECAY)
    compile_ = "compiled" in impl
    if impl.startswith("dp-"):
        tx = ft.chain(ft.distributed.sync_gradients(), tx)
        state = ft.distributed.broadcast_state(ft.TrainState.create(model, tx))
        step = ft.make_train_step(model, lm_loss, tx, compile=compile_)
    else:
        state = ft.TrainState.create(model, tx, mesh=mesh)
        step = ft.make_train_step(model, lm_loss, tx, mesh=mesh, compile=compile_, inplace=impl.endswith("inplace"))
    # The step reads only the state; the module's own full parameters are dead weight from here on
    # (FSDP2 swaps them for shards), so free them as a user training a large model would.
    model.to("meta")
    carry = {"state": state}

    def run(batch) -> None:
        carry["state"], _ = step(carry["state"], batch)

    def params() -> dict:
        return dict(carry["state"].params)

    def state_tensors() -> list:
        return ft._tree.leaves(carry["state"].params) + ft._tree.leaves(carry["state"].opt_state)

    def held_tensors() -> list:
        return ft._tree.leaves(carry["state"])

    return run, params, state_tensors, held_tensors


def whole(params: dict) -> dict:
    """Every parameter whole, on CPU (collective for DTensors: every rank calls it)."""
    return {k: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu() for k, p in params.items()}


def tensor_peak_bytes(run: Callable, batch, held_tensors: Callable) -> int:
    """The most tensor memory live during ``run(batch)`` (CPU): the bytes of the tensors held when
    it begins (``held_tensors()``, local shards) plus the largest net allocation during it, from
    the profiler's allocation events (inductor's buffers included). Unlike the RSS it leaves out
    what is not a tensor: a compiled step's compiler, code and caches, which stay resident."""
    from torch.profiler import ProfilerActivity, profile

    held = local_bytes({id(t): t for t in held_tensors()}.values())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run(batch)
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    net = peak = 0
    for event in events:
        net += event.nbytes()
        peak = max(peak, net)
    return held + peak


def timed_steps(run: Callable, batches: list, device: torch.device) -> list[float]:
    times = []
    for batch in batches:
        dist.barrier()
        start = time.perf_counter()
        run(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=IMPLEMENTATIONS, required=True)
    parser.add_argument("--scale", choices=sorted(CONFIGS), default="full")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=7, help="timed steps (the numerics are after warmup + steps)")
    parser.add_argument("--out", required=True, help="directory rank 0 writes {impl}.json and {impl}.params.pt to")
    parser.add_argument(
        "--tensor-peak",
        action="store_true",
        help="CPU: profile the last untimed step's allocations (tensor_peak_bytes); the profiler "
        "aborted one rank in about a hundred launches on the CI machine, so it is opt-in",
    )
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1")

    cuda = args.device == "cuda"
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    ft.distributed.init("nccl" if cuda else "gloo", timeout=TIMEOUT_S)
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,))
    dist.barrier()
    base_rss, base_anon = rss_bytes(), anon_rss_bytes()
    base_cuda = torch.cuda.memory_allocated(device) if cuda else 0

    cfg = CONFIGS[args.scale]
    model = gpt(cfg).to(device)  # seed 0 on every rank: the same initialisation everywhere
    n_params = sum(p.numel() for p in model.parameters())
    everyone = dataclasses.replace(cfg, batch=cfg.batch * world)
    batches = [
        tuple(t.chunk(world)[rank] for t in b)
        for b in token_batches(everyone, device, n=args.warmup + args.steps, seed=1)
    ]
    if args.impl == "fsdp2":
        run, params, state_tensors, held_tensors = make_fsdp2(model, mesh)
    elif args.impl == "ddp":
        run, params, state_tensors, held_tensors = make_ddp(model, mesh)
    else:
        run, params, state_tensors, held_tensors = make_functrain(args.impl, model, mesh)

    warm_start = time.perf_counter()
    for batch in batches[: args.warmup - 1]:
        run(batch)
    if args.tensor_peak and not cuda:
        tensor_peak = tensor_peak_bytes(run, batches[args.warmup - 1], held_tensors)
    else:
        tensor_peak = None
        run(batches[args.warmup - 1])
    if cuda:
        torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - warm_start
    dist.barrier()

    if cuda:
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        times = timed_steps(run, batches[args.warmup :], device)
        peak = torch.cuda.max_memory_allocated(device)
        memory = {"peak_bytes": peak - base_cuda, "before_steps_bytes": before - base_cuda}
        method = "torch.cuda.max_memory_allocated over the timed steps minus the allocation at the base"
    else:
        before, before_anon = rss_bytes(), anon_rss_bytes()
        hwm_reset = _reset_hwm()
        with RssSampler() as sampler:
            times = timed_steps(run, batches[args.warmup :], device)
        hwm = _status_kib("VmHWM") if hwm_reset else None
        peak = max(sampler.peak, hwm or 0)
        memory = {
            "peak_bytes": peak - base_rss,
            "before_steps_bytes": before - base_rss,
            "peak_anon_bytes": sampler.peak_anon - base_anon,
            "before_steps_anon_bytes": before_anon - base_anon,
            "tensor_peak_bytes": tensor_peak,
        }
        method = "peak RSS over the timed steps (1 ms statm samples, VmHWM) minus the RSS at the base"

    tensors = state_tensors()
    mine = {
        "rank": rank,
        "times_s": times,
        "warmup_s": warmup_s,
        "state_bytes": local_bytes(tensors),
        "state_bytes_unsharded": global_bytes(tensors),
        **memory,
    }
    ranks: list = [None] * world
    dist.all_gather_object(ranks, mine)
    final = whole(params())
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        torch.save(final, os.path.join(args.out, f"{args.impl}.params.pt"))
        result = {
            "impl": args.impl,
            "scale": args.scale,
            "device": str(device),
            "world": world,
            "n_params": n_params,
            "steps_before_params": args.warmup + args.steps,
            "memory_method": method,
            "torch_num_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "finite": all(bool(torch.isfinite(p).all()) for p in final.values()),
            # a step's time is its slowest rank's
            "step_s": [max(r["times_s"][i] for r in ranks) for i in range(len(times))],
            "ranks": ranks,
        }
        with open(os.path.join(args.out, f"{args.impl}.json"), "w") as f:
            json.dump(result, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
