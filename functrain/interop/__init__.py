"""Interoperation with ``torch.optim``: convert optimiser state both ways, and run a functrain
transformation behind the ``torch.optim.Optimizer`` interface.

- :func:`from_torch_optimizer` reads a torch.optim optimiser (its class, its param groups'
  hyperparameters and its per-parameter state) and returns the same-name functrain optimiser, its
  ``opt_state`` and the params, so a run started imperatively continues functionally.
- :func:`opt_state_from_torch` converts the state only, into the structure of ``tx.init(params)``
  for a ``tx`` you built (e.g. wrapped in ``inject_hyperparams`` or composed with ``partition``).
- :func:`load_into_torch` is the reverse: it writes a functrain ``opt_state`` into a torch.optim
  optimiser through ``optimizer.load_state_dict``.
- :class:`TorchOptimizer` runs any functrain transformation as a ``torch.optim.Optimizer``.

The state mapping is one table per torch.optim class (``_tables._MIRRORS``): each entry names a torch
per-parameter state key and the functrain state class and field holding it. The two libraries
differ in three ways that the conversion bridges:

- torch.optim keeps a ``step`` per parameter (a float tensor); functrain keeps one ``count`` per
  transform (a 0-d int64 tensor). Every ``count`` field is set from the common torch step, and the
  conversion refuses states whose per-parameter steps differ (parameters that missed gradients),
  since a shared count cannot represent them, unless ``tx`` keeps no state for those parameters
  (e.g. ``ft.set_to_zero()`` for them in a ``partition``). Where torch keeps no count (SGD and Muon)
  pass ``step=``; every functrain optimiser keeps one (its ``ScheduleState.count``).
- torch.optim creates most states lazily at the first step; a functrain state exists from ``init``.
  A torch optimiser without state converts to ``tx.init(params)``, and a functrain state with count
  0 converts to no torch state (Adagrad, whose state torch builds eagerly, excepted).
- scalars that torch stores per parameter (NAdam's ``mu_product``, ASGD's ``eta``) are one 0-d
  tensor per transform in functrain; ASGD's ``mu`` is recomputed from the count.
"""

from ._adapter import TorchOptimizer as TorchOptimizer
from ._convert import (
    from_torch_optimizer as from_torch_optimizer,
    load_into_torch as load_into_torch,
    opt_state_from_torch as opt_state_from_torch,
)

__all__ = [
    "TorchOptimizer",
    "from_torch_optimizer",
    "load_into_torch",
    "opt_state_from_torch",
]
