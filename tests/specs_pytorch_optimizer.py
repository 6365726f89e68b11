"""Registry entries for ADOPT, AdEMAMix and MARS (references: pytorch-optimizer 4.1.0) and the cautious
wrapper (reference: the paper's C-AdamW, written out below)."""

from __future__ import annotations

import math

import pytorch_optimizer
import torch

import functrain as ft
from functrain import Hyperparameter

from .registry import Spec, grid


def _adopt_reference(params, clip_exp=0.25, decoupled_weight_decay=False, **kwargs):
    """pytorch-optimizer's ADOPT with the paper's clip schedule: it calls ``clip_lambda`` with the 1-based
    step count, the paper (and the authors' code) clip step t with t**p, t the steps done before it."""
    clip = None if clip_exp is None else (lambda step: (step - 1) ** clip_exp)
    return pytorch_optimizer.ADOPT(
        params, clip_lambda=clip, weight_decouple=decoupled_weight_decay, foreach=False, **kwargs
    )


def _ademamix_reference(params, betas=(0.9, 0.999), beta3=0.9999, decoupled_weight_decay=True, **kwargs):
    """pytorch-optimizer's AdEMAMix: its ``betas`` triple is ft.ademamix's ``betas`` pair and ``beta3``, its
    ``weight_decouple`` ft.ademamix's ``decoupled_weight_decay``."""
    return pytorch_optimizer.AdEMAMix(
        params, betas=(*betas, beta3), weight_decouple=decoupled_weight_decay, foreach=False, **kwargs
    )


class MarsAdamW(torch.optim.Optimizer):
    """MARS-AdamW as the authors' code steps it (github.com/AGI-Arena/MARS, ``MARS/optimizers/mars.py``,
    ``update_fn`` with ``mars_type="mars-adamw"``, ``is_approx=True``), line by line, with two choices of
    pytorch-optimizer 4.1.0's ``MARS``: tensors of two or more dimensions take MARS (the authors' code
    tests ``ndim == 2``, sending 3-D and 4-D weights to AdamW), and ``maximize`` negates the gradient.

    pytorch-optimizer departs from the paper (Algorithm 2: ``m_hat / (sqrt(v_hat) + eps)``) and the
    authors' code in its denominator, ``(sqrt(v + 1e-15) + eps) / sqrt(1 - b2^t)``: eps scaled by the bias
    correction, and 1e-15 under the root (tests/test_adopt_ademamix_mars.py compares with it at eps=0)."""

    def __init__(
        self,
        params,
        lr=3e-3,
        betas=(0.95, 0.99),
        gamma=0.025,
        optimize_1d=False,
        lr_1d=3e-3,
        betas_1d=(0.9, 0.95),
        weight_decay=0.0,
        weight_decay_1d=0.1,
        eps=1e-8,
        maximize=False,
    ):
        defaults = dict(lr=lr, betas=betas, gamma=gamma, weight_decay=weight_decay, eps=eps, maximize=maximize)
        super().__init__(params, defaults)
        # As the authors: the vectors' rate is lr_1d / lr of the constructor's lr, times the group's lr.
        self.optimize_1d, self.lr_1d_factor = optimize_1d, lr_1d / lr
        self.betas_1d, self.weight_decay_1d = betas_1d, weight_decay_1d

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd, (beta1, beta2), eps, gamma = (group[k] for k in ("lr", "weight_decay", "betas", "eps", "gamma"))
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if not state:
                    state["step"], state["last_grad"] = 0, torch.zeros_like(p)
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                state["step"] += 1
                step, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
                if self.optimize_1d or grad.ndim >= 2:
                    c_t = (grad - state["last_grad"]).mul(gamma * (beta1 / (1.0 - beta1))).add(grad)
                    c_t_norm = torch.norm(c_t)
                    if c_t_norm > 1.0:
                        c_t = c_t / c_t_norm
                    exp_avg.mul_(beta1).add_(c_t, alpha=1.0 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(c_t, c_t, value=1.0 - beta2)
                    bias_correction1, bias_correction2 = 1.0 - beta1**step, 1.0 - beta2**step
                    denom = exp_avg_sq.sqrt().mul(1 / math.sqrt(bias_correction2)).add(eps).mul(bias_correction1)
                    p.add_(-lr * torch.mul(p, wd).add(exp_avg.div(denom)))
                else:
                    beta1_1d, beta2_1d = self.betas_1d
                    exp_avg.mul_(beta1_1d).add_(grad, alpha=1.0 - beta1_1d)
                    exp_avg_sq.mul_(beta2_1d).addcmul_(grad, grad, value=1.0 - beta2_1d)
                    bias_correction1, bias_correction2 = 1.0 - beta1_1d**step, 1.0 - beta2_1d**step
                    denom = exp_avg_sq.sqrt().mul(1 / math.sqrt(bias_correction2)).add(eps).mul(bias_correction1)
                    p.add_(-lr * self.lr_1d_factor * torch.mul(p, self.weight_decay_1d).add(exp_avg.div(denom)))
                state["last_grad"] = grad.clone()
        return None


class CautiousAdamW(torch.optim.Optimizer):
    """Liang et al. 2024, "Cautious Optimizers", C-AdamW: AdamW whose step keeps only the components where
    the Adam direction and the gradient agree in sign, rescaled by the mean of that mask per tensor, floored
    at 1e-3 (the authors' ``c_adamw.py`` and timm), with the paper's eps placement
    ``m_hat / (sqrt(v_hat) + eps)``; the decoupled weight decay is applied outside the mask, before the step."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["t"], state["m"], state["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                state["t"] += 1
                t, m, v = state["t"], state["m"], state["v"]
                p.mul_(1 - lr * wd)
                m.copy_(beta1 * m + (1 - beta1) * g)
                v.copy_(beta2 * v + (1 - beta2) * g * g)
                u = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
                phi = (u * g > 0).to(p.dtype)
                p.sub_(lr * u * phi / phi.mean().clamp(min=1e-3))
        return None


@ft.wrappers.schedulable
def cautious(
    lr: Hyperparameter = 1e-3,
    betas: tuple[Hyperparameter, Hyperparameter] = (0.9, 0.999),
    eps: Hyperparameter = 1e-8,
    weight_decay: Hyperparameter = 0.0,
) -> ft.GradientTransformation:
    """ft.cautious(ft.adamw(...)) with C-AdamW's keywords: the battery's handle on the wrapper. Schedulable, so
    that its state names it ("ft.cautious") and ``set_hyperparams`` runs these checks. The decay, inside
    adamw, is masked with the rest: this is the paper's C-AdamW for ``weight_decay=0`` (see ft.cautious)."""
    return ft.cautious(ft.adamw(lr, betas, eps, weight_decay))


SPECS = [
    Spec(
        "adopt",
        ft.adopt,
        _adopt_reference,
        [
            {},  # clip_exp=None (no clipping): tests/test_adopt_ademamix_mars.py, against stock pytorch-optimizer
            {"clip_exp": 0.333, "betas": (0.5, 0.9), "eps": 1e-3},
            {"weight_decay": 0.1},
            {"weight_decay": 0.1, "decoupled_weight_decay": True},
            {"maximize": True},
        ],
        base={"lr": 0.01},
        # beta2 = 0.9999 keeps v near Rosenbrock's steep first gradients for thousands of steps
        converge={"lr": 0.01, "betas": (0.9, 0.99)},
        bad=[
            ({"lr": -1.0}, "lr"),
            ({"betas": (1.0, 0.9999)}, "betas[0]"),
            ({"eps": -1.0}, "eps"),
            ({"clip_exp": -0.5}, "clip_exp"),
            ({"weight_decay": -0.1}, "weight_decay"),
        ],
    ),
    Spec(
        "ademamix",
        ft.ademamix,
        _ademamix_reference,
        [
            {},
            {"t_alpha_beta3": 10},
            {"t_alpha_beta3": 10, "alpha": 8.0, "betas": (0.8, 0.99), "beta3": 0.999},
            {"weight_decay": 0.1},
            {"weight_decay": 0.1, "decoupled_weight_decay": False},
            {"maximize": True},
        ],
        base={"lr": 0.01},
        converge={"lr": 0.02},
        bad=[
            ({"lr": -1.0}, "lr"),
            ({"beta3": 1.5}, "beta3"),
            ({"alpha": -1.0}, "alpha"),
            ({"t_alpha_beta3": 0}, "t_alpha_beta3"),
            ({"betas": (0.9, 1.0)}, "betas[1]"),
        ],
    ),
    Spec(
        "mars",
        ft.mars,
        MarsAdamW,
        [
            # First: the battery schedules `lr` only, which the reference's vectors follow and ft.mars's
            # lr_1d does not (a hyperparameter of its own; test_adopt_ademamix_mars.py schedules both).
            {"optimize_1d": True},
            {},
            {"gamma": 0.1, "weight_decay": 0.1, "weight_decay_1d": 0.0},
            {"gamma": 0.0, "lr_1d": 0.02, "betas_1d": (0.8, 0.9)},
            {"maximize": True, "betas": (0.9, 0.999)},
        ],
        base={"lr": 0.01},
        converge={"lr": 0.02, "optimize_1d": True},
        bad=[
            ({"lr": -1.0}, "lr"),
            ({"gamma": -0.1}, "gamma"),
            ({"lr_1d": -1.0}, "lr_1d"),
            ({"betas_1d": (0.9, 1.0)}, "betas_1d[1]"),
            ({"weight_decay_1d": -0.1}, "weight_decay_1d"),
        ],
    ),
    Spec(
        "cautious",
        cautious,
        CautiousAdamW,
        grid(betas=[(0.9, 0.999), (0.8, 0.99)], eps=[1e-8, 1e-3]),
        base={"lr": 0.01, "weight_decay": 0.0},
        converge={"lr": 0.02},
        bad=[({"lr": -1.0}, "lr"), ({"betas": (1.0, 0.999)}, "betas[0]"), ({"eps": -1.0}, "eps")],
        wraps=ft.cautious,
    ),
]
