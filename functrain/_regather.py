"""A compiled sharded step's memory: each gathered parameter lives only while its block runs.

A compiled sharded step is one graph: the forward pass, the backward pass that dynamo traces
through ``torch.autograd.grad``, and the update. AOTAutograd sees no forward/backward split in
it, so its partitioner, which decides what a backward recomputes, never runs, and autograd keeps
every whole parameter a forward op saved (a linear layer's weight) until the backward pass uses it:
the whole model at once, as if unsharded.

:data:`REGATHER_PASS`, an inductor post-grad pass, rewrites the graph as FSDP2 and SimpleFSDP
run: a block's all-gather is issued just before the block's first use of it, and the backward
pass's uses of a gathered parameter read a second all-gather of the same shards, issued just
before the block's backward pass, instead of the forward's copy; and each reduce-scatter of a
block's gradients is waited for when the next is issued, which frees the block's whole gradients
(a collective's input lives until its wait, and traced, the wait sits in the update at the end).
A gather is exact and only collectives' places change, so the step's numbers do not; it costs
one more all-gather per block, as FSDP2's backward does.

The pass works on the graph's structure, not on names: a *gather* is an ``all_gather_into_tensor``
whose input is computed from the graph's inputs alone (the step's shards); its *copies* are the
view, split and clone ops that cut each parameter out of the gathered buffer; its *uses* are
every other op that reads a copy. A use of a parameter that depends on another use of the same
parameter is a backward use (a linear's ``grad_input = grad_output @ W`` depends on its forward
``x @ W.T``); only those read the second gather. Every rank compiles the same graph with the
same pass, so the ranks issue the same collectives in the same order.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

aten = torch.ops.aten

# Ops that only cut a parameter out of the gathered buffer or lay it out (copies included):
# recomputing them costs no more than the gather itself.
_COPY_OPS = {
    operator.getitem,
    aten.alias.default,
    aten.as_strided.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.expand.default,
    aten.permute.default,
    aten.reshape.default,
    aten.select.int,
    aten.slice.Tensor,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.t.default,
    aten.transpose.int,
    aten.unsqueeze.default,
    aten.view.default,
    aten._unsafe_view.default,
}


def _functional_collective(name: str) -> Any:
    """``torch.ops._c10d_functional.<name>.default``; None where this torch has no such op (then
    the pass finds nothing to move, and the graph runs as traced)."""
    return getattr(getattr(torch.ops._c10d_functional, name, None), "default", None)


def _gathers(graph: torch.fx.Graph) -> list[tuple[set[torch.fx.Node], torch.fx.Node]]:
    """Each gather of the graph's inputs: (the nodes from the inputs to its wait; the wait)."""
    all_gather = _functional_collective("all_gather_into_tensor")
    wait = _functional_collective("wait_tensor")
    out = []
    for node in graph.nodes:
        if node.target is not wait or getattr(node.args[0], "target", None) is not all_gather:
            continue
        upstream = _ancestors(node)
        if upstream is not None:
            out.append((upstream, node))
    return out


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node] | None:
    """``node`` and every node it is computed from, short of the graph's inputs; None if any of
    them reads something other than inputs and constants (a gather of a computed tensor)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen or n.op == "placeholder" or n.op == "get_attr":
            continue
        if n.op != "call_function":
            return None
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen


def _position(graph: torch.fx.Graph) -> Any:
    index = {n: i for i, n in enumerate(graph.nodes)}
    return index.__getitem__


def _copies_and_uses(wait: torch.fx.Node) -> tuple[dict[torch.fx.Node, torch.fx.Node], list[torch.fx.Node]]:
    """The copy ops below ``wait``, each mapped to the parameter it belongs to (its output of the
    bucket's split, or ``wait`` above the split and for a bucket of one); and the uses, every
    other op that reads ``wait`` or a copy."""
    parameter_of: dict[torch.fx.Node, torch.fx.Node] = {wait: wait}
    uses: dict[torch.fx.Node, None] = {}  # (ordered: the graph must come out the same on every rank)
    todo = [wait]
    while todo:
        n = todo.pop()
        for user in n.users:
            if user in parameter_of or user in uses:
                continue
            reads_copies_only = all(i in parameter_of or i.op != "call_function" for i in user.all_input_nodes)
            if user.target in _COPY_OPS and reads_copies_only:
                parameter_of[user] = user if n.target in _SPLITS else parameter_of[n]
                todo.append(user)
            else:
                uses[user] = None
    return parameter_of, list(uses)


_SPLITS = (aten.split.Tensor, aten.split_with_sizes.default)


def _backward_uses(
    parameter_of: dict[torch.fx.Node, torch.fx.Node], uses: list[torch.fx.Node], position: Any
) -> list[torch.fx.Node]:
    """The uses that depend on an earlier use of the same parameter: the backward pass's."""
    by_parameter: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for use in uses:
        for parameter in dict.fromkeys(parameter_of[i] for i in use.all_input_nodes if i in parameter_of):
            by_parameter.setdefault(parameter, []).append(use)
    late: dict[torch.fx.Node, None] = {}
    for readers in by_parameter.values():
        readers.sort(key=position)
        late.update(dict.fromkeys(_computed_from(readers[0], readers[1:], position)))
    return sorted(late, key=position)


def _computed_from(node: torch.fx.Node, later: list[torch.fx.Node], position: Any) -> list[torch.fx.Node]:
    """Those of ``later`` (nodes after ``node``, in graph order) that read ``node``'s result,
    directly or not. The search stops at the last of them: a model's every parameter searches the
    graph between its forward and its backward use, not the whole graph."""
    if not later:
        return []
    last, left = position(later[-1]), set(later)
    seen: set[torch.fx.Node] = set()
    todo = [node]
    while todo and left:
        for user in todo.pop().users:
            if user not in seen and position(user) <= last:
                seen.add(user)
                left.discard(user)
                todo.append(user)
    return [n for n in later if n in seen]


def regather(graph: torch.fx.Graph) -> None:
    """Moves each gather of the step's shards to just before its first use, gives the backward
    uses a second gather of their own, and waits for each reduce-scatter by the next (see the
    module's docstring)."""
    _gather_where_used(graph)
    _wait_for_each_reduction_by_the_next(graph)
    graph.lint()


def _wait_for_each_reduction_by_the_next(graph: torch.fx.Graph) -> None:
    """Each reduce-scatter's wait moved up to just before the next reduce-scatter is issued.

    The backward of a gather is a reduce-scatter of the unit's whole gradients, and a collective's
    input lives until its wait. Traced, each wait sits where the shard is first read, in the update
    at the end, so every whole gradient of the model would be alive together at the end of the
    backward pass. Waiting by the next one keeps one in flight (its transfer can overlap the next
    unit's backward, as FSDP2's does) and frees each unit's whole gradients a unit later."""
    reduce_scatter = _functional_collective("reduce_scatter_tensor")
    wait = _functional_collective("wait_tensor")
    issued = [n for n in graph.nodes if n.target is reduce_scatter]
    position = _position(graph)
    for this, following in zip(issued, issued[1:]):
        for user in list(this.users):
            if user.target is wait and position(user) > position(following):
                following.prepend(user)


def _gather_where_used(graph: torch.fx.Graph) -> None:
    """Each gather of the step's shards moved to just before its first use, and a second gather
    for the backward uses."""
    for upstream, wait in _gathers(graph):
        parameter_of, uses = _copies_and_uses(wait)
        if not uses:
            continue
        position = _position(graph)
        late = _backward_uses(parameter_of, uses, position)
        second = _second_gather(graph, sorted(upstream, key=position), parameter_of, late) if late else []
        _sink(graph, [*upstream, *parameter_of, *second])


def _sink(graph: torch.fx.Graph, nodes: list[torch.fx.Node]) -> None:
    """Each of ``nodes`` moved down to just before its earliest reader, the latest first (so a
    node's readers among them are in their places when it moves). A node never passes one of its
    readers, whichever other nodes read it (a view of a shard that two gathers share)."""
    index = {n: float(i) for i, n in enumerate(graph.nodes)}
    for n in sorted(set(nodes), key=index.__getitem__, reverse=True):
        if not n.users:
            continue
        reader = min(n.users, key=index.__getitem__)
        reader.prepend(n)
        index[n] = (index.get(n.prev, -1.0) + index[reader]) / 2


def _second_gather(
    graph: torch.fx.Graph,
    upstream: list[torch.fx.Node],
    parameter_of: dict[torch.fx.Node, torch.fx.Node],
    late: list[torch.fx.Node],
) -> list[torch.fx.Node]:
    """A copy of the gather ``upstream`` and of the copy ops that the ``late`` uses read, placed
    before the first of them; the late uses read it instead, and copy ops left unread go (from
    the graph and from ``parameter_of``). Returns the copies."""
    position = _position(graph)
    needed: set[torch.fx.Node] = set()
    todo = [i for use in late for i in use.all_input_nodes if i in parameter_of]
    while todo:
        n = todo.pop()
        if n not in needed:
            needed.add(n)
            todo.extend(i for i in n.all_input_nodes if i in parameter_of)
    copied: dict[torch.fx.Node, torch.fx.Node] = {}
    with graph.inserting_before(late[0]):
        for n in sorted({*upstream, *needed}, key=position):
            copied[n] = graph.node_copy(n, lambda i: copied.get(i, i))
    for use in late:
        for i in use.all_input_nodes:
            if i in copied:
                use.replace_input_with(i, copied[i])
    for n in sorted(parameter_of, key=position, reverse=True):
        if not n.users and n is not upstream[-1]:
            graph.erase_node(n)
            del parameter_of[n]
    return list(copied.values())


class _RegatherPass(CustomGraphPass):
    """:func:`regather` as an inductor custom pass (its uuid keys inductor's cache on this file)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        regather(graph)

    def uuid(self) -> Any:
        return get_hash_for_files((__file__,))

    def __repr__(self) -> str:  # the same in every process: a precompiled step's key holds it
        return "functrain._regather.REGATHER_PASS"


REGATHER_PASS = _RegatherPass()
