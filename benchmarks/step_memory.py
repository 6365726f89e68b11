"""Peak memory of one training-step implementation, measured in a process of its own.

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/step_memory.py --impl torch-foreach

prints one JSON object. ``bench_step.py`` runs it once per implementation, in a fresh
subprocess each time, so that no implementation inherits another's allocations, caches or
compiled code.

Method (CPU):

1. ``import torch`` and ``functrain``; the resident set size (RSS, from ``/proc/self/statm``) is
   the *base*.
2. Build the model (a ~50M-parameter MLP, float32), its optimiser state and the batches; run
   ``--warmup`` steps (torch.optim's lazy state, torch.compile's compilation, first-call costs).
3. Reset the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``), start a thread that
   reads the RSS every ~1 ms, and run ``--steps`` steps.
4. The *peak* is the larger of the sampled maximum and the kernel's ``VmHWM`` (exact, when the
   reset worked); the result is ``peak - base``: what the model, its optimiser state, the step's
   temporaries and (for compiled steps) the compiled code and compiler's leftovers hold.

``MALLOC_MMAP_THRESHOLD_=65536`` must be in the environment when the process starts: glibc then
serves every block above 64 KiB with its own ``mmap`` and returns it to the OS on free, so RSS
follows live memory. Without it glibc raises its threshold dynamically after the first large free
and keeps later frees in its heap, and the RSS stays at the high-water mark of whatever ran
before. The script warns when the variable is missing.

On CUDA the peak is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (taken
after the warm-up) minus the allocation at the base: the caching allocator's view of live tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import functrain as ft  # noqa: E402

IMPLEMENTATIONS = (
    "torch-foreach",
    "torch-fused",
    "functrain-eager",
    "functrain-eager-inplace",
    "functrain-compiled",
    "functrain-compiled-inplace",
)
LR, WEIGHT_DECAY = 1e-3, 1e-2
# (widths, batch): full is 2048-4096-4096-4096-2048 = 50,350,080 parameters.
SIZES = {"full": ((2048, 4096, 4096, 4096, 2048), 16), "smoke": ((16, 32, 32, 16), 4)}
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def anon_rss_bytes() -> int:
    """Resident minus file-backed/shared pages: the process's own heap and mmap'd tensors, without
    the pages of torch's shared libraries that the first calls of new kernels fault in."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * PAGE


def _status_kib(field: str) -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def _reset_hwm() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Reads the RSS every ``interval`` seconds in a thread; ``peak`` is the largest reading.

    torch releases the GIL inside its kernels, so the thread samples while they run."""

    def __init__(self, interval: float = 1e-3):
        self.interval = interval
        self.peak = rss_bytes()
        self.peak_anon = anon_rss_bytes()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                fields = f.read().split()
            self.peak = max(self.peak, int(fields[1]) * PAGE)
            self.peak_anon = max(self.peak_anon, (int(fields[1]) - int(fields[2])) * PAGE)
            self.samples += 1
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.peak_anon = max(self.peak_anon, anon_rss_bytes())


def mlp(widths: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_step(impl: str, model: nn.Module):
    """A zero-argument-state step ``run(batch)`` and a function returning the current params."""
    if impl.startswith("torch-"):
        opt = torch.optim.AdamW(
            model.parameters(),
            lr=LR,
            weight_decay=WEIGHT_DECAY,
            **({"fused": True} if impl == "torch-fused" else {"foreach": True}),
        )

        def run(batch) -> None:
            opt.zero_grad()  # set_to_none: the gradients are freed here and rebuilt by backward
            loss_fn(model, batch).backward()
            opt.step()

        return run, lambda: [p.detach() for p in model.parameters()]
    tx = ft.adamw(lr=LR, weight_decay=WEIGHT_DECAY)
    step = ft.make_train_step(model, loss_fn, tx, compile="compiled" in impl, inplace=impl.endswith("inplace"))
    # The state holds the model's own tensors (no copy); the caller drops the model, so a pure step
    # frees the initial tensors once its first step has replaced them.
    carry = {"state": ft.TrainState.create(model, tx)}

    def run(batch) -> None:
        carry["state"], _ = step(carry["state"], batch)

    return run, lambda: list(carry["state"].params.values())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=IMPLEMENTATIONS, required=True)
    parser.add_argument("--scale", choices=sorted(SIZES), default="full")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the measurement")
    parser.add_argument("--steps", type=int, default=5, help="steps the peak is measured over")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    widths, batch_size = SIZES[args.scale]

    if cuda:
        torch.cuda.init()
        base = torch.cuda.memory_allocated(device)
    base_rss, base_anon = rss_bytes(), anon_rss_bytes()

    model = mlp(widths).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(batch_size, widths[0], generator=gen).to(device),
            torch.randint(0, widths[-1], (batch_size,), generator=gen).to(device),
        )
        for _ in range(2)
    ]
    run, current_params = make_step(args.impl, model)
    del model
    for i in range(args.warmup):
        run(batches[i % 2])
    if cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for i in range(args.steps):
            run(batches[i % 2])
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        result = {"method": "torch.cuda.max_memory_allocated", "base_bytes": base, "before_steps_bytes": before}
    else:
        before, before_anon = rss_bytes(), anon_rss_bytes()
        hwm_reset = _reset_hwm()
        with RssSampler() as sampler:
            for i in range(args.steps):
                run(batches[i % 2])
        hwm = _status_kib("VmHWM") if hwm_reset else None
        peak = max(sampler.peak, hwm or 0)
        result = {
            "method": "peak RSS (1 ms /proc/self/statm samples and VmHWM after clear_refs)",
            "base_bytes": base_rss,
            "before_steps_bytes": before,
            "sampled_peak_bytes": sampler.peak,
            "base_anon_bytes": base_anon,
            "before_steps_anon_bytes": before_anon,
            "peak_anon_bytes": sampler.peak_anon,
            "peak_anon_above_base_bytes": sampler.peak_anon - base_anon,
            "samples": sampler.samples,
            "vmhwm_bytes": hwm,
            "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        }
    params = current_params()
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    result.update(
        impl=args.impl,
        scale=args.scale,
        device=str(device),
        n_params=n_params,
        param_bytes=n_params * 4,
        warmup_steps=args.warmup,
        measured_steps=args.steps,
        peak_bytes=peak,
        peak_above_base_bytes=peak - (base if cuda else base_rss),
        finite=finite,
        torch_version=torch.__version__,
        torch_num_threads=torch.get_num_threads(),
    )
    return result


if __name__ == "__main__":
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        print("step_memory.py: MALLOC_MMAP_THRESHOLD_ is not set; RSS will overstate live memory", file=sys.stderr)
    print(json.dumps(main()))
