"""Warm starts: what ``torch.compile`` built in one process, saved to one file and loaded in another.

A compiled step's first call traces it (dynamo), builds its forward and backward graphs
(AOTAutograd), generates and compiles their kernels (inductor) and runs it. Inductor keeps what it
built in its cache directory (``TORCHINDUCTOR_CACHE_DIR``, by default ``/tmp/torchinductor_<user>``),
so a second process on the same machine skips most of that; a process with an empty cache directory
(another machine, a container, a cleared ``/tmp``) compiles everything again: tens of seconds on a
CPU for a small MLP, minutes for a GPT.

:func:`save_compile_cache` writes what this process compiled to one file;
:func:`load_compile_cache` puts it into this process's cache directory before the step compiles, so
the compile finds every graph and kernel there. The file is a zip archive holding:

- ``torch.compiler.save_cache_artifacts()``'s bytes: inductor's FX graph cache entries (each
  graph's generated code), the AOTAutograd cache entries, autotuning results, and on GPUs the
  Triton kernels bundled into the graph entries. Loading hands them to
  ``torch.compiler.load_cache_artifacts``.
- The C++ kernels those graphs run on the CPU (``<key>.so``, with their source), which that API
  does not carry: without them a CPU process compiles every kernel again with the C++ compiler,
  which is most of a cold compile (the benchmark MLP on 2 CPU cores: 19 s to its first step with
  torch's entries alone, 21 s cold, 5 s with the kernels too). With them a CPU process starting from
  an empty cache directory reaches its first step as fast as one with a warm cache. Also the small
  probe libraries inductor builds once per cache directory to check which vector
  instructions the compiler supports (``*.so.load_ok``): a second or so each.
- The traces of the steps built with ``compile={"precompile": True}`` (``functrain/_precompile.py``):
  a step's whole compile, dynamo's trace included, which a new process uses without tracing,
  only for the step it was traced from (same closure, sources, module values and settings).

Each kernel's name is a hash of its source and of the full compiler command (compiler version,
flags, the instruction set chosen for this CPU, include paths), so a kernel from another machine is
used only where this machine would compile the same source with the same command, and a graph
entry is found only by a compile of the same graph with the same torch and settings. What is not
found is compiled as usual: a cache from another stack makes the first step no faster, never
different. Numbers are unchanged: a graph served from the cache is the code that compiling it
would generate, and a default compiled functrain step makes no timed choice (see
``docs/concepts/compiling.md``).

**The file is code.** It holds compiled libraries and pickled graph entries that torch loads and
runs, as it does from its own cache directory. Load only files you would run as a script: a
checkpoint directory from someone else is safe to resume from with ``weights_only`` checkpoints,
but not its ``compile-cache.bin``; delete that file, or pass ``compile_cache=False`` to
:class:`~functrain.callbacks.Checkpoint`.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import platform
import re
import secrets
import sys
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from . import _precompile
from .checkpoint import _atomic_write

FORMAT = "functrain.compile_cache/1"
# The file a Checkpoint writes beside its checkpoints (never pruned: it is not a step-<n>.pt).
COMPILE_CACHE = "compile-cache.bin"
_MANIFEST = "functrain.json"
# A kernel file inside the cache directory: <two characters>/<name>, as inductor names them
# (the two characters are the second and third of the hash). Nothing else is ever written there.
_KERNEL = re.compile(r"[a-z0-9]{2}/[A-Za-z0-9_][A-Za-z0-9_.]*")


def save_compile_cache(path: str | os.PathLike) -> Path | None:
    """Writes what ``torch.compile`` built in this process to ``path``, atomically, for :func:`load_compile_cache`.

    Everything this process compiled with inductor goes in (every step and model, not only
    functrain's), merged with what the file at ``path`` already holds: an entry that this process
    did not use (a graph compiled by an earlier run, such as an evaluation step this run has not
    reached yet) is kept. When the file already holds everything, it is left as it is. The write
    is atomic, as a checkpoint's (see :mod:`functrain.checkpoint`). The traces of this process's
    precompiled steps (``compile={"precompile": True}``) go in too, replacing those steps' earlier ones.

    Args:
        path: the file to write; its directory must exist.

    With torch's compile caches off (``TORCHINDUCTOR_FX_GRAPH_CACHE=0``,
    ``TORCHINDUCTOR_AUTOGRAD_CACHE=0``) torch records no graph, and the file holds the C++ kernels
    alone: a process loading it generates each graph's code again but finds the kernels compiled.

    Returns:
        ``path``, which now holds what this process compiled (written now, or already there); ``None``
        when this process compiled nothing with inductor.

    Raises:
        OSError: the file could not be written (a full disk: the ``errno`` says so); any earlier
            file at ``path`` is unchanged.

    Example:
        A script without :func:`~functrain.fit`: load before the first step, save after it.

        >>> import torch, tempfile, os, functrain as ft
        >>> path = os.path.join(tempfile.mkdtemp(), "compile-cache.bin")
        >>> ft.load_compile_cache(path)  # no file yet: the first run compiles cold
        False
        >>> # step = ft.make_train_step(model, loss_fn, tx, compile=True); state, _ = step(state, batch)
        >>> saved = ft.save_compile_cache(path)  # None when this process compiled nothing yet
        >>> saved is None or ft.load_compile_cache(saved)  # a later run, before its first step
        True
    """
    path = Path(path)
    blob, keys = _artifacts()
    kernels = _kernels()
    steps = _precompile.saved_entries()
    if blob is None and not kernels and not steps:
        return None
    old = _read(path, "save_compile_cache", quiet=True)
    if (
        old is not None
        and keys <= _all_keys(old)
        and set(kernels) <= set(old["kernels"])
        and {_digest(s) for s in steps} <= {_digest(s) for s in old["steps"]}
    ):
        return path  # nothing new since the file was written
    blobs = [] if blob is None else [(blob, keys)]
    files = {name: file.read_bytes() for name, file in kernels.items()}
    if old is not None:
        # An earlier entry that this process's artifacts do not hold is kept: those are recorded only
        # when a compile uses them. One they hold is dropped, so the file does not grow with each save.
        blobs += [(data, old_keys) for data, old_keys in old["blobs"] if not old_keys <= keys]
        files.update({name: data for name, data in old["files"].items() if name not in files})
        # A precompiled step's traces from this process replace that step's earlier ones.
        steps += [s for s in old["steps"] if s["key"] not in {new["key"] for new in steps}]
    manifest = {
        "format": FORMAT,
        "torch": torch.version.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "blobs": [{"name": f"artifacts/{i}.bin", "keys": _as_json(k)} for i, (_, k) in enumerate(blobs)],
        "kernels": sorted(files),
        "steps": [
            {"name": f"steps/{i}.bin", **{k: v for k, v in step.items() if k != "data"}} for i, step in enumerate(steps)
        ],
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr(_MANIFEST, json.dumps(manifest, indent=1))
        for entry, (data, _) in zip(manifest["blobs"], blobs):
            archive.writestr(entry["name"], data)
        for name in manifest["kernels"]:
            archive.writestr(f"kernels/{name}", files[name])
        for entry, step in zip(manifest["steps"], steps):
            archive.writestr(entry["name"], step["data"])
    data = buffer.getvalue()
    _atomic_write(path, lambda file: file.write(data))
    return path


def load_compile_cache(path: str | os.PathLike) -> bool:
    """Puts what :func:`save_compile_cache` wrote to ``path`` into torch's compile caches, so that
    compiling the same graphs in this process finds them there instead of compiling them.

    Call it before the first compiled call; :class:`~functrain.callbacks.Checkpoint` (and so
    :func:`~functrain.fit` with ``checkpoint=``) does, from its directory, when training starts.
    Graph entries go where inductor reads them (``torch.compiler.load_cache_artifacts``); the C++
    kernels into inductor's cache directory, each under the name inductor gives it, and only where
    no file of that name is (nothing there is replaced or deleted).

    Nothing in the file changes a step's numbers (see :mod:`functrain.compile_cache`). A file that
    cannot be used is never an error: it is ignored with a ``RuntimeWarning`` that says why (not a
    compile cache, truncated or corrupted: every part is checked against its CRC-32 before anything
    is written; written by another torch version, whose entries this one would never find), and
    the step compiles as it would without it.

    **The file is code** (compiled libraries, pickled graph entries): load only a file you would
    run as a script.

    Returns:
        ``True`` when the file was loaded; ``False`` when there is none (a first run) or it was ignored.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return False
    cache = _read(path, "load_compile_cache")
    if cache is None:
        return False
    try:
        # The kernels first: a graph entry, once loaded, may be used by any compile from then on.
        root = _cache_dir()
        if root is not None:
            for name, data in cache["files"].items():
                _put(root / name, data)
        for data, _ in cache["blobs"]:
            if torch.compiler.load_cache_artifacts(data) is None:
                raise ValueError("torch.compiler.load_cache_artifacts could not read its compiled graphs")
        _precompile.add_pending(cache["steps"])  # checked and loaded by their steps' first calls
    except Exception as error:  # a cache is never worth a crash: the step compiles without it
        warnings.warn(
            f"load_compile_cache: ignoring '{path}' ({type(error).__name__}: {error}); the step compiles afresh",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


# ----------------------------------------------------------------------------- the file


def _read(path: Path, owner: str, quiet: bool = False) -> dict[str, Any] | None:
    """The checked contents of the file at ``path``: ``{"blobs": [(bytes, keys)], "files": {name: bytes},
    "kernels": [names]}``; ``None``, with a warning unless ``quiet``, when there is none or it cannot be used."""
    if not os.path.lexists(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = json.loads(archive.read(_MANIFEST))
            _check_manifest(manifest)
            if manifest["torch"] != torch.version.__version__:
                raise _Incompatible(
                    f"it was written by torch {manifest['torch']} and this is torch {torch.version.__version__}, whose "
                    f"compiles would never find its entries"
                )
            # ZipFile.read checks each member against its CRC-32: a flipped bit is an error, not a kernel.
            blobs = [(archive.read(b["name"]), _keys_of(b["keys"])) for b in manifest["blobs"]]
            files = {name: archive.read(f"kernels/{name}") for name in manifest["kernels"]}
            steps = [{**entry, "data": archive.read(entry["name"])} for entry in manifest.get("steps", [])]
            for step in steps:
                del step["name"]
    except Exception as error:  # whatever is wrong with the file, the step compiles without it
        if not quiet:
            warnings.warn(
                f"{owner}: ignoring '{path}': {_damaged(error)}; the step compiles afresh",
                RuntimeWarning,
                stacklevel=3,
            )
        return None
    return {"blobs": blobs, "files": files, "kernels": manifest["kernels"], "steps": steps}


class _Incompatible(Exception):
    """A sound compile cache that this process cannot use."""


class _NotOurs(ValueError):
    """A file that is not what save_compile_cache writes."""


def _damaged(error: Exception) -> str:
    if isinstance(error, _Incompatible):
        return str(error)
    if isinstance(error, _NotOurs):
        return f"it is not a functrain compile cache: {error}"
    if isinstance(error, KeyError):
        return f"it is not a complete functrain compile cache ({error} is missing)"
    if isinstance(error, (zipfile.BadZipFile, zlib.error, EOFError)):
        return f"it is not a functrain compile cache, or it is truncated or corrupted ({error})"
    if isinstance(error, OSError):
        return f"it cannot be read ({error})"
    return f"it is not a functrain compile cache ({type(error).__name__}: {error})"


def _check_manifest(manifest: Any) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise _NotOurs(f"its format is {found!r}, and this functrain reads {FORMAT!r}")
    ok = (
        isinstance(manifest.get("torch"), str)
        and isinstance(manifest.get("blobs"), list)
        and all(isinstance(b, dict) and isinstance(b.get("name"), str) and "keys" in b for b in manifest["blobs"])
        and isinstance(manifest.get("kernels"), list)
        and all(isinstance(name, str) and _KERNEL.fullmatch(name) for name in manifest["kernels"])
        and isinstance(manifest.get("steps", []), list)
        and all(_is_step_entry(entry) for entry in manifest.get("steps", []))
    )
    if not ok:  # a kernel named "../x" would be written outside the cache directory: refused
        raise _NotOurs("its index is malformed")


def _is_step_entry(entry: Any) -> bool:
    """A precompiled step's index entry: its member's name, its key and its source and module digests."""

    def digests(value: Any) -> bool:
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())

    return (
        isinstance(entry, dict)
        and isinstance(entry.get("name"), str)
        and re.fullmatch(r"steps/[0-9]+\.bin", entry["name"]) is not None
        and isinstance(entry.get("key"), str)
        and digests(entry.get("sources"))
        and digests(entry.get("globals"))
    )


def _digest(step: dict[str, Any]) -> str:
    return hashlib.sha256(step["data"]).hexdigest()


def _keys_of(entry: Any) -> frozenset[tuple[str, str]]:
    if not isinstance(entry, dict) or not all(isinstance(v, list) for v in entry.values()):
        raise _NotOurs("its index is malformed")
    return frozenset((kind, str(key)) for kind, keys in entry.items() for key in keys)


def _as_json(keys: frozenset[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for kind, key in sorted(keys):
        out.setdefault(kind, []).append(key)
    return out


def _all_keys(cache: dict[str, Any]) -> frozenset[tuple[str, str]]:
    return frozenset().union(*(keys for _, keys in cache["blobs"]))


# ----------------------------------------------------------------------------- what this process compiled


def _compiled_so_far() -> tuple[frozenset[tuple[str, str]], frozenset[str], int]:
    """What :func:`save_compile_cache` would save now: the graph entries' keys, the kernels' names and
    the number of precompiled traces (``compile={"precompile": True}``). It
    grows when a graph is compiled or found in a cache, so two readings tell whether anything was in between."""
    return _artifacts()[1], frozenset(_kernels()), _precompile.trace_count()


def _artifacts() -> tuple[bytes | None, frozenset[tuple[str, str]]]:
    """``torch.compiler.save_cache_artifacts()``'s bytes and the ``(kind, key)`` of each entry they hold:
    every graph this process compiled or found in a cache (torch records both)."""
    if "torch._dynamo" not in sys.modules:
        return None, frozenset()  # nothing was compiled (and importing the compiler would cost seconds)
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None, frozenset()
    data, info = saved
    return data, frozenset((kind, key) for kind, keys in info.artifacts.items() for key in keys)


def _cache_dir() -> Path | None:
    """Inductor's cache directory (where it keeps compiled C++ kernels), ``None`` when this torch keeps it elsewhere."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:
        return None
    return Path(cache_dir())


def _kernels() -> dict[str, Path]:
    """``{"<two characters>/<file>": file}``: the C++ kernels inductor compiled or loaded in this process,
    their sources, and the probes of which vector instructions the compiler builds.

    Inductor's C++ code caches keep, per process, the hash key of each kernel library they compiled or
    loaded; the library and its source are named after it. A probe is a library beside a ``.load_ok``
    marker. Private inductor internals (docs/concepts/private-apis.md): where they moved, no kernel is
    saved and a process with an empty cache directory compiles them again (a warning says so).
    """
    if "torch._inductor.codecache" not in sys.modules:
        return {}  # no C++ kernel was compiled or loaded (and importing inductor would cost seconds)
    root = _cache_dir()
    try:
        from torch._inductor.codecache import CppCodeCache

        keys: set[str] = set()
        classes: list[type] = [CppCodeCache]
        while classes:  # CppPythonBindingsCodeCache, CppWrapperCodeCache, ...: each keeps a cache of its own
            cls = classes.pop()
            keys.update(key for key in vars(cls).get("cache", {}) if isinstance(key, str))
            classes.extend(cls.__subclasses__())
    except (ImportError, AttributeError, TypeError):
        root = None
    if root is None:
        warnings.warn(
            "save_compile_cache: this torch keeps its compiled C++ kernels where functrain does not look, so the "
            "compile cache holds the compiled graphs but not their CPU kernels: a process with an empty cache "
            "directory compiles those again",
            RuntimeWarning,
            stacklevel=3,
        )
        return {}
    found: dict[str, Path] = {}

    def add(file: Path) -> None:
        name = f"{file.parent.name}/{file.name}"
        if file.is_file() and _KERNEL.fullmatch(name):
            found[name] = file

    for key in keys:
        if len(key) < 3:
            continue
        for file in (root / key[1:3]).glob(f"{glob.escape(key)}.*"):
            if not file.name.endswith((".o", ".lock", ".py", ".tmp")):  # objects are linked into the .so
                add(file)
    for marker in root.glob("??/*.so.load_ok"):
        base = marker.name[: -len(".so.load_ok")]
        for file in (marker, marker.with_name(f"{base}.so"), marker.with_name(f"{base}.cpp")):
            add(file)
    return found


def _put(file: Path, data: bytes) -> None:
    """Writes ``data`` to ``file`` in inductor's cache directory, unless a file of that name is there:
    the name is a hash of what it holds, so the file there is the same kernel (and stays the user's).

    Written under a temporary name and renamed, as inductor writes its own files, so a compile in
    another process never sees half a library. (Not fsync-ed: neither are inductor's; a cache file
    lost in a power cut is compiled again.)
    """
    if file.exists():
        return
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.functrain-{os.getpid()}-{secrets.token_hex(4)}.tmp")
    mode = 0o777 if file.suffix == ".so" else 0o666  # less the umask, as inductor's own libraries
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
    try:
        with os.fdopen(fd, "wb") as opened:
            opened.write(data)
        os.replace(tmp, file)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
