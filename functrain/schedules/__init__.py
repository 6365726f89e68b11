"""Learning-rate schedules: the optimiser step count in, a learning rate out.

A schedule is a :data:`~functrain.base.Schedule`, ``Callable[[Tensor], Tensor]``: it maps the 0-d
int64 ``count`` of optimiser updates done so far (0 before the first update) to a 0-d float64 tensor
on the count's device. Pass it wherever a hyperparameter is accepted (``ft.sgd(lr=schedule)``).

Each ``<name>`` here equals ``torch.optim.lr_scheduler.<Name>`` value by value when the torch
scheduler is stepped once per optimiser step: ``schedule(count)`` is the ``param_groups[0]["lr"]``
that torch's ``optimizer.step()`` number ``count + 1`` uses, so ``schedule(0)`` is the learning rate
right after the scheduler is constructed. Arguments keep torch's names and defaults; where torch
reads the starting learning rate from the optimiser, it is the first argument, ``base_lr``.

How the values are computed:

- Pure tensor maths on the count, no ``.item()`` and no Python branch on its value, so a compiled
  step whose learning rate follows a schedule never recompiles as the count moves. The schedule's
  constants are Python numbers, so nothing is copied to the device per call.
- int64 for counts and float64 for values throughout: counts past ``2**31`` (and up to ``2**53``,
  where float64 stops holding every integer) are exact.
- Torch computes many schedulers *recursively* ("chainable": the new lr is the previous one times
  a factor). Here each value is computed in closed form, with torch's ``_get_closed_form_lr``
  arithmetic, operation for operation. The two differ only by rounding: over 2000 steps from the
  start the recursion drifts from the closed form by at most ~1e-14 relative for ``linear_lr``,
  ``polynomial_lr``, ``exponential_lr`` and ``step_lr``, and by up to ~6e-13 relative for
  ``cosine_annealing_lr`` (its recursion restarts from an exact value at each minimum, while
  ``pi * count / T_max`` loses digits as the count grows). The tests hold every schedule to
  ``|ours - torch| <= 1e-12 * |torch| + 1e-15``. One measured exception, torch's and not ours:
  ``LinearLR`` decaying to 0 over ~2**31 steps, where the recursion's factor suffers cancellation
  near the end (2e-8 relative, 8e-18 absolute at ``base_lr=0.1``).
- Schedulers that are not chainable (``cosine_annealing_warm_restarts``, ``cyclic_lr``,
  ``one_cycle_lr``), and ``constant_lr``/``multi_step_lr``, repeat torch's arithmetic operation for
  operation: they equal torch bit for bit, except that ``torch.cos``/``torch.pow`` and Python's
  ``math`` may round the last bit differently.

Checks beyond torch's (each a value torch would divide by zero on, crash on later, or silently
misuse): step counts (``step_size``, ``total_iters``, ``T_max``...) are positive ints; learning
rates and ``gamma`` are non-negative; ``polynomial_lr``'s ``power`` is non-negative; a
``one_cycle_lr`` phase of zero length that a step would land in is refused; ``cyclic_lr``'s
``scale_mode`` is one of its two values; ``sequential_lr``'s milestones are sorted.
"""

from ._cosine import (
    cosine_annealing_lr as cosine_annealing_lr,
    cosine_annealing_warm_restarts as cosine_annealing_warm_restarts,
    warmup_cosine as warmup_cosine,
)
from ._cyclic import cyclic_lr as cyclic_lr, one_cycle_lr as one_cycle_lr
from ._decay import (
    constant_lr as constant_lr,
    exponential_lr as exponential_lr,
    linear_lr as linear_lr,
    multi_step_lr as multi_step_lr,
    polynomial_lr as polynomial_lr,
    step_lr as step_lr,
)
from ._sequential import sequential_lr as sequential_lr
from ._wsd import warmup_stable_decay as warmup_stable_decay

__all__ = [
    "constant_lr",
    "cosine_annealing_lr",
    "cosine_annealing_warm_restarts",
    "cyclic_lr",
    "exponential_lr",
    "linear_lr",
    "multi_step_lr",
    "one_cycle_lr",
    "polynomial_lr",
    "sequential_lr",
    "step_lr",
    "warmup_cosine",
    "warmup_stable_decay",
]
