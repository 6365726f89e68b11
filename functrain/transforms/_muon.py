"""Muon: momentum orthogonalised by a Newton-Schulz iteration, as torch.optim.Muon computes it."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .. import _sharding, _tree
from ..base import GradientTransformation, Params, register_state, step_count

cast = _tree.scalar_for

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""The Newton-Schulz quintic's coefficients ``(a, b, c)``: Keller Jordan's, torch.optim.Muon's default."""
ADJUST_LR_FNS = (None, "original", "match_rms_adamw", "spectral_unclamped")
"""The values ``adjust_lr_fn`` takes: torch.optim.Muon's, and ``"spectral_unclamped"``."""


def _addmm(input: Tensor, mat1: Tensor, mat2: Tensor, beta, alpha) -> Tensor:
    """``beta * input + alpha * (mat1 @ mat2)``: torch.addmm (one rounding to bfloat16, as torch.optim)
    for number coefficients; tensor coefficients (injected ones), which addmm cannot take without
    reading them on the host, get the same sum in float32 rounded once, which may differ by an ulp."""
    if not isinstance(beta, Tensor) and not isinstance(alpha, Tensor):
        return torch.addmm(input, mat1, mat2, beta=beta, alpha=alpha)
    product = mat1.float() @ mat2.float()
    out = product * cast(alpha, product) + input.float() * cast(beta, product)
    return out.to(input.dtype)


def orthogonalize_via_newton_schulz(
    g: Tensor,
    ns_coefficients: tuple[float | Tensor, float | Tensor, float | Tensor] = NS_COEFFICIENTS,
    ns_steps: int = 5,
    eps: float | Tensor = 1e-7,
) -> Tensor:
    """An approximate ``U V^T`` of the matrix ``g = U S V^T``, in bfloat16 (torch.optim.Muon's
    ``_zeropower_via_newtonschulz``, op for op, so the two agree bit for bit).

    With ``X_0 = g / max(||g||_F, eps)`` (transposed when ``g`` has more rows than columns), each of
    the ``ns_steps`` iterations is the quintic

    .. math::
        A = X X^T,\\quad X \\leftarrow a X + (b A + c A^2) X

    whose coefficients ``(a, b, c)`` maximise the slope at zero: the singular values land near
    (not at) one, which is all Muon needs. The result is bfloat16, as in torch.optim; ``g`` is not
    modified.
    """
    if ns_steps >= 100:
        raise ValueError(f"orthogonalize_via_newton_schulz: ns_steps must be < 100, got {ns_steps}")
    if g.dim() != 2:
        raise ValueError(f"orthogonalize_via_newton_schulz: expected a 2-D matrix, got shape {tuple(g.shape)}")
    if len(ns_coefficients) != 3:
        raise ValueError(f"orthogonalize_via_newton_schulz: ns_coefficients must be 3 values, got {ns_coefficients!r}")
    a, b, c = ns_coefficients
    tall = g.size(0) > g.size(1)
    x = g.bfloat16().T if tall else g.bfloat16()  # iterate on the smaller Gram matrix
    norm = x.norm()
    x = x / norm.clamp(min=cast(eps, norm))  # spectral norm <= Frobenius norm <= 1
    for _ in range(ns_steps):
        gram = x @ x.T
        poly = _addmm(gram, gram, gram, beta=b, alpha=c)
        x = _addmm(x, poly, x, beta=a, alpha=1.0)
    return x.T if tall else x


def _lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's ``_adjust_lr`` as a factor of the learning rate, from the matrix's
    (fan-out, fan-in) = ``(A, B)``: original ``sqrt(max(1, A/B))``, match_rms_adamw
    ``0.2 sqrt(max(A, B))``, spectral_unclamped ``sqrt(A/B)``."""
    rows, cols = shape[:2]
    if rows == 0 or cols == 0:
        return 1.0  # an empty matrix has no update to scale (and A/B could be 0/0)
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn == "spectral_unclamped":
        return math.sqrt(rows / cols)
    raise AssertionError(f"unchecked adjust_lr_fn {adjust_lr_fn!r}")


@register_state
class ScaleByMuonState(NamedTuple):
    count: Tensor  # updates done so far, 0-d int64
    momentum_buffer: Params  # B_t


def _check_matrices(params: Params) -> None:
    for name, p in _tree.named_leaves(params):
        if p.dim() != 2:
            raise ValueError(
                f"muon: parameter '{name or '<root>'}' has shape {tuple(p.shape)}; Muon only updates 2-D matrices"
                " - route other parameters to another optimiser with ft.partition(...)"
            )


def scale_by_muon(
    momentum: float | Tensor = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float | Tensor, float | Tensor, float | Tensor] = NS_COEFFICIENTS,
    eps: float | Tensor = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: str | None = None,
) -> GradientTransformation:
    """Muon's direction for 2-D matrices: orthogonalised momentum, scaled for the matrix's shape.

    .. math::
        B_t = \\mu B_{t-1} + (1-\\mu) g_t,\\quad
        \\tilde B_t = \\begin{cases} (1-\\mu) g_t + \\mu B_t & \\text{nesterov} \\\\
                                  B_t & \\text{otherwise}\\end{cases},\\quad
        u_t = s(A, B)\\, \\mathrm{NS}^{(a,b,c)}_k(\\tilde B_t)

    (the lerps torch.optim uses), with :func:`orthogonalize_via_newton_schulz` for NS and
    :math:`s(A, B)` torch.optim.Muon's learning-rate adjustment for an ``A x B`` matrix
    (``adjust_lr_fn``: None or "original" :math:`\\sqrt{\\max(1, A/B)}`, "match_rms_adamw"
    :math:`0.2\\sqrt{\\max(A, B)}`, "spectral_unclamped" :math:`\\sqrt{A/B}`). The output is in
    each parameter's dtype (exactly the bfloat16 values of NS, scaled). ``init`` raises a
    ValueError naming any parameter that is not 2-D.
    """
    if adjust_lr_fn not in ADJUST_LR_FNS:  # now, not at the first update
        raise ValueError(f"scale_by_muon: adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {adjust_lr_fn!r}")

    def init(params):
        _check_matrices(params)
        return ScaleByMuonState(step_count(params), _tree.zeros_like(params))

    def update(updates, state, params=None, **extra):
        def step(g, buf):
            buf = buf.lerp(g, cast(1 - momentum, buf))
            direction = g.lerp(buf, cast(momentum, g)) if nesterov else buf
            # Newton-Schulz is a function of the whole matrix: a sharded one is gathered first.
            ortho = _sharding.on_whole(
                lambda whole: orthogonalize_via_newton_schulz(whole, ns_coefficients, ns_steps, eps), direction
            )
            return ortho.to(g.dtype) * _lr_ratio(adjust_lr_fn, g.shape), buf

        out, buf = _tree.map_many(step, updates, state.momentum_buffer, n=2)
        return out, ScaleByMuonState(state.count + 1, buf)

    return GradientTransformation(init, update)
