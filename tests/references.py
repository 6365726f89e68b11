"""Imperative reference implementations, written from the papers, for optimisers torch.optim lacks.

Each is a plain torch.optim.Optimizer whose ``step`` is the paper's update rule line by line, so the
parity battery can drive it exactly like a torch.optim class.
"""

import torch


class Lion(torch.optim.Optimizer):  # TODO(helper C): Chen et al. 2023, Algorithm 2
    pass


class Lamb(torch.optim.Optimizer):  # TODO(helper C): You et al. 2020, Algorithm 2
    pass


class Lars(torch.optim.Optimizer):  # TODO(helper C): You et al. 2017, Algorithm 1 (optax's lars)
    pass
