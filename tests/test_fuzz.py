"""Fuzz battery: every optimiser and wrapper against inputs that do not belong to it.

Each target (every registry optimiser, and each wrapper and combinator around one) meets foreign
states from every other optimiser, states with a missing or an extra key, another shape or dtype,
gradients that do not match, complex parameters and empty trees. Every case must end in a clear
``ValueError``/``TypeError`` that names what is wrong (the key, or both optimisers), or in a
result (complex parameters where torch.optim supports them, equal to it: tests/test_complex.py;
empty trees). Each target runs in its own process, so a segfault or an abort fails that target's
test, naming the last case it started, instead of killing the run.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import functrain as ft
from functrain import _tree

from .harness import MATRIX_SHAPES, SHAPES
from .registry import BY_NAME, COMPLEX_SUPPORTED, SPECS


def _adam():
    return ft.adam(lr=1e-3)


# Wrappers and combinators, each around an optimiser; name -> (factory, what a foreign state must be told apart from).
WRAPPERS = {
    "inject_hyperparams": lambda: ft.inject_hyperparams(ft.adam)(lr=1e-3),
    "accumulate": lambda: ft.accumulate(_adam(), every=2),
    "apply_if_finite": lambda: ft.apply_if_finite(_adam(), max_consecutive_errors=3),
    "lookahead": lambda: ft.lookahead(_adam(), sync_period=2),
    "ema_params": lambda: ft.chain(_adam(), ft.ema_params(0.9)),
    "dynamic_loss_scale": lambda: ft.dynamic_loss_scale(_adam()),
    "masked": lambda: ft.masked(_adam(), lambda name, p: p.ndim > 1),
    "partition": lambda: ft.partition({"d": _adam(), "n": ft.sgd(lr=0.1)}, lambda name, p: "d" if p.ndim > 1 else "n"),
    "chain": lambda: ft.chain(ft.clip_by_global_norm(1.0), _adam()),
    "named_chain": lambda: ft.named_chain(clip=ft.clip_by_global_norm(1.0), opt=_adam()),
}
TARGETS = [spec.name for spec in SPECS] + list(WRAPPERS)


def build(target: str) -> ft.GradientTransformation:
    if target in WRAPPERS:
        return WRAPPERS[target]()
    # The option combination with the most state (sgd with momentum, adam with amsgrad): a stateless
    # one (plain sgd) rightly takes any params' state.
    spec = BY_NAME[target]
    params = tree(shapes_for(target))
    return max((spec.make(**kwargs) for kwargs in spec.cases()), key=lambda tx: len(_tree.leaves(tx.init(params))))


def shapes_for(target: str) -> dict[str, tuple[int, ...]]:
    return dict(MATRIX_SHAPES if target in BY_NAME and BY_NAME[target].matrices_only else SHAPES)


def tree(shapes, dtype=torch.float32):
    return {k: torch.randn(s, dtype=torch.float64).to(dtype) for k, s in shapes.items()}


def cases(target: str):
    """``(case, expect, run)``: ``expect`` is "error:<token>" (a ValueError/TypeError whose message has the
    token), "ok", or "ok-or-error:<token>"."""
    shapes = shapes_for(target)
    params = tree(shapes)
    grads = tree(shapes)
    tx = build(target)
    # Two keys whose states every target keeps (partition and masked route 1-d params elsewhere).
    first, second = [k for k, s in shapes.items() if len(s) > 1][:2]

    def update_with(state, g=grads, p=params):
        return lambda: tx.update(g, state, p)

    out = []
    for other in TARGETS:
        if other == target or (target in WRAPPERS and other == "adam" and target in ("chain", "named_chain")):
            continue
        foreign = build(other)
        try:
            state = foreign.init(tree(shapes_for(other)))
        except (ValueError, TypeError):
            continue
        token = f"ft.{other}" if other in BY_NAME else ""
        out.append((f"foreign-{other}", f"error:{token}", update_with(state)))
    less = {k: v for k, v in shapes.items() if k != second}
    out.append(("state-missing-key", f"error:'{second}'", lambda: tx.update(grads, tx.init(tree(less)), params)))
    more = {**shapes, "extra": (2, 2)}
    out.append(("state-extra-key", "error:'extra'", lambda: tx.update(grads, tx.init(tree(more)), params)))
    bigger = {**shapes, first: tuple(n + 1 for n in shapes[first])}
    out.append(("state-shape", f"error:['{first}']", lambda: tx.update(grads, tx.init(tree(bigger)), params)))
    out.append(("state-dtype", "error:dtype", lambda: tx.update(grads, tx.init(tree(shapes, torch.float64)), params)))
    bad = {**grads, first: torch.randn(bigger[first])}
    out.append(("grad-shape", f"error:['{first}']", lambda: tx.update(bad, tx.init(params), params)))
    smaller = {**grads, first: torch.randn(shapes[first][:-1])}
    out.append(("grad-smaller", f"error:['{first}']", lambda: tx.update(smaller, tx.init(params), params)))
    missing = {k: v for k, v in grads.items() if k != second}
    out.append(("grad-missing-key", f"error:'{second}'", lambda: tx.update(missing, tx.init(params), params)))
    out.append(("grad-none", f"error:'{first}'", lambda: tx.update({**grads, first: None}, tx.init(params), params)))
    out.append(("grad-float", f"error:'{first}'", lambda: tx.update({**grads, first: 1.0}, tx.init(params), params)))
    out.append(("state-not-a-state", "error:", lambda: tx.update(grads, {"mu": grads}, params)))
    out.append(("state-none", "error:", lambda: tx.update(grads, None, params)))
    complex_params = {k: torch.randn(s, dtype=torch.complex64) for k, s in shapes.items()}
    expect = "ok" if target in COMPLEX_SUPPORTED else "ok-or-error:complex"
    out.append(("complex", expect, lambda: tx.update(complex_params, tx.init(complex_params), complex_params)))
    out.append(("empty", "ok", lambda: tx.update({}, tx.init({}), {})))
    return out


def run_target(target: str) -> None:
    """The child process: one JSON line per case, flushed before the case runs its kernels."""
    for case, expect, run in cases(target):
        print(json.dumps({"case": case, "started": True}), flush=True)
        try:
            updates, _ = run()
            finite = all(torch.isfinite(torch.view_as_real(u) if u.is_complex() else u).all() for u in updates.values())
            result = {"case": case, "expect": expect, "outcome": "ok", "finite": bool(finite)}
        except Exception as error:  # noqa: BLE001 - the parent judges every exception
            result = {"case": case, "expect": expect, "outcome": type(error).__name__, "message": str(error)}
            result["clear"] = isinstance(error, (ValueError, TypeError))
        print(json.dumps(result), flush=True)


@pytest.mark.parametrize("target", TARGETS)
def test_hostile_inputs_end_in_a_clear_error_or_a_result(target):
    proc = subprocess.run(
        [sys.executable, "-c", f"from tests.test_fuzz import run_target; run_target({target!r})"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        last = lines[-1]["case"] if lines else "<before the first case>"
        pytest.fail(f"{target}: the process died (exit {proc.returncode}) in case {last}:\n{proc.stderr[-2000:]}")
    results = [line for line in lines if "started" not in line]
    assert len(results) >= 20, results
    wrong = []
    for r in results:
        kind, _, token = r["expect"].partition(":")
        if r["outcome"] == "ok":
            if kind == "error" or not r["finite"]:
                wrong.append(f"{r['case']}: accepted (expected an error naming {token!r})")
        elif kind == "ok":
            wrong.append(f"{r['case']}: {r['outcome']}: {r['message'][:300]}")
        elif not r["clear"] or token not in r["message"]:
            wrong.append(f"{r['case']}: {r['outcome']} does not name {token!r}: {r['message'][:300]}")
    assert not wrong, f"{target}:\n" + "\n".join(wrong)
