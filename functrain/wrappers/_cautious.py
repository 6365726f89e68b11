"""cautious: keep only the update components that go downhill (Liang et al., 2024)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _tree
from ..base import GradientTransformation

# The floor of the kept fraction in the rescaling, as the authors' C-AdamW and timm: when almost
# nothing is kept, the survivors grow at most 1000-fold.
MIN_KEPT_FRACTION = 1e-3


def cautious(tx: GradientTransformation) -> GradientTransformation:
    r"""The cautious mask of Liang et al. (2024) on ``tx``'s update: only components that descend.

    With :math:`g` the gradient this wrapper receives and :math:`u` the update ``tx`` returns (a step
    that ``ft.apply_updates`` *adds* to the parameters, so descending components have
    :math:`u_i g_i < 0`), each parameter tensor's update becomes

    .. math::
        \phi = \mathbb{1}[u \odot g < 0], \qquad
        u \leftarrow u \odot \frac{\phi}{\max(\operatorname{mean}(\phi),\ 10^{-3})}

    the mean taken over the whole tensor (a sharded one across its shards). ``tx`` runs and keeps
    its state exactly as without the mask, and that state is the wrapper's: a checkpoint of
    ``tx`` resumes under ``ft.cautious(tx)`` and back. Only the step it proposes is masked. Components where
    the update and the gradient disagree (momentum still carrying the parameter uphill) are
    dropped, the rest scaled up so the mean step size is kept.

    The paper writes the mask with the opposite sign, :math:`\mathbb{1}[u \odot g > 0]`, for an
    update that is *subtracted*. Its rescaling is written two ways: the paper's Algorithm scales by
    :math:`d / (\mathrm{nnz}(\phi) + 1)` (what pytorch-optimizer 4.1.0's ``cautious=True`` options
    and the authors' C-Lion do), the one-line code of its introduction by :math:`1/\mathrm{mean}(\phi)`;
    this follows the authors' current C-AdamW (github.com/kyleliang919/C-Optim, ``c_adamw.py``) and
    timm: :math:`1/\max(\mathrm{mean}(\phi), 10^{-3})`, per tensor.

    Everything in ``tx``'s update is masked, its weight decay too: ``ft.cautious(ft.adamw(...))``
    is the paper's C-AdamW with ``weight_decay=0``. C-AdamW decays the parameters outside the mask;
    for that, mask the Adam step alone and decay after it::

        ft.chain(ft.cautious(ft.adam(lr=1.0)), ft.transforms.scale(-1.0),
                 ft.transforms.add_decayed_weights(weight_decay), ft.transforms.scale_by_learning_rate(lr))

    The mask assumes ``tx`` descends along the gradients it is given. To maximise, negate them
    before the wrapper rather than inside it: ``ft.chain(ft.transforms.scale(-1.0), ft.cautious(tx))``.

    Complex parameters are refused: a sign agreement has no meaning for them.

    Args:
        tx: the optimiser whose update is masked.

    Example:
        >>> import torch, functrain as ft
        >>> params = {"w": torch.zeros(4)}
        >>> tx = ft.cautious(ft.sgd(lr=1.0, momentum=0.9))
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([1.0, 1.0, 1.0, 1.0])}, state, params)
        >>> updates["w"]  # momentum and gradient agree everywhere: plain SGD
        tensor([-1., -1., -1., -1.])
        >>> updates, state = tx.update({"w": torch.tensor([1.0, 1.0, -0.5, -0.5])}, state, params)
        >>> updates["w"]  # momentum 0.4 would carry the last two uphill: dropped, the rest doubled
        tensor([-3.8000, -3.8000, -0.0000, -0.0000])

    References:
        Liang, Chen, Liu & Liu, 2024, "Cautious Optimizers: Improving Training with One Line of
        Code" (arXiv 2411.16085), Algorithm 1 and C-AdamW; the authors' code, ``c_adamw.py``.
    """
    if not isinstance(tx, GradientTransformation):
        raise TypeError(f"cautious: tx must be a GradientTransformation (an optimiser), got {type(tx).__name__}")

    def init(params):
        _refuse_complex(params)
        return tx.init(params)

    def update(updates, state, params=None, **extra):
        _refuse_complex(updates)
        proposed, state = tx.update(updates, state, params, **extra)
        return _tree.map(_masked, proposed, updates), state

    # No fast path: the mask needs the whole update before anything is applied.
    return GradientTransformation(init, update)


def _refuse_complex(tree) -> None:
    found = _tree.complex_leaves(tree)
    if found:
        key, leaf = found[0]
        raise TypeError(
            f"ft.cautious does not support complex parameters ('{key}' is {leaf.dtype}): the mask compares signs; "
            "split each into real and imaginary parts with torch.view_as_real"
        )


def _masked(u: Tensor, g: Tensor) -> Tensor:
    """``u`` where it descends along ``-g``, rescaled by the kept fraction of the tensor."""
    keep = (u * g < 0).to(u.dtype)
    # The fraction in at least float32: a bfloat16 mean of 0s and 1s keeps ~3 digits.
    kept = keep.mean(dtype=torch.promote_types(u.dtype, torch.float32)).clamp(min=MIN_KEPT_FRACTION)
    return u * (keep / kept.to(u.dtype))
