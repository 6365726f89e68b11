"""The frontier optimisers' update alone (issue 18): functrain against HeavyBall and pytorch-optimizer.

One group per optimiser (``soap-update``, ``psgd-kron-update``, ``ademamix-update``, ``adopt-update``,
``prodigy-update``), each at two parameter sets shaped like a transformer (:data:`SETS`): ``10M``
(3 blocks of width 512: 9,457,152 parameters in 48 tensors) and ``100M`` (8 blocks of width 1024:
100,769,792 parameters in 128 tensors). A block has four ``width x width`` attention matrices, an MLP
of ``4 width x width`` and ``width x 4 width`` (1024x4096 and 4096x1024 at 100M), their biases and
two LayerNorms' weight and bias. Entries, side by side in one run:

- ``functrain``: ``params, state = ft.update_and_apply(tx, grads, state, params)`` (eager, pure: what
  an eager train step runs).
- ``functrain-compiled``: ``tx.update`` and ``ft.apply_updates`` under ``torch.compile(fullgraph=True)``,
  written back into the params and state (in place), as a compiled train step does (the pattern of
  bench_optimiser_update.py). The entry counts the graphs dynamo compiles over its whole run (warm-up
  and timed rounds, the learning rate moving every step) and asserts one graph and 0 recompiles.
- ``heavyball-compiled``: HeavyBall 3.2.1's class (``heavyball.SOAP``, ``PSGDKron``, ``AdEMAMix``,
  ``ADOPT``) with its own compilation on, as it ships: its fused kernels are ``torch.compile``d in
  ``heavyball.utils.compile_mode`` (``"max-autotune-no-cudagraphs"``). ``.grad`` set before each
  ``opt.step()`` (HeavyBall consumes the gradient: it sets ``.grad = None``).
- ``pytorch-optimizer``: pytorch-optimizer 4.1.0's class (``SOAP``, ``Kron``, ``AdEMAMix``,
  ``ADOPT``, ``Prodigy``), ``foreach=True`` where it has the switch; eager (it has no compiled path).
- ``prodigyopt`` (prodigy only): ``prodigyopt.Prodigy`` 1.1.2, the reference implementation.

The peers are HeavyBall (no Prodigy there) and pytorch-optimizer, plus prodigyopt for prodigy; the
figure of merit is ``functrain-compiled``'s median over the fastest peer's (``python
benchmarks/bench_frontier.py RUN.json...`` prints it, median and range over runs). Every entry takes
the same float32 parameters and gradients (one fixed set, reused each step) and the same learning
rate schedule: ``warmup_cosine`` from half the optimiser's learning rate to all of it over 5 steps,
then cosine decay over 1000, so that it moves every step (functrain takes the schedule as its ``lr``;
the peers get ``group["lr"] = schedule(step)`` before each ``opt.step()``). Hyperparameters (same on
every side, written out in :data:`OPTIMISERS`): SOAP ``betas=(0.95, 0.95), shampoo_beta=0.95,
weight_decay=0.01, precondition_frequency=10, max_precond_dim=2048``, no 1-D preconditioning, no
merged dimensions: a 4096 side is not preconditioned (the 1024 sides get 1024x1024 eigenbases), set
alike on both sides since the defaults differ (HeavyBall: frequency 2, 2048; pytorch-optimizer: 10,
10000); PSGD-Kron ``b1=0.9``, preconditioner updated every step (probability 1.0: HeavyBall's default
schedule for the first 1000 steps), triangular factors up to 2048 (a 4096 side is diagonal);
AdEMAMix ``betas=(0.9, 0.999, 0.9999), alpha=5``; ADOPT ``betas=(0.9, 0.9999), eps=1e-6``; Prodigy
``lr=1.0, betas=(0.9, 0.999), d0=1e-6``.

Each entry also checks that it computes the reference's steps: after its first two steps (see
:data:`PARITY_STEPS`), the change of three tensors (the first attention matrix, the first MLP
up-projection and its bias) must equal the reference peer's: the implementation the functrain
optimiser's parity tests use (HeavyBall for SOAP and PSGD-Kron, pytorch-optimizer for AdEMAMix and
ADOPT, prodigyopt for Prodigy), to :data:`PARITY_RTOL`. The reference entries run first in each
group and leave their change for the others to compare with; the other peer's difference is
recorded, not checked (``first_step_rel_diff`` in ``extra_info``).

``--bench-scale smoke`` runs every entry on one tiny block (widths 4 and 8) for two untimed steps in
float64, so that the parity check is tight (1e-6); it skips ``functrain-compiled`` and runs HeavyBall
with its compilation off (``heavyball.utils.compile_mode = None`` around its steps: the same code,
eager), each of which compiles for tens of seconds. Optimisers functrain does not have yet are
skipped by name.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import statistics
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from unittest import mock

import pytest
import torch
from conftest import compiled_in_place
from torch import Tensor

import functrain as ft

COMPILE_SKIP = "compiling takes tens of seconds: not at --bench-scale smoke"
WARMUP_STEPS, DECAY_STEPS, WARMUP_FROM = 5, 1000, 0.5
# max |change - reference change| / max |reference change| after PARITY_STEPS steps, per checked tensor,
# by dtype. float64 (the smoke run): rounding. float32 (the full run): rounding for the elementwise
# optimisers; SOAP's and PSGD's eigen- and triangular solves of the Gram matrices of small gradients
# amplify float32 rounding to ~1e-2 between two correct implementations, so there the full run checks
# that the two compute the same algorithm and the smoke run checks that they agree. Differences within
# one rounding of the parameter itself (its dtype's eps times its magnitude, elementwise) are not
# counted: a float32 step much smaller than the weight is a few hundred of the weight's ulps (Prodigy's
# first steps, d0=1e-6, on weights of 0.02: one rounding of p + u is 5e-4 of the step, and functrain
# and prodigyopt, which round p + u in different orders, differ by exactly that; in float64 they agree
# to 9e-13).
PARITY_RTOL = {torch.float64: 1e-6, torch.float32: 1e-4}
PARITY_RTOL_F32_SECOND_ORDER = {"soap": 0.1, "psgd_kron": 0.1}


# ----------------------------------------------------------------------------- parameter sets


@dataclass(frozen=True)
class FrontierSet:
    """Transformer-shaped float32 parameters: ``blocks`` blocks of width ``width`` (see :func:`shapes`)."""

    name: str  # the id in test ids and the report ("10M", "100M"; smoke keeps the ids on tiny shapes)
    blocks: int
    width: int
    rounds: int  # timed rounds at full scale (--bench-rounds overrides)
    warmup_rounds: int  # untimed first steps: initialisation and, for the compiled entries, compilation

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per block: q, k, v, o (``width x width``) with biases, MLP up ``(4w, w)`` and down ``(w, 4w)``
        with biases, two LayerNorms (weight, bias): 16 tensors, ``12 w^2 + 13 w`` parameters."""
        w, out = self.width, {}
        for i in range(self.blocks):
            b = f"blocks.{i}"
            out |= {f"{b}.norm1.weight": (w,), f"{b}.norm1.bias": (w,)}
            for part in ("q", "k", "v", "o"):
                out |= {f"{b}.attn.{part}.weight": (w, w), f"{b}.attn.{part}.bias": (w,)}
            out |= {f"{b}.norm2.weight": (w,), f"{b}.norm2.bias": (w,)}
            out |= {f"{b}.mlp.up.weight": (4 * w, w), f"{b}.mlp.up.bias": (4 * w,)}
            out |= {f"{b}.mlp.down.weight": (w, 4 * w), f"{b}.mlp.down.bias": (w,)}
        return out

    @property
    def n_params(self) -> int:
        return self.blocks * (12 * self.width**2 + 13 * self.width)

    @property
    def n_tensors(self) -> int:
        return 16 * self.blocks


SETS = {
    "full": (
        FrontierSet("10M", blocks=3, width=512, rounds=10, warmup_rounds=3),
        FrontierSet("100M", blocks=8, width=1024, rounds=10, warmup_rounds=3),
    ),
    "smoke": (
        FrontierSet("10M", blocks=1, width=4, rounds=1, warmup_rounds=0),
        FrontierSet("100M", blocks=1, width=8, rounds=1, warmup_rounds=0),
    ),
}
SET_IDS = tuple(s.name for s in SETS["full"])
CHECKED = ("blocks.0.attn.q.weight", "blocks.0.mlp.up.weight", "blocks.0.mlp.up.bias")  # the parity check's


@pytest.fixture(scope="module")
def frontier_set(request: pytest.FixtureRequest, bench_config) -> FrontierSet:
    """The set named by the test's ``frontier_set`` id; parametrize it indirectly with :data:`SET_IDS`."""
    return next(s for s in SETS[bench_config.scale.name] if s.name == request.param)


def _tree(frontier_set: FrontierSet, std: float, seed: int, device: torch.device, dtype) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)  # CPU generator: the same numbers on every device
    return {k: (torch.randn(s, generator=gen) * std).to(device, dtype) for k, s in frontier_set.shapes().items()}


def dtype(bench_config) -> torch.dtype:
    """float32 at full scale; float64 at smoke scale, where the step is untimed and the parity check is
    then exact to rounding (in float32, SOAP's and PSGD's eigen- and triangular solves on Gram matrices
    of small gradients differ between two correct implementations by up to a few percent)."""
    return torch.float64 if bench_config.smoke else torch.float32


# Module-scoped: tests run size by size (pytest orders them so), and one size's trees are freed before
# the next size's are built.
@pytest.fixture(scope="module")
def base_params(frontier_set, bench_config) -> dict[str, Tensor]:
    return _tree(frontier_set, 0.02, seed=0, device=bench_config.device, dtype=dtype(bench_config))


@pytest.fixture(scope="module")
def base_grads(frontier_set, bench_config) -> dict[str, Tensor]:
    return _tree(frontier_set, 1e-3, seed=1, device=bench_config.device, dtype=dtype(bench_config))


# ----------------------------------------------------------------------------- the optimisers


@dataclass(frozen=True)
class Frontier:
    """One optimiser as each library spells it. ``lr`` is the schedule's peak; the builders take the
    learning rate (a schedule for functrain, a float for the peers, which are reset every step)."""

    name: str  # the ft attribute, and the group "<name>-update" with _ -> -
    lr: float
    functrain: Callable[[object], ft.GradientTransformation]
    peers: dict[str, Callable[[list[torch.nn.Parameter], float], torch.optim.Optimizer]]
    reference: str  # the peer the parity tests use; its entry runs first
    notes: dict = field(default_factory=dict)  # recorded in extra_info

    @property
    def group(self) -> str:
        return self.name.replace("_", "-") + "-update"

    def schedule(self) -> ft.Schedule:
        return ft.schedules.warmup_cosine(
            peak_lr=self.lr, warmup_steps=WARMUP_STEPS, total_steps=DECAY_STEPS, init_lr=WARMUP_FROM * self.lr
        )


def _heavyball(cls_name: str, **kwargs):
    def make(ps, lr, **more):
        import heavyball

        # HeavyBall keeps its state in float32 unless told (the smoke run's float64 parity check).
        dtype = str(ps[0].dtype).removeprefix("torch.")
        dtypes = dict(storage_dtype=dtype) | (dict(q_dtype=dtype) if cls_name == "PSGDKron" else {})
        return getattr(heavyball, cls_name)(ps, lr=lr, **kwargs, **dtypes, **more)

    return make


def _pytorch_optimizer(cls_name: str, **kwargs):
    def make(ps, lr):
        import pytorch_optimizer

        return getattr(pytorch_optimizer, cls_name)(ps, lr=lr, **kwargs)

    return make


def _prodigyopt(**kwargs):
    def make(ps, lr):
        import prodigyopt

        return prodigyopt.Prodigy(ps, lr=lr, **kwargs)

    return make


def _ft(name: str, **kwargs) -> Callable[[object], ft.GradientTransformation]:
    def make(lr):
        return getattr(ft, name)(lr=lr, **kwargs)

    return make


SOAP_KW = dict(betas=(0.95, 0.95), shampoo_beta=0.95, eps=1e-8, weight_decay=0.01, precondition_frequency=10)
SOAP_DIM = 2048
PSGD_PROB, PSGD_TRIANGULAR = 1.0, 2048
ADEMAMIX_KW = dict(betas=(0.9, 0.999, 0.9999), alpha=5.0, eps=1e-8)
ADOPT_KW = dict(betas=(0.9, 0.9999), eps=1e-6)
PRODIGY_KW = dict(betas=(0.9, 0.999), d0=1e-6, weight_decay=0.0)

OPTIMISERS = {
    "soap": Frontier(
        "soap",
        3e-3,
        _ft("soap", **SOAP_KW, max_precond_dim=SOAP_DIM, merge_dims=False, precondition_1d=False),
        {
            "heavyball-compiled": _heavyball(
                "SOAP", **SOAP_KW, max_precond_dim=SOAP_DIM, merge_dims=False, precondition_1d=False
            ),
            "pytorch-optimizer": _pytorch_optimizer(
                "SOAP", **SOAP_KW, max_precondition_dim=SOAP_DIM, merge_dims=False, precondition_1d=False
            ),
        },
        reference="heavyball-compiled",
    ),
    "psgd_kron": Frontier(
        "psgd_kron",
        1e-3,
        _ft(
            "psgd_kron",
            beta=0.9,
            seed=0,
            preconditioner_update_probability=PSGD_PROB,
            max_size_triangular=PSGD_TRIANGULAR,
            min_ndim_triangular=2,
        ),
        {
            "heavyball-compiled": _heavyball(
                "PSGDKron",
                beta=0.9,
                preconditioner_update_probability=PSGD_PROB,
                max_size_triangular=PSGD_TRIANGULAR,
                min_ndim_triangular=2,
            ),
            "pytorch-optimizer": _pytorch_optimizer(
                "Kron",
                momentum=0.9,
                pre_conditioner_update_probability=PSGD_PROB,
                max_size_triangular=PSGD_TRIANGULAR,
                min_ndim_triangular=2,
            ),
        },
        reference="heavyball-compiled",
    ),
    "ademamix": Frontier(
        "ademamix",
        1e-3,
        _ft("ademamix", betas=ADEMAMIX_KW["betas"][:2], beta3=ADEMAMIX_KW["betas"][2], alpha=5.0, eps=1e-8),
        {
            "pytorch-optimizer": _pytorch_optimizer("AdEMAMix", **ADEMAMIX_KW, foreach=True),
            "heavyball-compiled": _heavyball("AdEMAMix", **ADEMAMIX_KW),
        },
        reference="pytorch-optimizer",
    ),
    "adopt": Frontier(
        "adopt",
        1e-3,
        _ft("adopt", **ADOPT_KW),
        {
            "pytorch-optimizer": _pytorch_optimizer("ADOPT", **ADOPT_KW, foreach=True),
            "heavyball-compiled": _heavyball("ADOPT", **ADOPT_KW),
        },
        reference="pytorch-optimizer",
    ),
    "prodigy": Frontier(
        "prodigy",
        1.0,
        _ft("prodigy", **PRODIGY_KW),
        {
            "prodigyopt": _prodigyopt(**PRODIGY_KW),
            "pytorch-optimizer": _pytorch_optimizer("Prodigy", **PRODIGY_KW, foreach=True),
        },
        reference="prodigyopt",
    ),
}


def entries(opt: Frontier) -> list[str]:
    """The group's entries, the reference first (the others compare their steps with its)."""
    peers = [opt.reference, *(p for p in opt.peers if p != opt.reference)]
    return [*peers, "functrain", "functrain-compiled"]


# ----------------------------------------------------------------------------- steppers


# The parity check compares the parameters after this many steps: the first step of ADOPT (and of
# pytorch-optimizer's SOAP) only initialises the state, and the second also checks that the schedule's
# learning rate reaches every side alike.
PARITY_STEPS = 2


class Stepper:
    """A zero-argument step carrying its state; keeps the checked tensors' change after
    :data:`PARITY_STEPS` steps."""

    def __init__(self, step: Callable[[], None], current: Callable[[], dict[str, Tensor]], initial):
        self._step, self._current = step, current
        self.initial = {k: initial[k].clone() for k in CHECKED}
        self.change: dict[str, Tensor] | None = None
        self.rounding: dict[str, Tensor] | None = None
        self.calls = 0
        # dynamo graphs compiled during each call (HeavyBall's compiled kernels too): a compiled peer
        # that recompiled in its timed rounds would be timed compiling.
        self.graphs_per_call: list[int] = []

    def __call__(self) -> None:
        before = _unique_graphs()
        self._step()
        self.graphs_per_call.append(_unique_graphs() - before)
        self.calls += 1
        if self.calls == PARITY_STEPS:
            now = self._current()
            self.change = {k: now[k].detach().double() - self.initial[k].double() for k in CHECKED}
            # one rounding of each parameter: differences below it are the parameter's, not the step's
            self.rounding = {
                k: torch.finfo(now[k].dtype).eps * torch.maximum(now[k].detach().abs(), self.initial[k].abs()).double()
                for k in CHECKED
            }

    def check(self) -> None:
        assert self.calls >= 1, "the step never ran"
        final = self._current()
        assert all(bool(torch.isfinite(p).all()) for p in final.values()), "non-finite parameters after the steps"
        assert any(not torch.equal(final[k], self.initial[k]) for k in CHECKED), "the parameters did not move"


def functrain_stepper(opt: Frontier, params, grads) -> Stepper:
    tx = opt.functrain(opt.schedule())
    carry = {"params": params, "state": tx.init(params)}

    def step() -> None:
        carry["params"], carry["state"] = ft.update_and_apply(tx, grads, carry["state"], carry["params"])

    return Stepper(step, lambda: carry["params"], params)


class CompiledStepper(Stepper):
    """The update under ``torch.compile(fullgraph=True)``, written into the params and state (in place).

    Its graphs are those dynamo compiled during its calls (``unique_graphs``, read around each call:
    :attr:`Stepper.graphs_per_call`); ``recompiles``, those of every call after the first."""

    def __init__(self, opt: Frontier, params, grads):
        # Every compiled entry wraps the same `update` code: drop the earlier entries' graphs so that
        # their guards are not checked on every call, and so that the count starts at this entry.
        torch.compiler.reset()
        tx = opt.functrain(opt.schedule())
        params = {k: v.clone() for k, v in params.items()}  # written in place
        state = tx.init(params)
        compiled = compiled_in_place(tx)

        def step() -> None:
            compiled(params, state, grads)

        super().__init__(step, lambda: params, params)

    @property
    def graphs(self) -> int:
        return sum(self.graphs_per_call)

    @property
    def recompiles(self) -> int:
        return sum(self.graphs_per_call[1:])


def _unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def peer_stepper(opt: Frontier, impl: str, params, grads, compile: bool = True) -> Stepper:
    ps = [torch.nn.Parameter(t.clone()) for t in params.values()]
    gs = [g.clone() for g in grads.values()]  # a peer may write into its gradients
    schedule = opt.schedule()
    # The smoke run's PSGD parity check: HeavyBall's multi-tensor path draws its probes in another
    # order; one tensor at a time (as the registry's parity tests run it) matches functrain's draws.
    more = {"multi_tensor": False} if not compile and impl == "heavyball-compiled" and opt.name == "psgd_kron" else {}
    optimizer = opt.peers[impl](ps, float(schedule(torch.tensor(0))), **more)
    names = list(params)
    count = {"step": 0}

    def step() -> None:
        lr = float(schedule(torch.tensor(count["step"])))
        for group in optimizer.param_groups:
            group["lr"] = lr
        for p, g in zip(ps, gs):
            p.grad = g  # HeavyBall sets .grad = None after using it
        basis = heavyball_first_basis() if impl == "heavyball-compiled" and opt.name == "soap" else nullcontext()
        eager = nullcontext() if compile else heavyball_eager(opt.name == "psgd_kron", count["step"], len(ps))
        with basis, eager:
            optimizer.step()
        count["step"] += 1

    return Stepper(step, lambda: dict(zip(names, (p.detach() for p in ps))), params)


@contextlib.contextmanager
def heavyball_first_basis():
    """HeavyBall's SOAP starting from functrain's first eigenbasis (the patch of tests/specs_heavyball.py).

    Its own is ``eigh``'s eigenvectors of a rank-deficient factor (a 2048 x 512 gradient's 2048 x 2048
    factor has rank 512), whose null space rounding picks; Adam in another basis takes another step,
    so without this the two differ by O(1) after the first update. It runs once, at the first step
    (a warm-up round), and is not in the timed rounds."""
    import heavyball.utils

    from functrain.transforms._soap import initial_basis

    def get_orthogonal_matrix(factors):
        return [None if m is None else initial_basis(m) for m in factors]

    with mock.patch.object(heavyball.utils, "get_orthogonal_matrix", get_orthogonal_matrix):
        yield


@contextlib.contextmanager
def heavyball_eager(probes: bool, step: int, n: int):
    """HeavyBall with its compilation off (the smoke run); with ``probes``, PSGD's random probe vectors
    drawn as ``ft.psgd_kron(seed=0)`` draws them, so that the two can be compared: HeavyBall draws one
    with ``torch.randn_like`` per parameter, in order, in ``heavyball.utils.dampen_grad`` (the patch
    of tests/specs_heavyball.py, which the registry's parity tests use)."""
    import heavyball

    from functrain.transforms._psgd import leaf_key, normal_draw

    keys = iter([leaf_key(0, i) for i in range(n)])

    def dampen_grad(g, damp=1e-9):
        v = normal_draw(next(keys), torch.tensor(step), tuple(g.shape), g.dtype)
        return v, g + (damp + torch.finfo(torch.float32).eps * g.abs()) * v

    with mock.patch.object(heavyball.utils, "compile_mode", None):
        with mock.patch.object(heavyball.utils, "dampen_grad", dampen_grad) if probes else nullcontext():
            yield


def make_stepper(opt: Frontier, impl: str, params, grads, bench_config) -> Stepper:
    if impl == "functrain":
        return functrain_stepper(opt, params, grads)
    if impl == "functrain-compiled":
        if bench_config.smoke:
            pytest.skip(COMPILE_SKIP)
        return CompiledStepper(opt, params, grads)
    pytest.importorskip({"heavyball-compiled": "heavyball", "prodigyopt": "prodigyopt"}.get(impl, "pytorch_optimizer"))
    return peer_stepper(opt, impl, params, grads, compile=not bench_config.smoke)


# The reference entry's changes after PARITY_STEPS steps, by (optimiser, set): the others compare with them.
CHANGE: dict[tuple[str, str], dict[str, Tensor]] = {}


def parity(opt: Frontier, impl: str, size: str, stepper: Stepper) -> float | None:
    """max over :data:`CHECKED` of ``max(|change - reference change| - rounding) / max|reference change|``
    after :data:`PARITY_STEPS` steps, ``rounding`` one rounding of the parameter (elementwise); None when
    the reference entry did not run in this session (deselected)."""
    if impl == opt.reference:
        CHANGE[opt.name, size] = stepper.change
        return 0.0
    ref = CHANGE.get((opt.name, size))
    if ref is None:
        return None
    worst = 0.0
    for k in CHECKED:
        scale = ref[k].abs().max()
        assert scale > 0, f"{opt.reference}'s steps left {k} unchanged: nothing to compare"
        beyond_rounding = ((stepper.change[k] - ref[k]).abs() - stepper.rounding[k]).clamp_min(0)
        worst = max(worst, float(beyond_rounding.max() / scale))
    return worst


def run_group(name: str, impl: str, frontier_set, base_params, base_grads, time_step, benchmark, bench_config):
    if getattr(ft, name, None) is None and impl.startswith("functrain"):
        pytest.skip(f"ft.{name} does not exist (yet)")
    opt = OPTIMISERS[name]
    params = {k: v.clone() for k, v in base_params.items()}
    stepper = make_stepper(opt, impl, params, base_grads, bench_config)
    extra = dict(
        optimizer=name,
        impl=impl,
        param_set=frontier_set.name,
        n_params=frontier_set.n_params,
        n_tensors=frontier_set.n_tensors,
        blocks=frontier_set.blocks,
        block_width=frontier_set.width,
        peak_lr=opt.lr,
        reference=opt.reference,
    )
    if impl == "heavyball-compiled":
        import heavyball

        extra["heavyball_compile_mode"] = None if bench_config.smoke else heavyball.utils.compile_mode
    warmup = None if bench_config.smoke else frontier_set.warmup_rounds
    if bench_config.smoke:
        stepper()  # --benchmark-disable calls the step once: the parity check needs PARITY_STEPS (2)
    time_step(stepper, rounds=frontier_set.rounds, warmup_rounds=warmup, **extra)
    stepper.check()
    rel = parity(opt, impl, frontier_set.name, stepper)
    warm = 0 if bench_config.smoke else frontier_set.warmup_rounds
    benchmark.extra_info.update(
        first_step_rel_diff=rel,
        calls=stepper.calls,
        graphs_per_call=stepper.graphs_per_call,
        graphs_in_timed_rounds=sum(stepper.graphs_per_call[warm:]),
    )
    if isinstance(stepper, CompiledStepper):
        benchmark.extra_info.update(graphs=stepper.graphs, recompiles=stepper.recompiles)
        assert stepper.graphs == 1 and stepper.recompiles == 0, (
            f"{stepper.graphs} graphs, {stepper.recompiles} recompiles over {stepper.calls} scheduled steps"
        )
    # Only functrain must equal the reference; the other peer's difference is recorded (their defaults
    # and formulas differ in places). PSGD's probes are random: HeavyBall draws them from torch's global
    # generator, so the two agree only where the smoke run hands HeavyBall functrain's draws.
    checked = impl.startswith("functrain") and (name != "psgd_kron" or bench_config.smoke)
    benchmark.extra_info.update(parity_checked=checked)
    if rel is not None and checked:
        tol = PARITY_RTOL[base_params[CHECKED[0]].dtype]
        if base_params[CHECKED[0]].dtype == torch.float32:
            tol = PARITY_RTOL_F32_SECOND_ORDER.get(name, tol)
        assert rel <= tol, f"{impl}'s steps differ from {opt.reference}'s by {rel:.2e} (tolerance {tol:g})"


def _ids(name: str) -> list[str]:
    return entries(OPTIMISERS[name])


@pytest.mark.benchmark(group="soap-update")
@pytest.mark.parametrize("impl", _ids("soap"))
@pytest.mark.parametrize("frontier_set", SET_IDS, indirect=True)
def test_soap_update(impl, frontier_set, base_params, base_grads, time_step, benchmark, bench_config):
    """SOAP (lr 3e-3): Adam in the eigenbasis of Shampoo's factors, refreshed every 10 steps."""
    run_group("soap", impl, frontier_set, base_params, base_grads, time_step, benchmark, bench_config)


@pytest.mark.benchmark(group="psgd-kron-update")
@pytest.mark.parametrize("impl", _ids("psgd_kron"))
@pytest.mark.parametrize("frontier_set", SET_IDS, indirect=True)
def test_psgd_kron_update(impl, frontier_set, base_params, base_grads, time_step, benchmark, bench_config):
    """PSGD-Kron (lr 1e-3): momentum preconditioned by Kronecker factors, updated every step."""
    run_group("psgd_kron", impl, frontier_set, base_params, base_grads, time_step, benchmark, bench_config)


@pytest.mark.benchmark(group="ademamix-update")
@pytest.mark.parametrize("impl", _ids("ademamix"))
@pytest.mark.parametrize("frontier_set", SET_IDS, indirect=True)
def test_ademamix_update(impl, frontier_set, base_params, base_grads, time_step, benchmark, bench_config):
    """AdEMAMix (lr 1e-3, alpha 5): Adam plus a slow EMA of the gradient."""
    run_group("ademamix", impl, frontier_set, base_params, base_grads, time_step, benchmark, bench_config)


@pytest.mark.benchmark(group="adopt-update")
@pytest.mark.parametrize("impl", _ids("adopt"))
@pytest.mark.parametrize("frontier_set", SET_IDS, indirect=True)
def test_adopt_update(impl, frontier_set, base_params, base_grads, time_step, benchmark, bench_config):
    """ADOPT (lr 1e-3): the gradient normalised by the previous step's second moment, then momentum."""
    run_group("adopt", impl, frontier_set, base_params, base_grads, time_step, benchmark, bench_config)


@pytest.mark.benchmark(group="prodigy-update")
@pytest.mark.parametrize("impl", _ids("prodigy"))
@pytest.mark.parametrize("frontier_set", SET_IDS, indirect=True)
def test_prodigy_update(impl, frontier_set, base_params, base_grads, time_step, benchmark, bench_config):
    """Prodigy (lr 1.0): Adam with the step size estimated from the distance travelled."""
    run_group("prodigy", impl, frontier_set, base_params, base_grads, time_step, benchmark, bench_config)


# ----------------------------------------------------------------------------- the table over runs


def medians(paths: list[str]) -> dict[tuple[str, str], dict[str, float]]:
    """``{(group, size): {impl: median seconds}}`` of pytest-benchmark JSON files that make up one run
    (a run may be split over several files, e.g. one optimiser at a time)."""
    out: dict[tuple[str, str], dict[str, float]] = collections.defaultdict(dict)
    for path in paths:
        with open(path) as f:
            for bench in json.load(f)["benchmarks"]:
                e = bench["extra_info"]
                out[bench["group"], e["param_set"]][e["impl"]] = bench["stats"]["median"]
    return out


def table(runs: list[list[str]]) -> str:
    """Markdown: per group and size, each entry's median time (median and range over the runs) and its
    ratio to the fastest peer of the same run (median and range of the per-run ratios)."""
    per_run = [medians(paths) for paths in runs]
    keys = sorted({k for run in per_run for k in run}, key=lambda k: (k[0], SET_IDS.index(k[1])))
    lines = [
        f"Median and range over {len(runs)} run(s); ratio: the entry's median / the fastest peer's median in "
        "the same run (below 1 is faster).",
        "",
        "| group | set | entry | median ms (range) | / fastest peer (range) | fastest peer |",
        "|---|---|---|---:|---:|---|",
    ]
    for group, size in keys:
        impls = list(dict.fromkeys(i for run in per_run for i in run.get((group, size), {})))
        for impl in impls:
            times, ratios, fastest = [], [], []
            for run in per_run:
                entries = run.get((group, size), {})
                peers = {k: v for k, v in entries.items() if not k.startswith("functrain")}
                if impl not in entries:
                    continue
                times.append(1e3 * entries[impl])
                if peers:
                    best = min(peers, key=peers.get)
                    ratios.append(entries[impl] / peers[best])
                    fastest.append(best)
            if not times:
                continue
            ratio = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "-"
            peer = ", ".join(sorted(set(fastest))) or "-"
            lines.append(
                f"| {group} | {size} | {impl} | {statistics.median(times):.1f} ({min(times):.1f}-{max(times):.1f}) "
                f"| {ratio} | {peer} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    # python benchmarks/bench_frontier.py RUN1.json[,RUN1b.json] RUN2.json ...: one argument per run.
    sys.stdout.write(table([arg.split(",") for arg in sys.argv[1:]]))


def test_convergence_script_smoke(tmp_path, bench_config):
    """benchmarks/frontier_convergence.py at --smoke (tiny models, 4 steps): every entry of its RUNS
    trains both models, writes finite losses to the JSON and its markdown table lists each one."""
    if not bench_config.smoke:
        pytest.skip("the committed convergence run is the script's full form (see README.md)")
    import frontier_convergence

    out = tmp_path / "convergence.json"
    results = frontier_convergence.main(["--smoke", "--out", str(out), "--plot", str(tmp_path / "c.png")])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    names = [run.name for run in frontier_convergence.RUNS]
    table = frontier_convergence.table(results)
    for model in ("gpt", "cnn"):
        runs = results["models"][model]["runs"]
        assert list(runs) == names
        for name, run in runs.items():
            assert len(run["train_loss"]) == 4 and all(math.isfinite(v) for v in run["train_loss"]), name
            assert f"| {model} | {name} |" in table
