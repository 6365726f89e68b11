"""Opt-in: compiled steps run each dense float32 CPU GEMM on whichever library is faster for its shape.

ATen sends a float32 ``mm``/``addmm`` on the CPU to MKL's ``sgemm``, and inductor keeps that call in
a compiled graph. MKL picks its code path by CPU vendor: on AMD processors it runs its AVX2 kernels
even where the CPU has AVX-512, while oneDNN (also inside torch, used for bf16 and for inference
with ``freezing``) dispatches on the CPU's features. On the AMD EPYC this project benchmarks on,
oneDNN runs the MLP benchmark's five large GEMMs in 0.43-0.62x of MKL's time, the three with 10
outputs in 0.63-0.99x, and all eight in 0.50-0.52x (the ``mlp-gemms`` group of
``benchmarks/bench_step.py``). For tiny GEMMs its fixed cost per call (~18 us against ~3 us) makes
it slower, and the timing keeps those on MKL.

:data:`GEMM_PASS` is an inductor post-grad pass that times both libraries once per GEMM signature
(shapes, strides), on the machine compiling the step, and rewrites the GEMMs where oneDNN is
faster into the ``functrain::onednn_mm`` op. Both compute the same sums in a different order, so
results agree to float32 rounding, as any two BLAS builds do.

The pass runs only when the user opts in with ``compile={"cpu_gemm": "fastest"}``
(``functrain.step._with_graph_passes``): the choice depends on timings, so two cold compiles (two
processes, or an empty inductor cache) may choose differently where the two times are close, and
their numbers then differ at float32 rounding. A default compiled step keeps every GEMM on ATen and
is bitwise reproducible across processes (DESIGN.md 2a).

oneDNN is reached through a private op, ``torch.ops.mkldnn._linear_pointwise``. Any failure of it
falls back to ATen: a signature whose oneDNN timing raises stays on ATen, and ``onednn_mm`` computes
with ``torch.addmm``/``torch.mm`` if the op is missing or raises.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import Tensor
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

aten = torch.ops.aten

# oneDNN must beat ATen's time by this factor to be chosen: a margin over timing noise, so that a
# shape where the two tie keeps the default library.
_MARGIN = 0.9
# Timed calls per library; the median of them decides. A call this long is timed once: it is
# steady, and a big GEMM timed seven times would add seconds to the compile.
_TIMED_CALLS = 7
_LONG_CALL_SECONDS = 0.01


def _onednn(a: Tensor, b: Tensor, bias: Tensor | None) -> Tensor:
    """``a @ b (+ bias)`` by oneDNN's inner-product primitive (which takes the weight as ``b.T``).
    A private op of torch: it may be missing from a build, or refuse an operand layout."""
    return torch.ops.mkldnn._linear_pointwise(a, b.t(), bias, "none", [], "")


def _aten(a: Tensor, b: Tensor, bias: Tensor | None) -> Tensor:
    return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)


@torch.library.custom_op("functrain::onednn_mm", mutates_args=())
def onednn_mm(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a @ b (+ bias)`` on oneDNN; on ATen (``torch.addmm``/``torch.mm``) if oneDNN's op is
    missing or raises, so a graph compiled where the op worked still runs where it does not."""
    try:
        return _onednn(a, b, bias)
    except Exception:  # whatever the private op raises, ATen computes the product instead
        return _aten(a, b, bias)


@onednn_mm.register_fake
def _(a, b, bias=None):
    return a.new_empty((a.shape[0], b.shape[1]))


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def gemm_operands(node: torch.fx.Node) -> tuple[tuple[Any, Any, Any], list[Tensor | None]] | None:
    """``(a, b, bias)`` of a float32 CPU ``mm``/``addmm`` node with static shapes that oneDNN can
    run as ``a @ b + bias``, with their example values; ``None`` for any other node."""
    if node.op != "call_function":
        return None
    if node.target is aten.mm.default:
        a, b, bias = *node.args, None
    elif node.target is aten.addmm.default and len(node.args) == 3:
        if any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")):
            return None
        bias, a, b = node.args
    else:
        return None
    values = [x.meta.get("val") if isinstance(x, torch.fx.Node) else x for x in (a, b, bias)]
    if not all(isinstance(v, Tensor) for v in values[:2]) or not isinstance(values[2], (Tensor, type(None))):
        return None
    va, vb, vbias = values
    if vbias is not None and tuple(vbias.shape) != (vb.shape[1],):
        return None  # oneDNN adds a bias vector; a full matrix or a broadcast row stays with addmm
    tensors = [v for v in values if v is not None]
    if any(v.device.type != "cpu" or v.dtype != torch.float32 for v in tensors):
        return None
    if any(not isinstance(s, int) for v in tensors for s in (*v.shape, *v.stride())):
        return None  # dynamic shapes: nothing to time
    if va.dim() != 2 or vb.dim() != 2 or 0 in (*va.shape, *vb.shape):
        return None
    return (a, b, bias), values


def _like(value: Tensor) -> Tensor:
    """Random numbers in ``value``'s shape and strides; an expanded (stride-0) operand stays one."""
    storage = 1 + sum((size - 1) * stride for size, stride in zip(value.shape, value.stride()))
    return torch.randn(storage, dtype=value.dtype).as_strided(value.shape, value.stride())


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median_seconds(fn) -> float:
    fn()  # warm-up: oneDNN builds and caches its primitive on the first call
    first = _seconds(fn)
    if first >= _LONG_CALL_SECONDS:
        return first
    return statistics.median([first, *(_seconds(fn) for _ in range(_TIMED_CALLS - 1))])


_CHOICES: dict[tuple, bool] = {}


def onednn_is_faster(a: Tensor, b: Tensor, bias: Tensor | None) -> bool:
    """Whether oneDNN runs ``a @ b (+ bias)`` for tensors of these shapes and strides in at most
    ``_MARGIN`` of ATen's time on this machine (measured once per signature per process). ``False``
    when oneDNN's op fails on them (missing, or refusing the layout): such a GEMM stays on ATen."""
    key = tuple((tuple(t.shape), tuple(t.stride())) if t is not None else None for t in (a, b, bias))
    if key not in _CHOICES:
        a, b = _like(a), _like(b)
        bias = None if bias is None else _like(bias)
        with torch.no_grad():
            try:
                onednn = _median_seconds(lambda: _onednn(a, b, bias))
            except Exception:  # any failure of the private op keeps the GEMM on ATen
                _CHOICES[key] = False
            else:
                _CHOICES[key] = onednn <= _MARGIN * _median_seconds(lambda: _aten(a, b, bias))
    return _CHOICES[key]


class FasterGemms(CustomGraphPass):
    """Rewrites each GEMM that oneDNN runs faster than ATen into ``functrain::onednn_mm``."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        if not onednn_available():
            return
        for node in list(graph.nodes):
            found = gemm_operands(node)
            if found is None or not onednn_is_faster(*found[1]):
                continue
            operands = found[0]
            with graph.inserting_before(node):
                replacement = graph.call_function(torch.ops.functrain.onednn_mm.default, operands)
            replacement.meta.update(node.meta)
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))

    def __repr__(self) -> str:  # the same in every process: a precompiled step's key holds it
        return "functrain._gemm.GEMM_PASS"


GEMM_PASS = FasterGemms()
