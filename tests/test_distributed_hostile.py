"""ft.distributed.init: the collective timeout a stalled job fails within. Two gloo processes on
loopback, one of which stalls: the other must raise within the configured timeout, not wait for
gloo's 30-minute default. Every multi-process test has an outer deadline and kills what is left,
so it can never hang the suite."""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import functrain as ft

from .ranks import free_port
from .test_distributed import WORLD

TIMEOUT_S = 3.0
DEADLINE_S = 90.0  # the outer bound on one test: process start-up (spawn imports torch) included


def _stalling_rank(rank: int, port: int, out_dir: str, timeout_s: float) -> None:
    """Rank 1 stalls (never reaches the collective); rank 0 takes a data-parallel training step,
    whose gradient all-reduce must time out, and writes what happened."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ft.distributed.init("gloo", timeout=timeout_s, rank=rank, world_size=WORLD)
    if rank == 1:
        time.sleep(DEADLINE_S)  # the stalled rank: the test kills it
        return
    model = nn.Linear(4, 2)
    tx = ft.chain(ft.distributed.sync_gradients(), ft.sgd(lr=0.1))
    step = ft.make_train_step(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), tx)
    state = ft.TrainState.create(model, tx)
    start = time.monotonic()
    try:
        step(state, (torch.randn(3, 4), torch.tensor([0, 1, 0])))
        error = ""
    except Exception as caught:  # noqa: BLE001 - reported to the test
        error = f"{type(caught).__name__}: {caught}"
    result = {"error": error, "elapsed": time.monotonic() - start}
    with open(os.path.join(out_dir, "rank0.json"), "w") as f:
        json.dump(result, f)
    os._exit(0)  # a clean shutdown of the process group would wait for the stalled rank


def run_with_deadline(fn, args, result_path, deadline_s: float = DEADLINE_S) -> dict | None:
    """Starts ``fn`` on WORLD spawned ranks, waits until ``result_path`` exists or the deadline
    passes, then kills every rank still running. Returns the result, or None if none came."""
    context = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="spawn")
    try:
        deadline = time.monotonic() + deadline_s
        while not result_path.exists() and time.monotonic() < deadline:
            if not any(p.is_alive() for p in context.processes):
                break  # every rank ended (failed) without a result
            time.sleep(0.1)
        time.sleep(0.2)  # let the file's writer finish
        return json.loads(result_path.read_text()) if result_path.exists() else None
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(5)


def test_a_stalled_rank_makes_the_other_raise_within_the_configured_timeout(tmp_path):
    result = run_with_deadline(_stalling_rank, (free_port(), str(tmp_path), TIMEOUT_S), tmp_path / "rank0.json")
    assert result is not None, "rank 0 reported nothing (it failed to start, or hung past the deadline)"
    assert "Timed out" in result["error"] or "timeout" in result["error"].lower(), result
    # Within the configured timeout (plus slack for a loaded machine), far below gloo's 30 minutes.
    assert TIMEOUT_S - 0.5 <= result["elapsed"] <= TIMEOUT_S + 10, result


def test_init_passes_the_timeout_and_defaults_to_ten_minutes(monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: calls.append((args, kwargs)))
    ft.distributed.init()
    ft.distributed.init("gloo", timeout=3, rank=1, world_size=2, init_method="tcp://127.0.0.1:1234")
    ft.distributed.init("nccl", timeout=timedelta(minutes=2))
    assert ft.distributed.DEFAULT_TIMEOUT == 600.0
    (args0, kw0), (args1, kw1), (args2, kw2) = calls
    assert args0 == (None,) and kw0 == dict(init_method=None, timeout=timedelta(minutes=10), rank=-1, world_size=-1)
    assert args1 == ("gloo",) and kw1 == dict(
        init_method="tcp://127.0.0.1:1234", timeout=timedelta(seconds=3), rank=1, world_size=2
    )
    assert args2 == ("nccl",) and kw2["timeout"] == timedelta(minutes=2)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(timeout=0), ValueError, "timeout must be a number of seconds > 0"),
        (dict(timeout=-5.0), ValueError, "timeout must be"),
        (dict(timeout=float("nan")), ValueError, "timeout must be"),
        (dict(timeout=float("inf")), ValueError, "timeout must be"),
        (dict(timeout=timedelta(0)), ValueError, "timeout must be"),
        (dict(timeout="10"), TypeError, "timeout must be"),
        (dict(timeout=None), TypeError, "timeout must be"),
        (dict(backend=1), TypeError, "backend must be a str"),
        (dict(rank=2, world_size=2), ValueError, "rank must be an int in"),
        (dict(world_size=0), ValueError, "world_size must be an int >= 1"),
    ],
)
def test_bad_init_arguments_are_named_before_anything_starts(monkeypatch, kwargs, error, match):
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("init_process_group was called"))
    with pytest.raises(error, match=match):
        ft.distributed.init(**kwargs)


def test_init_twice_says_how_to_start_again(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("init_process_group was called"))
    with pytest.raises(RuntimeError, match="already initialised.*destroy_process_group"):
        ft.distributed.init("gloo")
