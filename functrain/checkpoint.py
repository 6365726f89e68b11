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

:func:`save_weights` / :func:`load_weights` write and read just the params and buffers as a
``.safetensors`` file (with the optional ``safetensors`` package), for sharing or serving weights.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
import re
import secrets
import socket
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import _tree, distributed
from .wrappers import ScheduleState

FORMAT = "functrain.checkpoint/1"
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
        path: the file to write; its directory must exist. An existing file is replaced only once
            the new one is complete and on disk.
        state: any tree of tensors (a :class:`~functrain.TrainState`, or a tuple of them for a GAN).
            State classes must be decorated with :func:`~functrain.register_state`.
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
    # gathered into the one file, which rank 0 writes; every rank calls this at the same point.
    mine = {"loader": loader.state_dict() if hasattr(loader, "state_dict") else None, "rng": rng_state()}
    payload = {
        "format": FORMAT,
        "state": _tree.map(lambda t: t.detach() if isinstance(t, Tensor) else t, state),
        "ranks": distributed.gather_objects(mine),
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

    Args:
        path: the checkpoint file.
        like: a state of the expected structure (e.g. a freshly created ``TrainState``). The loaded
            state must match it key for key, shape for shape and dtype for dtype, and its tensors
            are moved to the devices of ``like``'s tensors.
        loader: the training data loader; its position is restored with ``load_state_dict``.
        restore_rng: set the torch, CUDA, Python ``random`` and numpy generators to their saved states.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a functrain checkpoint, is truncated, fails its CRC-32 check
            (corrupted on disk or in transit), lacks a part of a checkpoint (the message names it),
            holds objects that could run code (refused by ``torch.load(weights_only=True)``), or
            was saved for another model or optimiser (the message names the first mismatching key
            or shape).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: no checkpoint file at '{path}'")
    payload = _complete(path, _read(path))
    state = _matched(path, payload["state"], like)
    if loader is None and not restore_rng:
        return state, payload["progress"]  # the weights alone, e.g. to evaluate: any number of processes
    ranks = payload["ranks"]
    if len(ranks) != distributed.world_size():
        raise ValueError(
            f"load_checkpoint: '{path}' was saved by {len(ranks)} process(es) and is loaded by "
            f"{distributed.world_size()}: resume with the same number of ranks (or pass loader=None, "
            f"restore_rng=False to load only the state)"
        )
    mine = ranks[distributed.rank()]
    if loader is not None and mine["loader"] is not None:
        if not hasattr(loader, "load_state_dict"):
            raise TypeError(f"load_checkpoint: '{path}' holds a loader position but the loader has no load_state_dict")
        loader.load_state_dict(mine["loader"])
    if restore_rng:
        set_rng_state(mine["rng"])
    return state, payload["progress"]


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


def _complete(path: Path, payload: Any) -> dict:
    """``payload``, once it is a checkpoint of this format with every part (the error names the first missing)."""
    if not isinstance(payload, dict) or "format" not in payload:
        raise ValueError(f"load_checkpoint: '{path}' is not a functrain checkpoint (no '{FORMAT}' marker)")
    if payload["format"] != FORMAT:
        raise ValueError(f"load_checkpoint: '{path}' has format {payload['format']!r}; this functrain reads {FORMAT!r}")
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
    """``loaded`` checked against ``like`` (structure, then shapes and dtypes), moved to its devices."""
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
    return _tree.map(lambda t, e: t.to(e.device) if isinstance(e, Tensor) else t, loaded, like)


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
    step in ``directory`` (``None`` if there is none). Files named otherwise are the user's, and
    ignored.

    Only complete files carry that name (see :func:`atomic_save`), so the latest one is always readable.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [(step, p) for p in directory.iterdir() if (step := step_of_file(p.name)) is not None and p.is_file()]
    return max(found)[1] if found else None


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
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        cause = file.error if file is not None and file.error is not None else error
        if isinstance(cause, OSError) and cause.errno is not None:
            raise _write_failed(path, cause) from error
        raise
    _fsync_directory(path.parent)  # the rename itself is durable


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


# The temporary file of a save of <name> by process <pid> on machine <host>; <random> keeps two
# saves of one process apart. Nothing else in a directory carries this name.
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.functrain-(?P<host>[A-Za-z0-9._-]+)-(?P<pid>\d+)-[0-9a-f]+\.tmp$")


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
    for _ in range(100):
        tmp = str(path.with_name(f".{path.name}.functrain-{_host()}-{os.getpid()}-{secrets.token_hex(4)}.tmp"))
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to '{path}': every name tried exists")


def _sweep_temporaries(directory: Path, owns: Callable[[str], bool]) -> None:
    """Removes the temporary files that a save of a file ``owns`` names left when its process died.

    Only files named as :func:`_create_temporary` names them are considered, and only when the
    process that wrote one is known to be gone: it ran on this machine and no process of that id
    runs now. A temporary of a live process (another run saving to the same directory) is left, and
    so is one from another machine, whose process cannot be checked from here (a warning names it).
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
        elif not _is_running(pid):
            candidate.unlink(missing_ok=True)


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
