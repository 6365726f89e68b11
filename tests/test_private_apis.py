"""The private torch and torchdata APIs functrain uses (docs/concepts/private-apis.md).

- The page names every private torch API the library's source mentions, and every torchdata
  internal it reads; those internals are read in ``functrain/data/_torchdata.py`` alone.
- The internals are where the installed torchdata keeps them (the canary for a torchdata upgrade),
  and the torchdata requirement keeps its upper bound while they are read.
- Each fallback in ``functrain.data`` works when its internal disappears, simulated by
  monkeypatching: ``Loader.close`` runs the stream out, a process-mode loader refuses to start with
  a clear error, and the per-sample random streams import and run without torch's private samplers.

The fallbacks of the optimiser, tree and GEMM code are tested with those modules.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import pathlib
import re
import threading
import time

import pytest
import torch

import functrain as ft
from functrain.data import _torchdata
from functrain.data._rng import _SAMPLERS, sample_rng

from .harness import Indices

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "functrain"
PAGE = ROOT / "docs" / "concepts" / "private-apis.md"

# A private torch name in the library's source: torch._x, torch._C._y, torch.utils._z,
# torch.distributed._w, torch.ops.mkldnn.v (imports, calls and docstrings alike).
_PRIVATE_TORCH = re.compile(
    r"\btorch\.(?:_C\._\w+\.\w+|_\w+|utils\._\w+|distributed\._\w+|ops\.mkldnn\.\w+)"
    r"|\bfrom torch\.(?:utils\.)?_\w+(?:\.\w+)* import [\w, ]+"
)


def private_torch_names() -> dict[str, set[str]]:
    """``{name: files}`` for each private torch name in functrain/**/*.py; ``torch._foreach_*``
    ops count as one family, and ``from M import a, b as c`` as ``M.a`` and ``M.b``."""
    found: dict[str, set[str]] = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        for match in _PRIVATE_TORCH.finditer(path.read_text()):
            text = match[0]
            if text.startswith("from "):
                module, names = text[len("from ") :].split(" import ")
                names = [f"{module}.{n.split(' as ')[0].strip()}" for n in names.split(",") if n.strip()]
            else:
                names = ["torch._foreach_*" if text.startswith("torch._foreach_") else text]
            for name in names:
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def test_the_page_names_every_private_torch_api_the_library_mentions():
    page = PAGE.read_text()
    names = private_torch_names()
    assert "torch._fused_adamw_" in names and "torch._foreach_*" in names, "the scan found nothing: the regex broke"
    missing = {name: sorted(files) for name, files in names.items() if name not in page}
    assert not missing, f"private APIs used but not on {PAGE.relative_to(ROOT)}: {missing}"


def test_torchdata_internals_are_read_in_one_module_and_on_the_page():
    page = PAGE.read_text()
    attributes = ("_it", *_torchdata.THREAD_ATTRIBUTES, *_torchdata.MAPPER_ATTRIBUTES)
    for name in attributes:
        assert f"`{name}`" in page, f"{name} is read from torchdata but not on the page"
    # Anywhere else in the library, `x._stop` etc. is a read of torchdata's internals (an object's
    # own attributes, `self._x`, are its own business).
    reads = re.compile(r"(?<!self)\.(" + "|".join(attributes) + r")\b")
    for path in sorted(LIBRARY.rglob("*.py")):
        if path.name == "_torchdata.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not reads.search(line), f"{path.relative_to(ROOT)}:{number} reads torchdata internals: {line}"


def test_the_torchdata_requirement_is_bounded_while_its_internals_are_read():
    tomllib = pytest.importorskip("tomllib")
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (requirement,) = [d.replace(" ", "") for d in dependencies if re.match(r"torchdata\b", d)]
    assert requirement == _torchdata.SUPPORTED == "torchdata>=0.11,<0.12"
    installed = tuple(int(part) for part in re.findall(r"\d+", _torchdata.VERSION)[:2])
    assert (0, 11) <= installed < (0, 12), f"torchdata {_torchdata.VERSION} is outside {_torchdata.SUPPORTED}"


# ----------------------------------------------------------------------------- torchdata's internals


def started(num_workers: int, **kwargs) -> tuple[ft.data.Loader, list]:
    """A loader one batch into its first epoch, and the batch."""
    loader = ft.data.make_loader(Indices(20), 4, seed=0, num_workers=num_workers, **kwargs)
    return loader, [next(iter(loader)).tolist()]


def test_the_internals_read_are_where_this_torchdata_keeps_them():
    inline, _ = started(num_workers=0)  # a Prefetcher, and the mapping inline
    try:
        (prefetcher,) = inline._threaded
        assert _torchdata.thread_iterator(prefetcher) not in (None, _torchdata.UNKNOWN)
        assert _torchdata.stop(inline._threaded, None)
    finally:
        inline.close()
    parallel, _ = started(num_workers=2)  # a ParallelMapper with worker threads
    try:
        assert _torchdata.mapper_iterator(parallel._mapper) not in (None, _torchdata.UNKNOWN)
        assert _torchdata.dead_worker(parallel._mapper) is None  # every worker alive
        assert _torchdata.stop([], parallel._mapper)
    finally:
        parallel.close()


def without_internals(monkeypatch) -> None:
    """Simulates a torchdata that no longer keeps an attribute functrain reads."""
    monkeypatch.setattr(_torchdata, "THREAD_ATTRIBUTES", (*_torchdata.THREAD_ATTRIBUTES, "_gone"))
    monkeypatch.setattr(_torchdata, "MAPPER_ATTRIBUTES", (*_torchdata.MAPPER_ATTRIBUTES, "_gone"))


# Loader.close's fallback warning: names the installed torchdata and the supported range.
RAN_OUT = f"torchdata {re.escape(_torchdata.VERSION)} .*{re.escape(_torchdata.SUPPORTED)}"


def wait_until(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("num_workers", [0, 2])
def test_close_runs_the_stream_out_when_torchdatas_internals_moved(monkeypatch, num_workers):
    reference_loader = ft.data.make_loader(Indices(20), 4, seed=0, num_workers=num_workers)
    reference = [b.tolist() for _ in range(2) for b in reference_loader]
    reference_loader.close()
    without_internals(monkeypatch)
    before = set(threading.enumerate())
    with pytest.warns(RuntimeWarning, match="timeout=600 is not enforced"):  # the timeout rides on the same internals
        loader, got = started(num_workers)
    ours = {t for t in threading.enumerate() if t not in before}
    assert ours, "the pipeline started no thread"
    assert not _torchdata.stop(loader._threaded, loader._mapper)  # detected: nothing touched
    with pytest.warns(RuntimeWarning, match=RAN_OUT):
        loader.close()
    # Each node stops its threads at the end of its stream, within torchdata's queue timeout.
    assert wait_until(lambda: not any(t.is_alive() for t in ours)), [t for t in ours if t.is_alive()]
    got.extend(b.tolist() for b in loader)  # restarted at the cursor: nothing lost, nothing replayed
    got.extend(b.tolist() for b in loader)
    assert got == reference
    with pytest.warns(RuntimeWarning, match=RAN_OUT):
        loader.close()


class FailsAt(Indices):
    def __init__(self, n: int, bad: int):
        super().__init__(n)
        self.bad = bad

    def __getitem__(self, i):
        if i == self.bad:
            raise ValueError("a bad sample")
        return i


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_failing_sample_still_raises_and_the_pipeline_still_stops_when_torchdatas_internals_moved(
    monkeypatch, num_workers
):
    without_internals(monkeypatch)
    before = set(threading.enumerate())
    loader = ft.data.make_loader(FailsAt(20, bad=5), 4, shuffle=False, num_workers=num_workers)
    with pytest.warns(RuntimeWarning, match=RAN_OUT), pytest.raises(ft.data.SampleError, match="sample 5"):
        list(loader)  # the error closes the loader: the stream is run out behind the failed batch
    ours = {t for t in threading.enumerate() if t not in before}
    assert wait_until(lambda: not any(t.is_alive() for t in ours)), [t for t in ours if t.is_alive()]


FORK = "fork" in multiprocessing.get_all_start_methods()


@pytest.mark.slow
@pytest.mark.skipif(not FORK, reason="process tests use the fork start method")
def test_process_workers_refuse_to_start_when_torchdatas_internals_moved(monkeypatch):
    without_internals(monkeypatch)
    before = set(multiprocessing.active_children())
    loader = ft.data.make_loader(Indices(20), 4, worker_method="process", multiprocessing_context="fork")
    box: dict = {}

    def first_batch():
        try:
            box["value"] = next(iter(loader))
        except Exception as error:  # noqa: BLE001 - handed to the test
            box["error"] = error

    thread = threading.Thread(target=first_batch, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "still running after 30 s: the loader hangs"
    error = box.get("error")
    assert isinstance(error, RuntimeError), box
    assert f"torchdata {_torchdata.VERSION}" in str(error) and "worker_method='thread'" in str(error)
    assert _torchdata.SUPPORTED in str(error)
    # The workers it had started ran the stream out and left.
    assert wait_until(lambda: not set(multiprocessing.active_children()) - before)
    loader.close()  # nothing running: no fallback, no warning


# ----------------------------------------------------------------------------- torch's private samplers


def load_rng_module_without(monkeypatch, *names: str):
    """functrain/data/_rng.py imported afresh (not into sys.modules) from a torch without ``names``."""
    for name in names:
        monkeypatch.delattr(torch, name)
    spec = importlib.util.spec_from_file_location("_rng_without_private_samplers", LIBRARY / "data" / "_rng.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_rng_mode_imports_and_runs_without_torchs_private_samplers(monkeypatch):
    module = load_rng_module_without(monkeypatch, "_standard_gamma", "_sample_dirichlet")
    monkeypatch.undo()  # torch whole again; the module loaded without them keeps working
    assert module._SAMPLERS == _SAMPLERS - {torch._standard_gamma, torch._sample_dirichlet}
    state = torch.get_rng_state()
    with module.sample_rng(7):
        a = torch.rand(3)
    with module.sample_rng(7):
        b = torch.rand(3)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)


def test_beta_gamma_and_dirichlet_draws_are_redirected():
    """torch.distributions samples Gamma, Dirichlet and Beta (MixUp's and CutMix's mixing weight)
    through torch's private samplers: a torch that renames them fails here, not in a user's run."""
    state = torch.get_rng_state()
    runs = []
    for _ in range(2):
        with sample_rng(5):
            runs.append(
                (
                    torch.distributions.Beta(torch.tensor(0.5), torch.tensor(0.5)).sample((4,)),
                    torch.distributions.Gamma(torch.tensor(2.0), torch.tensor(1.0)).sample((3,)),
                    torch.distributions.Dirichlet(torch.ones(3)).sample(),
                )
            )
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert torch.equal(torch.get_rng_state(), state), "a draw went to torch's global generator"


# ----------------------------------------------------------------------------- torch fallbacks outside functrain.data


def _eager_run(make, steps=3):
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    tx = make()
    state = tx.init(params)
    for _ in range(steps):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
        updates, state = tx.update(grads, state, params)
        params = ft.apply_updates(params, updates)
    return params


@pytest.mark.parametrize(
    "make",
    [
        lambda: ft.chain(ft.clip_by_global_norm(0.5), ft.adam(lr=0.1, weight_decay=0.1)),
        lambda: ft.rmsprop(lr=0.01, momentum=0.9, centered=True),
        lambda: ft.sgd(lr=0.1, momentum=0.9, nesterov=True),
    ],
    ids=["clip-adam", "rmsprop", "sgd"],
)
def test_without_torchs_foreach_ops_the_per_leaf_reference_runs(monkeypatch, make):
    from functrain import _tree

    expected = _eager_run(make)
    monkeypatch.setattr(_tree, "_HAS_FOREACH", False)
    for op in ("_foreach_add", "_foreach_mul", "_foreach_norm", "_foreach_lerp"):
        monkeypatch.delattr(torch, op)  # a call that slipped past the check would now fail
    assert not _tree.fast_path_ok([torch.ones(2)])
    actual = _eager_run(make)
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=1e-6, atol=1e-7)


def test_without_torchs_assert_async_apply_if_finite_still_raises_in_eager_mode(monkeypatch):
    from functrain.wrappers import _finite

    monkeypatch.setattr(_finite, "_ASSERT_ASYNC", None)
    tx = ft.apply_if_finite(ft.sgd(lr=0.1), max_consecutive_errors=1)
    params = {"w": torch.ones(2)}
    state = tx.init(params)
    nan = {"w": torch.full((2,), float("nan"))}
    updates, state = tx.update(nan, state, params)  # one non-finite step is allowed
    assert torch.equal(updates["w"], torch.zeros(2))
    with pytest.raises(RuntimeError, match="non-finite"):
        tx.update(nan, state, params)


def test_without_inductors_pass_hooks_the_gemm_opt_in_warns_and_stays_on_aten(monkeypatch):
    import sys

    from functrain.step import _with_graph_passes

    monkeypatch.setitem(sys.modules, "functrain._gemm", None)  # importing it now raises ImportError
    with pytest.warns(RuntimeWarning, match="every GEMM stays on ATen"):
        options = _with_graph_passes({"cpu_gemm": "fastest", "fullgraph": True}, sharded=False)
    assert options == {"fullgraph": True}


def test_without_inductors_pre_pass_slot_a_sharded_step_warns_and_compiles_without_the_regather_pass(monkeypatch):
    from torch._inductor import config

    from functrain.step import _with_graph_passes

    monkeypatch.delattr(config, "post_grad_custom_pre_pass")
    expected = "regather pass is unavailable.*every parameter is gathered whole for the whole step"
    with pytest.warns(RuntimeWarning, match=expected):
        options = _with_graph_passes({"fullgraph": True}, sharded=True)
    assert options == {"fullgraph": True}


def test_without_the_functional_collective_ops_the_regather_pass_leaves_the_graph_alone(monkeypatch):
    from functrain import _regather

    c10d = torch.ops._c10d_functional  # (the graph holds the ops themselves, whatever the namespace says later)

    def graph_with_a_gather_before_an_op_that_does_not_read_it():
        graph = torch.fx.Graph()
        shard, x = graph.placeholder("shard"), graph.placeholder("x")
        gathered = graph.call_function(c10d.all_gather_into_tensor.default, (shard, 2, "0"))
        wait = graph.call_function(c10d.wait_tensor.default, (gathered,))
        h = graph.call_function(torch.ops.aten.tanh.default, (x,))
        graph.output((graph.call_function(torch.ops.aten.mul.Tensor, (h, wait)),))
        return graph

    graph = graph_with_a_gather_before_an_op_that_does_not_read_it()
    before = str(graph)
    _regather.regather(graph)
    assert str(graph) != before  # with the ops, the gather moves down to its use
    monkeypatch.setattr(torch.ops, "_c10d_functional", object())  # no ops by those names
    graph = graph_with_a_gather_before_an_op_that_does_not_read_it()
    _regather.regather(graph)
    assert str(graph) == before
