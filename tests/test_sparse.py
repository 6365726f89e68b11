"""Sparse gradients (torch.optim.SparseAdam's input) are refused by name, with what to use instead.

functrain has no sparse-gradient path: every transform does dense arithmetic, and before this check a
sparse gradient either failed inside a kernel (``aten::lerp`` / ``_fused_adamw_`` on SparseCPU) or,
through ops that accept it, returned a sparse update (SGD) without a word. Both routes, an optimiser's
``update`` given a sparse tensor and ``make_train_step`` on ``nn.Embedding(sparse=True)``, must name the
gradient and say what to use.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import functrain as ft

from .harness import make_params
from .registry import SPECS

MESSAGE = r"is a sparse tensor \(torch.sparse_coo\).*nn.Embedding\(sparse=False\)"


def sparse_like(t: torch.Tensor) -> torch.Tensor:
    """A COO tensor of ``t``'s shape holding its values (what an nn.Embedding(sparse=True) backward returns)."""
    return torch.ones_like(t).to_sparse()


@pytest.mark.parametrize("spec", [pytest.param(spec, id=spec.name) for spec in SPECS])
def test_every_optimiser_refuses_a_sparse_gradient_by_name(spec):
    tx = spec.make(**spec.cases()[0])
    params = make_params(matrices_only=spec.matrices_only)
    state = tx.init(params)
    key = next(iter(params))
    grads = {k: (sparse_like(p) if k == key else torch.ones_like(p)) for k, p in params.items()}
    with pytest.raises(ValueError, match=rf"\['{key}'\] " + MESSAGE):
        tx.update(grads, state, params)
    with pytest.raises(ValueError, match=rf"\['{key}'\] " + MESSAGE):
        ft.update_and_apply(tx, grads, state, params)  # the declared fast paths (AdamW's fused kernel) too


def test_apply_updates_and_chain_refuse_sparse_trees():
    params = {"w": torch.zeros(4, 3)}
    with pytest.raises(ValueError, match=r"updates at \['w'\] " + MESSAGE):
        ft.apply_updates(params, {"w": sparse_like(params["w"])})
    tx = ft.chain(ft.transforms.scale(2.0))  # a chain with no state of its own checks its input too
    with pytest.raises(ValueError, match=MESSAGE):
        tx.update({"w": sparse_like(params["w"])}, tx.init(params), params)


class Bag(nn.Module):
    def __init__(self, sparse: bool):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 4, sparse=sparse)
        self.head = nn.Linear(4, 1)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


def loss_fn(model, batch):
    ids, y = batch
    return ((model(ids) - y) ** 2).mean()


BATCH = (torch.tensor([[1, 2, 3], [3, 4, 5]]), torch.tensor([[1.0], [-1.0]]))


@pytest.mark.parametrize(
    "tx",
    [ft.adamw(lr=0.1), ft.sgd(lr=0.1), ft.adam(lr=0.1, amsgrad=True)],
    ids=["adamw", "sgd", "adam-amsgrad"],  # named: xdist workers must collect the same ids
)
def test_train_step_on_a_sparse_embedding_names_the_parameter(tx):
    model = Bag(sparse=True)
    state = ft.TrainState.create(model, tx)
    before = {k: v.clone() for k, v in state.params.items()}
    step = ft.make_train_step(model, loss_fn, tx)
    with pytest.raises(ValueError, match=r"\['emb.weight'\] " + MESSAGE):
        step(state, BATCH)
    for k, v in state.params.items():  # nothing was written
        assert torch.equal(v, before[k])


@pytest.mark.slow
def test_compiled_train_step_on_a_sparse_embedding_gives_the_eager_message():
    torch._dynamo.reset()
    model = Bag(sparse=True)
    tx = ft.adamw(lr=0.1)
    step = ft.make_train_step(model, loss_fn, tx, compile=True)
    with pytest.raises(ValueError, match=r"\['emb.weight'\] " + MESSAGE):
        step(ft.TrainState.create(model, tx), BATCH)


def test_the_dense_embedding_it_points_to_trains_as_the_dense_gradient_says():
    """The advice works: nn.Embedding(sparse=False) steps like torch.optim.AdamW on the same model."""
    model = Bag(sparse=False)
    tx = ft.adamw(lr=0.1)
    state, _ = ft.make_train_step(model, loss_fn, tx)(ft.TrainState.create(model, tx), BATCH)
    reference = Bag(sparse=False)
    opt = torch.optim.AdamW(reference.parameters(), lr=0.1)
    loss_fn(reference, BATCH).backward()
    opt.step()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-6, atol=1e-7)
