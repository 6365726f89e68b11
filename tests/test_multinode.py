"""Multi-node launch: two torchrun agents (two "nodes") on loopback meet through c10d rendezvous and
train a sharded model; the result equals one process on the combined batch.

Each agent is its own ``torchrun --nnodes=2 --node_rank=K`` process, as on two machines, so this
exercises what a single ``--standalone`` launch does not: the rendezvous of separate agents, global
ranks assigned across nodes, and (HSDP) a mesh whose replicate dimension spans the nodes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

import functrain as ft

from . import multinode_worker as worker
from .ranks import free_port

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))
WORKER = Path(__file__).with_name("multinode_worker.py")
LAUNCH_TIMEOUT_S = 180  # the whole launch; the ranks' collectives time out after worker.TIMEOUT_S

pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="no torchrun next to this Python")


def launch_two_nodes(out: Path, per_node: int, *worker_args: str) -> list[dict]:
    """Runs the worker under two torchrun agents (node ranks 0 and 1, ``per_node`` processes each)
    joined by c10d rendezvous on 127.0.0.1; returns every rank's result, in rank order."""
    out.mkdir(parents=True, exist_ok=True)
    common = [
        TORCHRUN,
        "--nnodes=2",
        f"--nproc_per_node={per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        f"--rdzv-id=functrain-test-{uuid.uuid4().hex[:12]}",
        "--max-restarts=0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::UserWarning"}
    agents = [
        subprocess.Popen(
            [*common, f"--node_rank={node}", str(WORKER), str(out), *worker_args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for node in (0, 1)
    ]
    outputs = []
    try:
        for agent in agents:
            outputs.append(agent.communicate(timeout=LAUNCH_TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for agent in agents:
            agent.kill()
        pytest.fail(f"the two-node launch did not finish within {LAUNCH_TIMEOUT_S} s")
    for node, (agent, output) in enumerate(zip(agents, outputs)):
        assert agent.returncode == 0, f"node {node} exited with {agent.returncode}:\n{output[-4000:]}"
    world = 2 * per_node
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(world)]


def max_relative_error(actual: dict, expected: dict) -> float:
    assert actual.keys() == expected.keys()
    return max(
        ((actual[k] - expected[k]).abs().max() / expected[k].abs().max().clamp_min(1e-30)).item() for k in actual
    )


def reference() -> tuple[dict, dict, torch.Tensor]:
    """One process on the combined batches: params, optimiser state (by leaf name) and losses."""
    state, losses = worker.train()
    return state.params, dict(ft._tree.named_leaves(state.opt_state)), losses


def check_equals_one_process(ranks: list[dict]) -> None:
    params, opt_state, losses = reference()
    for r in ranks:
        # float64: only the order of the sums over shards and ranks differs from one process
        assert max_relative_error(r["params"], params) < 1e-12
        assert max_relative_error(r["opt_state"], opt_state) < 1e-12
        assert torch.allclose(r["losses"], losses, rtol=1e-12, atol=0)


def test_two_nodes_one_process_each_train_sharded_equal_to_one_process(tmp_path):
    ranks = launch_two_nodes(tmp_path, 1)
    assert sorted((r["node"], r["local_rank"]) for r in ranks) == [(0, 0), (1, 0)]  # one rank on each node
    assert all(r["world"] == 2 and r["placements"] == "(Shard(dim=0),)" and r["local_rows"] == 4 for r in ranks)
    check_equals_one_process(ranks)


@pytest.mark.slow
def test_hsdp_replicated_across_two_nodes_sharded_within_each(tmp_path):
    ranks = launch_two_nodes(tmp_path, 2, "--hsdp")
    # torchrun numbers ranks node by node, so mesh row k (the shard group) is node k's processes
    assert [(r["node"], r["local_rank"]) for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["placements"] == "(Replicate(), Shard(dim=0))" and r["local_rows"] == 4 for r in ranks)
    check_equals_one_process(ranks)
