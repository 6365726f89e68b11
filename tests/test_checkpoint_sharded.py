"""Sharded checkpoints (torch.distributed.checkpoint): each rank writes its shards, a checkpoint saved on N
ranks loads on M (2 -> 1 without a process group, 1 -> 2 from a single file, 2 -> 4, 4 -> 2), a torn or
foreign directory is refused by name, a failed or killed save leaves the previous checkpoint, and fit
resumes a sharded run bit for bit on the same number of ranks (and, with a warning, on another)."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import functrain as ft

from .ranks import run_on_ranks
from .test_sharding import batches, make_model, part

NAME = "step-00000003.pt"


def mesh_1d():
    return init_device_mesh("cpu", (torch.distributed.get_world_size(),))


def tx():
    return ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(lr=0.01))


def trained(mesh, rank, world, steps=3):
    """Net (rows split evenly, unevenly, and replicated) with AdamW state, after ``steps`` sharded steps."""
    model = make_model()
    state = ft.TrainState.create(model, tx(), mesh=mesh)
    step = ft.make_train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), tx(), mesh=mesh)
    for batch in batches(steps):
        state, _ = step(state, part(batch, rank, world))
    return state


def like(mesh=None, model=None, transform=None):
    return ft.TrainState.create(model or make_model(), transform or tx(), mesh=mesh)


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def error_of(call) -> str:
    try:
        call()
    except (ValueError, OSError, RuntimeError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


# ----------------------------------------------------------------------------- scenarios (run in each rank)


def save_on_two_scenario(directory, rank):
    mesh = mesh_1d()
    state = trained(mesh, rank, 2)
    ft.save_checkpoint(directory / NAME, state, progress={"note": "first"})
    ft.save_checkpoint(directory / NAME, state, progress={"note": "replaced"})  # over an existing one
    back, progress = ft.load_checkpoint(directory / NAME, like(mesh))
    out = {
        "saved": ft.distributed.full_tensors(state),
        "local": [local(t) for t in ft._tree.leaves(state)],  # each rank's shards (plain: the step count)
        "local_back": [local(t) for t in ft._tree.leaves(back)],
        "note": progress["note"],
        # 1 -> 2: the single file the test process saved, distributed with the like's placements
        "from_file": ft.distributed.full_tensors(ft.load_checkpoint(directory / "plain.pt", like(mesh))[0]),
        "from_file_placements": str(
            ft.load_checkpoint(directory / "plain.pt", like(mesh))[0].params["a.weight"].placements
        ),  # fmt: skip
        "other_shape": error_of(lambda: ft.load_checkpoint(directory / NAME, like(mesh, nn.Linear(6, 8)))),
        "other_optimiser": error_of(lambda: ft.load_checkpoint(directory / NAME, like(mesh, None, ft.sgd(lr=0.1)))),
        "other_dtype": error_of(
            lambda: ft.load_checkpoint(directory / NAME, like(mesh, make_model(dtype=torch.float32)))
        ),
    }
    # A save whose write fails on rank 1 (a full disk) fails on both ranks and leaves the checkpoint there.
    from torch.distributed.checkpoint import FileSystemWriter

    write_data = FileSystemWriter.write_data

    def full_disk(self, plan, planner):
        if rank == 1:
            raise OSError(28, "No space left on device")
        return write_data(self, plan, planner)

    FileSystemWriter.write_data = full_disk
    try:
        out["failed_save"] = error_of(lambda: ft.save_checkpoint(directory / NAME, trained(mesh, rank, 2, 1)))
    finally:
        FileSystemWriter.write_data = write_data
    after, _ = ft.load_checkpoint(directory / NAME, like(mesh))
    out["after_failed_save"] = ft.distributed.full_tensors(after)
    return out


def reshard_scenario(source, rank):
    """On 4 ranks: the 2-rank checkpoint ``source`` loaded on 4 ranks (2 -> 4) and saved there; that one
    loaded on 2 ranks (4 -> 2: ranks 0-1 and 2-3 each load it onto a 1-D mesh of 2, the shard dimension
    of a 2x2 mesh)."""
    four = ft.load_checkpoint(source, like(mesh_1d()), restore_rng=False)[0]
    ft.save_checkpoint(source.parent / "four.pt", four)
    pairs = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))["shard"]
    two = ft.load_checkpoint(source.parent / "four.pt", like(pairs), restore_rng=False)[0]
    return {
        "four": ft.distributed.full_tensors(four),
        "two": ft.distributed.full_tensors(two),
        "rows": torch.tensor([four.params["a.weight"].to_local().shape[0], two.params["a.weight"].to_local().shape[0]]),
        "files": sorted(os.listdir(source.parent / "four.pt")),
    }


def killed_save_scenario(directory, rank):
    """Saves step 3, then is killed (SIGKILL, every rank) while writing step 3 again: after its shards are
    written, before DCP's .metadata and the rename."""
    state = trained(mesh_1d(), rank, 2)
    ft.save_checkpoint(directory / NAME, state)
    from torch.distributed.checkpoint import FileSystemWriter

    def killed(self, metadata, results):
        os.kill(os.getpid(), signal.SIGKILL)

    FileSystemWriter.finish = killed  # runs on rank 0; rank 1 then dies of its lost peer, or is killed below
    try:
        ft.save_checkpoint(directory / NAME, state)
    finally:
        os.kill(os.getpid(), signal.SIGKILL)


class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.b(F.dropout(torch.tanh(self.a(x)), 0.2, self.training))


def fit_on_ranks(directory, steps, resume, rank):
    """fit of a sharded DropoutNet on a shuffled ft.data loader (4 steps per epoch on 2 ranks), checkpoints
    every 2 steps; returns the final params (whole), the history, and the warnings."""
    n = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    mesh = mesh_1d() if torch.distributed.is_initialized() else None
    torch.manual_seed(1234 + rank)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 6, generator=g), torch.randn(32, 1, generator=g))
    loader = ft.data.make_loader(data, 8 // n, seed=5, num_workers=0, rank=rank, world_size=n)
    torch.manual_seed(0)
    model = DropoutNet()
    state = ft.TrainState.create(model, tx(), mesh=mesh)
    step = ft.make_train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), tx(), mesh=mesh)
    checkpoint = ft.callbacks.Checkpoint(directory, every_steps=2, every_epochs=None, keep=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state, history = ft.fit(step, state, loader, steps=steps, checkpoint=checkpoint, resume=resume,
                                callbacks=[], log_every=1, device="cpu")  # fmt: skip
    return {
        "params": ft.distributed.full_tensors(state.params),
        "step": state.step,
        "losses": torch.tensor([r["loss"] for r in history["train"]]),
        "epochs": torch.tensor([r["epoch"] for r in history["train"]]),
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
    }


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def saved_on_two(tmp_path_factory):
    """A checkpoint saved sharded on 2 ranks (and the ranks' view of it), and a single file saved by one process."""
    directory = tmp_path_factory.mktemp("saved")
    plain = ft.TrainState.create(make_model(), tx())
    plain = plain._replace(params={k: v + 1 for k, v in plain.params.items()})  # not the like's own values
    ft.save_checkpoint(directory / "plain.pt", plain)
    ranks = run_on_ranks(partial(save_on_two_scenario, directory), 2, directory / "out")
    return directory, ranks, plain


@pytest.mark.slow
def test_two_ranks_round_trip_bitwise_and_load_into_one_process(saved_on_two):
    directory, ranks, plain = saved_on_two
    path = directory / NAME
    assert path.is_dir() and {"functrain.pt", ".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(path))
    assert [p.name for p in directory.iterdir() if p.name.startswith(".")] == []  # no temporary, no moved-aside
    for r in ranks:  # 2 -> 2: each rank gets its own shards back, bit for bit; the replacing save won
        assert all(torch.equal(a, b) for a, b in zip(r["local_back"], r["local"]))
        assert r["note"] == "replaced"
    # 2 -> 1: a plain state in this process, which has no process group
    state, progress = ft.load_checkpoint(path, like(), loader=None, restore_rng=False)
    saved = ranks[0]["saved"]
    assert all(torch.equal(a, b) for a, b in zip(ft._tree.leaves(state), ft._tree.leaves(saved)))
    assert type(state.opt_state) is type(like().opt_state) and progress == {"note": "replaced"}
    assert ft.latest_checkpoint(directory) == path
    with pytest.warns(RuntimeWarning, match="saved by 2 process.*loaded by 1.*not restored"):
        ft.load_checkpoint(path, like())
    # 1 -> 2: the single file, each rank keeping its rows of every whole tensor
    for r in ranks:
        assert all(torch.equal(a, b) for a, b in zip(ft._tree.leaves(r["from_file"]), ft._tree.leaves(plain)))
        assert r["from_file_placements"] == "(Shard(dim=0),)"


@pytest.mark.slow
def test_two_to_four_and_four_to_two_ranks(saved_on_two, tmp_path):
    directory, ranks, _ = saved_on_two
    shutil.copytree(directory / NAME, tmp_path / NAME)
    four = run_on_ranks(partial(reshard_scenario, tmp_path / NAME), 4, tmp_path / "out")
    saved = ft._tree.leaves(ranks[0]["saved"])
    for r in four:
        assert all(torch.equal(a, b) for a, b in zip(ft._tree.leaves(r["four"]), saved))
        assert all(torch.equal(a, b) for a, b in zip(ft._tree.leaves(r["two"]), saved))
        assert r["rows"].tolist() == [2, 4]  # a.weight's 8 rows over 4 ranks, then over 2
        assert {"__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp", "functrain.pt"} <= set(r["files"])


def test_mismatches_name_the_key(saved_on_two):
    for r in saved_on_two[1]:
        assert "saved for another model or optimiser" in r["other_shape"] and "a.weight" in r["other_shape"]
        assert "SgdState" in r["other_optimiser"], r["other_optimiser"]
        assert (
            "'params.a.weight' is (8, 6) torch.float64 in the checkpoint but (8, 6) torch.float32" in r["other_dtype"]
        )


def test_torn_foreign_and_hostile_directories_are_refused_by_name(saved_on_two, tmp_path):
    directory, _, _ = saved_on_two

    def copy(name):
        shutil.copytree(directory / NAME, tmp_path / name)
        return tmp_path / name

    def refused(path, pattern):
        with pytest.raises(ValueError, match=pattern):
            ft.load_checkpoint(path, like(), restore_rng=False)

    (tmp_path / "photos").mkdir()
    refused(tmp_path / "photos", r"photos' is a directory but not a functrain checkpoint: it has no 'functrain.pt'")
    (copy("no-metadata") / ".metadata").unlink()
    refused(tmp_path / "no-metadata", r"no-metadata' is an incomplete sharded checkpoint: it has no '.metadata'")
    (copy("no-shard") / "__1_0.distcp").unlink()
    refused(tmp_path / "no-shard", r"no-shard' is torn: its shard file '__1_0.distcp' is missing")
    shard = copy("short") / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])
    refused(tmp_path / "short", r"short' is torn: its shard file '__0_0.distcp' is shorter")
    shard = copy("flipped") / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x10
    shard.write_bytes(bytes(data))
    refused(tmp_path / "flipped", r"flipped/__0_0.distcp@\d+' (is corrupted|is not a readable checkpoint)")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (copy("evil") / ".metadata").write_bytes(pickle.dumps(Evil()))
    refused(tmp_path / "evil", r"refused to load .*evil/.metadata': it names '(posix|os)\.system'")
    index = copy("not-ours") / "functrain.pt"
    index.write_bytes(b"hello")
    refused(tmp_path / "not-ours", r"functrain.pt' is not a functrain checkpoint")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        ft.load_checkpoint(tmp_path / "absent.pt", like())


def test_an_interrupted_replacement_names_the_previous_checkpoint(saved_on_two, tmp_path):
    directory, _, _ = saved_on_two
    shutil.copytree(directory / NAME, tmp_path / f".{NAME}.functrain-host-123-abcd.old")  # as _install leaves it
    with pytest.raises(FileNotFoundError, match=rf"complete at '.*\.{NAME}\.functrain-host-123-abcd.old': rename"):
        ft.load_checkpoint(tmp_path / NAME, like())
    assert ft.latest_checkpoint(tmp_path) is None  # never resumed from under its aside name


def test_a_failed_write_on_one_rank_fails_every_rank_and_keeps_the_checkpoint(saved_on_two):
    directory, ranks, _ = saved_on_two
    for r in ranks:  # DCP hands rank 1's full disk to rank 0 too: neither goes on as if saved
        assert r["failed_save"].startswith(f"OSError: [Errno 28] could not write '{directory / NAME}'"), r
        assert "ENOSPC" in r["failed_save"]
        assert all(torch.equal(a, b) for a, b in zip(ft._tree.leaves(r["after_failed_save"]),
                                                     ft._tree.leaves(r["saved"])))  # fmt: skip
    assert not [p for p in directory.iterdir() if ".functrain-" in p.name]  # its temporary directory is gone


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and process ids are POSIX")
def test_a_save_killed_mid_write_leaves_the_previous_checkpoint_and_is_swept(tmp_path):
    with pytest.raises(Exception, match="signal|exit"):
        run_on_ranks(partial(killed_save_scenario, tmp_path), 2, tmp_path / "out")
    left = [p for p in tmp_path.iterdir() if p.name.startswith(f".{NAME}.functrain-") and p.name.endswith(".tmp")]
    assert len(left) == 1 and left[0].is_dir() and any(left[0].glob("*.distcp")), os.listdir(tmp_path)
    assert ft.latest_checkpoint(tmp_path) == tmp_path / NAME
    state, _ = ft.load_checkpoint(tmp_path / NAME, like(), restore_rng=False)  # the previous one, whole
    assert int(state.step) == 3
    ft.callbacks.Checkpoint(tmp_path).on_fit_start(ft.Loop())  # the sweep at the start of training
    assert not left[0].exists() and (tmp_path / NAME).is_dir()


@pytest.mark.slow
def test_fit_resumes_a_sharded_run_bitwise_on_two_ranks_and_continues_on_one(tmp_path):
    whole = run_on_ranks(partial(fit_on_ranks, tmp_path / "whole", 10, False), 2, tmp_path / "o1")
    run_on_ranks(partial(fit_on_ranks, tmp_path / "cut", 6, False), 2, tmp_path / "o2")  # stops mid-epoch 1
    assert ft.latest_checkpoint(tmp_path / "cut") == tmp_path / "cut" / "step-00000006.pt"
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["step-00000004.pt", "step-00000006.pt"]  # keep=2
    shutil.copytree(tmp_path / "cut" / "step-00000006.pt", tmp_path / "one" / "step-00000006.pt")
    resumed = run_on_ranks(partial(fit_on_ranks, tmp_path / "cut", 10, True), 2, tmp_path / "o3")  # fresh processes
    for a, b in zip(resumed, whole):
        assert int(a["step"]) == 10 and all(torch.equal(a["params"][k], b["params"][k]) for k in b["params"])
        assert torch.equal(a["losses"], b["losses"]) and a["warnings"] == [], a["warnings"]
    # The 2-rank checkpoint of step 6 (mid-epoch 1) resumed in one plain process: the saved state, step and
    # epoch; epoch 1 restarts from its first batch, with a warning saying what is not exact.
    one = fit_on_ranks(tmp_path / "one", 10, True, 0)
    assert int(one["step"]) == 10 and one["epochs"].tolist()[:6] == whole[0]["epochs"].tolist()[:6]
    assert one["epochs"].tolist()[6:] == [1, 1, 1, 1], one[
        "epochs"
    ]  # epoch 1 again, from its start (4 steps per epoch)
    assert torch.equal(one["losses"][:6], whole[0]["losses"][:6])  # the history carried over
    assert any("saved by 2 ranks and resumes on 1" in w and "epoch 1 restarts from its first batch" in w
               for w in one["warnings"]), one["warnings"]  # fmt: skip
