"""Sharded training on DTensor (FSDP / ZeRO-3 and HSDP): N gloo processes on loopback against one
process on the combined batch, for every optimiser in the registry."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import functrain as ft

from . import registry
from .ranks import run_on_ranks

STEPS = 3


class Net(nn.Module):
    """Every placement the sharding rule makes: a weight split evenly over 2 and 4 ranks (8 rows),
    one split unevenly (5 rows), and tensors with fewer rows than ranks (1), which stay replicated."""

    def __init__(self, bias=True, batchnorm=False):
        super().__init__()
        self.a = nn.Linear(6, 8, bias=bias)
        self.norm = nn.BatchNorm1d(8) if batchnorm else nn.Identity()
        self.b = nn.Linear(8, 5, bias=bias)
        self.c = nn.Linear(5, 1, bias=bias)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.norm(self.a(x))))))


def make_model(bias=True, batchnorm=False, dtype=torch.float64):
    torch.manual_seed(0)
    return Net(bias, batchnorm).to(dtype)


def batches(n=STEPS, size=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(size, 6, generator=g, dtype=dtype), torch.randn(size, 1, generator=g, dtype=dtype))
        for _ in range(n)
    ]


def loss_fn(model, batch):
    x, y = batch
    out = model(x)
    return F.mse_loss(out, y), {"mean_out": out.mean()}


def part(batch, rank, world):
    return tuple(t.chunk(world)[rank] for t in batch)


BLOCK_LOG = []  # a module global: a step's copy of the model writes here too


class Block(nn.Module):
    """A residual block; it records, while it runs, which blocks hold whole tensors (and a weak
    reference to its own whole weight, to see that nothing keeps it once the block is done)."""

    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width))

    def forward(self, x):
        BLOCK_LOG.append(
            (
                [not ft._sharding.is_dtensor(block.lin.weight) for block in self.log_blocks],
                weakref.ref(self.lin.weight),
            )
        )
        return x + self.mlp(torch.tanh(self.lin(x)))


class BlockNet(nn.Module):
    """A root (input layer, head) around a ModuleList of blocks: FSDP2's units are the blocks."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.blocks = nn.ModuleList(Block(8) for _ in range(3))
        self.head = nn.Linear(8, 1)
        for block in self.blocks:
            block.__dict__["log_blocks"] = list(self.blocks)  # not submodules: the step's copy has its own

    def forward(self, x):
        for block in self.blocks:
            x = block(torch.tanh(self.inp(x)) if block is self.blocks[0] else x)
        return self.head(x)


def train(model, tx, data, mesh=None, rank=0, world=1, **step_kwargs):
    state = ft.TrainState.create(model, tx, mesh=mesh)
    step = ft.make_train_step(model, loss_fn, tx, mesh=mesh, **step_kwargs)
    metrics = []
    for batch in data:
        state, m = step(state, batch if mesh is None else part(batch, rank, world))
        metrics.append(m)
    return state, metrics


def whole(state):
    return ft.distributed.full_tensors(state)


def max_relative_error(actual, expected):
    worst = 0.0
    for a, e in zip(ft._tree.leaves(actual), ft._tree.leaves(expected)):
        if a.is_floating_point() and a.numel():
            worst = max(worst, ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item())
    return worst


def mesh_1d():
    return init_device_mesh("cpu", (torch.distributed.get_world_size(),))


# ----------------------------------------------------------------------------- scenarios (run in each rank)


def registry_scenario(rank):
    """Every option of every registry optimiser: sharded over the ranks == one process, params and state."""
    world, mesh = torch.distributed.get_world_size(), mesh_1d()
    data = batches()
    errors = {}
    for spec in registry.SPECS:
        for i, kwargs in enumerate(spec.cases()):
            model = make_model(bias=not spec.matrices_only)
            reference, ref_metrics = train(model, spec.make(**kwargs), data)
            sharded, metrics = train(model, spec.make(**kwargs), data, mesh, rank, world)
            got = whole(sharded)
            errors[f"{spec.name}[{i}]"] = torch.tensor(
                [
                    max_relative_error(got.params, reference.params),
                    max_relative_error(got.opt_state, reference.opt_state),
                    max_relative_error(metrics, ref_metrics),
                ]
            )
    return errors


def placements_scenario(rank):
    mesh = mesh_1d()
    state = ft.TrainState.create(make_model(), ft.adamw(lr=0.01), mesh=mesh)
    return {
        "local_rows": {k: torch.tensor(p.to_local().shape[0] if p.ndim else 0) for k, p in state.params.items()},
        "placements": {k: str(p.placements) for k, p in state.params.items()},
        # the moments: "inner_state.0.mu.a.weight", "inner_state.0.nu.a.weight"
        "state_placements": {k: str(v.placements) for k, v in ft._tree.named_leaves(state.opt_state) if v.ndim},
    }


def compiled_scenario(rank):
    """Compiled (one graph, collectives inside) == eager unsharded; moving a hyperparameter never recompiles."""
    from torch._dynamo.utils import counters

    world, mesh = torch.distributed.get_world_size(), mesh_1d()
    data = batches(n=4, dtype=torch.float32)

    def make():
        sched = ft.schedules.cosine_annealing_lr(0.05, T_max=10)
        return ft.chain(ft.clip_by_global_norm(0.5), ft.inject_hyperparams(ft.adamw)(lr=sched, weight_decay=0.1))

    model = make_model(dtype=torch.float32)
    reference, _ = train(model, make(), data)
    counters.clear()
    state = ft.TrainState.create(model, make(), mesh=mesh)
    step = ft.make_train_step(model, loss_fn, make(), mesh=mesh, compile=True)
    for t, batch in enumerate(data):
        if t == 2:  # a new value for a hyperparameter the schedule does not drive
            hp = state.opt_state[1]
            state = state._replace(opt_state=(state.opt_state[0], ft.set_hyperparams(hp, weight_decay=0.1)))
        state, metrics = step(state, part(batch, rank, world))
    return {
        "error": torch.tensor(max_relative_error(whole(state).params, reference.params)),
        "graphs": torch.tensor(counters["stats"]["unique_graphs"]),
        "loss": metrics["loss"],
    }


def block_model():
    """Units only: the input layer, three blocks and the head are each an element of a Sequential."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.Tanh()) for _ in range(3)]
    return nn.Sequential(nn.Linear(6, 8), *blocks, nn.Linear(8, 1))


def most_gathers_live(graph):
    """The most all-gathers whose bytes are live at one point of ``graph``: a gather's bytes live
    from the all_gather to the last read of it or of a node computed from it alone (its views,
    splits and copies)."""
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    spans = []
    for node in nodes:
        if node.target is not torch.ops._c10d_functional.all_gather_into_tensor.default:
            continue
        derived = {node}
        for later in nodes[position[node] + 1 :]:
            computed = [i for i in later.all_input_nodes if i.op == "call_function"]
            if computed and all(i in derived for i in computed):
                derived.add(later)
        spans.append((position[node], max(position[u] for d in derived for u in d.users)))
    return max(sum(start <= p <= end for start, end in spans) for p in range(len(nodes)))


def regather_scenario(rank):
    """Compiled, each unit's parameters are whole only while the unit runs, forward and backward,
    and the numbers are those of the same graph without the pass."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    from functrain._regather import regather

    world, mesh = torch.distributed.get_world_size(), mesh_1d()
    data = batches(n=2, dtype=torch.float32)
    model = block_model()

    class Recorded(CustomGraphPass):
        """Records the gathers live at once in the post-grad graph, after ``regather`` if ``transform``."""

        def __init__(self, transform):
            self.transform, self.live, self.gathers = transform, [], []

        def __call__(self, graph):
            if self.transform:
                regather(graph)
            self.live.append(most_gathers_live(graph))
            all_gather = torch.ops._c10d_functional.all_gather_into_tensor.default
            self.gathers.append(sum(n.target is all_gather for n in graph.nodes))

        def uuid(self):
            return None  # (inductor's cache is bypassed: every compile runs the pass)

    out = {}
    for name, transform in (("with", True), ("without", False)):
        recorded = Recorded(transform)
        compile_ = {"options": {"post_grad_custom_pre_pass": recorded}}
        state, _ = train(model, ft.adamw(lr=0.01), data, mesh, rank, world, compile=compile_)
        out[name] = whole(state).params
        out[f"{name}_live"] = torch.tensor(recorded.live)
        out[f"{name}_gathers"] = torch.tensor(recorded.gathers)
    reference, _ = train(model, ft.adamw(lr=0.01), data)
    out["error"] = torch.tensor(max_relative_error(out["with"], reference.params))
    return out


def options_scenario(rank):
    """Microbatches, BatchNorm statistics averaged over ranks, an in-place (donating) step, one
    tensor per gather bucket, the eval step and a frozen layer."""
    world, mesh = torch.distributed.get_world_size(), mesh_1d()
    data = batches(size=8)
    out = {}
    model = make_model()
    ref, _ = train(model, ft.adamw(lr=0.01), data, microbatches=2)
    got, _ = train(model, ft.adamw(lr=0.01), data, mesh, rank, world, microbatches=2)
    out["microbatches"] = max_relative_error(whole(got).params, ref.params)
    bn = make_model(batchnorm=True)
    ref, _ = train(bn, ft.adamw(lr=0.01), data)
    # Each rank's BatchNorm sees its own part of the batch, as in torch's DDP: the params follow
    # the combined batch only up to those statistics, so compare against per-part statistics.
    got, _ = train(bn, ft.adamw(lr=0.01), data, mesh, rank, world, reduce_buffers=ft.distributed.mean_over_ranks)
    out["batchnorm_buffers_equal_on_ranks"] = got.buffers["norm.running_mean"]
    model = make_model()
    ref, _ = train(model, ft.adamw(lr=0.01), data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got, _ = train(model, ft.adamw(lr=0.01), data, mesh, rank, world, inplace=True)
    out["inplace"] = max_relative_error(whole(got).params, ref.params)
    # the user's model is never written: not by the broadcast of replicated params, nor in place
    out["model_untouched"] = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # every tensor in a bucket of its own
    cap = ft._sharding.BUCKET_BYTES
    ft._sharding.BUCKET_BYTES = 1
    try:
        got, _ = train(model, ft.adamw(lr=0.01), data, mesh, rank, world)
    finally:
        ft._sharding.BUCKET_BYTES = cap
    out["one_tensor_per_bucket"] = max_relative_error(whole(got).params, ref.params)
    evaluate = ft.make_eval_step(model, loss_fn, mesh=mesh)
    ref_eval = ft.make_eval_step(model, loss_fn)(ref, data[0])
    got_eval = evaluate(got, part(data[0], rank, world))
    out["eval"] = max_relative_error(got_eval, ref_eval)
    # a frozen first layer, declared by partition: not differentiated sharded either, and left as it was
    frozen = ft.partition(
        {"train": ft.adamw(lr=0.01), "frozen": ft.set_to_zero()},
        lambda name, p: "frozen" if name.startswith("a.") else "train",
    )
    ref, _ = train(model, frozen, data)
    got, _ = train(model, frozen, data, mesh, rank, world)
    out["frozen"] = max_relative_error(whole(got).params, ref.params)
    out["frozen_unchanged"] = torch.equal(whole(got).params["a.weight"], model.a.weight.detach())
    return {k: torch.as_tensor(v) for k, v in out.items()}


def blocks_scenario(rank):
    """Eager, each block is gathered as it runs and freed after it; autograd keeps no whole weight
    (the backward gathers a block again), second derivatives included; == one process."""
    world, mesh = torch.distributed.get_world_size(), mesh_1d()
    data = batches()
    torch.manual_seed(0)
    model = BlockNet().double()
    out = {}
    ref, _ = train(model, ft.adamw(lr=0.01), data, microbatches=2)
    log = BLOCK_LOG
    log.clear()
    got, _ = train(model, ft.adamw(lr=0.01), data, mesh, rank, world, microbatches=2)
    out["equal"] = max_relative_error(whole(got).params, ref.params)
    # each entry: while block i ran, which blocks were whole (only block i)
    out["whole_while_running"] = torch.tensor([whole for whole, _ in log])
    out["freed_after_the_step"] = all(ref() is None for _, ref in log)

    def freed_by_end_of_forward(model, batch):
        x, y = batch
        log.clear()
        pred = model(x)
        # the forward is done: no whole block weight is alive, though autograd will need them
        out.setdefault("freed_at_forward_end", []).append(all(ref() is None for _, ref in log))
        return F.mse_loss(pred, y)

    step = ft.make_train_step(model, freed_by_end_of_forward, ft.adamw(lr=0.01), mesh=mesh)
    step(ft.TrainState.create(model, ft.adamw(lr=0.01), mesh=mesh), part(data[0], rank, world))
    out["freed_at_forward_end"] = all(out["freed_at_forward_end"])

    def gradient_penalty(model, batch):
        x, y = batch
        x = x.clone().requires_grad_()
        pred = model(x)
        (dx,) = torch.autograd.grad(pred.sum(), x, create_graph=True)
        return F.mse_loss(pred, y) + 0.1 * dx.pow(2).mean()

    state = ft.TrainState.create(model, ft.sgd(lr=0.1))
    ref, _ = ft.make_train_step(model, gradient_penalty, ft.sgd(lr=0.1))(state, data[0])
    state = ft.TrainState.create(model, ft.sgd(lr=0.1), mesh=mesh)
    got, _ = ft.make_train_step(model, gradient_penalty, ft.sgd(lr=0.1), mesh=mesh)(state, part(data[0], rank, world))
    out["second_derivatives"] = max_relative_error(whole(got).params, ref.params)
    results = {k: torch.as_tensor(v) for k, v in out.items()}

    def reads_a_block_weight(model, batch):
        x, y = batch
        return F.mse_loss(model(x), y) + 0.01 * model.blocks[1].lin.weight.pow(2).sum()

    try:
        ft.make_train_step(model, reads_a_block_weight, ft.sgd(lr=0.1), mesh=mesh)(state, part(data[0], rank, world))
        results["outside"] = "no error"
    except ValueError as error:
        results["outside"] = str(error)
    return results


def hsdp_scenario(rank):
    """A 2x2 mesh: replicated over ("replicate"), sharded over ("shard"); == one process."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    data = batches()
    model = make_model()
    ref, _ = train(model, ft.lamb(lr=0.01), data)
    got, _ = train(model, ft.lamb(lr=0.01), data, mesh, rank, 4)
    return {
        "error": torch.tensor(max_relative_error(whole(got).params, ref.params)),
        "local_rows": torch.tensor(got.params["a.weight"].to_local().shape[0]),
        "placements": str(got.params["a.weight"].placements),
    }


def compiled_hsdp_scenario(rank):
    """Compiled on a 2x2 mesh, two microbatches a step: the regather pass moves the shard
    dimension's gathers and reduce-scatters among the replicate dimension's all-reduces."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    data = batches(dtype=torch.float32)
    model = block_model()
    ref, _ = train(model, ft.adamw(lr=0.01), data)
    got, _ = train(model, ft.adamw(lr=0.01), data, mesh, rank, 4, compile=True, microbatches=2)
    return {"error": torch.tensor(max_relative_error(whole(got).params, ref.params))}


def errors_scenario(rank):
    mesh = mesh_1d()
    model = make_model()
    out = {}
    for name, call in {
        "plain_state": lambda: ft.make_train_step(model, loss_fn, ft.sgd(lr=0.1), mesh=mesh)(
            ft.TrainState.create(model, ft.sgd(lr=0.1)), batches(1)[0]
        ),
        "not_a_mesh": lambda: ft.TrainState.create(model, ft.sgd(lr=0.1), mesh="cpu"),
        "unnamed_2d": lambda: ft.make_train_step(model, loss_fn, ft.sgd(lr=0.1), mesh=init_device_mesh("cpu", (1, 2))),
        "complex": lambda: ft.TrainState.create(nn.Linear(2, 2).to(torch.complex64), ft.adam(), mesh=mesh),
    }.items():
        try:
            call()
            out[name] = "no error"
        except (TypeError, ValueError) as error:
            out[name] = f"{type(error).__name__}: {error}"
    return out


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def two_ranks_registry(tmp_path_factory):
    return run_on_ranks(registry_scenario, 2, tmp_path_factory.mktemp("registry"))


@pytest.mark.parametrize("spec", [pytest.param(spec, id=spec.name) for spec in registry.SPECS])
def test_every_optimiser_sharded_over_two_ranks_equals_one_process(two_ranks_registry, spec):
    # float64: only the order of the sums over shards differs from one process, times what the
    # optimiser's own maths makes of a last-bit change
    bound = 1e-12 * spec.rounding_gain
    for rank in two_ranks_registry:
        cases = {k: v for k, v in rank.items() if k.startswith(f"{spec.name}[")}
        assert cases
        for case, (params, opt_state, metrics) in cases.items():
            assert params < bound and opt_state < bound and metrics < bound, (case, params, opt_state, metrics)


def test_params_and_state_are_split_by_rows_small_ones_replicated(tmp_path):
    for world in (2, 4):
        ranks = run_on_ranks(placements_scenario, world, tmp_path / str(world))
        rows = {k: [int(r["local_rows"][k]) for r in ranks] for k in ranks[0]["local_rows"]}
        assert rows["a.weight"] == [8 // world] * world  # even
        assert sum(rows["b.weight"]) == 5 and max(rows["b.weight"]) == -(-5 // world)  # uneven, torch.chunk sizes
        assert rows["c.weight"] == [1] * world and "Replicate" in ranks[0]["placements"]["c.weight"]
        assert "Shard(dim=0)" in ranks[0]["placements"]["a.weight"]
        moments = {k: v for k, v in ranks[0]["state_placements"].items() if k.endswith("u.a.weight")}
        assert len(moments) == 2 and set(moments.values()) == {ranks[0]["placements"]["a.weight"]}, moments


@pytest.mark.slow
def test_compiled_sharded_step_equals_eager_one_process_in_one_graph(tmp_path):
    ranks = run_on_ranks(compiled_scenario, 2, tmp_path)
    for r in ranks:
        assert r["error"] < 1e-5, r["error"]
        assert int(r["graphs"]) == 1
    assert torch.equal(ranks[0]["loss"], ranks[1]["loss"])


@pytest.mark.slow
def test_compiled_units_are_whole_only_while_they_run_with_the_same_numbers(tmp_path):
    for r in run_on_ranks(regather_scenario, 2, tmp_path):
        # four gathered units (the head's one-row weight is replicated, never gathered): without
        # the pass all four are gathered at the start and stay whole into the backward pass; with
        # it, at most the unit running and the next one's gather, issued at its first use
        assert r["without_live"].tolist() == [4] and r["without_gathers"].tolist() == [4], r
        assert r["with_live"].max() <= 2, r["with_live"]
        # the backward pass gathers each block again (not the input layer: the batch does not
        # require grad, so no backward op reads that weight)
        assert r["with_gathers"].tolist() == [4 + 3], r["with_gathers"]
        for name, p in r["with"].items():
            assert torch.equal(p, r["without"][name]), name
        assert r["error"] < 1e-5, r["error"]


def test_the_regather_pass_moves_gathers_to_their_uses_and_gathers_again_for_the_backward():
    """On a graph written by hand: two gathers share a view of one shard (as after CSE); the
    second's use comes later; the last use of the first depends on its first use (a backward use)."""
    from functrain._regather import regather

    aten, c10d = torch.ops.aten, torch.ops._c10d_functional
    graph = torch.fx.Graph()
    shard, x = graph.placeholder("shard"), graph.placeholder("x")
    flat = graph.call_function(aten.reshape.default, (shard, [-1]))
    waits = []
    for _ in range(2):
        gathered = graph.call_function(c10d.all_gather_into_tensor.default, (flat, 2, "0"))
        waits.append(graph.call_function(c10d.wait_tensor.default, (gathered,)))
    h = graph.call_function(aten.tanh.default, (x,))
    w1 = graph.call_function(aten.reshape.default, (waits[0], [4, 4]))
    y = graph.call_function(aten.mm.default, (h, w1))  # the first gather's forward use
    w2 = graph.call_function(aten.reshape.default, (waits[1], [4, 4]))
    z = graph.call_function(aten.mm.default, (y, w2))  # the second gather's
    back = graph.call_function(aten.mm.default, (z, w1))  # depends on y: a backward use
    graph.output((back,))
    regather(graph)  # (lints the graph: every node after what it reads)
    order = [n for n in graph.nodes if n.op == "call_function"]
    gathers = [n for n in order if n.target is c10d.all_gather_into_tensor.default]
    assert len(gathers) == 3  # the second gather has no backward use: no third copy
    name = [n.target.__name__ if hasattr(n.target, "__name__") else str(n.target) for n in order]
    assert name == [
        "tanh.default",  # the gathers moved past the op that does not read them
        "reshape.default",
        "all_gather_into_tensor.default",
        "wait_tensor.default",
        "reshape.default",
        "mm.default",  # y
        "all_gather_into_tensor.default",
        "wait_tensor.default",
        "reshape.default",
        "mm.default",  # z
        "reshape.default",  # gathered again for the backward use, from its own view of the shard
        "all_gather_into_tensor.default",
        "wait_tensor.default",
        "reshape.default",
        "mm.default",  # back
    ], name
    assert back.args[1] is not w1 and back.args[1].args[0].args[0] is gathers[2]


def test_a_sharded_compiled_step_gets_the_regather_pass_unless_the_slot_is_taken():
    from functrain._gemm import GEMM_PASS
    from functrain._regather import REGATHER_PASS
    from functrain.step import _with_graph_passes

    assert _with_graph_passes({}, sharded=True) == {"options": {"post_grad_custom_pre_pass": REGATHER_PASS}}
    both = _with_graph_passes({"mode": "max-autotune", "cpu_gemm": "fastest"}, sharded=True)["options"]
    assert both["post_grad_custom_pre_pass"] is REGATHER_PASS and both["post_grad_custom_post_pass"] is GEMM_PASS
    assert both["max_autotune"] is True  # the mode became its options
    own = {"options": {"post_grad_custom_pre_pass": None}}
    assert _with_graph_passes(own, sharded=True) == own  # the caller's own value (None: no pass) is kept
    assert _with_graph_passes({"backend": "aot_eager"}, sharded=True) == {"backend": "aot_eager"}
    assert _with_graph_passes({}, sharded=False) == {}
    # a precompiled step's key holds the options' repr: it must not be an address
    assert repr(REGATHER_PASS) == "functrain._regather.REGATHER_PASS" and repr(GEMM_PASS) == "functrain._gemm.GEMM_PASS"


def test_microbatches_batchnorm_inplace_eval_and_freezing_sharded(tmp_path):
    ranks = run_on_ranks(options_scenario, 2, tmp_path)
    for r in ranks:
        assert r["microbatches"] < 1e-12 and r["inplace"] < 1e-12 and r["eval"] < 1e-12, r
        assert r["one_tensor_per_bucket"] < 1e-12 and r["model_untouched"], r
        assert r["frozen"] < 1e-12 and r["frozen_unchanged"], r
    assert torch.equal(ranks[0]["batchnorm_buffers_equal_on_ranks"], ranks[1]["batchnorm_buffers_equal_on_ranks"])


def test_each_block_is_whole_only_while_it_runs(tmp_path):
    for r in run_on_ranks(blocks_scenario, 2, tmp_path):
        assert r["equal"] < 1e-12 and r["second_derivatives"] < 1e-12, r
        whole = r["whole_while_running"]
        assert whole.shape == (3 * 3 * 2, 3)  # steps x blocks x microbatches, three blocks each
        assert torch.equal(whole, torch.eye(3, dtype=torch.bool).repeat(6, 1)), whole
        assert r["freed_at_forward_end"] and r["freed_after_the_step"], r
        assert "used outside that block's forward" in r["outside"] and "blocks.1" in r["outside"], r["outside"]


def test_hsdp_on_a_two_by_two_mesh_equals_one_process(tmp_path):
    ranks = run_on_ranks(hsdp_scenario, 4, tmp_path)
    for r in ranks:
        assert r["error"] < 1e-12
        assert int(r["local_rows"]) == 4  # 8 rows over the 2 ranks of the shard dimension
        assert r["placements"] == "(Replicate(), Shard(dim=0))"


@pytest.mark.slow
def test_compiled_hsdp_with_microbatches_equals_one_process(tmp_path):
    for r in run_on_ranks(compiled_hsdp_scenario, 4, tmp_path):
        assert r["error"] < 1e-5, r["error"]  # float32: inductor's rounding


def test_mesh_misuse_is_named(tmp_path):
    errors = run_on_ranks(errors_scenario, 2, tmp_path)[0]
    assert "TrainState.create(model, tx, mesh=mesh)" in errors["plain_state"]
    assert errors["not_a_mesh"].startswith("TypeError") and "DeviceMesh" in errors["not_a_mesh"]
    assert "('replicate', 'shard')" in errors["unnamed_2d"]
    assert errors["complex"].startswith("TypeError") and "complex" in errors["complex"]
