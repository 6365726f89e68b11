"""Precompiled steps (functrain/_precompile.py, ``compile={"precompile": True}``): a step's whole compile, trace
included, saved in the compile cache file and loaded by a fresh process, which then traces nothing and continues
bitwise. A saved trace is served only to the step it was traced from: a changed hyperparameter, a changed global
constant of the user's module, an edited source file or a new input shape each make the step trace afresh, and its
numbers are then those of the changed step, never the saved one's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import functrain as ft

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # each case compiles in a fresh process

# The user's module: the loss reads a module-level constant, which dynamo bakes into the trace (and whose guard
# torch's precompile drops). UNPICKLABLE=1 adds a module-level value functrain cannot compare across processes.
USER_MODULE = """
import os
import threading

import torch.nn.functional as F

SCALE = float(os.environ.get("SCALE", "1.0"))
if os.environ.get("UNPICKLABLE") == "1":
    LOCK = threading.Lock()


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y) * SCALE
"""

# Loads the compile cache file, trains three AdamW steps with a precompiled step (the same three batches in every
# process unless BATCH changes their size), evaluates once with a precompiled eval step, saves the file when asked,
# and reports whether it traced, how far it is from the eager step, and the warnings it gave.
SCRIPT = """
import json, os, sys, warnings
sys.path.insert(0, {repo!r})
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
torch.set_num_threads(1)
from torch import nn
import functrain as ft
import userloss

mode, cache, out = sys.argv[1:4]
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
g = torch.Generator().manual_seed(1)
size = int(os.environ.get("BATCH", "16"))
batches = [(torch.randn(size, 8, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(3)]
tx = ft.adamw(lr=float(os.environ.get("LR", "1e-2")), weight_decay=1e-2)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    report = {{"loaded": ft.load_compile_cache(cache)}}
    step = ft.make_train_step(model, userloss.loss_fn, tx, compile={{"precompile": True}})
    state = ft.TrainState.create(model, tx)
    for batch in batches:
        state, _ = step(state, batch)
    evaluate = ft.make_eval_step(model, userloss.loss_fn, compile={{"precompile": True}})
    report["eval"] = evaluate(state, batches[0])["loss"].item()
    if mode == "save":
        report["saved"] = ft.save_compile_cache(cache) is not None
traced = torch._dynamo.utils.compilation_time_metrics
report["traced"] = any(k in traced for k in ("bytecode_tracing", "fullgraph_capture"))
eager, reference = ft.make_train_step(model, userloss.loss_fn, tx), ft.TrainState.create(model, tx)
for batch in batches:
    reference, _ = eager(reference, batch)
report["from_eager"] = max((a - b).abs().max().item() for a, b in zip(state.params.values(), reference.params.values()))
report["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
torch.save(state.params, out)
print(json.dumps(report))
"""


def run(directory: Path, name: str, mode: str, cache: Path, **env: str) -> tuple[dict, dict]:
    """The script in a fresh process with new, empty compile cache directories; its report and params."""
    (directory / "train.py").write_text(textwrap.dedent(SCRIPT.format(repo=str(REPO))))
    caches = directory / f"caches-{name}"
    environ = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
        "TRITON_CACHE_DIR": str(caches / "triton"),
        **env,
    }
    out = directory / f"{name}.pt"
    args = [sys.executable, str(directory / "train.py"), mode, str(cache), str(out)]
    done = subprocess.run(args, env=environ, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), torch.load(out)


def user_module(directory: Path, text: str = USER_MODULE) -> None:
    (directory / "userloss.py").write_text(textwrap.dedent(text))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict, dict]:
    """A first run's compile cache file (its precompiled steps inside), its params and its report."""
    directory = tmp_path_factory.mktemp("precompiled")
    user_module(directory)
    report, params = run(directory, "first", "save", directory / "compile-cache.bin")
    assert report["saved"] and report["traced"] and not report["loaded"] and not report["warnings"], report
    return directory / "compile-cache.bin", params, report


def copy_of(saved: tuple[Path, dict, dict], tmp_path: Path) -> Path:
    """The saved file in a directory of the test's own, with the user's module as the first run had it."""
    cache = tmp_path / "compile-cache.bin"
    cache.write_bytes(saved[0].read_bytes())
    user_module(tmp_path)
    return cache


def test_a_fresh_process_loads_the_precompiled_step_traces_nothing_and_continues_bitwise(saved, tmp_path):
    report, params = run(tmp_path, "again", "load", copy_of(saved, tmp_path))
    assert report["loaded"] and not report["traced"] and not report["warnings"], report  # train and eval steps
    for name, value in saved[1].items():
        assert torch.equal(params[name], value), name
    assert report["eval"] == saved[2]["eval"]


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"LR": "3e-2"}, id="a-hyperparameter"),
        pytest.param({"SCALE": "4.0"}, id="a-global-constant-of-the-users-module"),
        pytest.param({"BATCH": "12"}, id="the-input-shapes"),
        pytest.param({"EDIT": "1"}, id="the-source-of-the-users-module"),
    ],
)
def test_a_changed_step_is_not_served_the_saved_trace_and_computes_its_own_numbers(saved, tmp_path, change):
    cache = copy_of(saved, tmp_path)
    if change.pop("EDIT", None):  # the same code with one comment more: any edit of a traced file counts
        user_module(tmp_path, USER_MODULE + "\n# edited\n")
    report, params = run(tmp_path, "changed", "load", cache, **change)
    assert report["loaded"] and report["traced"] and not report["warnings"], report
    # compiled against eager: rounding (the first run's numbers would be a whole step away, except for an edit)
    assert report["from_eager"] < 1e-5, report
    if "BATCH" in change or "LR" in change or "SCALE" in change:
        assert any(not torch.equal(params[k], v) for k, v in saved[1].items())


def test_a_step_whose_module_cannot_be_compared_runs_compiled_and_says_why_it_was_not_saved(tmp_path):
    user_module(tmp_path)
    report, _ = run(tmp_path, "lock", "save", tmp_path / "compile-cache.bin", UNPICKLABLE="1")
    assert report["traced"] and report["from_eager"] < 1e-5, report
    assert any("userloss.LOCK" in w and "cannot be saved" in w for w in report["warnings"]), report["warnings"]


def test_precompile_must_be_a_bool():
    model, tx = torch.nn.Linear(2, 1), ft.adamw(1e-2)
    with pytest.raises(ValueError, match=r"compile\['precompile'\] must be True or False, got 'yes'"):
        ft.make_train_step(model, lambda m, b: m(b).sum(), tx, compile={"precompile": "yes"})


def tiny_problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(2)]
    return model, ft.adamw(1e-2), lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]), batches


def train(step, model, tx, batches):
    state = ft.TrainState.create(model, tx)
    for batch in batches:
        state, _ = step(state, batch)
    return state


def test_without_torchs_precompile_the_step_compiles_as_usual_and_says_so(monkeypatch):
    import torch._dynamo.aot_compile

    def missing(*args, **kwargs):
        raise AttributeError("simulated: this torch has no AOT precompile")

    monkeypatch.setattr(torch._dynamo.aot_compile, "aot_compile_fullgraph", missing)
    model, tx, loss, batches = tiny_problem()
    with pytest.warns(RuntimeWarning, match=r"compile\['precompile'\] is off for this step: torch could not precom"):
        state = train(ft.make_train_step(model, loss, tx, compile={"precompile": True}), model, tx, batches)
    reference = train(ft.make_train_step(model, loss, tx), model, tx, batches)
    for name, value in reference.params.items():
        torch.testing.assert_close(state.params[name], value, rtol=1e-5, atol=1e-6)


def test_a_trace_that_cannot_be_saved_still_serves_this_process_and_the_file_holds_the_rest(monkeypatch, tmp_path):
    import torch._dynamo.aot_compile

    model, tx, loss, batches = tiny_problem()
    step = ft.make_train_step(model, loss, tx, compile={"precompile": True})
    state = train(step, model, tx, batches[:1])
    monkeypatch.delattr(torch._dynamo.aot_compile, "AOTCompilePickler")  # the pickler the key is made with
    with pytest.warns(RuntimeWarning, match=r"its trace cannot be saved \((NameError|ImportError)"):
        path = ft.save_compile_cache(tmp_path / "compile-cache.bin")
    with zipfile.ZipFile(path) as archive:
        manifest = json.loads(archive.read("functrain.json"))
    assert manifest["kernels"] and manifest["steps"] == []
    traced = dict(torch._dynamo.utils.compilation_time_metrics)
    state, _ = step(state, batches[1])  # the trace made before serves the next call: nothing is traced again
    assert dict(torch._dynamo.utils.compilation_time_metrics) == traced


def test_a_module_value_changed_after_the_trace_is_reported_when_the_trace_is_saved(tmp_path, monkeypatch):
    """A precompiled trace keeps the module-level values it was traced with (torch's precompile drops those
    guards): the change cannot be seen per call, so saving says so, and the file records what was traced."""
    (tmp_path / "annealed.py").write_text(
        "import torch\nSCALE = 1.0\n\ndef loss_fn(m, b):\n    return m(b).pow(2).mean() * SCALE\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import annealed

    model, tx = torch.nn.Linear(3, 1), ft.sgd(0.1)
    step = ft.make_train_step(model, annealed.loss_fn, tx, compile={"precompile": True})
    state, _ = step(ft.TrainState.create(model, tx), torch.randn(4, 3))
    monkeypatch.setattr(annealed, "SCALE", 2.0)
    with pytest.warns(RuntimeWarning, match=r"module-level values of annealed changed after the step was traced"):
        path = ft.save_compile_cache(tmp_path / "compile-cache.bin")
    monkeypatch.setattr(annealed, "SCALE", 1.0)  # as traced: a later process with SCALE = 1.0 may use the trace
    with zipfile.ZipFile(path) as archive:
        (entry,) = json.loads(archive.read("functrain.json"))["steps"]
    assert entry["globals"]["annealed"] == ft._precompile._globals_digests(["annealed"])["annealed"]
