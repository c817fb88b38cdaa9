"""The Triton backend (hf_dropgrad/kernels/triton.py) against the stream's definition.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
``TRITON_INTERPRET=1`` before Triton is imported); with one, compiled, on CUDA tensors. The
interpreter is slow, so the sizes stay small but cover every case of the layout: one element,
a partial lane, a whole chunk, a chunk and one, several chunks, and offsets that start mid-lane
and mid-chunk.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tests import stream_oracle as oracle
from tests.stream_oracle import DTYPES, KEYS, PACK_DTYPES

K = pytest.importorskip("hf_dropgrad.kernels.triton", reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not K.interpreting():
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

# The interpreter computes in numpy: inf * 0 and float16 overflow warn there, as intended.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

NUMELS = [1, 1000, 4096, 4097, 3 * 4096 + 5]
OFFSETS = [0, 1, 1023, 4095, 5000, 2**40 + 3]
THRESHOLDS = [0, 1, 6554, 65535, 65536]


def _on(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", NUMELS)
def test_mask_matches_the_definition(numel: int, dtype: torch.dtype) -> None:
    base = oracle.grad(numel, dtype, seed=numel)
    for key, t in itertools.product(KEYS[::2], THRESHOLDS):
        g = _on(base.clone())
        K.mask_([g], [key], [t], [oracle.scale(t)])
        oracle.assert_matches(g, oracle.expected(base, key, t, oracle.scale(t)), f"{key} {t}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mask_with_an_offset_matches_the_definition(dtype: torch.dtype) -> None:
    for numel, offset in itertools.product((1, 3000, 4097), OFFSETS):
        base = oracle.grad(numel, dtype, seed=offset % 101)
        for key, t in ((2**64 - 1, 65535), (2**63, 26214)):
            g = _on(base.clone())
            K.mask_([g], [key], [t], [oracle.scale(t)], [offset])
            want = oracle.expected(base, key, t, oracle.scale(t), offset)
            oracle.assert_matches(g, want, f"numel={numel} offset={offset} key={key}")


def test_a_list_of_tensors_equals_one_call_each() -> None:
    grads = [_on(oracle.grad(n, dt, seed=n)) for n, dt in zip((5, 5000, 9000), DTYPES)]
    keys, thresholds, offsets = [1, 2**63 + 1, 99], [6554, 32768, 65535], [0, 7, 4096]
    scales = [oracle.scale(t) for t in thresholds]
    singles = [g.clone() for g in grads]
    for args in zip(singles, keys, thresholds, scales, offsets):
        K.mask_(*([a] for a in args))
    K.mask_(grads, keys, thresholds, scales, offsets)
    for a, b in zip(grads, singles):
        assert torch.equal(oracle.raw(a), oracle.raw(b))


@pytest.mark.parametrize("dtype", PACK_DTYPES, ids=str)
def test_gather_and_scatter_dropped_match_the_definition(dtype: torch.dtype) -> None:
    for numel, offset in itertools.product((0, 1, 4097, 9001), (0, 3, 4095)):
        for key, t in ((7, 6554), (2**64 - 1, 65536), (2**63, 0)):
            dropped = torch.from_numpy(oracle.numpy_bits(key, numel, offset) < t)
            x = oracle.filled(numel, dtype, seed=numel + t)
            values, starts = K.gather_dropped(_on(x), key, t, offset)
            assert values.dtype == dtype and starts.numel() == K.num_chunks(numel, offset) + 1
            assert torch.equal(oracle.raw(values.cpu()), oracle.raw(x)[dropped]), (numel, t)
            target = oracle.filled(numel, dtype, seed=1)
            want = torch.where(dropped, oracle.raw(x), oracle.raw(target))
            target = _on(target)
            K.scatter_dropped(target, key, t, values, starts, offset)
            assert torch.equal(oracle.raw(target.cpu()), want), (numel, offset, t)


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        K.mask_([_on(torch.ones(4, dtype=torch.float64))], [0], [1], [1.0])
    with pytest.raises(ValueError, match="contiguous"):
        K.mask_([_on(torch.ones(4, 4)).t()], [0], [1], [1.0])
    with pytest.raises(ValueError, match="threshold"):
        K.mask_([_on(torch.ones(4))], [0], [65537], [1.0])
    with pytest.raises(ValueError, match="offsets\\[0\\]"):
        K.mask_([_on(torch.ones(4))], [0], [1], [1.0], [-1])
    with pytest.raises(ValueError, match="differ in length"):
        K.mask_([_on(torch.ones(4))], [0, 1], [1], [1.0])
    values, starts = K.gather_dropped(_on(torch.ones(5000)), 3, 6554)
    with pytest.raises(ValueError, match="starts"):
        K.scatter_dropped(_on(torch.ones(5000)), 3, 6554, values, starts[:-1])


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the interpreter's device rule")
def test_cpu_tensors_are_taken_only_by_the_interpreter() -> None:
    assert K.interpreting()
    g = torch.ones(10)
    K.mask_([g], [1], [65536], [0.0])
    assert not g.any()
    assert np.array_equal(g.numpy(), np.zeros(10, dtype=np.float32))


def test_one_launch_finds_every_tensor_of_a_long_list() -> None:
    """The binary search over the table: many tensors, empty and skipped ones among them."""
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(0, 9000, (37,), generator=gen).tolist()
    sizes[3], sizes[20] = 0, 1
    grads = [oracle.grad(n, torch.float32, seed=n) for n in sizes]
    keys = [2**64 - 1 - 31 * i for i in range(len(sizes))]
    thresholds = [0 if i % 9 == 4 else 6554 * (1 + i % 9) for i in range(len(sizes))]
    offsets = [(4096 * i + 17 * i) % 10000 for i in range(len(sizes))]
    batch = [_on(g.clone()) for g in grads]
    K.mask_(batch, keys, thresholds, [oracle.scale(t) for t in thresholds], offsets)
    for got, g, key, t, off in zip(batch, grads, keys, thresholds, offsets):
        oracle.assert_matches(got, oracle.expected(g, key, t, oracle.scale(t), off), f"{key}")
