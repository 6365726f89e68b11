"""Whole training steps (forward, backward, AdamW): functrain's ``make_train_step`` against the
imperative ``opt.zero_grad(); loss.backward(); opt.step()`` loop, side by side in one run.

Every implementation of a group starts from the same model initialisation (one seed), takes the
same float32 batches in the same order, and carries its parameters and optimiser state from round
to round, as a training loop does. One round is one step (for ``ensemble``: one step of all K
models). AdamW is ``lr=1e-3, weight_decay=1e-2`` everywhere.

Entries (the ids report.py reads):

- ``functrain-eager`` / ``functrain-eager-inplace``: ``ft.make_train_step(model, loss_fn,
  ft.adamw(...))``, pure or ``inplace=True``.
- ``functrain-compiled`` / ``functrain-compiled-inplace``: the same with ``compile=True`` (one
  ``torch.compile(fullgraph=True)`` graph: forward, backward and update), every GEMM on ATen's
  kernels (MKL) as in the torch entries: the step's own gain, apart from the GEMM library's.
- ``functrain-compiled-inplace-fastest-gemm`` (mlp-step): the in-place compiled step opted in to
  functrain's GEMM choice (``compile={"cpu_gemm": "fastest"}``): each float32 GEMM runs on the
  faster of ATen's BLAS (MKL) and oneDNN, timed when the step compiles (``functrain/_gemm.py``).
  Its numbers depend on those timings (not bitwise across processes), hence an opt-in.
- ``torch-foreach`` / ``torch-fused``: ``torch.optim.AdamW(foreach=True)`` / ``(fused=True)`` with
  ``loss.backward()``; the better of the two is each group's baseline ("best torch eager").
- ``torch-compiled``: ``torch.compile(model)`` with fused AdamW (compiled imperative).
- ``torchopt``: ``torchopt.AdamW(model.parameters(), ..., use_accelerated_op=True)`` in the same
  ``loss.backward(); opt.step()`` loop (skipped when torchopt is not installed).

Groups: ``mlp-step`` (784-512-512-10, batch 256), ``mlp-gemms`` (the eight matrix products of one
mlp-step step alone, on ATen's ``mm``/``addmm`` and on oneDNN), ``cnn-bn-step`` (3 conv+BatchNorm+ReLU blocks,
32x32x3, batch 64), ``resnet18-32-step`` (torchvision resnet18, 10 classes, 32x32, batch 32),
``gpt-step`` (a GPT-2-style language model of 10.0M parameters, gpt.py: 6 blocks of width 256,
vocabulary 10240, 4 sequences of 64 tokens),
``ensemble`` (K=16 MLPs 64-128-128-10, batch 64: one vmapped compiled step against 16 sequential
steps), ``ensemble-tiny`` (the same with 32-64-64-10, batch 32), ``compile-time`` (time to the
first step, cold and warm compile cache, in subprocesses: step_compile_time.py) and
``step-memory`` (peak memory on a ~50M-parameter MLP, one subprocess per implementation:
step_memory.py) and ``step-recompiles`` (graphs compiled and recompiles over 40 scheduled training
steps with a compiled eval step every 5, in a subprocess: step_recompiles.py). The last three record
their numbers in ``extra_info``; their timing column is the subprocess's wall time and means little.

``--bench-scale smoke`` shrinks every model to a few units and one round, runs the eager entries,
runs the memory script once on a tiny model, and skips everything that compiles (10-60 s per graph
on a small CPU): CI checks that the suite runs, not its numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import gpt  # benchmarks/gpt.py: the gpt-step group's model
import pytest
import torch
import torch.nn.functional as F
from conftest import torchopt_info
from torch import Tensor, nn

import functrain as ft

LR, WEIGHT_DECAY = 1e-3, 1e-2
HERE = os.path.dirname(os.path.abspath(__file__))
COMPILE_SKIP = "compiles a graph (10-60 s on a small CPU): skipped at --bench-scale smoke"

FUNCTRAIN = ("functrain-eager", "functrain-eager-inplace", "functrain-compiled", "functrain-compiled-inplace")
TORCH = ("torch-foreach", "torch-fused", "torch-compiled")
TORCHOPT = ("torchopt",)


def loss_fn(model: nn.Module, batch) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


# ----------------------------------------------------------------------------- models


def mlp(widths: tuple[int, ...], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


def cnn_bn(channels: tuple[int, ...], classes: int = 10, seed: int = 0) -> nn.Module:
    """conv3x3+BatchNorm+ReLU blocks (the first keeps the size, the others halve it), global
    average pooling and a linear classifier."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip((3, *channels[:-1]), channels)):
        layers += [nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], classes))


def resnet18(seed: int = 0) -> nn.Module:
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10)


@dataclass(frozen=True)
class Problem:
    make_model: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one example's
    classes: int
    batch: int
    rounds: int  # timed rounds at full scale (fast steps need more for a steady median)
    loss: Callable[[nn.Module, tuple[Tensor, Tensor]], Tensor] = loss_fn
    # batches(device) -> the batches; None: float inputs of input_shape and integer class labels
    batches: Callable[[torch.device], list[tuple[Tensor, Tensor]]] | None = None


def problem(group: str, smoke: bool) -> Problem:
    if group == "mlp-step":
        widths = (8, 4, 4, 3) if smoke else (784, 512, 512, 10)
        return Problem(lambda: mlp(widths), (widths[0],), widths[-1], 8 if smoke else 256, rounds=60)
    if group == "cnn-bn-step":
        channels = (4, 4) if smoke else (32, 64, 128)
        side = 8 if smoke else 32
        return Problem(lambda: cnn_bn(channels), (3, side, side), 10, 4 if smoke else 64, rounds=20)
    if group == "resnet18-32-step":
        return Problem(resnet18, (3, 32, 32), 10, 2 if smoke else 32, rounds=15)
    if group == "gpt-step":
        cfg = gpt.SMOKE if smoke else gpt.FULL
        return Problem(
            lambda: gpt.gpt(cfg),
            (cfg.context,),
            cfg.vocab,
            cfg.batch,
            rounds=15,
            loss=gpt.lm_loss,
            batches=lambda device: gpt.token_batches(cfg, device),
        )
    raise KeyError(group)


def make_batches(p: Problem, device: torch.device, n: int = 4, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    if p.batches is not None:
        return p.batches(device)
    gen = torch.Generator().manual_seed(seed)  # CPU generator: the same batches on every device
    return [
        (
            torch.randn(p.batch, *p.input_shape, generator=gen).to(device),
            torch.randint(0, p.classes, (p.batch,), generator=gen).to(device),
        )
        for _ in range(n)
    ]


# ----------------------------------------------------------------------------- steppers


class Stepper:
    """A zero-argument step cycling through the batches and carrying its state; ``check`` asserts
    it trained (finite parameters that moved)."""

    def __init__(self, step: Callable[[tuple[Tensor, Tensor]], None], params: Callable[[], list[Tensor]], batches):
        self._step, self._params, self._batches = step, params, batches
        self.initial = [t.detach().clone() for t in params()]
        self.calls = 0

    def __call__(self) -> None:
        self._step(self._batches[self.calls % len(self._batches)])
        self.calls += 1

    def check(self) -> None:
        assert self.calls >= 1, "the step never ran"
        final = self._params()
        assert all(bool(torch.isfinite(p).all()) for p in final), "non-finite parameters after the steps"
        assert any(not torch.equal(a, b) for a, b in zip(final, self.initial)), "the step left the parameters unchanged"


# The compile options of ``*-fastest-gemm`` entries: functrain's GEMM selection opted in.
FASTEST_GEMMS = {"cpu_gemm": "fastest"}


def functrain_stepper(impl: str, model: nn.Module, batches, loss=loss_fn) -> Stepper:
    tx = ft.adamw(lr=LR, weight_decay=WEIGHT_DECAY)
    compile = (FASTEST_GEMMS if impl.endswith("fastest-gemm") else True) if "compiled" in impl else False
    step = ft.make_train_step(model, loss, tx, compile=compile, inplace="inplace" in impl)
    carry = {"state": ft.TrainState.create(model, tx)}

    def run(batch) -> None:
        carry["state"], _ = step(carry["state"], batch)

    return Stepper(run, lambda: list(carry["state"].params.values()), batches)


def torch_stepper(impl: str, model: nn.Module, batches, loss=loss_fn) -> Stepper:
    variant = {"foreach": True} if impl == "torch-foreach" else {"fused": True}
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, **variant)
    forward = torch.compile(model) if impl == "torch-compiled" else model
    model.train()

    def run(batch) -> None:
        opt.zero_grad()
        loss(forward, batch).backward()
        opt.step()

    return Stepper(run, lambda: [p.detach() for p in model.parameters()], batches)


def torchopt_stepper(impl: str, model: nn.Module, batches, loss=loss_fn) -> Stepper:
    """torchopt's object-oriented AdamW, used like torch.optim. ``use_accelerated_op=True`` is its
    fast path: a fused C++/CUDA Adam kernel where torchopt's extension loads, else torchopt's own
    in-place Python version of it (still faster than its default out-of-place transform chain)."""
    torchopt = pytest.importorskip("torchopt")
    opt = torchopt.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, use_accelerated_op=True)
    model.train()

    def run(batch) -> None:
        opt.zero_grad(set_to_none=True)  # torch.optim's default; torchopt's is to zero in place
        loss(model, batch).backward()
        opt.step()

    return Stepper(run, lambda: [p.detach() for p in model.parameters()], batches)


def make_stepper(impl: str, model: nn.Module, batches, loss=loss_fn) -> Stepper:
    if impl.startswith("functrain"):
        return functrain_stepper(impl, model, batches, loss)
    if impl == "torchopt":
        return torchopt_stepper(impl, model, batches, loss)
    return torch_stepper(impl, model, batches, loss)


def _skip_compiled_in_smoke(impl: str, bench_config) -> None:
    if bench_config.smoke and "compiled" in impl:
        pytest.skip(COMPILE_SKIP)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _run_group(group: str, impl: str, bench_config, time_step) -> None:
    _skip_compiled_in_smoke(impl, bench_config)
    p = problem(group, bench_config.smoke)
    model = p.make_model().to(bench_config.device)
    n_params = _n_params(model)
    stepper = make_stepper(impl, model, make_batches(p, bench_config.device), p.loss)
    extra = torchopt_info() if impl == "torchopt" else {}
    time_step(stepper, rounds=p.rounds, n_params=n_params, batch=p.batch, impl=impl, optimizer="adamw", **extra)
    stepper.check()


# ----------------------------------------------------------------------------- single-model groups


@pytest.mark.benchmark(group="mlp-step")
@pytest.mark.parametrize("impl", [*FUNCTRAIN, "functrain-compiled-inplace-fastest-gemm", *TORCH, *TORCHOPT])
def test_mlp_step(impl, bench_config, time_step):
    """MLP 784-512-512-10 (ReLU), batch 256, cross-entropy, AdamW: one step per round."""
    _run_group("mlp-step", impl, bench_config, time_step)


def mlp_gemms(x: Tensor, ws: list[Tensor], bs: list[Tensor], g3: Tensor, mm, addmm) -> None:
    """The eight matrix products of an mlp-step step, with the shapes and transposes autograd uses:
    three forward ``addmm``, then the input gradients of layers 3 and 2 and the three weight
    gradients (the input needs none)."""
    h1 = addmm(bs[0], x, ws[0].t())
    h2 = addmm(bs[1], h1, ws[1].t())
    addmm(bs[2], h2, ws[2].t())
    g2 = mm(g3, ws[2])
    g1 = mm(g2, ws[1])
    for g, h in ((g3, h2), (g2, h1), (g1, x)):
        mm(g.t(), h)


@pytest.mark.benchmark(group="mlp-gemms")
@pytest.mark.parametrize("impl", ["aten", "onednn"])
def test_mlp_gemms(impl, bench_config, time_step):
    """The floor under every mlp-step entry: its eight GEMMs alone (one round runs all eight), on
    ATen (MKL's sgemm, which eager torch, torch.compile, the torch entries and functrain's default
    compiled steps use) or oneDNN (which a compiled step opted in with ``compile={"cpu_gemm":
    "fastest"}`` chooses where it is faster; ``functrain/_gemm.py``)."""
    from functrain import _gemm

    if impl == "onednn" and not _gemm.onednn_available():
        pytest.skip("torch built without oneDNN")
    p = problem("mlp-step", bench_config.smoke)
    model = p.make_model().to(bench_config.device)
    ws = [m.weight.detach() for m in model if isinstance(m, nn.Linear)]
    bs = [m.bias.detach() for m in model if isinstance(m, nn.Linear)]
    x = make_batches(p, bench_config.device, n=1)[0][0]
    g3 = torch.randn(p.batch, ws[-1].shape[0], device=bench_config.device)
    if impl == "aten":
        mm, addmm = torch.mm, torch.addmm
    else:
        mm, addmm = _gemm.onednn_mm, lambda bias, a, b: _gemm.onednn_mm(a, b, bias)
    with torch.no_grad():
        time_step(lambda: mlp_gemms(x, ws, bs, g3, mm, addmm), rounds=p.rounds, batch=p.batch, impl=impl)


@pytest.mark.benchmark(group="cnn-bn-step")
@pytest.mark.parametrize(
    "impl", ["functrain-eager", "functrain-compiled", "functrain-compiled-inplace", *TORCH, *TORCHOPT]
)
def test_cnn_bn_step(impl, bench_config, time_step):
    """3 conv+BatchNorm+ReLU blocks (32, 64, 128 channels), 32x32x3, batch 64; the BatchNorm running
    statistics are part of the state (functrain threads them through the step)."""
    _run_group("cnn-bn-step", impl, bench_config, time_step)


@pytest.mark.benchmark(group="resnet18-32-step")
@pytest.mark.parametrize(
    "impl", ["functrain-eager", "functrain-compiled", "functrain-compiled-inplace", *TORCH, *TORCHOPT]
)
def test_resnet18_step(impl, bench_config, time_step):
    """torchvision resnet18(num_classes=10) on 32x32 inputs, batch 32."""
    if bench_config.smoke and impl != "functrain-eager":
        pytest.skip("11M parameters: at --bench-scale smoke only functrain-eager checks the torchvision model")
    _run_group("resnet18-32-step", impl, bench_config, time_step)


# functrain-eager-inplace is left out: mlp-step and step-memory measure it, and each entry here costs
# 18 rounds of a ~0.1 s step.
GPT_ENTRIES = ("functrain-eager", "functrain-compiled", "functrain-compiled-inplace", *TORCH, *TORCHOPT)


@pytest.mark.benchmark(group="gpt-step")
@pytest.mark.parametrize("impl", GPT_ENTRIES)
def test_gpt_step(impl, bench_config, time_step):
    """GPT-2-style language model (gpt.py, 9,998,336 parameters: vocabulary 10240, width 256, 6 blocks
    of 4 heads, context 64), 4 random sequences of 64 tokens, next-token cross-entropy."""
    _run_group("gpt-step", impl, bench_config, time_step)


# ----------------------------------------------------------------------------- ensembles

ENSEMBLE_K = 16
ENSEMBLE = (
    "functrain-vmap-compiled",
    "functrain-sequential-compiled",
    "functrain-vmap-eager",
    "torch-sequential-fused",
)


@pytest.mark.benchmark(group="ensemble")
@pytest.mark.parametrize("impl", ENSEMBLE)
def test_ensemble(impl, bench_config, time_step):
    """K=16 MLPs 64-128-128-10 (each its own initialisation), the same batch of 64 for all: one round
    steps all 16. ``functrain-vmap-*``: ``torch.func.vmap(step, in_dims=(0, None))`` over
    ``ft.stack_states`` (compiled: ``torch.compile(..., fullgraph=True)`` around the vmap);
    ``*-sequential-*``: 16 calls of one single-model step (functrain compiled) or 16
    ``loss.backward(); opt.step()`` loops (torch fused AdamW)."""
    smoke = bench_config.smoke
    _ensemble(impl, (8, 4, 4, 3) if smoke else (64, 128, 128, 10), 8 if smoke else 64, bench_config, time_step)


@pytest.mark.benchmark(group="ensemble-tiny")
@pytest.mark.parametrize("impl", ENSEMBLE)
def test_ensemble_tiny(impl, bench_config, time_step):
    """As ``ensemble`` with 16 MLPs 32-64-64-10 and batch 32: small enough that a sequential step is
    dominated by per-call overhead rather than arithmetic, where vmap gains most."""
    if bench_config.smoke:
        pytest.skip("the same code as the ensemble group, which runs at --bench-scale smoke")
    _ensemble(impl, (32, 64, 64, 10), 32, bench_config, time_step)


@pytest.mark.benchmark(group="ensemble-tutorial")
@pytest.mark.parametrize("impl", ENSEMBLE)
def test_ensemble_tutorial(impl, bench_config, time_step):
    """PyTorch's "Model ensembling" tutorial ported to training: 10 MLPs 784-128-128-10, each on its own
    minibatch of 64 (``in_dims=(0, 0)``), one AdamW step of all 10 per round."""
    smoke = bench_config.smoke
    _ensemble(
        impl, (8, 4, 4, 3) if smoke else (784, 128, 128, 10), 8 if smoke else 64, bench_config, time_step,
        k=10, own_batches=True,
    )  # fmt: skip


def _ensemble(
    impl: str, widths: tuple[int, ...], batch: int, bench_config, time_step, k: int = ENSEMBLE_K,
    own_batches: bool = False,
) -> None:  # fmt: skip
    """K models, one round steps them all; ``own_batches``: each model its own batch (else one for all)."""
    _skip_compiled_in_smoke(impl, bench_config)
    device = bench_config.device
    k = 2 if bench_config.smoke else k
    p = Problem(lambda: mlp(widths), (widths[0],), widths[-1], batch, rounds=40)
    models = [mlp(widths, seed=i).to(device) for i in range(k)]
    if own_batches:  # round r: model i trains on batch r*k + i
        singles = make_batches(p, device, n=4 * k)
        batches = [tuple(torch.stack(part) for part in zip(*singles[r * k : (r + 1) * k])) for r in range(4)]
    else:
        batches = make_batches(p, device)

    def of_model(batch, i):
        return tuple(t[i] for t in batch) if own_batches else batch

    tx = ft.adamw(lr=LR, weight_decay=WEIGHT_DECAY)
    if impl.startswith("functrain-vmap"):
        step = ft.make_train_step(models[0], loss_fn, tx, compile=impl.endswith("compiled"))
        vstep = ft.vmap(step, in_dims=(0, 0 if own_batches else None))
        carry = {"state": ft.stack_states([ft.TrainState.create(m, tx) for m in models])}

        def run(batch) -> None:
            carry["state"], _ = vstep(carry["state"], batch)

        stepper = Stepper(run, lambda: list(carry["state"].params.values()), batches)
    elif impl == "functrain-sequential-compiled":
        step = ft.make_train_step(models[0], loss_fn, tx, compile=True)
        states = [ft.TrainState.create(m, tx) for m in models]

        def run(batch) -> None:
            for i in range(k):
                states[i], _ = step(states[i], of_model(batch, i))

        stepper = Stepper(run, lambda: [t for s in states for t in s.params.values()], batches)
    else:
        steppers = [torch_stepper("torch-fused", m, batches) for m in models]

        def run(batch) -> None:
            for i, s in enumerate(steppers):
                s._step(of_model(batch, i))

        stepper = Stepper(run, lambda: [t for m in models for t in m.parameters()], batches)
    time_step(stepper, rounds=p.rounds, n_params=k * _n_params(models[0]), k=k, batch=batch, impl=impl)
    stepper.check()


# ----------------------------------------------------------------------------- a frozen backbone

FROZEN = (
    "functrain-partition-frozen",
    "functrain-requires-grad-false",
    "functrain-partition-undeclared",
    "torch-foreach",
)


@pytest.mark.benchmark(group="resnet18-frozen-step")
@pytest.mark.parametrize("impl", FROZEN)
def test_resnet18_frozen_backbone_step(impl, bench_config, time_step):
    """Fine-tuning resnet18's head alone (32x32, batch 32, AdamW on ``fc``), eager. ``partition-frozen``:
    ``ft.partition({"train": adamw, "frozen": ft.set_to_zero()}, labels)``, which declares the backbone
    frozen, so the step does not differentiate it; ``partition-undeclared``: the same transform with its
    declarations dropped (the backbone's full backward, what the issue measured); ``requires-grad-false``:
    the backbone's parameters ``requires_grad_(False)`` (not in the state at all), the reference;
    ``torch-foreach``: the same in ``loss.backward(); opt.step()``."""
    if bench_config.smoke and impl != "functrain-partition-frozen":
        pytest.skip("11M parameters: at --bench-scale smoke only one entry checks the group's code")
    p = problem("resnet18-32-step", bench_config.smoke)
    model = p.make_model().to(bench_config.device)
    batches = make_batches(p, bench_config.device)

    def head(name, _):
        return "train" if name.startswith("fc.") else "frozen"

    if impl in ("functrain-requires-grad-false", "torch-foreach"):
        for name, param in model.named_parameters():
            param.requires_grad_(head(name, param) == "train")
        stepper = functrain_stepper("functrain-eager", model, batches) if impl.startswith("functrain") else None
        stepper = stepper or torch_stepper(impl, model, batches)
    else:
        tx = ft.partition({"train": ft.adamw(lr=LR, weight_decay=WEIGHT_DECAY), "frozen": ft.set_to_zero()}, head)
        if impl.endswith("undeclared"):
            tx = ft.GradientTransformation(tx.init, tx.update, tx.update_and_apply)
        step = ft.make_train_step(model, loss_fn, tx)
        carry = {"state": ft.TrainState.create(model, tx)}

        def run(batch) -> None:
            carry["state"], _ = step(carry["state"], batch)

        stepper = Stepper(run, lambda: list(carry["state"].params.values()), batches)
    time_step(stepper, rounds=p.rounds, n_params=_n_params(model), batch=p.batch, impl=impl)
    stepper.check()


# ----------------------------------------------------------------------------- subprocess measurements


def _run_script(script: str, args: list[str], env: dict[str, str], timeout: float = 900) -> dict:
    cmd = [sys.executable, os.path.join(HERE, script), *args]
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.benchmark(group="compile-time")
@pytest.mark.parametrize(
    "impl", ["functrain-compiled", "functrain-compiled-inplace", "functrain-precompiled", "torch-compiled"]
)
def test_compile_time(impl, bench_config, benchmark):
    """Time to the first step of the mlp-step model: two fresh processes on one new, empty
    TORCHINDUCTOR_CACHE_DIR, cold (nothing cached) then warm (the first one's caches), and a third on
    another empty one that loads the file the cold process saved with ``ft.save_compile_cache``
    (``artifacts``: a resumed run, or the same script on another machine; for
    ``functrain-precompiled``, built with ``compile={"precompile": True}``, the file holds its trace too)."""
    _skip_compiled_in_smoke(impl, bench_config)
    if bench_config.device.type != "cpu":
        pytest.skip("measured on CPU only")
    runs = {}

    def measure() -> None:
        with (
            tempfile.TemporaryDirectory(prefix="functrain-inductor-") as cache,
            tempfile.TemporaryDirectory(prefix="functrain-empty-") as empty,
        ):
            env = {"TORCHINDUCTOR_CACHE_DIR": cache}
            saved = os.path.join(empty, "compile-cache.bin")
            runs["cold"] = _run_script("step_compile_time.py", ["--impl", impl, "--save-cache", saved], env)
            runs["warm"] = _run_script("step_compile_time.py", ["--impl", impl], env)
            runs["artifacts"] = _run_script(
                "step_compile_time.py",
                ["--impl", impl, "--load-cache", saved],
                {"TORCHINDUCTOR_CACHE_DIR": os.path.join(empty, "inductor")},
            )

    benchmark.pedantic(measure, rounds=1, iterations=1)
    cold, warm = runs["cold"], runs["warm"]
    benchmark.extra_info.update(
        impl=impl,
        scale=bench_config.scale.name,
        cold_s=cold["time_to_first_step_s"],
        warm_s=warm["time_to_first_step_s"],
        warm_over_cold=warm["time_to_first_step_s"] / cold["time_to_first_step_s"],
        artifacts_s=runs["artifacts"]["time_to_first_step_s"],
        artifacts=runs["artifacts"],
        import_s=warm["import_s"],
        fx_graph_cache=warm["fx_graph_cache"],
        autograd_cache=warm["autograd_cache"],
        cold=cold,
        warm=warm,
    )
    assert cold["fx_graph_cache"] and cold["autograd_cache"], "torch's compile caches are disabled"


MEMORY = (
    "torch-foreach",
    "torch-fused",
    "functrain-compiled-inplace",
    "functrain-compiled",
    "functrain-eager-inplace",
    "functrain-eager",
)
# At smoke scale one subprocess (a few seconds of imports) checks that the script still runs.
MEMORY_SMOKE = ("functrain-eager-inplace",)


@pytest.mark.benchmark(group="step-memory")
@pytest.mark.parametrize("impl", MEMORY)
def test_step_memory(impl, bench_config, benchmark):
    """Peak memory of AdamW steps on a 50.35M-parameter MLP (2048-4096-4096-4096-2048, batch 16),
    one fresh subprocess per implementation: step_memory.py (its docstring has the method)."""
    if bench_config.smoke and impl not in MEMORY_SMOKE:
        pytest.skip("one memory subprocess is enough at --bench-scale smoke")
    args = ["--impl", impl, "--scale", bench_config.scale.name, "--device", str(bench_config.device)]
    args += ["--warmup", "1", "--steps", "1"] if bench_config.smoke else ["--warmup", "3", "--steps", "5"]
    out = {}

    def measure() -> None:
        out.update(_run_script("step_memory.py", args, {"MALLOC_MMAP_THRESHOLD_": "65536"}))

    benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(out)
    assert out["finite"], "non-finite parameters after the steps"


RECOMPILES = ("functrain-compiled", "functrain-compiled-inplace")


@pytest.mark.benchmark(group="step-recompiles")
@pytest.mark.parametrize("impl", RECOMPILES)
def test_step_recompiles(impl, bench_config, benchmark):
    """Graphs compiled and recompiles over 40 compiled training steps of the mlp-step model, with a
    warm-up + cosine learning-rate schedule and a compiled eval step after every 5th step, in a fresh
    process: step_recompiles.py (its docstring has the method). Target: one train graph, one eval
    graph, no recompiles."""
    _skip_compiled_in_smoke(impl, bench_config)
    args = ["--impl", impl, "--scale", bench_config.scale.name, "--device", str(bench_config.device)]
    out = {}

    def measure() -> None:
        out.update(_run_script("step_recompiles.py", args, {}))

    benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(out)
    assert out["finite"], "non-finite parameters after the steps"
