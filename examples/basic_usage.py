"""DropGrad in plain PyTorch: wrap the optimizer, train as usual.

Fits a small MLP to a noisy regression task with and without DropGrad and prints the
losses and how many gradient elements DropGrad dropped. Runs in a few seconds.

    python examples/basic_usage.py
"""

from __future__ import annotations

import argparse

import torch

from hf_dropgrad import DropGrad


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    w = torch.linspace(-1, 1, 16)
    y = torch.sin(x @ w).unsqueeze(1) + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def train(drop_rate: float, steps: int, seed: int) -> tuple[float, float, float]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    opt = DropGrad(torch.optim.AdamW(model.parameters(), lr=3e-3), drop_rate=drop_rate)
    x, y = make_data(256, seed)
    x_val, y_val = make_data(1024, seed + 1)
    dropped = total = 0
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        before = [p.grad.clone() for p in model.parameters()]
        opt.step()  # masks the gradients, then AdamW steps
        # The step masks in place, so the zeros it left are visible until zero_grad().
        dropped += sum(
            int(((p.grad == 0) & (b != 0)).sum()) for p, b in zip(model.parameters(), before)
        )
        total += sum(b.numel() for b in before)
        opt.zero_grad()
    with torch.no_grad():
        val = torch.nn.functional.mse_loss(model(x_val), y_val).item()
    return loss.item(), val, dropped / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{'drop_rate':>9} | {'train loss':>10} | {'val loss':>9} | dropped fraction")
    for p in (0.0, 0.1, 0.3):
        train_loss, val_loss, frac = train(p, args.steps, args.seed)
        print(f"{p:>9.1f} | {train_loss:>10.4f} | {val_loss:>9.4f} | {frac:.4f}")
    print("The dropped fraction matches drop_rate; drop_rate=0.0 is the plain AdamW run.")


if __name__ == "__main__":
    main()
