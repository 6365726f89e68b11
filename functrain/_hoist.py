"""Per-step scalars that a compiled step computes once, not once per parameter element.

Inductor fuses a 0-d computation into every kernel that reads it: Adam's bias corrections
``1 - b1**t`` become two ``std::pow`` calls in double inside the vectorised loop over each parameter,
once per 16 floats, and a cosine schedule a ``cos`` there. On a CPU that makes the compiled AdamW
update compute-bound at a quarter of the fused kernel's speed (measured: 2.0 ms against 0.5 ms for
2M parameters). The loop cannot hoist them itself: the kernel's outputs may alias the step
counter it reads. :func:`hoist` passes such scalars through an op inductor cannot see into, so
they are realised once, in their own tiny kernel, and the update kernels load the results.

Outside ``torch.compile`` it returns its arguments untouched: eager code computes each scalar once
anyway, and the results are the same tensors, bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("functrain::hoist", mutates_args=())
def _hoist(values: list[Tensor]) -> list[Tensor]:
    return [v.clone() for v in values]


@_hoist.register_fake
def _(values):
    return [torch.empty_like(v) for v in values]


@_hoist.register_vmap
def _(info, in_dims, values):
    return _hoist(values), in_dims[0]  # a clone keeps every batch dimension where it was


def hoist(*values):
    """Returns ``values`` unchanged; under ``torch.compile`` the tensors among them are computed once
    per call of the compiled function instead of inside each kernel that reads them.

    Use it in a transform's ``update`` for scalars derived from the step count or a schedule (bias
    corrections, decayed rates). Tensors that require a gradient pass through as they are: the op's
    autograd does not run under ``torch.func.grad``, and such a scalar is rare (a learning rate
    differentiated through the step).

    Args:
        *values: tensors (typically 0-d) and other values, which pass through.

    Returns:
        The values, as a tuple, or the one value when given one.

    Example:
        >>> import torch, functrain as ft
        >>> count = torch.tensor(3)
        >>> t = count.to(torch.float64)
        >>> bc1, bc2 = ft.hoist(1 - 0.9**t, 1 - 0.999**t)
        >>> round(float(bc1), 3)
        0.271
    """
    if torch.compiler.is_compiling():
        tensors = [v for v in values if isinstance(v, Tensor) and not v.requires_grad]
        # A custom op's autograd does not run under torch.func.grad, so a scalar that carries a
        # gradient (a learning rate differentiated through the step) is left to be fused.
        if tensors:
            realised = dict(zip(map(id, tensors), _hoist(tensors)))
            values = tuple(realised.get(id(v), v) for v in values)
    return values[0] if len(values) == 1 else values
