"""Every masking backend through the backend protocol (hf_dropgrad/kernels/protocol.py).

Each test runs once per backend: ``cpp`` (the ``hf_dropgrad::`` ops on CPU tensors, whose CPU
implementation is the C++ kernel), ``triton`` (Triton's interpreter on CPU tensors without a
GPU, compiled on CUDA tensors with one) and ``torch`` (the reference), each reached through the
plan :func:`hf_dropgrad.kernels.plan_of` gives, and compares it with the stream's definition
(tests/stream_oracle.py): masks, keep decisions, offsets, runs (column shards), full update
drop's gather/scatter and the fused variants, and the refusals of bad input. What only one
backend has (the C++ code paths and threads, Triton's launches) is in test_kernels_cpp.py and
test_kernels_triton.py. Triton's interpreter is slow, so its sizes are smaller.
"""

from __future__ import annotations

import inspect
import itertools

import numpy as np
import pytest
import torch

from hf_dropgrad import kernels
from hf_dropgrad.kernels import protocol
from tests import stream_oracle as oracle
from tests.stream_oracle import DTYPES, KEYS, PACK_DTYPES

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inside the interpreter

CUDA = torch.cuda.is_available()


def _available(name: str) -> bool:
    if name == "cpp":
        from hf_dropgrad.kernels import cpp

        return cpp.load() is not None
    if name == "triton":
        module = kernels.triton_module()
        return module is not None and (CUDA or module.interpreting())
    return True


BACKENDS = [b for b in ("cpp", "triton", "torch") if _available(b)]


class Backend:
    """A backend under test: its module (the plan's), the device its tensors go to, sizes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.device = torch.device("cuda" if name == "triton" and CUDA else "cpu")
        self.ops = kernels.plan_of(name, self.device).ops
        self.slow = name == "triton" and not CUDA  # the interpreter
        self.numels = [1, 1000, 4096, 4097, 3 * 4096 + 5] if self.slow else oracle.NUMELS

    def on(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    return Backend(request.param)


_raw, _filled, _grad, _scale = oracle.raw, oracle.filled, oracle.grad, oracle.scale


# ----------------------------------------------------------------------------- the protocol
def test_the_numpy_oracle_matches_the_python_definition() -> None:
    rng = np.random.default_rng(0)
    for key in KEYS:
        bits = oracle.numpy_bits(key, 3 * 4096 + 5)
        for e in [0, 1, 1023, 1024, 4095, 4096, *rng.integers(0, bits.size, 50).tolist()]:
            assert bits[e] == oracle.python_bits(key, e)


def test_every_backend_module_offers_the_protocol_with_the_same_signatures() -> None:
    from hf_dropgrad.kernels import ops, reference

    modules = [ops, reference]
    if kernels.triton_module() is not None:
        modules.append(kernels.triton_module())
    for name in protocol.FUNCTIONS:
        want = inspect.signature(getattr(protocol.Backend, name))
        want = want.replace(parameters=list(want.parameters.values())[1:])  # no self
        for module in modules:
            got = inspect.signature(getattr(module, name))
            assert [(p.name, p.kind, p.default) for p in got.parameters.values()] == [
                (p.name, p.kind, p.default) for p in want.parameters.values()
            ], (module.__name__, name)
        assert isinstance(ops, protocol.Backend) and isinstance(reference, protocol.Backend)


# ----------------------------------------------------------------------------- masking
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mask_matches_the_definition(backend: Backend, dtype: torch.dtype) -> None:
    keys = KEYS[::2] if backend.slow else KEYS
    for numel in backend.numels:
        base = _grad(numel, dtype)
        for key, t in itertools.product(keys, oracle.THRESHOLDS):
            g = backend.on(base.clone())
            backend.ops.mask_([g], [key], [t], [_scale(t)])
            oracle.assert_matches(g, oracle.expected(base, key, t, _scale(t)), f"{key} {t}")


OFFSETS = [1, 1023, 1024, 4095, 4096, 5000, 2**40 + 3]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mask_and_keep_mask_with_an_offset_match_the_definition(
    backend: Backend, dtype: torch.dtype
) -> None:
    for numel in (1, 3000, 4097, 9001):
        base = _grad(numel, dtype, seed=numel)
        for offset in OFFSETS[::2] if backend.slow else OFFSETS:
            for key, t in ((7, 6554), (2**64 - 1, 65535), (2**63, 1)):
                g = backend.on(base.clone())
                backend.ops.mask_([g], [key], [t], [_scale(t)], [offset])
                want = oracle.expected(base, key, t, _scale(t), offset)
                oracle.assert_matches(g, want, f"numel={numel} offset={offset} key={key} t={t}")
                out = backend.on(torch.ones(numel, dtype=torch.bool))
                backend.ops.keep_mask_(out, key, t, offset)
                bits = oracle.numpy_bits(key, numel, offset)
                assert np.array_equal(out.cpu().numpy(), bits >= t), (numel, offset)


# (rows, columns of the full weight, first column, columns of the shard): halves and quarters
# of rows that start on and off chunk boundaries, runs shorter than a lane, longer than a chunk
COLUMN_SHARDS = [(8, 4096, 0, 2048), (8, 4096, 2048, 2048), (5, 768, 384, 384),
                 (7, 1000, 3, 500), (3, 9000, 4000, 4500), (2, 4096, 0, 4096), (1, 5000, 7, 4993),
                 (40, 96, 48, 48)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_column_shard_in_runs_gets_its_elements_of_the_full_mask(
    backend: Backend, dtype: torch.dtype
) -> None:
    for rows, cols, first, width in COLUMN_SHARDS:
        full = _grad(rows * cols, dtype, seed=cols).view(rows, cols)
        shard = full[:, first : first + width].contiguous()
        for key, t in ((5, 6554), (2**64 - 1, 32768)):
            g = backend.on(shard.clone())
            backend.ops.mask_([g], [key], [t], [_scale(t)], [first], [width], [cols])
            # the definition at the shard's own stream indices, and the full weight's mask
            want = oracle.expected(shard, key, t, _scale(t), first, width, cols)
            oracle.assert_matches(g, want, f"{rows}x{cols}[:, {first}:+{width}]")
            whole = oracle.expected(full, key, t, _scale(t))
            cut = (np.arange(rows * cols).reshape(rows, cols)[:, first : first + width]).ravel()
            assert np.array_equal(whole[0][cut][~want[1]], want[0][~want[1]])
    # the negative control: the same shard masked as if contiguous differs
    rows, cols, first, width = COLUMN_SHARDS[0]
    shard = _grad(rows * width, torch.float32, seed=3)
    a, b = backend.on(shard.clone()), backend.on(shard.clone())
    backend.ops.mask_([a], [5], [32768], [2.0], [first], [width], [cols])
    backend.ops.mask_([b], [5], [32768], [2.0], [first])
    assert not torch.equal(_raw(a), _raw(b))


def test_slices_masked_with_their_offsets_equal_the_whole_tensor_mask(backend: Backend) -> None:
    whole = _grad(5 * 4096 + 77, torch.bfloat16, seed=5)
    masked = backend.on(whole.clone())
    backend.ops.mask_([masked], [99], [19661], [_scale(19661)])
    cuts = [0, 1, 1000, 4096, 4100, 9000, 5 * 4096 + 77]
    pieces = [backend.on(whole[a:b].clone()) for a, b in itertools.pairwise(cuts)]
    n = len(pieces)
    backend.ops.mask_(pieces, [99] * n, [19661] * n, [_scale(19661)] * n, cuts[:-1])
    assert torch.equal(_raw(torch.cat(pieces)), _raw(masked))


def test_threshold_zero_with_scale_one_leaves_the_tensor_untouched(backend: Backend) -> None:
    # NaN payloads included (a multiply by 1.0 would canonicalise bf16/fp16 NaNs).
    for dtype, itype in [(torch.float32, torch.int32), (torch.bfloat16, torch.int16)]:
        g = backend.on(torch.full((5000,), -1, dtype=itype).view(dtype))
        before = g.clone()
        backend.ops.mask_([g], [3], [0], [1.0])
        assert torch.equal(g.view(itype), before.view(itype))


def test_a_list_equals_one_call_per_tensor(backend: Backend) -> None:
    specs = [(1, torch.float32), (70000, torch.bfloat16), (4097, torch.float16), (0, torch.float32)]
    specs += [(33 * 4096 + 11, torch.float32), (5, torch.bfloat16), (200000, torch.float32)]
    if backend.slow:
        specs = [(n // 8 + 1 if n > 8192 else n, dt) for n, dt in specs]
    keys = [2**64 - 1 - 977 * i for i in range(len(specs))]
    thresholds = [6554, 32768, 100, 1, 65535, 65536, 6554]
    scales = [_scale(t) for t in thresholds]
    offsets = [0, 3, 4095, 0, 2**33, 1, 7]
    grads = [backend.on(_grad(n, dt, seed=i)) for i, (n, dt) in enumerate(specs)]
    singles = [g.clone() for g in grads]
    for g, k, t, s, o in zip(singles, keys, thresholds, scales, offsets, strict=True):
        backend.ops.mask_([g], [k], [t], [s], [o])
    backend.ops.mask_(grads, keys, thresholds, scales, offsets)
    for a, b in zip(grads, singles, strict=True):
        oracle.assert_same(a, b)


def test_multidimensional_tensors_use_the_row_major_index(backend: Backend) -> None:
    g = backend.on(_grad(3 * 5000, torch.float32).view(3, 50, 100))
    flat = g.clone().view(-1)
    backend.ops.mask_([g], [11], [6554], [_scale(6554)])
    backend.ops.mask_([flat], [11], [6554], [_scale(6554)])
    assert torch.equal(_raw(g.view(-1)), _raw(flat))


def test_the_realised_rate_is_the_threshold_and_survivors_are_unbiased(backend: Backend) -> None:
    n = 1 << (16 if backend.slow else 20)
    t = 6554  # p = 0.1
    g = backend.on(torch.ones(n))
    backend.ops.mask_([g], [123], [t], [_scale(t)])
    dropped = (g == 0).float().mean().item()
    assert abs(dropped - t / 65536) < 5 * (0.1 * 0.9 / n) ** 0.5
    assert g[g != 0].unique().tolist() == [pytest.approx(65536 / (65536 - t), rel=1e-7)]
    a = backend.on(torch.ones(n // 4, dtype=torch.bool))
    b = backend.on(torch.ones(n // 4, dtype=torch.bool))
    backend.ops.keep_mask_(a, 1, 32768, 0)
    backend.ops.keep_mask_(b, 2, 32768, 0)
    assert 0.45 < (a != b).float().mean().item() < 0.55  # different keys, different masks


# ----------------------------------------------------------------------------- full update drop
def _expected_many(
    tensors: list[torch.Tensor], keys: list[int], thresholds: list[int], offsets: list[int],
    runs: list[int] | None = None, strides: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """values, starts and per-tensor dropped masks, from the numpy oracle alone."""
    values, starts, masks = [], [0], []
    for i, (x, k, t, o) in enumerate(zip(tensors, keys, thresholds, offsets, strict=True)):
        run = None if runs is None else runs[i]
        stride = 0 if strides is None else strides[i]
        e = oracle.indices(x.numel(), o, run, stride)
        dropped = torch.from_numpy(oracle.numpy_bits_at(k, e) < t)
        masks.append(dropped)
        values.append(_raw(x.cpu()).view(-1)[dropped])
        for lo, hi in oracle.chunk_bounds(x.numel(), o, run, stride):
            starts.append(starts[-1] + int(dropped[lo:hi].sum()))
    return torch.cat(values), torch.tensor(starts, dtype=torch.int64), masks


# sizes and offsets that start, end and straddle chunks at odd places, an empty tensor included
MANY_SPECS = [(1, 0), (4097, 3), (0, 5), (3 * 4096 + 5, 4095), (9001, 2**40 + 3), (4096, 4096)]
MANY_KEYS = [7, 2**63, 2**64 - 1, 0, 0xDEADBEEF_CAFEF00D, 12345]
MANY_THRESHOLDS = ([6554] * 6, [0, 1, 65535, 65536, 32768, 6554])


@pytest.mark.parametrize("dtype", PACK_DTYPES, ids=str)
def test_gather_and_scatter_dropped_many_match_the_definition(
    backend: Backend, dtype: torch.dtype
) -> None:
    tensors = [backend.on(_filled(n, dtype, seed=i)) for i, (n, _) in enumerate(MANY_SPECS)]
    offsets = [o for _, o in MANY_SPECS]
    for thresholds in MANY_THRESHOLDS:
        values, starts = backend.ops.gather_dropped_many(tensors, MANY_KEYS, thresholds, offsets)
        want_values, want_starts, masks = _expected_many(tensors, MANY_KEYS, thresholds, offsets)
        assert values.dtype == dtype and starts.dtype == torch.int64
        assert torch.equal(starts.cpu(), want_starts), thresholds
        assert torch.equal(_raw(values.cpu()), want_values), thresholds
        targets = [backend.on(_filled(x.numel(), dtype, seed=100 + i))
                   for i, x in enumerate(tensors)]
        wants = [torch.where(m, _raw(x.cpu()), _raw(y.cpu()))
                 for m, x, y in zip(masks, tensors, targets)]
        backend.ops.scatter_dropped_many(targets, MANY_KEYS, thresholds, offsets, None, None,
                                         values, starts)
        for i, (got, want) in enumerate(zip(targets, wants)):
            assert torch.equal(_raw(got.cpu()), want), (i, thresholds)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=str)
def test_gather_and_scatter_in_runs_match_the_definition(
    backend: Backend, dtype: torch.dtype
) -> None:
    shards = COLUMN_SHARDS[:4] if backend.slow else COLUMN_SHARDS
    tensors = [backend.on(_filled(rows * width, dtype, seed=i))
               for i, (rows, _, _, width) in enumerate(shards)]
    offsets = [first for _, _, first, _ in shards]
    runs = [width for *_, width in shards]
    strides = [cols for _, cols, _, _ in shards]
    keys = [11 * i + 1 for i in range(len(shards))]
    thresholds = [26214] * len(shards)
    values, starts = backend.ops.gather_dropped_many(tensors, keys, thresholds, offsets, runs,
                                                     strides)
    want_values, want_starts, masks = _expected_many(tensors, keys, thresholds, offsets, runs,
                                                     strides)
    assert torch.equal(starts.cpu(), want_starts)
    assert torch.equal(_raw(values.cpu()), want_values)
    targets = [torch.zeros_like(x) for x in tensors]
    backend.ops.scatter_dropped_many(targets, keys, thresholds, offsets, runs, strides, values,
                                     starts)
    for m, x, y in zip(masks, tensors, targets):
        assert torch.equal(_raw(y.cpu())[m], _raw(x.cpu())[m]) and not _raw(y.cpu())[~m].any()
    # mask_counted_ counts what gather packs; gather_dropped_at packs at those starts
    grads = [backend.on(_grad(x.numel(), torch.float32, seed=7)) for x in tensors]
    counted = backend.on(torch.full((want_starts.numel(),), -1, dtype=torch.int64))
    backend.ops.mask_counted_(grads, keys, thresholds, [_scale(26214)] * len(grads), offsets,
                              runs, strides, counted)
    assert torch.equal(counted.cpu(), want_starts)
    at = backend.ops.gather_dropped_at(tensors, keys, thresholds, offsets, runs, strides, counted)
    assert torch.equal(_raw(at.cpu()), want_values)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mask_counted_masks_as_mask_and_counts_as_gather(
    backend: Backend, dtype: torch.dtype
) -> None:
    grads = [backend.on(_grad(n, dtype)) for n, _ in MANY_SPECS]
    offsets = [o for _, o in MANY_SPECS]
    # 0 with a scale other than 1 is masked; 0 with scale 1 is skipped by the mask but counted
    for thresholds in MANY_THRESHOLDS:
        scales = [_scale(t) for t in thresholds]
        if thresholds[0] == 0:
            scales[0] = 1.0
        want_grads = [g.clone() for g in grads]
        backend.ops.mask_(want_grads, MANY_KEYS, thresholds, scales, offsets)
        _, want_starts, _ = _expected_many(grads, MANY_KEYS, thresholds, offsets)
        got = [g.clone() for g in grads]
        starts = backend.on(torch.full((want_starts.numel(),), -7, dtype=torch.int64))
        backend.ops.mask_counted_(got, MANY_KEYS, thresholds, scales, offsets, None, None, starts)
        assert torch.equal(starts.cpu(), want_starts), thresholds
        for i, (g, w) in enumerate(zip(got, want_grads)):
            assert torch.equal(_raw(g), _raw(w)), (i, thresholds)


# the parameter dtype packed beside each gradient dtype: one element size
_SAME_SIZE = {torch.float32: torch.float32, torch.bfloat16: torch.float16,
              torch.float16: torch.bfloat16}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mask_gather_dropped_equals_the_mask_and_the_definition(
    backend: Backend, dtype: torch.dtype
) -> None:
    specs = [*MANY_SPECS, (70 * 4096 + 3, 7)] if not backend.slow else MANY_SPECS
    grads = [backend.on(_grad(n, dtype, seed=i)) for i, (n, _) in enumerate(specs)]
    params = [backend.on(_filled(n, _SAME_SIZE[dtype], seed=50 + i))
              for i, (n, _) in enumerate(specs)]
    offsets = [o for _, o in specs]
    keys = [3, 2**63 + 1, 99, 0, 5, 2**64 - 2, 77][: len(specs)]
    for thresholds in ([6554] * 7, [0, 1, 65535, 65536, 32768, 6554, 19661]):
        thresholds = thresholds[: len(specs)]
        scales = [_scale(t) for t in thresholds]
        want_grads = [g.clone() for g in grads]
        backend.ops.mask_(want_grads, keys, thresholds, scales, offsets)
        want_values, want_starts, _ = _expected_many(params, keys, thresholds, offsets)
        got = [g.clone() for g in grads]
        values, starts = backend.ops.mask_gather_dropped_(got, params, keys, thresholds, scales,
                                                          offsets)
        assert values.dtype == params[0].dtype and values.is_contiguous()
        assert torch.equal(starts.cpu(), want_starts), thresholds
        assert torch.equal(_raw(values.cpu()), want_values), thresholds
        for i, (g, w) in enumerate(zip(got, want_grads)):
            assert torch.equal(_raw(g), _raw(w)), (i, thresholds)


# ----------------------------------------------------------------------------- bad input
def test_bad_thresholds_lengths_offsets_and_runs_are_refused(backend: Backend) -> None:
    g = backend.on(torch.ones(12))
    mask = backend.ops.mask_
    for t in (65537, -1):
        with pytest.raises(ValueError, match="threshold"):
            mask([g.clone()], [0], [t], [1.0])
    with pytest.raises(ValueError, match="differ in length"):
        mask([g, g.clone()], [0], [1, 1], [1.0, 1.0])
    for bad in (1.5, True, "3"):
        with pytest.raises(TypeError, match=r"offsets\[0\]"):
            mask([g.clone()], [0], [1], [1.0], [bad])  # type: ignore[list-item]
    for bad in (-1, 2**62):
        with pytest.raises(ValueError, match=r"offsets\[0\] must be in \[0, 2\*\*62\)"):
            mask([g.clone()], [0], [1], [1.0], [bad])
    with pytest.raises(ValueError, match="one entry per tensor"):
        mask([g.clone()], [0], [1], [1.0], [0, 0])
    with pytest.raises(ValueError, match=r"runs\[0\] must divide the tensor's 12 elements"):
        mask([g.clone()], [0], [1], [1.0], [0], [5], [5])
    with pytest.raises(ValueError, match=r"strides\[0\] must be >= runs\[0\]"):
        mask([g.clone()], [0], [1], [1.0], [0], [4], [3])
    with pytest.raises(ValueError, match="give both or neither"):
        mask([g.clone()], [0], [1], [1.0], [0], [4], None)
    with pytest.raises(ValueError, match="past 2\\*\\*62"):
        mask([g.clone()], [0], [1], [1.0], [2**62 - 10], [4], [4])
    out = backend.on(torch.ones(3, dtype=torch.bool))
    with pytest.raises((ValueError, TypeError), match="offset"):
        backend.ops.keep_mask_(out, 0, 1, -1)


def test_full_update_drop_refuses_bad_input(backend: Backend) -> None:
    a = backend.on(torch.randn(5000))
    b = backend.on(torch.randn(50, dtype=torch.float64))
    ops = backend.ops
    with pytest.raises(ValueError, match="element size"):
        ops.gather_dropped_many([a, b], [1, 2], [6554, 6554], [0, 0])
    with pytest.raises(ValueError, match="differ in length"):
        ops.gather_dropped_many([a], [1, 2], [6554], [0])
    values, starts = ops.gather_dropped_many([a, a], [1, 2], [6554, 6554], [0, 0])
    with pytest.raises(ValueError, match="starts"):
        ops.scatter_dropped_many([a], [1], [6554], [0], None, None, values, starts)
    with pytest.raises(ValueError, match="values"):
        ops.scatter_dropped_many([a, a], [1, 2], [6554] * 2, [0, 0], None, None,
                                 values.double(), starts)
    for bad in (torch.empty(2, dtype=torch.int64), torch.empty(3, dtype=torch.int32)):
        with pytest.raises(ValueError, match="starts"):
            ops.mask_counted_([a.clone()], [1], [6554], [1.1], [0], None, None,
                              backend.on(bad))
        with pytest.raises(ValueError, match="starts"):
            ops.gather_dropped_at([a], [1], [6554], [0], None, None, backend.on(bad))
    with pytest.raises(ValueError, match="grads and tensors differ in length"):
        ops.mask_gather_dropped_([a], [a, a], [1], [6554], [1.1], [0])
    with pytest.raises(ValueError, match=r"tensors\[0\] must (have|be).*grads\[0\]'s size"):
        ops.mask_gather_dropped_([a], [backend.on(torch.randn(4999))], [1], [6554], [1.1], [0])


@pytest.mark.parametrize("name", [b for b in BACKENDS if b != "torch"])
def test_the_fused_backends_refuse_non_contiguous_and_float64_gradients(name: str) -> None:
    backend = Backend(name)
    with pytest.raises(ValueError, match="contiguous"):
        backend.ops.mask_([backend.on(torch.ones(4, 4)).t()], [0], [1], [1.0])
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        backend.ops.mask_([backend.on(torch.ones(4, dtype=torch.float64))], [0], [1], [1.0])
    with pytest.raises(ValueError, match=r"tensors\[1\].*contiguous"):
        x = backend.on(torch.randn(100))
        backend.ops.gather_dropped_many([x, backend.on(torch.randn(4, 4)).t()], [1, 2], [1, 1],
                                        [0, 0])
