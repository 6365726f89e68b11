"""Checkpoints: everything a resume needs, in one file, written atomically and loaded safely.

A checkpoint holds the training state (params, buffers, optimiser state, step count), the data
loader's position (``loader.state_dict()``), the random number generators (torch CPU and CUDA,
Python ``random``, and numpy's global generator when numpy is in use) and the loop's progress
(step, epoch, position in the epoch, history, callback states). Restoring all of it makes a resumed
run continue bit for bit where the first one stopped: the same batches in the same order, the same
dropout masks, the same optimiser steps.

Writes are atomic: the file is written under a temporary name in the same directory, flushed and
``fsync``-ed, renamed over the final name with ``os.replace`` (atomic on POSIX and Windows), and the
directory is ``fsync``-ed so the rename itself survives a power cut. A process killed at any moment
leaves either the previous file or the new one, never a torn one. The temporary is named
``.<name>.functrain-<host>-<pid>-<random>.tmp`` (``<host>``: the hostname and, on Linux, the pid
namespace): it says which process on which machine writes it, so
:class:`functrain.callbacks.Checkpoint` can sweep the ones a killed process left without touching a
save another run has in flight. A write that fails (a full disk, a quota) removes the temporary and
raises an ``OSError`` with the ``errno`` (``ENOSPC``...) that names the file; the previous file stays.
The file gets the permissions of any other new file (``0666`` less the umask).

Loading first checks every record of the file against its CRC-32 (the file is a zip archive; a
flipped bit is an error naming the file and the record; the check costs under 0.1 s per 100 MB),
then uses ``torch.load(weights_only=True)``: only tensors, plain containers and registered state
classes are rebuilt, so a file carrying a pickled object that would run code is refused. A file that
is not a checkpoint, or lacks a part of one, is an error naming the file and the part.

Sharded checkpoints: a state holding DTensors (``TrainState.create(model, tx, mesh=mesh)``) is saved
with ``torch.distributed.checkpoint`` (DCP) as a directory of the checkpoint's name
(``step-00000120.pt/``): every rank writes its own shards (``__<rank>_0.distcp``, nothing is gathered),
DCP's coordinator its ``.metadata``, and rank 0 ``functrain.pt``, a small file as above holding the
format, the state's structure (its classes, with ``meta`` tensors of each whole shape and dtype), the
ranks' loader positions and generators and the progress. All of it goes into one temporary directory
named like a temporary file (rank 0 picks the name), and rank 0 renames it into place once every rank
is done, then ``fsync``-s the parent. A directory cannot be renamed over another, so a checkpoint
already of that name (``best.pt``) is first moved aside (``.<name>.functrain-<host>-<pid>-<random>.old``)
and removed once the new one is in place: a crash in that instant leaves no checkpoint of that name,
but the previous one complete under the aside name, which :func:`load_checkpoint` names and the sweep
keeps. A failed write on any rank fails the save on every rank and removes the temporary directory;
a killed save leaves it, to be swept. Loading reshards: each rank reads the parts of the saved shards
its own tensors cover, whatever the number of ranks or the mesh that saved them (or a plain state in
a process with no process group). The safety checks have DCP counterparts: ``functrain.pt`` is read as
a file above (CRC-32, ``weights_only``); DCP's ``.metadata`` is unpickled with only DCP's metadata
classes allowed; structure, shapes and dtypes are checked, and every shard file is checked to hold
the bytes ``.metadata`` points at, before anything is read; and every chunk read is checked against
the CRC-32s of the ``torch.save`` archive DCP wrote it as. Loader positions and generator states are
restored only on as many ranks as saved them (see :func:`load_checkpoint`).

:func:`save_weights` / :func:`load_weights` write and read just the params and buffers as a
``.safetensors`` file (with the optional ``safetensors`` package), for sharing or serving weights.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import random
import re
import secrets
import shutil
import socket
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import _sharding, _tree, distributed
from .wrappers import ScheduleState

FORMAT = "functrain.checkpoint/1"
SHARDED_FORMAT = "functrain.checkpoint.sharded/1"
# Inside a sharded checkpoint (a directory): rank 0's file with everything but the tensors, beside DCP's files.
INDEX = "functrain.pt"
_STEP_FILE = re.compile(r"step-(\d{8,})\.pt")


def step_file_name(step: int) -> str:
    """The name of the periodic checkpoint of ``step``: ``step-00000120.pt`` (zero-padded to 8 digits)."""
    return f"step-{step:08d}.pt"


def step_of_file(name: str) -> int | None:
    """The step of a file named exactly as :func:`step_file_name` names it, else ``None``: a user's
    ``step-00000002-known-good.pt`` or ``step-99.pt`` is not a periodic checkpoint, so it is never
    resumed from or deleted."""
    found = _STEP_FILE.fullmatch(name)
    return int(found[1]) if found and step_file_name(int(found[1])) == name else None


def save_checkpoint(path: str | os.PathLike, state: Any, *, loader: Any = None, progress: dict | None = None) -> Path:
    """Writes ``state``, the loader's position, the RNG states and ``progress`` to ``path``, atomically.

    Args:
        path: the file to write (a directory, for a sharded state); its parent directory must exist.
            An existing checkpoint there is replaced only once the new one is complete and on disk.
        state: any tree of tensors (a :class:`~functrain.TrainState`, or a tuple of them for a GAN).
            State classes must be decorated with :func:`~functrain.register_state`. A state holding
            DTensors (``TrainState.create(model, tx, mesh=mesh)``) is saved sharded: ``path`` becomes a
            directory in which each rank writes its own shards with ``torch.distributed.checkpoint``
            (see "Sharded checkpoints" in :mod:`functrain.checkpoint`); every rank must see the same
            file system.
        loader: the training data loader; its ``state_dict()`` is saved when it has one.
        progress: plain data (ints, floats, strings, lists, dicts, tensors) about the loop, e.g.
            the step, the epoch and the history; :class:`~functrain.Loop` fills it in.

    Returns:
        The path written.

    Example:
        >>> import torch, tempfile, os, functrain as ft
        >>> state = ft.TrainState.create(torch.nn.Linear(3, 2), ft.adam(lr=1e-3))
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
        >>> _ = ft.save_checkpoint(path, state, progress={"epoch": 2})
        >>> restored, progress = ft.load_checkpoint(path, like=state)
        >>> torch.equal(restored.params["weight"], state.params["weight"]), progress["epoch"]
        (True, 2)
    """
    path = Path(path)
    # What differs between data-parallel ranks (each loader's shard position, each rank's RNGs) is
    # gathered to every rank (rank 0 writes it); every rank calls this at the same point.
    mine = {"loader": loader.state_dict() if hasattr(loader, "state_dict") else None, "rng": rng_state()}
    ranks = distributed.gather_objects(mine)
    if _sharding.has_dtensors(state):
        _save_sharded(path, state, ranks, dict(progress or {}))
        return path
    payload = {
        "format": FORMAT,
        "state": _tree.map(lambda t: t.detach() if isinstance(t, Tensor) else t, state),
        "ranks": ranks,
        "progress": dict(progress or {}),
    }
    if distributed.is_main_process():
        atomic_save(payload, path)
    distributed.barrier()  # no rank goes on (or loads) before the file is complete
    return path


def load_checkpoint(
    path: str | os.PathLike, like: Any, *, loader: Any = None, restore_rng: bool = True
) -> tuple[Any, dict]:
    """Reads a checkpoint written by :func:`save_checkpoint`; returns ``(state, progress)``.

    The state takes the layout of ``like``, whatever the layout it was saved with: a checkpoint saved
    sharded on N ranks loads on M ranks (``like`` built with ``TrainState.create(model, tx,
    mesh=mesh)`` on the M ranks), or into a plain state in one process without any process group;
    a single-file checkpoint loads into a sharded ``like`` (each rank keeps its shards of the whole
    tensors it reads).

    Args:
        path: the checkpoint file (or directory, for one saved sharded).
        like: a state of the expected structure (e.g. a freshly created ``TrainState``). The loaded
            state must match it key for key, shape for shape and dtype for dtype, and its tensors
            are moved to the devices (and, for DTensors, the mesh and placements) of ``like``'s tensors.
        loader: the training data loader; its position is restored with ``load_state_dict``.
        restore_rng: set the torch, CUDA, Python ``random`` and numpy generators to their saved states.

    Loader positions and generator states are per rank: they are restored only when the checkpoint
    was saved by as many ranks as load it. Otherwise (a run saved on 4 ranks and loaded on 2) each
    rank's share of the data and its random streams differ from the saved ones whatever is restored,
    so neither is restored and a ``RuntimeWarning`` says so; the state is loaded all the same.
    :func:`~functrain.fit` then continues from the saved step and epoch (see its ``resume``).

    Raises:
        FileNotFoundError: nothing at ``path`` (the message says so when an interrupted save left the
            previous checkpoint of that name moved aside, and where it is).
        ValueError: the file is not a functrain checkpoint, is truncated, fails its CRC-32 check
            (corrupted on disk or in transit), lacks a part of a checkpoint (the message names it),
            holds objects that could run code (refused by ``torch.load(weights_only=True)``), or
            was saved for another model or optimiser (the message names the first mismatching key
            or shape). For a directory: it is not a sharded functrain checkpoint, or a save of it was
            torn (DCP's ``.metadata``, a shard file or a part of one is missing).
    """
    state, progress, saved_by = _load(path, like, loader=loader, restore_rng=restore_rng)
    if saved_by != distributed.world_size() and (loader is not None or restore_rng):
        warnings.warn(
            f"load_checkpoint: '{path}' was saved by {saved_by} process(es) and is loaded by "
            f"{distributed.world_size()}: the state is loaded, but the loader positions and random generator states "
            f"are per rank and were not restored (pass loader=None, restore_rng=False to load only the state)",
            RuntimeWarning,
            stacklevel=2,
        )
    return state, progress


def _load(path: str | os.PathLike, like: Any, *, loader: Any, restore_rng: bool) -> tuple[Any, dict, int]:
    """:func:`load_checkpoint`, and the number of ranks that saved the checkpoint: the loader position
    and the generators are restored only when it is this run's (the caller says what it means otherwise)."""
    path = Path(path)
    if path.is_dir():
        payload = _complete(path, _read(_index_of(path)), SHARDED_FORMAT)
        state = _load_sharded(path, payload["state"], like)
    elif path.is_file():
        payload = _complete(path, _read(path), FORMAT)
        state = _placed_like(_matched(path, payload["state"], like), like)
    else:
        raise FileNotFoundError(f"load_checkpoint: no checkpoint at '{path}'{_moved_aside_note(path)}")
    ranks = payload["ranks"]
    if len(ranks) != distributed.world_size() or (loader is None and not restore_rng):
        return state, payload["progress"], len(ranks)
    mine = ranks[distributed.rank()]
    if loader is not None and mine["loader"] is not None:
        if not hasattr(loader, "load_state_dict"):
            raise TypeError(f"load_checkpoint: '{path}' holds a loader position but the loader has no load_state_dict")
        loader.load_state_dict(mine["loader"])
    if restore_rng:
        set_rng_state(mine["rng"])
    return state, payload["progress"], len(ranks)


def _read(path: Path) -> Any:
    """The object ``torch.save`` wrote to ``path``, once every record of the file matches its CRC-32.

    ``torch.load`` does not check the zip's checksums, so a flipped bit in a tensor would load as a
    silently wrong number. Both steps read the one open file, so they see the same bytes.
    """
    with path.open("rb") as file:
        _check_archive(path, file)
        file.seek(0)
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            refused = re.search(r"GLOBAL ([\w.]+)", str(error))
            if refused is None:  # torch's message would advise weights_only=False: never pass that on
                raise ValueError(f"load_checkpoint: '{path}' is not a functrain checkpoint: {_NOT_OURS}") from None
            raise ValueError(
                f"load_checkpoint: refused to load '{path}': it holds an object of class '{refused[1]}', which "
                f"torch.load(weights_only=True) will not rebuild, because unpickling it could run code. "
                f"Checkpoints hold only tensors, plain containers and classes decorated with ft.register_state: "
                f"decorate your own state classes with it, and load only files you trust"
            ) from None
        except (RuntimeError, EOFError, KeyError, IndexError, ValueError, TypeError, AttributeError) as error:
            # A sound zip archive that torch cannot read (it does not hold a pickle written by torch.save)
            raise ValueError(f"load_checkpoint: '{path}' is not a functrain checkpoint: {_NOT_OURS}") from error


_NOT_OURS = "it does not hold what ft.save_checkpoint writes (it is another kind of file, or damaged beyond repair)"


def _check_archive(path: Path, file: Any) -> None:
    """Raises ``ValueError`` unless ``file`` is a zip archive whose every record matches its CRC-32."""
    try:
        with zipfile.ZipFile(file) as archive:
            corrupted = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as error:
        file.seek(0)
        if file.read(4) != b"PK\x03\x04":  # not even the start of a zip archive, as torch.save writes
            raise ValueError(f"load_checkpoint: '{path}' is not a functrain checkpoint: {_NOT_OURS}") from None
        raise ValueError(
            f"load_checkpoint: '{path}' is not a readable checkpoint: it is truncated or corrupted ({error})"
        ) from None
    if corrupted is not None:
        raise ValueError(
            f"load_checkpoint: '{path}' is corrupted: its record '{corrupted}' does not match its CRC-32 "
            f"checksum (damaged on disk or in a copy); load an intact copy or an earlier checkpoint"
        )


def _complete(path: Path, payload: Any, expected: str) -> dict:
    """``payload``, once it is a checkpoint of format ``expected`` with every part (the error names the first
    missing)."""
    if not isinstance(payload, dict) or "format" not in payload:
        raise ValueError(f"load_checkpoint: '{path}' is not a functrain checkpoint (no '{expected}' marker)")
    if payload["format"] != expected:
        raise ValueError(
            f"load_checkpoint: '{path}' has format {payload['format']!r}; this functrain reads {expected!r}"
        )
    _require(path, payload, ("state", "ranks", "progress"), "the checkpoint")
    if not isinstance(payload["ranks"], (list, tuple)) or not payload["ranks"]:
        raise ValueError(f"load_checkpoint: '{path}' is an incomplete functrain checkpoint: 'ranks' is empty")
    for rank, mine in enumerate(payload["ranks"]):
        _require(path, mine, ("loader", "rng"), f"rank {rank}'s entry")
        _require(path, mine["rng"], ("torch", "python"), f"rank {rank}'s random generator states")
    return payload


def _require(path: Path, entries: Any, keys: tuple[str, ...], what: str) -> None:
    for key in keys:
        if not isinstance(entries, dict) or key not in entries:
            has = sorted(entries) if isinstance(entries, dict) else type(entries).__name__
            raise ValueError(
                f"load_checkpoint: '{path}' is an incomplete functrain checkpoint: {what} has no '{key}' entry "
                f"(it has {has}); it was not written by ft.save_checkpoint, or was altered since"
            )


def _matched(path: Path, loaded: Any, like: Any) -> Any:
    """``loaded`` checked against ``like`` (see :func:`_checked`), moved to its devices."""
    loaded = _checked(path, loaded, like)
    return _tree.map(lambda t, e: t.to(e.device) if isinstance(e, Tensor) else t, loaded, like)


def _checked(path: Path, loaded: Any, like: Any) -> Any:
    """``loaded``, once it matches ``like``: structure, then shapes and dtypes (a DTensor's shape is its
    whole shape, so a state saved with one layout is checked against another)."""
    loaded = _named_schedule_states(loaded, like)
    try:
        _tree.check_same_structure(loaded, like, "the checkpoint's state", "the expected state")
    except _tree.TreeMismatchError as error:
        raise ValueError(f"load_checkpoint: '{path}' was saved for another model or optimiser: {error}") from None
    for (name, saved), (_, expected) in zip(_tree.named_leaves(loaded), _tree.named_leaves(like)):
        if isinstance(expected, Tensor) and (saved.shape != expected.shape or saved.dtype != expected.dtype):
            raise ValueError(
                f"load_checkpoint: '{path}' was saved for another model or optimiser: '{name}' is "
                f"{tuple(saved.shape)} {saved.dtype} in the checkpoint but {tuple(expected.shape)} "
                f"{expected.dtype} in the expected state"
            )
    return loaded


def _placed_like(state: Any, like: Any) -> Any:
    """``state`` (whole tensors, read by every rank) with each tensor where ``like`` has a DTensor
    distributed with its mesh and placements: each rank keeps its own shards, no communication."""
    if not _sharding.has_dtensors(like):
        return state
    from torch.distributed.tensor import distribute_tensor

    def place(t: Any, e: Any) -> Any:
        return distribute_tensor(t, e.device_mesh, e.placements, src_data_rank=None) if _sharding.is_dtensor(e) else t

    return _tree.map(place, state, like)


def _named_schedule_states(loaded: Any, like: Any) -> Any:
    """``loaded`` with each plain ``ScheduleState`` (written before every optimiser's state had a class
    of its own) given the class ``like`` has at the same place, so those checkpoints still load; the
    structure, shapes and dtypes are checked as for any other."""
    if type(loaded) is ScheduleState and isinstance(like, ScheduleState):
        return type(like)(*(_named_schedule_states(x, y) for x, y in zip(loaded, like)))
    if type(loaded) is not type(like):
        return loaded
    if isinstance(loaded, dict):
        return type(loaded)((k, _named_schedule_states(v, like[k]) if k in like else v) for k, v in loaded.items())
    if isinstance(loaded, (tuple, list)) and len(loaded) == len(like):
        children = [_named_schedule_states(x, y) for x, y in zip(loaded, like)]
        return type(loaded)(*children) if hasattr(loaded, "_fields") else type(loaded)(children)
    return loaded


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The periodic checkpoint (``step-<n>.pt``, named by :func:`step_file_name`) with the largest
    step in ``directory`` (``None`` if there is none): a file, or a sharded checkpoint's directory.
    Files named otherwise are the user's, and ignored, as is a directory of that name that is not a
    sharded checkpoint (it has no ``functrain.pt``).

    Only complete checkpoints carry that name (see :func:`atomic_save`), so the latest one is always readable.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [(step, p) for p in directory.iterdir() if (step := step_of_file(p.name)) is not None and _is_checkpoint(p)]
    return max(found)[1] if found else None


def _is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint :func:`save_checkpoint` could have written: a file, or a directory
    holding a sharded checkpoint's ``functrain.pt`` (only such directories are ever replaced or deleted)."""
    path = Path(path)
    return path.is_file() or (path.is_dir() and not path.is_symlink() and (path / INDEX).is_file())


# ----------------------------------------------------------------------------- sharded checkpoints (DCP)


def _save_sharded(path: Path, state: Any, ranks: list, progress: dict) -> None:
    """Every rank writes its own shards of ``state`` with DCP into one temporary directory; rank 0 adds
    the index (``functrain.pt``: the format, the state's structure, the ranks' loader positions and
    generators, the progress), then renames the directory to ``path`` once every rank is done."""
    import torch.distributed.checkpoint as dcp

    tensors = {name: t.detach() for name, t in _tensors_by_name("save_checkpoint", state).items()}
    tmp = _temporary_directory_of_rank_0(path)
    failure = None
    try:
        _dcp_call(path, lambda: dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True)))
        if distributed.is_main_process():
            index = {"format": SHARDED_FORMAT, "state": _skeleton(state), "ranks": ranks, "progress": progress}
            atomic_save(index, tmp / INDEX)
            _fsync_directory(tmp)  # DCP's files and the index are named in it before it is renamed
    except Exception as error:  # every rank learns of it below, so none waits alone in a collective
        failure = error
    _raise_on_every_rank_if_one_failed(path, failure, cleanup=lambda: _remove(tmp))
    if distributed.is_main_process():
        try:
            _install(tmp, path)
        except Exception as error:
            failure = error
    _raise_on_every_rank_if_one_failed(path, failure, cleanup=lambda: _remove(tmp))  # also: no rank goes on early


def _tensors_by_name(owner: str, state: Any) -> dict[str, Tensor]:
    """The tensors of ``state`` by their dotted names (``params.fc.weight``): the keys DCP stores them under."""
    named = [(name, t) for name, t in _tree.named_leaves(state) if isinstance(t, Tensor)]
    tensors = dict(named)
    if len(tensors) != len(named):
        twice = next(name for name, _ in named if sum(n == name for n, _ in named) > 1)
        raise ValueError(f"{owner}: two tensors of the state have the same dotted name '{twice}'; rename a key")
    return tensors


def _skeleton(state: Any) -> Any:
    """``state`` with each tensor replaced by a ``meta`` tensor of its whole shape and dtype (no data): the
    index keeps it, so that a load checks structure, shapes and dtypes, and rebuilds the state classes,
    before reading any shard."""
    return _tree.map(
        lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta") if isinstance(t, Tensor) else t, state
    )


def _temporary_directory_of_rank_0(path: Path) -> Path:
    """The temporary directory rank 0 creates next to ``path``, named on every rank (or its error, raised on all)."""
    made, failure = None, None
    if distributed.is_main_process():
        try:
            made = _create_temporary_directory(path)
        except OSError as error:
            failure = _write_failed(path, error) if error.errno is not None else error
    _raise_on_every_rank_if_one_failed(path, failure)
    return Path(distributed.gather_objects(made)[0])


def _raise_on_every_rank_if_one_failed(path: Path, failure: BaseException | None, cleanup: Callable[[], None] = None):
    """A collective: raises ``failure`` on its rank and, on every other, an error naming the rank that failed
    (after rank 0 ran ``cleanup``), so that no rank goes on to wait alone in the next collective."""
    failures = distributed.gather_objects(None if failure is None else f"{type(failure).__name__}: {failure}")
    failed = [(rank, what) for rank, what in enumerate(failures) if what is not None]
    if not failed:
        return
    if cleanup is not None and distributed.is_main_process():
        cleanup()
    if failure is not None:
        raise failure
    rank, what = failed[0]
    raise RuntimeError(f"save_checkpoint: rank {rank} failed to save '{path}': {what}")


def _dcp_call(path: Path, call: Callable[[], Any]) -> Any:
    """``call()``, with DCP's ``CheckpointException`` (which wraps each rank's error) turned back into the
    error of the first failing rank: our ``ValueError`` naming the file, or an ``OSError`` with its errno."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return call()
    except CheckpointException as wrapped:
        rank, (error, _) = min(wrapped.failures.items(), key=lambda item: item[0])
        if isinstance(error, OSError) and error.errno is not None:
            raise _write_failed(path, error) from None
        if isinstance(error, (ValueError, OSError)):
            raise error from None
        raise RuntimeError(f"torch.distributed.checkpoint failed on rank {rank} with '{path}': {error!r}") from None


def _index_of(path: Path) -> Path:
    """The index of the sharded checkpoint ``path`` (a directory), or an error saying it is not one."""
    index = path / INDEX
    if not index.is_file():
        raise ValueError(
            f"load_checkpoint: '{path}' is a directory but not a functrain checkpoint: it has no '{INDEX}', which "
            f"ft.save_checkpoint writes into the directory of every sharded checkpoint"
        )
    return index


def _load_sharded(path: Path, skeleton: Any, like: Any) -> Any:
    """The state of the sharded checkpoint ``path`` in ``like``'s layout: DCP reads into each rank's
    tensors the parts of the saved shards they cover, whatever layout saved them (resharding)."""
    import torch.distributed.checkpoint as dcp

    skeleton = _checked(path, skeleton, like)
    metadata = _dcp_metadata(path)
    wanted = _tensors_by_name("load_checkpoint", like)
    _check_complete(path, metadata, wanted)
    into = {name: torch.empty_like(t) for name, t in wanted.items()}
    # no_dist: reading is local (each rank reads the chunks its tensors cover), so a rank may load alone,
    # e.g. rank 0 evaluating a plain state, and a process without any process group loads too.
    with warnings.catch_warnings():  # DCP warns that it loads "in a single process": no_dist says so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        _dcp_call(path, lambda: dcp.load(into, storage_reader=_checked_reader(path, metadata), no_dist=True))
    loaded = [into[name] if isinstance(t, Tensor) else t for name, t in _tree.named_leaves(skeleton)]
    return _tree.unflatten(loaded, _tree.structure(like))


def _dcp_metadata(path: Path) -> Any:
    """DCP's ``.metadata`` of ``path``, unpickled with only DCP's metadata classes allowed (DCP itself
    would ``pickle.load`` it, which runs whatever code the file names)."""
    from torch.distributed.checkpoint.metadata import Metadata

    file = path / ".metadata"
    if not file.is_file():
        raise ValueError(
            f"load_checkpoint: '{path}' is an incomplete sharded checkpoint: it has no '.metadata' (DCP's index of the "
            f"shards); a save was torn, or the directory was altered since"
        )
    with file.open("rb") as opened:
        try:
            metadata = _MetadataUnpickler(opened).load()
        except _Refused as refused:
            raise ValueError(
                f"load_checkpoint: refused to load '{file}': it names '{refused}', which is not a class of DCP's "
                f"metadata, and unpickling it could run code; load only checkpoints you trust"
            ) from None
        except Exception as error:
            raise ValueError(f"load_checkpoint: '{file}' is truncated or corrupted ({error!r})") from None
    if not isinstance(metadata, Metadata):
        raise ValueError(f"load_checkpoint: '{file}' is not DCP metadata (it holds a {type(metadata).__name__})")
    return metadata


class _Refused(Exception):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    """Rebuilds only what DCP's metadata holds: its dataclasses, sizes, dtypes, layouts and paths."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            module == "torch.distributed.checkpoint.metadata"
            or (module, name) in _METADATA_GLOBALS
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}


def _check_complete(path: Path, metadata: Any, wanted: dict[str, Tensor]) -> None:
    """Every tensor the index lists is in DCP's metadata with its shape and dtype, and every shard file
    holds the bytes the metadata points at: a torn or altered save is named, not half read."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for name, t in wanted.items():
        saved = metadata.state_dict_metadata.get(name)
        if not isinstance(saved, TensorStorageMetadata) or (saved.size, saved.properties.dtype) != (t.shape, t.dtype):
            raise ValueError(
                f"load_checkpoint: '{path}' is torn or altered: DCP's '.metadata' "
                + ("has no tensor " if not isinstance(saved, TensorStorageMetadata) else "does not match ")
                + f"'{name}', which its '{INDEX}' lists as {tuple(t.shape)} {t.dtype}"
            )
    sizes: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        if info.relative_path not in sizes:
            shard = path / info.relative_path
            sizes[info.relative_path] = shard.stat().st_size if shard.is_file() else -1
        if sizes[info.relative_path] < info.offset + info.length:
            what = "is missing" if sizes[info.relative_path] < 0 else "is shorter than DCP's '.metadata' says"
            raise ValueError(f"load_checkpoint: '{path}' is torn: its shard file '{info.relative_path}' {what}")


def _checked_reader(path: Path, metadata: Any) -> Any:
    """A DCP ``FileSystemReader`` of ``path`` that takes the already checked ``metadata`` and checks every
    record it reads against its CRC-32: each saved chunk is a ``torch.save`` zip archive, whose CRCs
    ``torch.load`` does not check (DCP then loads it with ``weights_only=True``)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class CheckedReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata.storage_meta = metadata.storage_meta or StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def _slice_file(self, file: Any, sinfo: Any) -> Any:
            data = super()._slice_file(file, sinfo).read(sinfo.length)
            where = path / f"{sinfo.relative_path}@{sinfo.offset}"
            _check_archive(where, io.BytesIO(data))
            return io.BytesIO(data)

    return CheckedReader(path)


# ----------------------------------------------------------------------------- atomic writes


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` such that a crash at any moment leaves either the old file or the new one."""
    _atomic_write(path, lambda file: torch.save(obj, file))


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Calls ``write(file)`` on a temporary file, then renames it to ``path``, with fsyncs on both sides.

    The temporary file lives in the same directory (``os.replace`` is atomic only within one file
    system). On any failure it is removed; a failed write of the disk (ENOSPC, EDQUOT, EIO...) is
    raised as an ``OSError`` with that ``errno`` and a message naming ``path``.
    """
    path = Path(path)
    fd, tmp = _create_temporary(path)
    file = None
    try:
        with os.fdopen(fd, "wb") as opened:
            file = _RememberingFile(opened)
            write(file)
            opened.flush()
            os.fsync(opened.fileno())  # the data is on disk before the name points at it
        _install(Path(tmp), path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        cause = file.error if file is not None and file.error is not None else error
        if isinstance(cause, OSError) and cause.errno is not None:
            raise _write_failed(path, cause) from error
        raise


class _RememberingFile:
    """A binary file that remembers the ``OSError`` its ``write`` raised.

    ``torch.save`` reports a failed write as ``[enforce fail at inline_container.cc] unexpected pos``:
    the ``errno`` that says why (a full disk) would be lost without this.
    """

    def __init__(self, file: Any):
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def _write_failed(path: Path, error: OSError) -> OSError:
    """The ``OSError`` to raise when writing ``path`` failed with ``error``: same ``errno``, says what to do."""
    name = errno.errorcode.get(error.errno, str(error.errno))
    why = {
        errno.ENOSPC: f"the disk is full ({name})",
        getattr(errno, "EDQUOT", -1): f"the disk quota is used up ({name})",
        errno.EFBIG: f"the file is larger than this process may write ({name}: see ulimit -f)",
    }.get(error.errno, f"{error.strerror} ({name})")
    return OSError(
        error.errno,
        f"could not write '{path}': {why}. Any earlier file of that name is unchanged and the partial "
        f"temporary file was removed",
    )


# The temporary file (or, for a sharded checkpoint, directory) of a save of <name> by process <pid> on
# machine <host> ends in .tmp; <random> keeps two saves of one process apart. A sharded checkpoint that
# a save replaces is first moved aside under the same name ending in .old (see _install). Nothing else
# in a directory carries these names.
_TEMPORARY = re.compile(
    r"^\.(?P<target>.+)\.functrain-(?P<host>[A-Za-z0-9._-]+)-(?P<pid>\d+)-[0-9a-f]+\.(?P<kind>tmp|old)$"
)


def _host() -> str:
    """Where a process id names one process: this machine's name and, on Linux, its pid namespace.

    Containers may share a hostname (host networking) yet number their processes apart; with the
    namespace in the name, one never takes another's live save for a dead one.
    """
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "unknown"
    with contextlib.suppress(OSError):
        host += f".pidns{os.stat('/proc/self/ns/pid').st_ino}"
    return host


def _create_temporary(path: Path) -> tuple[int, str]:
    """Creates and opens ``.<name>.functrain-<host>-<pid>-<random>.tmp`` next to ``path``.

    ``os.open`` with mode ``0o666`` lets the kernel apply the umask (and any default ACL), as for any
    other new file; ``tempfile.mkstemp`` would make it ``0o600`` whatever the user asked for.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    return _create_named(path, "tmp", lambda name: os.open(name, flags, 0o666))


def _create_temporary_directory(path: Path) -> str:
    """Creates the directory ``.<name>.functrain-<host>-<pid>-<random>.tmp`` next to ``path`` (mode
    ``0o777`` less the umask, as any new directory)."""
    return _create_named(path, "tmp", lambda name: os.mkdir(name, 0o777))[1]


def _owned_name(path: Path, kind: str) -> Path:
    """``.<name>.functrain-<host>-<pid>-<random>.<kind>`` next to ``path``: this process's, on this machine."""
    return path.with_name(f".{path.name}.functrain-{_host()}-{os.getpid()}-{secrets.token_hex(4)}.{kind}")


def _create_named(path: Path, kind: str, create: Callable[[str], Any]) -> tuple[Any, str]:
    for _ in range(100):
        name = str(_owned_name(path, kind))
        try:
            return create(name), name
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to '{path}': every name tried exists")


def _install(tmp: Path, path: Path) -> None:
    """Renames the complete checkpoint ``tmp`` to ``path`` and makes the rename durable.

    A file over a file is one atomic ``os.replace``. A directory cannot be renamed over another
    (``rename(2)`` refuses a non-empty one, and over a file), so an existing checkpoint at ``path`` is
    first moved aside to ``.<name>.functrain-<host>-<pid>-<random>.old``, the new one renamed into
    place, and the old one removed. A crash in the instant between the two renames leaves no
    checkpoint named ``path``, but the previous one complete under its ``.old`` name: loading
    ``path`` then says where it is, and the sweep at the start of training never removes it while
    ``path`` is missing. A directory that is not a checkpoint is never replaced.
    """
    if path.is_dir() and not _is_checkpoint(path):
        raise FileExistsError(
            errno.EEXIST, f"'{path}' is a directory that is not a functrain checkpoint, and is not replaced"
        )
    if not (tmp.is_dir() or path.is_dir()):
        os.replace(tmp, path)
    else:
        aside = _owned_name(path, "old") if os.path.lexists(path) else None
        if aside is not None:
            os.replace(path, aside)
        os.replace(tmp, path)
        if aside is not None:
            _fsync_directory(path.parent)  # the new checkpoint is in place before the old one goes
            _remove(aside)
    _fsync_directory(path.parent)


def _remove(path: Path) -> None:
    """Removes a file or a whole directory (a sharded checkpoint, or the temporary of one)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _moved_aside(path: Path) -> list[Path]:
    """The previous checkpoints of ``path`` that an interrupted :func:`_install` left moved aside."""
    if not path.parent.is_dir():
        return []
    return sorted(
        p
        for p in path.parent.iterdir()
        if (found := _TEMPORARY.match(p.name)) and found["kind"] == "old" and found["target"] == path.name
    )


def _moved_aside_note(path: Path) -> str:
    aside = _moved_aside(path)
    if not aside:
        return ""
    return (
        f": a save replacing it was interrupted in the instant between moving the previous checkpoint aside and "
        f"renaming the new one into place; the previous checkpoint is complete at '{aside[-1]}': rename it to "
        f"'{path.name}' to load it"
    )


def _sweep_temporaries(directory: Path, owns: Callable[[str], bool]) -> None:
    """Removes the temporaries that a save of a checkpoint ``owns`` names left when its process died.

    Only files and directories named as :func:`_create_temporary` names them are considered, and only
    when the process that wrote one is known to be gone: it ran on this machine and no process of that
    id runs now. A temporary of a live process (another run saving to the same directory) is left, and
    so is one from another machine, whose process cannot be checked from here (a warning names it).
    A previous checkpoint moved aside (``.old``, see :func:`_install`) is removed only once a
    checkpoint carries its name again; while none does it is the only copy, and a warning names it.
    """
    for candidate in sorted(directory.iterdir()):
        found = _TEMPORARY.match(candidate.name)
        if found is None or not owns(found["target"]):
            continue
        host, pid = found["host"], int(found["pid"])
        if host != _host():
            warnings.warn(
                f"Checkpoint: leaves '{candidate}': it was written by process {pid} on host '{host}', and from "
                f"'{_host()}' it cannot tell whether process {pid} is still saving; delete it once no run saves there",
                RuntimeWarning,
                stacklevel=3,
            )
        elif _is_running(pid):
            continue
        elif found["kind"] == "tmp" or _is_checkpoint(directory / found["target"]):
            _remove(candidate)
        else:
            warnings.warn(
                f"Checkpoint: leaves '{candidate}': it is the previous '{found['target']}', moved aside by a save "
                f"that was interrupted before the new one took its name; rename it to '{found['target']}' to use it",
                RuntimeWarning,
                stacklevel=3,
            )


def _is_running(pid: int) -> bool:
    """Whether a process with this id runs on this machine (``True`` when that cannot be told)."""
    if os.name != "posix" or pid == os.getpid():
        return True  # Windows' os.kill(pid, 0) would terminate the process, not probe it
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except OverflowError:  # an id no kernel gives
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":  # Windows cannot open a directory; NTFS journals the rename
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- weights as safetensors


def _safetensors(owner: str):
    try:
        import safetensors.torch
    except ImportError as error:
        raise ImportError(
            f"{owner}: needs the safetensors package: pip install 'functrain[safetensors]' (or pip install safetensors)"
        ) from error
    return safetensors.torch


def save_weights(path: str | os.PathLike, state: Any) -> Path:
    """Writes a :class:`~functrain.TrainState`'s params and buffers to a ``.safetensors`` file, atomically.

    For sharing or serving weights: the file holds only named tensors (``params.<name>`` and
    ``buffers.<name>``), which any safetensors reader loads without running code. To resume
    training, use :func:`save_checkpoint`, which also keeps the optimiser state, the loader and
    the RNGs. Needs the ``safetensors`` package.

    Example:
        >>> import torch, tempfile, os, functrain as ft
        >>> state = ft.TrainState.create(torch.nn.BatchNorm1d(3), ft.sgd(lr=0.1))
        >>> path = ft.save_weights(os.path.join(tempfile.mkdtemp(), "model.safetensors"), state)
        >>> torch.equal(ft.load_weights(path, like=state).buffers["running_var"], torch.ones(3))
        True
    """
    st = _safetensors("save_weights")
    tensors = {f"{group}.{name}": t.detach().cpu().contiguous() for group, name, t in _weights("save_weights", state)}
    data = st.save(tensors, metadata={"format": "functrain.weights/1"})
    _atomic_write(path, lambda file: file.write(data))
    return Path(path)


def load_weights(path: str | os.PathLike, like: Any) -> Any:
    """``like`` (a :class:`~functrain.TrainState`) with its params and buffers read from a file written by
    :func:`save_weights`; names, shapes and dtypes must match (the error names the first that does not)."""
    st = _safetensors("load_weights")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_weights: no weights file at '{path}'")
    saved = st.load(path.read_bytes())
    expected = {f"{group}.{name}": t for group, name, t in _weights("load_weights", like)}
    for key in [*expected, *saved]:
        if key not in saved or key not in expected:
            where = "the file" if key not in saved else "the expected state"
            raise ValueError(f"load_weights: '{path}' does not match: '{key}' is missing from {where}")
        if saved[key].shape != expected[key].shape or saved[key].dtype != expected[key].dtype:
            raise ValueError(
                f"load_weights: '{path}' does not match: '{key}' is {tuple(saved[key].shape)} {saved[key].dtype} in "
                f"the file but {tuple(expected[key].shape)} {expected[key].dtype} in the expected state"
            )
    loaded = {k: saved[k].to(t.device) for k, t in expected.items()}
    return like._replace(
        params={k: loaded[f"params.{k}"] for k in like.params},
        buffers={k: loaded[f"buffers.{k}"] for k in like.buffers},
    )


def _weights(owner: str, state: Any) -> list[tuple[str, str, Tensor]]:
    if not (isinstance(getattr(state, "params", None), dict) and isinstance(getattr(state, "buffers", None), dict)):
        raise TypeError(f"{owner}: expected a TrainState (params and buffers dicts), got {type(state).__name__}")
    return [("params", k, v) for k, v in state.params.items()] + [("buffers", k, v) for k, v in state.buffers.items()]


# ----------------------------------------------------------------------------- random number generators


def rng_state() -> dict[str, Any]:
    """The states of every global generator a training run draws from, as plain data and tensors."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")  # only when the program uses numpy; never imported here
    if numpy is not None:
        kind, keys, position, has_gauss, cached = numpy.random.get_state(legacy=True)
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), int(position), int(has_gauss), float(cached))
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores the generators saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = sys.modules.get("numpy")
    if "numpy" in state and numpy is not None:
        kind, keys, position, has_gauss, cached = state["numpy"]
        numpy.random.set_state((kind, keys.numpy().astype("uint32"), position, has_gauss, cached))


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
