"""A compiled float32 run killed with SIGKILL and resumed in a fresh process, with an empty inductor cache, ends
bitwise equal to an uninterrupted run in a third process (DESIGN.md 2a): nothing timed while compiling changes a
default compiled step's numbers, and the kernels loaded from the checkpoint's compile-cache.bin equal those
compiled afresh."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.test_loop import assert_bitwise_equal

REPO = Path(__file__).resolve().parent.parent

# 64-64-10 MLP (three GEMMs forward, three backward: the input needs no gradient), AdamW, float32, compile=True.
# 160 samples in batches of 16: 10 steps per epoch, 30 in all. Checkpoints every 4 steps; with a kill step the
# process SIGKILLs itself after that step, so a resume restarts from the checkpoint before it, mid-epoch.
# ``favour`` stands in for the timing noise of a cold compile: it makes functrain's GEMM timing (which only
# ``cpu_gemm="fastest"`` runs) find oneDNN or ATen faster for every GEMM of this process.
SCRIPT = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
from torch import nn
import functrain as ft
from functrain import _gemm
from tests.test_loop import ShuffledLoader, classification

directory, out, kill_at, favour, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
_gemm.onednn_is_faster = lambda *operands: favour == "onednn"


class Kill(ft.Callback):
    def on_step_end(self, loop):
        if loop.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
g = torch.Generator().manual_seed(1)
loader = ShuffledLoader(torch.randn(160, 64, generator=g), torch.randint(0, 10, (160,), generator=g), batch_size=16)
tx = ft.adamw(lr=1e-2, weight_decay=1e-2)
step = ft.make_train_step(model, classification, tx, compile={{"precompile": cache == "precompile"}})
checkpoint = ft.callbacks.Checkpoint(directory, every_steps=4, every_epochs=None, keep=2, compile_cache=cache != "off")
state, history = ft.fit(
    step, ft.TrainState.create(model, tx), loader, epochs=3, callbacks=[Kill()], checkpoint=checkpoint,
    resume=True, log_every=5, device="cpu",
)
assert all(p.dtype == torch.float32 for p in state.params.values())
traced = any(k in torch._dynamo.utils.compilation_time_metrics for k in ("bytecode_tracing", "fullgraph_capture"))
torch.save({{"state": state, "history": history, "traced": traced}}, out)
"""


def run(
    tmp_path: Path, name: str, directory: Path, *, kill_at: int = 0, favour: str, cache: str = "on"
) -> subprocess.CompletedProcess:
    """Runs the script in a fresh process whose inductor and triton caches are new, empty directories (and
    whose FX graph and AOT autograd caches are off, but for a precompiled step): every graph is compiled cold,
    but for what the checkpoint's compile-cache.bin holds when ``cache="on"`` (the compiled kernels, FX graphs
    being off);
    ``cache="precompile"``: the step is built with ``compile={"precompile": True}``, and the file holds its trace."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT.format(repo=str(REPO))))
    caches = tmp_path / f"caches-{name}"
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
        "TRITON_CACHE_DIR": str(caches / "triton"),
        # (a precompiled step's trace is saved through these caches: torch cannot serialize it without them)
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1" if cache == "precompile" else "0",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1" if cache == "precompile" else "0",
    }
    out = tmp_path / f"out-{name}.pt"
    args = [sys.executable, str(script), str(directory), str(out), str(kill_at), favour, cache]
    return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_a_killed_compiled_run_resumes_bitwise_in_a_fresh_process_with_empty_caches(tmp_path):
    """Killed after step 13, resumed from step 12's checkpoint in a new process: params, buffers, optimiser state,
    step count and history bitwise equal to an uninterrupted run. The uninterrupted and killed processes' GEMM
    timings favour oneDNN, the resumed one's ATen; a default compiled step runs no timing, so it does not matter.
    Resumed twice from the same files: with the kernels the killed process saved beside its checkpoints (the
    default), and compiled from nothing (Checkpoint(compile_cache=False), the file removed). And a run with a
    precompiled step (compile={"precompile": True}), killed alike, resumes from its file without tracing at all."""
    full = run(tmp_path, "full", tmp_path / "ckpt-full", favour="onednn")
    assert full.returncode == 0, full.stderr
    directory = tmp_path / "ckpt"
    killed = run(tmp_path, "killed", directory, kill_at=13, favour="onednn")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "out-killed.pt").exists()
    assert sorted(p.name for p in directory.glob("step-*.pt")) == ["step-00000008.pt", "step-00000012.pt"]
    assert (directory / "compile-cache.bin").is_file()
    cold = tmp_path / "ckpt-cold"
    shutil.copytree(directory, cold)
    (cold / "compile-cache.bin").unlink()
    for name, folder, cache in [("resumed", directory, "on"), ("resumed-cold", cold, "off")]:
        resumed = run(tmp_path, name, folder, favour="aten", cache=cache)
        assert resumed.returncode == 0, resumed.stderr
    precompiled = tmp_path / "ckpt-precompiled"
    killed = run(tmp_path, "killed-precompiled", precompiled, kill_at=13, favour="onednn", cache="precompile")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run(tmp_path, "resumed-precompiled", precompiled, favour="aten", cache="precompile")
    assert resumed.returncode == 0, resumed.stderr
    assert not torch.load(tmp_path / "out-resumed-precompiled.pt", weights_only=True)["traced"]

    expected = torch.load(tmp_path / "out-full.pt", weights_only=True)
    for name in ("resumed", "resumed-cold", "resumed-precompiled"):
        result = torch.load(tmp_path / f"out-{name}.pt", weights_only=True)
        assert int(result["state"].step) == 30
        for key, param in expected["state"].params.items():
            assert torch.equal(result["state"].params[key], param), (name, key)
        assert_bitwise_equal(result["state"], expected["state"])  # every leaf: params, buffers, opt_state, step
        assert result["history"] == expected["history"]
