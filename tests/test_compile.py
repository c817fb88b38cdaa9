"""``torch.compile`` sees the masking as one opaque op (hf_dropgrad/kernels/ops.py).

``functional.mask_`` calls ``hf_dropgrad::mask_``, whose fake implementation lets dynamo trace
it without a graph break (``fullgraph=True``) and inductor keep it as an extern call; the
compiled function must give eager's bits exactly. Inductor on CPU compiles C++, so this needs a
compiler (present wherever the C++ kernel builds).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from hf_dropgrad import functional as F
from hf_dropgrad.kernels import cpp
from tests import stream_oracle as oracle

if cpp.load() is None:
    pytest.skip("no C++ kernel (and so no compiler for inductor) here", allow_module_level=True)

KEYS = [5, 2**64 - 3]
THRESHOLDS = [6554, 30000]
SCALES = [F.keep_scale(t) for t in THRESHOLDS]


def step(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A masking between two computations, as in a compiled training step."""
    a = a * 2
    F.mask_([a, b], KEYS, THRESHOLDS, SCALES, [0, 4097])
    return a + 1, b


def test_compiled_mask_equals_eager_bit_for_bit() -> None:
    torch._dynamo.reset()
    a = oracle.grad(10000, torch.float32, seed=1)
    b = oracle.grad(333 * 7, torch.bfloat16, seed=2).view(333, 7)
    eager = step(a.clone(), b.clone())
    compiled = torch.compile(step, fullgraph=True)(a.clone(), b.clone())
    for got, want in zip(compiled, eager):
        assert torch.equal(oracle.raw(got), oracle.raw(want))
    # and it did mask: the op ran, not a no-op fake
    assert (compiled[1] == 0).sum() > (b == 0).sum() + 100


def test_the_op_is_one_node_of_the_graph() -> None:
    torch._dynamo.reset()
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Callable[..., object]:
        graphs.append(gm)
        return gm.forward

    a, b = torch.ones(5000), torch.ones(70, dtype=torch.bfloat16)
    torch.compile(step, backend=backend, fullgraph=True)(a, b)
    (graph,) = graphs
    op = torch.ops.hf_dropgrad.mask_
    targets = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert sum(t in (op, op.default) for t in targets) == 1, targets
