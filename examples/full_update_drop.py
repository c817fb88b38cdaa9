"""Full update drop: a dropped element does not move at all in that step.

With plain DropGrad a dropped element still moves (momentum, weight decay). With
``full_update_drop=True`` its value after the step is bit-identical to before. This
script takes one step of SGD with momentum and weight decay both ways and counts the
elements that did not move.

    python examples/full_update_drop.py
"""

from __future__ import annotations

import torch

from hf_dropgrad import DropGrad


def unchanged_fraction(full_update_drop: bool) -> float:
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    opt = DropGrad(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01),
        drop_rate=0.3,
        full_update_drop=full_update_drop,
        seed=0,
    )
    x = torch.randn(32, 256)
    for _ in range(2):  # the second step has momentum
        before = model.weight.detach().clone()
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return (model.weight == before).float().mean().item()


def main() -> None:
    print("drop_rate=0.3, SGD(momentum=0.9, weight_decay=0.01), second step")
    print(f"  plain DropGrad:      {unchanged_fraction(False):.4f} of the weights unchanged")
    print(f"  full_update_drop:    {unchanged_fraction(True):.4f} of the weights unchanged")
    print("With full update drop about 30% of the weights stay exactly where they were.")


if __name__ == "__main__":
    main()
