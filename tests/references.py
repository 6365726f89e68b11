"""Imperative reference implementations, written from the papers, for optimisers torch.optim lacks.

Each is a plain torch.optim.Optimizer whose ``step`` is the paper's update rule line by line, so the
parity battery can drive it exactly like a torch.optim class. They share no code with functrain: the
keyword names match functrain's so one set of kwargs drives both.
"""

import torch


def _trust_ratio(numerator: torch.Tensor, param: torch.Tensor, update: torch.Tensor, eps: float) -> float:
    """``numerator / (||update|| + eps)``, or 1 when ``||param||`` or ``||update||`` is 0 (optax's rule)."""
    param_norm, update_norm = param.norm().item(), update.norm().item()
    if param_norm == 0.0 or update_norm == 0.0:
        return 1.0
    return numerator * param_norm / (update_norm + eps)


class Lion(torch.optim.Optimizer):
    """Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            for theta in group["params"]:
                if theta.grad is None:
                    continue
                g = -theta.grad if group["maximize"] else theta.grad
                state = self.state[theta]
                if not state:
                    state["m"] = torch.zeros_like(theta)
                m = state["m"]
                c = beta1 * m + (1 - beta1) * g  # update
                theta.copy_(theta - lr * (torch.sign(c) + wd * theta))
                m.copy_(beta2 * m + (1 - beta2) * g)  # momentum, updated after use
        return None


class Lamb(torch.optim.Optimizer):
    """You et al. 2020, "Large Batch Optimization for Deep Learning", Algorithm 2, as optax.lamb:
    phi is the identity, eps sits outside the square root, and the ratio is 1 when a norm is 0."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, maximize=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for x in group["params"]:
                if x.grad is None:
                    continue
                g = -x.grad if group["maximize"] else x.grad
                state = self.state[x]
                if not state:
                    state["t"], state["m"], state["v"] = 0, torch.zeros_like(x), torch.zeros_like(x)
                state["t"] += 1
                t, m, v = state["t"], state["m"], state["v"]
                m.copy_(beta1 * m + (1 - beta1) * g)
                v.copy_(beta2 * v + (1 - beta2) * g * g)
                m_hat = m / (1 - beta1**t)
                v_hat = v / (1 - beta2**t)
                r = m_hat / (v_hat.sqrt() + eps)
                update = r + wd * x
                x.copy_(x - lr * _trust_ratio(1.0, x, update, 0.0) * update)
        return None


class Lars(torch.optim.Optimizer):
    """You et al. 2017, "Large Batch Training of Convolutional Networks", Algorithm 1, as optax.lars:
    local lr = trust_coefficient * ||w|| / (||g + wd w|| + eps) (1 when a norm is 0); the momentum
    buffer accumulates the scaled steps; optionally Nesterov."""

    def __init__(
        self,
        params,
        lr=1.0,
        weight_decay=0.0,
        momentum=0.9,
        nesterov=False,
        trust_coefficient=0.001,
        eps=0.0,
        maximize=False,
    ):
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            trust_coefficient=trust_coefficient,
            eps=eps,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                g = -w.grad if group["maximize"] else w.grad
                state = self.state[w]
                if not state:
                    state["v"] = torch.zeros_like(w)
                v = state["v"]
                d = g + wd * w
                local_lr = _trust_ratio(group["trust_coefficient"], w, d, group["eps"])
                step = lr * local_lr * d
                v.copy_(mu * v + step)
                w.copy_(w - (step + mu * v if group["nesterov"] else v))
        return None
