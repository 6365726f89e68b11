"""Per-sample random streams that do not depend on thread scheduling.

torchvision's random transforms draw from torch's *global* generator (``torch.rand(1)``,
``torch.randint(...)``, ``torch.empty(1).uniform_(...)``). With several worker threads sharing that
one generator, which sample gets which draw depends on the order the threads happen to run in, so an
augmented epoch could never be replayed exactly, and every draw would also move the training loop's
own random stream (dropout) under its feet.

:class:`sample_rng` fixes both without touching the global generator: a ``TorchFunctionMode`` (its
stack is thread-local) that adds ``generator=`` to every random sampling call made while it is
active, from a generator seeded by :func:`derive_seed` of (seed, epoch, sample index). In a worker
*process* the global generator belongs to that process alone, so reseeding it is exact and costs
nothing per op (the loader does that there).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

_MASK = (1 << 64) - 1

# torch's private samplers behind torch.distributions' Gamma, Dirichlet and Beta (torchvision's
# MixUp and CutMix draw from a Beta). Private, so each is taken only where this torch has it: without
# them the mode cannot redirect those draws, and functrain still imports (tests/test_private_apis.py).
_PRIVATE_SAMPLERS = ("_standard_gamma", "_sample_dirichlet")

# Every torch sampling function (and Tensor method) that takes ``generator=``. Calls that take no
# generator argument (e.g. F.dropout) cannot be redirected and still use the global generator.
_SAMPLERS = frozenset(
    {
        *(getattr(torch, name) for name in _PRIVATE_SAMPLERS if hasattr(torch, name)),
        torch.rand,
        torch.rand_like,
        torch.randn,
        torch.randn_like,
        torch.randint,
        torch.randint_like,
        torch.randperm,
        torch.bernoulli,
        torch.multinomial,
        torch.normal,
        torch.poisson,
        torch.binomial,
        Tensor.uniform_,
        Tensor.normal_,
        Tensor.random_,
        Tensor.bernoulli_,
        Tensor.bernoulli,
        Tensor.multinomial,
        Tensor.exponential_,
        Tensor.geometric_,
        Tensor.cauchy_,
        Tensor.log_normal_,
    }
)


_GOLDEN = 0x9E3779B97F4A7C15


def _mix(state: int, value: int) -> int:
    """One splitmix64 step: ``value`` mixed into ``state``."""
    state = (((state ^ (int(value) & _MASK)) & _MASK) + _GOLDEN) & _MASK
    state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK
    return state ^ (state >> 31)


def derive_seed(*values: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64 over each value): nearby inputs such as
    consecutive sample indices give unrelated streams.

    Example:
        >>> from functrain.data._rng import derive_seed
        >>> derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 2, 1)
        True
    """
    state = _GOLDEN
    for value in values:
        state = _mix(state, value)
    return state >> 1  # torch.Generator.manual_seed takes up to 2**63 - 1 without wrapping


def derive_seeds(prefix: tuple[int, ...], last: list[int]) -> list[int]:
    """``[derive_seed(*prefix, x) for x in last]``, the prefix mixed once (a batch's samples share
    their seed and epoch).

    Example:
        >>> from functrain.data._rng import derive_seed, derive_seeds
        >>> derive_seeds((0, 1), [2, 3]) == [derive_seed(0, 1, 2), derive_seed(0, 1, 3)]
        True
    """
    state = _GOLDEN
    for value in prefix:
        state = _mix(state, value)
    return [_mix(state, x) >> 1 for x in last]


class sample_rng(TorchFunctionMode):
    """While active in this thread, torch's random sampling calls draw from generators seeded with
    ``seed`` (one per device, made on first use) instead of the global generator.

    Example:
        >>> import torch
        >>> from functrain.data._rng import sample_rng
        >>> with sample_rng(7):
        ...     a = torch.rand(3)
        >>> with sample_rng(7):
        ...     b = torch.rand(3)
        >>> torch.equal(a, b)
        True
    """

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        # Looked up once: torch.get_default_device() is slow, and the default device is per thread.
        self._default_device = torch.get_default_device()

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return gen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _SAMPLERS:  # every other op of the transform passes through: keep this path short
            return func(*args, **kwargs)
        if kwargs.get("generator") is None:
            device = kwargs.get("device")
            if device is None:  # a *_like, an in-place method or torch.bernoulli(p): the input's device
                first = next((a for a in args if isinstance(a, Tensor)), None)
                device = first.device if first is not None else self._default_device
            kwargs = {**kwargs, "generator": self._generator(torch.device(device))}
        return func(*args, **kwargs)

    def reseed(self, seed: int) -> None:
        """Restarts every stream from ``seed`` (cheaper than a new mode per sample)."""
        self.seed = seed
        for gen in self._generators.values():
            gen.manual_seed(seed)
