"""ft.data.make_loader: epochs and shards against torch's DistributedSampler, augmentation against an
imperative per-sample-seeded reference, exact resumption mid-epoch and at epoch boundaries, the
loop-driver contract, and bad input (a failing sample, a dying worker, impossible sizes, a foreign
state_dict) that fails fast with a clear error instead of hanging."""

from __future__ import annotations

import io
import multiprocessing
import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as v2
from PIL import Image
from torch.utils.data import DistributedSampler, default_collate

import functrain as ft
from functrain.data._rng import derive_seed

from .harness import Indices

ROOT = pathlib.Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- datasets and helpers


def images(n=24, size=10, channels=3, seed=0) -> ft.data.ImageLabelDataset:
    g = torch.Generator().manual_seed(seed)
    return ft.data.ImageLabelDataset(
        torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8), torch.arange(n) % 5
    )


AUGMENT = v2.Compose([v2.RandomCrop(10, padding=3), v2.RandomHorizontalFlip()])


def epochs(loader, count):
    return [list(loader) for _ in range(count)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for s, t in zip(x, y):
            assert torch.equal(s, t)


def within(seconds: float, fn):
    """Runs fn in a thread; fails if it is still running after ``seconds`` (a hang), else returns
    ``("value", result)`` or ``("error", exception)``."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            box["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: the pipeline hangs"
    return next(iter(box.items()))


def reference_epoch(dataset, transform, *, seed, epoch, batch_size, world_size=1, rank=0, drop_last=True):
    """The contract written imperatively: DistributedSampler's indices for (seed, epoch), each sample
    transformed after seeding torch's global generator with derive_seed(seed, epoch, index), collated,
    uint8 images scaled to float32 like v2.ToDtype(scale=True)."""
    sampler = DistributedSampler(range(len(dataset)), world_size, rank, shuffle=True, seed=seed, drop_last=drop_last)
    sampler.set_epoch(epoch)
    order = list(sampler)
    batches = []
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        samples = []
        for index in order[start : start + batch_size]:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(seed, epoch, index))
                samples.append(transform(dataset[index]))
        x, y = default_collate(samples)
        batches.append([v2.functional.to_dtype(x, torch.float32, scale=True), y])
    return batches


# ----------------------------------------------------------------------------- epochs and shards


@pytest.mark.parametrize("world_size, drop_last", [(1, True), (3, True), (3, False)])
def test_epochs_are_distributed_samplers_indices(world_size, drop_last):
    n, batch_size, seed = 23, 3, 5
    for rank in range(world_size):
        loader = ft.data.make_loader(
            Indices(n), batch_size, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last, num_workers=1
        )
        sampler = DistributedSampler(range(n), world_size, rank, shuffle=True, seed=seed, drop_last=drop_last)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            order = list(sampler)
            expected = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
            if drop_last:
                expected = [b for b in expected if len(b) == batch_size]
            got = [b.tolist() for b in loader]
            assert got == expected
            assert len(loader) == len(expected)


def test_shards_are_disjoint_and_equal_in_length():
    n, world_size, batch_size = 50, 4, 4
    loaders = [ft.data.make_loader(Indices(n), batch_size, rank=r, world_size=world_size) for r in range(world_size)]
    assert len({len(loader) for loader in loaders}) == 1
    for _ in range(2):
        shares = [torch.cat(list(loader)).tolist() for loader in loaders]
        seen = [i for share in shares for i in share]
        assert len(seen) == len(set(seen)) == world_size * len(loaders[0]) * batch_size
        assert set(seen) <= set(range(n))


def test_each_epoch_is_a_new_shuffle_and_unshuffled_is_in_order():
    loader = ft.data.make_loader(Indices(12), 4, seed=0)
    first, second = (torch.cat(e).tolist() for e in epochs(loader, 2))
    assert first != second and sorted(first) == sorted(second) == list(range(12))
    ordered = ft.data.make_loader(Indices(12), 4, shuffle=False)
    assert torch.cat(list(ordered)).tolist() == list(range(12))


def test_drop_last_false_keeps_the_partial_batch():
    loader = ft.data.make_loader(Indices(10), 4, drop_last=False, shuffle=False)
    assert len(loader) == 3
    assert [b.tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


# ----------------------------------------------------------------------------- augmentation


def test_augmented_batches_equal_the_per_sample_seeded_reference():
    data = images()
    loader = ft.data.make_loader(data, 4, seed=3, transform=AUGMENT, num_workers=2)
    for epoch, batches in enumerate(epochs(loader, 2)):
        assert_same_batches(batches, reference_epoch(data, AUGMENT, seed=3, epoch=epoch, batch_size=4))
    # The reference can fail: the augmentation is random (epochs differ) and seed-dependent.
    assert not torch.equal(
        reference_epoch(data, AUGMENT, seed=3, epoch=0, batch_size=4)[0][0],
        reference_epoch(data, AUGMENT, seed=4, epoch=0, batch_size=4)[0][0],
    )


def test_augmentation_does_not_depend_on_workers_and_leaves_the_global_generator_alone():
    data = images()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    runs = [epochs(ft.data.make_loader(data, 4, transform=AUGMENT, num_workers=w), 2) for w in (0, 1, 3)]
    assert torch.equal(torch.get_rng_state(), before)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert_same_batches(a, b)


def test_the_rng_mode_covers_every_sampler_it_lists():
    from functrain.data._rng import _SAMPLERS, sample_rng

    with sample_rng(11):
        a = (torch.rand(3), torch.randint(0, 9, (3,)), torch.empty(3).uniform_(), torch.randperm(5), torch.randn(2))
    with sample_rng(11):
        b = (torch.rand(3), torch.randint(0, 9, (3,)), torch.empty(3).uniform_(), torch.randperm(5), torch.randn(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len(_SAMPLERS) >= 20


def test_batch_transform_cutmix_is_reproducible_and_resumable():
    data = images(n=32)
    cutmix = v2.CutMix(num_classes=5, alpha=1.0)
    make = lambda: ft.data.make_loader(data, 8, transform=AUGMENT, batch_transform=cutmix, seed=1)
    full = epochs(make(), 2)
    x, y = full[0][0]
    assert x.dtype == torch.float32 and y.shape == (8, 5)  # soft labels
    assert torch.allclose(y.sum(-1), torch.ones(8))
    assert_same_batches(full[0], list(make()))
    resumed = make()
    resumed.load_state_dict({"epoch": 1, "batch": 2, "fingerprint": make().state_dict()["fingerprint"]})
    assert_same_batches(full[1][2:], list(resumed))
    assert not torch.equal(full[0][0][1], full[1][0][1])  # a new draw each batch


# ----------------------------------------------------------------------------- resuming


@pytest.mark.parametrize("stop_after", [6, 8])  # 4 batches an epoch: batch 1 of epoch 1, and epoch 1's last
def test_resume_mid_epoch_and_from_the_last_batch_yields_the_uninterrupted_batches(stop_after):
    data = images()
    make = lambda: ft.data.make_loader(data, 5, seed=2, transform=AUGMENT, num_workers=2)
    uninterrupted = [b for e in epochs(make(), 3) for b in e]
    first, seen, state = make(), [], None
    while state is None:
        for batch in first:
            seen.append(batch)
            if len(seen) == stop_after:
                state = first.state_dict()
                break
    state = torch.load(_saved(state), weights_only=True)  # survives a checkpoint file
    assert (state["epoch"], state["batch"]) == ((1, 2) if stop_after == 6 else (2, 0))
    resumed, rest = make(), []
    resumed.load_state_dict(state)
    while resumed.epoch < 3:
        rest.extend(resumed)
    assert_same_batches(seen + rest, uninterrupted)


def test_resume_at_an_epoch_boundary_starts_the_next_epoch_without_skipping_it():
    data = images()
    make = lambda: ft.data.make_loader(data, 6, seed=9, transform=AUGMENT)
    uninterrupted = epochs(make(), 3)
    first = make()
    assert_same_batches(list(first), uninterrupted[0])
    state = first.state_dict()
    assert (state["epoch"], state["batch"]) == (1, 0)
    resumed = make()
    resumed.load_state_dict(state)
    next_epoch = list(resumed)
    assert_same_batches(next_epoch, uninterrupted[1])  # epoch 1: not skipped to 2, not a replay of 0
    assert not torch.equal(next_epoch[0][0], uninterrupted[2][0][0])
    assert not torch.equal(next_epoch[0][0], uninterrupted[0][0][0])
    # A state that says "all of epoch 1's batches consumed" means the same as "epoch 2, batch 0".
    other = make()
    other.load_state_dict({**state, "epoch": 1, "batch": len(other)})
    assert_same_batches(list(other), uninterrupted[2])


def test_loop_driver_contract_checkpoint_every_step_and_resume_anywhere():
    """What functrain's loop does: `for epoch ...: for batch in loader`, a checkpoint after a step,
    and a resumed run (fresh loader + load_state_dict) continuing the same `for` loops."""
    data = Indices(14)
    make = lambda: ft.data.make_loader(data, 4, seed=0)  # 3 batches per epoch
    reference = [b.tolist() for e in epochs(make(), 3) for b in e]
    for crash_after in range(1, 9):
        loader, seen, state = make(), [], None
        while loader.epoch < 3 and state is None:
            for batch in loader:
                seen.append(batch.tolist())
                if len(seen) == crash_after:
                    state = loader.state_dict()
                    break
        loader = make()
        loader.load_state_dict(state)
        while loader.epoch < 3:
            seen.extend(b.tolist() for b in loader)
        assert seen == reference


def test_breaking_out_keeps_the_cursor_and_set_epoch_jumps():
    loader = ft.data.make_loader(Indices(12), 3, seed=0)
    whole = [b.tolist() for b in ft.data.make_loader(Indices(12), 3, seed=0)]
    it = iter(loader)
    head = [next(it).tolist()]
    del it
    assert (loader.epoch, loader.batch) == (0, 1)
    assert head + [b.tolist() for b in loader] == whole
    loader.set_epoch(0)
    assert [b.tolist() for b in loader] == whole
    stale = iter(loader)
    next(stale)
    fresh = iter(loader)
    with pytest.raises(RuntimeError, match="another iteration"):
        next(stale)
    assert next(fresh) is not None


@pytest.mark.parametrize("worker_method", ["thread", "process"])
def test_workers_persist_across_epochs_and_close_stops_them_without_losing_the_cursor(worker_method):
    reference_loader = ft.data.make_loader(Indices(20), 4, seed=0, num_workers=0)
    reference = [b.tolist() for e in epochs(reference_loader, 2) for b in e]
    threads, processes = set(threading.enumerate()), set(multiprocessing.active_children())
    loader = ft.data.make_loader(Indices(20), 4, seed=0, num_workers=2, worker_method=worker_method)
    got = [b.tolist() for b in loader]
    ours = {t for t in threading.enumerate() if t not in threads}
    ours |= {p for p in multiprocessing.active_children() if p not in processes}
    # 2 workers, the reader and the sorter: still producing epoch 1 (processes: and their watchdog)
    assert len(ours) >= 4
    assert sum(isinstance(w, multiprocessing.process.BaseProcess) for w in ours) == (
        2 if worker_method == "process" else 0
    )
    it = iter(loader)
    got.append(next(it).tolist())
    assert all(w.is_alive() for w in ours)  # the same workers carried on: nothing restarted
    loader.close()
    assert not any(w.is_alive() for w in ours)  # threads, processes and their queues' threads
    got.extend(b.tolist() for b in loader)  # restarted at the cursor
    assert got == reference
    loader.close()


def _saved(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


# ----------------------------------------------------------------------------- layout and device


def test_layout_conversion_pil_numpy_and_tensor_to_chw_float():
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    hw = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    samples = [
        (Image.fromarray(hwc), 0),
        (hwc, 1),
        (torch.from_numpy(hwc).permute(2, 0, 1).clone(), 2),
    ]

    class Mixed(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return samples[i]

    (x, y), *_ = ft.data.make_loader(Mixed(), 3, shuffle=False)
    expected = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])(hwc)
    assert x.shape == (3, 3, 6, 5) and x.dtype == torch.float32 and y.tolist() == [0, 1, 2]
    for image in x:
        assert torch.equal(image, expected)
    gray = ft.data.to_chw({"image": Image.fromarray(hw), "mask": hw})
    assert gray["image"].shape == gray["mask"].shape == (1, 6, 5)
    assert ft.data.to_chw(np.zeros(4, dtype=np.float32)).shape == (4,)  # not an image: left alone

    (x8, _), *_ = ft.data.make_loader(Mixed(), 3, shuffle=False, dtype=None)
    assert x8.dtype == torch.uint8
    (xc, _), *_ = ft.data.make_loader(Mixed(), 3, shuffle=False, channels_last=True)
    assert xc.is_contiguous(memory_format=torch.channels_last) and torch.equal(xc, x)


def test_device_cpu_is_a_no_op():
    data = images(n=8)
    a = list(ft.data.make_loader(data, 4, device="cpu"))
    b = list(ft.data.make_loader(data, 4))
    assert_same_batches(a, b)
    assert a[0][0].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_arrive_on_the_device_equal_to_the_cpu_ones():
    data = images(n=16)
    cpu = epochs(ft.data.make_loader(data, 4, transform=AUGMENT), 2)
    cuda = ft.data.make_loader(data, 4, transform=AUGMENT, device="cuda", channels_last=True)
    for epoch in cpu:
        got = list(cuda)
        torch.cuda.synchronize()
        assert got[0][0].device.type == "cuda" and got[0][0].is_contiguous(memory_format=torch.channels_last)
        assert_same_batches([[t.cpu() for t in b] for b in got], epoch)


# ----------------------------------------------------------------------------- bad input


class FailsAt(torch.utils.data.Dataset):
    def __init__(self, n, bad):
        self.n, self.bad = n, bad

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.zeros(1, 2, 2, dtype=torch.uint8), i


def _raise_on(bad):
    def transform(sample):
        if sample[1] == bad:
            raise ValueError("corrupt image")
        return sample

    return transform


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_failing_sample_raises_in_the_main_thread_with_its_index(num_workers):
    loader = ft.data.make_loader(FailsAt(20, 13), 4, transform=_raise_on(13), num_workers=num_workers)
    kind, error = within(20, lambda: [b for b in loader])
    assert kind == "error" and isinstance(error, ft.data.SampleError)
    assert "sample 13" in str(error) and "corrupt image" in str(error)
    # The loader is usable afterwards: a new epoch starts a fresh pipeline.
    loader.set_epoch(0)
    kind, error = within(20, lambda: [b for b in loader])
    assert kind == "error" and "sample 13" in str(error)


def test_batch_larger_than_the_epoch_is_an_error_not_an_empty_epoch():
    with pytest.raises(ValueError, match="batch_size 16 is larger than the 10 samples"):
        ft.data.make_loader(Indices(10), 16)
    with pytest.raises(ValueError, match="larger than the 5 samples each of the 2 rank"):
        ft.data.make_loader(Indices(10), 8, world_size=2)
    assert len(ft.data.make_loader(Indices(10), 16, drop_last=False)) == 1


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(batch_size=3), "batch_size"),
        (dict(seed=1), "seed"),
        (dict(world_size=2), "world_size"),
        (dict(shuffle=False), "shuffle"),
        (dict(data=Indices(13)), "dataset_length"),
    ],
)
def test_a_state_dict_from_another_pipeline_is_refused(change, named):
    kwargs = dict(batch_size=4, seed=0, world_size=1)
    data = change.pop("data", Indices(12))
    other = ft.data.make_loader(data, **{**kwargs, **change})
    loader = ft.data.make_loader(Indices(12), **kwargs)
    with pytest.raises(ValueError, match=f"another pipeline: {named}"):
        loader.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="expected a dict"):
        loader.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="outside"):
        loader.load_state_dict({**loader.state_dict(), "batch": 99})


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(batch_size=2.5), TypeError, "batch_size"),
        (dict(num_workers=-1), ValueError, "num_workers"),
        (dict(prefetch=0), ValueError, "prefetch"),
        (dict(rank=2, world_size=2), ValueError, "rank"),
        (dict(world_size=0), ValueError, "world_size"),
        (dict(worker_method="fiber"), ValueError, "worker_method"),
        (dict(multiprocessing_context="thread"), ValueError, "multiprocessing_context"),
        (dict(transform=3), TypeError, "transform"),
        (dict(dtype=torch.int32), TypeError, "dtype"),
        (dict(seed=-1), ValueError, "seed"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    kwargs = {"batch_size": 2, **kwargs}
    with pytest.raises(error, match=match):
        ft.data.make_loader(Indices(8), **kwargs)


def test_not_a_map_style_dataset():
    with pytest.raises(TypeError, match="map-style"):
        ft.data.make_loader(iter(range(4)), 2)
    with pytest.raises(ValueError, match="empty"):
        ft.data.make_loader(Indices(0), 2)


# ----------------------------------------------------------------------------- worker processes (slow to start)

FORK = "fork" in multiprocessing.get_all_start_methods()
# What worker_method="auto" (the default) picks here: processes where they start by fork.
DEFAULT_IS_PROCESS = sys.platform.startswith("linux") and multiprocessing.get_start_method(allow_none=True) in (
    None,
    "fork",
)


def _augment(sample):  # module level: picklable, for spawned workers
    return AUGMENT(sample)


@pytest.mark.skipif(not DEFAULT_IS_PROCESS, reason="the default is worker processes where they start by fork")
def test_the_default_workers_are_forked_processes_that_take_a_lambda_and_match_threads():
    data = images()
    # A lambda: forked workers inherit the transform, nothing is pickled.
    default = ft.data.make_loader(data, 4, transform=lambda sample: AUGMENT(sample))
    threads = ft.data.make_loader(data, 4, transform=AUGMENT, worker_method="thread")
    assert (default.worker_method, threads.worker_method) == ("process", "thread")
    assert ft.data.make_loader(data, 4, num_workers=0).worker_method is None
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for _ in range(2):
        assert_same_batches(list(default), list(threads))
    assert torch.equal(torch.get_rng_state(), before)  # the workers reseed their own generators only
    default.close()
    threads.close()


def test_auto_uses_threads_where_workers_would_be_spawned(monkeypatch):
    # A program that chose spawn (or macOS and Windows, where it is the default): spawned workers
    # need the dataset and transform pickled and the script guarded by if __name__ == "__main__".
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: "spawn")
    loader = ft.data.make_loader(images(), 4, transform=lambda sample: AUGMENT(sample))
    assert loader.worker_method == "thread"
    assert len(list(loader)) == 6


class _Local:  # a dataset that pickles, holding a part that does not
    def __init__(self):
        self.lock = threading.Lock()

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return i


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(transform=lambda sample: sample), "transform"),
        (dict(collate=lambda samples: samples), "collate"),
        (dict(data=_Local()), "dataset"),
    ],
)
def test_spawned_workers_name_what_cannot_be_pickled_and_what_to_do(kwargs, named):
    data = kwargs.pop("data", Indices(8))
    for context in ("spawn", "forkserver"):
        if context not in multiprocessing.get_all_start_methods():
            continue
        with pytest.raises(TypeError, match=f"'{context}' start method sends the {named} to each worker") as error:
            ft.data.make_loader(data, 4, worker_method="process", multiprocessing_context=context, **kwargs)
        message = str(error.value)
        assert "module level" in message and "worker_method='thread'" in message, message


@pytest.mark.slow
def test_spawned_workers_load_the_same_batches_as_threads():
    data = images(n=12)
    spawned = ft.data.make_loader(
        data, 4, transform=_augment, num_workers=1, worker_method="process", multiprocessing_context="spawn"
    )
    threads = ft.data.make_loader(data, 4, transform=_augment, worker_method="thread")
    try:
        for _ in range(2):
            assert_same_batches(list(spawned), list(threads))
    finally:
        spawned.close()


CLEAN_EXIT = """
import torch, torchvision.transforms.v2 as v2, functrain as ft
data = ft.data.ImageLabelDataset(torch.zeros(64, 1, 8, 8, dtype=torch.uint8), torch.arange(64) % 3)
crop = v2.RandomCrop(8, padding=2)
for method in ("auto", "thread"):
    loader = ft.data.make_loader(data, 4, transform=crop, worker_method=method)
    for i, _ in enumerate(loader):
        if i == 3:
            break
    loader.set_epoch(2)  # a restart while the workers run
    next(iter(loader))
    print(loader.worker_method)
# exits mid-epoch, the loaders never closed
"""


def test_the_interpreter_exits_cleanly_mid_epoch_without_close():
    done = subprocess.run([sys.executable, "-c", CLEAN_EXIT], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.split() == ["process" if DEFAULT_IS_PROCESS else "thread", "thread"]


@pytest.mark.slow
@pytest.mark.skipif(not FORK, reason="process tests use the fork start method")
def test_process_workers_give_the_thread_workers_batches_and_report_bad_samples():
    data = images()
    threads = epochs(ft.data.make_loader(data, 4, transform=AUGMENT), 2)
    processes = ft.data.make_loader(data, 4, transform=AUGMENT, worker_method="process", multiprocessing_context="fork")
    for epoch in threads:
        assert_same_batches(list(processes), epoch)
    bad = ft.data.make_loader(
        FailsAt(12, 5), 4, transform=_raise_on(5), worker_method="process", multiprocessing_context="fork"
    )
    kind, error = within(30, lambda: list(bad))
    assert kind == "error" and isinstance(error, ft.data.SampleError) and "sample 5" in str(error)


class DiesAt(Indices):
    """Kills the worker process that loads sample ``bad`` (never the test process)."""

    def __init__(self, n, bad, parent):
        super().__init__(n)
        self.bad, self.parent = bad, parent

    def __getitem__(self, i):
        if i == self.bad and os.getpid() != self.parent:
            os._exit(3)
        return i


@pytest.mark.slow
@pytest.mark.skipif(not FORK, reason="process tests use the fork start method")
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(worker_method="process", multiprocessing_context="fork"),
        pytest.param({}, marks=pytest.mark.skipif(not DEFAULT_IS_PROCESS, reason="the default is threads here")),
    ],
)
def test_a_dying_worker_process_is_a_clear_error_not_a_hang(kwargs):
    loader = ft.data.make_loader(DiesAt(40, bad=21, parent=os.getpid()), 4, shuffle=False, **kwargs)
    kind, error = within(30, lambda: list(loader))
    assert kind == "error" and isinstance(error, ft.data.WorkerError), error
    assert "exited with code 3" in str(error)
