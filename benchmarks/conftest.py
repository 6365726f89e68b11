"""Shared options and fixtures for the functrain benchmarks.

Options (each also read from an environment variable, the command line winning):

``--bench-scale {full,smoke}`` (``FUNCTRAIN_BENCH_SCALE``, default ``full``)
    ``full``: the optimiser updates run on ~1M, ~10M and ~100M float32 parameters shaped like a
    12-block transformer (see ``SCALES``), with 50, 20 and 10 timed rounds after 3 warm-up rounds.
    ``smoke``: the same size ids on a few hundred to a few thousand parameters and a single round, so
    that CI can run the whole suite with ``--benchmark-disable`` in seconds and the benchmarks cannot rot.
``--bench-device DEVICE`` (``FUNCTRAIN_BENCH_DEVICE``, default ``cpu``)
    Where the parameters live (``cpu``, ``cuda``, ``cuda:1``...). On CUDA every timed step ends with
    a synchronise, so the time is the step's, not its launch's.
``--bench-rounds N`` / ``--bench-warmup-rounds N``
    Override the scale's round counts (e.g. a quick full-size check with ``--bench-rounds 3``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from report import cpu_model  # the one reader of /proc/cpuinfo, shared with the table
from torch import Tensor


@dataclass(frozen=True)
class ParamSet:
    """A float32 parameter set shaped like a transformer (:func:`transformer_shapes`) for the update groups."""

    name: str  # the size's id in test ids and the report: "1M", "10M", "100M" (smoke keeps the ids, tiny shapes)
    layers: int  # transformer blocks
    width: int  # model width: every matrix is width x width
    rounds: int  # timed rounds at full scale: the big sets' steps are long and steady, the small ones' short and noisy

    @property
    def n_params(self) -> int:
        return self.layers * (4 * self.width * self.width + 8 * self.width)  # 4 matrices, 8 vectors a block

    @property
    def n_tensors(self) -> int:
        return 12 * self.layers


@dataclass(frozen=True)
class Scale:
    name: str
    rounds: int
    warmup_rounds: int
    param_sets: tuple[ParamSet, ...]  # the update groups' sizes, smallest first


SCALES = {
    # 12 blocks x (4 matrices + 8 vectors) = 144 tensors at every size, so the sweep changes the size of
    # each tensor, not the per-tensor overheads: 1,009,152, 9,676,800 and 99,671,040 parameters.
    "full": Scale(
        "full",
        rounds=15,
        warmup_rounds=3,
        param_sets=(
            ParamSet("1M", layers=12, width=144, rounds=50),
            ParamSet("10M", layers=12, width=448, rounds=20),
            ParamSet("100M", layers=12, width=1440, rounds=10),
        ),
    ),
    # 320, 2,304 and 8,704 parameters.
    "smoke": Scale(
        "smoke",
        rounds=1,
        warmup_rounds=0,
        param_sets=(
            ParamSet("1M", layers=1, width=8, rounds=1),
            ParamSet("10M", layers=2, width=16, rounds=1),
            ParamSet("100M", layers=2, width=32, rounds=1),
        ),
    ),
}
SIZE_IDS = tuple(s.name for s in SCALES["full"].param_sets)  # the same ids at every scale


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("functrain-bench", "functrain benchmark sizes")
    group.addoption(
        "--bench-scale",
        choices=sorted(SCALES),
        default=os.environ.get("FUNCTRAIN_BENCH_SCALE", "full"),
        help="problem size: full (~50M params, default) or smoke (tiny, for CI). Env: FUNCTRAIN_BENCH_SCALE.",
    )
    group.addoption(
        "--bench-device",
        default=os.environ.get("FUNCTRAIN_BENCH_DEVICE", "cpu"),
        help="torch device the parameters live on (default cpu). Env: FUNCTRAIN_BENCH_DEVICE.",
    )
    group.addoption("--bench-rounds", type=int, default=None, help="timed rounds (overrides the scale's).")
    group.addoption("--bench-warmup-rounds", type=int, default=None, help="warm-up rounds (overrides the scale's).")


_LOAD_AT_START: float | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _LOAD_AT_START
    _LOAD_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    # argparse's `choices` does not check a default that came from the environment.
    scale = config.getoption("--bench-scale")
    if scale not in SCALES:
        raise pytest.UsageError(f"--bench-scale / FUNCTRAIN_BENCH_SCALE must be one of {sorted(SCALES)}, got {scale!r}")
    for name in ("--bench-rounds", "--bench-warmup-rounds"):
        value = config.getoption(name)
        if value is not None and value < (1 if name == "--bench-rounds" else 0):
            raise pytest.UsageError(f"{name} must be {'>= 1' if name == '--bench-rounds' else '>= 0'}, got {value}")


@dataclass(frozen=True)
class BenchConfig:
    scale: Scale
    device: torch.device
    rounds: int
    warmup_rounds: int
    rounds_given: bool = False  # --bench-rounds was on the command line: it wins over a group's own count

    @property
    def smoke(self) -> bool:
        return self.scale.name == "smoke"

    def param_set(self, name: str) -> ParamSet:
        return next(s for s in self.scale.param_sets if s.name == name)

    def rounds_for(self, full_rounds: int) -> int:
        """A group's timed rounds: ``full_rounds`` at full scale (fast steps need more rounds for a
        steady median), the scale's count in smoke mode or when ``--bench-rounds`` is given."""
        return full_rounds if self.scale.name == "full" and not self.rounds_given else self.rounds


def _bench_config(config: pytest.Config) -> BenchConfig:
    scale = SCALES[config.getoption("--bench-scale")]
    rounds = config.getoption("--bench-rounds")
    warmup = config.getoption("--bench-warmup-rounds")
    return BenchConfig(
        scale=scale,
        device=torch.device(config.getoption("--bench-device")),
        rounds=scale.rounds if rounds is None else rounds,
        warmup_rounds=scale.warmup_rounds if warmup is None else warmup,
        rounds_given=rounds is not None,
    )


@pytest.fixture(scope="session")
def bench_config(pytestconfig: pytest.Config) -> BenchConfig:
    cfg = _bench_config(pytestconfig)
    if cfg.device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"--bench-device {cfg.device} but CUDA is not available")
    return cfg


# ----------------------------------------------------------------------------- machine description


def device_name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return "cpu"
    return str(device)


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Records, in the benchmark JSON, what report.py prints: read here, on the measured machine."""
    cfg = _bench_config(config)
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    machine_info["functrain_bench"] = {
        "scale": cfg.scale.name,
        "device": str(cfg.device),
        "device_name": device_name(cfg.device),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch_num_threads": torch.get_num_threads(),
        # Other processes' load skews timings on a small box: the 1-minute load average when the
        # session started and when the JSON was written (a quiet 2-core machine reads below 1).
        "load_average_start": _LOAD_AT_START,
        "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


# ----------------------------------------------------------------------------- parameter sets


def transformer_shapes(layers: int, width: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a pre-norm transformer with square matrices, in model order.

    Per block: two norms (weight and bias), attention in/out and MLP up/down projections, each a
    ``width x width`` matrix with a bias: 4 matrices and 8 vectors.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        block = f"blocks.{i}"
        for part in ("attn.in", "attn.out", "mlp.up", "mlp.down"):
            if part in ("attn.in", "mlp.up"):
                norm = f"{block}.norm{1 if part == 'attn.in' else 2}"
                shapes[f"{norm}.weight"] = (width,)
                shapes[f"{norm}.bias"] = (width,)
            shapes[f"{block}.{part}.weight"] = (width, width)
            shapes[f"{block}.{part}.bias"] = (width,)
    return shapes


def _random_tree(shapes: dict[str, tuple[int, ...]], std: float, seed: int, device: torch.device) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)  # CPU generator: the same numbers on every device
    return {name: (torch.randn(shape, generator=gen) * std).to(device) for name, shape in shapes.items()}


def clone_tree(tree: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: t.clone() for name, t in tree.items()}


# The update groups parametrize ``param_set`` indirectly with size ids:
# ``@pytest.mark.parametrize("param_set", SIZE_IDS, indirect=True)``. The fixture and the base trees
# built on it are module-scoped, so pytest orders the tests size by size and frees one size's trees
# (two float32 trees of 400 MB at 100M) before it builds the next size's.


@pytest.fixture(scope="module")
def param_set(request: pytest.FixtureRequest, bench_config: BenchConfig) -> ParamSet:
    """The parameter set named by the test's ``param_set`` id (``"1M"``, ``"10M"``, ``"100M"``)."""
    if not hasattr(request, "param"):
        raise pytest.UsageError('parametrize "param_set" indirectly with size ids, e.g. SIZE_IDS')
    return bench_config.param_set(request.param)


@pytest.fixture(scope="module")
def param_shapes(param_set: ParamSet) -> dict[str, tuple[int, ...]]:
    return transformer_shapes(param_set.layers, param_set.width)


@pytest.fixture(scope="module")
def base_params(param_shapes, bench_config) -> dict[str, Tensor]:
    """The size's initial float32 parameters (read-only: tests take :func:`params`)."""
    return _random_tree(param_shapes, std=0.02, seed=0, device=bench_config.device)


@pytest.fixture(scope="module")
def base_grads(param_shapes, bench_config) -> dict[str, Tensor]:
    """The size's gradients, one fixed set reused every step (read-only: tests take :func:`grads`)."""
    return _random_tree(param_shapes, std=1e-3, seed=1, device=bench_config.device)


@pytest.fixture
def params(base_params) -> dict[str, Tensor]:
    """A fresh copy of the initial parameters, so every entry starts from the same point."""
    return clone_tree(base_params)


@pytest.fixture
def grads(base_grads) -> dict[str, Tensor]:
    """A fresh copy of the gradients (an implementation that wrote into them would not leak)."""
    return clone_tree(base_grads)


# ----------------------------------------------------------------------------- running a step


@pytest.fixture
def run_steps(benchmark, bench_config: BenchConfig, param_set: ParamSet) -> Callable[..., None]:
    """``run_steps(step, **extra_info)`` times ``step()`` with ``benchmark.pedantic``, one call per round,
    on the test's parameter set: its rounds, and its size in ``extra_info`` (``param_set``, ``n_params``,
    ``n_tensors``, ``layers``, ``width``; ``extra_info`` may override ``n_params`` and ``n_tensors``
    for an entry that updates part of the set).

    ``step`` must carry its own state from call to call (a real training loop's trajectory). Under
    ``--benchmark-disable`` pytest-benchmark calls it exactly once, untimed.
    """

    def run(step: Callable[[], None], **extra_info) -> None:
        size = dict(
            param_set=param_set.name,
            n_params=param_set.n_params,
            n_tensors=param_set.n_tensors,
            layers=param_set.layers,
            width=param_set.width,
        )
        _time(benchmark, bench_config, step, rounds=bench_config.rounds_for(param_set.rounds), **size | extra_info)

    return run


@pytest.fixture
def time_step(benchmark, bench_config: BenchConfig) -> Callable[..., None]:
    """``time_step(step, rounds=None, warmup_rounds=None, **extra_info)``: as :func:`run_steps`, for
    benchmarks that bring their own model (``extra_info`` should give ``n_params``). ``rounds``
    is the group's full-scale round count (see :meth:`BenchConfig.rounds_for`)."""

    def run(step: Callable[[], None], rounds: int | None = None, warmup_rounds: int | None = None, **extra_info):
        _time(
            benchmark,
            bench_config,
            step,
            rounds=bench_config.rounds if rounds is None else bench_config.rounds_for(rounds),
            warmup_rounds=warmup_rounds,
            **extra_info,
        )

    return run


def _time(benchmark, cfg: BenchConfig, step: Callable[[], None], rounds=None, warmup_rounds=None, **extra) -> None:
    """One ``step()`` per round with ``benchmark.pedantic``; on CUDA each round ends with a synchronise."""
    device = cfg.device
    target = step
    if device.type == "cuda":

        def target() -> None:
            step()
            torch.cuda.synchronize(device)

        torch.cuda.synchronize(device)
    benchmark.extra_info.update(
        scale=cfg.scale.name, device=str(device), dtype="float32", torch_num_threads=torch.get_num_threads(), **extra
    )
    benchmark.pedantic(
        target,
        rounds=cfg.rounds if rounds is None else rounds,
        warmup_rounds=cfg.warmup_rounds if warmup_rounds is None else warmup_rounds,
        iterations=1,
    )


def torchopt_info() -> dict:
    """Which torchopt Adam kernel ran: its C++ extension (``torchopt._C``) is built against one
    torch ABI and, on another torch, fails to load; the accelerated op then runs in Python."""
    import torchopt

    try:
        import torchopt._C  # noqa: F401
    except ImportError:
        cxx = False
    else:
        cxx = True
    return {"torchopt_version": torchopt.__version__, "torchopt_cxx_op": cxx}


def compiled_in_place(tx) -> Callable[[dict, object, dict], None]:
    """``tx.update`` and ``ft.apply_updates`` under ``torch.compile(fullgraph=True, dynamic=False)``,
    written back into the params and state (in place), as a compiled train step does (static shapes
    too: SOAP's and PSGD's occasional work is then a branch taken only when due, _tree.when):
    ``compiled(params, state, grads)``."""
    import functrain as ft

    def update(params, state, grads):
        updates, new_state = tx.update(grads, state, params)
        new_params = ft.apply_updates(params, updates)
        for old, new in zip(ft._tree.leaves((params, state)), ft._tree.leaves((new_params, new_state))):
            old.copy_(new)

    return torch.compile(update, fullgraph=True, dynamic=False)
