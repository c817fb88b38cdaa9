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
from tests.triton_launches import observe

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
    """The program map: many tensors, empty and skipped ones among them."""
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


# ------------------------------------------------------------------ aligned and generic paths
def _views(dtype: torch.dtype, layout: list[tuple[int, int]]) -> tuple[torch.Tensor, list]:
    """One buffer and views of it at (element start, numel): storage offsets move the pointer."""
    total = max(start + n for start, n in layout) + 8
    buffer = _on(oracle.grad(total, dtype, seed=total))
    return buffer, [buffer[start : start + n] for start, n in layout]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_aligned_and_generic_paths_match_the_definition(dtype: torch.dtype) -> None:
    """16-byte aligned pointer, offset and size take the 128-bit path; anything odd the generic
    one; both in one call, with every threshold class and keys next to 2**64."""
    v = 16 // torch.empty((), dtype=dtype).element_size()  # elements per 128 bits
    # (view start, numel, stream offset): aligned ones first, then an odd pointer, an odd size,
    # an odd offset, and a tiny tensor.
    layout = [(0, 3 * 4096, 0), (4 * 4096, 4096 + 2 * v, 4096 - v), (9 * 4096, 64 * v, 2**40),
              (11 * 4096 + 1, 4096, 0), (13 * 4096, 4096 + 1, v), (15 * 4096, 999 * v, 3),
              (17 * 4096 + 3, 5, 4095)]
    aligned = [True, True, True, False, False, False, False]
    for key, t in ((2**64 - 1, 6554), (2**64 - 2, 1), (2**63, 65535), (2**64 - 3, 65536),
                   (5, 0)):
        buffer, grads = _views(dtype, [(s, n) for s, n, _ in layout])
        before = buffer.cpu().clone()
        offsets = [o for _, _, o in layout]
        for g, is_aligned, off in zip(grads, aligned, offsets):
            assert K._is_aligned(g, off) == is_aligned, (g.data_ptr() % 16, g.numel(), off)
        sc = 1.25 if t == 0 else oracle.scale(t)  # t = 0 with a scale other than 1 still runs
        with observe(K) as seen:
            # key - i < 0 for key 5: keys are taken modulo 2**64
            K.mask_(grads, [key - i for i in range(len(grads))], [t] * len(grads),
                    [sc] * len(grads), offsets)
        name = str(dtype).removeprefix("torch.")
        assert sorted(seen.variants) == [f"mask_{name}_aligned", f"mask_{name}_generic"]
        assert seen.readbacks == 0 and seen.synchronize_calls == 0
        after = buffer.cpu()
        for i, ((start, n, off), g) in enumerate(zip(layout, grads)):
            want = oracle.expected(before[start : start + n], (key - i) % 2**64, t, sc, off)
            oracle.assert_matches(g, want, f"{dtype} tensor {i} key={key} t={t}")
        untouched = torch.ones(before.numel(), dtype=torch.bool)
        for start, n, _ in layout:
            untouched[start : start + n] = False
        assert torch.equal(oracle.raw(after)[untouched], oracle.raw(before)[untouched])


def test_mask_launches_do_not_grow_with_the_tensor_count() -> None:
    def run(count: int):
        grads, keys, offsets = [], [], []
        for i in range(count):
            for dtype in DTYPES:
                buffer = _on(oracle.grad(4096 + 64, dtype, seed=i))
                grads += [buffer[: 8 * (i + 1)], buffer[1 : 8 * (i + 1) + 4]]  # aligned, generic
                keys += [2**64 - 1 - i, i]
                offsets += [64 * i, 7 * i]
        with observe(K) as seen:
            K.mask_(grads, keys, [6554] * len(grads), [1.1] * len(grads), offsets)
        return seen

    one, many = run(1), run(5)
    assert one.launches == many.launches == 6  # 3 dtypes x (aligned, generic)
    assert one.ops == many.ops  # the same torch work whatever the count
    assert many.readbacks == 0 and many.synchronize_calls == 0


# ------------------------------------------------------------- full update drop, batched
def _chunk_counts(dropped: np.ndarray, offset: int) -> list[int]:
    """Dropped elements per stream chunk that the tensor touches."""
    counts = []
    c0 = offset // 4096
    for c in range(K.num_chunks(dropped.size, offset)):
        lo = max(0, (c0 + c) * 4096 - offset)
        hi = min(dropped.size, (c0 + c + 1) * 4096 - offset)
        counts.append(int(dropped[lo:hi].sum()))
    return counts


def _pack_case(dtype: torch.dtype, sizes: list[int], offsets: list[int], keys: list[int],
               thresholds: list[int]):
    tensors = [oracle.filled(n, dtype, seed=3 * i + n) for i, n in enumerate(sizes)]
    dropped = [oracle.numpy_bits(k, n, o) < t
               for k, n, o, t in zip(keys, sizes, offsets, thresholds)]
    want_values = torch.cat([oracle.raw(x)[torch.from_numpy(d)] for x, d in zip(tensors, dropped)])
    counts = [c for d, o in zip(dropped, offsets) for c in _chunk_counts(d, o)]
    want_starts = torch.tensor(np.concatenate([[0], np.cumsum(counts)]), dtype=torch.int64)
    return tensors, dropped, want_values, want_starts


@pytest.mark.parametrize("dtype", PACK_DTYPES, ids=str)
def test_gather_and_scatter_dropped_many_match_the_definition(dtype: torch.dtype) -> None:
    sizes = [4097, 0, 1, 3 * 4096 + 5, 77]
    offsets = [3, 9, 4095, 2**40 + 1, 4096]
    keys = [2**64 - 1, 7, 2**63, 2**64 - 2, 0]
    thresholds = [6554, 65536, 0, 65535, 1]
    tensors, dropped, want_values, want_starts = _pack_case(dtype, sizes, offsets, keys,
                                                           thresholds)
    values, starts = K.gather_dropped_many([_on(x) for x in tensors], keys, thresholds, offsets)
    assert values.dtype == dtype and starts.dtype == torch.int64
    assert torch.equal(oracle.raw(values.cpu()), want_values)
    assert torch.equal(starts.cpu(), want_starts)
    targets = [oracle.filled(n, dtype, seed=1000 + n) for n in sizes]
    want = [torch.where(torch.from_numpy(d), oracle.raw(x), oracle.raw(y))
            for d, x, y in zip(dropped, tensors, targets)]
    targets = [_on(y) for y in targets]
    K.scatter_dropped_many(targets, keys, thresholds, offsets, values, starts)
    for got, w in zip(targets, want):
        assert torch.equal(oracle.raw(got.cpu()), w)


def test_full_update_drop_launches_and_readbacks_do_not_grow_with_the_tensor_count() -> None:
    def run(count: int):
        sizes = [1000 + 4096 * (i % 3) for i in range(count)]
        tensors = [_on(oracle.filled(n, torch.bfloat16, seed=n)) for n in sizes]
        tensors += [_on(oracle.filled(n, torch.float16, seed=n)) for n in sizes]  # same size
        keys = list(range(len(tensors)))
        thresholds, offsets = [6554] * len(tensors), [5 * i for i in range(len(tensors))]
        with observe(K) as gathered:
            values, starts = K.gather_dropped_many(tensors, keys, thresholds, offsets)
        with observe(K) as scattered:
            K.scatter_dropped_many(tensors, keys, thresholds, offsets, values, starts)
        return gathered, scattered

    (g1, s1), (g9, s9) = run(1), run(9)
    assert g1.variants == g9.variants == ["count", "gather_16bit"]
    assert s1.variants == s9.variants == ["scatter_16bit"]
    assert g1.ops == g9.ops and s1.ops == s9.ops
    assert g1.readbacks == g9.readbacks == 1  # the total, to size the values
    assert s9.readbacks == 0
    assert g9.synchronize_calls == s9.synchronize_calls == 0


def test_gather_and_scatter_dropped_many_reject_bad_input() -> None:
    a, b = _on(torch.ones(10)), _on(torch.ones(10, dtype=torch.float16))
    with pytest.raises(ValueError, match="element size"):
        K.gather_dropped_many([a, b], [1, 2], [6554, 6554], [0, 0])
    with pytest.raises(ValueError, match="at least one"):
        K.gather_dropped_many([], [], [], [])
    with pytest.raises(ValueError, match="threshold"):
        K.gather_dropped_many([a], [1], [65537], [0])
    with pytest.raises(ValueError, match="differ in length"):
        K.gather_dropped_many([a], [1, 2], [6554], [0])
    values, starts = K.gather_dropped_many([a], [1], [65536], [0])
    with pytest.raises(ValueError, match="values"):
        K.scatter_dropped_many([a], [1], [65536], [0], values.half(), starts)
    with pytest.raises(ValueError, match="starts"):
        K.scatter_dropped_many([a, a], [1, 1], [65536, 65536], [0, 0], values, starts)
