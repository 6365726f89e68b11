"""One rank of the multi-node test (tests/test_multinode.py), launched by torchrun.

Trains a tiny float64 model sharded over every rank (a 1-D mesh: FSDP; ``--hsdp``: a 2-D mesh named
``("replicate", "shard")``, replicated across nodes and sharded within each) with AdamW, each rank
on its own part of every batch, and saves the gathered params, the metrics and where it ran to
``OUT/rank<RANK>.pt``. The test computes the same training in one process on the combined batches.

    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=1 --rdzv-backend=c10d \\
        --rdzv-endpoint=127.0.0.1:PORT --rdzv-id=ID tests/multinode_worker.py OUT
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft

STEPS = 3
BATCH = 8  # rows per step, split over the ranks
TIMEOUT_S = 60  # a rank that stalls makes the others raise instead of hanging the test


def make_model() -> nn.Module:
    """8 rows (sharded over 2 and 4 ranks), 5 (unevenly), 1 (replicated)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 1)).to(torch.float64)


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(BATCH, 6, generator=g, dtype=torch.float64),
            torch.randn(BATCH, 1, generator=g, dtype=torch.float64),
        )
        for _ in range(STEPS)
    ]


def loss_fn(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def make_tx():
    return ft.adamw(lr=0.05, weight_decay=0.1)


def train(mesh=None, rank: int = 0, world: int = 1):
    """The state after STEPS steps and each step's loss; with ``mesh``, this rank's part of each batch."""
    model, tx = make_model(), make_tx()
    state = ft.TrainState.create(model, tx, mesh=mesh)
    step = ft.make_train_step(model, loss_fn, tx, mesh=mesh)
    losses = []
    for batch in batches():
        state, metrics = step(state, tuple(t.chunk(world)[rank] for t in batch))
        losses.append(metrics["loss"])
    return state, torch.stack(losses)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--hsdp", action="store_true", help="a (nodes, processes per node) mesh")
    args = parser.parse_args()
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    ft.distributed.init("gloo", timeout=TIMEOUT_S)
    rank, world = ft.distributed.rank(), ft.distributed.world_size()
    per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    if args.hsdp:
        mesh = init_device_mesh("cpu", (world // per_node, per_node), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world,))
    state, losses = train(mesh, rank, world)
    result = {
        "params": ft.distributed.full_tensors(state.params),
        "opt_state": dict(ft._tree.named_leaves(ft.distributed.full_tensors(state.opt_state))),
        "losses": losses,
        "local_rows": state.params["0.weight"].to_local().shape[0],
        "placements": str(state.params["0.weight"].placements),
        "world": world,
        "node": int(os.environ["GROUP_RANK"]),  # which torchrun agent (node) this rank belongs to
        "local_rank": int(os.environ["LOCAL_RANK"]),
    }
    torch.save(result, os.path.join(args.out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
