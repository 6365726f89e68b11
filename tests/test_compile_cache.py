"""Warm starts (functrain/compile_cache.py): a compiled run saves what it compiled beside its checkpoints, and a
run resumed in a fresh process with an empty inductor cache directory compiles nothing: every graph and kernel is
found in the file, and the run ends bitwise equal to an uninterrupted one. A file that cannot be used is ignored
with a warning that says why, and nothing of it reaches torch's caches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

import functrain as ft
from functrain import compile_cache
from functrain.compile_cache import COMPILE_CACHE
from tests.test_loop import assert_bitwise_equal

REPO = Path(__file__).resolve().parent.parent

# A 16-32-4 MLP trained with AdamW by a compiled step, 64 samples in shuffled batches of 16 (4 steps per epoch).
# mode "fit": ft.fit to 8 steps with a Checkpoint every 2 steps, resuming from `resume` when given.
# mode "script": no fit: ft.load_compile_cache(`resume`), then one compiled step, then ft.save_compile_cache(out).
# Each process reports its compile cache counters and the result.
SCRIPT = """
import json, sys
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
from torch import nn
import functrain as ft
from tests.test_loop import ShuffledLoader, classification

mode, directory, resume, out = sys.argv[1:5]
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
g = torch.Generator().manual_seed(1)
loader = ShuffledLoader(torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g), batch_size=16)
tx = ft.adamw(lr=1e-2, weight_decay=1e-2)
step = ft.make_train_step(model, classification, tx, compile=True)
report = {{}}
if mode == "fit":
    checkpoint = ft.callbacks.Checkpoint(directory, every_steps=2, every_epochs=None, keep=10)
    state, history = ft.fit(
        step, ft.TrainState.create(model, tx), loader, steps=8, callbacks=[], checkpoint=checkpoint,
        resume=resume or False, log_every=2, device="cpu",
    )
    torch.save({{"state": state, "history": history}}, out)
else:
    report["loaded"] = ft.load_compile_cache(resume)
    state, _ = step(ft.TrainState.create(model, tx), next(iter(loader)))
    report["saved"] = str(ft.save_compile_cache(out))
counters = torch._dynamo.utils.counters
report["inductor"] = dict(counters["inductor"])
report["aot_autograd"] = dict(counters["aot_autograd"])
print(json.dumps(report))
"""


def run(tmp_path: Path, name: str, *args: str) -> dict:
    """Runs the script in a fresh process whose inductor (and triton) cache directories are new and empty,
    with torch's compile caches on; returns its report and the cache directory."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT.format(repo=str(REPO))))
    caches = tmp_path / f"caches-{name}"
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
        "TRITON_CACHE_DIR": str(caches / "triton"),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
    }
    done = subprocess.run([sys.executable, str(script), *args], env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "cache_dir": caches / "inductor"}


def kernels_in(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as archive:
        return set(json.loads(archive.read("functrain.json"))["kernels"])


def libraries_in(cache_dir: Path) -> set[str]:
    return {f"{p.parent.name}/{p.name}" for p in cache_dir.glob("??/*.so")}


def assert_compiled_nothing(report: dict, kernels: set[str]) -> None:
    """Every graph came from the caches (inductor's FX graph cache and AOTAutograd's), and no C++ compiler ran:
    each library in the process's cache directory is one the compile cache file brought."""
    inductor, aot = report["inductor"], report["aot_autograd"]
    assert inductor.get("fxgraph_cache_hit", 0) >= 1 and inductor.get("fxgraph_cache_miss", 0) == 0, inductor
    assert aot.get("autograd_cache_hit", 0) >= 1 and aot.get("autograd_cache_miss", 0) == 0, aot
    built = libraries_in(report["cache_dir"]) - kernels
    assert not built, f"compiled with the C++ compiler although the file holds them: {sorted(built)}"


@pytest.mark.slow
def test_a_resumed_compiled_fit_finds_every_graph_and_kernel_in_the_file_and_continues_bitwise(tmp_path):
    """Run 1 trains 8 compiled steps cold, with checkpoints every 2 steps and the compile cache beside them. Run 2,
    a new process with another empty inductor cache directory, resumes from step 4's checkpoint: it loads the file
    before its first step, compiles nothing (all cache hits, no C++ compile) and ends bitwise equal to run 1. Run 3,
    a script without fit, does the same through ft.load_compile_cache and ft.save_compile_cache."""
    directory = tmp_path / "ckpt"
    full = run(tmp_path, "full", "fit", str(directory), "", str(tmp_path / "full.pt"))
    assert full["inductor"].get("fxgraph_cache_miss", 0) >= 1  # run 1 compiled cold
    cache_file = directory / COMPILE_CACHE
    kernels = kernels_in(cache_file)
    assert any(name.endswith(".so") and not name.endswith(".so.load_ok") for name in kernels)
    assert sorted(p.name for p in directory.glob("step-*.pt"))[:2] == ["step-00000002.pt", "step-00000004.pt"]
    before = cache_file.read_bytes()

    resumed = run(
        tmp_path, "resumed", "fit", str(directory), str(directory / "step-00000004.pt"), str(tmp_path / "r.pt")
    )
    assert_compiled_nothing(resumed, kernels)
    assert cache_file.read_bytes() == before  # nothing new was compiled: the file was left as it was
    expected = torch.load(tmp_path / "full.pt", weights_only=True)
    result = torch.load(tmp_path / "r.pt", weights_only=True)
    assert int(result["state"].step) == 8
    assert_bitwise_equal(result["state"], expected["state"])  # params, buffers, opt_state, step
    assert result["history"] == expected["history"]

    again = tmp_path / "again.bin"
    script = run(tmp_path, "script", "script", "", str(cache_file), str(again))
    assert script["loaded"] is True and script["saved"] == str(again)
    assert_compiled_nothing(script, kernels)
    # What a process used from the caches it records again: the graphs and kernels of the step it ran.
    assert kernels_in(again) == kernels


# ----------------------------------------------------------------------------- files that cannot be used


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """An empty inductor cache directory for this test (inductor reads the variable at each use)."""
    path = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(path))
    return path


def fake_compiled(monkeypatch, tmp_path: Path, keys: dict[str, list[str]], kernels: dict[str, bytes]) -> None:
    """Makes this process look as if it had compiled graphs with these keys and these C++ kernels."""
    source = tmp_path / "built"
    files = {}
    for name, data in kernels.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
        files[name] = source / name
    pairs = frozenset((kind, key) for kind, names in keys.items() for key in names)
    blob = json.dumps(sorted(pairs)).encode()
    monkeypatch.setattr(compile_cache, "_artifacts", lambda: (blob if pairs else None, pairs))
    monkeypatch.setattr(compile_cache, "_kernels", lambda: files)


def contents(path: Path) -> tuple[list[dict], dict[str, bytes]]:
    with zipfile.ZipFile(path) as archive:
        manifest = json.loads(archive.read("functrain.json"))
        return manifest["blobs"], {name: archive.read(f"kernels/{name}") for name in manifest["kernels"]}


def test_save_merges_with_the_file_keeps_what_this_process_did_not_use_and_rewrites_only_when_something_is_new(
    tmp_path, monkeypatch
):
    path = tmp_path / COMPILE_CACHE
    fake_compiled(monkeypatch, tmp_path, {"inductor": ["a"]}, {"ab/cab.so": b"A"})
    assert ft.save_compile_cache(path) == path
    written = path.stat().st_mtime_ns, path.read_bytes()
    assert ft.save_compile_cache(path) == path  # nothing new: the file is left as it was
    assert (path.stat().st_mtime_ns, path.read_bytes()) == written

    # Another process compiled a graph of its own (an evaluation step) and did not use the first one.
    fake_compiled(monkeypatch, tmp_path, {"inductor": ["b"]}, {"bc/cbc.so": b"B"})
    ft.save_compile_cache(path)
    blobs, kernels = contents(path)
    assert [b["keys"] for b in blobs] == [{"inductor": ["b"]}, {"inductor": ["a"]}]
    assert kernels == {"ab/cab.so": b"A", "bc/cbc.so": b"B"}

    # A process that used both records both: the entries it covers are dropped, so the file does not grow.
    fake_compiled(monkeypatch, tmp_path, {"inductor": ["a", "b"], "aot_autograd": ["c"]}, {})
    ft.save_compile_cache(path)
    blobs, kernels = contents(path)
    assert [b["keys"] for b in blobs] == [{"aot_autograd": ["c"], "inductor": ["a", "b"]}]
    assert set(kernels) == {"ab/cab.so", "bc/cbc.so"}


def test_nothing_compiled_writes_nothing(tmp_path, monkeypatch):
    fake_compiled(monkeypatch, tmp_path, {}, {})
    assert ft.save_compile_cache(tmp_path / COMPILE_CACHE) is None
    assert not (tmp_path / COMPILE_CACHE).exists()
    assert ft.load_compile_cache(tmp_path / COMPILE_CACHE) is False  # no file: a first run, no warning


def a_valid_file(tmp_path: Path, monkeypatch) -> Path:
    fake_compiled(monkeypatch, tmp_path, {"inductor": ["a"]}, {"ab/cab.so": b"\x7fELF" + bytes(1000)})
    return ft.save_compile_cache(tmp_path / COMPILE_CACHE)


def rewrite_manifest(path: Path, change) -> None:
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    manifest = json.loads(members["functrain.json"])
    change(manifest)
    members["functrain.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def flip_a_kernel_byte(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("kernels/ab/cab.so")
    data = bytearray(path.read_bytes())
    # The member's data follows its 30-byte local header, name and extra field; stored compressed.
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, message",
    [
        (flip_a_kernel_byte, "truncated or corrupted"),
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated or corrupted"),
        (lambda p: p.write_text("not a compile cache"), "is not a functrain compile cache"),
        (lambda p: rewrite_manifest(p, lambda m: m.update(torch="1.0.0")), "written by torch 1.0.0"),
        (lambda p: rewrite_manifest(p, lambda m: m.update(format="other/9")), "its format is 'other/9'"),
        (lambda p: rewrite_manifest(p, lambda m: m["kernels"].append("../../evil.so")), "its index is malformed"),
        (lambda p: rewrite_manifest(p, lambda m: m["kernels"].append("zz/missing.so")), "is missing"),
    ],
    ids=["flipped-bit", "truncated", "not-a-zip", "other-torch", "other-format", "path-traversal", "missing-member"],
)
def test_a_file_that_cannot_be_used_is_ignored_with_a_warning_and_nothing_reaches_the_cache(
    tmp_path, monkeypatch, cache_dir, damage, message
):
    path = a_valid_file(tmp_path, monkeypatch)
    damage(path)
    loaded = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: loaded.append(data))
    with pytest.warns(RuntimeWarning, match=f"load_compile_cache: ignoring .*{message}.*the step compiles afresh"):
        assert ft.load_compile_cache(path) is False
    assert not loaded
    assert not cache_dir.exists() or not any(cache_dir.rglob("*"))
    assert not (tmp_path / "evil.so").exists()


def test_graphs_torch_cannot_read_are_ignored_with_a_warning(tmp_path, monkeypatch, cache_dir):
    path = a_valid_file(tmp_path, monkeypatch)  # its "graphs" are not torch's mega-cache format
    with pytest.warns(RuntimeWarning, match="load_cache_artifacts could not read its compiled graphs"):
        assert ft.load_compile_cache(path) is False


def test_kernels_go_into_the_cache_directory_without_replacing_a_file_there(tmp_path, monkeypatch, cache_dir):
    path = a_valid_file(tmp_path, monkeypatch)
    (cache_dir / "ab").mkdir(parents=True)
    (cache_dir / "ab" / "cab.so").write_bytes(b"the user's")
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: torch.compiler.CacheInfo())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ft.load_compile_cache(path) is True
    assert (cache_dir / "ab" / "cab.so").read_bytes() == b"the user's"
    (cache_dir / "ab" / "cab.so").unlink()
    assert ft.load_compile_cache(path) is True
    assert (cache_dir / "ab" / "cab.so").read_bytes() == b"\x7fELF" + bytes(1000)
    assert sorted(p.name for p in (cache_dir / "ab").iterdir()) == ["cab.so"]  # no temporary left


def test_without_inductors_code_cache_internals_the_file_holds_the_graphs_and_a_warning_says_so(
    tmp_path, monkeypatch, cache_dir
):
    """The private API the kernels are found through (docs/concepts/private-apis.md) removed: the graphs are
    saved, the kernels are not, and the warning says what that costs."""
    from torch._inductor import codecache

    monkeypatch.delattr(codecache, "CppCodeCache")
    with pytest.warns(RuntimeWarning, match="holds the compiled graphs but not their CPU kernels"):
        assert compile_cache._kernels() == {}


class CompilesAtItsFirstStep(ft.Callback):
    """Makes the process look as if the fit's step had compiled at its first call."""

    def __init__(self, monkeypatch, tmp_path):
        self.monkeypatch, self.tmp_path = monkeypatch, tmp_path

    def on_step_end(self, loop):
        if loop.step == 1:
            fake_compiled(self.monkeypatch, self.tmp_path, {"inductor": ["a"]}, {"ab/cab.so": b"A"})


def linear_fit(directory: Path, callbacks, epochs: int = 3, **checkpoint):
    model = torch.nn.Linear(3, 1)
    tx = ft.sgd(lr=0.1)
    data = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(3)]
    step = ft.make_train_step(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), tx)
    checkpoint = ft.callbacks.Checkpoint(directory, every_epochs=1, keep=1, **checkpoint)
    ft.fit(
        step,
        ft.TrainState.create(model, tx),
        data,
        epochs=epochs,
        callbacks=callbacks,
        checkpoint=checkpoint,
        device="cpu",
    )


def test_checkpoint_keeps_the_compile_cache_and_sweeps_only_its_temporaries(tmp_path, monkeypatch):
    """Checkpoint writes the file before each checkpoint once the fit has compiled, never prunes it, and sweeps a
    killed save's temporary of it; compile_cache=False neither writes nor reads it."""
    directory = tmp_path / "ckpt"
    directory.mkdir()
    dead = directory / f".{COMPILE_CACHE}.functrain-{ft.checkpoint._host()}-999999999-abcd1234.tmp"
    dead.write_bytes(b"torn")
    fake_compiled(monkeypatch, tmp_path, {}, {})
    linear_fit(directory, [CompilesAtItsFirstStep(monkeypatch, tmp_path)])
    assert sorted(p.name for p in directory.iterdir()) == [COMPILE_CACHE, "step-00000009.pt"]
    assert [b["keys"] for b in contents(directory / COMPILE_CACHE)[0]] == [{"inductor": ["a"]}]

    off = tmp_path / "off"
    calls = []
    monkeypatch.setattr(ft.callbacks, "load_compile_cache", lambda path: calls.append(path))
    fake_compiled(monkeypatch, tmp_path, {}, {})
    linear_fit(off, [CompilesAtItsFirstStep(monkeypatch, tmp_path)], epochs=1, compile_cache=False)
    assert sorted(p.name for p in off.iterdir()) == ["step-00000003.pt"] and not calls
    with pytest.raises(TypeError, match="Checkpoint: compile_cache must be a bool"):
        ft.callbacks.Checkpoint(off, compile_cache=1)


def test_an_eager_fit_writes_no_compile_cache_in_a_process_that_compiled_other_things(tmp_path, monkeypatch):
    """What the process compiled before the fit (a notebook's other models, a test suite) is not the fit's: a fit
    whose step compiles nothing writes no file."""
    fake_compiled(monkeypatch, tmp_path, {"inductor": ["a"]}, {"ab/cab.so": b"A"})
    linear_fit(tmp_path / "ckpt", [])
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000009.pt"]
