"""Layer-wise trust ratios (LARS, LAMB): rescale each tensor's update relative to its weights."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _tree
from ..base import GradientTransformation, empty_init, require_params

cast = _tree.scalar_for


def scale_by_trust_ratio(trust_coefficient: float | Tensor = 1.0, eps: float | Tensor = 0.0) -> GradientTransformation:
    """Scales each parameter tensor's update by its trust ratio, as optax's ``scale_by_trust_ratio``.

    .. math::
        u \\leftarrow u \\cdot \\frac{\\eta\\,\\lVert\\theta\\rVert}{\\lVert u\\rVert + \\epsilon},
        \\qquad\\text{or } u \\text{ unchanged when } \\lVert\\theta\\rVert = 0 \\text{ or } \\lVert u\\rVert = 0

    with :math:`\\eta` the trust coefficient and the norms Euclidean over the whole tensor (one
    ratio per parameter tensor, i.e. per layer). The zero-norm exception keeps zero-initialised
    tensors (biases) trainable; they take a plain step. Needs ``params``.
    """

    def update(updates, state, params=None, **extra):
        require_params("scale_by_trust_ratio", params)
        return _tree.map(lambda u, p: _scaled(u, p, trust_coefficient, eps), updates, params), state

    return GradientTransformation(empty_init, update)


def _scaled(update: Tensor, param: Tensor, trust_coefficient, eps) -> Tensor:
    # Norms of low-precision tensors are taken in float32: a bf16 norm keeps ~3 digits, and the
    # ratio multiplies every entry of the update.
    param_norm = torch.linalg.vector_norm(param, dtype=torch.promote_types(param.dtype, torch.float32))
    update_norm = torch.linalg.vector_norm(update, dtype=torch.promote_types(update.dtype, torch.float32))
    ratio = cast(trust_coefficient, param_norm) * param_norm / (update_norm + cast(eps, update_norm))
    ratio = torch.where((param_norm == 0) | (update_norm == 0), 1.0, ratio)
    return update * ratio.to(update.dtype)
