"""What only the Triton backend has (hf_dropgrad/kernels/triton.py): its program map, its aligned
(128-bit) and generic paths, and its launches and host read-backs, which must not grow with the
number of tensors or runs. Its agreement with the stream's definition, like every backend's, is
in test_backends.py.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
``TRITON_INTERPRET=1`` before Triton is imported); with one, compiled, on CUDA tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import stream_oracle as oracle
from tests.stream_oracle import DTYPES
from tests.triton_launches import observe

K = pytest.importorskip("hf_dropgrad.kernels.triton", reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not K.interpreting():
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

# The interpreter computes in numpy: inf * 0 and float16 overflow warn there, as intended.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")



def _on(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEVICE)


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
            call = K._Call([g], [0], [0], [off], None, None)
            assert call.aligned(0) == is_aligned, (g.data_ptr() % 16, g.numel(), off)
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
            K.scatter_dropped_many(tensors, keys, thresholds, offsets, None, None, values, starts)
        return gathered, scattered

    (g1, s1), (g9, s9) = run(1), run(9)
    assert g1.variants == g9.variants == ["count", "gather_16bit"]
    assert s1.variants == s9.variants == ["scatter_16bit"]
    assert g1.ops == g9.ops and s1.ops == s9.ops
    assert g1.readbacks == g9.readbacks == 1  # the total, to size the values
    assert s9.readbacks == 0
    assert g9.synchronize_calls == s9.synchronize_calls == 0


def test_column_shards_in_runs_launch_once_per_dtype_and_path() -> None:
    """A tensor in runs is one table row and one program per chunk of each run, in the same
    launch as the contiguous tensors: one launch per dtype and path, whatever the runs."""
    def run(rows: int):
        grads, offsets, runs, strides = [], [], [], []
        for dtype in DTYPES:
            grads += [_on(oracle.grad(rows * 256, dtype, seed=rows)),  # aligned runs
                      _on(oracle.grad(rows * 250, dtype, seed=rows))]  # runs of odd length
            offsets += [256, 3]
            runs += [256, 250]
            strides += [1024, 1000]
        keys = list(range(len(grads)))
        with observe(K) as seen:
            K.mask_(grads, keys, [6554] * len(grads), [1.1] * len(grads), offsets, runs, strides)
        return seen

    few, many = run(2), run(40)
    assert sorted(few.variants) == sorted(many.variants)
    assert many.launches == 6  # 3 dtypes x (aligned, generic)
    assert few.ops == many.ops and many.readbacks == 0 and many.synchronize_calls == 0


def test_the_program_map_names_each_program_s_tensor_run_and_chunk() -> None:
    # a contiguous tensor over 3 chunks, then 3 runs of 3000 at stride 5000 from 4000: the runs
    # (stream elements 4000-6999, 9000-11999, 14000-16999) touch chunks 0-1, 2, and 3-4
    progmap = K._program_map(((9000, 100, 9000, 9000), (9000, 4000, 3000, 5000)), False)
    assert progmap.view(-1, 3).tolist() == [
        [0, 0, 0], [0, 0, 1], [0, 0, 2],
        [1, 0, 0], [1, 0, 1], [1, 1, 0], [1, 2, 0], [1, 2, 1],
    ]


def test_scatter_never_reads_past_the_end_of_the_values() -> None:
    """starts that count more values than given (a hand-made DroppedValues gone wrong): the move
    kernel reads none past the end; the elements whose values are missing keep theirs."""
    x = _on(oracle.filled(9000, torch.float32, seed=1))
    values, starts = K.gather_dropped_many([x], [3], [26214], [0])
    short = values[: values.numel() // 2].clone()
    target = _on(torch.zeros(9000))
    K.scatter_dropped_many([target], [3], [26214], [0], None, None, short, starts)
    dropped = torch.from_numpy(oracle.numpy_bits(3, 9000) < 26214)
    got = oracle.raw(target.cpu())[dropped]
    half = short.numel()
    assert torch.equal(got[:half], oracle.raw(short.cpu()))
    assert not got[half:].any()
