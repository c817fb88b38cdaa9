"""DropGrad with an LR scheduler and a drop-rate scheduler.

DropGrad is a torch ``Optimizer`` that shares the inner optimizer's ``param_groups``, so
any LR scheduler takes it. A drop-rate scheduler is passed to DropGrad, which steps it
after every optimizer step. Prints the learning rate and the drop rate of each step.

    python examples/lr_scheduler_integration.py
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR

from hf_dropgrad import DropGrad, LinearDropRateScheduler


def main() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    steps = 10
    opt = DropGrad(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        drop_rate_scheduler=LinearDropRateScheduler(0.3, 0.0, num_steps=steps),
    )
    lr_sched = CosineAnnealingLR(opt, T_max=steps)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    print(f"{'step':>4} | {'lr':>7} | {'drop rate':>9} | loss")
    for step in range(steps + 1):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        lr = lr_sched.get_last_lr()[0]
        print(f"{step:>4} | {lr:>7.4f} | {opt.drop_rate:>9.3f} | {loss.item():.4f}")
        opt.step()
        lr_sched.step()
        opt.zero_grad()
    print("The drop rate falls linearly from 0.3 to exactly 0.0 at step 10; lr follows a cosine.")


if __name__ == "__main__":
    main()
