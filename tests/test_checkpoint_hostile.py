"""Checkpoints in a hostile world: other files and other runs in the checkpoint directory, flipped bits, a full
disk, files that are not checkpoints, the user's umask, and a best-checkpoint monitor that can never fire."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import traceback
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import functrain as ft
from functrain.checkpoint import FORMAT, _host
from tests.test_loop import make_problem

REPO = Path(__file__).resolve().parent.parent
HOST = _host()  # the hostname and, on Linux, the pid namespace


def train(directory: Path, steps: int, **checkpoint) -> None:
    _, step, _, state, loader = make_problem()
    checkpoint = ft.callbacks.Checkpoint(directory, every_steps=1, every_epochs=None, **checkpoint)
    ft.fit(step, state, loader, steps=steps, checkpoint=checkpoint, callbacks=[], device="cpu")


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped): no process runs under it now."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def temporary(target: str, host: str, pid: int) -> str:
    """The name functrain gives the temporary file of a save of ``target`` by process ``pid`` on ``host``."""
    return f".{target}.functrain-{host}-{pid}-0123abcd.tmp"


# ----------------------------------------------------------------------------- 1. the files it deletes


@pytest.mark.skipif(os.name != "posix", reason="process ids are checked on POSIX only")
def test_pruning_and_the_startup_sweep_delete_only_files_checkpoint_wrote(tmp_path):
    """Pruning deletes only files named exactly step-<8 digits>.pt; the sweep deletes only functrain temporaries of
    a process that no longer runs on this host. A user's backup, a hand-named file, an editor's temporary, an older
    temporary that names no writer, and one of a writer on another host (which cannot be checked) all survive."""
    train(tmp_path / "first", steps=2)
    backup = tmp_path / "step-00000002-known-good.pt"
    backup.write_bytes((tmp_path / "first" / "step-00000002.pt").read_bytes())
    theirs = {
        backup.name: backup.read_bytes(),
        "step-2.pt": b"mine",
        "step-000000002.pt": b"mine too: nine digits, not a name Checkpoint writes for step 2",
        ".notes.txt.tmp": b"an editor's temporary",
        ".step-00000001.pt.k3j2h1g0.tmp": b"an older temporary: its writer may be alive",
        temporary("step-00000001.pt", "another-host", dead_pid()): b"in flight on another machine?",
        temporary("other.pt", HOST, dead_pid()): b"not a name Checkpoint writes",
    }
    for name, data in theirs.items():
        (tmp_path / name).write_bytes(data)
    stale = tmp_path / temporary("step-00000007.pt", HOST, dead_pid())
    stale.write_bytes(b"left by a killed run")

    with pytest.warns(RuntimeWarning, match="leaves .*another-host.* it cannot tell whether process"):
        train(tmp_path, steps=4, keep=1)

    assert not stale.exists()
    left = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert left.pop("step-00000004.pt") and left == theirs


LIVE_WRITER = """
import io, sys, time
sys.path.insert(0, {repo!r})
import torch
from functrain.checkpoint import atomic_save

real_save = torch.save


def save_slowly(obj, file):  # a save in flight: half written, still running
    buffer = io.BytesIO()
    real_save(obj, buffer)
    file.write(buffer.getvalue()[:1000])
    file.flush()
    print("WRITING", flush=True)
    time.sleep(600)


torch.save = save_slowly
atomic_save({{"x": torch.ones(1000)}}, sys.argv[1])
"""


@pytest.mark.skipif(os.name != "posix", reason="process ids are checked on POSIX only")
def test_a_second_run_in_the_directory_leaves_the_first_runs_save_in_flight(tmp_path):
    """Another process is half way through writing step-00000009.pt into the directory when a second run starts
    there: its temporary survives the second run's startup sweep, and is swept once that process is dead."""
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(LIVE_WRITER.format(repo=str(REPO))))
    directory = tmp_path / "ckpt"
    directory.mkdir()
    writer = subprocess.Popen([sys.executable, str(script), str(directory / "step-00000009.pt")],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert writer.stdout.readline().strip() == "WRITING"
        [in_flight] = [p for p in directory.iterdir() if p.name.endswith(".tmp")]
        assert in_flight.name.startswith(".step-00000009.pt.functrain-") and f"-{writer.pid}-" in in_flight.name
        size = in_flight.stat().st_size
        train(directory, steps=2)
        assert in_flight.exists() and in_flight.stat().st_size == size
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    train(directory, steps=1)
    assert not in_flight.exists()


def test_pruning_orders_by_step_beyond_eight_digits(tmp_path, monkeypatch):
    """step-100000000.pt sorts before step-99999999.pt by name; pruning must still keep the newest."""
    state = ft.TrainState.create(nn.Linear(2, 1), ft.sgd(lr=0.1))
    loop = ft.Loop()
    loop.fit_start(state)
    checkpoint = ft.callbacks.Checkpoint(tmp_path, keep=1)
    checkpoint.on_fit_start(loop)
    for step in (99_999_999, 100_000_000):
        loop.step = step
        checkpoint.on_fit_end(loop)
    assert [p.name for p in tmp_path.iterdir()] == ["step-100000000.pt"]


# ----------------------------------------------------------------------------- 2. integrity


def test_a_flipped_bit_in_a_tensor_record_is_reported_naming_the_file(tmp_path):
    state = ft.TrainState.create(nn.Linear(64, 64), ft.adam(lr=0.1))
    path = ft.save_checkpoint(tmp_path / "c.pt", state)
    data = bytearray(path.read_bytes())
    weight = state.params["weight"].detach().numpy().tobytes()
    at = data.find(weight) + len(weight) // 2  # inside the record that holds the weight
    data[at] ^= 0x10
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is not None  # the zip's CRC-32 sees it
    with pytest.raises(ValueError, match=r"'.*c\.pt' is corrupted: its record '.*' does not match its CRC-32"):
        ft.load_checkpoint(path, like=state)


# ----------------------------------------------------------------------------- 3. a full disk


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_is_named_and_the_previous_checkpoint_survives(tmp_path, monkeypatch):
    """Simulated with the kernel's own ENOSPC: the temporary file's descriptor is pointed at /dev/full, where every
    write fails with ENOSPC, so torch.save fails as on a full disk ('[enforce fail at inline_container.cc:672]
    unexpected pos'). The error says the disk is full and names the file; the old file and no temporary remain."""
    state = ft.TrainState.create(nn.Linear(64, 64), ft.adam(lr=0.1))
    path = ft.save_checkpoint(tmp_path / "step-00000001.pt", state, progress={"step": 1})
    good = path.read_bytes()
    real_fdopen = os.fdopen

    def onto_a_full_disk(fd, *args, **kwargs):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).parent == tmp_path.resolve():
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, fd)
            os.close(full)
        return real_fdopen(fd, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", onto_a_full_disk)
    with pytest.raises(OSError, match=r"step-00000001\.pt'.*the disk is full \(ENOSPC\)") as caught:
        ft.save_checkpoint(path, state, progress={"step": 2})
    assert caught.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == [path.name] and path.read_bytes() == good
    assert ft.load_checkpoint(path, like=state)[1] == {"step": 1}


# ----------------------------------------------------------------------------- 4. files that are not checkpoints


def full_text(error: BaseException) -> str:
    return "".join(traceback.format_exception(error))


@pytest.mark.parametrize(
    "content",
    [b"step: 101\nloss: 0.5\n", bytes(range(256)) * 8, b"", "a zip of something else"],
    ids=["text", "random bytes", "empty", "zip"],
)
def test_a_file_that_is_not_a_checkpoint_is_named_and_weights_only_false_is_never_suggested(tmp_path, content):
    state = ft.TrainState.create(nn.Linear(3, 2), ft.sgd(lr=0.1))
    path = tmp_path / "notes.pt"
    if content == "a zip of something else":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("photo.jpg", b"\xff\xd8\xff")
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=r"'.*notes\.pt' is not a functrain checkpoint") as caught:
        ft.load_checkpoint(path, like=state)
    assert "weights_only=False" not in full_text(caught.value)


def test_a_file_with_code_is_refused_without_suggesting_weights_only_false(tmp_path):
    state = ft.TrainState.create(nn.Linear(3, 2), ft.sgd(lr=0.1))
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "state": state, "progress": {"x": print}}, path)
    with pytest.raises(ValueError, match=r"refused to load .*evil\.pt.*'print'.*could run code") as caught:
        ft.load_checkpoint(path, like=state)
    assert "weights_only=False" not in full_text(caught.value)


def without(payload: dict, *keys: str) -> dict:
    """``payload`` with the entry at the path ``keys`` removed (``ranks`` entries are indexed by rank)."""
    payload = {**payload, "ranks": [{**r, "rng": dict(r["rng"])} for r in payload["ranks"]]}
    inner = payload
    for key in keys[:-1]:
        inner = inner[key]
    del inner[keys[-1]]
    return payload


@pytest.mark.parametrize(
    "missing",
    [("state",), ("ranks",), ("progress",), ("ranks", 0, "rng"), ("ranks", 0, "loader"), ("ranks", 0, "rng", "torch")],
    ids=lambda keys: "/".join(map(str, keys)),
)
def test_a_payload_missing_a_part_names_it_and_the_file(tmp_path, missing):
    _, _, _, state, loader = make_problem()
    good = torch.load(ft.save_checkpoint(tmp_path / "good.pt", state, loader=loader), weights_only=True)
    path = tmp_path / "partial.pt"
    torch.save(without(good, *missing), path)
    expected = rf"'.*partial\.pt' is an incomplete functrain checkpoint: .* no '{missing[-1]}'"
    with pytest.raises(ValueError, match=expected):
        ft.load_checkpoint(path, like=state, loader=loader)


def test_a_checkpoint_of_another_format_names_both_formats(tmp_path):
    state = ft.TrainState.create(nn.Linear(3, 2), ft.sgd(lr=0.1))
    path = ft.save_checkpoint(tmp_path / "c.pt", state)
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "format": "functrain.checkpoint/2"}, path)
    expected = rf"c\.pt' has format 'functrain.checkpoint/2'; this functrain reads '{FORMAT}'"
    with pytest.raises(ValueError, match=expected):
        ft.load_checkpoint(path, like=state)


# ----------------------------------------------------------------------------- 5. file permissions


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoints_get_the_permissions_the_users_umask_gives(tmp_path, umask, mode):
    state = ft.TrainState.create(nn.Linear(3, 2), ft.sgd(lr=0.1))
    previous = os.umask(umask)
    try:
        written = [ft.save_checkpoint(tmp_path / "c.pt", state), ft.save_weights(tmp_path / "w.safetensors", state)]
        (tmp_path / "plain.txt").write_text("the mode of any other new file")
    finally:
        os.umask(previous)
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == mode & 0o666
    for path in written:
        assert path.stat().st_mode & 0o777 == mode, path.name


# ----------------------------------------------------------------------------- 6. a monitor that cannot fire


def test_monitoring_an_eval_metric_without_evaluation_fails_before_training(tmp_path):
    _, step, _, state, loader = make_problem()
    steps = []
    checkpoint = ft.callbacks.Checkpoint(tmp_path, monitor="eval/loss")
    with pytest.raises(ValueError, match="Checkpoint: monitor='eval/loss' needs an evaluation, but this fit has none"):
        ft.fit(lambda s, b: (steps.append(1), step(s, b))[1], state, loader, epochs=1, checkpoint=checkpoint,
               callbacks=[])  # fmt: skip
    assert not steps and not any(tmp_path.iterdir())


def test_early_stopping_on_an_eval_metric_without_evaluation_fails_before_training():
    """The same class as Checkpoint's: an eval monitor with no evaluation would never act, silently."""
    _, step, _, state, loader = make_problem()
    steps = []
    stopper = ft.callbacks.EarlyStopping(monitor="eval/acc", mode="max")
    with pytest.raises(ValueError, match="EarlyStopping: monitor='eval/acc' needs an evaluation.*never stop training"):
        ft.fit(lambda s, b: (steps.append(1), step(s, b))[1], state, loader, epochs=1, callbacks=[stopper])
    assert not steps


def test_resume_takes_only_checkpoints_named_as_checkpoint_names_them(tmp_path):
    """A hand-named step-99.pt or step-00000050-known-good.pt is the user's: never resumed from."""
    for name in ["step-00000002.pt", "step-99.pt", "step-00000050-known-good.pt", "step-000000030.pt"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "step-00000070.pt").mkdir()  # a directory of that name is not a checkpoint either
    assert ft.latest_checkpoint(tmp_path) == tmp_path / "step-00000002.pt"


def test_a_checkpoint_with_a_plain_schedule_state_still_loads(tmp_path):
    """Written before each optimiser's state had a class of its own: given the running optimiser's."""
    params = {"w": torch.randn(3, 3)}
    current = ft.adam(1e-3).init(params)
    old = ft.ScheduleState(*current)
    ft.save_checkpoint(tmp_path / "c.pt", ft.TrainState(params, {}, old, torch.zeros((), dtype=torch.int64)))
    like = ft.TrainState(params, {}, current, torch.zeros((), dtype=torch.int64))
    loaded, _ = ft.load_checkpoint(tmp_path / "c.pt", like)
    assert type(loaded.opt_state) is type(current)
    torch.testing.assert_close(loaded.opt_state, current)
    with pytest.raises(ValueError, match=r"was saved for another model or optimiser: .* is \(3, 3\)"):  # still checked
        ft.load_checkpoint(tmp_path / "c.pt", like._replace(opt_state=ft.adam(1e-3).init({"w": torch.randn(2, 2)})))
