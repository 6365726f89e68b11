"""Runs a test scenario in N processes joined by gloo over loopback, as torchrun would."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import functrain as ft

# A collective that waits longer than this raises, so a broken scenario fails the test instead of hanging CI.
TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, scenario: Callable[[int], Any], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ft.distributed.init("gloo", rank=rank, world_size=world, timeout=TIMEOUT_S)
    try:
        torch.save(scenario(rank), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_on_ranks(scenario: Callable[[int], Any], world: int, out_dir: Path) -> list[Any]:
    """``[scenario(0), ..., scenario(world - 1)]``, each run in its own process (results must be
    tensors and plain containers); a failing rank fails the call with its traceback."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(world, free_port(), scenario, str(out_dir)), nprocs=world, join=True)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world)]
