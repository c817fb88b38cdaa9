"""Small shared builders for the tests."""

from __future__ import annotations

import torch

from hf_dropgrad import functional as F


def tiny_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
        torch.nn.Linear(16, 3),
    )


def batch(step: int, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def loss_of(model: torch.nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step)
    return torch.nn.functional.cross_entropy(model(x), y)


def backward(model: torch.nn.Module, step: int) -> torch.Tensor:
    loss = loss_of(model, step)
    loss.backward()
    return loss


def reference_mask_(params: list[torch.Tensor], rates: list[float], seed: int, step: int) -> None:
    """Mask grads the slow, obvious way (positions = order in ``params``)."""
    for index, (p, rate) in enumerate(zip(params, rates)):
        t = F.drop_threshold(rate)
        if p.grad is not None and t:
            F.mask_reference_(p.grad, F.derive_key(seed, step, index), t, F.keep_scale(t))
