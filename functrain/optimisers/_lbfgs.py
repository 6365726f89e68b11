"""L-BFGS without closures: ``torch.optim.LBFGS`` as a pure transform that re-evaluates the loss
through the ``value_fn`` extra argument a training step supplies.

torch's loop has data-dependent exits (tolerances, the evaluation budget, the line search's
bracketing and zoom phases). Here it is written once, as fixed-shape tensors and steps that run
under a mask: every conditional piece goes through :func:`_masked`, which a traced step (compiled,
vmapped) computes on both sides and merges with ``torch.where``, and an eager step decides on the
host, as torch.optim.LBFGS itself does. A compiled update is therefore one graph holding the most
evaluations the options allow, those after the loop has stopped changing nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import _sharding, _tree, _validate
from ..base import GradientTransformation, Hyperparameter, Params, register_state, require_params
from ..wrappers import schedulable

try:  # a private higher-order op: a loop the compiled graph keeps as one loop (see _loop)
    from torch._higher_order_ops.while_loop import while_loop as _while_loop
except ImportError:  # pragma: no cover - a torch without it unrolls the loop instead
    _while_loop = None

_F64 = torch.float64
_C1, _C2 = 1e-4, 0.9  # torch's _strong_wolfe defaults: sufficient decrease and curvature constants
_MIN_CURVATURE = 1e-10  # torch stores a pair (y, s) only when y.s exceeds this
_LINE_SEARCHES = (None, "strong_wolfe")


@register_state
class LbfgsMemory(NamedTuple):
    """What ``torch.optim.LBFGS`` keeps in ``optimizer.state`` between steps, as fixed-shape tensors.

    Vectors hold every parameter's elements, flattened and concatenated in the order of the tree's
    leaves (torch's order of ``params``), in their promoted dtype. The history is a ring of
    ``history_size`` rows: the ``i``-th oldest pair is row ``(start + i) % history_size``, so adding
    a pair to a full history overwrites the oldest row instead of shifting every row.
    """

    n_iter: Tensor  # iterations over all steps (int64); torch's state["n_iter"]
    func_evals: Tensor  # evaluations over all steps (int64)
    d: Tensor  # the last direction, (n,)
    t: Tensor  # the last step length (float64)
    old_dirs: Tensor  # y = g_{k+1} - g_k, (history_size, n)
    old_stps: Tensor  # s = t_k d_k, (history_size, n)
    ro: Tensor  # 1 / (y.s), (history_size,)
    start: Tensor  # the ring position of the oldest pair (int64)
    num_old: Tensor  # pairs stored (int64), at most history_size
    H_diag: Tensor  # noqa: N815 - torch's name: y.s / y.y of the newest pair, the initial inverse Hessian (0-d)
    prev_flat_grad: Tensor  # the gradient at the start of the last iteration, (n,)
    prev_loss: Tensor  # the loss there (float64)


class _Search(NamedTuple):
    """A strong-Wolfe line search in progress (torch's ``_strong_wolfe`` locals), along ``d`` from
    the iteration's point: first bracketing a step, then zooming into the bracket."""

    t: Tensor  # the step length evaluated next (float64)
    gtd: Tensor  # g.d at the start (in the gradient's dtype, as every g.d)
    d_norm: Tensor  # max |d|
    max_ls: Tensor  # evaluations the search may add after its first (int64)
    ls_iter: Tensor  # int64
    evals: Tensor  # evaluations so far (int64)
    zooming: Tensor  # bool: the bracket is found
    t_prev: Tensor  # bracketing: the previous trial (float64), its loss, gradient and g.d
    f_prev: Tensor
    g_prev: Tensor
    gtd_prev: Tensor
    bracket: Tensor  # zooming: the two ends (2,) with their losses, gradients (2, n) and g.d
    bracket_f: Tensor
    bracket_g: Tensor
    bracket_gtd: Tensor
    low: Tensor  # which end has the lower loss (int64, 0 or 1)
    insuf_progress: Tensor  # bool
    wolfe: Tensor  # bool: the strong Wolfe conditions hold at bracket[low]
    finished: Tensor  # bool: the search has chosen bracket[low]


class _Run(NamedTuple):
    """torch's ``step`` locals: where the iteration stands and whether its loop goes on."""

    memory: LbfgsMemory
    params: Params  # the current point x
    loss: Tensor  # at x (float64)
    grad: Tensor  # at x, flat
    going: Tensor  # bool: the loop has not stopped
    n: Tensor  # iterations in this step (int64)
    evals: Tensor  # evaluations in this step (int64); torch's current_evals
    optimal: Tensor  # bool: max |grad| <= tolerance_grad
    search: _Search | tuple  # () without a line search (not None: torch's pytree takes None for a leaf)


@schedulable
def lbfgs(
    lr: Hyperparameter = 1,
    max_iter: int = 20,
    max_eval: int | None = None,
    tolerance_grad: float = 1e-7,
    tolerance_change: float = 1e-9,
    history_size: int = 100,
    line_search_fn: str | None = None,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    r"""L-BFGS, numerically equal to ``torch.optim.LBFGS``: one ``update`` does what one
    ``LBFGS.step(closure)`` does, re-evaluating the loss through ``value_fn`` instead of a closure.

    The update needs the extra arguments ``value`` (the loss at ``params``) and ``value_fn``
    (``value_fn(params) -> (loss, grads)`` on the same batch), which :func:`functrain.make_train_step`
    supplies: run it through a training step like any other optimiser. The gradient ``update``
    receives and ``value`` are the first evaluation, as the first call of torch's closure.

    Each of up to ``max_iter`` iterations (with :math:`g_k` the gradient at :math:`x_k`):

    .. math::
        s_{k-1} &= t_{k-1} d_{k-1}, \quad y_{k-1} = g_k - g_{k-1}, \quad \rho_{k-1} = 1 / y_{k-1}^\top s_{k-1}
            \quad\text{(kept only when } y^\top s > 10^{-10}\text{; the newest history\_size pairs)}\\
        d_k &= -H_k g_k \text{ by the two-loop recursion (Nocedal \& Wright, Algorithm 7.4):}\\
        &\quad q \leftarrow -g_k;\ \text{newest to oldest: }
            \alpha_i = \rho_i s_i^\top q,\ q \leftarrow q - \alpha_i y_i;\\
        &\quad r \leftarrow \gamma_k q,\ \gamma_k = \frac{s_{k-1}^\top y_{k-1}}{y_{k-1}^\top y_{k-1}};\
            \text{oldest to newest: } \beta_i = \rho_i y_i^\top r,\ r \leftarrow r + (\alpha_i - \beta_i) s_i;\
            d_k = r\\
        x_{k+1} &= x_k + t_k d_k

    The first iteration ever steps :math:`d_0 = -g_0` with :math:`t_0 = \min(1, 1/\lVert g_0\rVert_1)\,\text{lr}`;
    later ones start from :math:`t_k = \text{lr}`. Without a line search, :math:`t_k` is that step.
    With ``line_search_fn="strong_wolfe"``, :math:`t_k` is searched (cubic interpolation, then
    zoom; Nocedal & Wright, Algorithms 3.5 and 3.6) until the strong Wolfe conditions hold:

    .. math::
        f(x_k + t d_k) \le f(x_k) + c_1 t\, g_k^\top d_k, \qquad
        \lvert \nabla f(x_k + t d_k)^\top d_k \rvert \le -c_2\, g_k^\top d_k, \qquad c_1 = 10^{-4},\ c_2 = 0.9

    The loop stops, as torch's, after ``max_iter`` iterations or once ``max_eval`` evaluations are
    spent, when :math:`\max_i |g_i| \le` ``tolerance_grad`` (checked first on the given gradient: then
    nothing moves), when :math:`g_k^\top d_k > -` ``tolerance_change``, or when the step
    :math:`\max_i |t_k d_{k,i}|` or the change of the loss falls below ``tolerance_change``. The
    history, the last direction and step carry over to the next ``update``.

    Execution: eager, the loop exits as torch's does, reading its conditions on the host (on a GPU,
    a synchronisation each, as torch's ``float(loss)`` and ``if`` are). Traced (``compile=True``,
    vmap) there is no exit: the update is one graph holding the most evaluations the options allow
    (``max_eval`` with the line search; without it ``min(max_iter, max(1, max_eval - 1))``
    iterations, each evaluating once except a ``max_iter``-th), each a forward and backward pass,
    those after the loop has stopped changing nothing. That is the price of one graph with no
    recompiles: a compiled step always runs that many evaluations, and the graph, and its compile
    time, grow with them, so compile with small ``max_iter``/``max_eval`` and call the step more
    often. The two-loop recursion is a loop in the graph (``torch._higher_order_ops.while_loop``)
    over the pairs stored, whatever ``history_size``.

    Numerics: every operation is torch's, in torch's dtypes: the vectors (gradients, directions,
    history) in the parameters' dtype, each ``x + a y`` as one fused multiply-add as torch's
    ``add_(y, alpha=a)``; the losses and step lengths in float64 (torch's Python floats), rounded to
    the gradient's dtype where torch's arithmetic meets a ``g.d`` tensor. Eager results equal
    torch.optim.LBFGS's bit for bit in float64 and float32 on the tests' problems; compiled ones to
    rounding (inductor fuses and reorders reductions).

    Not in the common optimiser battery (``tests/registry.py``): that battery steps synthetic
    gradients with no loss to re-evaluate. ``tests/test_lbfgs.py`` covers its points that apply:
    parity with torch (float64 and float32; the state compared too), torch's signature, tensor and
    scheduled ``lr``, ``maximize``, state structure and dtypes kept, empty and nested trees,
    checkpoint round trip, bad hyperparameters, mismatched trees, complex parameters refused,
    compiled == eager in one graph with no recompile, vmap. All parameters must be real, on one
    device and not sharded DTensors (the vectors are flat, as torch's).

    Args:
        lr: learning rate: the initial step length of each line search, or the fixed step without one.
        max_iter: most iterations per ``update`` (>= 1).
        max_eval: most evaluations per ``update`` (>= 1); default ``max_iter * 5 // 4``.
        tolerance_grad: stop when the largest absolute gradient entry is at most this (>= 0).
        tolerance_change: stop when the directional derivative, the step or the loss change is
            below this (>= 0).
        history_size: most (y, s) pairs kept (>= 1); memory is ``2 * history_size`` parameter copies.
        line_search_fn: None (fixed steps) or ``"strong_wolfe"``.
        maximize: maximise the objective instead of minimising it.

    ``lr`` and the tolerances may be floats, 0-d tensors or schedules of the step count.

    Example:
        >>> import torch, torch.nn.functional as F, functrain as ft
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(3, 1)
        >>> x = torch.randn(32, 3)
        >>> batch = (x, x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3)
        >>> tx = ft.lbfgs(line_search_fn="strong_wolfe")
        >>> step = ft.make_train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), tx)
        >>> state = ft.TrainState.create(model, tx)
        >>> state, metrics = step(state, batch)  # one update: up to 20 iterations, each with a line search
        >>> state, metrics = step(state, batch)
        >>> print(f"{float(metrics['loss']):.0e}")  # the loss at the start of this update
        1e-10
        >>> state.params["weight"], state.params["bias"]
        (tensor([[ 1.0000, -2.0000,  0.5000]]), tensor([0.3000]))
        >>> ft.lbfgs().update(state.params, state.opt_state, state.params)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: lbfgs re-evaluates the loss along its search direction, so update needs ...

    References:
        Nocedal & Wright, 2006, "Numerical Optimization", 2nd ed.: Algorithm 7.4 (the two-loop
        recursion), Algorithms 3.5 and 3.6 (the strong-Wolfe line search and its zoom).
        ``torch.optim.LBFGS`` (torch 2.14, torch/optim/lbfgs.py), the reference this follows
        step for step; its line search is ported from minFunc's (Schmidt).
        optax issue #1061, "L-BFGS without closures": an optimiser that re-evaluates through the
        update's extra arguments instead of a closure.
    """
    owner = "lbfgs"
    _validate.in_range(owner, "lr", lr, 0.0)
    max_iter = _validate.integer(owner, "max_iter", max_iter, 1)
    max_eval = max_iter * 5 // 4 if max_eval is None else _validate.integer(owner, "max_eval", max_eval, 1)
    _validate.in_range(owner, "tolerance_grad", tolerance_grad, 0.0)
    _validate.in_range(owner, "tolerance_change", tolerance_change, 0.0)
    history_size = _validate.integer(owner, "history_size", history_size, 1)
    _validate.one_of(owner, "line_search_fn", line_search_fn, _LINE_SEARCHES)
    _validate.boolean(owner, "maximize", maximize)
    options = _Options(lr, max_iter, max_eval, tolerance_grad, tolerance_change, history_size, maximize)

    def init(params):
        return _init(params, history_size)

    def update_and_apply(updates, state, params, *, donate=False, **extra):
        # The new parameters themselves: torch's x + t d, with no update to add back (which would
        # round). donate is not needed: the result is new tensors either way.
        del donate
        require_params("lbfgs", params)
        value_fn, value = _closure_parts(extra)
        if not _tree.leaves(params):
            return params, state  # as torch: nothing to optimise, nothing changes
        return _step(options, line_search_fn, updates, state, params, value, value_fn)

    def update(updates, state, params=None, **extra):
        new_params, state = update_and_apply(updates, state, params, **extra)
        return _tree.map(torch.sub, new_params, params), state

    return GradientTransformation(init, update, update_and_apply)


class _Options(NamedTuple):
    lr: Any
    max_iter: int
    max_eval: int
    tolerance_grad: Any
    tolerance_change: Any
    history_size: int
    maximize: bool


def _closure_parts(extra: dict) -> tuple[Callable, Tensor]:
    value_fn, value = extra.get("value_fn"), extra.get("value")
    if value_fn is None or value is None:
        raise ValueError(
            "lbfgs re-evaluates the loss along its search direction, so update needs the extra arguments "
            "value (the loss at params) and value_fn (value_fn(params) -> (loss, grads) on the same batch): run it "
            "through ft.make_train_step, which passes both, or call "
            "tx.update(grads, state, params, value=loss, value_fn=value_fn)"
        )
    return value_fn, value


def _init(params: Params, history_size: int) -> LbfgsMemory:
    leaves = _tree.leaves(params)
    for key, leaf in _tree.named_leaves(params):
        if _sharding.is_dtensor(leaf):
            raise ValueError(
                f"lbfgs: parameter '{key}' is a sharded DTensor; L-BFGS works on one flat vector of all parameters "
                "(as torch.optim.LBFGS): train it without mesh="
            )
    device = leaves[0].device if leaves else torch.device("cpu")
    dtype = _flat_dtype(leaves)
    n = sum(leaf.numel() for leaf in leaves)

    def zeros(*shape, dtype=dtype):
        return torch.zeros(shape, dtype=dtype, device=device)

    count = zeros(dtype=torch.int64)
    return LbfgsMemory(
        n_iter=count,
        func_evals=count.clone(),
        d=zeros(n),
        t=zeros(dtype=_F64),
        old_dirs=zeros(history_size, n),
        old_stps=zeros(history_size, n),
        ro=zeros(history_size),
        start=count.clone(),
        num_old=count.clone(),
        H_diag=torch.ones((), dtype=dtype, device=device),
        prev_flat_grad=zeros(n),
        prev_loss=zeros(dtype=_F64),
    )


def _flat_dtype(leaves: list[Tensor]) -> torch.dtype:
    """The dtype ``torch.cat`` gives the leaves' elements (torch.optim.LBFGS's flat gradient)."""
    dtype = leaves[0].dtype if leaves else torch.get_default_dtype()
    for leaf in leaves[1:]:
        dtype = torch.promote_types(dtype, leaf.dtype)
    return dtype


# ----------------------------------------------------------------------------- running under a mask


def _masked(condition: Tensor, fn: Callable[..., Any], old: Any, *args: Any) -> Any:
    """``fn(old, *args)`` where the 0-d bool ``condition`` holds, else ``old`` (a tree of tensors).

    Eager, the host reads the condition and runs ``fn`` only when it holds, as torch.optim.LBFGS
    reads its own conditions; traced, both merged by ``torch.where`` (:func:`functrain._tree.choose`).
    """
    return _tree.choose(condition, lambda: fn(old, *args), lambda: old)


def _loop(cond: Callable[..., Tensor], body: Callable[..., tuple], carried: tuple, most: int) -> tuple:
    """``while cond(*carried): carried = body(*carried)`` in a traced update, ``cond`` true for at
    most ``most`` trips. Compiled, torch's ``while_loop`` keeps it one loop in the graph (the
    two-loop recursion would otherwise be unrolled ``history_size`` times per evaluation); under
    vmap or grad, ``most`` masked trips."""
    if torch.compiler.is_compiling() and _while_loop is not None:
        return _while_loop(cond, body, carried)
    for _ in range(most):
        carried = _tree.where(cond(*carried), body(*carried), carried)
    return carried


def _py_max(a: Tensor, b: Tensor | float) -> Tensor:
    """Python's ``max(a, b)``: ``a`` unless ``b > a`` (so a NaN ``a`` stays), as torch's line search computes it."""
    return torch.where(b > a, b, a)


def _py_min(a: Tensor, b: Tensor | float) -> Tensor:
    """Python's ``min(a, b)``: ``a`` unless ``b < a``."""
    return torch.where(b < a, b, a)


# ----------------------------------------------------------------------------- flat vectors


def _flat(tree: Params) -> Tensor:
    """Every leaf's elements in one vector, as torch.optim.LBFGS's ``_gather_flat_grad``."""
    return torch.cat([leaf.reshape(-1) for leaf in _tree.leaves(tree)])


def _moved(params: Params, t: Tensor, d: Tensor) -> Params:
    """``params + t * d`` leaf by leaf, ``d`` flat: torch's ``_add_grad(t, d)``, which steps each
    parameter by its slice with ``t`` in the parameter's dtype. ``addcmul`` with a 0-d tensor rounds as
    ``add(..., alpha=t)`` does (one fused multiply-add), where ``leaf + t * piece`` would round twice."""
    leaves, spec = _tree.flatten(params)
    pieces = torch.split(d, [leaf.numel() for leaf in leaves])
    step = t.to(d.dtype)
    return _tree.unflatten(
        [torch.addcmul(leaf, piece.view_as(leaf), step).to(leaf.dtype) for leaf, piece in zip(leaves, pieces)], spec
    )


def _evaluate(value_fn: Callable, params: Params, maximize: bool) -> tuple[Tensor, Tensor]:
    """The loss (float64, as torch's ``float(closure())``) and the flat gradient at ``params``."""
    loss, grads = value_fn(params)
    _tree.check_same_shapes(params, grads, "params", "the grads value_fn returned")
    loss, grad = torch.as_tensor(loss).detach().reshape(()).to(_F64), _flat(grads)
    return (-loss, -grad) if maximize else (loss, grad)


# ----------------------------------------------------------------------------- one update


def _step(options: _Options, line_search_fn, grads, memory: LbfgsMemory, params, value, value_fn):
    """torch.optim.LBFGS.step, from the first evaluation ``(value, grads)`` at ``params``."""
    grad = _flat(grads)
    loss = torch.as_tensor(value).detach().reshape(()).to(device=grad.device, dtype=_F64)
    if options.maximize:
        loss, grad = -loss, -grad
    int64 = torch.zeros((), dtype=torch.int64, device=grad.device)
    memory = memory._replace(func_evals=memory.func_evals + 1)
    optimal = grad.abs().max() <= options.tolerance_grad
    run = _Run(memory, params, loss, grad, ~optimal, int64, int64 + 1, optimal, ())

    def evaluate(at: Params) -> tuple[Tensor, Tensor]:
        return _evaluate(value_fn, at, options.maximize)

    if line_search_fn is None:
        run = _fixed_steps(options, run, evaluate)
    else:
        run = _searched_steps(options, run, evaluate)
    return run.params, run.memory


def _fixed_steps(options: _Options, run: _Run, evaluate) -> _Run:
    """torch's loop without a line search: step by ``t``, evaluate there (except after the last
    iteration, which ends the update), check. Iterations past ``max_eval - 1`` evaluations never run."""
    iterations = min(options.max_iter, max(1, options.max_eval - 1))

    def step(run: _Run, last: bool) -> _Run:
        params = _moved(run.params, run.memory.t, run.memory.d)
        if last:  # torch does not re-evaluate after the last iteration
            return _stopping(options, run._replace(params=params))
        loss, grad = evaluate(params)
        optimal = grad.abs().max() <= options.tolerance_grad
        memory = run.memory._replace(func_evals=run.memory.func_evals + 1)
        run = run._replace(memory=memory, params=params, loss=loss, grad=grad, evals=run.evals + 1, optimal=optimal)
        return _stopping(options, run)

    for k in range(1, iterations + 1):
        run = _masked(run.going, _next_iteration, run, options)
        run = _masked(run.going, step, run, k == options.max_iter)
    return run


def _searched_steps(options: _Options, run: _Run, evaluate) -> _Run:
    """torch's loop with the strong-Wolfe line search, as one evaluation per trip: each trip
    evaluates the search's trial step and advances the search; a search that has chosen its step
    ends its iteration (checks, then the next direction and search). ``max_eval`` trips hold every
    evaluation torch can make: a search may add up to ``max_eval - current_evals`` to its first."""

    def trip(run: _Run) -> _Run:
        search = run.search
        loss, grad = evaluate(_moved(run.params, search.t, run.memory.d))
        search = _search_step(search, run.loss, run.grad, loss, grad, run.memory.d, options.tolerance_change)
        return _masked(search.finished, _end_search, run._replace(search=search), options)

    run = run._replace(search=_search_start(run, options))  # fixed structure, whatever happens next
    run = _masked(run.going, _next_search, run, options)
    for _ in range(options.max_eval):
        run = _masked(run.going, trip, run)
    return run


def _next_search(run: _Run, options: _Options) -> _Run:
    run = _next_iteration(run, options)
    return run._replace(search=_search_start(run, options))


def _end_search(run: _Run, options: _Options) -> _Run:
    """Takes the step the search chose: its point, loss and gradient (torch's ``_add_grad(t, d)``
    after ``_strong_wolfe``), then the loop's checks and, if it goes on, the next search."""
    search, memory = run.search, run.memory
    low = search.low.view(1)
    t = search.bracket.index_select(0, low)[0]
    grad = search.bracket_g.index_select(0, low)[0]
    memory = memory._replace(t=t, func_evals=memory.func_evals + search.evals)
    run = run._replace(
        memory=memory,
        params=_moved(run.params, t, memory.d),
        loss=search.bracket_f.index_select(0, low)[0],
        grad=grad,
        evals=run.evals + search.evals,
        optimal=grad.abs().max() <= options.tolerance_grad,
    )
    run = _stopping(options, run)
    return _masked(run.going, _next_search, run, options)


def _stopping(options: _Options, run: _Run) -> _Run:
    """torch's checks at the end of an iteration: the iteration or evaluation budget is spent, the
    gradient is small, or the step or the loss change is below ``tolerance_change``."""
    memory = run.memory
    step = memory.d * memory.t.to(memory.d.dtype)
    stop = (
        (run.n == options.max_iter)
        | (run.evals >= options.max_eval)
        | run.optimal
        | (step.abs().max() <= options.tolerance_change)
        | ((run.loss - memory.prev_loss).abs() < options.tolerance_change)
    )
    return run._replace(going=run.going & ~stop)


# ----------------------------------------------------------------------------- the direction


def _next_iteration(run: _Run, options: _Options) -> _Run:
    """The top of torch's loop: count the iteration, update the history with the last step, find
    the direction by the two-loop recursion and the initial step length; stop if the direction
    does not descend (g.d > -tolerance_change)."""
    memory, grad = run.memory, run.grad
    n_iter = memory.n_iter + 1
    first = n_iter == 1
    # torch's first iteration takes d = -g with an empty history and H_diag = 1, which is what the
    # two-loop recursion gives then; later ones first remember the last step.
    memory = _masked(~first, _remember, memory, grad)
    d = _two_loop(grad, memory)
    lr = torch.as_tensor(options.lr, dtype=_F64, device=grad.device)
    t = torch.where(first, _first_step(grad, lr), lr)
    gtd = grad.dot(d)
    memory = memory._replace(n_iter=n_iter, d=d, t=t, prev_flat_grad=grad, prev_loss=run.loss)
    return run._replace(memory=memory, n=run.n + 1, going=run.going & ~(gtd > -options.tolerance_change))


def _first_step(grad: Tensor, lr: Tensor) -> Tensor:
    """torch's ``min(1.0, 1.0 / |g|_1) * lr``: the product is in the gradient's dtype when the
    reciprocal (a tensor) is the smaller, in float64 (a Python float) otherwise."""
    inverse = 1.0 / grad.abs().sum()
    return torch.where(inverse < 1.0, (inverse * lr.to(inverse.dtype)).to(_F64), 1.0 * lr)


def _remember(memory: LbfgsMemory, grad: Tensor) -> LbfgsMemory:
    """y = g - g_prev and s = t d; kept (overwriting the oldest pair when full) only when y.s > 1e-10."""
    y = grad - memory.prev_flat_grad
    s = memory.d * memory.t.to(memory.d.dtype)
    ys = y.dot(s)
    return _masked(ys > _MIN_CURVATURE, _push, memory, y, s, ys)


def _push(memory: LbfgsMemory, y: Tensor, s: Tensor, ys: Tensor) -> LbfgsMemory:
    size = memory.ro.shape[0]
    full = memory.num_old == size
    at = ((memory.start + memory.num_old) % size).view(1)
    return memory._replace(
        old_dirs=memory.old_dirs.index_copy(0, at, y.view(1, -1)),
        old_stps=memory.old_stps.index_copy(0, at, s.view(1, -1)),
        ro=memory.ro.index_copy(0, at, (1.0 / ys).view(1)),
        start=torch.where(full, (memory.start + 1) % size, memory.start),
        num_old=torch.where(full, memory.num_old, memory.num_old + 1),
        H_diag=ys / y.dot(y),
    )


def _two_loop(grad: Tensor, memory: LbfgsMemory) -> Tensor:
    """``-H g``: torch's two-loop recursion over the stored pairs, newest to oldest, then back.

    Traced, a loop in the graph whose trips find their ring rows as tensors; eager, the ring's
    position and size are read on the host once (2x faster on a small model than tensor index
    arithmetic and a host-read condition per trip). The operations on the rows are the same.
    """
    size = memory.ro.shape[0]
    if not _tree.tracing():
        start, count = int(memory.start), int(memory.num_old)
        # Each row copied out, as index_select does traced: a BLAS dot sums an unaligned view (a row
        # at an offset) in another order than a fresh tensor, and torch's pairs are fresh tensors.
        stps, dirs = (
            [table[(start + i) % size].clone() for i in range(count)] for table in (memory.old_stps, memory.old_dirs)
        )
        ros = [memory.ro[(start + i) % size] for i in range(count)]
        q, al = grad.neg(), [None] * count
        for i in reversed(range(count)):
            al[i] = _alpha(stps[i], ros[i], q)
            q = torch.addcmul(q, dirs[i], -al[i])
        r = q * memory.H_diag
        for i in range(count):
            r = _forward_trip(dirs[i], stps[i], ros[i], al[i], r)
        return r

    def at(i: Tensor) -> Tensor:  # the ring row of the i-th oldest pair
        return ((memory.start + i) % size).view(1)

    def row(table: Tensor, index: Tensor) -> Tensor:
        return table.index_select(0, index)[0]

    def backward_more(i, q, al):
        return i >= 0

    def backward(i, q, al):
        j = at(i)
        a = _alpha(row(memory.old_stps, j), row(memory.ro, j), q)
        # i % size: a masked trip (vmap) runs this with i = -1 too
        return i - 1, torch.addcmul(q, row(memory.old_dirs, j), -a), al.index_copy(0, (i % size).view(1), a.view(1))

    _, q, al = _loop(backward_more, backward, (memory.num_old - 1, grad.neg(), torch.zeros_like(memory.ro)), size)

    def forward_more(i, r):
        return i < memory.num_old

    def forward(i, r):
        j = at(i)
        return i + 1, _forward_trip(
            row(memory.old_dirs, j), row(memory.old_stps, j), row(memory.ro, j), row(al, i.view(1)), r
        )

    _, r = _loop(forward_more, forward, (torch.zeros_like(memory.num_old), q * memory.H_diag), size)
    return r


def _alpha(s: Tensor, ro: Tensor, q: Tensor) -> Tensor:
    """torch's ``al[i] = old_stps[i].dot(q) * ro[i]``."""
    return s.dot(q) * ro


def _forward_trip(y: Tensor, s: Tensor, ro: Tensor, alpha: Tensor, r: Tensor) -> Tensor:
    """torch's ``be_i = old_dirs[i].dot(r) * ro[i]; r.add_(old_stps[i], alpha=al[i] - be_i)``."""
    return torch.addcmul(r, s, alpha - y.dot(r) * ro)


# ----------------------------------------------------------------------------- the strong-Wolfe search


def _search_start(run: _Run, options: _Options) -> _Search:
    """torch's ``_strong_wolfe`` entry: the first trial at the iteration's ``t``, a budget of
    ``max_eval - current_evals`` more evaluations."""
    memory, grad = run.memory, run.grad
    d = memory.d
    gtd = grad.dot(d)
    zero = torch.zeros((), dtype=_F64, device=grad.device)
    int64 = torch.zeros((), dtype=torch.int64, device=grad.device)
    no = torch.zeros((), dtype=torch.bool, device=grad.device)
    pair = torch.stack([zero, zero])
    return _Search(
        t=memory.t,
        gtd=gtd,
        d_norm=d.abs().max(),
        max_ls=options.max_eval - run.evals,
        ls_iter=int64,
        evals=int64,
        zooming=no,
        t_prev=zero,
        f_prev=run.loss,
        g_prev=grad,
        gtd_prev=gtd,
        bracket=pair,
        bracket_f=pair,
        bracket_g=torch.stack([grad, grad]),
        bracket_gtd=torch.zeros(2, dtype=gtd.dtype, device=gtd.device),
        low=int64,
        insuf_progress=no,
        wolfe=no,
        finished=no,
    )


def _search_step(s: _Search, f: Tensor, g: Tensor, f_new: Tensor, g_new: Tensor, d: Tensor, tolerance_change):
    """Advances the search by its evaluation ``(f_new, g_new)`` at ``s.t`` from the start ``(f, g)``:
    a bracketing or a zoom step, then the zoom's head (choose the next trial, or finish)."""
    gtd_new = g_new.dot(d)
    s = s._replace(evals=s.evals + 1)
    if _tree.tracing():
        s = _tree.where(s.zooming, _zoom(s, f, f_new, g_new, gtd_new), _bracketing(s, f, g, f_new, g_new, gtd_new))
    else:
        s = _zoom(s, f, f_new, g_new, gtd_new) if bool(s.zooming) else _bracketing(s, f, g, f_new, g_new, gtd_new)
    return _masked(s.zooming & ~s.finished, _zoom_head, s, tolerance_change)


def _bracketing(s: _Search, f: Tensor, g: Tensor, f_new: Tensor, g_new: Tensor, gtd_new: Tensor) -> _Search:
    """One trip of torch's bracketing loop, whose head (``while ls_iter < max_ls``) comes first:
    out of budget, the bracket is (0, t); a step with too little decrease, or one past a minimum,
    brackets one; one meeting the strong Wolfe conditions ends the search; else extrapolate."""
    t = s.t
    out_of_budget = s.ls_iter == s.max_ls
    too_high = _too_little_decrease(f_new, f, t, s.gtd) | ((s.ls_iter > 1) & (f_new >= s.f_prev))
    wolfe = gtd_new.abs() <= -_C2 * s.gtd
    uphill = gtd_new >= 0
    bracketed = ~out_of_budget & (too_high | (~wolfe & uphill))
    done = ~out_of_budget & ~too_high & wolfe
    # The bracket, by the branch taken: (0, t) out of budget, (t_prev, t) bracketed, (t, t) done.
    t_lo = torch.where(out_of_budget, torch.zeros_like(t), torch.where(done, t, s.t_prev))
    f_lo = torch.where(out_of_budget, f, torch.where(done, f_new, s.f_prev))
    g_lo = torch.where(out_of_budget, g, torch.where(done, g_new, s.g_prev))
    bracket_f = torch.stack([f_lo, f_new])
    found = _Search(
        **{
            **s._asdict(),
            "bracket": torch.stack([t_lo, t]),
            "bracket_f": bracket_f,
            "bracket_g": torch.stack([g_lo, g_new]),
            "bracket_gtd": torch.stack([s.gtd_prev, gtd_new]),  # unused unless bracketed
            "low": _lower_end(bracket_f),
            "zooming": bracketed,
            "wolfe": done,
            "finished": out_of_budget | done,
        }
    )
    # Extrapolate: a cubic step in [t + 0.01 (t - t_prev), 10 t].
    lo, hi = t + 0.01 * (t - s.t_prev), t * 10
    further = s._replace(
        t=_cubic_interpolate(s.t_prev, s.f_prev, s.gtd_prev, t, f_new, gtd_new, lo, hi),
        t_prev=t,
        f_prev=f_new,
        g_prev=g_new,
        gtd_prev=gtd_new,
        ls_iter=s.ls_iter + 1,
    )
    return _tree.where(out_of_budget | bracketed | done, found, further)


def _zoom(s: _Search, f: Tensor, f_new: Tensor, g_new: Tensor, gtd_new: Tensor) -> _Search:
    """One zoom step with the evaluation at ``s.t``: it replaces the high end when it has too little
    decrease or no lower loss than the low end; otherwise it becomes the low end (the old low end
    becoming the high one when the slope says the minimum lies beyond), or ends the search."""
    t = s.t
    ends = torch.arange(2, device=t.device)
    low_end, high_end = ends == s.low, ends != s.low
    f_low = s.bracket_f.index_select(0, s.low.view(1))[0]
    too_high = _too_little_decrease(f_new, f, t, s.gtd) | (f_new >= f_low)

    def put(ends_mask: Tensor, s: _Search, t, f, g, gtd) -> _Search:
        return s._replace(
            bracket=torch.where(ends_mask, t, s.bracket),
            bracket_f=torch.where(ends_mask, f, s.bracket_f),
            bracket_g=torch.where(ends_mask[:, None], g, s.bracket_g),
            bracket_gtd=torch.where(ends_mask, gtd, s.bracket_gtd),
        )

    # Too high: the new point is the high end; the low end is the lower of the two.
    higher = put(high_end, s, t, f_new, g_new, gtd_new)
    higher = higher._replace(low=_lower_end(higher.bracket_f))
    # Otherwise: Wolfe ends the search; else the old low may become the high end; the new point is the low end.
    wolfe = gtd_new.abs() <= -_C2 * s.gtd
    low = s.low.view(1)
    width = s.bracket.index_select(0, (1 - s.low).view(1))[0] - s.bracket.index_select(0, low)[0]
    flip = ~wolfe & (gtd_new * width.to(gtd_new.dtype) >= 0)
    flipped = put(
        high_end & flip,
        s,
        s.bracket.index_select(0, low)[0],
        s.bracket_f.index_select(0, low)[0],
        s.bracket_g.index_select(0, low)[0],
        s.bracket_gtd.index_select(0, low)[0],
    )
    lower = put(low_end, flipped, t, f_new, g_new, gtd_new)._replace(wolfe=wolfe)
    return _tree.where(too_high, higher, lower)


def _zoom_head(s: _Search, tolerance_change) -> _Search:
    """The head of torch's zoom loop: finish when the Wolfe conditions hold, the budget is spent or
    the bracket is narrower than ``tolerance_change`` along ``d``; else the next trial, a cubic step
    kept a tenth of the bracket away from its ends after insufficient progress."""
    b0, b1 = s.bracket[0], s.bracket[1]
    finish = s.wolfe | (s.ls_iter >= s.max_ls) | ((b1 - b0).abs().to(s.d_norm.dtype) * s.d_norm < tolerance_change)
    f0, f1 = s.bracket_f[0], s.bracket_f[1]
    t = _cubic_interpolate(b0, f0, s.bracket_gtd[0], b1, f1, s.bracket_gtd[1])
    top, bottom = _py_max(b0, b1), _py_min(b0, b1)
    eps = 0.1 * (top - bottom)
    near_end = _py_min(top - t, t - bottom) < eps
    move = near_end & (s.insuf_progress | (t >= top) | (t <= bottom))
    moved = torch.where((t - top).abs() < (t - bottom).abs(), top - eps, bottom + eps)
    trial = s._replace(t=torch.where(move, moved, t), insuf_progress=near_end & ~move, ls_iter=s.ls_iter + 1)
    return _tree.where(finish, s._replace(finished=torch.ones_like(s.finished)), trial)


def _too_little_decrease(f_new: Tensor, f: Tensor, t: Tensor, gtd: Tensor) -> Tensor:
    """torch's ``f_new > f + c1 * t * gtd`` (the sufficient decrease condition fails). ``gtd`` is a
    tensor in the gradient's dtype, so torch computes the right side, and compares, in that dtype: in
    float32 a loss that did not change at float32's resolution passes, as it does in torch."""
    dtype = gtd.dtype
    return f_new.to(dtype) > f.to(dtype) + (_C1 * t).to(dtype) * gtd


def _lower_end(bracket_f: Tensor) -> Tensor:
    """torch's ``low_pos``: 0 if ``bracket_f[0] <= bracket_f[1]`` else 1 (so 1 when either is NaN)."""
    return (~(bracket_f[0] <= bracket_f[1])).to(torch.int64)


def _cubic_interpolate(x1, f1, g1, x2, f2, g2, xmin_bound=None, xmax_bound=None) -> Tensor:
    """The minimiser of the cubic through two points with their slopes, clamped to the bounds (by
    default the points themselves); their midpoint when the cubic has none. torch's
    ``_cubic_interpolate``, operation for operation, with its types: the slopes ``g`` are tensors in
    the gradient's dtype, so every operation that meets one is in that dtype, while the points,
    losses and bounds (torch's Python floats, here float64) are rounded to it where they meet it."""
    dtype = g1.dtype

    def low(x: Tensor) -> Tensor:  # a Python float meeting a tensor of the gradient's dtype
        return x.to(dtype)

    if xmin_bound is None:
        xmin_bound, xmax_bound = torch.where(x1 <= x2, x1, x2), torch.where(x1 <= x2, x2, x1)
    d1 = g1 + g2 - low(3 * (f1 - f2) / (x1 - x2))
    d2_square = d1**2 - g1 * g2
    d2 = d2_square.sqrt()  # NaN where negative: that branch is not taken
    min_pos = torch.where(
        x1 <= x2,
        low(x2) - low(x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2)),
        low(x1) - low(x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2)),
    ).to(_F64)
    # Python's min(max(min_pos, lo), hi), comparing in the gradient's dtype.
    clamped = torch.where(low(xmin_bound) > low(min_pos), xmin_bound, min_pos)
    clamped = torch.where(low(xmax_bound) < low(clamped), xmax_bound, clamped)
    return torch.where(d2_square >= 0, clamped, (xmin_bound + xmax_bound) / 2.0)
