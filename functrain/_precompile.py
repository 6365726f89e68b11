"""Precompiled steps: a compiled step's whole compile, dynamo's trace included, saved with the compile
cache and loaded in another process, so that its first call neither traces nor compiles.

``compile={"precompile": True}`` opts a step in. Its plain calls (not inside a ``torch.func``
transform, not differentiated from outside) then go through torch's AOT precompile
(``torch.compile(fn).aot_compile``, ``torch.compiler.load_compiled_function``; experimental in
torch 2.14): the traced graph, its compiled code and its guards, in one object that
:func:`~functrain.save_compile_cache` writes and :func:`~functrain.load_compile_cache` reads back.

That API drops the guards it cannot serialize: every guard on the function's closure (which
optimiser, which loss, which hyperparameters) and on module globals. A loaded trace checks its
remaining guards (shapes, dtypes, input structure) against its own pickled copy of the closure,
which proves nothing about the step in hand. So functrain uses a loaded trace only where it can
show that it is this step's trace:

- the same torch and Python (the file's manifest) and the same compiler settings (inductor's,
  dynamo's and functorch's configs, the step's ``torch.compile`` options);
- the step's closure pickles to the same bytes (the stateless model copy aside, which the loaded
  trace uses live: its tensors come in through the state): the optimiser, the loss function, every
  hyperparameter and the code of every function in them;
- every source file the trace read is unchanged, and in the user's own modules (not torch's, not
  the standard library's or site-packages', not functrain's) every module-level value is the same:
  a global constant that the loss reads, or a module-level model, cannot differ unseen;
- the trace's own guards pass on the call's inputs.

Anything else, and the step compiles as it would without the file. Nothing here changes numbers: a
trace loaded is the code that compiling the step in this process produces (tested bitwise).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import pickle
import sys
import sysconfig
import types
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

# At most this many traces per step (new input shapes, e.g. an epoch's last smaller batch); past it
# the step's calls go to its ordinary compiled function, as dynamo's own recompile limit would.
MAX_TRACES = 8

# Entries loaded from a file, by step key, waiting for a step with that key to make its first call.
_pending: dict[str, list[dict[str, Any]]] = {}
# The precompiled steps of this process, for save_compile_cache.
_live: weakref.WeakSet[Precompiled] = weakref.WeakSet()


class Unfingerprintable(Exception):
    """Something a step's trace depends on that functrain cannot compare across processes."""


class Precompiled:
    """The precompiled traces of one step's plain calls, with the key that identifies the step.

    ``source``: the function that ``compiled`` (its ``torch.compile``) compiles; ``options``: those
    ``torch.compile`` options, part of the key.
    """

    def __init__(self, source: Callable, compiled: Callable, options: dict[str, Any]):
        self._source, self._compiled = source, compiled
        self._options = options
        self._entries: list[_Entry] = []
        self._key: tuple[str, dict[str, nn.Module]] | None = None
        self._disabled: str | None = None  # why this step runs its ordinary compile instead
        self._unsaveable = False  # its traces serve this process but cannot be saved (said once)
        self._looked_up = False
        _live.add(self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The step's result from a precompiled trace whose guards pass: one loaded (on the first
        call), one traced earlier, or one traced now; the ordinary compiled function once precompiling
        is off for this step."""
        if not self._looked_up:
            self._looked_up = True
            # The key is taken in the context of the step's calls (dynamo's config as they set it).
            if (entry := self._load_matching(args, kwargs)) is not None:
                return entry.function.fn(*args, **kwargs)
        if self._disabled is None:
            for entry in self._entries:
                if entry.function.guard_check(*args, **kwargs):
                    return entry.function.fn(*args, **kwargs)
            if len(self._entries) < MAX_TRACES:
                return self._trace(args, kwargs)
        return self._compiled(*args, **kwargs)

    # ----------------------------------------------------------------------------- tracing

    def _trace(self, args: tuple, kwargs: dict) -> Any:
        try:
            function = self._compiled.aot_compile((args, kwargs))
        except Exception as error:
            # The ordinary compile decides: a fault of the step (a shape error, a bad batch) raises there
            # as it would without precompile; if it runs, precompile alone failed, and is off for this step.
            out = self._compiled(*args, **kwargs)
            self._disable(f"torch could not precompile it ({type(error).__name__}: {error})")
            return out
        self._entries.append(_Entry.traced(function))
        return function.fn(*args, **kwargs)

    def _disable(self, why: str) -> None:
        self._disabled = why
        warnings.warn(
            f"compiled step: compile['precompile'] is off for this step: {why}; it compiles as usual",
            RuntimeWarning,
            stacklevel=4,
        )

    # ----------------------------------------------------------------------------- the key

    def key(self) -> tuple[str, dict[str, nn.Module]]:
        """``(key, modules)``: a digest of everything the step's trace is built from apart from its
        source files (see the module docstring), and the modules in its closure, by the names the
        saved trace refers to them by."""
        if self._key is None:
            closure, modules = _pickled_closure(self._source)
            digest = hashlib.sha256()
            for part in (closure, repr(_canonical(self._options)).encode(), _configs()):
                digest.update(hashlib.sha256(part).digest())
            self._key = digest.hexdigest(), modules
        return self._key

    # ----------------------------------------------------------------------------- save and load

    def saved(self) -> list[dict[str, Any]]:
        """This step's traces as :func:`save_compile_cache` stores them: ``{"key", "sources",
        "globals", "data"}`` each; none when they cannot be saved (a warning says why, once)."""
        if self._unsaveable or not self._entries:
            return []
        try:
            key, modules = self.key()
            return [entry.saved(key, modules) for entry in self._entries]
        except Exception as error:  # precompiling only saves time: whatever fails costs the warm start alone
            self._unsaveable = True
            why = f"{type(error).__name__}: {error}"
            if not _graph_caches_on():
                why = "torch serializes a trace through its FX graph and AOTAutograd caches, which are off here"
            warnings.warn(
                f"compiled step: compile['precompile']: its trace cannot be saved ({why}); "
                "a new process will compile the step as usual",
                RuntimeWarning,
                stacklevel=3,
            )
            return []

    def _load_matching(self, args: tuple, kwargs: dict) -> _Entry | None:
        """The first loaded trace of this step, still valid here, whose guards pass on these inputs;
        every valid one is kept for later calls."""
        try:
            key, modules = self.key()
        except Exception as error:
            self._disable(f"its closure cannot be compared with a saved trace's ({type(error).__name__}: {error})")
            return None
        found = None
        for record in _pending.pop(key, []):
            entry = _Entry.load(record, modules)
            if entry is None:
                continue
            self._entries.append(entry)
            if found is None and entry.function.guard_check(*args, **kwargs):
                found = entry
        return found


class _Entry:
    """One precompiled trace, with what it was traced from: its source files' and the user's modules'
    digests, taken when it was traced, and the bytes it was loaded from (saved again unchanged)."""

    def __init__(
        self,
        function: Any,
        digests: dict[str, dict[str, str]],
        record: dict[str, Any] | None = None,
        unsaveable: str | None = None,
    ):
        self.function, self._digests, self._record = function, digests, record
        self._unsaveable = unsaveable  # why the digests could not be taken: the trace serves this process only
        self._warned = False

    @classmethod
    def traced(cls, function: Any) -> _Entry:
        """A trace made now. Its digests are taken now: a file edited or a module value changed later
        must not be recorded as what the trace was made from. (When one cannot be taken, the entry
        serves this process and is not saved.)"""
        names = sorted({source.module for source in function.source_info().inlined_sources})
        try:
            return cls(function, {"sources": _source_digests(names), "globals": _globals_digests(names)})
        except Exception as error:
            return cls(function, {}, unsaveable=f"{type(error).__name__}: {error}")

    def saved(self, key: str, modules: dict[str, nn.Module]) -> dict[str, Any]:
        if self._unsaveable is not None:
            raise Unfingerprintable(self._unsaveable)
        self._warn_if_changed()
        if self._record is None:
            data = type(self.function).serialize(self.function, modules).serialized_data
            self._record = {"key": key, **self._digests, "data": data}
        return self._record

    def _warn_if_changed(self) -> None:
        """A module value the trace may have read, changed since: this process's trace still has the old
        one (a precompiled trace does not re-check module globals per call), which the user must hear."""
        try:
            now = _globals_digests(sorted(self._digests["sources"]))
        except Exception:  # (a value that cannot be compared now: the saved digests still say what was traced)
            return
        changed = sorted(name for name, digest in self._digests["globals"].items() if now.get(name) != digest)
        if changed and not self._warned:
            self._warned = True
            warnings.warn(
                f"compile['precompile']: module-level values of {', '.join(changed)} changed after the step was "
                "traced; a precompiled step keeps the values it was traced with (pass values that change in the "
                "batch or the state, or compile without precompile)",
                RuntimeWarning,
                stacklevel=5,
            )

    @classmethod
    def load(cls, record: dict[str, Any], modules: dict[str, nn.Module]) -> _Entry | None:
        """The trace in ``record``, when every source file and user module it was traced from is as it
        was; ``None`` otherwise."""
        try:
            names = sorted(record["sources"])
            if _source_digests(names) != record["sources"] or _globals_digests(names) != record["globals"]:
                return None
            function = torch.compiler.load_compiled_function(io.BytesIO(record["data"]), external_data=modules)
        except Exception:  # an entry that cannot be used is a cache miss, never an error
            return None
        return cls(function, {"sources": record["sources"], "globals": record["globals"]}, record)


def _graph_caches_on() -> bool:
    from torch._functorch import config as functorch
    from torch._inductor import config as inductor

    return bool(inductor.fx_graph_cache and functorch.enable_autograd_cache and not inductor.force_disable_caches)


# ----------------------------------------------------------------------------- the registry


def saved_entries() -> list[dict[str, Any]]:
    """Every trace of this process's precompiled steps, as :func:`save_compile_cache` stores them."""
    return [record for step in list(_live) for record in step.saved()]


def trace_count() -> int:
    """How many precompiled traces this process's steps hold (it grows with each one traced or loaded)."""
    return sum(len(step._entries) for step in list(_live))


def add_pending(records: list[dict[str, Any]]) -> None:
    """Makes ``records`` (from a loaded file) available to the steps that will make their first call.
    A step's records replace any loaded before for it (a file loaded twice is not held twice)."""
    loaded: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        loaded.setdefault(record["key"], []).append(record)
    _pending.update(loaded)


# ----------------------------------------------------------------------------- fingerprints


class _ClosurePickler(pickle.Pickler):
    """Pickles as torch's precompile does (functions by code and closure), each ``nn.Module`` by a
    name (``module0``, ``module1``, ... in the order first met) instead of by value."""

    def __init__(self, buffer: io.BytesIO):
        super().__init__(buffer, protocol=pickle.DEFAULT_PROTOCOL)
        from torch._dynamo.aot_compile import AOTCompilePickler

        self._torch = AOTCompilePickler({}, io.BytesIO())
        self.modules: dict[str, nn.Module] = {}
        self._names: dict[int, str] = {}

    def persistent_id(self, obj: object) -> str | None:
        if not isinstance(obj, nn.Module):
            return None
        if id(obj) not in self._names:
            self._names[id(obj)] = name = f"module{len(self._names)}"
            self.modules[name] = obj
        return self._names[id(obj)]

    def reducer_override(self, obj: Any) -> Any:
        return self._torch.reducer_override(obj)


def _pickled_closure(fn: Callable) -> tuple[bytes, dict[str, nn.Module]]:
    buffer = io.BytesIO()
    pickler = _ClosurePickler(buffer)
    pickler.dump([cell.cell_contents for cell in fn.__closure__ or ()])
    return buffer.getvalue(), pickler.modules


def _configs() -> bytes:
    """The compiler settings a trace and its code depend on."""
    from torch._dynamo import config as dynamo
    from torch._functorch import config as functorch
    from torch._inductor import config as inductor

    return repr([_canonical(c.save_config_portable()) for c in (dynamo, functorch, inductor)]).encode()


def _canonical(value: Any) -> Any:
    """``value`` with every set and dict in sorted order, so that its ``repr`` is the same in every process."""
    if isinstance(value, dict):
        return sorted((repr(k), _canonical(v)) for k, v in value.items())
    if isinstance(value, (set, frozenset)):
        return sorted(repr(_canonical(v)) for v in value)
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def _source_digests(modules: list[str]) -> dict[str, str]:
    """``{module: sha256 of its source file}``; :class:`Unfingerprintable` when one has no source."""
    out = {}
    for name in modules:
        module = sys.modules.get(name)
        if module is None:
            raise Unfingerprintable(f"module {name} is not imported")
        try:
            out[name] = hashlib.sha256(inspect.getsource(module).encode()).hexdigest()
        except (OSError, TypeError) as error:
            raise Unfingerprintable(f"module {name} has no source file ({error})") from error
    return out


@functools.cache
def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    roots.add(str(Path(inspect.getfile(torch)).parent.parent))
    roots.add(str(Path(__file__).parent))  # functrain itself: its module state is not configuration
    return tuple(str(Path(root).resolve()) for root in roots)


def _is_users(module: types.ModuleType) -> bool:
    file = getattr(module, "__file__", None)
    if file is None:
        return True
    return not str(Path(file).resolve()).startswith(_library_roots())


def _globals_digests(modules: list[str]) -> dict[str, str]:
    """``{module: digest of its module-level values}`` for the user's modules among ``modules``."""
    out = {}
    for name in modules:
        module = sys.modules[name]
        if _is_users(module):
            digest = hashlib.sha256()
            for key, value in sorted(vars(module).items()):
                if not (key.startswith("__") and key.endswith("__")):
                    digest.update(key.encode() + b"=" + _value_digest(f"{name}.{key}", value) + b";")
            out[name] = digest.hexdigest()
    return out


def _value_digest(where: str, value: Any) -> bytes:
    """What a module-level value is, comparably across processes."""
    if isinstance(value, types.ModuleType):
        return b"module " + value.__name__.encode()
    if isinstance(value, nn.Module):  # its structure; its tensors are the state's, or fixed constants
        tensors = [(k, tuple(t.shape), str(t.dtype)) for k, t in (*value.named_parameters(), *value.named_buffers())]
        return hashlib.sha256(repr((type(value).__qualname__, repr(value), tensors)).encode()).digest()
    module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str) and "<locals>" not in qualname:
        found: Any = sys.modules.get(module)
        for part in qualname.split("."):
            found = getattr(found, part, None)
        if found is value:  # a module-level function or class, by name (its code is in the source digests)
            return f"ref {module}.{qualname}".encode()
    buffer = io.BytesIO()
    try:
        _ClosurePickler(buffer).dump(value)
    except Exception as error:
        raise Unfingerprintable(f"{where} ({type(value).__name__}) cannot be compared: {error}") from error
    return hashlib.sha256(buffer.getvalue()).digest()
