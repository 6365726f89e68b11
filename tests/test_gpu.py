"""The step on a CUDA device: equal to the CPU step, mixed precision, CUDA graphs. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import functrain as ft

from .test_step import assert_trees_equal, batches, classification, grad_scaler_run, mlp, run_steps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def to_cuda(batch):
    return tuple(t.cuda() for t in batch)


def test_cuda_step_equals_cpu_step_in_float64():
    model = mlp()
    tx = ft.adamw(lr=1e-2, weight_decay=0.1)
    data = batches(5)
    cpu, _ = run_steps(ft.make_train_step(model, classification, tx), ft.TrainState.create(model, tx), data)
    cuda_model = mlp().cuda()
    gpu, metrics = run_steps(
        ft.make_train_step(cuda_model, classification, tx),
        ft.TrainState.create(cuda_model, tx),
        [to_cuda(b) for b in data],
    )
    assert metrics["loss"].device.type == "cuda" and gpu.step.device.type == "cuda"
    assert_trees_equal({k: v.cpu() for k, v in gpu.params.items()}, cpu.params, rtol=1e-10)
    assert_trees_equal({k: v.cpu() for k, v in gpu.buffers.items()}, cpu.buffers, rtol=1e-10)


def test_cuda_bf16_autocast_keeps_fp32_master_weights():
    model = mlp(torch.float32, batchnorm=False).cuda()
    tx = ft.adamw(lr=1e-2)
    state, metrics = run_steps(
        ft.make_train_step(model, classification, tx, precision="bf16"),
        ft.TrainState.create(model, tx),
        [to_cuda(b) for b in batches(4, dtype=torch.float32)],
    )
    assert all(p.dtype == torch.float32 for p in state.params.values())
    assert torch.isfinite(metrics["loss"]).item()


def test_cuda_fp16_step_equals_grad_scaler():
    data = [to_cuda(b) for b in batches(6, dtype=torch.float32)]
    model = mlp(torch.float32, batchnorm=False).cuda()
    tx = ft.dynamic_loss_scale(ft.adam(lr=1e-2), init_scale=2.0**10, growth_interval=2)
    state, _ = run_steps(
        ft.make_train_step(model, classification, tx, precision="fp16"), ft.TrainState.create(model, tx), data
    )
    expected, scaler = grad_scaler_run(mlp(torch.float32, batchnorm=False).cuda(), data, "cuda")
    assert_trees_equal(state.params, expected, rtol=1e-5)
    assert state.opt_state.scale.item() == scaler.get_scale()


@pytest.mark.slow
def test_cuda_graphs_step_equals_eager_and_never_recompiles():
    model = mlp(torch.float32).cuda()
    tx = ft.inject_hyperparams(ft.adamw)(lr=1e-2)
    data = [to_cuda(b) for b in batches(6, dtype=torch.float32)]
    eager, _ = run_steps(ft.make_train_step(model, classification, tx), ft.TrainState.create(model, tx), data)
    step = ft.make_train_step(model, classification, tx, compile={"mode": "reduce-overhead"})
    state, _ = step(ft.TrainState.create(model, tx), data[0])
    with torch.compiler.set_stance("fail_on_recompile"):
        state, _ = run_steps(step, state, data[1:])
    assert_trees_equal(state.params, eager.params, rtol=1e-5)


def test_cuda_eval_step_loss_matches_module_in_eval_mode():
    model = mlp(torch.float32).cuda()
    tx = ft.sgd(lr=0.1)
    state = ft.TrainState.create(model, tx)
    batch = to_cuda(batches(1, dtype=torch.float32)[0])
    metrics = ft.make_eval_step(model, classification)(state, batch)
    model.eval()
    with torch.no_grad():
        expected = F.cross_entropy(model(batch[0]), batch[1])
    torch.testing.assert_close(metrics["loss"], expected)


def test_cuda_profiler_memory_snapshot_opens_as_the_allocators_history(tmp_path):
    """memory_snapshot=True: one pickle per kept window, holding the allocator's segments and the traced
    allocations of the steps (what pytorch.org/memory_viz reads)."""
    import pickle

    model = mlp().cuda()
    tx = ft.adamw(1e-3)
    step = ft.make_train_step(model, classification, tx)
    profiler = ft.callbacks.Profiler(tmp_path, wait=1, warmup=1, active=2, memory_snapshot=True)
    ft.fit(step, ft.TrainState.create(model, tx), [to_cuda(b) for b in batches(6)], steps=6, callbacks=[profiler])
    (snapshot,) = sorted(tmp_path.glob("*.memory.pickle"))
    data = pickle.loads(snapshot.read_bytes())
    assert data["segments"] and any(trace for trace in data["device_traces"]), sorted(data)
